"""Embedding files (safetensors) that carry the fingerprint of the model that made them."""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save

from models.atomic import atomic_write_bytes
from models.quantize import Int8Calibration


class FingerprintMismatch(ValueError):
    """Embeddings from two different models (or settings) were about to be compared."""


def content_hash(text: str) -> str:
    """The hash stored per embedded text, so that an update re-embeds only texts that changed."""
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass
class EmbeddingSet:
    """Embeddings with their ids, the producing model's fingerprint and their precision.

    `hashes` (content hashes of the embedded texts, in `ids` order), `kind` and `compute` let
    `python -m models.encode --update` keep the rows whose text is unchanged.
    """

    embeddings: np.ndarray
    ids: list[str]
    fingerprint: str
    precision: str = "float32"
    dim: int | None = None
    calibration: Int8Calibration | None = None
    hashes: list[str] | None = None
    kind: str | None = None
    compute: str = "float32"

    def save(self, path: str | Path) -> None:
        tensors = {"embeddings": np.ascontiguousarray(self.embeddings)}
        if self.calibration is not None:
            tensors["int8_starts"] = self.calibration.starts
            tensors["int8_steps"] = self.calibration.steps
        meta = {"fingerprint": self.fingerprint, "precision": self.precision,
                "dim": str(self.dim or self.embeddings.shape[1]), "ids": json.dumps(self.ids),
                "compute": self.compute}
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
                   int(meta["dim"]), calibration, hashes, meta.get("kind"), meta.get("compute", "float32"))


def check_same_model(a: str, b: str, what: str = "embeddings") -> None:
    """Raise FingerprintMismatch unless fingerprints `a` and `b` are equal."""
    if a != b:
        raise FingerprintMismatch(
            f"{what} come from different models: fingerprint {a} vs {b}. Re-encode both sides with the same "
            "model (an index must be searched with the model that built it)."
        )


def similarity(queries: EmbeddingSet, documents: EmbeddingSet) -> np.ndarray:
    """Dot-product scores [n_queries, n_documents] of two float32 sets from the same model."""
    check_same_model(queries.fingerprint, documents.fingerprint)
    for s in (queries, documents):
        if s.precision != "float32":
            raise ValueError(f"similarity needs float32 embeddings, got {s.precision}")
    return queries.embeddings @ documents.embeddings.T
