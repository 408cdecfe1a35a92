import json
import subprocess
import sys

# Where blocks of 16 and 40 MiB come from (the [heap] or a separate mmap), and whether freeing the 16 MiB
# block shrinks the heap.
PROBE = """
import json, torch
from twinfold.models.runtime import keep_freed_memory

def heap():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            return start, end

applied = keep_freed_memory()
small = torch.ones(4 * 2**20)
big = torch.ones(10 * 2**20)
start, end = heap()
in_heap = {name: start <= t.data_ptr() < end for name, t in (("16MiB", small), ("40MiB", big))}
del small
print(json.dumps({"applied": applied, "in_heap": in_heap, "heap_kept": heap()[1] == end}))
"""


def probe(tuning: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={"TWINFOLD_MALLOC_TUNING": tuning, "PATH": "", "PYTHONPATH": ":".join(sys.path)})
    return json.loads(out.stdout)


def test_blocks_up_to_32_mib_come_from_a_heap_that_is_never_trimmed():
    result = probe("1")
    assert result == {"applied": True, "in_heap": {"16MiB": True, "40MiB": False}, "heap_kept": True}


def test_by_default_glibc_maps_large_blocks_separately_and_the_setting_can_be_switched_off():
    result = probe("0")
    assert result["applied"] is False and result["in_heap"] == {"16MiB": False, "40MiB": False}


def test_attention_kernels_leave_out_cudnn_on_gpus_only(monkeypatch):
    import torch

    from twinfold.models.runtime import attention_kernels

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with attention_kernels(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before  # restored
    with attention_kernels(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
    monkeypatch.setenv("TWINFOLD_SDPA_CUDNN", "1")
    with attention_kernels(torch.device("cuda")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
