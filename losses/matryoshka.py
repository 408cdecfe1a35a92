"""Matryoshka representation learning: one loss applied to several prefixes of the same embeddings.
Kusupati et al. 2022, "Matryoshka Representation Learning".

The model encodes once at full size; every embedding role is cut to its first `dim` dimensions and
re-normalised (`truncate`, the same cut `models` uses when encoding at a smaller dim; `normalize=False` keeps the
raw prefix, for an inner loss on inner products), and the inner loss runs on each prefix.
Total = sum_d w_d * inner(prefix_d): a weighted *sum*, not a mean (sentence-transformers' MatryoshkaLoss
convention), so with the default weights of 1.0 the loss grows with the number of dims.
"""
import torch
import torch.nn.functional as F
from torch import nn


def truncate(emb: torch.Tensor, dim: int | None, normalize: bool = True) -> torch.Tensor:
    """Keep the first `dim` dimensions (a Matryoshka prefix), re-normalised when `normalize`."""
    if dim is None or dim == emb.shape[-1]:
        return emb
    if not 0 < dim <= emb.shape[-1]:
        raise ValueError(f"dim must be in 1..{emb.shape[-1]}, got {dim}")
    emb = emb[..., :dim]
    return F.normalize(emb, dim=-1) if normalize else emb


def check_dims(dims: list[int], weights: list[float] | None = None) -> None:
    """Raise ValueError unless `dims` are distinct positive integers, largest first, with one positive weight each."""
    if not dims or min(dims) < 1 or list(dims) != sorted(set(dims), reverse=True):
        raise ValueError(f"dims {list(dims)} must be distinct positive integers, sorted largest first")
    if weights is not None and len(weights) != len(dims):
        raise ValueError(f"weights: {len(weights)} for dims {list(dims)}; give one weight per dim")
    if weights is not None and min(weights) <= 0:
        raise ValueError(f"weights {list(weights)} must all be greater than 0")


class Matryoshka(nn.Module):
    """Wrap `inner(embeddings, keys) -> scalar` (e.g. `InfoNCE`) to train every prefix in `dims`."""

    def __init__(self, inner: nn.Module, dims: list[int], weights: list[float] | None = None, normalize: bool = True):
        super().__init__()
        dims = [int(d) for d in dims]
        check_dims(dims, weights)
        weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
        self.inner = inner
        self.dims = dims
        self.weights = weights
        self.normalize = normalize

    def forward(self, embeddings: dict[str, torch.Tensor], keys: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        full = next(iter(embeddings.values())).shape[-1]
        if max(self.dims) > full:
            raise ValueError(f"Matryoshka dims {self.dims} exceed the embedding size {full}")
        return sum(w * self.inner({role: truncate(e, d, self.normalize) for role, e in embeddings.items()}, keys)
                   for d, w in zip(self.dims, self.weights))

    def extra_repr(self) -> str:
        return f"dims={self.dims}, weights={self.weights}, normalize={self.normalize}"
