"""hostmem.retain_freed_memory: freed tensors stay in the heap (no page faults re-growing it), in a
fresh process each (malloc's settings are per process and cannot be reset)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ds_widenet import hostmem

CHILD = """
import resource, sys, torch
from ds_widenet import hostmem
ok = hostmem.retain_freed_memory() if sys.argv[1] == "retain" else None
def step():  # a step's activations: 32 tensors of 2 MiB alive together, then all freed
    saved = [torch.ones(2 << 18) for _ in range(32)]
    del saved
for _ in range(5):  # warm-up: the heap and glibc's adaptive thresholds settle
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def child_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    ok, faults = out.stdout.split()
    return ok, int(faults)


@pytest.mark.skipif(hostmem._libc() is None, reason="not glibc: retain_freed_memory does nothing")
def test_retained_memory_is_reused_without_page_faults():
    ok, retained = child_faults("retain")
    _, default = child_faults("default")
    assert ok == "True"
    # 10 steps x 64 MiB = 163,840 pages. glibc's defaults give the freed top of the heap back (its
    # trim threshold adapts to 2x the largest freed mapping, 4 MiB here): every step faults it all in
    # again. Retained, the steps reuse the heap.
    assert default > 100_000 and retained < 1_000, (default, retained)
