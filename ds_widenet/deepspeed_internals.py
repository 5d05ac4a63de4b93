"""Every DeepSpeed internal the project touches, in one place.

DeepSpeed's public API does not cover what an MoE trainer needs: the gate and local experts
inside `deepspeed.moe.layer.MoE`, the expert groups' ranks, the flat ZeRO partitions behind each
parameter (`_hp_mapping`), the fp32 copies of the unfused fp16/bf16 optimizer, the torch
optimizer inside its wrappers. Reading them anywhere else would scatter assumptions about one
DeepSpeed minor version over the code; here they are few, named, and pinned by
tests/test_deepspeed_contract.py (and requirements.txt pins the minor version).
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

# Local experts of a DeepSpeed MoE layer live under `...experts.deepspeed_experts.<local id>.`.
LOCAL_EXPERT_RE = re.compile(r"(deepspeed_experts\.)(\d+)(\.)")


# --------------------------------------------------------------------------------------------
# The MoE layer


def moe_gate(moe: nn.Module) -> nn.Module:
    """The gate (a TopKGate) of a `deepspeed.moe.layer.MoE`."""
    return moe.deepspeed_moe.gate


def set_moe_gate(moe: nn.Module, gate: nn.Module) -> None:
    """Replace the gate of a `deepspeed.moe.layer.MoE` (MOELayer calls it positionally)."""
    moe.deepspeed_moe.gate = gate


def moe_local_experts(moe: nn.Module) -> nn.ModuleList:
    """This rank's experts of a `deepspeed.moe.layer.MoE` (local ids 0..E/ep_size-1)."""
    return moe.deepspeed_moe.experts.deepspeed_experts


def experts_modules(experts: nn.Module) -> nn.ModuleList:
    """The per-expert modules of a DeepSpeed `Experts` (local ids 0..L-1)."""
    return experts.deepspeed_experts


def moe_layer(moe: nn.Module) -> nn.Module:
    """The `MOELayer` (gate + experts + dispatch) inside a `deepspeed.moe.layer.MoE`."""
    return moe.deepspeed_moe


def set_moe_layer(moe: nn.Module, layer: nn.Module) -> None:
    """Replace the `MOELayer` of a `deepspeed.moe.layer.MoE` (before deepspeed.initialize, which
    hands the expert-parallel group to every MoE's layer)."""
    moe.deepspeed_moe = layer


def experts_group_name(experts: nn.Module) -> Optional[str]:
    """The expert group name DeepSpeed's `Experts` stamped on its parameters (None: never stamped)."""
    return next((getattr(p, "group_name", None) for p in experts.parameters()), None)


def moe_all_to_all(group: Any, x: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's differentiable all-to-all of the [E, C, d] expert buffer over the expert group
    (looked up at call time, so bench/instrument.py's profiler ranges see it)."""
    from deepspeed.moe import sharded_moe

    return sharded_moe._AllToAll.apply(group, x)


def all_to_all_tensor(group: Any, x: torch.Tensor) -> torch.Tensor:
    """A plain (no-grad) all-to-all of `x` split along dim 0 over `group`."""
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x.contiguous(), group=group)
    return out


def is_expert_param(p: torch.Tensor) -> bool:
    """DeepSpeed marks expert parameters `allreduce=False` (reduced over the expert-data group)."""
    return getattr(p, "allreduce", True) is False


def expert_group_name(p: torch.Tensor) -> str:
    """The expert-parallel group an expert parameter belongs to, e.g. 'ep_size_2'."""
    return p.group_name


def expert_group_size(p: torch.Tensor) -> int:
    return int(expert_group_name(p).split("_")[-1])


def expert_parallel_rank(group_name: str) -> int:
    """This rank's place in its expert-parallel group (which slice of the experts it holds)."""
    from deepspeed.utils import groups

    return groups._get_expert_parallel_rank(group_name) if dist.is_initialized() else 0


def expert_data_parallel_rank(group_name: str) -> int:
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_rank(group_name) if dist.is_initialized() else 0


def expert_parallel_group(group_name: str) -> Any:
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(group_name)


# --------------------------------------------------------------------------------------------
# Optimizer wrappers and ZeRO partitions


def basic_optimizer(engine: Any) -> Optional[torch.optim.Optimizer]:
    """The optimizer the project handed to deepspeed.initialize."""
    return getattr(engine, "basic_optimizer", None)


def innermost_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, BF16_Optimizer, FP16_Optimizer)."""
    seen = 0
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer") and seen < 8:
        opt, seen = opt.optimizer, seen + 1
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"no torch optimizer inside {type(opt).__name__}")
    return opt


def has_zero_partitions(zero_optimizer: Any) -> bool:
    """Whether the wrapper is DeepSpeedZeroOptimizer (ZeRO 1/2) with flat fp32 partitions."""
    return hasattr(zero_optimizer, "single_partition_of_fp32_groups") and hasattr(zero_optimizer, "bit16_groups")


def zero_partitions(zero_optimizer: Any) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(this rank's flat fp32 partition, the low-precision params of that group) per group."""
    yield from zip(zero_optimizer.single_partition_of_fp32_groups, zero_optimizer.bit16_groups)


