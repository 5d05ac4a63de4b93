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
  slot. Gather, both projections (biases as a ones column inside the matmuls), GELU and the
  weighted sum back are one autograd node (`GroupedFFN`). With one expert-parallel rank each route's
  packed row comes straight from the route counts (`packed_routes`, `row_sources`): the tokens are
  gathered into their rows and the gate-weighted outputs summed back into the tokens, no slot
  buffer; with several, the slot occupancy travels with the tokens (a small all-to-all) and the
  received buffer is gathered into the packed rows and the outputs put back into their slots.

Where the device has no grouped matmul for the dtype (e.g. fp16 on CUDA), the experts fall back to one
batched matmul over every slot ([local experts, slots, d]: still no loop, but the padding is multiplied).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from deepspeed.moe.experts import Experts
from deepspeed.moe.sharded_moe import MOELayer
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import flop_registry, register_flop_formula

from .. import deepspeed_internals as dsi
from ..routing_core import RouteKey, once_per_forward
from .routing import Routes


# --------------------------------------------------------------------------------------------
# The grouped matmuls as custom ops for torch.compile: torch._grouped_mm computes float32 on the CPU,
# but its meta function (what torch.compile traces with) accepts bf16/fp16 only, so traced code calls
# it through these ops with their own shape functions; compiled graphs then hold one opaque op per
# matmul (no graph break). Eager code calls torch._grouped_mm directly (see GroupedFFN).


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


def bias_columns(features: int, element_size: int) -> int:
    """Columns appended to a grouped matmul's input of `features` columns: a ones column (its weight
    column is the bias) and zero columns up to a 16-byte row (torch._grouped_mm's stride rule)."""
    p = 1
    while (features + p) * element_size % 16:
        p += 1
    return p


def with_bias(weights: list[Tensor], biases: list[Tensor], element_size: int) -> Tensor:
    """[G, out, in + c]: each group's nn.Linear weight, its bias as the next column, zeros after (the
    c = bias_columns(in) columns that the inputs carry as ones and zeros). Differentiable: the stack's
    gradient goes back to the weights and biases (see ExpertStack)."""
    return ExpertStack.apply(element_size, len(weights), *weights, *biases)


class ExpertStack(torch.autograd.Function):
    """with_bias as one autograd node. WideNet calls its shared MoE layer at every depth with the same
    stack (memoised per forward), so autograd sums the depths' gradients in the stacked layout (one add
    per depth) and this node splits the sum into the G weights and G biases once per backward, where
    gradients per parameter would take 4G adds per depth and 4G gradient outputs per call."""

    @staticmethod
    def forward(ctx, element_size: int, groups: int, *params: Tensor) -> Tensor:  # noqa: ANN001 (ctx)
        weights, biases = params[:groups], params[groups:]
        ctx.features = weights[0].shape[1]
        w = torch.stack(weights)
        parts = [w, torch.stack(biases).unsqueeze(2)]
        cols = bias_columns(w.shape[2], element_size)
        if cols > 1:
            parts.append(w.new_zeros(w.shape[0], w.shape[1], cols - 1))
        return torch.cat(parts, 2)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        k = ctx.features
        return None, None, *grad[:, :, :k].unbind(0), *grad[:, :, k].unbind(0)


