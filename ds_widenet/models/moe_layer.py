"""DeepSpeed's MoE layer with the local experts run as grouped matmuls over the filled slots only.

DeepSpeed 0.19's `MOELayer` reads the capacity back to the host (`int(C)`) and its `Experts` runs the
local experts as a Python loop of small matmuls over every capacity slot, filled or not: at capacity
factor 1.2 about 16% of the expert FLOPs multiply padding, and each expert is its own kernel launch.
`SparseMoELayer` (a `MOELayer`) and `GroupedExperts` (an `Experts`) keep DeepSpeed's modules, parameter
names and checkpoint files (`deepspeed_experts.{i}.fc1.weight`, `layer_{l}_expert_{e}_*.pt`) and the
all-to-all over the fixed [E, C, d] buffers, but:

* the gate returns a `Routes` (capacity a Python int, decided from shapes), and nothing in the
  forward reads a device value back to the host (drop_tokens=False excepted: its capacity is the
  largest expert count, a data-dependent size);
* the slots each expert really holds are packed expert-major into one [rows, d] buffer and the local
  experts run as one grouped matmul per projection over those rows (`torch._grouped_mm` with the
  per-expert row offsets as a device tensor): no per-expert Python loop, no multiply of an empty
  slot. With one expert-parallel rank the packing is folded into the token -> slot map (no extra
  copy); with several, the slot occupancy travels with the tokens (a small all-to-all) and the
  received buffer is packed and unpacked by two gathers.

Where the device has no grouped matmul for the dtype (e.g. fp16 on CUDA), the experts fall back to one
batched matmul over every slot ([local experts, slots, d]: still no loop, but the padding is multiplied).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from deepspeed.moe.experts import Experts
from deepspeed.moe.sharded_moe import MOELayer
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import deepspeed_internals as dsi
from ..routing_core import RouteKey
from .routing import Routes


# --------------------------------------------------------------------------------------------
# The grouped matmuls as custom ops: torch._grouped_mm computes float32 on the CPU, but its meta
# function (what torch.compile traces with) accepts bf16/fp16 only, so it is wrapped with its own
# shape function and backward; compiled graphs then hold it as one opaque op (no graph break).
# `grouped_linear` takes the experts' weights as a list and stacks them inside the op, so the
# [G, out, in] copy is transient: autograd saves the parameters themselves, not a copy per call
# (WideNet calls its one MoE layer at every depth: a saved stack would cost the expert weights
# once per depth in activation memory).


@torch.library.custom_op("ds_widenet::grouped_mm", mutates_args=())
def grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """a [N, k] whose rows offs[g-1]:offs[g] belong to group g; b [G, k, n] -> [N, n] (rows past
    offs[-1] are left unspecified: callers never read them)."""
    return torch._grouped_mm(a, b, offs=offs)


@grouped_mm.register_fake
def _grouped_mm_shape(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    return a.new_empty((a.shape[0], b.shape[2]))


@torch.library.custom_op("ds_widenet::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(a: Tensor, g: Tensor, offs: Tensor) -> Tensor:
    """Per group, a[rows]^T @ g[rows] -> [G, k, n] (the weight gradient of a grouped matmul)."""
    return torch._grouped_mm(a.t(), g, offs=offs)


@grouped_mm_wgrad.register_fake
def _grouped_mm_wgrad_shape(a: Tensor, g: Tensor, offs: Tensor) -> Tensor:
    return a.new_empty((offs.shape[0], a.shape[1], g.shape[1]))


@torch.library.custom_op("ds_widenet::grouped_linear", mutates_args=())
def grouped_linear(x: Tensor, weights: list[Tensor], offs: Tensor) -> Tensor:
    """x [N, in] whose rows offs[g-1]:offs[g] belong to group g, through group g's nn.Linear weight
    weights[g] [out, in] -> [N, out] (rows past offs[-1] unspecified)."""
    return torch._grouped_mm(x, torch.stack(weights).transpose(1, 2), offs=offs)


@grouped_linear.register_fake
def _grouped_linear_shape(x: Tensor, weights: list[Tensor], offs: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], weights[0].shape[0]))


def _grouped_linear_setup(ctx, inputs, output) -> None:  # noqa: ANN001 (torch.library's signature)
    x, weights, offs = inputs
    ctx.num_weights = len(weights)
    ctx.save_for_backward(x, offs, *weights)


def _grouped_linear_backward(ctx, grad: Tensor):  # noqa: ANN001
    x, offs, *weights = ctx.saved_tensors
    grad = grad.contiguous()  # an expanded gradient (e.g. of a sum) has zero strides: refused
    gx = grouped_mm(grad, torch.stack(weights), offs)
    gw = list(grouped_mm_wgrad(grad, x, offs).unbind(0))  # [G, out, in]: nn.Linear's layout
    return gx, gw, None


grouped_linear.register_autograd(_grouped_linear_backward, setup_context=_grouped_linear_setup)


def _filled_rows(offs: Tensor, bound: int) -> int:
    """offs[-1] (the rows a grouped matmul multiplies) for FlopCounterMode; `bound` under fake
    tensors, where the value is not known."""
    try:
        return int(offs[-1])
    except Exception:  # noqa: BLE001 (fake / meta tensors raise several kinds)
        return bound


@register_flop_formula([torch.ops.ds_widenet.grouped_mm, torch.ops.ds_widenet.grouped_mm_wgrad], get_raw=True)
def _grouped_mm_flops(a: Tensor, b: Tensor, offs: Tensor, *args, **kwargs) -> int:  # noqa: ANN002, ANN003
    # grouped_mm: [N, k] x [G, k, n]; grouped_mm_wgrad: [N, k]^T x [N, n]: 2 * filled rows * k * n
    n = b.shape[-1]
    return 2 * _filled_rows(offs, a.shape[0]) * a.shape[1] * n


@register_flop_formula(torch.ops.ds_widenet.grouped_linear, get_raw=True)
def _grouped_linear_flops(x: Tensor, weights: list[Tensor], offs: Tensor, *args, **kwargs) -> int:  # noqa: ANN002, ANN003
    out, inp = weights[0].shape
    return 2 * _filled_rows(offs, x.shape[0]) * inp * out


@functools.lru_cache(maxsize=None)
def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    try:
        a = torch.zeros(16, 16, device=device_type, dtype=dtype)
        b = torch.zeros(2, 16, 16, device=device_type, dtype=dtype)
        torch._grouped_mm(a, b, offs=torch.tensor([8, 16], dtype=torch.int32, device=device_type))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def grouped_mm_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs for this device and dtype (probed once on a tiny input, on
    real tensors: under torch.compile the result is a constant of the trace. Traced, the probe
    would run on fake tensors, whose meta function refuses float32, and the compiled graph would
    silently take the padded fallback)."""
    return _probe_grouped_mm(device_type, dtype)


