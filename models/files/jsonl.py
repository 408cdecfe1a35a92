"""JSON Lines input: one object a line, with errors naming the file and line."""
import json
from collections.abc import Callable, Iterator
from pathlib import Path


def iter_json_lines(path: str | Path, error: type[Exception] = ValueError,
                    wanted: Callable[[int], bool] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; raise `error` at the first bad one. `wanted`: parse
    only the rows (non-blank lines, counted from 0) it accepts; the others are counted, not read."""
    row = -1
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            row += 1
            if wanted is not None and not wanted(row):
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{n}: not valid UTF-8 (byte {e.start})") from None
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj
