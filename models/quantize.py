"""Quantisation: of embeddings (conventions of sentence-transformers' `quantize_embeddings`), and of the
encoder's linear layers for int8 inference on CPU."""
import copy
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

PRECISIONS = ("float32", "int8", "binary")
COMPUTES = ("float32", "bf16", "int8", "onnx", "onnx-int8")  # how the encoder computes (BiEncoder.encode)
COMPUTE_HELP = ("bf16: autocast (GPUs, CPUs with bf16 units); int8: int8 linear layers (CPU); onnx, onnx-int8: "
                "ONNX Runtime, float32 or int8 (CPU; the model folder's onnx/ files, see models.export --onnx)")


MIN_CALIBRATION_ROWS = 2  # the fewest embeddings whose per-dimension range can give every dimension a step


@dataclass
class Int8Calibration:
    """Per-dimension ranges: value v maps to clip(floor((v - start) / step), 0, 255) - 128.

    A dimension whose calibration values were all equal has step 0: every value maps back to its start (right
    for a dimension the model keeps constant). At least one dimension must have a range, else every embedding
    quantised with it would be alike.
    """

    starts: np.ndarray
    steps: np.ndarray

    def __post_init__(self):
        steps = np.asarray(self.steps)
        if not np.all(np.isfinite(steps) & (steps >= 0)) or not np.any(steps > 0):
            raise ValueError("int8 calibration: no dimension has a range (every step is 0 or invalid), so every "
                             "embedding quantised with it would be alike: it was computed from one embedding (or "
                             "identical ones); encode it again from more documents")


def calibrate_int8(embeddings: np.ndarray, sample_size: int | None = None, seed: int = 0) -> Int8Calibration:
    """Per-dimension min/max over `embeddings` (or a random sample of `sample_size` rows); ValueError for fewer
    than `MIN_CALIBRATION_ROWS` rows, or rows that are all alike."""
    if len(embeddings) < MIN_CALIBRATION_ROWS:
        raise ValueError(f"int8 calibration needs at least {MIN_CALIBRATION_ROWS} embeddings (per-dimension "
                         f"ranges), got {len(embeddings)}; encode more documents or use float32")
    if sample_size is not None and sample_size < len(embeddings):
        rows = np.random.default_rng(seed).choice(len(embeddings), sample_size, replace=False)
        embeddings = embeddings[rows]
    lo, hi = embeddings.min(0), embeddings.max(0)
    return Int8Calibration(starts=lo.astype(np.float32), steps=((hi - lo) / 255).astype(np.float32))


def quantize_int8(embeddings: np.ndarray, calibration: Int8Calibration) -> np.ndarray:
    """float32 [n, d] -> int8 [n, d]; values outside the calibrated range are clipped."""
    steps = np.where(calibration.steps > 0, calibration.steps, 1.0)
    buckets = np.clip(np.floor((embeddings - calibration.starts) / steps), 0, 255)
    return (buckets - 128).astype(np.int8)


def dequantize_int8(q: np.ndarray, calibration: Int8Calibration) -> np.ndarray:
    """int8 back to the centre of its bucket: within half a step of the original inside the calibrated range."""
    return ((q.astype(np.float32) + 128.5) * calibration.steps + calibration.starts).astype(np.float32)


def quantize_binary(embeddings: np.ndarray) -> np.ndarray:
    """float32 [n, d] -> uint8 [n, ceil(d/8)]: bit = (value > 0), packed big-endian per byte."""
    return np.packbits(embeddings > 0, axis=-1)


def unpack_binary(packed: np.ndarray, dim: int) -> np.ndarray:
    """uint8 [n, ceil(d/8)] -> float32 [n, d] of +1/-1."""
    bits = np.unpackbits(packed, axis=-1)[..., :dim]
    return bits.astype(np.float32) * 2 - 1


def bytes_per_vector(dim: int, precision: str) -> int:
    """Storage of one embedding."""
    return {"float32": 4 * dim, "int8": dim, "binary": (dim + 7) // 8}[precision]


def format_megabytes(mb: float) -> str:
    """A storage size given in MB (10^6 bytes) as the reports print it: "1.54 GB", "384 MB", "8.0 MB"."""
    return f"{mb / 1000:.2f} GB" if mb >= 1000 else f"{mb:.0f} MB" if mb >= 10 else f"{mb:.1f} MB"


def float32_module(module: nn.Module) -> nn.Module:
    """`module` itself when its weights are float32, else a float32 copy (int8 and ONNX compute in float32)."""
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    return copy.deepcopy(module).float()


def int8_linear_copy(encoder: nn.Module) -> nn.Module:
    """A CPU inference copy of `encoder` whose linear layers run in int8 (PyTorch dynamic quantisation).

    Weights are quantised once per output channel; each batch's activations are quantised on the fly with
    their own range. Attention, norms and activations stay float32 (half-precision weights are upcast first). The
    speed-up needs int8 dot-product instructions (AVX-512 VNNI / AMX, ARM dot-product); without them it is about none.
    """
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as e:  # removed from some future torch
        raise RuntimeError(f"int8 compute needs torch.ao.quantization, which this torch {torch.__version__} "
                           f"lacks: {e}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        return quantize_dynamic(copy.deepcopy(encoder).cpu().float().eval(), {nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)