if hasattr(torch.compiler, "assume_constant_result"):
    grouped_mm_available = torch.compiler.assume_constant_result(grouped_mm_available)


# --------------------------------------------------------------------------------------------
# Packing: which slot goes to which row of the grouped buffer


def pack_slots(fill: Tensor, packed_rows: int) -> tuple[Tensor, Tensor]:
    """Occupancy [ranks, local experts, C] (1 = a token sits there) -> (`dest` [ranks*L*C]: the packed
    row of each slot, `packed_rows` for an empty one; `offs` [L] int32: cumulative rows per local
    expert). Rows are expert-major (expert j's slots from every source rank, in rank order), the
    grouped matmul's layout; the order within an expert is the slot order. `packed_rows` bounds the
    filled slots (k routes per token: at most k * tokens of each source rank)."""
    ranks, local, cap = fill.shape
    f = fill.permute(1, 0, 2).reshape(-1).long()
    dest = torch.where(f > 0, f.cumsum(0) - 1, torch.full_like(f, packed_rows))
    dest = dest.view(local, ranks, cap).permute(1, 0, 2).reshape(-1)
    offs = f.view(local, ranks * cap).sum(1).cumsum(0).to(torch.int32)
    return dest, offs


def route_slots(indices: Tensor, locations: Tensor, capacity: int, num_experts: int) -> Tensor:
    """Each route's flat slot e * C + location in the [E * C] buffer; E * C (a scratch slot) for a
    route dropped by capacity or masked as padding (expert index -1)."""
    flat = indices.long() * capacity + locations.long()
    return torch.where(indices >= 0, flat, torch.full_like(flat, num_experts * capacity))


