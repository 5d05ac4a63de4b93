"""Counter-based ("keyed") randomness: every random number is a pure function of its key.

Why not torch.Generator: a rank's generator state depends on how many samples that rank has
drawn before, so router noise, dropout masks and mixup would change with the world size and with
activation-checkpoint recomputation. Here a draw is hash(seed, step, depth, site, sample, element):
the same token at the same step gets the same noise on 1 rank or 64, and on recompute. No
library offers this for PyTorch tensors (torch's Philox is not exposed per element), so it is a
small integer hash (lowbias32 by C. Wellons). Its definition is evaluated elementwise in int64
(the `*_full_shape` functions); the fast paths fold scalar keys in Python, run the element-index
rounds in int32 (the same low 32 bits), and decide dropout by an integer threshold on the hash that
is exactly `keyed_uniform >= p`, so every value is bit for bit the definition's.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Union

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
    if torch.compiler.is_compiling():
        return _fold_traced(keys, h, device)
    return _fold_eager(keys, h, device)


def _fold_eager(keys: Sequence[Key], h: _State, device: torch.device | str) -> _State:
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


@torch.library.custom_op("ds_widenet::keyed_fold", mutates_args=())
def _fold_op(state: torch.Tensor, tensors: list[torch.Tensor], ints: list[int], is_tensor: list[bool]) -> torch.Tensor:
    """_fold as one opaque op for torch.compile: the eager code on the real key values. The keys are
    `tensors` and `ints` in `is_tensor`'s order; `state` is the running hash (int64)."""
    ts, js = iter(tensors), iter(ints)
    out = _fold_eager([next(ts) if t else next(js) for t in is_tensor], state, state.device)
    return out.clone() if out is state else out  # a custom op may not return an input


@_fold_op.register_fake
def _(state: torch.Tensor, tensors: list[torch.Tensor], ints: list[int], is_tensor: list[bool]) -> torch.Tensor:
    return state.new_empty(torch.broadcast_shapes(state.shape, *(t.shape for t in tensors)))


def _fold_traced(keys: Sequence[Key], h: _State, device: torch.device | str) -> torch.Tensor:
    """_fold under torch.compile, through _fold_op. Traced inline, the folds would be chains of
    `x ^ (x >> s)`, which inductor re-expands at every use: 2**rounds work, a minute to compile the
    sample-id rounds, and more than 10 minutes (printing sympy) once dynamo makes an int key such
    as the step, which changes every call, a symbol. Opaque, a fold is one small kernel over the
    keys' broadcast shape ([B, 1, 1] at most), and only the element rounds are traced and fused."""
    state = h if isinstance(h, torch.Tensor) else torch.full((), h, dtype=torch.int64, device=device)
    tensors = [k.to(device=device, dtype=torch.int64) for k in keys if isinstance(k, torch.Tensor)]
    return _fold_op(state, tensors, [k for k in keys if not isinstance(k, torch.Tensor)],
                    [isinstance(k, torch.Tensor) for k in keys])


def _expand(h: _State, shape: Sequence[int], device: torch.device | str) -> torch.Tensor:
    if isinstance(h, int):
        return torch.full(tuple(shape), h, dtype=torch.int64, device=device)
    return h.expand(tuple(shape)).contiguous()


# ---------------------------------------------------------------------------------------------
# The fast path: the element-index rounds in int32.
#
# lowbias32 is ^, * and logical >> on 32-bit words. torch's int32 multiply wraps (two's complement),
# so its bits are the low 32 bits of the int64 product the definition masks; >> on int32 is
# arithmetic, so a logical shift is (x >> s) & (2**(32 - s) - 1). Element indices are below 2**31:
# their high word is 0, and the definition's second round for them is _mix(h ^ 0) = _mix(h).
# Half the bytes of int64 per pass; and in eager on the CPU the rounds run block by block on
# buffers that stay in L2, instead of one pass over the whole tensor (in memory) per op. On other
# devices a block is the whole tensor: one launch per op.

