"""models/moe_layer.py: the grouped experts equal DeepSpeed's per-expert loop, the sparse layer equals a
per-route reference (forward and gradients), and DeepSpeed's parameter names and marks are kept."""
from __future__ import annotations

import copy

import pytest
import torch

import ds_widenet  # noqa: F401  (selects DeepSpeed's CPU accelerator before deepspeed is imported)
from deepspeed.moe.experts import Experts
from ds_widenet.config import MoEConfig
from ds_widenet.models import moe_layer
from ds_widenet.models.layers import MoEFFN, Mlp
from ds_widenet.models.routing import RouteKey
from ds_widenet.routing_core import stats_from_routes


def _experts(local: int = 3, dim: int = 8, hidden: int = 12) -> moe_layer.GroupedExperts:
    torch.manual_seed(0)
    ex = moe_layer.GroupedExperts(Mlp(dim, hidden), local, "ep_size_1")
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_()  # biases too: a zero bias would hide a bias routed to the wrong expert
    return ex


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_grouped_and_batched_experts_equal_deepspeeds_loop_on_every_filled_slot():
    ex = _experts()
    ranks, local, cap, d = 2, 3, 5, 8
    buf = torch.randn(ranks, local, cap, d)
    ref = Experts.forward(ex, buf)  # DeepSpeed's loop over the local experts, every slot
    assert _rel(ex.padded(buf), ref) < 1e-6
    fill = (torch.rand(ranks, local, cap) < 0.6).int()
    fill[:, 1] = 0  # an expert with no token at all
    packed = int(fill.sum()) + 3  # spare rows past the last offset: never multiplied, never read
    dest, offs = moe_layer.pack_slots(fill, packed)
    source = torch.full((packed + 1,), ranks * local * cap).scatter_(0, dest, torch.arange(ranks * local * cap))
    x = buf.reshape(-1, d).requires_grad_()
    out = ex.routed(x, source[:-1], None, offs)
    filled = fill.reshape(-1).bool()
    assert _rel(out[filled], ref.reshape(-1, d)[filled]) < 1e-6
    assert torch.equal(out[~filled], torch.zeros_like(out[~filled]))  # an empty slot's output is 0
    # the hand-written backward: the gradients of every expert parameter and of the filled slots equal
    # autograd's through DeepSpeed's loop (the spare rows' garbage reaches none of them)
    probe = torch.randn(ranks * local * cap, d) * filled.unsqueeze(1)
    got = torch.autograd.grad((out * probe).sum(), [x, *ex.parameters()])
    xr = buf.detach().requires_grad_()
    want = torch.autograd.grad((Experts.forward(ex, xr).reshape(-1, d) * probe).sum(), [xr, *ex.parameters()])
    assert _rel(got[0].reshape(-1, d)[filled], want[0].reshape(-1, d)[filled]) < 1e-6
    assert torch.equal(got[0][~filled], torch.zeros_like(got[0][~filled]))
    for a, b in zip(got[1:], want[1:]):
        assert a.shape == b.shape and _rel(a, b) < 1e-5


def test_pack_slots_orders_rows_expert_major_then_by_source_rank():
    fill = torch.tensor([[[1, 0, 1], [0, 0, 0]],    # rank 0: expert 0 slots 0, 2
                         [[1, 1, 0], [0, 1, 0]]])   # rank 1: expert 0 slots 0, 1; expert 1 slot 1
    dest, offs = moe_layer.pack_slots(fill, 6)
    assert offs.tolist() == [4, 5]
    assert dest.view(2, 2, 3).tolist() == [[[0, 6, 1], [6, 6, 6]], [[2, 3, 6], [6, 4, 6]]]


@pytest.mark.parametrize("router", ["paper", "bpr", "expert_choice", "deepspeed"])
@pytest.mark.parametrize("cf", [0.5, 1.0, 2.0])
def test_packed_routes_are_pack_slots_rows_for_every_router(router: str, cf: float):
    """The single-rank shortcut (rows from the route counts) relies on every router keeping an
    expert's routes at locations 0..n-1: it must give pack_slots' rows, padding and drops included."""
    if router == "expert_choice" and cf >= 2.0:
        cf = 1.0  # k * cf >= E is refused for expert choice
    ffn = _layer(cf, router=router)
    for training, used in ((True, None), (False, torch.tensor([1.0, 0.0, 1.0, 1.0]).repeat_interleave(5))):
        ffn.train(training)
        r = ffn.gate(torch.randn(20, 8), used, 0, RouteKey(seed=1, step=2, sample_ids=torch.arange(4)))
        e, cap = 4, r.capacity
        sink = min(e * cap, r.indices.numel())
        slots = moe_layer.route_slots(r.indices, r.locations, cap, e)
        dest, offs = moe_layer.pack_slots(moe_layer.occupancy(slots, e * cap).view(1, e, cap), sink)
        want = torch.cat([dest, dest.new_full((1,), sink)]).index_select(0, slots.reshape(-1)).view(r.indices.shape)
        rows, offs2 = moe_layer.packed_routes(r.indices, r.locations, e, sink)
        assert torch.equal(rows, want) and torch.equal(offs2, offs), (router, cf, training)
        # the router's own counts (paper gates: no recount) are the routes each expert keeps
        counted = torch.stack([(r.indices == j).sum() for j in range(e)])
        assert (r.counts is None) == (router == "deepspeed") and (r.counts is None or torch.equal(r.counts, counted))
        if r.counts is not None:
            assert all(torch.equal(a, b) for a, b in zip(
                moe_layer.packed_routes(r.indices, r.locations, e, sink, r.counts), (rows, offs2)))
            with_counts, recounted = (stats_from_routes(r.aux_loss, r.indices, e, 4, used, expert_choice=r.expert_choice,
                                                        counts=c) for c in (r.counts, None))
            assert torch.equal(with_counts.expert_tokens, recounted.expert_tokens)
            assert torch.equal(with_counts.dropped, recounted.dropped)