def occupancy(slots: Tensor, num_slots: int) -> Tensor:
    """[num_slots] int32, 1 where some route sits (the scratch slot cut off)."""
    fill = torch.zeros(num_slots + 1, dtype=torch.int32, device=slots.device)
    return fill.scatter_(0, slots.reshape(-1), 1)[:-1]


def dispatch(x: Tensor, slots: Tensor, rows: int) -> Tensor:
    """Tokens [S, d] -> buffer [rows, d]: row r holds the token routed to slot r, zeros elsewhere.
    A gather (each row names its token) rather than a scatter of one copy per route."""
    s, d = x.shape
    source = torch.full((rows + 1,), s, dtype=torch.long, device=x.device)
    tokens = torch.arange(s, device=x.device).expand_as(slots)
    source.scatter_(0, slots.reshape(-1), tokens.reshape(-1))
    return torch.cat([x, x.new_zeros(1, d)]).index_select(0, source[:-1])


def combine(buf: Tensor, slots: Tensor, gates: Tensor, num_tokens: int) -> Tensor:
    """Buffer [rows, d] -> tokens [S, d]: each token's routes weighted by their gate values, summed in
    float32 (gates are float32: the sum over routes does not round in bf16), in the buffer's dtype."""
    d = buf.shape[-1]
    routed = torch.cat([buf, buf.new_zeros(1, d)]).index_select(0, slots.reshape(-1))
    routed = routed.view(slots.shape[0], num_tokens, d)
    return (routed * gates.unsqueeze(-1)).sum(0).to(buf.dtype)


# --------------------------------------------------------------------------------------------
# The modules


@dataclass
class MoELayerOutput:
    """output [*, d] (the input's shape), and the call's Routes (for the routing statistics)."""

    output: Tensor
    routes: Routes


def _bias_rows(layers: list[torch.nn.Linear], expert: Tensor) -> Tensor:
    """Each row's expert bias; a zero row for the index len(layers) (rows past the last offset)."""
    b = torch.stack([m.bias for m in layers])
    return torch.cat([b, b.new_zeros(1, b.shape[1])]).index_select(0, expert)


class GroupedExperts(Experts):
    """DeepSpeed's `Experts` (same modules: `deepspeed_experts.{i}` of timm-named Mlps fc1/act/fc2,
    same `allreduce=False` marks) run as one grouped matmul per projection over the packed rows.
    `Experts.forward` (the per-expert loop over [ranks, L, C, d]) stays the reference."""

    def _linears(self, name: str) -> list[torch.nn.Linear]:
        return [getattr(e, name) for e in dsi.experts_modules(self)]

    def _stacked(self, name: str) -> tuple[Tensor, Tensor]:
        # The padded path's [L, out, in] copy (transient too: baddbmm saves it, the fallback only).
        layers = self._linears(name)
        return torch.stack([m.weight for m in layers]), torch.stack([m.bias for m in layers])

    def _act(self, h: Tensor) -> Tensor:
        return dsi.experts_modules(self)[0].act(h)

    def grouped(self, rows: Tensor, offs: Tensor) -> Tensor:
        """Packed rows [N, d] (local expert j owns rows offs[j-1]:offs[j]) -> [N, d]. The rows past
        offs[-1] are never multiplied and hold garbage (uninitialised memory): callers never read them,
        and their bias index is a zero row of its own, so in the backward nothing they hold (a NaN
        times a zero gradient) reaches a parameter's gradient."""
        fc1, fc2 = self._linears("fc1"), self._linears("fc2")
        # Each row's expert (len(experts) past the last offset: the discarded bias row).
        expert = torch.searchsorted(offs, torch.arange(rows.shape[0], device=rows.device, dtype=torch.int32),
                                    right=True)
        h = grouped_linear(rows, [m.weight for m in fc1], offs) + _bias_rows(fc1, expert)
        h = self._act(h)
        return grouped_linear(h, [m.weight for m in fc2], offs) + _bias_rows(fc2, expert)

    def padded(self, buf: Tensor) -> Tensor:
        """[ranks, L, C, d] -> the same shape, every slot multiplied: one batched matmul per projection."""
        ranks, local, cap, d = buf.shape
        w1, b1 = self._stacked("fc1")
        w2, b2 = self._stacked("fc2")
        x = buf.transpose(0, 1).reshape(local, ranks * cap, d)
        h = self._act(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)))
        out = torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2))
        return out.view(local, ranks, cap, d).transpose(0, 1)