class GroupedFFN(torch.autograd.Function):
    """The local experts' MLPs (fc1, GELU, fc2) over packed rows, gathered from and summed back into
    `x` [M, d]: packed row r (rows offs[g-1]:offs[g] belong to expert g) holds x[src[r]], and
    out[m] = sum over the rows r with src[r] == m of w[r] * MLP_g(r)(x[m]) (w None: 1). src[r] == M
    for a row past the last offset: such rows are never multiplied, hold garbage and land in a
    discarded sink row (a NaN in them reaches nothing: w is 0 there and the sink is cut off).

    One hand-written autograd node for gather, both projections, activation and weighted scatter-add:
    at d 128 the per-op cost of the unfused version (gather, bias gather + add per projection, their
    backward scatters, the combine's copies) was ~2.9 ms of a ~13.8 ms MoE call on the CPU. The
    biases ride inside the grouped matmuls as a ones column (`bias_columns`), so their gradients are
    a column of the weight gradient. With one expert-parallel rank M is the tokens and w each route's
    gate value (dispatch and combine are the gather and the scatter-add); with several, M is the
    received slot buffer and w is None. The backward multiplies by the stacked weights themselves
    (saved: one copy of the local experts' weights per forward, as the stacks are built once per
    forward, `flops.expert_stack_elements`) and returns the stacks' gradients, which ExpertStack
    splits into the parameters'. Eager code calls torch._grouped_mm directly (a torch.library
    custom op with a registered autograd costs ~150 us of Python dispatch per call); traced by
    torch.compile (which turns the Function into forward and backward subgraphs) it calls the custom
    ops above, whose fake functions accept float32."""

    @staticmethod
    def forward(ctx, x: Tensor, src: Tensor, w: Optional[Tensor], offs: Tensor,  # noqa: ANN001 (ctx)
                w1: Tensor, w2: Tensor, approximate: str) -> Tensor:
        # w1 [G, hid, d + c_in], w2 [G, d, hid + c_hid]: the experts' weights, biases and zero columns
        # (with_bias); their gradients come back in that layout (ExpertStack splits them)
        m, d = x.shape
        hid = w1.shape[1]
        c_in = w1.shape[2] - d
        # [rows, d + c_in]: the tokens gathered straight into the padded rows (a row past the last
        # offset takes the last token: never multiplied), then the ones. Traced, `out=` into a view
        # would break the graph: the functional pad and gather (which inductor fuses) instead.
        src_c = src.clamp(max=m - 1)
        if torch.compiler.is_compiling():
            xa = F.pad(x, (0, c_in), value=1.0).index_select(0, src_c)
        else:
            xa = x.new_empty(src.shape[0], d + c_in)
            torch.index_select(x, 0, src_c, out=xa[:, :d])
            xa[:, d:].fill_(1.0)
        h = _gmm(xa, w1.transpose(1, 2), offs)
        a = h.new_empty(h.shape[0], w2.shape[2])  # [GELU(h) | ones]: written once (F.pad would fill it first)
        a[:, :hid] = F.gelu(h, approximate=approximate)  # (torch 2.14's gelu(out=) ignores a strided out)
        a[:, hid:].fill_(1.0)  # after the copy: these bytes share cache lines with it
        y = _gmm(a, w2.transpose(1, 2), offs)
        if w is not None:  # float32 gate values: the sum over a token's routes does not round in bf16
            y_w = y * w.unsqueeze(1)
            out = y_w.new_zeros(m + 1, d).index_add_(0, src, y_w)
        else:
            out = x.new_zeros(m + 1, d).index_add_(0, src, y)
        ctx.save_for_backward(xa, h, a, y, src, src_c, w, offs, w1, w2)
        ctx.dims = (approximate, m, d, hid)
        return out[:m].to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        approximate, m, d, hid = ctx.dims
        xa, h, a, y, src, src_c, w, offs, w1, w2 = ctx.saved_tensors
        # a row past the last offset takes any token's gradient (the last): it reaches no parameter (the
        # grouped matmuls stop at the offset) and no gate (w is 0 there; with w None it has no gate)
        gy = grad.index_select(0, src_c)
        gw = None
        if w is not None:
            if ctx.needs_input_grad[2]:  # float32 sums (bf16 outputs: in float32, as the gate values)
                gw = torch.linalg.vecdot(gy, y) if y.dtype == w.dtype else (gy * y).sum(1, dtype=w.dtype)
            gy = gy.mul_(w.unsqueeze(1))
        gw2 = _gmm_wgrad(a, gy, offs)  # [G, hid + c_hid, d]: the stack's gradient, transposed
        # the stacks' weight columns as they are (16-byte rows): no copy of the weights
        gh = torch.ops.aten.gelu_backward(_gmm(gy, w2[:, :, :hid], offs), h, approximate=approximate)
        gw1 = _gmm_wgrad(xa, gh, offs)  # [G, d + c_in, hid]
        gx = None
        if ctx.needs_input_grad[0]:
            gx = grad.new_zeros(m + 1, d).index_add_(0, src, _gmm(gh, w1[:, :, :d], offs))[:m]
        return gx, None, gw, None, gw1.transpose(1, 2), gw2.transpose(1, 2), None


