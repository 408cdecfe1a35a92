"""Embedding files (safetensors) that carry the fingerprint of the model that made them."""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save

from twinfold.models.atomic import OverwriteRefused, atomic_write_bytes
from twinfold.models.quantize import Int8Calibration


class FingerprintMismatch(ValueError):
    """Embeddings from two different models (or settings) were about to be compared."""


def content_hash(text: str) -> str:
    """The hash stored per embedded text, so that an update re-embeds only texts that changed."""
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass
class EmbeddingSet:
    """Embeddings with their ids, the producing model's fingerprint and their precision.

    `hashes` (content hashes of the embedded texts, in `ids` order), `kind` and `compute` let
    `python -m twinfold.models.encode --update` keep the rows whose text is unchanged.
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

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write atomically; an existing file is replaced only if it is a twinfold embedding file (or `overwrite`)."""
        check_embedding_output(path, overwrite)
        tensors = {"embeddings": np.ascontiguousarray(self.embeddings)}
        if self.calibration is not None:
            tensors["int8_starts"] = self.calibration.starts
            tensors["int8_steps"] = self.calibration.steps
        meta = {"fingerprint": self.fingerprint, "precision": self.precision,
                "dim": str(self.dim or self.embeddings.shape[1]), "ids": json.dumps(self.ids),
                "similarity": self.similarity, "compute": self.compute}
        if self.hashes is not None:
            meta["hashes"] = json.dumps(self.hashes)
        if self.kind is not None:
            meta["kind"] = self.kind
        atomic_write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> "EmbeddingSet":
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        if "fingerprint" not in meta:
            raise ValueError(f"{path}: not a twinfold embedding file (no fingerprint in its metadata)")
        tensors = load_file(str(path))
        calibration = None
        if "int8_starts" in tensors:
            calibration = Int8Calibration(tensors["int8_starts"], tensors["int8_steps"])
        hashes = json.loads(meta["hashes"]) if "hashes" in meta else None
        return cls(tensors["embeddings"], json.loads(meta["ids"]), meta["fingerprint"], meta["precision"],
                   int(meta["dim"]), calibration, meta.get("similarity", "dot"), hashes, meta.get("kind"),
                   meta.get("compute", "float32"))


def check_embedding_output(path: str | Path, overwrite: bool = False) -> None:
    """Raise `OverwriteRefused` if `path` exists and is not a twinfold embedding file (unless `overwrite`)."""
    if not overwrite and Path(path).exists() and not is_embedding_file(path):
        raise OverwriteRefused(f"{path} exists and is not a twinfold embedding file; nothing was changed. "
                               "Choose another path or pass --overwrite / overwrite=True to replace it")


def is_embedding_file(path: str | Path) -> bool:
    """True if `path` is a safetensors file with a twinfold fingerprint in its metadata."""
    try:
        with safe_open(str(path), "np") as f:
            return "fingerprint" in (f.metadata() or {})
    except Exception:  # safetensors raises its own error types for anything that is not its format
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