def is_partitioned(p: torch.Tensor) -> bool:
    """A ZeRO-1/2 or BF16_Optimizer parameter (its fp32 master is split over ranks)."""
    return hasattr(p, "_hp_mapping")


def fragment(p: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """(start in the flat partition, start in the flattened param, length) of this rank's part of
    `p`, or None where this rank holds none of it."""
    hm = getattr(p, "_hp_mapping", None)
    if hm is None:
        return None
    return hm.hp_fragment_address.start, hm.lp_fragment_address.start, hm.lp_fragment_address.numel


def param_dp_group(p: torch.Tensor, default: Any = None) -> Any:
    """The data-parallel group over which a partitioned parameter is split."""
    return getattr(p, "_dp_group", default)


def full_fp32_master(engine: Any, p: torch.nn.Parameter) -> torch.Tensor:
    """The full fp32 master of `p` under any ZeRO stage / precision (a collective for partitioned
    params: every rank calls it, in the same order)."""
    from deepspeed.utils import safe_get_full_fp32_param

    if is_partitioned(p):
        return safe_get_full_fp32_param(p)
    hp = unfused_master(engine, p)
    return (hp if hp is not None else p).detach().float()


def full_optimizer_state(zero_optimizer: Any, p: torch.nn.Parameter, key: str) -> torch.Tensor:
    """The full optimizer state `key` of a partitioned param (a collective over its dp group).

    As DeepSpeed's safe_get_full_optimizer_state, with two differences:
    * under ZeRO 1/2 this rank's part is read from the optimizer state of the flat partition
      itself, not from `p._hp_mapping.optim_fragment`. DeepSpeedZeroOptimizer steps its torch
      optimizer one parameter group at a time and links those fragments after the FIRST group's
      step, when only group 0 has state; the flag it sets stops any later link, so every other
      group's fragments stay empty for the life of the engine and DeepSpeed's getter returns
      nothing (or raises) for them: with the project's groups (decay / no decay, dense / expert)
      that is 3 of 4 groups' moments (tests/test_deepspeed_contract.py pins the upstream behaviour).
    * a rank whose partition has no state for the key (AdamW creates none for a partition that never
      had a gradient) contributes zeros instead of raising before the collective, which would leave
      the other ranks hanging in it."""
    buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    frag = fragment(p)
    if frag is not None:
        hp_start, lp_start, n = frag
        if has_zero_partitions(zero_optimizer):
            flat = next((f for f, lps in zero_partitions(zero_optimizer) if any(lp is p for lp in lps)), None)
            state = innermost_optimizer(zero_optimizer).state.get(flat, {}).get(key) if flat is not None else None
            part = state.narrow(0, hp_start, n) if state is not None else None
        else:  # BF16_Optimizer steps all its groups at once, then links: the fragments are whole
            part = (p._hp_mapping.optim_fragment or {}).get(key)
        if part is not None:
            buf.narrow(0, lp_start, n).copy_(part.data.flatten())
    dist.all_reduce(buf, group=p._dp_group)
    return buf.view(p.shape)


def unfused_master(engine: Any, p: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """ZeRO-0 with bf16/fp16: DeepSpeed's (Unfused)FP16 optimizer keeps fp32 copies group by group."""
    opt = engine.optimizer
    for lp_group, hp_group in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", [])):
        for lp, hp in zip(lp_group, hp_group):
            if lp is p:
                return hp
    return None


def optimizer_state_owner(engine: Any, p: torch.nn.Parameter) -> torch.Tensor:
    """The tensor the torch optimizer keys `p`'s state by when `p` is not partitioned (ZeRO-0)."""
    hp = unfused_master(engine, p)
    return hp if hp is not None else p


@contextlib.contextmanager
def optimizer_update_skipped(engine: Any) -> Iterator[None]:
    """Within the block, `engine.step()` runs without the torch optimizer's update: DeepSpeed has no
    "skip this step" call outside its fp16 overflow path. ZeRO/BF16 wrappers copy back their
    unchanged fp32 masters and the engine zeroes the gradients; the LR scheduler still advances.
    `engine.skipped_steps` counts the skip once, as DeepSpeed's own overflow skips do."""
    opt = innermost_optimizer(engine.optimizer)
    had_attr = "step" in opt.__dict__
    original = opt.__dict__.get("step")

    def no_update(*args: Any, **kwargs: Any) -> None:
        opt._opt_called = True  # type: ignore[attr-defined]  # keeps torch's LR-scheduler order check quiet

    no_update._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    opt.step = no_update  # type: ignore[method-assign]
    counted = engine.skipped_steps
    try:
        yield
    finally:
        if had_attr:
            opt.step = original  # type: ignore[method-assign]
        else:
            del opt.step
    if engine.skipped_steps == counted:
        engine.skipped_steps += 1
    elif engine.lr_scheduler is not None:
        # ZeRO 1/2 (fp32, fp16) saw the non-finite norm and took DeepSpeed's overflow path, which
        # counts the skip but leaves the schedule where it was; a skipped step advances it
        opt._opt_called = True  # type: ignore[attr-defined]
        engine.lr_scheduler.step()


def skip_single_rank_gradient_allreduce(engine: Any) -> bool:
    """With one rank under ZeRO-0 (fp32/fp16), turn off the engine's boundary gradient all-reduce:
    DeepSpeed still flattens every gradient into buckets, "all-reduces" them over the one rank,
    divides by 1 and copies them back (~1% of a digits step here: bench/trainer_overhead.py's
    engine pieces), which leaves every value as it was. ZeRO 1/2 and the BF16 optimizer do their
    own bookkeeping in that call and keep it. Returns whether it was turned off."""
    from .distributed import dist_world

    if dist_world() != 1 or engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled():
        return False
    engine.enable_backward_allreduce = False
    return True


def gradient_loss_scale(engine: Any) -> float:
    """The factor the module's gradients carry before DeepSpeed unscales them: fp16's current
    dynamic (or static) loss scale on ZeRO-0, 1.0 otherwise. A norm read off `p.grad` must be
    divided by it to be the true gradient norm."""
    if not engine.fp16_enabled():
        return 1.0
    cfg = getattr(engine.optimizer, "loss_scale_config", None)
    scale = getattr(cfg, "cur_scale", None)
    return float(scale) if scale is not None else 1.0


# --------------------------------------------------------------------------------------------
# The config parser (ds_schema.py asks it which JSON keys DeepSpeed reads)


def run_config_parser(param_dict: dict) -> None:
    """DeepSpeed's config parser on `param_dict`, without the distributed set-up around it."""
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = DeepSpeedConfig.__new__(DeepSpeedConfig)
    cfg.global_rank, cfg.world_size, cfg._param_dict = 0, 1, param_dict
    cfg._initialize_params(param_dict)
    cfg._do_warning_check()


def removed_config_keys() -> tuple[dict[str, str], dict[str, str]]:
    """The top-level and zero_optimization keys DeepSpeed has removed, with its own messages."""
    from deepspeed.runtime import config as ds_config

    return (dict(getattr(ds_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {})),
            dict(getattr(ds_config, "_REMOVED_ZERO_CONFIG_KEYS", {})))
