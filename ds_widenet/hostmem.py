"""Host memory: keep the heap a training step frees for the next step (glibc's malloc settings).

Why: glibc's malloc gives the top of its heap back to the kernel whenever more than M_TRIM_THRESHOLD
bytes are free there, and serves requests above M_MMAP_THRESHOLD with fresh mappings; both thresholds
move at run time. A training step allocates and frees the same activations every step, so whatever is
given back is faulted in again, page by page, at the next step. Measured on the CPU (1 thread,
batch 64, `bench/moe_overhead.py`): WideNet's digits step took ~2,000 minor page faults a step (8 MB
zeroed again, ~5 ms of system time in a ~140 ms step), the dense ViT of equal FLOPs one; with the
thresholds fixed, both take one. PyTorch's CPU performance guides reach the same by preloading
jemalloc or tcmalloc; `mallopt` needs no other library and no launcher change.

The trainer calls `retain_freed_memory()` at start (`train.retain_host_memory`, on by default); the
benchmarks call it too, so that they time what the trainer runs. Elsewhere than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Optional

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

TRIM_BYTES = 256 << 20  # free heap kept at the top before any is returned (a step's activations fit)
MMAP_BYTES = 32 << 20  # requests above this are mapped (and unmapped on free): glibc's dynamic ceiling


@functools.lru_cache(maxsize=None)
def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def retain_freed_memory(trim_bytes: int = TRIM_BYTES, mmap_bytes: int = MMAP_BYTES) -> bool:
    """Fix glibc's trim and mmap thresholds for this process (its threads and forked workers), so freed
    tensors up to `mmap_bytes` stay in the heap and up to `trim_bytes` of free heap is kept. Returns
    whether both settings took (False off glibc)."""
    libc = _libc()
    if libc is None:
        return False
    # mmap first: fixing one threshold turns off the dynamic adjustment of both
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_bytes))) and bool(libc.mallopt(_M_TRIM_THRESHOLD, int(trim_bytes)))
