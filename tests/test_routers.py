"""The routers beyond the paper's, each against an independent small implementation on fixed inputs:
`bpr` (V-MoE's Batch Prioritized Routing), `expert_choice` (experts take their top-C tokens), and
ST-MoE's router z-loss."""
from __future__ import annotations

import math

import pytest
import torch

from ds_widenet.config import ConfigError, MoEConfig
from ds_widenet.routing_core import expert_choice_routing, paper_routing, router_z_loss, stats_from_routes


def greedy_routes(probs: torch.Tensor, k: int, capacity: int, prioritized: bool):
    """Route by route in plain Python: choice 0 of every token, then choice 1; within a choice the
    tokens in index order, or (prioritized) by their top gate value, highest first. Returns expert
    ids [k][S] (-1 dropped), slots [k][S], gate values [k][S]."""
    p = probs.tolist()
    s_n, e_n = len(p), len(p[0])
    choices = [sorted(range(e_n), key=lambda e: -p[s][e])[:k] for s in range(s_n)]
    order = sorted(range(s_n), key=lambda s: (-max(p[s]), s)) if prioritized else list(range(s_n))
    fill = [0] * e_n
    idx, loc, gate = ([[v] * s_n for _ in range(k)] for v in (-1, 0, 0.0))
    for c in range(k):
        for s in order:
            e = choices[s][c]
            if fill[e] < capacity:
                idx[c][s], loc[c][s], gate[c][s] = e, fill[e], p[s][e]
                fill[e] += 1
    return idx, loc, gate


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("cf", [0.5, 1.0, 2.0])
def test_bpr_equals_a_greedy_reference_that_queues_tokens_by_their_top_gate(k, cf):
    g = torch.Generator().manual_seed(100 * k + int(10 * cf))
    logits = torch.randn(48, 4, generator=g) * 2
    probs = torch.softmax(logits, dim=1)
    _, capacity, _, idx, loc, gates, _ = paper_routing(logits, k, cf, 1, None, True, priority=True)
    ref_idx, ref_loc, ref_gate = greedy_routes(probs, k, capacity, prioritized=True)
    assert idx.tolist() == ref_idx and loc.tolist() == ref_loc
    # the softmax probabilities times 1 or 0 (the router's softmax runs on the [E, S] layout: another
    # kernel than this reference's, equal to the last bit or two)
    torch.testing.assert_close(gates, torch.tensor(ref_gate), rtol=1e-6, atol=0.0)
    assert torch.equal(gates == 0, torch.tensor(ref_gate) == 0)
    # the paper's router is the same greedy queue in token order
    _, _, _, idx0, loc0, _, _ = paper_routing(logits, k, cf, 1, None, True)
    ref0_idx, ref0_loc, _ = greedy_routes(probs, k, capacity, prioritized=False)
    assert idx0.tolist() == ref0_idx and loc0.tolist() == ref0_loc


def test_bpr_drops_the_first_choices_its_router_was_least_sure_of():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(64, 4, generator=g) * 3
    top = torch.softmax(logits, dim=1).max(1).values
    _, _, _, idx, _, _, _ = paper_routing(logits, 1, 0.5, 1, None, True, priority=True)
    first = logits.argmax(1)
    dropped_any = False
    for e in range(4):
        mine = first == e
        kept, dropped = top[mine & (idx[0] == e)], top[mine & (idx[0] < 0)]
        if len(dropped):
            dropped_any = True
            assert dropped.max() <= kept.min()  # every kept token was at least as sure as every dropped one
    assert dropped_any  # capacity factor 0.5 must drop some
    _, _, _, idx_paper, _, _, _ = paper_routing(logits, 1, 0.5, 1, None, True)
    assert not torch.equal(idx_paper, idx)  # in token order other tokens are dropped


