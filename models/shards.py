"""Sharded embedding datasets: a folder of Parquet parts and one manifest, for corpora too big for one file or
one process; read part by part.

    DIR/part-000000.parquet     input rows [0, part_rows) as a twinfold Parquet embedding file (id, embedding,
                                content_hash; the fingerprint, settings and int8 calibration as its metadata)
    DIR/part-000000.json        its record: first row, rows, size and SHA-256 of the Parquet file, and the hash
                                of the input rows it was made from
    DIR/twinfold-manifest.json  "files": size and SHA-256 of each file; "embeddings": the model fingerprint,
                                the settings, the input's row count, the int8 calibration, the parts, and
                                "complete": true once every part is written

Part k holds input rows [k * part_rows, (k + 1) * part_rows): which rows go together depends on the input and
`part_rows` alone, so one process and N processes write the same parts. A part is written atomically, then its
record; it is complete when its record is there and its file has the recorded size and checksum.
`python -m twinfold.models.encode --format parquet --output DIR` writes it (see there).
"""
import contextlib
import hashlib
import json
import math
import re
import tempfile
import threading
from collections import deque
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from twinfold.models.embeddings import EmbeddingSet
from twinfold.models.files.atomic import LEFTOVERS, MANIFEST, OverwriteRefused, atomic_write_bytes, file_sha256
from twinfold.models.files.rows import Row
from twinfold.models.quantize import Int8Calibration

PART = re.compile(r"part-(\d{6})\.(parquet|json)")
SETTINGS = ("fingerprint", "precision", "dim", "kind", "compute", "prompt", "field", "id_field", "part_rows")
HASH_PASS_ROWS = 1 << 20  # id hashes sorted at once by `repeated_id`
MAX_HASH_BUCKETS = 256  # temporary files `repeated_id` spreads the hashes over (more rows each beyond 2^28 rows)
PROGRESS_POLL_SECONDS = 1.0  # how often the main process looks for parts written by the processes
OVERWRITE_REMEDY = "choose another --output, or pass --overwrite to encode into it from scratch"


def part_file(k: int) -> str:
    return f"part-{k:06d}.parquet"


def record_file(k: int) -> str:
    return f"part-{k:06d}.json"


def is_dataset_path(path: str | Path, format: str | None) -> bool:
    """True if `path` names a sharded dataset: a folder, or (with `format` parquet) a name without `.parquet`."""
    path = Path(path)
    return path.is_dir() or (format == "parquet" and path.suffix != ".parquet")


def input_digest(rows: list[Row]) -> str:
    """The hash of a part's input rows (ids and texts, in order): a resumed run refuses input that changed."""
    digest = hashlib.blake2b(digest_size=16)
    for row in rows:
        digest.update(row.id.encode() + b"\0" + row.text.encode() + b"\0")
    return digest.hexdigest()


