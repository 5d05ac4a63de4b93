"""Layout-free shards: every parameter's fp32 master and optimizer moments under the name it has
in an ep_size-1 model (experts under their GLOBAL id), so a checkpoint loads into any world
size, ep_size, ZeRO stage or precision.

Written at save time by every rank for the parameters it owns (dense ones by rank 0, each expert
by rank 0 of its expert-data-parallel group), gathered with DeepSpeed's safe_get_full_fp32_param
and the ZeRO fragments (deepspeed_internals), so the partition layouts never need parsing
offline (`zero_to_fp32` cannot do MoE: DeepSpeed #1876). Read back with `read_shards`, which
opens only safetensors (no pickle).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from . import deepspeed_internals as dsi
from .config import ConfigError

MOMENTS = ("exp_avg", "exp_avg_sq")


def local_expert_counts(module: torch.nn.Module) -> dict[str, int]:
    """Module-name prefix of each MoE layer's experts -> how many experts this rank holds there."""
    counts: dict[str, int] = {}
    for name, _ in module.named_parameters():
        m = dsi.LOCAL_EXPERT_RE.search(name)
        if m:
            prefix = name[: m.start()]
            counts[prefix] = max(counts.get(prefix, 0), int(m.group(2)) + 1)
    return counts


def global_name(name: str, param: torch.nn.Parameter, ep_rank: int, n_local: dict[str, int]) -> str:
    """Module name of a local parameter -> its name in an ep_size-1 model."""
    if not dsi.is_expert_param(param):
        return name
    m = dsi.LOCAL_EXPERT_RE.search(name)
    assert m, name
    prefix = name[: m.start()]
    gid = ep_rank * n_local[prefix] + int(m.group(2))
    return f"{prefix}{m.group(1)}{gid}{m.group(3)}{name[m.end():]}"


def owned_params(engine: Any) -> Iterator[tuple[str, torch.nn.Parameter, bool]]:
    """(global name, param, owned by this rank) for every parameter, in the same order on all ranks.
    The expert-parallel rank comes from DeepSpeed's own expert group, not from rank arithmetic."""
    module = engine.module
    rank = dist.get_rank() if dist.is_initialized() else 0
    n_local = local_expert_counts(module)
    for name, p in module.named_parameters():
        if dsi.is_expert_param(p):
            group = dsi.expert_group_name(p)
            ep_rank = dsi.expert_parallel_rank(group)
            yield global_name(name, p, ep_rank, n_local), p, dsi.expert_data_parallel_rank(group) == 0
        else:
            yield name, p, rank == 0


