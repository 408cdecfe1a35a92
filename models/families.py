"""How a Hugging Face checkpoint loads as an embedding encoder: its class, dtype, attention kernel and dropout keys.

One table per fact, read by `BiEncoder.from_pretrained`; docs/models.md says what each family needs in a recipe.
"""
import importlib.util

import torch

from twinfold.models.loading import ModelLoadError

DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: the checkpoint's (config.json `dtype`; float32 if absent)
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
# encoder-decoder families whose encoder alone embeds (as sentence-transformers loads them): model_type -> class
ENCODER_ONLY = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
# config attributes that are dropout probabilities of the encoder (BERT-likes, DistilBERT, ModernBERT, T5, decoders)
DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout", "dropout_rate",
                "embedding_dropout", "mlp_dropout")


def checkpoint_dtype(config) -> str:
    """The dtype a checkpoint's weights are stored in, by its config (float32 when it names none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in DTYPES else "float32"


def torch_dtype(dtype: str, config) -> torch.dtype:
    """`dtype` (one of DTYPES) as a torch dtype; auto is the checkpoint's."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, checkpoint_dtype(config) if dtype == "auto" else dtype)


def check_attn_implementation(name: str) -> None:
    """ModelLoadError for an attention kernel that is unknown or whose package is not installed."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ModelLoadError(f"attn_implementation {name!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelLoadError("attn_implementation flash_attention_2 needs the flash-attn package, which is not "
                             "installed (pip install flash-attn on a CUDA machine); use sdpa")


def encoder_class(config):
    """The transformers class that embeds with `config`: the encoder alone for T5-likes, else AutoModel's."""
    import transformers

    if config.model_type in ENCODER_ONLY:
        return getattr(transformers, ENCODER_ONLY[config.model_type])
    return transformers.AutoModel


def resolve_attn_implementation(name: str, model_class, config) -> str:
    """The kernel to ask transformers for: `name`, except sdpa on a class without an SDPA kernel (MPNet) runs eager."""
    check_attn_implementation(name)
    if model_class is not None and hasattr(model_class, "_model_mapping"):  # AutoModel: the class it picks
        model_class = model_class._model_mapping.get(type(config), None)
    if name == "sdpa" and model_class is not None and not getattr(model_class, "_supports_sdpa", True):
        return "eager"
    return name