_C1 = 0x7FEB352D  # lowbias32's multipliers as int32 (the second is above 2**31)
_C2 = 0x846CA68B - (1 << 32)
_SIGN = -(1 << 31)  # x ^ _SIGN maps the uint32 order of the bits onto int32 order
_ONE_F32 = 0x3F800000  # the bits of float32 1.0
_BLOCK = 1 << 16  # elements per eager CPU block: its int32 and float buffers (256 KiB each) stay in L2


class _Ints:
    """The int32 constants of the in-place rounds. On the CPU they are 0-dim int32 tensors, made
    once: an op given a Python int wraps it in a new tensor each call (~7 us of the ~20 us a 64K
    block op takes here). Elsewhere Python ints (one launch per op, so nothing to save)."""

    def __init__(self, tensors: bool) -> None:
        v = (lambda i: torch.tensor(i, dtype=torch.int32)) if tensors else (lambda i: i)
        self.s15, self.s16, self.s31 = v(15), v(16), v(31)
        self.m16, self.m17, self.c1, self.c2, self.one_f32 = v(0xFFFF), v(0x1FFFF), v(_C1), v(_C2), v(_ONE_F32)
        self.tensors = tensors

    def int32(self, i: int) -> Union[int, torch.Tensor]:
        return torch.tensor(i, dtype=torch.int32) if self.tensors else i


_CPU_INTS = _Ints(True)
_PY_INTS = _Ints(False)


def _ints(device: torch.device) -> _Ints:
    return _CPU_INTS if device.type == "cpu" else _PY_INTS


def _i32(v: int) -> int:
    """A uint32 as the int32 with the same bits."""
    v &= _M32
    return v - (1 << 32) if v >> 31 else v


