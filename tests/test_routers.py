"""The routers beyond the paper's, each against an independent small implementation on fixed inputs:
`bpr` (V-MoE's Batch Prioritized Routing)."""
from __future__ import annotations

import pytest
import torch

from ds_widenet.config import ConfigError, MoEConfig
from ds_widenet.routing_core import paper_routing


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
    assert torch.equal(gates, torch.tensor(ref_gate))  # float32 values, multiplied by 1 or 0
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


def test_bpr_is_a_router_option_and_allows_the_per_depth_gate():
    assert MoEConfig(router="bpr", per_depth_gate=True).router == "bpr"
    with pytest.raises(ConfigError, match="'paper', 'bpr' or 'deepspeed'"):
        MoEConfig(router="priority")
