"""Weight merging: the linear interpolation `base * (1 - alpha) + tuned * alpha` of two models of one architecture.

alpha 0 is the base model, alpha 1 the tuned one. The two must agree in architecture (config.json, apart from
names, versions, dtype and dropout), in their tensors (names and shapes, Dense head included), in the tokenizer
(class, vocabulary, special tokens, normalizer and pre-tokenizer) and in every embedding setting (pooling,
normalisation, similarity, max length, prompts, EOS); the first difference is one `MergeError` naming it.
Floating-point tensors are interpolated in float32 and stored in the tuned model's dtype; any other tensor
(position ids) must be equal. A LoRA model takes part with its adapter merged into its weights.
"""
import copy
import json

import torch

from twinfold.models.bi_encoder import BiEncoder
from twinfold.models.families import DROPOUT_KEYS

FORMULA = "base * (1 - alpha) + tuned * alpha"
CONFIG_NEUTRAL = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "architectures",
                  *DROPOUT_KEYS)  # keys that do not change what the weights compute at inference
SETTINGS_NEUTRAL = ("matryoshka_dims",)  # the merged model keeps the tuned model's


class MergeError(ValueError):
    """Two models that cannot be merged; the message names what differs."""


def check_mergeable(base: BiEncoder, tuned: BiEncoder, names: tuple[str, str] = ("BASE", "TUNED")) -> None:
    """Raise `MergeError` naming the first difference of architecture, tensors, tokenizer or settings."""
    def differ(what: str, a, b) -> MergeError:
        return MergeError(f"{names[0]} and {names[1]} differ in {what} ({a} vs {b}); only models of one architecture, "
                          "tokenizer and settings merge (fine-tune the base model, or merge with its own base)")

    configs = [{k: v for k, v in m.encoder.config.to_dict().items() if k not in CONFIG_NEUTRAL} for m in (base, tuned)]
    for key in sorted(configs[0].keys() | configs[1].keys()):
        if configs[0].get(key) != configs[1].get(key):
            raise differ(f"config.json {key}", configs[0].get(key), configs[1].get(key))
    states = [_state(m) for m in (base, tuned)]
    for key in sorted(states[0].keys() | states[1].keys()):
        if key not in states[0] or key not in states[1]:
            raise differ(f"tensor {key}", "present" if key in states[0] else "absent",
                         "present" if key in states[1] else "absent")
        if states[0][key].shape != states[1][key].shape:
            raise differ(f"the shape of {key}", tuple(states[0][key].shape), tuple(states[1][key].shape))
    for what, a, b in zip(("tokenizer class", "tokenizer vocabulary", "tokenizer special tokens",
                           "tokenizer normalizer and pre-tokenizer"), *(_tokenizer_facts(m.tokenizer)
                                                                        for m in (base, tuned))):
        if a != b:
            raise differ(what, *((f"{len(a)} entries", f"{len(b)} entries") if what == "tokenizer vocabulary"
                                 else (a, b)))
    settings = [{k: v for k, v in m.settings_dict().items() if k not in SETTINGS_NEUTRAL} for m in (base, tuned)]
    for key in settings[0]:
        if settings[0][key] != settings[1][key]:
            raise differ(f"setting {key}", repr(settings[0][key]), repr(settings[1][key]))


def interpolate(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """`base * (1 - alpha) + tuned * alpha` per floating-point tensor (in float32, stored in the tuned tensor's
    dtype); other tensors must be equal and are kept."""
    out = {}
    for key, t in tuned.items():
        b = base[key]
        if t.is_floating_point():
            out[key] = (b.float() * (1 - alpha) + t.float() * alpha).to(t.dtype)
        elif torch.equal(b, t):
            out[key] = t
        else:
            raise MergeError(f"tensor {key} ({t.dtype}) differs between the two models and is not floating-point, "
                             "so it cannot be interpolated")
    return out


def merge(base: BiEncoder, tuned: BiEncoder, alpha: float, info: dict | None = None) -> BiEncoder:
    """A new model with the tuned model's tokenizer and settings and the interpolated weights, after
    `check_mergeable`; `info` is what its twinfold.json records besides the settings."""
    if not 0 <= alpha <= 1:
        raise MergeError(f"alpha {alpha} must be in [0, 1] (0: the base model, 1: the tuned one)")
    base, tuned = base.merged(), tuned.merged()
    check_mergeable(base, tuned)
    weights = interpolate(_state(base), _state(tuned), alpha)
    model = BiEncoder(copy.deepcopy(tuned.encoder), tuned.tokenizer, copy.deepcopy(tuned.settings), info,
                      copy.deepcopy(tuned.head), tuned.checkpoint_dtype)
    model.encoder.load_state_dict({k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")})
    model.head.load_state_dict({k[len("head."):]: v for k, v in weights.items() if k.startswith("head.")})
    return model


def _state(model: BiEncoder) -> dict[str, torch.Tensor]:
    """The encoder's and the Dense head's tensors, by `encoder.` and `head.` names."""
    return {**{f"encoder.{k}": v for k, v in model.encoder.state_dict().items()},
            **{f"head.{k}": v for k, v in model.head.state_dict().items()}}


def _tokenizer_facts(tokenizer) -> tuple:
    """What makes two tokenizers split a text alike: class, vocabulary, special tokens, normalizer and pre-tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pipeline = None
    if backend is not None:
        described = json.loads(backend.to_str())
        pipeline = json.dumps([described.get("normalizer"), described.get("pre_tokenizer")], sort_keys=True)
    return type(tokenizer).__name__, tokenizer.get_vocab(), tokenizer.special_tokens_map, pipeline
