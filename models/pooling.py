"""Pooling of token states into one vector per text."""
import torch

POOLING_MODES = ("mean", "cls", "max")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states that the attention mask keeps."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """State of the first token."""
    return hidden[:, 0]


def max_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over the kept tokens."""
    masked = hidden.masked_fill(attention_mask.unsqueeze(-1) == 0, torch.finfo(hidden.dtype).min)
    return masked.max(1).values


_POOLERS = {"mean": mean_pool, "cls": cls_pool, "max": max_pool}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool `hidden` [batch, tokens, dim] with `mode` in POOLING_MODES."""
    if mode not in _POOLERS:
        raise ValueError(f"unknown pooling {mode!r}: choose one of {', '.join(POOLING_MODES)}")
    return _POOLERS[mode](hidden, attention_mask)
