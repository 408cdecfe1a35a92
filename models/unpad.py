"""The unpadded path: a chunk's texts concatenated into one row without padding tokens, attention within each text.

`models.tokens.Padder(packed=True)` builds the row (ids, positions restarting per text, token types) with the
texts' cumulative lengths `cu_seq_lens` and a per-text mask for pooling; `BiEncoder.embed_tokens` runs it. The
attention goes through transformers' own mechanism for packed sequences: the model forwards `cu_seq_lens_q/k` and
`max_length_q/k` to its attention function, here `varlen_attention`, registered with `AttentionInterface` as
`VARLEN`. It picks the kernel at run time: flash-attn's `flash_attn_varlen_func` where installed, else
`torch.nn.attention.varlen.varlen_attn` on CUDA (half precision, no attention dropout), else an exact reference
(SDPA per text), which the CPU runs. Given padded inputs instead, `VARLEN` is transformers' SDPA.
"""
import functools
import importlib.util
import logging

import torch

log = logging.getLogger(__name__)
VARLEN = "twinfold_varlen"
SETTINGS = ("auto", True, False)  # model.unpad: auto (on CUDA), true (also on the CPU, reference kernel), false
# model types whose transformers code forwards packed positions and attention kwargs, and their first position:
# RoBERTa-likes number positions from the padding index + 1
FAMILIES = {"bert": 0, "xlm-roberta": None, "roberta": None, "qwen2": 0, "qwen3": 0, "llama": 0, "mistral": 0}
PACKED_KERNELS = ("sdpa", VARLEN, "flash_attention_2")  # attention that runs packed rows (sdpa is replaced)


def padded_reason(config) -> str | None:
    """Why a model with `config` cannot run unpadded, or None when it can."""
    if config.model_type not in FAMILIES:
        return f"its transformers code is not among those that run packed rows ({', '.join(FAMILIES)})"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", None) is not False:
        return "sliding-window attention"
    if config._attn_implementation not in PACKED_KERNELS:
        return f"attn_implementation {config._attn_implementation} has no packed path (use sdpa or flash_attention_2)"
    return None


def first_position(config) -> int:
    """The position id of a text's first token."""
    start = FAMILIES[config.model_type]
    return int(config.pad_token_id) + 1 if start is None else start


UNPAD_HELP = ("run texts packed without padding (varlen attention): auto on CUDA, true also on the CPU (an exact "
              "reference kernel), false padded (the default)")


def cli_setting(text: str) -> bool | str:
    """`--unpad auto|true|false` as a setting."""
    return {"true": True, "false": False}.get(text, text)


def check_setting(setting) -> None:
    """ValueError for an `unpad` setting other than auto, True, False."""
    if not any(setting is x or setting == x and isinstance(x, str) for x in SETTINGS):
        raise ValueError(f"unpad {setting!r} is not one of auto, true, false")


def enable_unpadded(encoder, setting: bool | str) -> bool | str:
    """The effective `model.unpad` setting for `encoder`: `setting`, or False (said once in the log) for a family
    that cannot run packed rows. Where it may run packed, its SDPA attention becomes `VARLEN`."""
    check_setting(setting)
    if setting is False:
        return False
    config = encoder.config
    reason = padded_reason(config)
    if reason is not None:
        log.warning("model.unpad %s: %s runs padded: %s", setting, config.model_type, reason)
        return False
    if config._attn_implementation == "sdpa":
        register()
        encoder.set_attn_implementation(VARLEN)
    return setting


def packs(setting: bool | str, device: torch.device) -> bool:
    """Whether chunks run unpadded: `model.unpad` true, or auto on CUDA. The one place this is decided."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def varlen_kwargs(cu_seq_lens: torch.Tensor, longest: int) -> dict:
    """What transformers forwards to the attention function for packed texts."""
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest,
            "max_length_k": longest}


def unpack(hidden: torch.Tensor, cu_seq_lens: torch.Tensor, longest: int) -> torch.Tensor:
    """Token states of packed texts [1, total, dim] -> [texts, longest, dim], text i's tokens first in row i (the
    rest of a row is other texts' states, which the per-text mask leaves out of pooling)."""
    starts = cu_seq_lens[:-1].to(torch.long)
    index = (starts[:, None] + torch.arange(longest, device=hidden.device)).clamp(max=hidden.shape[1] - 1)
    return hidden[0, index]


def varlen_kernel(query: torch.Tensor, dropout: float) -> str:
    """The kernel for packed attention: flash_attn, torch (CUDA varlen_attn) or reference (SDPA per text)."""
    half = query.dtype in (torch.float16, torch.bfloat16)
    if query.device.type != "cuda" or not half:
        return "reference"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attn"
    return "torch" if dropout == 0 else "reference"  # varlen_attn has no dropout


@functools.cache
def say_reference_on_cuda(dtype: torch.dtype, dropout: float) -> None:
    """Log once per (dtype, dropout) that CUDA runs the slow reference kernel, and why."""
    log.warning("unpadded attention on CUDA runs the reference kernel (SDPA per text, slow): torch's varlen_attn "
                "needs half precision and no attention dropout (here %s, dropout %s); install flash-attn, compute in "
                "bf16, or set model.dropout: 0", str(dtype).removeprefix("torch."), dropout)


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """Attention of transformers' interface: query/key/value [1, heads, total, head_dim] of packed texts (given
    `cu_seq_lens_q`), each text attending to itself alone -> ([1, total, heads, head_dim], None). Without
    `cu_seq_lens_q`: transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kernel = varlen_kernel(query, dropout)
    if kernel == "reference" and query.device.type == "cuda":
        say_reference_on_cuda(query.dtype, dropout)
    if kernel == "reference":
        bounds = cu_seq_lens_q.tolist()
        outs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None,
                                       dropout=dropout, scaling=scaling, **kwargs)[0]
                for s, e in zip(bounds, bounds[1:])]
        return torch.cat(outs, dim=1), None
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (total, heads, head_dim)
    if kernel == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q,
                                     dropout_p=dropout, softmax_scale=scaling, causal=causal)
    else:
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling,
                          window_size=(-1, 0) if causal else (-1, -1), enable_gqa=k.shape[1] != q.shape[1])
    return out.unsqueeze(0), None


def varlen_mask(attention_mask=None, **kwargs):
    """The mask for `VARLEN`: none for packed texts (the attention keeps them apart), SDPA's for padded ones."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make `VARLEN` an attention implementation transformers knows (`from_pretrained(attn_implementation=...)`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, varlen_mask)

