"""Embedding files that carry the fingerprint of the model that made them: safetensors (the default) or Parquet.

A Parquet file holds one row per embedding: `id` (string), `embedding` (a fixed-size list of float32, int8, or
uint8 packed sign bits) and `content_hash` (string); the fingerprint and settings are its schema metadata, under
the same keys as the safetensors metadata (`int8_starts` / `int8_steps`: JSON lists of the calibration).
"""
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save

from twinfold.models.files.atomic import OverwriteRefused, atomic_write_bytes
from twinfold.models.quantize import Int8Calibration

FORMATS = ("safetensors", "parquet")
PARQUET_MAGIC = b"PAR1"


class FingerprintMismatch(ValueError):
    """Embeddings from two different models (or settings) were about to be compared."""


def content_hash(text: str) -> str:
    """The hash stored per embedded text, so that an update re-embeds only texts that changed."""
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass
class EmbeddingSet:
    """Embeddings with their ids, the producing model's fingerprint and their precision.

    `dim`: the vectors' dimension (default: the width of float32 and int8 rows; binary rows pack `dim` sign
    bits, so it must be given). `hashes` (content hashes of the embedded texts, in `ids` order), `kind`, `compute`
    and `prompt` let `python -m twinfold.models.encode --update` keep the rows whose text is unchanged.
    """

    embeddings: np.ndarray
    ids: list[str]
    fingerprint: str
    precision: str = "float32"
    dim: int | None = None
    calibration: Int8Calibration | None = None
    similarity: str = "dot"  # the model's (EncoderSettings.similarity); files without it were scored by dot
    hashes: list[str] | None = None
    kind: str | None = None
    compute: str = "float32"
    prompt: str | None = None  # the prompt text used instead of the kind's prefix (`BiEncoder.encode(prompt=...)`)

    def __post_init__(self):
        if self.dim is None:
            if self.precision == "binary":
                raise ValueError("binary embeddings need `dim`, the number of sign bits packed in each row")
            self.dim = self.embeddings.shape[1]

    def __len__(self) -> int:
        return len(self.ids)

    def save(self, path: str | Path, overwrite: bool = False, format: str = "safetensors") -> None:
        """Write atomically as `format`; an existing file is replaced only if it is a twinfold embedding file
        (or `overwrite`)."""
        if format not in FORMATS:
            raise ValueError(f"unknown embedding file format {format!r}: choose from {', '.join(FORMATS)}")
        check_embedding_output(path, overwrite)
        meta = {"fingerprint": self.fingerprint, "precision": self.precision,
                "dim": str(self.dim), "similarity": self.similarity, "compute": self.compute}
        if self.kind is not None:
            meta["kind"] = self.kind
        if self.prompt is not None:
            meta["prompt"] = self.prompt
        if format == "parquet":
            atomic_write_bytes(path, self._parquet_bytes(meta))
            return
        tensors = {"embeddings": np.ascontiguousarray(self.embeddings)}
        if self.calibration is not None:
            tensors["int8_starts"] = self.calibration.starts
            tensors["int8_steps"] = self.calibration.steps
        meta["ids"] = json.dumps(self.ids)
        if self.hashes is not None:
            meta["hashes"] = json.dumps(self.hashes)
        atomic_write_bytes(path, save(tensors, metadata=meta))

    def _parquet_bytes(self, meta: dict[str, str]) -> bytes:
        if self.calibration is not None:
            meta = meta | {"int8_starts": json.dumps(self.calibration.starts.tolist()),
                           "int8_steps": json.dumps(self.calibration.steps.tolist())}
        vectors = pa.array(self.embeddings.reshape(-1))
        columns = {"id": pa.array(self.ids, pa.string()),
                   "embedding": pa.FixedSizeListArray.from_arrays(vectors, self.embeddings.shape[1])}
        if self.hashes is not None:
            columns["content_hash"] = pa.array(self.hashes, pa.string())
        buffer = io.BytesIO()
        pq.write_table(pa.table(columns).replace_schema_metadata(meta), buffer)
        return buffer.getvalue()

    @classmethod
    def load(cls, path: str | Path) -> "EmbeddingSet":
        """Read a safetensors or Parquet embedding file (told apart by their first bytes)."""
        if file_format(path) == "parquet":
            table = pq.read_table(path)
            meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
            _check_fingerprint(path, meta)
            _require(path, [*meta, *table.column_names], ["precision", "dim", "id", "embedding"])
            column = table.column("embedding").combine_chunks()
            embeddings = column.values.to_numpy().reshape(len(table), column.type.list_size)
            ids = table.column("id").to_pylist()
            hashes = table.column("content_hash").to_pylist() if "content_hash" in table.column_names else None
            starts, steps = (np.asarray(json.loads(meta[key]), np.float32) if key in meta else None
                             for key in ("int8_starts", "int8_steps"))
        else:
            try:
                with safe_open(str(path), "np") as f:
                    meta = f.metadata() or {}
            except SafetensorError as e:
                raise ValueError(f"{path}: not a twinfold embedding file (neither Parquet nor safetensors: "
                                 f"{e})") from None
            _check_fingerprint(path, meta)
            tensors = load_file(str(path))
            _require(path, [*meta, *tensors], ["precision", "dim", "ids", "embeddings"])
            embeddings, ids = tensors["embeddings"], json.loads(meta["ids"])
            hashes = json.loads(meta["hashes"]) if "hashes" in meta else None
            starts, steps = tensors.get("int8_starts"), tensors.get("int8_steps")
        try:
            calibration = Int8Calibration(starts, steps) if starts is not None else None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return cls(embeddings, ids, meta["fingerprint"], meta["precision"], int(meta["dim"]), calibration,
                   meta.get("similarity", "dot"), hashes, meta.get("kind"), meta.get("compute", "float32"),
                   meta.get("prompt"))