def _gmm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    return grouped_mm(a, b, offs) if torch.compiler.is_compiling() else torch._grouped_mm(a, b, offs=offs)


def _gmm_wgrad(a: Tensor, g: Tensor, offs: Tensor) -> Tensor:
    if torch.compiler.is_compiling():
        return grouped_mm_wgrad(a, g, offs)
    return torch._grouped_mm(a.t(), g, offs=offs)


def _filled_rows(offs: Tensor, bound: int) -> int:
    """offs[-1] (the rows a grouped matmul multiplies) for FlopCounterMode; `bound` under fake
    tensors, where the value is not known."""
    try:
        return int(offs[-1])
    except Exception:  # noqa: BLE001 (fake / meta tensors raise several kinds)
        return bound


def _grouped_mm_flops(a: Tensor, b: Tensor, offs: Optional[Tensor] = None, *args, **kwargs) -> int:  # noqa: ANN002, ANN003
    """2 * filled rows * k * n for torch._grouped_mm's two uses here: [N, k] x [G, k, n] (a grouped
    matmul) and per group [k, N] x [N, n] (its weight gradient)."""
    if offs is None or a.dim() != 2 or b.dim() not in (2, 3):
        raise NotImplementedError(f"no FLOP formula for _grouped_mm of {a.dim()}-d x {b.dim()}-d without offs")
    if b.dim() == 3:
        return 2 * _filled_rows(offs, a.shape[0]) * a.shape[1] * b.shape[2]
    return 2 * _filled_rows(offs, a.shape[1]) * a.shape[0] * b.shape[1]


register_flop_formula(torch.ops.ds_widenet.grouped_mm, get_raw=True)(_grouped_mm_flops)
register_flop_formula(torch.ops.ds_widenet.grouped_mm_wgrad, get_raw=True)(
    lambda a, g, offs, *args, **kwargs: _grouped_mm_flops(a.t(), g, offs))  # the op transposes a itself
if torch.ops.aten._grouped_mm not in flop_registry:  # the eager path's direct calls; torch 2.14 has none
    register_flop_formula(torch.ops.aten._grouped_mm, get_raw=True)(_grouped_mm_flops)


@functools.lru_cache(maxsize=None)
def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    # a capability check on real tensors, unseen by any active dispatch mode (a FlopCounterMode would
    # count the probe's matmul, a FakeTensorMode would answer for the meta function instead)
    with _disable_current_modes():
        return _try_grouped_mm(device_type, dtype)


def _try_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
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


