"""Named profiler ranges inside DeepSpeed's MoE layer, per depth, forward AND backward, without
modifying DeepSpeed or ds_widenet: methods are wrapped in the benchmark process only, for the span of
a `with moe_ranges(model):` block, and restored afterwards.

Why wrap instead of using DeepSpeed's own timers: `wall_clock_breakdown` times the forward only, and
its timers belong to the one shared MoE layer, so the N calls WideNet makes per step (one per depth)
are lumped together; backward (two thirds of the work) is not timed at all. Here every call gets ranges
named `d{depth:02d}/{part}/{fwd|bwd}`:

    part      what runs in it
    attn      the Attention call of that depth (all models)
    ffn       the dense FFN of that depth (ViT / ViT-MoE dense blocks)
    moe       the whole MoE FFN call (MoEFFN.forward: gate, dispatch, a2a, experts, combine, stats)
    gate      the router (TopKGate / PaperGate forward: logits, noise, softmax, top-k, capacity)
    dispatch  models.moe_layer.route_slots + occupancy + dispatch (tokens -> slots); with one expert-parallel
              rank packed_routes + row_sources (each packed row's token and gate value: the tokens
              themselves are gathered inside `experts`)
    a2a       deepspeed.moe.sharded_moe._AllToAll (only with ep_size > 1; two per call)
    experts   GroupedExperts.routed / .padded (the expert MLPs on the filled rows / all slots; with one
              expert-parallel rank `routed` gathers the tokens and sums the gate-weighted outputs back)
    combine   models.moe_layer.combine (slots -> tokens, weighted by the gates; ep_size > 1 or padded)

Backward ranges: each wrapped part's differentiable outputs pass through an identity autograd node
whose backward opens the range, and its inputs through one whose backward closes it, so the range spans
the part's backward (the autograd engine runs nodes in reverse creation order on the CPU). A part's
backward range is only opened when both its inputs and outputs carry gradients.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import defaultdict
from typing import Any, Callable, Iterator, Optional

import torch
from torch.autograd.profiler import record_function

_depth: list[Optional[int]] = [None]  # the depth of the MoE / attention call now running (forward)


def _name(part: str, phase: str, depth: Optional[int] = None) -> str:
    d = _depth[0] if depth is None else depth
    return f"d{-1 if d is None else d:02d}/{part}/{phase}"


def _grad_tensors(xs: Any) -> list[torch.Tensor]:
    return [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]


class _Marker(torch.autograd.Function):
    """Identity on a part's tensors that remembers `box`; subclasses act in backward."""

    @staticmethod
    def forward(ctx: Any, box: dict, *xs: torch.Tensor) -> Any:  # type: ignore[override]
        ctx.box = box
        out = tuple(x.view_as(x) for x in xs)
        return out if len(out) > 1 else out[0]


class _Open(_Marker):
    """On a part's outputs: in backward it runs first, and opens the range."""

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # type: ignore[override]
        rf = record_function(ctx.box["name"])
        rf.__enter__()
        ctx.box["rf"] = rf
        return (None, *grads)


class _Close(_Marker):
    """On a part's inputs: in backward it runs after the part's backward, and closes the range."""

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # type: ignore[override]
        rf = ctx.box.pop("rf", None)
        if rf is not None:
            rf.__exit__(None, None, None)
        return (None, *grads)


def _replace(seq: tuple, new: list[torch.Tensor]) -> tuple:
    it = iter(new)
    return tuple(next(it) if isinstance(x, torch.Tensor) and x.requires_grad else x for x in seq)


def _fields(out: Any) -> tuple[tuple, Callable[[tuple], Any]]:
    """A call's result as a flat tuple and the function that rebuilds it (tuples, dataclasses such as
    the gate's Routes, or one value)."""
    if isinstance(out, tuple):
        return out, lambda seq: seq
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        names = [f.name for f in dataclasses.fields(out)]
        return (tuple(getattr(out, n) for n in names),
                lambda seq: dataclasses.replace(out, **dict(zip(names, seq))))
    return (out,), lambda seq: seq[0]


