"""Quantization-aware training: the loss also sees the documents as they will be stored.

Search over sign bits ranks a document d by q . sign(d) (Hamming candidates rescored with the float query,
`models.search.binary_search`); search over int8 codes ranks it by q . dequantize(int8(d)) (`int8_search`). Both
keep the query in float. `Quantized(inner)` adds, for each such precision, the inner loss on the same batch with
every document role (all but `anchor`) replaced by its stored form:

    loss = inner(e) + w_binary * inner(e, documents -> sign bits) + w_int8 * inner(e, documents -> int8 codes)
           + w_alignment * mean over every embedding row x of (1 - cos(x, sign(x)))

at every embedding width in `dims` (all widths when None), so inside `Matryoshka` each prefix is trained for its
own sign bits and codes. The alignment term needs no estimator: it asks every embedding (queries too: their bits
choose the Hamming candidates) to lie near its own sign bits, so that a score against the bits is near the float
score (`sign_misalignment`). Sign bits enter as sign(d) / sqrt(dim), a unit vector that ranks exactly as the ±1 codes
do. int8 codes use per-dimension ranges of the batch's documents (min and max over every process, as the
corpus-wide calibration of `encode --precision int8` does over its corpus) cut in 255 steps, each value read
back at its bucket's centre, exactly as `models.quantize` stores and reads int8 codes.

Rounding has no useful gradient. `estimator="ste"` (the default) keeps the exact stored value in the forward pass
and passes the gradient straight through (Bengio et al. 2013): d loss / d e := d loss / d q(e). `estimator="tanh"`
replaces sign(d) by tanh(TANH_SHARPNESS * sqrt(dim) * d) / sqrt(dim), differentiable everywhere but only close to
the sign bits for large entries. docs/quantization.md compares both on SciFact.

`sign_bit_ranking_loss` is the objective of the code rotation (`train.rotation`): every query against a whole
bank of documents' sign bits, not only a batch's.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from twinfold.losses.distributed import gather_no_grad
from twinfold.losses.matryoshka import truncate

ESTIMATORS = ("ste", "tanh")
TANH_SHARPNESS = 4.0  # tanh(4 z) is within 1e-3 of sign(z) for |z| > 1, z = sqrt(dim) * entry
INT8_STEPS = 255  # per-dimension range / 255 per bucket, buckets 0..255 (models.quantize.calibrate_int8)
DOCUMENT_ROLES = ("positive", "negative")


def binarize(x: torch.Tensor, estimator: str = "ste") -> torch.Tensor:
    """The sign bits of `x` [..., dim] as unit vectors: +-1 / sqrt(dim), with +1 where x > 0 (the stored bit).

    "ste": that exact value, with the identity as its gradient; "tanh": its smooth relaxation.
    """
    root = math.sqrt(x.shape[-1])
    if estimator == "tanh":
        return torch.tanh(x * (TANH_SHARPNESS * root)) / root
    if estimator != "ste":
        raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}")
    return _StraightThrough.apply(x, torch.where(x > 0, 1.0, -1.0).to(x.dtype) / root)


def fake_int8(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """`x` [..., dim] through int8 codes of the per-dimension ranges [low, high] and back (bucket centres), with
    the identity as its gradient. A dimension whose range is empty reads back as `low`."""
    step = (high - low) / INT8_STEPS
    safe = torch.where(step > 0, step, torch.ones_like(step))
    buckets = torch.clamp(torch.floor((x.detach() - low) / safe), 0, INT8_STEPS)
    stored = torch.where(step > 0, (buckets + 0.5) * step + low, low)
    return _StraightThrough.apply(x, stored.to(x.dtype))


def int8_ranges(documents: list[torch.Tensor], gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension min and max over every document row (of every process with `gather`), without gradient."""
    rows = torch.cat([d.detach().reshape(-1, d.shape[-1]) for d in documents])
    if gather:
        rows = gather_no_grad(rows)
    return rows.min(0).values, rows.max(0).values


def sign_misalignment(x: torch.Tensor) -> torch.Tensor:
    """1 - cos(x, sign(x)) per row of `x` [..., dim]: 0 when every entry has the same magnitude (the sign bits hold
    all of x), about 0.2 for Gaussian entries. Scoring a float query against sign bits instead of x adds an error
    whose variance is 2 * this (both unit vectors), which is why the alignment term lowers it."""
    return 1 - x.abs().sum(-1) / (math.sqrt(x.shape[-1]) * x.norm(dim=-1).clamp_min(1e-12))


def sign_bit_ranking_loss(queries: torch.Tensor, documents: torch.Tensor, targets: torch.Tensor, dims: list[int],
                          temperature: float, normalize: bool = True, estimator: str = "ste") -> torch.Tensor:
    """Mean over `dims` of the cross-entropy of ranking every document of `documents` [m, D] for each query of
    `queries` [n, D] by the query's float prefix times the document prefix's sign bits (what binary search ranks
    by), query i's right document being `documents[targets[i]]`. Prefixes are re-normalised when `normalize`."""
    loss = queries.new_zeros(())
    for dim in dims:
        bits = binarize(truncate(documents, dim, normalize), estimator)
        loss = loss + F.cross_entropy(truncate(queries, dim, normalize) @ bits.T / temperature, targets)
    return loss / len(dims)


class _StraightThrough(torch.autograd.Function):
    """`stored` exactly in the forward pass; the gradient goes to `x` unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        return stored

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class Quantized(nn.Module):
    """Wrap `inner(embeddings, keys) -> scalar` (e.g. `InfoNCE`): add its value on binary and int8 documents."""

    def __init__(self, inner: nn.Module, binary: float = 0.0, int8: float = 0.0, dims: list[int] | None = None,
                 estimator: str = "ste", gather: bool = True, alignment: float = 0.0):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}")
        if min(binary, int8, alignment) < 0 or binary == int8 == alignment == 0:
            raise ValueError(f"weights binary={binary}, int8={int8}, alignment={alignment}: all at least 0 and one "
                             "of them above 0")
        if dims is not None and (not dims or min(dims) < 1):
            raise ValueError(f"dims {dims} must be positive integers, or None for every width")
        self.inner = inner
        self.binary, self.int8, self.alignment = float(binary), float(int8), float(alignment)
        self.dims = None if dims is None else [int(d) for d in dims]
        self.estimator = estimator
        self.gather = gather

    def forward(self, embeddings: dict[str, torch.Tensor], keys: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        loss = self.inner(embeddings, keys)
        width = next(iter(embeddings.values())).shape[-1]
        if self.dims is not None and width not in self.dims:
            return loss
        if self.binary:
            stored = {r: binarize(e, self.estimator) if r in DOCUMENT_ROLES else e for r, e in embeddings.items()}
            loss = loss + self.binary * self.inner(stored, keys)
        if self.int8:
            low, high = int8_ranges([e for r, e in embeddings.items() if r in DOCUMENT_ROLES], self.gather)
            stored = {r: fake_int8(e, low, high) if r in DOCUMENT_ROLES else e for r, e in embeddings.items()}
            loss = loss + self.int8 * self.inner(stored, keys)
        if self.alignment:
            rows = torch.cat([e.reshape(-1, width) for e in embeddings.values()])
            loss = loss + self.alignment * sign_misalignment(rows).mean()
        return loss

    def extra_repr(self) -> str:
        return (f"binary={self.binary}, int8={self.int8}, alignment={self.alignment}, dims={self.dims}, "
                f"estimator={self.estimator}")