def packed_routes(indices: Tensor, locations: Tensor, num_experts: int, sink: int,
                  counts: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """With one expert-parallel rank: each route's row in the expert-major packed buffer ([k, S] long,
    `sink` for a route dropped or masked, index -1) and `offs` [E] int32 (cumulative rows per expert).
    Every router here keeps an expert's routes at locations 0..n_e-1 (its queue positions below the
    capacity; expert choice's ranks, padding last), so expert e's rows are offs[e-1] + location: pack_slots'
    layout from the route counts, in a third of its ops (the occupancy map is not needed)."""
    idx = indices if indices.dtype == torch.long else indices.long()
    e = (idx + 1).view(-1)  # 0 for a route not kept (index -1): the sink's entry below
    if counts is None:  # the routes each expert keeps (the router's Routes.counts, where it has them)
        counts = torch.zeros(num_experts + 1, dtype=torch.long, device=idx.device).index_add_(
            0, e, torch.ones_like(e))[1:]
    offs = counts.cumsum(0)
    start = torch.cat([offs.new_full((1,), sink), offs - counts])  # a route not kept has location 0
    return (start.index_select(0, e).view_as(idx) + locations), offs.to(torch.int32)


def row_sources(rows: Tensor, gates: Tensor, packed_rows: int, tokens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Routes' packed rows [k, S] (`packed_rows` for a dropped one) -> each packed row's token ([rows],
    S for a row no route fills) and gate value ([rows], 0 there; differentiable in `gates`).
    `tokens`: route_tokens(k, S) where the caller keeps it (WideNet's depths share one)."""
    s = rows.shape[1]
    flat = rows.reshape(-1)
    if tokens is None:
        tokens = route_tokens(rows.shape[0], s, rows.device)
    src = torch.full((packed_rows + 1,), s, dtype=torch.long, device=rows.device).scatter_(0, flat, tokens)
    # a dropped route's gate value (0) goes to the sink entry, cut off
    weight = gates.new_zeros(packed_rows + 1).scatter(0, flat, gates.reshape(-1))
    return src[:-1], weight[:-1]


def route_tokens(k: int, num_tokens: int, device: torch.device) -> Tensor:
    """[k * S] int64: the token of each route in the flattened [k, S] layout (0..S-1, k times)."""
    return torch.arange(num_tokens, device=device).repeat(k)


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

    def routed(self, x: Tensor, src: Tensor, weight: Optional[Tensor], offs: Tensor,
               key: Optional[RouteKey] = None) -> Tensor:
        """x [M, d] -> [M, d] through the packed rows (see GroupedFFN): packed row r (local expert j
        owns rows offs[j-1]:offs[j]) takes x[src[r]] (src[r] == M: an unused row) and its output,
        times weight[r] (None: 1), is summed into row src[r]; a row of x no packed row takes is 0.
        With the forward's `key`, the stacked weights are built once per forward (WideNet calls this
        layer at every depth with the same weights) and kept on key.memo until the key is dropped."""
        fc1, fc2 = self._linears("fc1"), self._linears("fc2")
        act = dsi.experts_modules(self)[0].act
        if not isinstance(act, torch.nn.GELU):  # the Function's backward is GELU's
            raise TypeError(f"GroupedExperts runs Mlp experts with nn.GELU; got {type(act).__name__}")
        size = x.element_size()
        stacks = once_per_forward(key, ("expert_weights", id(self), x.dtype, str(x.device)), lambda: (
            with_bias([m.weight for m in fc1], [m.bias for m in fc1], size),
            with_bias([m.weight for m in fc2], [m.bias for m in fc2], size)))
        return GroupedFFN.apply(x, src, weight, offs, *stacks, act.approximate)

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
        grouped = grouped_mm_available(x.device.type, x.dtype)
        # every slot past the k routes of each source rank's tokens is empty: the packed buffer stops there
        packed_rows = ranks * min(local * cap, r.indices.numel())
        if ranks == 1 and grouped:  # tokens go straight to their packed row, outputs straight back
            rows, offs = packed_routes(r.indices, r.locations, num_experts, packed_rows, r.counts)
            of_route = once_per_forward(key, ("route_tokens", r.indices.shape, str(x.device)),
                                        lambda: route_tokens(*r.indices.shape, x.device))  # each route's token
            src, weight = row_sources(rows, r.gates, packed_rows, of_route)
            out = self.experts.routed(tokens, src, weight, offs, key)
            return MoELayerOutput(out.reshape(x.shape), r)
        slots = route_slots(r.indices, r.locations, cap, num_experts)
        fill = occupancy(slots, num_experts * cap)
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
            out = self.experts.routed(buf.reshape(rows, d), source[:-1], None, offs, key)
        else:
            out = self.experts.padded(buf)
        out = out.reshape(num_experts, cap, d)
        if ranks > 1:
            out = dsi.moe_all_to_all(self.ep_group, out)
        return MoELayerOutput(combine(out.reshape(num_experts * cap, d), slots, r.gates, tokens.shape[0])
                              .reshape(x.shape), r)
