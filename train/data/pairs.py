"""Training pairs: load with Hugging Face `datasets` (Arrow, memory-mapped), map source columns to named roles,
validate every text, and tokenize once into an on-disk cache shared by later runs and every process of a run.
"""
import csv
import hashlib
import json
import logging
import os
import re
import shutil
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa

from twinfold.losses import text_keys
from twinfold.models.files.atomic import file_sha256, remove_tree, verify_manifest, write_manifest
from twinfold.models.files.jsonl import iter_json_lines
from twinfold.models.tokens import TextTokenizer
from twinfold.train.config import DatasetConfig

log = logging.getLogger("twinfold")
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
KIND = {"anchor": "query", "positive": "document", "negative": "document"}
_VALIDATE_ROWS = 10_000  # rows per pass of the validation and of each tokenization batch
_CACHE_FORMAT = 1
NEGATIVE_COLUMN = re.compile(r"negative(_(\d+))?")  # a pair file's negative text columns: negative, negative_1, ...
SCORES = "scores"  # the column of each row's teacher scores: [positive, negative_0, ..., negative_{k-1}]


class DataError(ValueError):
    """Training data that cannot be used, naming the file, line and field."""


@dataclass
class PairDataset:
    """A validated Arrow table whose columns are roles: `anchor`, `positive`, then `negative_0` ... `negative_{k-1}`,
    and, when a distillation loss reads them, `scores` (the teacher's score of the positive, then of each negative)."""

    name: str
    table: object  # datasets.Dataset
    weight: float = 1.0
    fingerprint: str = ""  # content of the source (local file) or the hub dataset's fingerprint

    def __len__(self) -> int:
        return len(self.table)

    @property
    def roles(self) -> list[str]:
        return [c for c in self.table.column_names if c != SCORES]

    @property
    def has_scores(self) -> bool:
        return SCORES in self.table.column_names

    def select(self, rows: list[int]) -> "PairDataset":
        """These rows only (their own cache key)."""
        key = hashlib.sha256(f"{self.fingerprint}|{rows}".encode()).hexdigest()[:16]
        return PairDataset(self.name, self.table.select(rows), self.weight, key)

    def texts(self, column: str) -> list[str]:
        """A role column's texts (read from Arrow in one go, not row by row)."""
        return self.table.with_format("arrow")[column].to_pylist()

    @property
    def num_negatives(self) -> int:
        """Hard negatives per row."""
        return len(self.roles) - 2

    @property
    def anchor(self) -> list[str]:
        return self.texts("anchor")

    @property
    def positive(self) -> list[str]:
        return self.texts("positive")

    @property
    def negatives(self) -> list[list[str]]:
        """Row i's hard negatives."""
        columns = [self.texts(f"negative_{j}") for j in range(self.num_negatives)]
        return [list(row) for row in zip(*columns)] if columns else [[] for _ in range(len(self))]


def load_pairs(cfg: DatasetConfig, scores_for: str | None = None) -> PairDataset:
    """Load one dataset of the config, keep its mapped columns under role names and check every text; with
    `scores_for` (the loss kind that needs them) also the teacher score of each positive and negative, checked."""
    path = Path(cfg.path)
    local = path.is_file()  # else a hub id or a dataset folder: datasets fingerprints it
    table = load_source(cfg)
    if len(table) == 0:
        raise DataError(f"{cfg.path}: the dataset is empty")
    renamed = role_columns(cfg, table.column_names)
    scored = score_columns(cfg, table.column_names, renamed, scores_for) if scores_for else {}
    _validate(table.select_columns(list(renamed)), cfg.path, path if local else None)
    scores = _read_scores(table, scored, cfg.path, path if local else None)
    table = table.select_columns(list(renamed)).rename_columns(renamed)
    table = table.select_columns(role_names(len(renamed) - 2))
    if scores is not None:
        table = table.add_column(SCORES, scores.tolist())
    source = file_sha256(path)[:16] if local else table._fingerprint
    # what was read, not only where from: the token cache and the checks' results are keyed by it
    fingerprint = hashlib.sha256(json.dumps([source, renamed, *([scored] if scored else [])]).encode()).hexdigest()[:16]
    log.info("%s: %d rows read and validated", dataset_name(cfg), len(table))
    return PairDataset(dataset_name(cfg), table, cfg.weight, fingerprint)


