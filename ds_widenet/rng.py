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
    x ^= x >> 16
    x.mul_(0x7FEB352D).bitwise_and_(_M32)
    x ^= x >> 15
    x.mul_(0x846CA68B).bitwise_and_(_M32)
    x ^= x >> 16
    return x


def _mix_int(x: int) -> int:
    """_mix on a Python int (the same low 32 bits: Python's products do not wrap, the mask cuts)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


_State = Union[int, torch.Tensor]


def _fold(keys: Sequence[Key], h: _State, device: torch.device | str) -> _State:
    """Mix `keys` into `h` in order. The hash is elementwise, so it is computed on the broadcast
    shape of the keys seen so far (a Python int while they are all ints): the same values as over
    the full output shape, with the full-size work only for the keys that vary over all of it."""
    for k in keys:
        if isinstance(k, torch.Tensor):
            k = k.to(device=device, dtype=torch.int64)
            h = _mix((k & _M32) ^ h)
            h = _mix(h ^ ((k >> 32) & _M32))  # keys wider than 32 bits: the high part is another round
        else:
            k = int(k)
            h = _mix_int(h ^ (k & _M32)) if isinstance(h, int) else _mix(h ^ (k & _M32))
            if k >> 32:
                h = _mix_int(h ^ ((k >> 32) & _M32)) if isinstance(h, int) else _mix(h ^ ((k >> 32) & _M32))
    return h


def _expand(h: _State, shape: Sequence[int], device: torch.device | str) -> torch.Tensor:
    if isinstance(h, int):
        return torch.full(tuple(shape), h, dtype=torch.int64, device=device)
    return h.expand(tuple(shape)).contiguous()


def hash_keys(keys: Sequence[Key], shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Hash a sequence of keys (ints or tensors broadcastable to `shape`) and the element index
    along the trailing dims into uint32 values stored in int64, shaped `shape`."""
    return _expand(_fold(keys, 0x9E3779B9, device), shape, device)


def hash_keys_full_shape(keys: Sequence[Key], shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """The definition hash_keys computes faster: every key mixed into a state of the full output
    shape. Kept as the reference for tests/test_rng.py and bench/keyed_rng.py."""
    h = torch.full(tuple(shape), 0x9E3779B9, dtype=torch.int64, device=device)
    for k in keys:
        if isinstance(k, torch.Tensor):
            k = k.to(device=device, dtype=torch.int64)
            h = _mix(h ^ (k & _M32))
            h = _mix(h ^ ((k >> 32) & _M32))
        else:
            h = _mix(h ^ (int(k) & _M32))
            if int(k) >> 32:
                h = _mix(h ^ ((int(k) >> 32) & _M32))
    return h


def keyed_normal_full_shape(keys: Sequence[Key], shape: Sequence[int], n_trailing: int,
                            device: torch.device | str = "cpu") -> torch.Tensor:
    """keyed_normal by the definition (hash_keys_full_shape); the reference for tests and bench."""
    idx = _element_index(shape, n_trailing, device).expand(tuple(shape))
    u = [_unit(hash_keys_full_shape([*keys, salt, idx], shape, device)) for salt in (0x51ED270B, 0x2545F491)]
    return torch.sqrt(-2.0 * torch.log(u[0])) * torch.cos(2.0 * math.pi * u[1])


def _element_index(shape: Sequence[int], n_trailing: int, device: torch.device | str) -> torch.Tensor:
    """Element numbers over the last `n_trailing` dims, shaped to broadcast against `shape`."""
    trailing = tuple(shape[len(shape) - n_trailing:]) if n_trailing else ()
    numel = math.prod(trailing) if trailing else 1
    return torch.arange(numel, dtype=torch.int64, device=device).reshape(trailing) if trailing \
        else torch.zeros((), dtype=torch.int64, device=device)


# The largest float32 below 1.0 (1 - 2**-24): where keyed_uniform's values stop.
BELOW_ONE = 1.0 - 2.0 ** -24


def _unit(h: torch.Tensor) -> torch.Tensor:
    """uint32 hashes -> float32 (h + 0.5) / 2**32 (exact in float64, then rounded to nearest): in
    [2**-33, 1.0]. The 128 hashes h >= 2**32 - 128 round up to exactly 1.0."""
    return (h.to(torch.float64) + 0.5).div_(2.0 ** 32).to(torch.float32)


def _uniform(h: _State, shape: Sequence[int], n_trailing: int, device: torch.device | str) -> torch.Tensor:
    """_unit of the hashes of the element indices folded into `h`: the Box-Muller inputs, in (0, 1]."""
    return _unit(_expand(_fold([_element_index(shape, n_trailing, device)], h, device), shape, device))


def keyed_uniform(keys: Sequence[Key], shape: Sequence[int], n_trailing: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform on the open interval (0, 1) in float32: every value is in [2**-33, BELOW_ONE].
    The last `n_trailing` dims are enumerated as element indices; leading dims must be covered by
    tensor keys (e.g. a per-sample id [B, 1]).

    A value is (h + 0.5) / 2**32 rounded to float32, except that the 128 hashes that round to 1.0
    (h >= 2**32 - 128, one draw in 3.4e7) give BELOW_ONE instead: 1.0 would be an infinite Gamma
    variate in mixup's Beta draw (a NaN lambda). Every other value is the one earlier runs drew."""
    return _uniform(_fold(keys, 0x9E3779B9, device), shape, n_trailing, device).clamp_max_(BELOW_ONE)


def keyed_normal(keys: Sequence[Key], shape: Sequence[int], n_trailing: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal (Box-Muller over two independent keyed uniforms).

    The uniforms are those of keyed_uniform before its cap below 1.0, so they lie in (0, 1]:
    Box-Muller is finite on all of it (u1 = 1.0 gives 0), and keeping 1.0 keeps the router noise
    bit for bit the noise earlier runs were trained with."""
    prefix = _fold(keys, 0x9E3779B9, device)  # shared by both uniforms: they differ from the salt on
    u1 = _uniform(_fold([0x51ED270B], prefix, device), shape, n_trailing, device)
    u2 = _uniform(_fold([0x2545F491], prefix, device), shape, n_trailing, device)
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