def moments(engine: Any, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """Adam-style moments of `p` (a collective for partitioned params)."""
    out = {}
    inner = dsi.innermost_optimizer(engine.optimizer)
    for key in MOMENTS:
        if dsi.is_partitioned(p):
            t = dsi.full_optimizer_state(engine.optimizer, p, key)
        else:
            t = inner.state.get(dsi.optimizer_state_owner(engine, p), {}).get(key)
        if t is not None:
            out[key] = t.detach().float().cpu()
    return out


def optimizer_step(engine: Any) -> int:
    inner = dsi.innermost_optimizer(engine.optimizer)
    for st in inner.state.values():
        s = st.get("step")
        if s is not None:
            return int(s)
    return 0


def write_shards(engine: Any, d: Path, rank: int) -> None:
    """Write <d>/weights/rank<r>.safetensors and <d>/state/rank<r>.safetensors (a collective)."""
    from safetensors.torch import save_file

    weights, state = {}, {}
    for name, p, owned in owned_params(engine):
        master = dsi.full_fp32_master(engine, p)  # collective for ZeRO params: every rank calls, in order
        mom = moments(engine, p)
        if owned:
            weights[name] = master.detach().float().cpu().contiguous()
            for k, v in mom.items():
                state[f"{name}::{k}"] = v.contiguous()
    (d / "weights").mkdir(parents=True, exist_ok=True)
    (d / "state").mkdir(parents=True, exist_ok=True)
    save_file(weights, str(d / "weights" / f"rank{rank}.safetensors"))
    save_file(state, str(d / "state" / f"rank{rank}.safetensors"),
              metadata={"optimizer_step": str(optimizer_step(engine))})


def read_shards(ckpt: Path, kind: str = "weights") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Merge <ckpt>/<kind>/rank*.safetensors into one state dict (no pickle is read)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    files = sorted((ckpt / kind).glob("rank*.safetensors"))
    if not files:
        raise ConfigError(f"{ckpt} has no {kind}/rank*.safetensors: not a ds-widenet checkpoint (or an incomplete one)")
    merged: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                merged.update({k: h.get_tensor(k) for k in h.keys()})
                meta.update(h.metadata() or {})
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ConfigError(f"{f} is truncated or corrupt ({str(e).splitlines()[0][:80]}): "
                              "resume or export from another checkpoint") from None
    return merged, meta


def load_weights_into(model: torch.nn.Module, full: dict[str, torch.Tensor], ep_size: int, ep_rank: int,
                      strict: bool = True) -> list[str]:
    """Copy an ep_size-1 state dict into a (possibly expert-parallel) model; returns missing keys."""
    n_local = local_expert_counts(model)
    missing = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = global_name(name, p, ep_rank, n_local)
            if key not in full:
                missing.append(key)
                continue
            if full[key].shape != p.shape:
                raise ConfigError(f"weight {key} has shape {tuple(full[key].shape)}, the model expects {tuple(p.shape)}: "
                                  "the checkpoint is of another model")
            p.copy_(full[key].to(p.dtype))
    if strict and missing:
        raise ConfigError(f"checkpoint lacks {len(missing)} weights (e.g. {missing[0]}): it is of another model")
    return missing


def _step_state(opt: torch.optim.Optimizer, opt_step: int, device: torch.device) -> Any:
    """The `step` entry of a fresh per-parameter state, of the type this optimizer creates itself:
    torch's Adam/AdamW keep a float32 tensor (on the CPU unless capturable/fused), the project's
    Lamb and DeepSpeed's FusedLamb a plain int (FusedLamb's kernel takes an int step)."""
    from deepspeed.ops.lamb import FusedLamb  # the class only: no kernel is built

    from .optim import Lamb

    if isinstance(opt, (Lamb, FusedLamb)):
        return int(opt_step)
    group = opt.param_groups[0] if opt.param_groups else {}
    on_device = bool(group.get("capturable") or group.get("fused"))
    return torch.tensor(float(opt_step), dtype=torch.float32, device=device if on_device else "cpu")


def load_moments_into(engine: Any, state: dict[str, torch.Tensor], ep_size: int, ep_rank: int, opt_step: int) -> bool:
    """Set Adam-style moments per parameter on a fresh engine after a reshard. Returns False (and
    sets nothing) where the layout is not one this knows or a parameter's moments are missing.

    The optimizer has no state before its first step, so the state is created here: under ZeRO
    1/2 for each flat fp32 partition, filled fragment by fragment; under ZeRO-0 per parameter (or
    per fp32 copy of DeepSpeed's unfused fp16/bf16 optimizer)."""
    n_local = local_expert_counts(engine.module)
    named = {id(p): global_name(n, p, ep_rank, n_local) for n, p in engine.module.named_parameters()}
    if any(f"{k}::{m}" not in state for k in named.values() for m in MOMENTS):
        return False
    opt = engine.optimizer
    inner = dsi.innermost_optimizer(opt)
    if dsi.has_zero_partitions(opt):
        for flat, lps in dsi.zero_partitions(opt):
            st = inner.state.setdefault(flat, {})
            for m in MOMENTS:
                buf = torch.zeros_like(flat)
                for lp in lps:
                    frag = dsi.fragment(lp)
                    if frag is None:
                        continue
                    hp_start, lp_start, n = frag
                    full = state[f"{named[id(lp)]}::{m}"].to(flat.device).flatten()
                    buf.narrow(0, hp_start, n).copy_(full.narrow(0, lp_start, n))
                st[m] = buf
            st["step"] = _step_state(inner, opt_step, flat.device)
        return True
    if any(dsi.is_partitioned(p) for p in engine.module.parameters()):
        return False  # another partitioned layout (e.g. BF16_Optimizer): weights only
    for p in engine.module.parameters():
        target = dsi.optimizer_state_owner(engine, p)
        st = inner.state.setdefault(target, {})
        for m in MOMENTS:
            st[m] = state[f"{named[id(p)]}::{m}"].to(target.device, torch.float32).clone()
        st["step"] = _step_state(inner, opt_step, target.device)
    return True
