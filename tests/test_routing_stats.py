"""Per-depth routing statistics (share, drops, aux, router entropy, how routes change from depth
to depth), their reduction over ranks, and the routing warnings."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

import ds_widenet  # noqa: F401  (selects DeepSpeed's CPU accelerator before deepspeed is imported)
from ds_widenet.config import ConfigError, ModelConfig, MoEConfig, load_recipe
from ds_widenet.routing_stats import RoutingAccumulator, RoutingWatch, route_changes
from ds_widenet.runlog import MetricsLog, read_metrics
from ds_widenet.models import RoutingStats, build_model

E = 4


def tiny(depth: int = 3, router: str = "paper", per_depth_gate: bool = False, **moe_kw) -> torch.nn.Module:
    moe = MoEConfig(num_experts=E, k=2, expert_dim=32, min_capacity=1, router=router, per_depth_gate=per_depth_gate,
                    **moe_kw)
    cfg = ModelConfig(arch="widenet", img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=16, depth=depth,
                      num_heads=2, mlp_dim=32, moe=moe)
    return build_model(cfg, seed=0)


def images(b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def constant_router(model, prefs_per_depth: list[list[float]]) -> None:
    """Every token reaching depth d's MoE is the same vector (that depth's norm: weight 0, bias 1),
    so the router's logits at depth d are exactly prefs_per_depth[d] for every token (a forced,
    per-depth routing: the experts with low logits receive nothing)."""
    d_model = model.cfg.embed_dim
    gate = model.moe.gate
    for d, norm in enumerate(model.moe_norms):
        norm.weight.zero_()
        norm.bias.fill_(1.0)
    rows = [torch.tensor(p).float().unsqueeze(1).expand(E, d_model) / d_model for p in prefs_per_depth]
    gate.wg.weight.copy_(torch.cat(rows) if gate.wg.weight.shape[0] > E else rows[0])


def summary_of(model, n_calls: int = 2, train: bool = True) -> dict:
    model.train(train)
    acc = RoutingAccumulator(route_change=True)
    with torch.no_grad():
        for i in range(n_calls):
            acc.add(model(images(seed=i), step=i).routing)
    return acc.reduce()


def fake_stats(expert_index: list, dropped: float = 0.0, entropy: float = 1.0, num_tokens: int = 4) -> RoutingStats:
    idx = torch.tensor(expert_index)
    kept = idx[idx >= 0]
    return RoutingStats(aux_loss=torch.tensor(1.0), expert_index=idx,
                        expert_tokens=torch.bincount(kept, minlength=E).float(), dropped=torch.tensor(dropped),
                        entropy=torch.tensor(entropy), num_tokens=torch.tensor(num_tokens))


# --------------------------------------------------------------------------------------------
# Router entropy


@pytest.mark.parametrize("router", ["paper", "bpr", "deepspeed"])
def test_router_entropy_is_ln_E_for_a_uniform_router_and_the_softmax_entropy_of_a_forced_one(router):
    model = tiny(router=router).eval()
    with torch.no_grad():
        model.moe.gate.wg.weight.zero_()
    for r in model(images()).routing:
        assert float(r.entropy) == pytest.approx(math.log(E), abs=1e-5)
    prefs = [3.0, 1.0, -2.0, -2.0]
    constant_router(model, [prefs])
    p = torch.softmax(torch.tensor(prefs), 0)
    expected = float(-(p * p.log()).sum())
    for r in model(images()).routing:
        assert float(r.entropy) == pytest.approx(expected, abs=1e-4)
        assert int(r.num_tokens) == 4 * 16


def test_padding_tokens_count_neither_in_entropy_nor_in_the_token_weights():
    model = tiny().eval()
    valid = torch.tensor([True, True, False, False])
    full = model(images()[:2]).routing
    padded = model(images(), valid=valid).routing  # the first two samples are the same images
    for a, b in zip(full, padded):
        assert int(b.num_tokens) == 2 * 16
        assert float(b.entropy) == pytest.approx(float(a.entropy), abs=1e-5)


def test_drop_rate_and_entropy_are_weighted_by_tokens_over_calls():
    acc = RoutingAccumulator()
    acc.add([fake_stats([[[0, 1, 2, 3]]], dropped=0.5, entropy=1.0, num_tokens=10)])
    acc.add([fake_stats([[[0, 1, 2, 3]]], dropped=0.1, entropy=0.2, num_tokens=30)])
    s = acc.reduce()
    assert s["drop_rate"] == [pytest.approx(0.2)]
    assert s["router_entropy"] == [pytest.approx(0.4)]


# --------------------------------------------------------------------------------------------
# Routing across depths


@pytest.mark.parametrize("k", [1, 2])
def test_a_call_that_drops_no_route_reports_a_drop_rate_of_exactly_zero_at_any_token_count(k):
    from ds_widenet.routing_core import stats_from_routes

    # k * S = 41, 47, 55, ... are where a product with the rounded 1 / (k * S) would leave 6e-8
    for s in (41, 47, 55, 61, 82, 1088, 2999):
        idx = torch.arange(k * s).remainder(E).view(k, s)
        counts = torch.bincount(idx.flatten(), minlength=E)
        for c in (None, counts):
            assert stats_from_routes(torch.zeros(()), idx, E, 1, None, counts=c).dropped.item() == 0.0, (s, c)
    # one route of k * S dropped: exactly the fraction 1 - (k S - 1) / (k S) in float32
    s = 47
    idx = torch.arange(k * s).remainder(E).view(k, s)
    idx[0, 0] = -1
    got = stats_from_routes(torch.zeros(()), idx, E, 1, None).dropped
    assert got.item() == (1.0 - torch.tensor(float(k * s - 1)) / (k * s)).item()


def test_route_change_counts_tokens_whose_top_k_set_differs_and_leaves_out_dropped_routes():
    # [k=2, B=1, T=5]; token 0: {0,1} -> {1,0} same set; 1: {2,3} -> {2,1} changed; 2: a route dropped
    # at depth 0; 3: dropped at depth 1 (both left out); 4: {0,3} -> {3,2} changed
    d0 = fake_stats([[[0, 2, 0, 1, 0]], [[1, 3, -1, 2, 3]]])
    d1 = fake_stats([[[1, 2, 0, -1, 3]], [[0, 1, 1, -1, 2]]])
    d2 = fake_stats([[[1, 2, 0, 0, 3]], [[0, 1, 1, 1, 2]]])
    changed, compared = route_changes([d0, d1, d2])  # pairs (0, 1), (0, 2), (1, 2)
    assert changed[[0, 2]].tolist() == [2.0, 0.0] and compared[[0, 2]].tolist() == [3.0, 4.0]
    acc = RoutingAccumulator(route_change=True)  # evaluation's accumulator
    acc.add([d0, d1, d2])
    assert acc.reduce()["route_change"] == [pytest.approx(2 / 3, abs=1e-4), 0.0]


def test_expert_choice_route_change_compares_the_sets_of_experts_that_took_each_token():
    # [E=4, B=1, T=4], row e = e where expert e took the token; token 0: {0,1} -> {0,1} same;
    # 1: {2} -> {2,3} changed; 2: no expert at depth 0 (left out); 3: {3} -> {1} changed
    d0 = fake_stats([[[0, -1, -1, -1]], [[1, -1, -1, -1]], [[-1, 2, -1, -1]], [[-1, -1, -1, 3]]])
    d1 = fake_stats([[[0, -1, 0, -1]], [[1, -1, -1, 1]], [[-1, 2, -1, -1]], [[-1, 3, -1, -1]]])
    for d in (d0, d1):
        d.expert_choice = True
    changed, compared = route_changes([d0, d1])
    assert changed.tolist() == [2.0] and compared.tolist() == [3.0]


def test_route_change_is_zero_for_depths_that_route_alike_and_one_for_depths_that_swap_experts():
    same = tiny(depth=4, per_depth_gate=True, eval_capacity_factor=4.0)
    constant_router(same, [[4.0, 3.0, -4.0, -4.0]] * 4)
    assert summary_of(same, train=False)["route_change"] == [0.0, 0.0, 0.0]
    swap = tiny(depth=4, per_depth_gate=True, eval_capacity_factor=4.0)
    constant_router(swap, [[4.0, 3.0, -4.0, -4.0], [-4.0, -4.0, 3.0, 4.0]] * 2)
    s = summary_of(swap, train=False)
    assert s["route_change"] == [1.0, 1.0, 1.0]
    # every pair of depths: depths 0 and 2 (1 and 3) route alike, the others swap
    assert s["route_change_matrix"] == [[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0],
                                        [0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]]


def test_a_real_widenet_routes_some_tokens_differently_at_different_depths():
    s = summary_of(tiny(depth=4), train=False)
    assert len(s["route_change"]) == 3
    assert all(0.0 <= v <= 1.0 for v in s["route_change"])
    assert max(s["route_change"]) > 0.0  # the per-depth norms make the shared router route differently


# --------------------------------------------------------------------------------------------
# Warnings


def test_an_expert_the_router_never_picks_is_reported_after_patience_log_steps_once_per_episode(tmp_path):
    model = tiny(capacity_factor=4.0)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    watch = RoutingWatch(log, min_share=0.05, patience=3, max_drop=0.3)
    constant_router(model, [[4.0, 3.0, -4.0, -4.0]])  # experts 2 and 3 get nothing, at every depth
    issued = []
    for step in range(1, 5):
        s = summary_of(model)
        assert [row[2] for row in s["expert_share"]] == [0.0] * 3 and s["drop_rate"] == [0.0] * 3
        issued.append(watch.update(step, s))
    assert issued[0] == [] and issued[1] == [] and issued[3] == []  # not before patience, not repeated
    assert len(issued[2]) == 1 and "3 consecutive log steps" in issued[2][0]
    assert "depth 0 expert 2 (0.000)" in issued[2][0] and "depth 2 expert 3 (0.000)" in issued[2][0]
    model.load_state_dict(original)  # healthy routing: the episode ends
    healthy = summary_of(model)
    assert healthy["min_expert_share"] > 0.05
    assert watch.update(5, healthy) == []
    constant_router(model, [[4.0, 3.0, -4.0, -4.0]])  # a new episode: reported again after patience
    assert [bool(watch.update(step, summary_of(model))) for step in (6, 7, 8)] == [False, False, True]
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "warning" in r]
    assert [r["step"] for r in rows] == [3, 8]


def test_a_capacity_that_drops_most_tokens_is_reported_at_once_and_once_per_episode(tmp_path):
    model = tiny(capacity_factor=0.05)
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    watch = RoutingWatch(log, min_share=0.05, patience=3, max_drop=0.3)
    s = summary_of(model)
    assert all(d > 0.8 for d in s["drop_rate"])
    first = watch.update(1, s)
    assert len(first) == 1 and "drop rate above 0.3" in first[0] and "depth 2" in first[0]
    assert "capacity_factor" in first[0]
    assert watch.update(2, summary_of(model)) == []
    assert RoutingWatch(log, max_drop=1.0, min_share=0.0).update(1, s) == []  # both checks off
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "warning" in r] == [1]


def test_warnings_are_metrics_records_and_log_messages_on_rank_0_only(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ds_widenet"):
        MetricsLog(tmp_path / "m.jsonl", enabled=True).warn(7, "something is off")
        MetricsLog(tmp_path / "other.jsonl", enabled=False).warn(7, "not on rank 0")
    rows = read_metrics(tmp_path / "m.jsonl")
    assert rows[0]["step"] == 7 and rows[0]["warning"] == "something is off"
    assert not (tmp_path / "other.jsonl").exists()
    assert [r.getMessage() for r in caplog.records] == ["step 7: something is off"]


def test_warning_thresholds_and_nan_policy_are_validated_with_one_line_errors():
    assert load_recipe(None, ["train.nan_policy=skip"]).train.nan_policy == "skip"
    for override, needle in [("train.nan_policy=ignore", "nan_policy"), ("train.warn_patience=0", "warn_patience"),
                             ("train.warn_min_expert_share=1.5", "warn_min_expert_share"),
                             ("train.warn_max_drop_rate=-0.1", "warn_max_drop_rate")]:
        with pytest.raises(ConfigError, match=needle) as e:
            load_recipe(None, [override])
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------
# Over ranks


def _reduce_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    acc = RoutingAccumulator(route_change=True)
    # rank 0: every route to experts 0/1, nothing dropped; rank 1: experts 2/3, half dropped
    idx = [[[0, 0, 0, 0]], [[1, 1, 1, 1]]] if rank == 0 else [[[2, 2, -1, -1]], [[3, 3, -1, -1]]]
    tokens = torch.tensor([4.0, 4.0, 0.0, 0.0]) if rank == 0 else torch.tensor([0.0, 0.0, 2.0, 2.0])
    st = RoutingStats(aux_loss=torch.tensor(1.0 + rank), expert_index=torch.tensor(idx), expert_tokens=tokens,
                      dropped=torch.tensor(0.5 * rank), entropy=torch.tensor(0.1 + rank), num_tokens=torch.tensor(4))
    acc.add([st, st])
    s = acc.reduce()
    if rank == 0:
        Path(out).write_text(json.dumps(s))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_reduce_aggregates_every_rank(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "s.json"
    mp.start_processes(_reduce_worker, args=(2, f"file://{tmp_path / 'store'}", str(out)), nprocs=2,
                       start_method="spawn")
    s = json.loads(out.read_text())
    assert s["expert_share"] == [[0.3333, 0.3333, 0.1667, 0.1667]] * 2
    assert s["drop_rate"] == [0.25, 0.25]
    assert s["router_entropy"] == [pytest.approx(0.6), pytest.approx(0.6)]
    assert s["aux_per_depth"] == [1.5, 1.5]
    assert s["route_change"] == [0.0]  # the same routes at both depths on each rank


class FakeMonitor:
    enabled = True

    def __init__(self) -> None:
        self.events: list = []

    def write_events(self, events) -> None:
        self.events += events


def test_per_depth_lists_reach_the_monitors_as_named_scalars(tmp_path):
    mon = FakeMonitor()
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True, monitor=mon)
    s = summary_of(tiny())
    log.write({"step": 20, "loss": 1.5, **{k: s[k] for k in ("expert_share", "drop_rate", "aux_per_depth",
                                                              "router_entropy", "min_expert_share")}})
    log.write({"step": 20, "top1": 0.5, "eval_route_change": [0.25, None], "eval_router_entropy": [1.0, 1.1, 1.2],
               "eval_expert_share": [0.1, 0.2, 0.3, 0.4]}, prefix="Eval")
    ev = {name: (value, step) for name, value, step in mon.events}
    assert ev["Train/loss"] == (1.5, 20)
    assert ev["Routing/depth2/entropy"] == (s["router_entropy"][2], 20)
    assert ev["Routing/depth1/expert3_share"] == (s["expert_share"][1][3], 20)
    assert ev["Routing/depth0/drop_rate"][0] == s["drop_rate"][0]
    assert ev["Routing/depth2/aux_loss"][0] == s["aux_per_depth"][2]
    assert ev["Eval/top1"] == (0.5, 20)
    assert ev["EvalRouting/depth0_to_1/route_change"] == (0.25, 20)
    assert "EvalRouting/depth1_to_2/route_change" not in ev  # None (no token compared) is not a scalar
    assert ev["EvalRouting/depth2/entropy"] == (1.2, 20)
    assert ev["EvalRouting/expert3_share"] == (0.4, 20)
    rec = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert len(rec["expert_share"]) == 3 and len(rec["expert_share"][0]) == E and len(rec["router_entropy"]) == 3
