"""Model behaviour: shapes, the paper's parameter counts, weight sharing, routing, init, recompute."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import ds_widenet  # noqa: F401  (selects DeepSpeed's CPU accelerator before deepspeed is imported)
from ds_widenet.config import ModelConfig, MoEConfig
from ds_widenet.models import PRESETS, PaperGate, WideNet, build_model, count_params, get_preset
from ds_widenet.models.routing import RouteKey, paper_routing


def tiny(arch: str = "widenet", **moe_kw) -> ModelConfig:
    moe = MoEConfig(num_experts=4, k=2, expert_dim=32, min_capacity=1, **moe_kw) if arch != "vit" else None
    return ModelConfig(arch=arch, img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=16, depth=3,
                       num_heads=2, mlp_dim=32, moe=moe, moe_last_n=2)


def model_of(cfg: ModelConfig, **kw) -> torch.nn.Module:
    """build_model, with a random head instead of the zero-initialised one, so logits carry signal."""
    model = build_model(cfg, **kw)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=torch.Generator().manual_seed(11)))
    return model


def images(b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["widenet", "vit", "vit_moe"])
def test_forward_returns_logits_aux_and_one_routing_record_per_moe_call(arch):
    cfg = tiny(arch)
    out = build_model(cfg)(images())
    assert out.logits.shape == (4, 5)
    n_moe = {"widenet": cfg.depth, "vit": 0, "vit_moe": cfg.moe_last_n}[arch]
    assert len(out.routing) == n_moe
    for r in out.routing:
        assert r.expert_index.shape == (2, 4, 16)
        assert r.expert_tokens.shape == (4,)


@pytest.mark.parametrize("name", [n for n, (_, paper) in PRESETS.items() if paper])
def test_paper_presets_match_the_papers_parameter_counts_within_3_percent(name):
    cfg, paper_m = PRESETS[name]
    n = count_params(build_model(cfg, device="meta"))
    assert abs(n / 1e6 - paper_m) / paper_m < 0.03, (name, n)


def test_widenet_registers_one_attention_one_moe_and_a_norm_pair_per_depth():
    model = model_of(tiny())
    keys = list(model.state_dict())
    assert len(keys) == len(set(keys))
    assert sum(k.startswith("attn.qkv.weight") for k in keys) == 1
    assert sum(k.endswith("gate.wg.weight") for k in keys) == 1
    assert sum(k.startswith("attn_norms.") and k.endswith("weight") for k in keys) == 3
    assert sum(k.startswith("moe_norms.") and k.endswith("weight") for k in keys) == 3
    # no module is reachable under two names (no aliasing)
    mods = list(model.named_modules(remove_duplicate=False))
    assert len(mods) == len({id(m) for _, m in mods})
    norms = list(model.attn_norms) + list(model.moe_norms)
    assert len({id(n.weight) for n in norms}) == 6


def _untied_forward(model: WideNet, attns, moes, x, key):
    h = model.embed(x, key)
    aux = torch.zeros(())
    for i in range(model.cfg.depth):
        h = h + attns[i](model.attn_norms[i](h), i, key)
        y, a, _ = moes[i](model.moe_norms[i](h), i, key, None)
        h, aux = h + y, aux + a
    return model.forward_head(h), aux


def test_shared_weight_gradients_equal_the_summed_gradients_of_an_untied_copy():
    torch.manual_seed(0)
    model = model_of(tiny(capacity_factor=4.0), seed=1).train()
    attns = [copy.deepcopy(model.attn) for _ in range(3)]
    moes = [copy.deepcopy(model.moe) for _ in range(3)]
    x, key = images(), RouteKey(seed=3, step=7, sample_ids=torch.arange(4))

    out = model(x, sample_ids=key.sample_ids, step=7, seed=3)
    (out.logits.square().sum() + out.aux_loss).backward()
    logits, aux = _untied_forward(model, attns, moes, x, key)
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-6)
    model.zero_grad()
    (logits.square().sum() + aux).backward()
    untied_attn = {n: sum(a.get_parameter(n).grad for a in attns) for n, _ in model.attn.named_parameters()}
    untied_moe = {n: sum(m.get_parameter(n).grad for m in moes) for n, _ in model.moe.named_parameters()}

    model2 = model_of(tiny(capacity_factor=4.0), seed=1).train()
    out2 = model2(x, sample_ids=key.sample_ids, step=7, seed=3)
    (out2.logits.square().sum() + out2.aux_loss).backward()
    for n, p in model2.attn.named_parameters():
        torch.testing.assert_close(p.grad, untied_attn[n], rtol=1e-4, atol=1e-6)
    for n, p in model2.moe.named_parameters():
        torch.testing.assert_close(p.grad, untied_moe[n], rtol=1e-4, atol=1e-6)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model2.moe.parameters())


def test_aux_loss_is_the_sum_over_depths():
    out = model_of(tiny()).train()(images())
    per_depth = torch.stack([r.aux_loss for r in out.routing])
    assert len(per_depth) == 3
    torch.testing.assert_close(out.aux_loss, per_depth.sum())


def test_eval_mode_uses_the_eval_capacity_factor():
    model = model_of(tiny(capacity_factor=0.25, eval_capacity_factor=2.0, noise_std=0.0))
    train_drop = torch.stack([r.dropped for r in model.train()(images(16)).routing])
    eval_drop = torch.stack([r.dropped for r in model.eval()(images(16)).routing])
    assert train_drop.min() > 0.3  # capacity ceil(64/4*0.25*2)=8 slots per expert for 128 routes
    assert eval_drop.max() == 0.0


def test_experts_start_different_and_each_rank_holds_the_same_global_experts():
    full = model_of(tiny(), ep_size=1, seed=5)
    experts = full.moe.local_experts
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(experts[i].fc1.weight, experts[j].fc1.weight)
    for ep_rank in (0, 1):
        half = model_of(tiny(), ep_size=2, ep_rank=ep_rank, seed=5)
        for i, e in enumerate(half.moe.local_experts):
            torch.testing.assert_close(e.fc1.weight, experts[2 * ep_rank + i].fc1.weight, rtol=0, atol=0)
        # non-expert weights do not depend on the layout either
        torch.testing.assert_close(half.attn.qkv.weight, full.attn.qkv.weight, rtol=0, atol=0)


def test_vit_moe_blocks_get_different_experts():
    model = model_of(tiny("vit_moe"), seed=0)
    e_a = model.blocks[1].ffn.local_experts[0].fc1.weight
    e_b = model.blocks[2].ffn.local_experts[0].fc1.weight
    assert not torch.equal(e_a, e_b)


def test_paper_gate_keeps_softmax_gate_values_and_deepspeed_gate_renormalises():
    torch.manual_seed(0)
    logits = torch.randn(64, 4)
    _, _, _, idx, _, gates, _ = paper_routing(logits, 2, 4.0, 1, None, True)
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=1)
    torch.testing.assert_close(gates.t(), top.values)
    assert (gates.sum(0) < 1).all()
    assert torch.equal(idx.t().long(), top.indices)

    from deepspeed.moe.sharded_moe import top2gating
    ds = top2gating(logits.clone(), 4.0, 1, top2_2nd_expert_sampling=False, sparse_routes=True)
    torch.testing.assert_close(ds[5].sum(0), torch.ones(64))


def test_router_noise_depends_on_sample_id_not_on_batch_company():
    model = model_of(tiny(capacity_factor=8.0)).train()
    x = images(4)
    both = model(x, sample_ids=torch.tensor([10, 11, 12, 13]), step=3, seed=1)
    alone = model(x[2:3], sample_ids=torch.tensor([12]), step=3, seed=1)
    for d in range(3):
        assert torch.equal(both.routing[d].expert_index[:, 2], alone.routing[d].expert_index[:, 0])
    torch.testing.assert_close(both.logits[2:3], alone.logits, rtol=1e-5, atol=1e-6)
    other_step = model(x, sample_ids=torch.tensor([10, 11, 12, 13]), step=4, seed=1)
    assert not all(torch.equal(a.expert_index, b.expert_index) for a, b in zip(both.routing, other_step.routing))


def test_widenet_draws_every_depths_router_noise_in_one_call_equal_to_each_depths_own(monkeypatch):
    from ds_widenet import rng
    from ds_widenet.models.routing import KeyedRouterNoise, keyed_router_noise

    model = model_of(tiny(capacity_factor=1.0)).train()  # 3 depths through one gate
    gate = model.moe.gate
    assert isinstance(gate.noise_source, KeyedRouterNoise) and gate.noise_source.num_depths == 3
    calls, real_rows = [], rng.keyed_normal_rows
    monkeypatch.setattr(rng, "keyed_normal_rows", lambda *a, **k: calls.append(1) or real_rows(*a, **k))
    x, ids = images(4), torch.tensor([10, 11, 12, 13])
    batched = model(x, sample_ids=ids, step=3, seed=1)
    assert len(calls) == 1  # one draw for the 3 depths of the forward
    gate.noise_source = keyed_router_noise  # the per-depth definition
    per_depth = model(x, sample_ids=ids, step=3, seed=1)
    assert len(calls) == 1
    assert torch.equal(batched.logits, per_depth.logits)
    for a, b in zip(batched.routing, per_depth.routing):
        assert torch.equal(a.expert_index, b.expert_index)


def test_padding_samples_take_no_capacity_so_real_samples_do_not_depend_on_them():
    model = model_of(tiny(noise_std=0.0, eval_capacity_factor=0.5)).eval()
    # padding first: its tokens would queue for capacity before the real ones
    valid = torch.tensor([False, False, True, True])
    x1, x2 = images(4, seed=1), images(4, seed=2)
    x2[2:] = x1[2:]  # same real samples, different padding content
    out1, out2 = model(x1, valid=valid), model(x2, valid=valid)
    torch.testing.assert_close(out1.logits[2:], out2.logits[2:], rtol=0, atol=0)
    for r in out1.routing:
        assert (r.expert_index[:, :2] == -1).all()
    # without the mask the padding competes for the (small) capacity and changes the real samples
    no_mask = [model(x, sample_ids=torch.arange(4)).logits[2:] for x in (x1, x2)]
    assert not torch.equal(no_mask[0], no_mask[1])


@pytest.mark.parametrize("arch", ["widenet", "vit_moe"])
def test_activation_checkpointing_recomputes_the_same_routing_and_gradients(arch):
    cfg = replace(tiny(arch, capacity_factor=1.0), dropout=0.1, attn_dropout=0.1)
    grads = []
    for ckpt in (False, True):
        model = model_of(replace(cfg, grad_checkpointing=ckpt), seed=2).train()
        out = model(images(8), sample_ids=torch.arange(8) + 100, step=5, seed=9)
        (out.logits.square().mean() + 0.01 * out.aux_loss).backward()
        grads.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (o1, g1), (o2, g2) = grads
    torch.testing.assert_close(o1.logits, o2.logits, rtol=0, atol=0)
    for a, b in zip(o1.routing, o2.routing):
        assert torch.equal(a.expert_index, b.expert_index)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-6, atol=1e-7)


def test_per_depth_gate_holds_one_matrix_per_depth_and_uses_it():
    model = model_of(tiny(per_depth_gate=True, noise_std=0.0)).eval()
    gate = model.moe.gate
    assert isinstance(gate, PaperGate)
    assert gate.wg.weight.shape == (3 * 4, 16)
    x = torch.randn(10, 16)
    before = [gate.logits(x, d) for d in range(3)]
    with torch.no_grad():
        gate.wg.weight[4:8] += 1.0  # depth 1's matrix only
    after = [gate.logits(x, d) for d in range(3)]
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.equal(before[1], after[1])


def test_deepspeed_router_is_deepspeeds_topkgate_sampling_in_training_only():
    from deepspeed.moe.sharded_moe import TopKGate

    from ds_widenet.models import DeepSpeedGate

    model = model_of(tiny(router="deepspeed"))
    gate = model.moe.gate
    assert type(gate) is DeepSpeedGate and type(gate).__mro__[1] is TopKGate
    assert type(gate).forward is not TopKGate.forward and gate.top2_2nd_expert_sampling
    out = model.train()(images())
    assert len(out.routing) == 3
    # evaluation is deterministic: DeepSpeed's Gumbel sampling of the second expert would redraw
    # from torch's global generator at every call
    model.eval()
    x = images()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert all(torch.equal(r.expert_index, s.expert_index) for r, s in zip(a.routing, b.routing))
    assert torch.equal(a.logits, b.logits)
    assert gate.top2_2nd_expert_sampling  # restored after the call


def test_deepspeeds_unmodified_topkgate_is_random_in_evaluation():
    # the reason for DeepSpeedGate: if this ever passes unmodified, the subclass can go
    from deepspeed.moe.sharded_moe import TopKGate

    gate = TopKGate(16, 4, k=2, min_capacity=1, top2_2nd_expert_sampling=True).eval()
    x = torch.randn(64, 16)
    runs = [gate(x, None, True, False)[3] for _ in range(4)]
    assert any(not torch.equal(runs[0], r) for r in runs[1:])


def test_presets_table_cli_prints_json_with_name_and_params():
    import json
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "ds_widenet.models", "--json"], capture_output=True, text=True, check=True)
    rows = json.loads(res.stdout)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == set(PRESETS)
    assert abs(by_name["widenet-l"]["params"] / 1e6 - 40) / 40 < 0.03
    assert get_preset("widenet-b").moe.k == 2


@pytest.mark.parametrize("arch", ["widenet", "vit", "vit_moe"])
def test_timm_conventions_no_weight_decay_grad_checkpointing_and_reset_classifier(arch):
    from ds_widenet.optim import param_groups

    cfg = tiny() if arch == "widenet" else replace(tiny(), arch=arch, pool="cls", moe_last_n=1)
    model = model_of(cfg)
    skip = model.no_weight_decay()
    assert "pos_embed" in skip and (("cls_token" in skip) == (cfg.pool == "cls"))
    groups = param_groups(model, 0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.pos_embed) not in decayed and id(model.attn_norms[0].weight if arch == "widenet"
                                                    else model.blocks[0].norm1.weight) not in decayed
    assert not model.grad_checkpointing
    model.set_grad_checkpointing(True)
    x = images()
    model.train()(x).logits.sum().backward()  # runs through torch.utils.checkpoint
    model.reset_classifier(3)
    assert model(x).logits.shape == (x.shape[0], 3) and model.cfg.num_classes == 3
    assert torch.count_nonzero(model.head.weight) == 0


def test_widenet_and_vit_share_one_depth_loop():
    from ds_widenet.models import ViT, WideNet
    from ds_widenet.models.base import VisionBackbone

    assert WideNet.forward_features is VisionBackbone.forward_features is ViT.forward_features


# --------------------------------------------------------------------------------------------
# Routers beyond the paper's inside the models (the routing arithmetic itself: test_routers.py)


def _train(cfg: ModelConfig, steps: int, z_weight: float = 0.0) -> torch.nn.Module:
    model = model_of(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    labels = torch.arange(8) % 5
    for step in range(steps):
        out = model(images(8, seed=step % 3), step=step)
        loss = torch.nn.functional.cross_entropy(out.logits, labels) + 0.01 * out.aux_loss
        if z_weight:
            loss = loss + z_weight * out.z_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_the_z_loss_is_computed_only_when_weighted_and_trains_the_router_logits_down():
    assert build_model(tiny())(images()).z_loss is None
    cfg = tiny(z_loss_weight=1.0)
    with torch.no_grad():
        before = float(model_of(cfg).eval()(images()).z_loss)
    plain = _train(cfg, 25, z_weight=0.0).eval()
    zl = _train(cfg, 25, z_weight=1.0).eval()
    with torch.no_grad():
        z_plain, z_trained = float(plain(images()).z_loss), float(zl(images()).z_loss)
    # the same 25 steps with the z-loss in the objective leave router logits of far smaller magnitude
    assert z_trained < 0.5 * z_plain and z_trained < before, (before, z_plain, z_trained)


@pytest.mark.parametrize("router", ["paper", "deepspeed"])
def test_the_z_loss_is_of_the_logits_before_the_noise_and_reaches_the_gate(router):
    cfg = tiny(router=router, z_loss_weight=1e-3)
    model = model_of(cfg)
    x = images()
    out = model.train()(x, step=3)  # router noise on (paper), Gumbel sampling (deepspeed)
    with torch.no_grad():
        ev = model.eval()(x)
    # depth 0 sees the same input in both modes (deeper ones differ: other tokens dropped): the same
    # logits, so the training noise does not enter the z-loss
    assert torch.equal(out.routing[0].z_loss.detach(), ev.routing[0].z_loss)
    torch.testing.assert_close(out.z_loss.detach(), sum(r.z_loss for r in out.routing).detach(), rtol=1e-6, atol=0)
    out.z_loss.backward()
    gate = next(p for n, p in model.named_parameters() if n.endswith("gate.wg.weight"))
    assert gate.grad is not None and gate.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["widenet", "vit_moe"])
def test_expert_choice_fills_every_expert_to_capacity_and_trains_gate_and_experts(arch):
    cfg = tiny(arch, router="expert_choice", capacity_factor=1.0, eval_capacity_factor=1.0)
    model = model_of(cfg).train()
    out = model(images(4))
    cap = 4 * 16 * 2 // 4  # k * S / E at capacity factor 1
    for r in out.routing:
        assert r.expert_index.shape == (4, 4, 16)  # one row per expert
        assert r.expert_tokens.tolist() == [float(cap)] * 4
        assert float(r.aux_loss) == 0.0
    out.logits.square().sum().backward()
    gate = [p for n, p in model.named_parameters() if n.endswith("gate.wg.weight")]
    experts = [p for n, p in model.named_parameters() if "deepspeed_experts" in n and n.endswith("fc1.weight")]
    assert gate and experts
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate + experts)
