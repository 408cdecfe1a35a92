"""Process-wide CPU settings for fast PyTorch training and inference."""
import ctypes
import logging
import os

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