def test_bpr_padding_takes_no_capacity_and_gradients_reach_the_gate_values():
    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(3), requires_grad=True)
    used = torch.ones(16, dtype=torch.bool)
    used[::3] = False
    _, cap, _, idx, loc, gates, _ = paper_routing(logits, 2, 1.0, 1, used, True, priority=True)
    assert (idx[:, ~used] == -1).all()
    kept = idx >= 0
    slots = (idx.long() * cap + loc.long())[kept]
    assert slots.unique().numel() == slots.numel()  # no two routes share a slot
    gates.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_bpr_and_expert_choice_are_router_options_and_allow_the_per_depth_gate():
    assert MoEConfig(router="bpr", per_depth_gate=True).router == "bpr"
    assert MoEConfig(router="expert_choice", per_depth_gate=True, eval_capacity_factor=1.2).expert_choice
    with pytest.raises(ConfigError, match="paper, bpr, expert_choice, deepspeed"):
        MoEConfig(router="priority")
    with pytest.raises(ConfigError, match="drop_tokens=true"):
        MoEConfig(router="expert_choice", drop_tokens=False, eval_capacity_factor=1.2)
    with pytest.raises(ConfigError, match="z_loss_weight=-0.001 must be >= 0"):
        MoEConfig(z_loss_weight=-1e-3)


@pytest.mark.parametrize("field", ["capacity_factor", "eval_capacity_factor"])
def test_expert_choice_refuses_a_capacity_that_gives_every_expert_every_token(field):
    ok = {"capacity_factor": 1.2, "eval_capacity_factor": 1.2}
    MoEConfig(router="expert_choice", **{**ok, field: 1.99})  # k * cf < E: still a choice
    with pytest.raises(ConfigError, match=f"model.moe.{field}=2 with router=expert_choice gives each of the 4 "
                                          f"experts every token .* set model.moe.{field} below 2"):
        MoEConfig(router="expert_choice", **{**ok, field: 2.0})
    assert MoEConfig(router="paper", **{**ok, field: 2.0}).eval_capacity_factor  # token choice: any factor


# --------------------------------------------------------------------------------------------
# expert choice


def expert_choice_reference(probs: torch.Tensor, capacity: int, used: list[bool]):
    """Expert by expert in plain Python: the used tokens sorted by this expert's gate value, highest
    first (ties: the earlier token), the first `capacity` taken. Returns expert ids [E][S] (row e is e
    where taken, else -1), places [E][S], gate values [E][S]."""
    p = probs.tolist()
    s_n, e_n = len(p), len(p[0])
    idx, loc, gate = ([[v] * s_n for _ in range(e_n)] for v in (-1, 0, 0.0))
    for e in range(e_n):
        ranked = sorted((s for s in range(s_n) if used[s]), key=lambda s: (-p[s][e], s))
        for place, s in enumerate(ranked[:capacity]):
            idx[e][s], loc[e][s], gate[e][s] = e, place, p[s][e]
    return idx, loc, gate


@pytest.mark.parametrize("k, cf", [(1, 1.0), (2, 0.5), (2, 1.25), (2, 4.0)])
@pytest.mark.parametrize("padded", [False, True])
def test_expert_choice_equals_a_reference_where_each_expert_takes_its_top_c_tokens(k, cf, padded):
    g = torch.Generator().manual_seed(10 * k + int(4 * cf) + padded)
    logits = torch.randn(40, 4, generator=g) * 2
    logits[5] = logits[6]  # a tie: the earlier token goes first
    used = torch.ones(40, dtype=torch.bool)
    if padded:
        used[-7:] = False
    probs = torch.softmax(logits, dim=1)
    l_aux, capacity, _, idx, loc, gates, counts = expert_choice_routing(
        logits, k, cf, 1, used.float() if padded else None)
    assert capacity == min(40, math.ceil(40 / 4 * cf * k))
    ref_idx, ref_loc, ref_gate = expert_choice_reference(probs, capacity, used.tolist())
    assert idx.tolist() == ref_idx and loc.tolist() == ref_loc
    # the softmax probabilities where taken (the router's softmax runs on the [E, S] layout: within a bit)
    torch.testing.assert_close(gates, torch.tensor(ref_gate), rtol=1e-6, atol=0.0)
    assert torch.equal(gates == 0, torch.tensor(ref_gate) == 0)
    assert counts.tolist() == [min(capacity, int(used.sum()))] * 4  # every expert is full (balanced)
    assert float(l_aux) == 0.0  # no balance loss


