"""Parameter groups, optimizers (AdamW, a per-parameter LAMB) and the learning-rate schedule.

The optimizer is built here rather than from the DeepSpeed JSON so that MoE expert parameters always
sit in their own ``moe=True`` groups (DeepSpeed needs that to reduce expert gradients over the expert
data-parallel group) and so that LAMB skips the trust ratio for norms and biases.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Optional

import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from .config import ConfigError, OptimConfig, ScheduleConfig

# For a model without timm's `no_weight_decay()`: the embeddings, which ViT recipes do not decay.
_NO_DECAY_NAMES = ("pos_embed", "cls_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the trainable parameters of `model` into optimizer groups.

    Two base groups, named ``decay`` (matrices and convolution kernels: ``weight_decay``, LAMB trust
    ratio on) and ``no_decay`` (biases, norm weights, ``pos_embed``, ``cls_token``: no weight decay,
    no trust ratio, the LAMB paper's convention; the embeddings come from the model's timm-style
    ``no_weight_decay()``). DeepSpeed's splitter then moves expert parameters
    (``allreduce=False``) of each base group into groups with ``moe=True`` whose ``name`` is the
    expert group name (e.g. ``ep_size_2``) — DeepSpeed looks the expert data-parallel group up by that
    name, so the ``decay`` and ``no_decay`` expert groups share it. The splitter copies every other
    key, so expert groups keep their base group's ``weight_decay`` and ``lamb_trust_ratio``.

    Every parameter with ``requires_grad`` appears in exactly one group; frozen ones in none.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set(_NO_DECAY_NAMES)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and name not in skip:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "lamb_trust_ratio": True},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lamb_trust_ratio": False},
    ]
    return split_params_into_different_moe_groups_for_optimizer(groups)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"), one trust ratio per tensor.

    For each parameter ``w`` with gradient ``g`` at step ``t``::

        m = beta1 * m + (1 - beta1) * g            v = beta2 * v + (1 - beta2) * g**2
        u = (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps) + weight_decay * w
        r = ||w|| / ||u||   (1 where either norm is 0; at most max_trust_ratio unless that is None)
        w = w - lr * r * u

    A group with ``lamb_trust_ratio=False`` uses ``r = 1`` (plain Adam with decoupled decay), which
    ``param_groups`` sets for biases and norms. ``max_trust_ratio`` may also be set per group.

    The trust ratio is per *model parameter*. With ZeRO stage 0 the optimizer sees the parameters
    themselves (DeepSpeed's fp16/bf16 wrappers keep one fp32 master per parameter). Under ZeRO 1/2
    DeepSpeed hands it flat fp32 partitions holding pieces of many parameters, and a plain LAMB
    would compute one ratio per partition (DeepSpeed issues #88, #490; so does FusedLamb).
    ``attach_zero_partitions`` makes it ZeRO-aware: each partition element is mapped to its
    parameter, partial squared norms of w and u are summed per parameter and all-reduced over the
    partition's data-parallel group (the expert-data-parallel group for expert parameters), and
    the ratio is applied per parameter again.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_trust_ratio: Optional[float] = 10.0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"Lamb: lr={lr}, eps={eps} and weight_decay={weight_decay} must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: betas={betas} must be in [0, 1)")
        if max_trust_ratio is not None and max_trust_ratio <= 0:
            raise ValueError(f"Lamb: max_trust_ratio={max_trust_ratio} must be > 0 or None")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        max_trust_ratio=max_trust_ratio, lamb_trust_ratio=True)
        super().__init__(params, defaults)
        # id(flat partition) -> (element -> parameter index [n = padding], n, process group)
        self._partitions: dict[int, tuple[torch.Tensor, int, Any]] = {}

    def attach_zero_partitions(self, zero_optimizer: Any) -> None:
        """Learn DeepSpeedZeroOptimizer's (ZeRO 1/2) flat-partition layout from each parameter's
        ZeRO fragment (its place in this rank's partition; deepspeed_internals.fragment)."""
        from . import deepspeed_internals as dsi

        for flat, lps in dsi.zero_partitions(zero_optimizer):
            n = len(lps)
            owner = torch.full((flat.numel(),), n, dtype=torch.long, device=flat.device)
            group = None
            for j, lp in enumerate(lps):
                group = dsi.param_dp_group(lp, group)
                frag = dsi.fragment(lp)
                if frag is not None:
                    hp_start, _, numel = frag
                    owner[hp_start:hp_start + numel] = j
            self._partitions[id(flat)] = (owner, n, group)

    def _trust_ratio(self, p: torch.Tensor, update: torch.Tensor, max_ratio: Optional[float]) -> torch.Tensor:
        part = self._partitions.get(id(p))
        if part is None:
            w_norm, u_norm = p.norm(), update.norm()
        else:
            import torch.distributed as dist

            owner, n, group = part
            sums = torch.zeros(2, n + 1, dtype=torch.float32, device=p.device)
            sums[0].index_add_(0, owner, p.float().square())
            sums[1].index_add_(0, owner, update.float().square())
            if dist.is_initialized():
                dist.all_reduce(sums, group=group)
            w_norm, u_norm = sums[0].sqrt(), sums[1].sqrt()
        # torch.where rather than Python branching: no device-to-host sync per tensor on CUDA.
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        if max_ratio is not None:
            ratio = ratio.clamp(max=max_ratio)
        if part is not None:
            ratio[-1] = 1.0  # padding elements
            ratio = ratio[part[0]]
        return ratio

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
                update = (m / (1 - beta1**t)).div_(denom)
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                if group["lamb_trust_ratio"]:
                    update.mul_(self._trust_ratio(p, update, group["max_trust_ratio"]))
                p.add_(update, alpha=-group["lr"])
        return loss


def build_optimizer(cfg: OptimConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` over `groups` (from `param_groups`).

    ``cfg.weight_decay`` is only the default: each group's own ``weight_decay`` (0 for ``no_decay``)
    wins, as torch.optim fills in defaults only for keys a group lacks. ``fused_lamb`` is DeepSpeed's
    CUDA kernel; it applies the trust ratio to every group (it ignores ``lamb_trust_ratio``) and clamps
    it to [0.01, 10].
    """
    common = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, **common)
    if cfg.name == "lamb":
        return Lamb(groups, **common)
    if cfg.name == "fused_lamb":
        if not torch.cuda.is_available():
            raise ConfigError("optim.name=fused_lamb needs CUDA: use optim.name=lamb on the CPU")
        from deepspeed.ops.lamb import FusedLamb  # lazy: loading it JIT-builds a CUDA extension

        return FusedLamb(groups, **common)
    raise ConfigError(f"optim.name={cfg.name!r}: use adamw, lamb or fused_lamb")


def lr_lambda(step: int, total_steps: int, warmup_steps: int, decay: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for the optimizer step that follows `step` earlier steps.

    Warmup is the line from 0 at step -1 to 1 at step ``warmup_steps``: ``(step + 1) / (warmup_steps + 1)``,
    so the first step already learns a little and step ``warmup_steps`` runs at the peak. Then, over
    ``[warmup_steps, total_steps]``, ``linear`` (the paper's) or ``cosine`` decay to ``min_lr_ratio``,
    or ``constant``; steps past ``total_steps`` stay at ``min_lr_ratio``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if decay == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"schedule.decay={decay!r}: use linear, cosine or constant")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int,
                    warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_lambda`, to be stepped once per optimizer step.

    DeepSpeed's engine calls ``lr_scheduler.step()`` at each gradient-accumulation boundary, so the
    ``step`` seen by `lr_lambda` counts optimizer steps, not micro batches. `total_steps` and
    `warmup_steps` come from ``config.derived_steps``.
    """
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"schedule.min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]")
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got {total_steps}, {warmup_steps}")
    # functools.partial, not a lambda, so the scheduler itself stays picklable (a lambda is not).
    fn = partial(lr_lambda, total_steps=total_steps, warmup_steps=warmup_steps, decay=cfg.decay,
                 min_lr_ratio=cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def global_grad_norm(model: nn.Module) -> torch.Tensor:
    """The L2 norm of the whole model's gradient under expert parallelism, after DeepSpeed's
    gradient all-reduce: dense gradients are identical on every rank; each rank holds the
    gradients of its own experts, so their squares are summed over the expert-parallel group.
    DeepSpeed's ZeRO-0 clipping instead averages per-rank norms (DeepSpeed #8475)."""
    import torch.distributed as dist

    from . import deepspeed_internals as dsi

    # squares summed on the gradients' device in parameter order, then read back in one copy
    dense: Optional[torch.Tensor] = None
    experts: dict[str, torch.Tensor] = {}
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum()
        if dsi.is_expert_param(p):
            name = dsi.expert_group_name(p)
            experts[name] = experts[name] + sq if name in experts else sq
        else:
            dense = sq if dense is None else dense + sq
    names = sorted(experts)
    sums = [dense, *[experts[n] for n in names]]
    dev = next((t.device for t in sums if t is not None), torch.device("cpu"))
    host = torch.stack([torch.zeros((), dtype=torch.float64, device=dev) if t is None else t for t in sums]).cpu()
    total = host[0]
    for i, name in enumerate(names, start=1):
        sq = host[i].clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sq, group=dsi.expert_parallel_group(name))
        total = total + sq
    return total.sqrt()


def clip_grad_norm_global_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip in place by the global norm (see global_grad_norm); returns the norm before clipping."""
    norm = global_grad_norm(model)
    coef = max_norm / (float(norm) + 1e-6)
    if coef < 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm

