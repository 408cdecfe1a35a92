"""JSON Lines input: one object a line, with errors naming the file and line."""
import json
from collections.abc import Iterator
from pathlib import Path


def iter_json_lines(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; raise `error` at the first bad one."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{n}: not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield n, row
