"""InfoNCE with in-batch (and cross-process) negatives, optional hard negatives, symmetric term and
false-negative masking. Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding";
the in-batch form is sentence-transformers' MultipleNegativesRankingLoss.

Roles: `anchor` [B, d] (queries), `positive` [B, d] (row i is anchor i's match), optional `negative`
([B, d], [B, k, d] or the flat [B*k, d] rows of k hard negatives per anchor). For anchor i the candidates are
all positives and all negatives of the whole (gathered) batch; the label is its own positive:

    loss_i = -log( exp(s(a_i, p_i)/t) / sum_{c in candidates} exp(s(a_i, c)/t) ),

s = cosine similarity (the default), or with `similarity="dot"` the inner product of the embeddings as given
(for models whose embeddings are not normalised and are searched by inner product).

The loss is the mean over this process's anchors (see `losses.distributed` for why that is exact across
processes). Symmetric: 0.5 * (anchor -> candidates) + 0.5 * (positive -> anchors), the second term being
loss_j = -log softmax over all anchors of s(p_j, a)/t at a_j (negatives play no part in it).

False-negative masking (with `positive_keys`, stable hashes of the positive texts, see `text_keys`): a candidate
that is not anchor i's labelled positive but has the same text as it (another row's positive, or any row's hard
negative with `negative_keys`) is dropped from anchor i's denominator. In the symmetric term anchor i is
dropped from positive j's denominator when i != j and positive i has the same text as positive j.
"""
import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from twinfold.losses.distributed import average_gradient, gather_no_grad, gather_with_grad, rank_offset

DEFAULT_TEMPERATURE = 0.05
MIN_TEMPERATURE = 0.01
ROLES = ("anchor", "positive", "negative")
SIMILARITIES = ("cosine", "dot")  # what the loss trains and search ranks by


