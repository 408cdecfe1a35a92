"""LoRA adapters (peft) on a BiEncoder's encoder: which layers, adding or loading one, merging it for export.

A LoRA model's `encoder` is a `peft.PeftModel` over the base encoder: only the adapter's low-rank matrices train.
An adapter folder holds `adapter_config.json` (whose `base_model_name_or_path` names the base as it was given),
`adapter_model.safetensors` and the usual twinfold / sentence-transformers files except the base weights.
"""
import copy
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from twinfold.models.loading import ModelLoadError, check_safetensors_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# per config.model_type: the attention projections LoRA adapts by default (suffixes of linear layers' names)
TARGETS = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "camembert"),
                    ("query", "key", "value", "attention.output.dense")),
    "modernbert": ("attn.Wqkv", "attn.Wo"),
    "mpnet": ("attn.q", "attn.k", "attn.v", "attn.o"),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin"),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2"),
                    ("q_proj", "k_proj", "v_proj", "o_proj")),
    "phi3": ("qkv_proj", "o_proj"),
}
UNUSED_PREFIXES = ("pooler.",)  # layers the pooled embedding never uses: no adapter (it would get no gradient)


@dataclass
class LoraSettings:
    """The adapter's shape: rank `r`, scale `alpha / r`, dropout on its input, and the layers it adapts
    (suffixes of linear layers' names; None: `TARGETS` for the model's family)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | None = None


def has_lora(encoder: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(encoder, PeftModel)


def target_layers(encoder: nn.Module, targets: list[str] | None = None) -> list[str]:
    """Full names of the linear layers that `targets` (suffixes; None: the family's defaults) name in `encoder`.

    Raises ValueError, naming `target_modules`, when none match.
    """
    linear = [name for name, module in encoder.named_modules()
              if isinstance(module, nn.Linear) and not name.startswith(UNUSED_PREFIXES)]
    model_type = getattr(encoder.config, "model_type", None)
    suffixes = targets if targets is not None else TARGETS.get(model_type, ())
    found = [name for name in linear if any(name == s or name.endswith("." + s) for s in suffixes)]
    if not found:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
        given = f"{list(targets)} match" if targets is not None else f"no default for model type {model_type!r} matches"
        raise ValueError(f"target_modules: {given} none of the model's linear layers; set it to some of theirs "
                         f"(names end in: {', '.join(leaves)})")
    return found


def add_lora(encoder: nn.Module, settings: LoraSettings, base_name: str) -> nn.Module:
    """`encoder` as a PeftModel with a new adapter (zero at first: the model computes what it did); only the
    adapter trains. `base_name` (the base as given: hub id or path) is recorded in `adapter_config.json`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                        target_modules=target_layers(encoder, settings.target_modules))
    model = get_peft_model(encoder, config)
    model.peft_config["default"].base_model_name_or_path = base_name
    return model


def check_same_adapter(encoder: nn.Module, settings: LoraSettings) -> None:
    """Raise ValueError, naming the setting, when `settings` differ from the loaded adapter's."""
    config = encoder.peft_config["default"]
    loaded = {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout}
    for key, value in loaded.items():
        if getattr(settings, key) != value:
            raise ValueError(f"{key}: {getattr(settings, key)} differs from the loaded adapter's {value}; set it "
                             f"to {value} to go on training that adapter, or merge it into a model folder first")
    if settings.target_modules is not None:
        raise ValueError("target_modules: the loaded adapter's layers train; leave it unset to go on training that "
                         "adapter")


def make_trainable(encoder: nn.Module) -> None:
    """Let a loaded adapter's matrices train (and nothing else)."""
    for name, param in encoder.named_parameters():
        param.requires_grad_("lora_" in name)


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(folder: Path) -> str:
    """The base model an adapter folder was trained over, as it was given (hub id or path)."""
    try:
        base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder / ADAPTER_CONFIG}: cannot read ({e})") from None
    if not base:
        raise ModelLoadError(f"{folder / ADAPTER_CONFIG}: no base_model_name_or_path; set it to the base model's "
                             "hub id or folder")
    return base


def check_adapter_folder(folder: Path, allow_pickle: bool = False) -> None:
    """Raise ModelLoadError for adapter weights that are missing, truncated, or pickle-only without opt-in."""
    weights = folder / ADAPTER_WEIGHTS
    if weights.exists():
        check_safetensors_file(weights)
    elif (folder / "adapter_model.bin").exists():
        if not allow_pickle:
            raise ModelLoadError(
                f"{folder}: has only pickle adapter weights (adapter_model.bin), which can run arbitrary code when "
                "loaded. Convert them to safetensors, or, if you trust their source, opt in with allow_pickle=True "
                "(command line: --allow-pickle; config: model.allow_pickle: true)."
            )
    else:
        raise ModelLoadError(f"{folder}: no adapter weights ({ADAPTER_WEIGHTS}) found")


def load_lora(encoder: nn.Module, folder: Path) -> nn.Module:
    """`encoder` with the adapter of `folder` (checked by `check_adapter_folder`) applied, frozen."""
    from peft import PeftModel

    return PeftModel.from_pretrained(encoder, folder, is_trainable=False)


def merged_encoder(encoder: nn.Module) -> nn.Module:
    """A copy of the base encoder with the adapter added into its weights (W + B A alpha/r); `encoder` is unchanged."""
    return copy.deepcopy(encoder).merge_and_unload()


def load_adapter_weights(encoder: nn.Module, folder: Path) -> None:
    """Restore the adapter matrices saved in `folder` in place (exactly: a copy of the saved values)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(encoder, load_file(folder / ADAPTER_WEIGHTS, device="cpu"))
