import subprocess
import sys

# Allocate and free a 64 MiB tensor, then allocate it again: count the page faults of the second allocation.
PROBE = """
import os, resource, sys, torch
from models.runtime import keep_freed_memory
applied = keep_freed_memory()
x = torch.ones(16 * 2**20); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
y = torch.ones(16 * 2**20)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(tuning: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={"TWINFOLD_MALLOC_TUNING": tuning, "PATH": "", "PYTHONPATH": ":".join(sys.path)})
    applied, faults = out.stdout.split()
    return applied, int(faults)


def test_freed_memory_is_reused_without_page_faults():
    applied, faults = probe("1")
    assert applied == "True" and faults < 1000  # 64 MiB is 16384 pages of 4 KiB


def test_default_allocator_faults_every_page_in_again_and_the_tuning_can_be_switched_off():
    applied, faults = probe("0")
    assert applied == "False" and faults >= 16384
