"""Distillation from teacher scores: the student's similarities to a row's positive and hard negatives are trained
towards a teacher's scores of the same (query, document) pairs.

Roles as for InfoNCE: `anchor` [B, d], `positive` [B, d], `negative` ([B, d], [B, k, d] or the flat [B*k, d] rows
of k hard negatives per anchor); `scores` [B, 1 + k]: the teacher's score of anchor i against its positive (column
0) and its negatives (columns 1..k, in the negatives' order). Student scores s_ij = sim(a_i, d_ij) / t over
d_i = (p_i, n_i1, ..., n_ik), with sim the cosine (default) or the inner product; teacher scores
z_ij = scores_ij / t_teacher.

- MarginMSE (Hofstätter et al. 2020, "Improving Efficient Neural Ranking Models with Cross-Architecture
  Knowledge Distillation"): the mean over rows and negatives of ((s_i0 - s_ij) - (z_i0 - z_ij))^2, j = 1..k.
- KL (listwise distillation): the mean over rows of KL(softmax(z_i) || softmax(s_i)) over the row's 1 + k
  documents.

Each row's term uses its own documents only, so the loss is the mean over this process's rows: with equal rows per
process, DDP's gradient average is exactly the one-process gradient (no gather). Teacher scores exist only for a
row's own documents, so in-batch documents take no part.
"""
import torch
import torch.nn.functional as F
from torch import nn

from twinfold.losses.infonce import SIMILARITIES

DISTILLATION_KINDS = ("margin_mse", "kl")


def student_scores(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None,
                   similarity: str = "cosine") -> torch.Tensor:
    """sim(a_i, d_ij) for each row's positive then its negatives -> [B, 1 + k] (in float32 or wider)."""
    if anchor.ndim != 2 or positive.shape != anchor.shape:
        raise ValueError(f"anchor and positive must both be [batch, dim]; got {tuple(anchor.shape)} "
                         f"and {tuple(positive.shape)}")
    batch, dim = anchor.shape
    if negative is None or negative.shape[-1] != dim or negative.numel() % (batch * dim) or not negative.numel():
        shape = None if negative is None else tuple(negative.shape)
        raise ValueError(f"distillation needs hard negatives: [{batch}, {dim}], [{batch}, k, {dim}] or "
                         f"[{batch}*k, {dim}]; got {shape}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}; got {similarity!r}")
    dtype = torch.promote_types(anchor.dtype, torch.float32)
    documents = torch.cat([positive.to(dtype).unsqueeze(1), negative.to(dtype).reshape(batch, -1, dim)], dim=1)
    a = anchor.to(dtype)  # [B, d]; documents [B, 1 + k, d]
    if similarity == "cosine":
        a, documents = F.normalize(a, dim=-1), F.normalize(documents, dim=-1)
    return torch.einsum("bd,bkd->bk", a, documents)  # [B, 1 + k]


def _check_scores(scores: torch.Tensor, student: torch.Tensor) -> None:
    if scores.shape != student.shape:
        raise ValueError(f"teacher scores must be [batch, 1 + negatives] = {list(student.shape)} (positive first); "
                         f"got {list(scores.shape)}")


def margin_mse(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, scores: torch.Tensor, *,
               temperature: float = 1.0, teacher_temperature: float = 1.0, similarity: str = "cosine") -> torch.Tensor:
    """MarginMSE of one batch -> scalar (mean over local rows and negatives); see the module docstring."""
    s = student_scores(anchor, positive, negative, similarity) / temperature
    _check_scores(scores, s)
    z = scores.to(s) / teacher_temperature
    return F.mse_loss(s[:, :1] - s[:, 1:], z[:, :1] - z[:, 1:])


def listwise_kl(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, scores: torch.Tensor, *,
                temperature: float = 1.0, teacher_temperature: float = 1.0, similarity: str = "cosine") -> torch.Tensor:
    """KL(teacher || student) over each row's positive and negatives -> scalar (mean over local rows)."""
    s = student_scores(anchor, positive, negative, similarity) / temperature
    _check_scores(scores, s)
    z = scores.to(s) / teacher_temperature
    return F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(z, dim=-1), reduction="batchmean", log_target=True)


class Distillation(nn.Module):
    """`kind` (margin_mse | kl) over `embeddings` {"anchor", "positive", "negative"} and `keys["scores"]` [B, 1 + k]
    (the teacher's scores; other keys are ignored)."""

    def __init__(self, kind: str, temperature: float = 1.0, teacher_temperature: float = 1.0,
                 similarity: str = "cosine"):
        super().__init__()
        if kind not in DISTILLATION_KINDS:
            raise ValueError(f"kind must be one of {DISTILLATION_KINDS}; got {kind!r}")
        if not min(temperature, teacher_temperature) > 0:
            raise ValueError(f"temperatures must be greater than 0; got {temperature} and {teacher_temperature}")
        self.kind, self.similarity = kind, similarity
        self.temperature, self.teacher_temperature = float(temperature), float(teacher_temperature)

    def forward(self, embeddings: dict[str, torch.Tensor], keys: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if set(embeddings) != {"anchor", "positive", "negative"}:
            raise ValueError(f"{self.kind} needs roles 'anchor', 'positive' and 'negative'; got {sorted(embeddings)}")
        if not keys or "scores" not in keys:
            raise ValueError(f"{self.kind} needs the teacher's scores: keys['scores'] [batch, 1 + negatives]")
        loss = margin_mse if self.kind == "margin_mse" else listwise_kl
        return loss(embeddings["anchor"], embeddings["positive"], embeddings["negative"], keys["scores"],
                    temperature=self.temperature, teacher_temperature=self.teacher_temperature,
                    similarity=self.similarity)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, temperature={self.temperature:.4g}, "
                f"teacher_temperature={self.teacher_temperature:.4g}, similarity={self.similarity}")