def test_expert_choice_statistics_count_tokens_no_expert_took_as_dropped():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 4, generator=g) * 3
    _, _, _, idx, _, _, _ = expert_choice_routing(logits, 1, 1.0, 1, None)  # C = 8: 32 slots for 32 tokens
    stats = stats_from_routes(torch.zeros(()), idx, 4, 4, None, expert_choice=True)
    untouched = int(((idx >= 0).sum(0) == 0).sum())
    assert untouched > 0  # with 3x logits some tokens are every expert's last choice
    assert math.isclose(float(stats.dropped), untouched / 32, rel_tol=1e-6)
    assert stats.expert_tokens.tolist() == [8.0] * 4 and stats.expert_index.shape == (4, 4, 8)


def test_expert_choice_gradients_reach_the_gate_values_of_taken_tokens_only():
    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    _, _, _, idx, _, gates, _ = expert_choice_routing(logits, 1, 1.0, 1, None)
    (gates * torch.arange(1.0, 5.0).view(4, 1)).sum().backward()
    untaken = (idx < 0).all(0)
    assert untaken.any() and logits.grad is not None
    assert (logits.grad[untaken] == 0).all() and logits.grad[~untaken].abs().sum() > 0


# --------------------------------------------------------------------------------------------
# router z-loss


@pytest.mark.parametrize("padded", [False, True])
def test_z_loss_equals_the_mean_squared_log_partition_function(padded):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(24, 4, generator=g) * 4
    used = [not (padded and s % 5 == 0) for s in range(24)]
    rows = [r for r, u in zip(logits.double().tolist(), used) if u]
    ref = sum(math.log(sum(math.exp(v) for v in r)) ** 2 for r in rows) / len(rows)
    got = router_z_loss(logits, torch.tensor(used).float() if padded else None)
    assert math.isclose(float(got), ref, rel_tol=1e-5)


@pytest.mark.parametrize("priority", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("k, cf", [(1, 1.0), (2, 0.6), (2, 1.2)])
def test_the_fused_paper_router_decides_as_paper_routing_and_its_backward_is_autograds(k, cf, padded, priority):
    """routing_core.PaperRouter (the gate's training path) against paper_routing traced by autograd on
    the same inputs: the same routes bit for bit, the gate values and balance loss equal, and the
    hand-written gradients of the tokens and the gate matrix equal autograd's to rounding."""
    from ds_widenet.routing_core import PaperRouter, router_entropy, router_logits

    g = torch.Generator().manual_seed(11 + k)
    s, d, e = 48, 16, 4
    x = torch.randn(s, d, generator=g, requires_grad=True)
    w = (0.5 * torch.randn(e, d, generator=g)).requires_grad_()
    noise = torch.randn(s, e, generator=g)
    used = (torch.rand(s, generator=g) > 0.25) if padded else None
    probe = torch.randn(k, s, generator=g)  # an arbitrary downstream use of the gate values

    logits = torch.add(router_logits(x, w), noise, alpha=0.7)
    l_ref, cap, _, idx_ref, loc_ref, gates_ref, counts_ref = paper_routing(logits, k, cf, 1, used, True,
                                                                          priority=priority)
    ref = torch.autograd.grad(3.0 * l_ref + (gates_ref * probe).sum(), [x, w])
    l_aux, gates, idx, loc, counts, entropy = PaperRouter.apply(x, w, noise, 0.7, k, cf, 1, used, priority)
    got = torch.autograd.grad(3.0 * l_aux + (gates * probe).sum(), [x, w])

    assert torch.equal(idx, idx_ref) and torch.equal(loc, loc_ref) and torch.equal(counts, counts_ref)
    assert (idx == -1).any() or cf > 1  # the capacity drops routes where it is short
    assert torch.equal(gates, gates_ref) and torch.equal(l_aux, l_ref)
    torch.testing.assert_close(entropy, router_entropy(logits, used))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert b.abs().max() > 1e-3  # both paths carry a real gradient