def _to_i32(h: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> int32 with the same bits (no reliance on narrowing casts)."""
    return torch.where(h >= (1 << 31), h - (1 << 32), h).to(torch.int32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """_mix on int32 words, out of place: the form torch.compile fuses into one loop."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _C1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _C2
    return x ^ ((x >> 16) & 0xFFFF)


def _mix32_(x: torch.Tensor, tmp: torch.Tensor, k: Optional[_Ints] = None) -> torch.Tensor:
    """_mix32 in place; `tmp` is scratch of x's shape."""
    k = k or _ints(x.device)
    for shift, mask, mul in ((k.s16, k.m16, k.c1), (k.s15, k.m17, k.c2), (k.s16, k.m16, None)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        tmp.bitwise_and_(mask)
        x.bitwise_xor_(tmp)
        if mul is not None:
            x.mul_(mul)
    return x


def _keep_sign_(bits: torch.Tensor, t_minus_1: Union[int, torch.Tensor], low: bool,
                out: torch.Tensor) -> torch.Tensor:
    """Into `out`: a word whose sign bit is set exactly where the uint32 `bits` are >= t
    (0 <= t < 2**32; `t_minus_1` is _i32(t - 1), `low` is t < 2**31), in 2 int32 ops; `bits` is
    left as it is. With s the int32 view of the bits: for t < 2**31, u >= t iff s < 0 or s - t >= 0
    (no overflow where s >= 0): the sign of s | ~(s - t); for t >= 2**31 (t' = t - 2**32 < 0), iff
    s < 0 and s - t' >= 0 (no overflow where s < 0): the sign of s & ~(s - t'). ~(s - t) is
    (t - 1) - s, in wrapping int32 either way."""
    torch.sub(t_minus_1, bits, out=out)
    return out.bitwise_or_(bits) if low else out.bitwise_and_(bits)


def _rows(h: _State, shape: Sequence[int], n_trailing: int,
          device: torch.device | str) -> Optional[tuple[torch.Tensor, int]]:
    """(int32 state per row, N): the folded state `h` as one int32 per row of the [R, N] view of
    `shape` (N: the last `n_trailing` dims), when `h` is constant along them (a Python int: one
    row, to be expanded; a tensor shaped [..., 1, ..., 1]). None where the int32 path does not apply."""
    n = math.prod(shape[len(shape) - n_trailing:]) if n_trailing else 1
    if n >= 1 << 31:
        return None
    if isinstance(h, int):
        return torch.full((1,), _i32(h), dtype=torch.int32, device=device), n
    if h.dim() > len(shape) or (n_trailing and any(d != 1 for d in h.shape[max(h.dim() - n_trailing, 0):])):
        return None
    lead = tuple(shape[:len(shape) - n_trailing])
    return _to_i32(h.expand(*lead, *([1] * n_trailing)).reshape(-1)), n


def _spans(r_total: int, n: int, device: torch.device) -> list[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) blocks covering the [R, N] grid in row-major order, each one contiguous run
    of about _BLOCK elements (rows of N cut into pieces, or whole rows grouped) on the CPU; the
    whole grid at once elsewhere."""
    if not r_total * n:
        return []
    if device.type != "cpu":
        return [(0, r_total, 0, n)]
    if n >= _BLOCK:
        return [(r, r + 1, c, min(c + _BLOCK, n)) for r in range(r_total) for c in range(0, n, _BLOCK)]
    per = max(1, _BLOCK // n)
    return [(r, min(r + per, r_total), 0, n) for r in range(0, r_total, per)]


def _blocks(rows: torch.Tensor, n: int, scratch: int = 0) -> Iterator[tuple[slice, slice, torch.Tensor, list]]:
    """The int32 hashes _mix(_mix(row state ^ element index)) of the [R, N] grid, block by block
    (~_BLOCK elements each on the CPU): yields (row slice, column slice, hashes of that block,
    `scratch` more int32 buffers of its shape). All are reused buffers: consume them before the
    next block."""
    device = rows.device
    spans = _spans(rows.numel(), n, device)
    if not spans:
        return
    k = _ints(device)
    idx = torch.arange(n, dtype=torch.int32, device=device)
    cap = max((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in spans)
    bufs = [torch.empty(cap, dtype=torch.int32, device=device) for _ in range(2 + scratch)]
    for r0, r1, c0, c1 in spans:
        size, shape = (r1 - r0) * (c1 - c0), (r1 - r0, c1 - c0)
        x, tmp, *more = (b[:size].view(shape) for b in bufs)
        torch.bitwise_xor(rows[r0:r1].view(-1, 1), idx[c0:c1].view(1, -1), out=x)
        yield slice(r0, r1), slice(c0, c1), _mix32_(_mix32_(x, tmp, k), tmp, k), [tmp, *more]


def _hash32(h: _State, shape: Sequence[int], n_trailing: int, device: torch.device | str) -> torch.Tensor:
    """int32 bits of _fold([element index], h) over `shape`, computed functionally with
    broadcasting (under torch.compile, and where _rows does not apply); may be an expanded view."""
    idx = _element_index(shape, n_trailing, device).to(torch.int32)
    h32 = _i32(h) if isinstance(h, int) else _to_i32(h)
    return _mix32(_mix32(h32 ^ idx)).expand(tuple(shape))


def _unit32(x: torch.Tensor) -> torch.Tensor:
    """_unit of the uint32 values whose bits the int32 tensor `x` holds."""
    return _unit(x.to(torch.int64).bitwise_and_(_M32))


def _use_blocks() -> bool:
    return not torch.compiler.is_compiling()


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
    """_unit of the hashes of the element indices folded into `h`: the Box-Muller inputs, in (0, 1].
    Bit for bit _unit(_expand(_fold([element index], h))), the int64 definition."""
    rows = _rows(h, shape, n_trailing, device) if _use_blocks() else None
    if rows is None:
        return _unit32(_hash32(h, shape, n_trailing, device)).expand(tuple(shape)).contiguous()
    r, n = rows
    out = torch.empty(r.numel(), n, dtype=torch.float32, device=device)
    for rs, cs, x, _ in _blocks(r, n):
        out[rs, cs] = _unit32(x)
    return out.view(tuple(shape)) if r.numel() * n == math.prod(shape) else \
        out.view(tuple(shape[len(shape) - n_trailing:])).expand(tuple(shape)).contiguous()


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
    return _normal(_fold(keys, 0x9E3779B9, device), shape, n_trailing, device)


def keyed_normal_rows(prefixes: Sequence[Sequence[int]], keys: Sequence[Key], shape: Sequence[int],
                      n_trailing: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`torch.stack([keyed_normal([*p, *keys], shape, n_trailing) for p in prefixes])`, bit for bit, in
    the ops of one call: the Python-int prefixes are folded in Python, the remaining `keys` once over
    all of them (a leading dim of len(prefixes)). WideNet's router noise for every depth at once: the
    per-call cost at d 128 is the ~100 small ops of the hash, not its elements. Eager only (under
    torch.compile the ints of a prefix may be symbolic: fold them through keyed_normal)."""
    heads = [_fold_eager([int(k) for k in p], 0x9E3779B9, device) for p in prefixes]
    h = torch.tensor(heads, dtype=torch.int64, device=device).view(-1, *([1] * len(shape)))
    return _normal(_fold(keys, h, device), (len(heads), *shape), n_trailing, device)


def _normal(prefix: _State, shape: Sequence[int], n_trailing: int, device: torch.device | str) -> torch.Tensor:
    # the prefix is shared by both uniforms: they differ from the salt on
    u1 = _uniform(_fold([0x51ED270B], prefix, device), shape, n_trailing, device)
    u2 = _uniform(_fold([0x2545F491], prefix, device), shape, n_trailing, device)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def keep_threshold(p: float) -> int:
    """The smallest uint32 hash h whose keyed_uniform value is >= p (2**32: none is), so that
    `keyed_uniform(...) >= p` is exactly `hash >= keep_threshold(p)`. Found by search on the
    definition's own float ops (_unit, the cap, the float32 >= against the Python float), which
    are monotone in h; cached per p. A Python int: torch.compile treats it as a constant."""
    p = float(p)
    t = _THRESHOLDS.get(p)
    if t is None:
        t = _THRESHOLDS[p] = _search_threshold(p)
    return t


_THRESHOLDS: dict[float, int] = {}


def _keeps(p: float, hashes: Sequence[int]) -> list[bool]:
    """The definition's decision `keyed_uniform >= p` for these hashes."""
    h = torch.tensor(list(hashes), dtype=torch.int64)
    return (_unit(h).clamp_max_(BELOW_ONE) >= p).tolist()


def _search_threshold(p: float) -> int:
    lo, hi = 0, 1 << 32  # the threshold is in [lo, hi]; hi == 2**32 stands for "none kept"
    while lo < hi:
        step = -(-(hi - lo) // 4096)
        cands = list(range(lo, hi, step))
        ok = _keeps(p, cands)
        first = next((i for i, k in enumerate(ok) if k), None)
        if first is None:
            lo = cands[-1] + 1
        else:
            hi, lo = cands[first], (cands[first - 1] + 1 if first else cands[first])
    return lo


if hasattr(torch.compiler, "assume_constant_result"):
    keep_threshold = torch.compiler.assume_constant_result(keep_threshold)


def keyed_dropout(x: torch.Tensor, p: float, keys: Sequence[Key], sample_ids: torch.Tensor,
                  training: bool) -> torch.Tensor:
    """Inverted dropout whose mask depends only on (keys, global sample id, element index).
    `x` is [B, ...]; `sample_ids` is [B].

    Bit for bit keyed_dropout_full_shape (the mask `keyed_uniform >= p`, then x * keep / (1 - p)),
    gradient included: the mask is `hash >= keep_threshold(p)` on the int32 hashes, and the same two
    float ops follow. In eager the hash, the mask and the two float ops run block by block (in L2
    on the CPU); under torch.compile it is one elementwise expression for the compiler to fuse."""
    if not training or p <= 0.0:
        return x
    t = keep_threshold(p)
    h = _fold([sample_ids.reshape(-1, *([1] * (x.dim() - 1)))], _fold(keys, 0x9E3779B9, x.device), x.device)
    rows = _rows(h, x.shape, x.dim() - 1, x.device) \
        if _use_blocks() and t < 1 << 32 and x.is_floating_point() else None
    if rows is None:  # torch.compile (one fused elementwise loop), and the cases the blocks skip
        bits = _hash32(h, x.shape, x.dim() - 1, x.device)
        keep = (bits ^ _SIGN) >= t + _SIGN if t < 1 << 32 else torch.zeros_like(bits, dtype=torch.bool)
        return x * keep.to(x.dtype) / (1.0 - p)
    if torch.is_grad_enabled() and x.requires_grad:
        return _KeyedDropout.apply(x, rows[0], rows[1], t, 1.0 - p)
    return _dropout_blocks(x, rows[0], rows[1], t, 1.0 - p, keep_mask=False)[0]


def _dropout_blocks(x: torch.Tensor, rows: torch.Tensor, n: int, t: int, scale: float,
                    keep_mask: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(x * mask / scale, the mask if `keep_mask`) over the [R, N] blocks of the hash grid: in each
    block the mask (1.0 where the uint32 hash is >= t, else 0.0, in x's dtype) is made from the
    hash bits in 4 int32 ops, then the definition's two float ops run on the block."""
    r = rows.numel()
    x2 = x.reshape(r, n)  # a view where x is contiguous; the values in logical order either way
    out = torch.empty((r, n), dtype=x.dtype, device=x.device)
    mask = torch.empty((r, n), dtype=x.dtype, device=x.device) if keep_mask else None
    f32 = x.dtype == torch.float32
    k = _ints(x.device)
    t_minus_1 = k.int32(_i32(t - 1))
    low = t < 1 << 31
    scratch = None
    for rs, cs, bits, (sign, word) in _blocks(rows, n, scratch=1):
        if mask is not None:
            m = mask[rs, cs]
        else:
            if scratch is None or scratch.numel() < bits.numel():
                scratch = torch.empty(bits.numel(), dtype=x.dtype, device=x.device)
            m = scratch[:bits.numel()].view(bits.shape)
        _keep_sign_(bits, t_minus_1, low, sign)
        if f32:  # the float32 bits of 1.0 or 0.0, written straight into the mask
            torch.bitwise_right_shift(sign, k.s31, out=m.view(torch.int32)).bitwise_and_(k.one_f32)
        else:  # 1 or 0, converted
            torch.bitwise_right_shift(sign, k.s31, out=word).neg_()
            m.copy_(word)
        o = out[rs, cs]
        torch.mul(x2[rs, cs], m, out=o)
        o.div_(scale)
    return out.view(x.shape), mask


class _KeyedDropout(torch.autograd.Function):
    """_dropout_blocks with the definition's autograd of `x * mask / scale`: the gradient is
    (grad / scale) * mask, bit for bit. The mask is kept for it: one tensor of x's size and dtype,
    as the definition's and F.dropout's autograd keep."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor, n: int, t: int, scale: float) -> torch.Tensor:
        out, mask = _dropout_blocks(x, rows, n, t, scale, keep_mask=True)
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiable ops
            return (grad / ctx.scale) * mask.view(grad.shape), None, None, None, None
        r, n = mask.shape
        g2 = grad.reshape(r, n)
        out = torch.empty((r, n), dtype=grad.dtype, device=grad.device)
        for r0, r1, c0, c1 in _spans(r, n, grad.device):  # the same two ops, block by block in L2
            o = out[r0:r1, c0:c1]
            torch.div(g2[r0:r1, c0:c1], ctx.scale, out=o)
            o.mul_(mask[r0:r1, c0:c1])
        return out.view(grad.shape), None, None, None, None


def keyed_dropout_full_shape(x: torch.Tensor, p: float, keys: Sequence[Key], sample_ids: torch.Tensor,
                             training: bool) -> torch.Tensor:
    """keyed_dropout by the definition: the mask from keyed_uniform over the full shape (the int64
    hash) compared as floats with p. The reference for tests/test_rng.py and bench/keyed_rng.py."""
    if not training or p <= 0.0:
        return x
    ids = sample_ids.reshape(-1, *([1] * (x.dim() - 1)))
    idx = _element_index(x.shape, x.dim() - 1, x.device).expand(x.shape)
    u = _unit(hash_keys_full_shape([*keys, ids, idx], x.shape, x.device)).clamp_max_(BELOW_ONE)
    return x * (u >= p).to(x.dtype) / (1.0 - p)


# Sites: fixed small integers so that keys from different uses never collide.
SITE_ROUTER = 1
SITE_ATTN_DROP = 2
SITE_PROJ_DROP = 3
SITE_FFN_DROP = 4
SITE_EMBED_DROP = 5
SITE_MIXUP = 6
SITE_AUGMENT = 7
