"""What the benchmarks share: child processes, peak memory, the machine's matmul rate, transformer FLOPs.

Every measured configuration runs in its own child process, so that peak memory and process-wide settings
(threads, malloc) belong to it alone; the parent alternates twinfold and sentence-transformers children.
"""
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TWINFOLD_DATA", REPO.parent / "shared" / "data"))
GB = 1024 ** 3


def run_child(script: str, args: list[str]) -> dict:
    """Run `script --child ...` (twinfold as installed); return the JSON on its last stdout line."""
    result = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_rss() -> None:
    """Start this process's peak RSS (`peak_rss_since_reset`) again from its current RSS (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_since_reset() -> int:
    """Peak RSS since `reset_peak_rss` (the kernel's high-water mark, VmHWM)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def matmul_rate(device: str = "cpu", dtype: str = "float32", repeats: int = 5) -> float:
    """The best `torch.mm` rate in FLOP/s on square matrices (2048 on a CPU, 8192 on a GPU) in `dtype`."""
    import torch

    n = 8192 if device == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def peak_memory(device: str) -> int:
    """Peak bytes: allocated GPU memory on a GPU, the process's peak RSS on the CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated()
    return peak_rss()


def encoder_flops(texts: list[str], max_length: int, training: bool,
                  model: str = "sentence-transformers/all-MiniLM-L6-v2") -> tuple[float, list[int]]:
    """Matmul FLOPs of a BERT-style `model` over `texts` (unpadded, truncated at `max_length`), and their lengths.

    Per token and layer, the forward multiplies by the Q, K, V, output and two feed-forward matrices
    (2 * (4 d^2 + 2 d f)) and attends over its sequence (QK^T and AV: 4 n d). Training is forward + backward,
    three times the forward. Padding, embeddings, norms and activations are not counted: this is the work any
    implementation has to do, so FLOPs over seconds compares with the machine's matmul rate.
    """
    from transformers import AutoConfig, AutoTokenizer

    from twinfold.models import resolve_model_path

    path = resolve_model_path(model)
    tokenizer, config = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    lengths = [min(len(ids), max_length) for ids in tokenizer(texts, verbose=False)["input_ids"]]
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    forward = sum(n * layers * (2 * (4 * d * d + 2 * d * f) + 4 * n * d) for n in lengths)
    return (3 * forward if training else forward), lengths


def machine() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    return (f"{gpu}{cpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def rate_cells(items: int, seconds: list[float], peaks: list[int], flops: float, matmul: float,
               reference: float) -> str:
    """Table cells of one side: median items/s over its rounds, their range, median peak memory (GB), the ratio
    to `reference` items/s, and the share of the `matmul` rate (FLOP/s) that `flops` per round reaches."""
    per_round = [items / s for s in seconds]
    speed = median(per_round)
    return (f"{speed:.2f} | {min(per_round):.2f}-{max(per_round):.2f} | {median(peaks) / GB:.2f} "
            f"| {speed / reference:.2f}x | {flops / median(seconds) / matmul:.0%}")


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
