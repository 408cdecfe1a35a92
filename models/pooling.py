"""Pooling of token states into one vector per text: sentence-transformers' `Pooling` modes, computed as it does."""
import torch

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")


def _accumulation_dtype(hidden: torch.Tensor) -> torch.dtype:
    """Sums over tokens of half-precision states run in float32 (then cast back), as sentence-transformers' do."""
    return torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype


def _masked_sum(hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the kept token states and their number, both in the accumulation dtype."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    acc = _accumulation_dtype(hidden)
    return (hidden * mask).sum(1, dtype=acc), mask.sum(1, dtype=acc).clamp(min=1e-9)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states that the attention mask keeps."""
    total, count = _masked_sum(hidden, attention_mask)
    return (total / count).to(hidden.dtype)


def mean_sqrt_len_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the kept token states over the square root of their number."""
    total, count = _masked_sum(hidden, attention_mask)
    return (total / count.sqrt()).to(hidden.dtype)


def weighted_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the kept token states weighted by position (1, 2, ... from the first kept token)."""
    acc = _accumulation_dtype(hidden)
    mask = attention_mask.unsqueeze(-1).to(acc)
    positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=acc).view(1, -1, 1)
    first = attention_mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1)  # left padding shifts the weights
    weights = mask * (positions - first)
    return ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)).to(hidden.dtype)


def cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """State of the first kept token (the first token, unless the tokenizer pads on the left)."""
    first = attention_mask.to(torch.int32).argmax(dim=1)
    return hidden[torch.arange(len(hidden), device=hidden.device), first]


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """State of the last kept token."""
    last = hidden.shape[1] - 1 - attention_mask.to(torch.int32).flip(1).argmax(dim=1)
    return hidden[torch.arange(len(hidden), device=hidden.device), last]


def max_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over the kept tokens."""
    masked = hidden.masked_fill(attention_mask.unsqueeze(-1) == 0, torch.finfo(hidden.dtype).min)
    return masked.max(1).values


_POOLERS = {"mean": mean_pool, "cls": cls_pool, "max": max_pool, "mean_sqrt_len_tokens": mean_sqrt_len_pool,
            "weightedmean": weighted_mean_pool, "lasttoken": last_token_pool}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool `hidden` [batch, tokens, dim] with `mode` in POOLING_MODES."""
    if mode not in _POOLERS:
        raise ValueError(f"unknown pooling {mode!r}: choose one of {', '.join(POOLING_MODES)}")
    return _POOLERS[mode](hidden, attention_mask)
