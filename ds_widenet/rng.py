"""Counter-based ("keyed") randomness: every random number is a pure function of its key.

Why not torch.Generator: a rank's generator state depends on how many samples that rank has
drawn before, so router noise, dropout masks and mixup would change with the world size and with
activation-checkpoint recomputation. Here a draw is hash(seed, step, depth, site, sample, element):
the same token at the same step gets the same noise on 1 rank or 64, and on recompute. No
library offers this for PyTorch tensors (torch's Philox is not exposed per element), so it is a
small integer hash (lowbias32 by C. Wellons) evaluated elementwise in int64.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

_M32 = 0xFFFFFFFF
Key = Union[int, torch.Tensor]


def _mix(x: torch.Tensor) -> torch.Tensor:
    # lowbias32 on the low 32 bits of int64 values; int64 products wrap, low 32 bits stay exact.
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return x


def hash_keys(keys: Sequence[Key], shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Hash a sequence of keys (ints or tensors broadcastable to `shape`) and the element index
    along the trailing dims into uint32 values stored in int64, shaped `shape`."""
    h = torch.full(tuple(shape), 0x9E3779B9, dtype=torch.int64, device=device)
    for k in keys:
        if isinstance(k, torch.Tensor):
            k = k.to(device=device, dtype=torch.int64)
        h = _mix(h ^ (k & _M32 if isinstance(k, torch.Tensor) else (int(k) & _M32)))
        # keys wider than 32 bits: fold the high part in as another round
        if isinstance(k, torch.Tensor):
            h = _mix(h ^ ((k >> 32) & _M32))
        elif int(k) >> 32:
            h = _mix(h ^ ((int(k) >> 32) & _M32))
    return h


def _element_index(shape: Sequence[int], n_trailing: int, device: torch.device | str) -> torch.Tensor:
    trailing = tuple(shape[len(shape) - n_trailing:]) if n_trailing else ()
    numel = math.prod(trailing) if trailing else 1
    idx = torch.arange(numel, dtype=torch.int64, device=device).reshape(trailing) if trailing else torch.zeros((), dtype=torch.int64, device=device)
    return idx.expand(tuple(shape))


def keyed_uniform(keys: Sequence[Key], shape: Sequence[int], n_trailing: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform(0,1) in float32, open interval. The last `n_trailing` dims are enumerated as
    element indices; leading dims must be covered by tensor keys (e.g. a per-sample id [B, 1])."""
    h = hash_keys([*keys, _element_index(shape, n_trailing, device)], shape, device)
    return (h.to(torch.float64) + 0.5).div_(2.0 ** 32).to(torch.float32)


def keyed_normal(keys: Sequence[Key], shape: Sequence[int], n_trailing: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal (Box-Muller over two independent keyed uniforms)."""
    u1 = keyed_uniform([*keys, 0x51ED270B], shape, n_trailing, device)
    u2 = keyed_uniform([*keys, 0x2545F491], shape, n_trailing, device)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def keyed_dropout(x: torch.Tensor, p: float, keys: Sequence[Key], sample_ids: torch.Tensor,
                  training: bool) -> torch.Tensor:
    """Inverted dropout whose mask depends only on (keys, global sample id, element index).
    `x` is [B, ...]; `sample_ids` is [B]."""
    if not training or p <= 0.0:
        return x
    shape = x.shape
    ids = sample_ids.reshape(-1, *([1] * (x.dim() - 1)))
    keep = keyed_uniform([*keys, ids], shape, x.dim() - 1, x.device) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


# Sites: fixed small integers so that keys from different uses never collide.
SITE_ROUTER = 1
SITE_ATTN_DROP = 2
SITE_PROJ_DROP = 3
SITE_FFN_DROP = 4
SITE_EMBED_DROP = 5
SITE_MIXUP = 6
SITE_AUGMENT = 7