def teacher_score_names(column_names) -> dict[str, str]:
    """Text column -> the column of its teacher score, as `twinfold score` names them: `positive` -> `score_positive`,
    the negative columns in the order `negative`, `negative_1`, `negative_2`, ... -> `score_negative_1..k`."""
    negatives = sorted((m for m in map(NEGATIVE_COLUMN.fullmatch, column_names) if m),
                       key=lambda m: int(m.group(2) or 0))
    texts = ["positive", *(m.group(0) for m in negatives)]
    return {text: "score_positive" if j == 0 else f"score_negative_{j}" for j, text in enumerate(texts)}


def score_columns(cfg: DatasetConfig, column_names: list[str], renamed: dict[str, str], kind: str) -> dict[str, str]:
    """Role (`positive`, `negative_0` ...) -> the column of its teacher score; `DataError` naming the file and the
    missing column when the data has no negatives or lacks a score."""
    if len(renamed) == 2:
        raise DataError(f"{cfg.path}: no hard negatives; loss.kind {kind} distils over each row's positive and "
                        "negatives (mine them with twinfold mine, score them with twinfold score)")
    names = teacher_score_names(column_names)
    out = {}
    for source, role in renamed.items():
        if role == "anchor":
            continue
        if source not in names:
            raise DataError(f"{cfg.path}: column {source!r} ({role}) has no teacher score: loss.kind {kind} reads "
                            "score_positive and score_negative_1..k, the scores of the columns positive and negative, "
                            "negative_1 ... as twinfold score writes them")
        if names[source] not in column_names:
            raise DataError(f"{cfg.path}: no column {names[source]!r} (the teacher's score of {source!r}) for "
                            f"loss.kind {kind}; add the scores with twinfold score --teacher MODEL --data {cfg.path} "
                            "--out SCORED.jsonl")
        out[role] = names[source]
    return out


def _read_scores(table, scored: dict[str, str], shown: str, path: Path | None) -> np.ndarray | None:
    """The score columns as [rows, 1 + k] float64 (None without any); `DataError` naming the file line and field of
    the first value that is not a finite number."""
    if not scored:
        return None
    columns = []
    for field in scored.values():
        column = table.data.column(field)
        number = pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
        values = column.to_numpy() if number else None
        if values is None or column.null_count or not np.isfinite(values).all():
            values = column.to_pylist()
            row = next(i for i, v in enumerate(values) if isinstance(v, bool) or not isinstance(v, (int, float))
                       or not np.isfinite(v))
            raise DataError(f"{_where(shown, path, row)} field {field!r}: {values[row]!r} is not a finite number "
                            "(a teacher score)")
        columns.append(values.astype(np.float64))
    return np.stack(columns, axis=1)


def dataset_name(cfg: DatasetConfig) -> str:
    """`name`, else the file's stem, else the hub id."""
    return cfg.name or (Path(cfg.path).stem if Path(cfg.path).exists() else cfg.path)


def role_columns(cfg: DatasetConfig, column_names: list[str]) -> dict[str, str]:
    """Source column -> role column (`anchor`, `positive`, `negative_0` ...), checked against the data's columns;
    `anchor` and `positive` each take one column (several may be `negative`)."""
    columns = cfg.columns or {c: c for c in column_names if c in ("anchor", "positive", "negative")}
    for role in ("anchor", "positive"):
        if len(sources := [source for source, r in columns.items() if r == role]) > 1:
            raise DataError(f"{cfg.path}: columns {' and '.join(map(repr, sources))} are all mapped to {role!r}; "
                            f"map one column to {role!r} (only 'negative' takes several)")
    if not cfg.columns and not {"anchor", "positive"} <= set(columns):
        raise DataError(
            f"{cfg.path}: columns {column_names}: map them to roles in the config, e.g. "
            "columns: {question: anchor, answer: positive}"
        )
    missing = [c for c in columns if c not in column_names]
    if missing:
        raise DataError(f"{cfg.path}: column {missing[0]!r} (mapped to {columns[missing[0]]!r}) is not in the "
                        f"data; its columns are {column_names}")
    negatives = [source for source, role in columns.items() if role == "negative"]
    sources = {role: source for source, role in columns.items() if role != "negative"}
    return {sources["anchor"]: "anchor", sources["positive"]: "positive",
            **{source: f"negative_{j}" for j, source in enumerate(negatives)}}


def role_names(num_negatives: int) -> list[str]:
    """The role columns in order: `anchor`, `positive`, `negative_0` ... `negative_{k-1}`."""
    return ["anchor", "positive", *(f"negative_{j}" for j in range(num_negatives))]


