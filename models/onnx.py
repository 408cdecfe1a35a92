"""ONNX export of the encoder, in the layout sentence-transformers' ONNX backend reads, and ONNX Runtime inference.

The graph is the Hugging Face encoder alone: `input_ids`, `attention_mask` (and `token_type_ids` when the
tokenizer makes them), with dynamic batch and sequence axes -> `last_hidden_state`, which is what optimum's
`ORTModelForFeatureExtraction` reads from `onnx/model.onnx` for `SentenceTransformer(path, backend="onnx")`.
Pooling, the Dense head and normalisation stay outside the graph, computed by sentence-transformers' own modules
or by `BiEncoder`, so every pooling mode and head of the PyTorch model carries over unchanged.
"""
import logging
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from twinfold.models.quantize import float32_module

ONNX_DIR = "onnx"
# compute -> file under ONNX_DIR. The int8 file is sentence-transformers' `avx512_vnni` (= `arm64`) dynamic
# quantisation: int8 weights per output channel, uint8 activations quantised per batch, full range.
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model_qint8_avx512_vnni.onnx"}
OPSET = 18
ONNX_SIZE_LIMIT = 2 ** 31  # protobuf's limit: larger weights go to an external data file beside the graph


class LastHiddenState(nn.Module):
    """The encoder as a function of its inputs to its token states: the graph that is exported."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state


def export_onnx(model, folder: str | Path, int8: bool = False) -> None:
    """Write the encoder of `model` (a BiEncoder) to `folder/onnx/model.onnx`, and with `int8` its int8 copy.

    Needs the `onnx` extra (onnx, onnxscript for torch's exporter, onnxruntime for the int8 copy).
    """
    try:
        import onnx  # noqa: F401  torch's exporter writes with onnx and onnxscript
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs the onnx extra (pip install 'twinfold[onnx]'): {e}") from None
    encoder = float32_module(model.encoder)  # ONNX Runtime's CPU kernels are float32: half weights are upcast
    sample = model.padder.padded()(model.token_ids(["an example", "a longer example text"]))  # batch 2: not specialised
    names = list(sample)
    axes = {0: torch.export.Dim("batch_size"), 1: torch.export.Dim("sequence_length")}
    external = sum(p.numel() * p.element_size() for p in encoder.parameters()) >= ONNX_SIZE_LIMIT
    out = Path(folder) / ONNX_DIR
    out.mkdir(exist_ok=True)
    path = out / ONNX_FILES["onnx"]
    was_training = encoder.training
    encoder.eval()
    try:
        with warnings.catch_warnings(), _quiet("torch.onnx", "onnxscript", "onnx_ir"):
            warnings.simplefilter("ignore")
            torch.onnx.export(LastHiddenState(encoder), (), str(path),
                              kwargs={k: v.to(model.device) for k, v in sample.items()},
                              input_names=names, output_names=["last_hidden_state"],
                              dynamic_shapes={name: axes for name in names}, opset_version=OPSET, dynamo=True,
                              external_data=external, verbose=False)
    finally:
        encoder.train(was_training)
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _quiet("root"):  # it advises pre-processing through the root logger
            quantize_dynamic(path, out / ONNX_FILES["onnx-int8"], per_channel=True, reduce_range=False,
                             weight_type=QuantType.QInt8, use_external_data_format=external)


class OnnxEncoder(nn.Module):
    """An ONNX Runtime session (CPU) standing in for the Hugging Face encoder inside a `BiEncoder`."""

    def __init__(self, path: str | Path, config):
        super().__init__()
        try:
            import onnxruntime
        except ImportError as e:
            message = f"ONNX Runtime compute needs the onnx extra (pip install 'twinfold[onnx]'): {e}"
            raise ImportError(message) from None

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the process's share of the cores (models.runtime)
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.config = config

    def forward(self, **inputs: torch.Tensor):
        from transformers.modeling_outputs import BaseModelOutput

        (hidden,) = self.session.run(["last_hidden_state"], {k: inputs[k].cpu().numpy() for k in self.input_names})
        return BaseModelOutput(last_hidden_state=torch.from_numpy(hidden))


def onnx_encoder(model, compute: str, source: Path | None) -> OnnxEncoder:
    """`model`'s encoder in ONNX Runtime for `compute` ("onnx" or "onnx-int8"): the file in `source` (the folder
    the weights were loaded from, None once they changed) when it has one, else an export of the current weights."""
    name = ONNX_FILES[compute]
    if source is not None and (source / ONNX_DIR / name).exists():
        return OnnxEncoder(source / ONNX_DIR / name, model.encoder.config)
    logging.getLogger(__name__).info("exporting the encoder to ONNX for compute=%r", compute)
    with tempfile.TemporaryDirectory() as tmp:  # the session holds the whole graph once created
        export_onnx(model, tmp, int8=compute == "onnx-int8")
        return OnnxEncoder(Path(tmp) / ONNX_DIR / name, model.encoder.config)


class _quiet:
    """Raise the named loggers to ERROR for a block (the exporters log every step at INFO/WARNING)."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(None if n == "root" else n) for n in names]

    def __enter__(self):
        self.levels = [log.level for log in self.loggers]
        for log in self.loggers:
            log.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for log, level in zip(self.loggers, self.levels):
            log.setLevel(level)
