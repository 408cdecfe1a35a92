"""Matryoshka representation learning: one loss applied to several prefixes of the same embeddings.
Kusupati et al. 2022, "Matryoshka Representation Learning".

The model encodes once at full size; every embedding role is cut to its first `dim` dimensions and
re-normalised (`models.truncate`, the same cut used when encoding at a smaller dim; `normalize=False` keeps the
raw prefix, for an inner loss on inner products), and the inner loss runs on each prefix.
Total = sum_d w_d * inner(prefix_d): a weighted *sum*, not a mean (sentence-transformers' MatryoshkaLoss
convention), so with the default weights of 1.0 the loss grows with the number of dims.
"""
import torch
from torch import nn

from twinfold.models.bi_encoder import truncate


class Matryoshka(nn.Module):
    """Wrap `inner(embeddings, keys) -> scalar` (e.g. `InfoNCE`) to train every prefix in `dims`."""

    def __init__(self, inner: nn.Module, dims: list[int], weights: list[float] | None = None, normalize: bool = True):
        super().__init__()
        dims = [int(d) for d in dims]
        weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
        if not dims or min(dims) < 1 or len(set(dims)) != len(dims):
            raise ValueError(f"Matryoshka dims must be distinct positive integers; got {dims}")
        if len(weights) != len(dims):
            raise ValueError(f"Matryoshka needs one weight per dim; got {len(weights)} weights for dims {dims}")
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