def read_header(folder: str | Path) -> dict | None:
    """The manifest's "embeddings" entry (settings, rows, calibration, parts), or None if there is none."""
    try:
        header = json.loads((Path(folder) / MANIFEST).read_text())["embeddings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return header if isinstance(header, dict) else None


def write_header(folder: Path, header: dict, files: dict | None = None) -> None:
    atomic_write_bytes(folder / MANIFEST, (json.dumps({"files": files or {}, "embeddings": header}, indent=1)
                                           + "\n").encode())


def settings_difference(old: dict, new: dict) -> list[str]:
    """`KEY VALUE (now VALUE)` for each setting (and the input's row count) that differs."""
    return [f"{key} {old.get(key)!r} (now {new.get(key)!r})" for key in (*SETTINGS, "rows")
            if old.get(key) != new.get(key)]


def calibration_of(header: dict) -> Int8Calibration | None:
    found = header.get("calibration")
    if found is None:
        return None
    return Int8Calibration(np.asarray(found["starts"], np.float32), np.asarray(found["steps"], np.float32))


def check_dataset_output(folder: Path) -> None:
    """Raise `OverwriteRefused` unless `folder` is missing, empty or a sharded dataset (finished or not) holding
    nothing else."""
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir() or folder.is_symlink():
        raise OverwriteRefused(f"{folder} exists and is not a folder twinfold wrote; nothing was changed: "
                               f"{OVERWRITE_REMEDY}")
    names = [p.name for p in folder.iterdir()]
    own = [n for n in names if PART.fullmatch(n) or n == MANIFEST]
    foreign = sorted(n for n in names if n not in own and not n.startswith(LEFTOVERS))
    if (MANIFEST in names and read_header(folder) is None) or (own and MANIFEST not in names) or foreign:
        example = foreign[0] if foreign else MANIFEST
        raise OverwriteRefused(f"{folder} holds files that are not a twinfold embedding dataset (e.g. {example!r}); "
                               f"nothing was changed: {OVERWRITE_REMEDY}")


def clear_dataset(folder: Path) -> None:
    """Delete a dataset's parts, records and manifest from `folder` (other files stay)."""
    if folder.is_dir():
        for path in folder.iterdir():
            if PART.fullmatch(path.name) or path.name == MANIFEST:
                path.unlink()


def write_part(folder: Path, k: int, part: EmbeddingSet, first_row: int, digest: str) -> None:
    """Part `k` (atomically), then its record."""
    path = folder / part_file(k)
    part.save(path, overwrite=True, format="parquet")
    record = {"file": path.name, "first_row": first_row, "rows": len(part.ids), "size": path.stat().st_size,
              "sha256": file_sha256(path), "input_hash": digest}
    atomic_write_bytes(folder / record_file(k), (json.dumps(record) + "\n").encode())


def complete_record(folder: Path, k: int) -> dict | None:
    """Part `k`'s record if the part is complete (its file has the recorded size and checksum), else None."""
    try:
        record = json.loads((folder / record_file(k)).read_text())
        path = folder / part_file(k)
        if path.stat().st_size == record["size"] and file_sha256(path) == record["sha256"]:
            return record
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _id_hashes(ids: list[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids],
                    dtype=np.uint64)


def repeated_id(folder: Path, parts: int, part_rows: int) -> tuple[str, int, int] | None:
    """An id that two parts of the dataset share, with the input rows of its first two copies (None: every id is
    unique). Each id's 64-bit hash and row go, in one pass over the parts, to one of a few unnamed temporary files
    in `folder` chosen by hash (at most about `HASH_PASS_ROWS` rows each, `MAX_HASH_BUCKETS` files); each file is
    then sorted on its own, so memory does not grow with the corpus (never the ids of more than two parts)."""
    def ids(k: int) -> list[str]:
        return pq.read_table(folder / part_file(k), columns=["id"]).column("id").to_pylist()

    count = min(MAX_HASH_BUCKETS, -(-parts * part_rows // HASH_PASS_ROWS))  # none for an empty dataset
    with contextlib.ExitStack() as stack:
        buckets = [stack.enter_context(tempfile.TemporaryFile(dir=folder)) for _ in range(count)]
        for k in range(parts):
            hashes = _id_hashes(ids(k))
            pairs = np.stack([hashes, np.arange(k * part_rows, k * part_rows + len(hashes), dtype=np.uint64)], 1)
            which = hashes % np.uint64(max(count, 1))
            order = np.argsort(which, kind="stable")
            bounds = np.searchsorted(which[order], np.arange(count + 1))
            for b in np.flatnonzero(np.diff(bounds)):
                pairs[order[bounds[b]:bounds[b + 1]]].tofile(buckets[b])
        for bucket in buckets:
            bucket.seek(0)
            pairs = np.fromfile(bucket, np.uint64).reshape(-1, 2)
            pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]  # by hash, then row
            for i in np.flatnonzero(pairs[1:, 0] == pairs[:-1, 0]):
                a, b = int(pairs[i, 1]), int(pairs[i + 1, 1])
                first, second = ids(a // part_rows)[a % part_rows], ids(b // part_rows)[b % part_rows]
                if first == second:  # not a hash collision
                    return first, a, b
    return None


def finish(folder: Path, header: dict, parts: int) -> None:
    """Write the manifest of a dataset whose `parts` parts are all complete; remove parts beyond them."""
    records = [json.loads((folder / record_file(k)).read_text()) for k in range(parts)]
    files = {}
    for k, record in enumerate(records):
        files[part_file(k)] = {"size": record["size"], "sha256": record["sha256"]}
        files[record_file(k)] = {"size": (folder / record_file(k)).stat().st_size,
                                 "sha256": file_sha256(folder / record_file(k))}
    header = {**header, "complete": True,
              "parts": [{"file": r["file"], "first_row": r["first_row"], "rows": r["rows"]} for r in records]}
    write_header(folder, header, files)
    for path in folder.iterdir():
        if (match := PART.fullmatch(path.name)) and int(match[1]) >= parts:
            path.unlink()


class PartsProgress:
    """Progress of every process, shown on the main one: a bar per process (documents, documents/s, time left).

    Process r writes its parts r, r + N, ... in order; the main process, in a thread while the block runs, looks
    each second whether the next part of each process that had no record at the start has one now (so a look costs
    a file status per process, whatever the corpus). Parts that had a record at the start count at the end, if
    written again (a damaged or changed part): their rows are added to the bar's total then."""

    def __init__(self, folder: Path, header: dict, processes: int, enabled: bool = True, file=None):
        self.folder, self.enabled = folder, enabled
        size, rows = header["part_rows"], header["rows"]
        self.rows = [min(size, rows - k * size) for k in range(math.ceil(rows / size))]
        self.found = [self._written(k) for k in range(len(self.rows))]
        self.next = [deque(k for k in range(r, len(self.rows), processes) if self.found[k] is None)
                     for r in range(processes)]
        self.bars = [tqdm(total=sum(self.rows[k] for k in parts), unit="doc", smoothing=0.1, position=r, file=file,
                          disable=not enabled, desc=f"encode (process {r + 1} of {processes})" if processes > 1
                          else "encode") for r, parts in enumerate(self.next)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def poll(self) -> None:
        """Count the parts each process has written since the last look."""
        for bar, parts in zip(self.bars, self.next):
            while parts and self._written(parts[0]) is not None:
                bar.update(self.rows[parts.popleft()])

    def __enter__(self) -> "PartsProgress":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self._stop.set()
        self._thread.join()
        self.poll()
        for k, found in enumerate(self.found):
            if found is not None and self._written(k) != found:
                bar = self.bars[k % len(self.bars)]
                bar.total += self.rows[k]
                bar.update(self.rows[k])
        for bar in self.bars:
            bar.close()

    def _watch(self) -> None:
        while not self._stop.wait(PROGRESS_POLL_SECONDS):
            self.poll()

    def _written(self, k: int) -> int | None:
        """The modification time of part k's record, None if it has none."""
        try:
            return (self.folder / record_file(k)).stat().st_mtime_ns
        except OSError:
            return None


class ShardedEmbeddings:
    """A finished sharded dataset: its settings (`fingerprint`, `precision`, `dim`, `similarity`, `calibration`,
    `kind`, `compute`, `prompt`), `ids` (read from the parts' id columns) and its parts one at a time."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder)
        header = read_header(self.path)
        if header is None:
            raise ValueError(f"{self.path}: not a twinfold embedding dataset (no manifest with embeddings in it)")
        if not header.get("complete"):
            raise ValueError(f"{self.path}: an unfinished embedding dataset (a run stopped before writing every "
                             "part); run the command that writes it again to finish it")
        self.header = header
        self.fingerprint, self.precision, self.dim = header["fingerprint"], header["precision"], header["dim"]
        self.similarity, self.kind, self.compute = header["similarity"], header["kind"], header["compute"]
        self.prompt, self.calibration = header["prompt"], calibration_of(header)

    def __len__(self) -> int:
        return self.header["rows"]

    @cached_property
    def ids(self) -> list[str]:
        return [i for p in self.header["parts"] for i in pq.read_table(self.path / p["file"], columns=["id"])
                .column("id").to_pylist()]

    def parts(self) -> Iterator[EmbeddingSet]:
        """Each part as an embedding set, in row order (one in memory at a time)."""
        for part in self.header["parts"]:
            yield EmbeddingSet.load(self.path / part["file"])


def load_embeddings(path: str | Path) -> EmbeddingSet | ShardedEmbeddings:
    """An embedding file read whole, or a sharded dataset opened for reading part by part."""
    return ShardedEmbeddings(path) if Path(path).is_dir() else EmbeddingSet.load(path)


def embedding_parts(embeddings: EmbeddingSet | ShardedEmbeddings) -> Iterator[EmbeddingSet]:
    """The parts of a dataset one by one, or a file's embeddings as one part."""
    return embeddings.parts() if isinstance(embeddings, ShardedEmbeddings) else iter([embeddings])