class SparseMoELayer(MOELayer):
    """`MOELayer` whose forward runs `GroupedExperts` on the filled slots only (see the module doc).
    Built from a constructed `deepspeed.moe.layer.MoE`'s layer (`from_layer`), so DeepSpeed's
    expert-parallel group setup and checkpoint code see the MOELayer they expect."""

    experts: GroupedExperts

    @classmethod
    def from_layer(cls, layer: MOELayer, expert: torch.nn.Module) -> "SparseMoELayer":
        experts = GroupedExperts(expert, layer.num_local_experts, dsi.experts_group_name(layer.experts))
        return cls(layer.gate, experts, layer.ep_group_name, layer.ep_size, layer.num_local_experts)

    def forward(self, x: Tensor, used_token: Optional[Tensor] = None, depth: int = 0,  # type: ignore[override]
                key: Optional[RouteKey] = None) -> MoELayerOutput:
        d = x.shape[-1]
        tokens = x.reshape(-1, d)
        r: Routes = self.gate(tokens, used_token, depth, key)
        num_experts = self.ep_size * self.num_local_experts
        cap, ranks, local = r.capacity, self.ep_size, self.num_local_experts
        slots = route_slots(r.indices, r.locations, cap, num_experts)
        fill = occupancy(slots, num_experts * cap)
        grouped = grouped_mm_available(x.device.type, x.dtype)
        # every slot past the k routes of each source rank's tokens is empty: the packed buffer stops there
        packed_rows = ranks * min(local * cap, r.indices.numel())
        if ranks == 1 and grouped:
            # The packed row of each slot folded into the token map: tokens go straight to their row.
            dest, offs = pack_slots(fill.view(1, local, cap), packed_rows)
            slots = torch.cat([dest, dest.new_full((1,), packed_rows)]).index_select(0, slots.reshape(-1))
            slots = slots.view(r.indices.shape)
            out = self.experts.grouped(dispatch(tokens, slots, packed_rows), offs)
            return MoELayerOutput(combine(out, slots, r.gates, tokens.shape[0]).reshape(x.shape), r)
        buf = dispatch(tokens, slots, num_experts * cap).view(num_experts, cap, d)
        if ranks > 1:
            buf = dsi.moe_all_to_all(self.ep_group, buf)
            fill = dsi.all_to_all_tensor(self.ep_group, fill)  # which received slots hold a token
        buf = buf.reshape(ranks, local, cap, d)
        if grouped:
            dest, offs = pack_slots(fill.view(ranks, local, cap), packed_rows)
            rows = ranks * local * cap
            source = torch.full((packed_rows + 1,), rows, dtype=torch.long, device=x.device).scatter_(
                0, dest, torch.arange(rows, device=x.device))
            flat = torch.cat([buf.reshape(rows, d), buf.new_zeros(1, d)])
            out = self.experts.grouped(flat.index_select(0, source[:-1]), offs)
            out = torch.cat([out, out.new_zeros(1, d)]).index_select(0, dest)
        else:
            out = self.experts.padded(buf)
        out = out.reshape(num_experts, cap, d)
        if ranks > 1:
            out = dsi.moe_all_to_all(self.ep_group, out)
        return MoELayerOutput(combine(out.reshape(num_experts * cap, d), slots, r.gates, tokens.shape[0])
                              .reshape(x.shape), r)
