"""hostmem.retain_freed_memory: freed tensors stay in the heap (no page faults re-growing it), in a
fresh process each (malloc's settings are per process and cannot be reset)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ds_widenet import hostmem

CHILD = """
import mmap, resource, sys, torch
from ds_widenet import hostmem
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults()  # does this kernel count minor faults? touch 16 MiB of fresh pages
page = mmap.mmap(-1, 16 << 20)
for i in range(0, 16 << 20, 4096):
    page[i] = 1
counted = faults() - before
mode = sys.argv[1]
if mode == "retain":
    ok = hostmem.retain_freed_memory()
else:  # the control: the same call with thresholds that give every freed activation back
    ok = hostmem.retain_freed_memory(trim_bytes=128 << 10, mmap_bytes=1 << 20)
def step():  # a step's activations: 32 tensors of 2 MiB alive together, then all freed
    saved = [torch.ones(2 << 18) for _ in range(32)]
    del saved
for _ in range(5):  # warm-up: the heap settles
    step()
before = faults()
for _ in range(10):
    step()
print(ok, counted, faults() - before)
"""


def child_faults(mode: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    ok, counted, faults = out.stdout.split()
    return ok, int(counted), int(faults)


@pytest.mark.skipif(hostmem._libc() is None, reason="not glibc: retain_freed_memory does nothing")
def test_retained_memory_is_reused_without_page_faults():
    ok, counted, retained = child_faults("retain")
    ok_control, _, given_back = child_faults("give_back")
    assert ok == ok_control == "True"
    if counted < 4096 - 64:  # 16 MiB of fresh pages touched is 4,096 faults wherever the kernel counts them
        pytest.skip(f"this kernel does not count minor page faults (getrusage saw {counted} for 4,096 pages)")
    # 10 steps x 64 MiB = 163,840 pages. glibc's own defaults adapt to the heap's layout (whether a step's
    # freed top is given back depends on what else lies above it), so the control fixes thresholds that
    # give everything back: every step faults it all in again. Retained, the steps reuse the heap.
    assert given_back > 100_000 and retained < 1_000, (given_back, retained)
