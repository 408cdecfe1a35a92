"""Texts to embed, read as a stream: JSON Lines, CSV/TSV, Parquet, or a folder of such files (a folder of shards,
or a dataset folder laid out as on the Hugging Face hub: its data files in path order). Rows are numbered from 0
across the files; each comes with its place in them (`file:line`, or `file row i` in Parquet)."""
import csv
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from twinfold.models.files.jsonl import iter_json_lines

ROW_FILES = (".jsonl", ".csv", ".tsv", ".parquet")  # read from a folder; a single file of another name is JSONL
PARQUET_BATCH = 8192


class InputError(ValueError):
    """A row of the input that cannot be embedded; the message names the file and line."""


@dataclass
class Row:
    index: int  # the row's number in the whole input, from 0
    place: str  # `file:line` or `file row i`
    id: str
    text: str


def input_files(path: str | Path) -> list[Path]:
    """The files of an input: the file itself, or a folder's JSONL, CSV, TSV and Parquet files in path order
    (hidden ones left out)."""
    path = Path(path)
    if not path.is_dir():
        if not path.is_file():
            raise InputError(f"{path}: no such file or folder")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in ROW_FILES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise InputError(f"{path}: a folder without {', '.join(ROW_FILES)} files to embed")
    return files


def count_rows(files: list[Path]) -> int:
    """The number of rows of the input (non-blank JSONL lines, CSV/TSV records, Parquet rows), texts unread."""
    total = 0
    for path in files:
        if path.suffix == ".parquet":
            total += pq.ParquetFile(path).metadata.num_rows
        elif path.suffix in (".csv", ".tsv"):
            total += sum(1 for _ in _csv_records(path))
        else:
            with open(path, "rb") as f:
                total += sum(1 for raw in f if raw.strip())
    return total


def iter_rows(files: list[Path], field: str, id_field: str,
              wanted: Callable[[int], bool] = lambda row: True) -> Iterator[Row]:
    """The rows whose number `wanted` accepts, with their id (`id_field`, default: the row number) and text
    (`field`, checked: a string with a visible character); the other rows are skipped (JSONL lines unparsed)."""
    start = 0
    for path in files:
        start += yield from _file_rows(path, start, field, id_field, wanted)


def _file_rows(path: Path, start: int, field: str, id_field: str,
               wanted: Callable[[int], bool]) -> Generator[Row, None, int]:
    """The wanted rows of one file whose first row is number `start`; returns the file's number of rows."""
    if path.suffix == ".parquet":
        table = pq.ParquetFile(path)
        if field not in table.schema_arrow.names:
            raise InputError(f"{path}: no column {field!r} (it has {', '.join(table.schema_arrow.names)})")
        columns = [c for c in (field, id_field) if c in table.schema_arrow.names]
        done = 0
        for batch in table.iter_batches(PARQUET_BATCH, columns=columns):
            rows = [r for r in range(done, done + batch.num_rows) if wanted(start + r)]
            for r, values in zip(rows, batch.take([r - done for r in rows]).to_pylist() if rows else []):
                yield _row(start + r, f"{path} row {r}", values, field, id_field)
            done += batch.num_rows
        return done
    if path.suffix in (".csv", ".tsv"):
        count = 0
        for count, (line, values) in enumerate(_csv_records(path), 1):
            if wanted(start + count - 1):
                yield _row(start + count - 1, f"{path}:{line}", values, field, id_field)
        return count
    count = 0

    def counted(row: int) -> bool:
        nonlocal count
        count = row + 1
        return wanted(start + row)

    for line, values in iter_json_lines(path, InputError, counted):
        yield _row(start + count - 1, f"{path}:{line}", values, field, id_field)
    return count


def _row(index: int, place: str, values: dict, field: str, id_field: str) -> Row:
    text = values.get(field)
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{place}: field {field!r} is missing, empty or not a string")
    doc_id = values.get(id_field)
    return Row(index, place, str(index if doc_id is None else doc_id), text)


def _csv_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line where it ends, values by header) of each record of a CSV or TSV file with a header line."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        for values in reader:
            yield reader.line_num, values