def file_format(path: str | Path) -> str:
    """"parquet" for a file that starts with Parquet's magic bytes, else "safetensors"."""
    with open(path, "rb") as f:
        return "parquet" if f.read(4) == PARQUET_MAGIC else "safetensors"


def _require(path: str | Path, present: list[str], needed: list[str]) -> None:
    if missing := [key for key in needed if key not in present]:
        raise ValueError(f"{path}: an incomplete twinfold embedding file (no {', '.join(map(repr, missing))} in it); "
                         "write it again with `twinfold encode`")


def _check_fingerprint(path: str | Path, meta: dict) -> None:
    if "fingerprint" not in meta:
        raise ValueError(f"{path}: not a twinfold embedding file (no fingerprint in its metadata)")


def check_embedding_output(path: str | Path, overwrite: bool = False) -> None:
    """Raise `OverwriteRefused` if `path` exists and is not a twinfold embedding file (unless `overwrite`)."""
    if not overwrite and Path(path).exists() and not is_embedding_file(path):
        raise OverwriteRefused(f"{path} exists and is not a twinfold embedding file; nothing was changed. "
                               "Choose another path or pass --overwrite / overwrite=True to replace it")


def is_embedding_file(path: str | Path) -> bool:
    """True if `path` is a safetensors or Parquet file with a twinfold fingerprint in its metadata."""
    try:
        if file_format(path) == "parquet":
            return b"fingerprint" in (pq.read_schema(path).metadata or {})
        with safe_open(str(path), "np") as f:
            return "fingerprint" in (f.metadata() or {})
    except Exception:  # each format's reader raises its own error types for anything that is not that format
        return False


def check_same_model(a: str, b: str, what: str = "embeddings") -> None:
    """Raise FingerprintMismatch unless fingerprints `a` and `b` are equal."""
    if a != b:
        raise FingerprintMismatch(
            f"{what} come from different models: fingerprint {a} vs {b}. Re-encode both sides with the same "
            "model (an index must be searched with the model that built it)."
        )


def similarity(queries: EmbeddingSet, documents: EmbeddingSet) -> np.ndarray:
    """Scores [n_queries, n_documents] of two float32 sets from the same model, by the model's similarity
    (cosine, or dot: the inner product of the vectors as stored)."""
    check_same_model(queries.fingerprint, documents.fingerprint)
    for s in (queries, documents):
        if s.precision != "float32":
            raise ValueError(f"similarity needs float32 embeddings, got {s.precision}")
    q, d = queries.embeddings, documents.embeddings
    if queries.similarity == "cosine":
        q, d = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) for x in (q, d))
    return q @ d.T
