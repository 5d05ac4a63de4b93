"""Parameter groups, the per-parameter LAMB, optimizer selection and the learning-rate schedule."""
from __future__ import annotations


import pytest
import torch
from deepspeed.moe.layer import MoE
from torch import nn

from ds_widenet.config import ConfigError, OptimConfig, ScheduleConfig
from ds_widenet.optim import Lamb, build_optimizer, build_scheduler, lr_lambda, param_groups


class TinyMoEViT(nn.Module):
    """The parameter kinds a WideNet has: conv kernel, cls/pos embeddings, norms, linears, an MoE."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.norm = nn.LayerNorm(8)
        self.moe = MoE(hidden_size=8, expert=nn.Linear(8, 8), num_experts=2, ep_size=1, k=1)
        self.head = nn.Linear(8, 10)
        self.frozen = nn.Parameter(torch.ones(8, 8), requires_grad=False)


@pytest.fixture(scope="module")
def model() -> TinyMoEViT:
    return TinyMoEViT()


def _group_of(groups: list[dict], model: nn.Module) -> dict[str, dict]:
    """Parameter name -> the one group holding it (asserts it is held once)."""
    where: dict[int, dict] = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in where, "parameter in two groups"
            where[id(p)] = g
    return {n: where[id(p)] for n, p in model.named_parameters() if id(p) in where}


def test_every_trainable_param_is_in_exactly_one_group(model: TinyMoEViT) -> None:
    groups = param_groups(model, weight_decay=0.05)
    held = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(held) == len(set(held))
    assert sorted(held) == sorted(trainable)
    assert id(model.frozen) not in held


def test_norms_biases_and_embeddings_get_no_decay_and_no_trust_ratio(model: TinyMoEViT) -> None:
    by_name = _group_of(param_groups(model, weight_decay=0.05), model)
    for name in ("cls_token", "pos_embed", "norm.weight", "norm.bias", "head.bias", "patch_embed.bias",
                 "moe.deepspeed_moe.experts.deepspeed_experts.0.bias"):
        assert by_name[name]["weight_decay"] == 0.0, name
        assert by_name[name]["lamb_trust_ratio"] is False, name
    for name in ("patch_embed.weight", "head.weight", "moe.deepspeed_moe.gate.wg.weight",
                 "moe.deepspeed_moe.experts.deepspeed_experts.1.weight"):
        assert by_name[name]["weight_decay"] == 0.05, name
        assert by_name[name]["lamb_trust_ratio"] is True, name


def test_expert_params_land_in_moe_groups_and_shared_ones_do_not(model: TinyMoEViT) -> None:
    groups = param_groups(model, weight_decay=0.05)
    by_name = _group_of(groups, model)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_expert = ".deepspeed_experts." in name
        assert getattr(p, "allreduce", True) is (not is_expert)  # DeepSpeed's own marking
        assert by_name[name].get("moe", False) is is_expert, name
        if is_expert:
            assert by_name[name]["name"] == "ep_size_1"  # DeepSpeed finds the expert DP group by it
    base_names = [g["name"] for g in groups if not g.get("moe", False)]
    assert base_names == ["decay", "no_decay"]


def test_optimizers_keep_each_groups_own_weight_decay(model: TinyMoEViT) -> None:
    for name in ("adamw", "lamb"):
        cfg = OptimConfig(name=name, lr=1e-3, weight_decay=0.3)
        opt = build_optimizer(cfg, param_groups(model, weight_decay=0.05))
        decays = {(g["name"], g.get("moe", False), g["lamb_trust_ratio"]): g["weight_decay"] for g in opt.param_groups}
        assert decays == {("decay", False, True): 0.05, ("no_decay", False, False): 0.0,
                          ("ep_size_1", True, True): 0.05, ("ep_size_1", True, False): 0.0}, name
        assert all(g["lr"] == 1e-3 and g["eps"] == cfg.eps for g in opt.param_groups)


def test_fused_lamb_without_cuda_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="optim.name=lamb"):
        build_optimizer(OptimConfig(name="fused_lamb"), [{"params": [nn.Parameter(torch.ones(2))]}])


# --------------------------------------------------------------------------------------------
# LAMB


def reference_lamb(w: torch.Tensor, grads: list[torch.Tensor], lr: float, betas: tuple[float, float], eps: float,
                   weight_decay: float, trust: bool, max_ratio: float | None) -> torch.Tensor:
    """The paper's algorithm, written out for one tensor in float64 with no in-place ops."""
    b1, b2 = betas
    w = w.double()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps) + weight_decay * w
        ratio = 1.0
        if trust:
            w_norm, u_norm = w.norm().item(), u.norm().item()
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            if max_ratio is not None:
                ratio = min(ratio, max_ratio)
        w = w - lr * ratio * u
    return w