def _validate(table, shown: str, path: Path | None) -> None:
    """Every mapped field must be a non-empty string; the error names the file line (or row) and field."""
    for start in range(0, len(table), _VALIDATE_ROWS):
        chunk = table[start:start + _VALIDATE_ROWS]
        for source, values in chunk.items():
            for j, text in enumerate(values):
                if problem := text_problem(text):
                    raise DataError(f"{_where(shown, path, start + j)} field {source!r}: text is {problem}")


def text_problem(text) -> str | None:
    """What is wrong with a field meant to hold a text (None: a string with a visible character; whitespace and
    invisible format characters such as U+200B ZERO WIDTH SPACE alone are empty)."""
    if text is None:
        return "missing (null)"
    if not isinstance(text, str):
        return f"not a string ({type(text).__name__})"
    stripped = text.strip()
    if stripped and unicodedata.category(stripped[0]) != "Cf":  # the common case, without a scan
        return None
    return None if any(not c.isspace() and unicodedata.category(c) != "Cf" for c in stripped) else "empty"


def row_place(cfg: DatasetConfig, row: int, rank: int = 0, world: int = 1, shards: int = 1) -> str:
    """Where row `row` of a process's part of a streamed dataset is (see `_where`): with one shard (a local
    file), process `rank` of `world` reads every world-th row from its rank on."""
    if world > 1 and shards % world == 0:  # whole shards per process: the row's place in its file is not known
        return f"{cfg.path} row {row} of process {rank}'s shards"
    path = Path(cfg.path)
    return _where(cfg.path, path if path.exists() else None, row * world + rank)


def _where(shown: str, path: Path | None, row: int) -> str:
    """`file:line` of a row of a JSONL/CSV/TSV file (counted only when an error needs it; `file:first-last` for a
    CSV record over several lines), else `source row i`."""
    if path is None or path.suffix not in (".jsonl", ".csv", ".tsv"):
        return f"{shown} row {row}"
    if path.suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.reader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            seen, end = -1, 0  # the header is record -1
            for record in reader:
                start, end = end + 1, reader.line_num
                if any(record):  # blank lines hold no record
                    if seen == row:
                        return f"{shown}:{start}" if start == end else f"{shown}:{start}-{end}"
                    seen += 1
        return f"{shown} row {row}"
    with open(path, "rb") as f:
        seen = 0
        for n, raw in enumerate(f, 1):
            if raw.strip():
                if seen == row:
                    return f"{shown}:{n}"
                seen += 1
    return f"{shown}:{row + 1}"


def load_source(cfg: DatasetConfig, streaming: bool = False):
    """A dataset's rows as datasets reads them (`streaming`: an IterableDataset read as it is iterated)."""
    path = Path(cfg.path)
    return _load_table(cfg, path, streaming) if path.is_file() else _load_repo(cfg, streaming)


def _load_table(cfg: DatasetConfig, path: Path, streaming: bool = False):
    """A local file as a datasets table; `streaming`: an IterableDataset read as it is iterated (its lines are
    checked as they come, so the whole-file JSON check is left out)."""
    import datasets

    builder = _BUILDERS.get(path.suffix)
    if builder is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(_BUILDERS)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if builder == "json" and not streaming:
        _check_json_lines(path)
    kwargs = {}
    if builder == "csv":  # every cell is text as written: `NA`, `None`, `null` stay strings, an empty cell is ""
        kwargs = {"keep_default_na": False, "na_filter": False}
        if path.suffix == ".tsv":
            kwargs["delimiter"] = "\t"
        if not streaming:
            _check_csv(path)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming, **kwargs)
    except Exception as e:  # datasets wraps parser errors in many types; name the file at least
        raise read_error(path, e) from e


def read_error(path: Path, e: Exception) -> DataError:
    """A parser's error as a DataError naming the file (and, for JSON lines, the first bad line)."""
    builder = _BUILDERS[path.suffix]
    if builder == "json":
        _check_json_lines(path)  # raises at the first line that is not UTF-8, not JSON or not an object
        _check_json_types(path)  # ... or whose field's type differs from an earlier line's
    else:
        _check_csv_quotes(path)  # raises at the line where a quote opens a field that never closes
    cause = e.__cause__ or e
    return DataError(f"{path}: cannot be read as {builder}: {type(cause).__name__}: {cause}")


def _load_repo(cfg: DatasetConfig, streaming: bool = False):
    """A hub dataset id, or a local folder laid out as a hub dataset repository (e.g. a clone of one): `datasets`
    reads both the same way (streamed: shard by shard)."""
    import datasets

    try:
        return datasets.load_dataset(cfg.path, split=cfg.split, streaming=streaming)
    except Exception as e:
        where = "a dataset folder that datasets cannot read" if Path(cfg.path).is_dir() else \
            "not a local file and not loadable from the Hugging Face hub"
        raise DataError(f"{cfg.path}: {where} (split {cfg.split!r}): {e}") from e