def text_keys(texts: list[str]) -> torch.Tensor:
    """Stable int64 key per text (blake2b, identical across processes and runs) for false-negative masking."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little", signed=True)
                         for t in texts], dtype=torch.int64)


def info_nce(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = DEFAULT_TEMPERATURE,
    symmetric: bool = False,
    positive_keys: torch.Tensor | None = None,
    negative_keys: torch.Tensor | None = None,
    gather: bool = True,
    similarity: str = "cosine",
) -> torch.Tensor:
    """InfoNCE of one batch -> scalar (mean over local anchors). See the module docstring for the formula.

    With cosine similarity the embeddings are L2-normalised here, so inputs need not be. `positive_keys` [B] /
    `negative_keys` (one per negative row) are int64 text keys; masking needs `positive_keys`. With `gather`
    and several processes, candidates (and anchors, for the symmetric term) come from every process.
    """
    if anchor.ndim != 2 or positive.shape != anchor.shape:
        raise ValueError(f"anchor and positive must both be [batch, dim]; got {tuple(anchor.shape)} "
                         f"and {tuple(positive.shape)}")
    batch, dim = anchor.shape
    if negative is not None and (negative.shape[-1] != dim or negative.numel() % (batch * dim)):
        raise ValueError(f"negative must be [{batch}, {dim}], [{batch}, k, {dim}] or [{batch}*k, {dim}]; "
                         f"got {tuple(negative.shape)}")
    if positive_keys is not None and positive_keys.numel() != batch:
        raise ValueError(f"positive_keys must have one key per positive ({batch}); got {positive_keys.numel()}")
    if negative_keys is not None and (negative is None or positive_keys is None
                                      or negative_keys.numel() * dim != negative.numel()):
        raise ValueError("negative_keys need negatives (one key per negative row) and positive_keys "
                         "(masking compares every candidate with the anchor's own positive)")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}; got {similarity!r}")
    dtype = torch.promote_types(anchor.dtype, torch.float32)
    unit = (lambda x: F.normalize(x, dim=-1)) if similarity == "cosine" else _local
    gather_grad, gather_keys = (gather_with_grad, gather_no_grad) if gather else (_local, _local)

    a = unit(anchor.to(dtype))
    p = unit(positive.to(dtype))
    candidates = [gather_grad(p)]
    if negative is not None:
        candidates.append(gather_grad(unit(negative.to(dtype).reshape(-1, dim))))
    logits = a @ torch.cat(candidates).T / temperature
    labels = torch.arange(batch, device=a.device) + (rank_offset(batch) if gather else 0)

    mask = None
    if positive_keys is not None:
        own = positive_keys.to(a.device).reshape(batch, 1)
        blocks = [own == gather_keys(positive_keys.to(a.device).reshape(-1))]
        if negative_keys is not None:
            blocks.append(own == gather_keys(negative_keys.to(a.device).reshape(-1)))
        elif negative is not None:  # negatives without keys are never masked
            blocks.append(torch.zeros(batch, candidates[1].shape[0], dtype=torch.bool, device=a.device))
        mask = torch.cat(blocks, dim=1)
        mask[torch.arange(batch, device=a.device), labels] = False
        logits = logits.masked_fill(mask, -math.inf)
    loss = F.cross_entropy(logits, labels)
    if not symmetric:
        return loss

    backward_logits = p @ gather_grad(a).T / temperature
    if mask is not None:
        backward_logits = backward_logits.masked_fill(mask[:, :backward_logits.shape[1]], -math.inf)
    return 0.5 * (loss + F.cross_entropy(backward_logits, labels))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t


class InfoNCE(nn.Module):
    """InfoNCE over `embeddings` {"anchor", "positive"[, "negative"]} with optional `keys` for masking.

    The temperature is a fixed buffer, or with `learnable=True` a log-parameter whose value is kept at
    `min_temperature` or above (clamped in place before each use, so its gradient never dies at the bound).
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, *, learnable: bool = False,
                 min_temperature: float = MIN_TEMPERATURE, symmetric: bool = False, gather: bool = True,
                 similarity: str = "cosine"):
        super().__init__()
        if not temperature >= min_temperature > 0:
            raise ValueError(f"temperature must be >= min_temperature > 0; got {temperature} and {min_temperature}")
        log_temperature = torch.tensor(math.log(temperature))
        if learnable:
            self.log_temperature = nn.Parameter(log_temperature)
        else:
            self.register_buffer("log_temperature", log_temperature)
        self.min_temperature = min_temperature
        self.symmetric = symmetric
        self.gather = gather
        self.similarity = similarity

    @property
    def learnable(self) -> bool:
        return isinstance(self.log_temperature, nn.Parameter)

    @property
    def temperature(self) -> torch.Tensor:
        """Current temperature (detached; for logging)."""
        return self.log_temperature.detach().exp().clamp(min=self.min_temperature)

    def forward(self, embeddings: dict[str, torch.Tensor], keys: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        unknown = set(embeddings) - set(ROLES)
        if unknown or not {"anchor", "positive"} <= set(embeddings):
            raise ValueError(f"InfoNCE needs roles 'anchor' and 'positive' (and optionally 'negative'); "
                             f"got {sorted(embeddings)}")
        keys = keys or {}
        if self.learnable:
            with torch.no_grad():  # keep the parameter itself in range, so its gradient stays alive at the bound
                self.log_temperature.clamp_(min=math.log(self.min_temperature))
        temperature = self.log_temperature.exp()
        if self.learnable and self.gather:
            temperature = average_gradient(temperature)
        return info_nce(embeddings["anchor"], embeddings["positive"], embeddings.get("negative"),
                        temperature=temperature, symmetric=self.symmetric, positive_keys=keys.get("positive"),
                        negative_keys=keys.get("negative"), gather=self.gather, similarity=self.similarity)

    def extra_repr(self) -> str:
        kind = "learnable" if self.learnable else "fixed"
        return (f"temperature={self.temperature.item():.4g} ({kind}), symmetric={self.symmetric}, "
                f"similarity={self.similarity}")