def test_lamb_matches_reference_over_several_steps() -> None:
    gen = torch.Generator().manual_seed(0)
    lr, betas, eps, wd, steps = 0.01, (0.9, 0.99), 1e-6, 0.1, 6
    big = 50 * torch.randn(4, 4, generator=gen)
    # (initial value, group options): a plain matrix, a large-norm matrix whose ratio hits the clamp,
    # the same without a clamp, a zero matrix (ratio 1 on its first step), a vector without trust ratio.
    cases = [
        (torch.randn(6, 5, generator=gen), dict(weight_decay=wd)),
        (big, dict(weight_decay=0.0)),  # decay would dominate the update and keep the ratio near 1/wd
        (big, dict(weight_decay=0.0, max_trust_ratio=None)),
        (torch.zeros(3, 3), dict(weight_decay=wd)),
        (torch.randn(7, generator=gen), dict(weight_decay=0.0, lamb_trust_ratio=False)),
    ]
    params = [nn.Parameter(w0.clone()) for w0, _ in cases]
    opt = Lamb([{"params": [p], **opts} for p, (_, opts) in zip(params, cases)], lr=lr, betas=betas, eps=eps)
    grads = [[torch.randn(w0.shape, generator=gen) for w0, _ in cases] for _ in range(steps)]
    for step_grads in grads:
        step_grads[2] = step_grads[1]  # clamped and unclamped see the same gradients
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    for i, (p, (w0, opts)) in enumerate(zip(params, cases)):
        expected = reference_lamb(w0, [step_grads[i] for step_grads in grads], lr, betas, eps,
                                  opts["weight_decay"], opts.get("lamb_trust_ratio", True),
                                  opts.get("max_trust_ratio", 10.0))
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6, msg=f"case {i}")
    # The clamp mattered: unclamped, the same large-norm matrix moves much further.
    assert (params[2] - big).norm() > 2 * (params[1] - big).norm()


def test_lamb_step_is_proportional_to_parameter_norm_not_gradient_scale() -> None:
    """The trust ratio makes ||step|| = lr * ||w|| (wd=0, no clamp), whatever the sizes of w and g."""
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(8, 8, generator=gen)
    g = torch.randn(8, 8, generator=gen)
    lr = 0.01
    for scale_w, scale_g in ((1.0, 1.0), (10.0, 1.0), (0.1, 1e3), (1.0, 1e-3)):
        p = nn.Parameter(scale_w * w0)
        p.grad = scale_g * g
        Lamb([p], lr=lr, max_trust_ratio=None).step()
        step = (p.detach() - scale_w * w0).norm()
        assert step.item() == pytest.approx(lr * scale_w * w0.norm().item(), rel=1e-4)


def test_lamb_skips_params_without_grad_and_returns_closure_loss() -> None:
    a, b = nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(3, 3))
    opt = Lamb([a, b], lr=0.1)

    def closure() -> torch.Tensor:
        loss = (a * 2).sum()
        loss.backward()  # Lamb.step runs the closure with grad enabled
        return loss

    loss = opt.step(closure)
    assert loss.item() == 18.0
    assert torch.equal(b.detach(), torch.ones(3, 3)) and b not in opt.state
    assert not torch.equal(a.detach(), torch.ones(3, 3))


# --------------------------------------------------------------------------------------------
# Schedule


def test_warmup_starts_small_rises_linearly_and_peaks_at_warmup_steps() -> None:
    values = [lr_lambda(s, 110, 10, "linear", 0.0) for s in range(11)]
    assert 0.0 < values[0] <= 0.1
    assert all(b > a for a, b in zip(values, values[1:]))
    assert values[9] < 1.0 and values[10] == 1.0
    assert lr_lambda(0, 100, 0, "linear", 0.0) == 1.0  # no warmup: peak at once


def test_linear_decay_reaches_min_ratio_at_total_steps_and_stays() -> None:
    assert lr_lambda(60, 110, 10, "linear", 0.1) == pytest.approx(0.55)
    assert lr_lambda(110, 110, 10, "linear", 0.1) == pytest.approx(0.1)
    assert lr_lambda(500, 110, 10, "linear", 0.1) == pytest.approx(0.1)


def test_cosine_decay_is_half_way_at_midpoint_and_min_at_end() -> None:
    assert lr_lambda(60, 110, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_lambda(60, 110, 10, "cosine", 0.2) == pytest.approx(0.6)
    assert lr_lambda(110, 110, 10, "cosine", 0.2) == pytest.approx(0.2)
    assert lr_lambda(35, 110, 10, "cosine", 0.0) > lr_lambda(35, 110, 10, "linear", 0.0)


def test_constant_schedule_holds_peak_after_warmup() -> None:
    assert [lr_lambda(s, 50, 5, "constant", 0.0) for s in (5, 20, 50)] == [1.0, 1.0, 1.0]


def test_scheduler_stepped_per_optimizer_step_follows_lr_lambda() -> None:
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = build_scheduler(opt, ScheduleConfig(decay="linear", min_lr_ratio=0.0), total_steps=20, warmup_steps=4)
    lrs = []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5 / 5)
    assert lrs[4] == pytest.approx(0.5)
    assert lrs[20] == pytest.approx(0.0, abs=1e-12)


def test_scheduler_rejects_min_lr_ratio_outside_unit_interval() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.5)
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        build_scheduler(opt, ScheduleConfig(min_lr_ratio=1.5), total_steps=10, warmup_steps=0)