def _check_csv(path: Path) -> None:
    """Name a header given twice, and the line where a quote opens a TSV field that runs over a line break.

    TSV fields cannot hold line breaks, so such a field is a stray quote that would merge the following lines into
    one text (CSV fields may hold quoted line breaks; a CSV quote that never closes is the parser's error).
    """
    tsv = path.suffix == ".tsv"
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter="\t" if tsv else ",")
        start = 1
        for fields in reader:
            if start == 1 and (repeated := [name for name, k in Counter(fields).items() if k > 1]):
                raise DataError(f"{path}:1: the header names column {repeated[0]!r} more than once; give each "
                                "column its own name")
            if tsv and reader.line_num > start:
                raise DataError(f"{path}:{start}: a quote (\") opens a field that runs on to line {reader.line_num}; "
                                f"a TSV field holds no line break: close the quote on line {start} or remove it")
            start = reader.line_num + 1


def _check_csv_quotes(path: Path) -> None:
    """Name the line where a quote opens a field that never closes (the parser names a 0-based row of its own).
    Only the end of the file inside a quote is named here; other parser errors keep the parser's message."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter="\t" if path.suffix == ".tsv" else ",", strict=True)
        start = 1
        try:
            for _ in reader:
                start = reader.line_num + 1
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise DataError(f"{path}:{start}: a quote (\") opens a field that never closes (the file ends inside "
                                f"it, on line {reader.line_num}): close the quote on line {start} or remove it"
                                ) from None


def _check_json_lines(path: Path) -> None:
    """Name the first line that is not valid UTF-8 or not a JSON object."""
    for _ in iter_json_lines(path, DataError):
        pass


def _check_json_types(path: Path) -> None:
    """Name the first line holding NaN or Infinity (not JSON to Arrow), or a field whose type differs from the
    one an earlier line gave it (a column holds one type); null goes with any type."""
    first: dict[str, tuple[str, int]] = {}
    for n, row in iter_json_lines(path, DataError):
        for field, value in row.items():
            if isinstance(value, float) and not np.isfinite(value):
                raise DataError(f"{path}:{n} field {field!r}: {value} is not a JSON number")
            if value is None:
                continue
            kind = {bool: "boolean", int: "number", float: "number", str: "string", list: "list"}.get(
                type(value), "JSON object")
            seen, line = first.setdefault(field, (kind, n))
            if seen != kind:
                raise DataError(f"{path}:{n} field {field!r}: a {kind} where line {line} has a {seen}; a field "
                                "holds one type in every line")


# --- tokenized once ---------------------------------------------------------------------------------------
@dataclass
class TokenizedPairs:
    """A dataset's token ids per role (truncated at `max_length`, unpadded) and text keys, memory-mapped.

    Columns `{role}_ids` and `{role}_key` for role in `anchor`, `positive`, `negative_0` ...; the keys are
    `losses.text_keys` of the texts (false-negative masking and no-duplicate batches); `scores` where the dataset
    was read with teacher scores.
    """

    name: str
    table: object  # datasets.Dataset
    weight: float
    num_negatives: int
    truncated: dict[str, int]
    has_scores: bool = False

    def __len__(self) -> int:
        return len(self.table)

    def keys(self, role: str) -> np.ndarray:
        """Text keys of a role (`anchor`, `positive`: [N]; `negative`: [N, k])."""
        if role == "negative":
            return np.stack([self._column(f"negative_{j}_key") for j in range(self.num_negatives)], axis=1) \
                if self.num_negatives else np.zeros((len(self), 0), dtype=np.int64)
        return self._column(f"{role}_key")

    def _column(self, name: str) -> np.ndarray:
        return self.table.data.column(name).to_numpy()

    def rows(self, indices: list[int]) -> dict[str, tuple[list[list[int]], list[int]]]:
        """Token ids and keys of these rows by role (`step_roles`)."""
        picked = self.table[indices]
        return step_roles({role: (picked[f"{role}_ids"], picked[f"{role}_key"])
                           for role in role_names(self.num_negatives)})

    def scores(self, indices: list[int]) -> list[list[float]] | None:
        """The teacher scores of these rows (positive, then each negative), if the dataset was read with them."""
        return self.table[indices][SCORES] if self.has_scores else None


def step_roles(columns: dict[str, tuple[list[list[int]], list[int]]]) -> dict[str, tuple[list[list[int]], list[int]]]:
    """Token ids and keys of some rows per role column -> per role of a step: `anchor`, `positive`, and `negative`
    holding row i's k negatives one after another."""
    negatives = [c for c in columns if c.startswith("negative_")]
    out = {role: columns[role] for role in ("anchor", "positive")}
    if negatives:
        rows = range(len(columns["anchor"][1]))
        out["negative"] = ([columns[c][0][i] for i in rows for c in negatives],
                           [columns[c][1][i] for i in rows for c in negatives])
    return out