def _layer(ep_cf: float = 1.2, experts: int = 4, router: str = "paper") -> MoEFFN:
    cfg = MoEConfig(num_experts=experts, k=2, expert_dim=12, capacity_factor=ep_cf, min_capacity=1, router=router,
                    eval_capacity_factor=1.0 if router == "expert_choice" else 2.0)
    ffn = MoEFFN(8, cfg)
    ffn.init_experts(seed=3, ep_rank=0)
    with torch.no_grad():
        for e in ffn.local_experts:
            e.fc1.bias.normal_()
            e.fc2.bias.normal_()
    return ffn


def _per_route_reference(ffn: MoEFFN, x: torch.Tensor, routes) -> torch.Tensor:
    """sum over the kept routes of gate * expert(token), one token at a time."""
    tokens = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(tokens)
    for j in range(routes.indices.shape[0]):
        for s in range(tokens.shape[0]):
            e = int(routes.indices[j, s])
            if e >= 0:
                out[s] = out[s] + routes.gates[j, s] * ffn.local_experts[e](tokens[s:s + 1])[0]
    return out.view_as(x)


@pytest.mark.parametrize("cf", [0.5, 1.2, 8.0])
def test_sparse_layer_equals_a_per_route_reference_with_its_gradients(cf: float):
    ffn = _layer(cf)
    ffn.train()
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()  # not the global RNG: order-free
    key = RouteKey(seed=1, step=2, sample_ids=torch.arange(3))
    res = moe_layer_call(ffn, x, key)
    if cf != 1.2:  # low capacity drops routes, high keeps all (at 1.2 it depends on the routes)
        assert (res.routes.indices < 0).any() == (cf < 1.0)
    ref = _per_route_reference(ffn, x, res.routes)  # the same gates (one graph): full gradients compare
    assert _rel(res.output, ref) < 1e-6
    w = torch.randn_like(ref)
    params = [x, *ffn.parameters()]
    g = torch.autograd.grad((res.output * w).sum(), params, retain_graph=True)
    g_ref = torch.autograd.grad((ref * w).sum(), params)
    for a, b in zip(g, g_ref):
        assert _rel(a, b) < 1e-5
    assert all(torch.isfinite(t).all() for t in g)


def moe_layer_call(ffn: MoEFFN, x: torch.Tensor, key: RouteKey) -> moe_layer.MoELayerOutput:
    from ds_widenet import deepspeed_internals as dsi

    return dsi.moe_layer(ffn.moe)(x, None, 0, key)


def test_the_batched_fallback_gives_the_grouped_result(monkeypatch: pytest.MonkeyPatch):
    ffn = _layer()
    ffn.eval()
    x = torch.randn(4, 5, 8)
    grouped = moe_layer_call(ffn, x, None).output
    monkeypatch.setattr(moe_layer, "grouped_mm_available", lambda *a: False)
    assert _rel(moe_layer_call(ffn, x, None).output, grouped) < 1e-6


def test_deepspeeds_parameter_names_and_expert_marks_are_kept():
    ffn = _layer()
    keys = set(ffn.state_dict())
    for i in range(4):
        for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            assert f"moe.deepspeed_moe.experts.deepspeed_experts.{i}.{name}" in keys
    assert "moe.deepspeed_moe.gate.wg.weight" in keys
    assert len(keys) == 4 * 4 + 1
    for n, p in ffn.named_parameters():
        assert getattr(p, "allreduce", True) == ("deepspeed_experts" not in n), n
    assert isinstance(ffn.moe.deepspeed_moe, moe_layer.SparseMoELayer)


def test_widenet_stacks_its_expert_weights_once_per_forward(monkeypatch: pytest.MonkeyPatch):
    """The shared MoE layer runs at every depth with the same weights: with the forward's key the
    stacked weights are built once (a new key, the next forward, builds them again after the weights
    changed), and the result is bit for bit that of building them at every call (without a key)."""
    from ds_widenet.models import build_model
    from ds_widenet.config import ModelConfig

    cfg = ModelConfig(arch="widenet", img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=3,
                      num_heads=2, mlp_dim=16, moe=MoEConfig(num_experts=4, k=2, expert_dim=16), pool="avg")
    model = build_model(cfg).train()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    built = []
    real = moe_layer.with_bias
    monkeypatch.setattr(moe_layer, "with_bias", lambda *a: built.append(1) or real(*a))

    def grads(**kw):
        model.zero_grad(set_to_none=True)
        out = model(x, sample_ids=torch.arange(2), step=3, seed=0, **kw)
        (out.logits.sum() + out.aux_loss).backward()
        return out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    logits, g = grads()
    assert len(built) == 2  # fc1's and fc2's stacks, once for the 3 depths
    saved = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    logits_next, _ = grads()
    assert len(built) == 4 and not torch.equal(logits, logits_next)  # a new key: the new weights
    model.load_state_dict(saved)
    # every call building its own stacks (no key for them)
    real_routed = moe_layer.GroupedExperts.routed
    monkeypatch.setattr(moe_layer.GroupedExperts, "routed",
                        lambda self, x, src, w, offs, key=None: real_routed(self, x, src, w, offs, None))
    logits2, g2 = grads()
    assert len(built) == 4 + 2 * 3
    assert torch.equal(logits, logits2) and all(torch.equal(a, b) for a, b in zip(g, g2))
