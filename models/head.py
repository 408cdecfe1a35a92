"""Dense heads after pooling (sentence-transformers' `Dense` module): part of the model, trained, saved, hashed.

A head is an `nn.Sequential` of `Dense` layers (empty: no head). In a model folder each layer is a
sentence-transformers module folder `N_Dense/` with `config.json` and `model.safetensors` (`linear.weight`,
`linear.bias`, `residual.weight`), so sentence-transformers loads the same layers.
"""
import importlib
import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from twinfold.models.loading import ModelLoadError, read_sentence_transformers_layout, refused_pickle

IDENTITY = "torch.nn.modules.linear.Identity"


def activation_from_name(name: str | None, where: str) -> nn.Module:
    """The torch.nn activation module named by its full class path (null: identity)."""
    if name is None:
        return nn.Identity()
    module_name, _, class_name = name.rpartition(".")
    cls = None
    if name.startswith("torch.nn."):
        try:
            cls = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            pass
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelLoadError(f"{where}: activation_function {name!r} is not a torch.nn module class; twinfold runs "
                             "only torch.nn activations (e.g. torch.nn.modules.activation.Tanh)")
    try:
        return cls()
    except TypeError as e:
        raise ModelLoadError(f"{where}: activation_function {name!r} cannot be built without arguments ({e})") from None


class Dense(nn.Module):
    """`activation(linear(x))`, plus `x` (or `residual(x)` when the sizes differ) with `use_residual`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation_function: str | None = "torch.nn.modules.activation.Tanh", use_residual: bool = False,
                 where: str = "Dense"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias, self.use_residual = bias, use_residual
        self.activation_name = activation_function or IDENTITY
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation_function = activation_from_name(activation_function, where)
        if use_residual and in_features != out_features:
            self.residual = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation_function(self.linear(x))
        if self.use_residual:
            out = out + (x if self.in_features == self.out_features else self.residual(x))
        return out

    def config(self) -> dict:
        """The module's `config.json` in sentence-transformers' layout."""
        config = {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias,
                  "activation_function": self.activation_name}
        return {**config, "use_residual": True} if self.use_residual else config


def load_dense(folder: Path, allow_pickle: bool = False) -> Dense:
    """A Dense layer from a sentence-transformers module folder; ModelLoadError for what it cannot compute."""
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{config_file}: cannot read the Dense module's config ({e})") from None
    try:
        dense = Dense(int(config["in_features"]), int(config["out_features"]), bool(config.get("bias", True)),
                      config.get("activation_function", "torch.nn.modules.activation.Tanh"),
                      bool(config.get("use_residual", False)), where=str(config_file))
    except KeyError as e:
        raise ModelLoadError(f"{config_file}: field {e} is missing") from None
    if (folder / "model.safetensors").exists():
        state = load_file(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").exists() and allow_pickle:
        try:
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise refused_pickle(folder / "pytorch_model.bin", e) from e
    else:
        raise ModelLoadError(f"{folder}: no model.safetensors for the Dense module (pickle weights need "
                             "allow_pickle=True)")
    try:
        dense.load_state_dict(state)
    except RuntimeError as e:
        raise ModelLoadError(f"{folder}: Dense weights do not fit its config.json: {e}") from None
    return dense


def save_dense(dense: Dense, folder: Path) -> None:
    """Write a Dense layer as a sentence-transformers module folder."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dense.config(), indent=2) + "\n")
    save_file({k: v.detach().cpu().contiguous() for k, v in dense.state_dict().items()}, folder / "model.safetensors")


def read_head(folder: Path, allow_pickle: bool = False) -> nn.Sequential:
    """The Dense head stored in a model folder's sentence-transformers layout (empty when it has none)."""
    return nn.Sequential(*(load_dense(f, allow_pickle) for f in read_sentence_transformers_layout(folder)[1]))