def cache_root(configured: str | None) -> Path:
    """Where tokenized datasets are kept: `data.cache_dir`, else $TWINFOLD_CACHE, else ~/.cache/twinfold."""
    return Path(configured or os.environ.get("TWINFOLD_CACHE") or Path.home() / ".cache" / "twinfold").expanduser()


def tokenize_pairs(ds: PairDataset, tokenizer: TextTokenizer, cache_dir: Path) -> TokenizedPairs:
    """Token ids of every text, computed once (in parallel processes for large data) and cached on disk.

    The cache key is the data's content, the tokenizer (vocabulary, rules, prefixes, `max_length`) and the
    columns; another run, or another process of this run, with the same key reads the cache instead. The size
    and SHA-256 of each cache file are kept with it (`models.atomic.write_manifest`) and checked before it is
    reused: a damaged cache is rebuilt, with a warning.
    """
    import datasets

    key = hashlib.sha256(json.dumps([_CACHE_FORMAT, ds.fingerprint, tokenizer.fingerprint(), ds.roles]).encode())
    folder = cache_dir / "tokens" / key.hexdigest()[:24]
    manifest = folder / "manifest.json"
    if folder.exists() and (problem := verify_manifest(folder)):
        log.warning("%s: token cache %s is damaged (%s); it is rebuilt", ds.name, folder, problem)
        _discard(folder)
    if not manifest.exists():
        tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        workers = max(1, min(len(os.sched_getaffinity(0)), len(ds) // 50_000))
        features = datasets.Features({f"{role}_{field}": kind for role in ds.roles for field, kind in (
            ("ids", datasets.Sequence(datasets.Value("int32"))), ("key", datasets.Value("int64")),
            ("truncated", datasets.Value("bool")))})
        if ds.has_scores:
            features[SCORES] = datasets.Sequence(datasets.Value("float64"))
        try:
            mapped = ds.table.map(partial(_tokenize_batch, tokenizer=tokenizer), batched=True, features=features,
                                  batch_size=_VALIDATE_ROWS, num_proc=workers if workers > 1 else None,
                                  remove_columns=ds.roles, cache_file_name=str(tmp / "tokens.arrow"),
                                  desc=f"tokenize {ds.name} ({len(ds)} rows)")
        except BaseException:  # Ctrl-C or an error mid-way: no half-written cache is left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        truncated = {role: int(np.count_nonzero(mapped.data.column(f"{role}_truncated").to_numpy()))
                     for role in ds.roles}
        files = [Path(f["filename"]).name for f in mapped.cache_files]
        (tmp / "manifest.json").write_text(json.dumps({"files": files, "rows": len(ds), "truncated": truncated}))
        del mapped
        write_manifest(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("%s: %d rows tokenized and cached in %s", ds.name, len(ds), folder)
    else:
        log.info("%s: token cache reused from %s", ds.name, folder)
    saved = json.loads(manifest.read_text())
    table = datasets.concatenate_datasets([datasets.Dataset.from_file(str(folder / f)) for f in saved["files"]])
    return TokenizedPairs(ds.name, table, ds.weight, ds.num_negatives, saved["truncated"], ds.has_scores)


def _discard(folder: Path) -> None:
    """Move a damaged cache folder aside (one rename: a process reading it keeps its files) and delete it."""
    aside = folder.with_name(f".old-{folder.name}-{os.getpid()}")
    try:
        folder.rename(aside)
    except OSError:  # another process moved it first
        return
    remove_tree(aside, aside.parent)


def _tokenize_batch(batch: dict[str, list[str]], tokenizer: TextTokenizer) -> dict[str, list]:
    """Ids, text keys and whether each text was truncated, for every role of a batch of rows."""
    out = {}
    for role, texts in batch.items():
        if role == SCORES:  # kept as they are
            continue
        ids, truncated = tokenizer.ids_and_truncated(texts, KIND[role.split("_")[0]])
        out[f"{role}_ids"] = ids
        out[f"{role}_key"] = text_keys(texts).tolist()
        out[f"{role}_truncated"] = truncated
    return out
