"""Process-wide CPU settings for fast PyTorch training and inference."""
import ctypes
import logging
import os
from contextlib import AbstractContextManager, nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger("twinfold")
_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2 ** 20  # the largest glibc accepts on 64-bit


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process for reuse. Returns whether it was applied.

    PyTorch frees and re-allocates the same activation buffers at every step. By default glibc returns
    freed blocks to the OS (blocks it served with `mmap`, and the top of the heap beyond a threshold), so
    every step page-faults much of its activations in again: on a 2-core CPU, 13% of a training step was
    system time. Here blocks up to 32 MB come from the heap and the heap is never trimmed, so they are
    reused; larger blocks still come from `mmap`. The process keeps its peak heap until exit. Applies to the
    whole process; skipped off glibc or when TWINFOLD_MALLOC_TUNING=0.
    """
    if os.environ.get("TWINFOLD_MALLOC_TUNING", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    applied = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    if not applied:
        log.debug("mallopt refused the allocator settings; keeping glibc's defaults")
    return applied


def share_cpu_cores() -> int:
    """Give this process its share of the cores among the machine's processes (`LOCAL_WORLD_SIZE`, set by
    `accelerate launch`, which pins each process to one thread otherwise); `TWINFOLD_NUM_THREADS` overrides.
    Returns the number of threads."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = int(os.environ.get("TWINFOLD_NUM_THREADS", max(1, len(os.sched_getaffinity(0)) // local_processes)))
    torch.set_num_threads(threads)
    return threads


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix units (AVX512_BF16 or AMX_BF16); without them bf16 runs far slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def loader_settings(device: torch.device) -> dict:
    """How a device is fed: background tokenization/padding workers and pinned memory on GPUs, inline on CPUs
    (their cores are busy computing). `TWINFOLD_NUM_WORKERS` overrides the number of workers."""
    gpu = device.type == "cuda"
    workers = int(os.environ.get("TWINFOLD_NUM_WORKERS", min(4, len(os.sched_getaffinity(0)) // 2) if gpu else 0))
    return {"num_workers": workers, "pin_memory": gpu, **({"prefetch_factor": 4, "persistent_workers": True}
                                                          if workers else {})}


def default_token_budget(device: torch.device) -> int:
    """Padded tokens per forward. On a GPU one large forward beats many small ones (each is launch-bound): 64k tokens
    take a whole batch of 256 texts of 256 tokens at once. On a CPU, chunks of about 2k padded tokens keep padding
    low at the same matmul efficiency (measured with scripts/bench_train.py)."""
    return 65536 if device.type == "cuda" else 2048


def pad_multiple(device: torch.device) -> int:
    """Padded widths are rounded up to a multiple of this. On a GPU, 16: attention kernels plan per input shape
    (on an H200, cuDNN's attention spent about 4 ms of CPU per call on a shape it had not seen, 0.08 ms on one it
    had), and token-budget chunks of free widths bring new shapes at every step; multiples of 16 keep them few.
    On a CPU, 1: there a shape costs nothing, and padding costs compute."""
    return 16 if device.type == "cuda" else 1


def attention_kernels(device: torch.device) -> AbstractContextManager:
    """Where the model's forward runs: on a GPU, PyTorch's attention kernels other than cuDNN's (flash,
    memory-efficient, math). cuDNN's attention builds a plan for every input shape it has not seen, milliseconds
    of CPU each, and length-sorted chunks bring new shapes at every step; the others are compiled ahead.
    `TWINFOLD_SDPA_CUDNN=1` allows cuDNN again. Elsewhere, PyTorch's choice."""
    if device.type != "cuda" or os.environ.get("TWINFOLD_SDPA_CUDNN") == "1":
        return nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