def _wrap_call(part: str, fn: Callable, depth_from: Optional[Callable[[tuple], int]] = None) -> Callable:
    """fn(*args) inside `d../part/fwd`, with backward markers around its tensor args and outputs."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        prev = _depth[0]
        if depth_from is not None:
            _depth[0] = depth_from(args)
        try:
            box = {"name": _name(part, "bwd")}
            ins = _grad_tensors(args)
            marked = torch.is_grad_enabled() and bool(ins)
            if marked:
                closed = _Close.apply(box, *ins)
                args = _replace(args, list(closed) if isinstance(closed, tuple) else [closed])
            with record_function(_name(part, "fwd")):
                out = fn(*args, **kwargs)
            if marked:
                seq, rebuild = _fields(out)
                outs = _grad_tensors(seq)
                if outs:
                    opened = _Open.apply(box, *outs)
                    out = rebuild(_replace(seq, list(opened) if isinstance(opened, tuple) else [opened]))
            return out
        finally:
            _depth[0] = prev

    return wrapped


class _A2AShim:
    """Stands in for sharded_moe._AllToAll: `apply` runs the original inside named ranges. The
    original's backward calls `_AllToAll.apply` again (a global lookup, so this shim): with grad mode
    off there, it is labelled as such via the markers around the forward call."""

    def __init__(self, orig: Any) -> None:
        self.orig = orig
        self._apply = _wrap_call("a2a", lambda group, x: orig.apply(group, x))

    def apply(self, group: Any, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # called from the original's backward: inside a2a/bwd already
            return self.orig.apply(group, x)
        return self._apply(group, x)


@contextlib.contextmanager
def moe_ranges(model: torch.nn.Module) -> Iterator[None]:
    """Install the named ranges on `model` (any WideNet / ViT / ViT-MoE) and DeepSpeed's MoE
    functions for the span of the block; everything is restored on exit."""
    from deepspeed.moe import sharded_moe
    from deepspeed.moe.sharded_moe import TopKGate

    from ds_widenet.models import moe_layer
    from ds_widenet.models.layers import Attention, DenseFFN, MoEFFN

    undo: list[Callable[[], None]] = []

    def patch_instance(mod: torch.nn.Module, part: str, depth_arg: bool, method: str = "forward") -> None:
        orig = getattr(mod, method)
        depth_from = (lambda a: int(a[1]) if len(a) > 1 else 0) if depth_arg else None
        setattr(mod, method, _wrap_call(part, orig, depth_from))
        undo.append(lambda: mod.__dict__.pop(method, None))

    def patch_global(obj: Any, name: str, new: Any) -> None:
        old = getattr(obj, name)
        setattr(obj, name, new)
        undo.append(lambda: setattr(obj, name, old))

    try:
        for m in model.modules():
            if isinstance(m, Attention):
                patch_instance(m, "attn", True)
            elif isinstance(m, DenseFFN):
                patch_instance(m, "ffn", True)
            elif isinstance(m, MoEFFN):
                patch_instance(m, "moe", True)
            elif isinstance(m, TopKGate):
                patch_instance(m, "gate", False)
            elif isinstance(m, moe_layer.GroupedExperts):
                patch_instance(m, "experts", False, "routed")
                patch_instance(m, "experts", False, "padded")
        for fn in ("route_slots", "occupancy", "dispatch", "packed_routes", "row_sources"):
            patch_global(moe_layer, fn, _wrap_call("dispatch", getattr(moe_layer, fn)))
        patch_global(moe_layer, "combine", _wrap_call("combine", moe_layer.combine))
        patch_global(sharded_moe, "_AllToAll", _A2AShim(sharded_moe._AllToAll))
        yield
    finally:
        for u in reversed(undo):
            u()


PARTS = ("attn", "ffn", "moe", "gate", "dispatch", "a2a", "experts", "combine")


def range_times(prof: Any, steps: int = 1) -> dict[str, dict[str, dict[str, float]]]:
    """{depth: {part/phase: milliseconds per step}} from a torch.profiler run over `steps` steps,
    summing the wall duration of every range of that name (CPU time: on the CPU the ops are
    synchronous; on CUDA the device time of the kernels launched inside the range is used)."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for ev in prof.events():
        name = ev.name
        if not (len(name) > 4 and name[0] == "d" and name.count("/") == 2):
            continue
        depth, part, phase = name.split("/")
        if part not in PARTS:
            continue
        dur_us = ev.time_range.elapsed_us()
        if getattr(ev, "device_type", None) is not None and str(ev.device_type).endswith("CUDA"):
            continue
        if torch.cuda.is_available() and getattr(ev, "device_time_total", 0):
            dur_us = ev.device_time_total
        out[depth][f"{part}/{phase}"] += dur_us / 1e3 / steps
    return {d: dict(v) for d, v in sorted(out.items())}


def collective_times(prof: Any, steps: int = 1) -> dict[str, float]:
    """Milliseconds per step in each kind of collective ({"all_reduce": ..., "all_to_all": ...}),
    from the process group's own profiler records (`gloo:all_reduce`, `nccl:all_to_all`, ...). On
    gloo a record spans enqueue to completion, so it includes waiting for the slowest rank; ZeRO's
    reduce-scatter shows as all_reduce (gloo implements it with one)."""
    out: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        backend, _, op = ev.name.partition(":")
        if backend in ("gloo", "nccl") and op:
            out[op] += ev.time_range.elapsed_us() / 1e3 / steps
    return dict(sorted(out.items()))


def top_ops_in(prof: Any, part: str, limit: int = 8) -> list[tuple[str, float, int]]:
    """The aten ops that take the most self time inside the ranges of `part` (both phases), summed
    over depths: (op, total ms, calls). Attribution by time-interval containment on each thread."""
    ranges: dict[int, list[tuple[int, int]]] = defaultdict(list)
    ops = []
    for ev in prof.events():
        tr = ev.time_range
        if ev.name.count("/") == 2 and ev.name.split("/")[1] == part:
            ranges[ev.thread].append((tr.start, tr.end))
        elif ev.name.startswith("aten::") or ev.name.startswith("autograd::") or "Backward" in ev.name:
            ops.append(ev)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in ops:
        tr = ev.time_range
        if any(s <= tr.start and tr.end <= e for s, e in ranges.get(ev.thread, ())):
            rec = totals[ev.name]
            rec[0] += ev.self_cpu_time_total / 1e3
            rec[1] += 1
    ranked = sorted(((k, v[0], int(v[1])) for k, v in totals.items()), key=lambda r: -r[1])
    return ranked[:limit]
