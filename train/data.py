"""Training pairs: load with Hugging Face `datasets`, map source columns to named roles, validate rows."""
from dataclasses import dataclass
from pathlib import Path

from models.jsonl import iter_json_lines
from train.config import DatasetConfig

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """Training data that cannot be used, naming the file, line and field."""


@dataclass
class PairDataset:
    """Texts by role: `anchor[i]`, `positive[i]` and zero or more `negatives[i]` form row i."""

    name: str
    anchor: list[str]
    positive: list[str]
    negatives: list[list[str]]
    weight: float = 1.0

    def __len__(self) -> int:
        return len(self.anchor)

    def texts(self, i: int) -> list[str]:
        return [self.anchor[i], self.positive[i], *self.negatives[i]]


def load_pairs(cfg: DatasetConfig) -> PairDataset:
    """Load one dataset of the config and check every mapped text."""
    path = Path(cfg.path)
    local = path.exists()
    table = _load_table(cfg, path) if local else _load_hub(cfg)
    columns = cfg.columns or {c: c for c in table.column_names if c in ("anchor", "positive", "negative")}
    if not cfg.columns and not {"anchor", "positive"} <= set(columns):
        raise DataError(
            f"{cfg.path}: columns {table.column_names}: map them to roles in the config, e.g. "
            "columns: {question: anchor, answer: positive}"
        )
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{cfg.path}: column {missing[0]!r} (mapped to {columns[missing[0]]!r}) is not in the "
                        f"data; its columns are {table.column_names}")
    if len(table) == 0:
        raise DataError(f"{cfg.path}: the dataset is empty")
    values = {source: list(table[source]) for source in columns}
    by_role: dict[str, list[list]] = {"anchor": [], "positive": [], "negative": []}
    for source, role in columns.items():
        by_role[role].append(values[source])
    line = _line_numbers(path, len(table)) if local and path.suffix in (".jsonl", ".csv", ".tsv") else None

    def where(i: int, source: str) -> str:
        return f"{cfg.path}:{line[i]} field {source!r}" if line else f"{cfg.path} row {i} field {source!r}"

    for source in columns:
        for i, text in enumerate(values[source]):
            if not isinstance(text, str):
                what = "missing (null)" if text is None else f"not a string ({type(text).__name__})"
                raise DataError(f"{where(i, source)}: text is {what}")
            if not text.strip():
                raise DataError(f"{where(i, source)}: text is empty")
    anchor, positive = by_role["anchor"][0], by_role["positive"][0]
    negatives = [list(row) for row in zip(*by_role["negative"])] if by_role["negative"] else [[] for _ in anchor]
    return PairDataset(cfg.name or path.stem if local else cfg.name or cfg.path, anchor, positive, negatives, cfg.weight)


def _load_table(cfg: DatasetConfig, path: Path):
    import datasets

    builder = _BUILDERS.get(path.suffix)
    if builder is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(_BUILDERS)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if builder == "json":
        _check_json_lines(path)
    kwargs = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets wraps parser errors in many types; name the file at least
        cause = e.__cause__ or e
        raise DataError(f"{path}: cannot be read as {builder}: {type(cause).__name__}: {cause}") from e


def _load_hub(cfg: DatasetConfig):
    import datasets

    try:
        return datasets.load_dataset(cfg.path, split=cfg.split)
    except Exception as e:
        raise DataError(f"{cfg.path}: not a local file and not loadable from the Hugging Face hub "
                        f"(split {cfg.split!r}): {e}") from e


def _check_json_lines(path: Path) -> None:
    """Name the first line that is not valid UTF-8 or not a JSON object."""
    for _ in iter_json_lines(path, DataError):
        pass


def _line_numbers(path: Path, rows: int) -> list[int]:
    """File line of each row (JSONL: non-blank lines; CSV: after the header)."""
    with open(path, "rb") as f:
        lines = [n for n, raw in enumerate(f, 1) if raw.strip()]
    if path.suffix != ".jsonl":
        lines = lines[1:]
    return lines[:rows] if len(lines) >= rows else list(range(1, rows + 1))
