"""Checkpoints: save / complete marker / resume, layout-free weight shards, export and load.

A checkpoint directory `<out>/checkpoints/step<N>/` holds

* DeepSpeed's own engine checkpoint (pickles: model states, one file per global expert, ZeRO
  optimizer partitions) - the exact-resume path when the layout (world size, ep_size, ZeRO
  stage, precision) is unchanged;
* `weights/rank<r>.safetensors`: the fp32 master weights this rank owns, named as in an
  ep_size-1 model (experts under their GLOBAL id). Dense weights come from rank 0, each expert
  from the one rank of its expert-data-parallel group with rank 0 there. Gathered at save time
  with DeepSpeed's `safe_get_full_fp32_param`, so the ZeRO partition layouts never need
  parsing offline (`zero_to_fp32` cannot do MoE: DeepSpeed #1876);
* `state/rank<r>.safetensors`: the optimizer moments of the same parameters (for resharding);
* `meta.json`: step, layout, the resolved recipe and model config;
* `complete`: written by rank 0 after every rank has finished writing (a barrier). Only
  checkpoints with this marker are resumed from; a crash mid-save leaves the previous one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
import torch.distributed as dist

from .config import ConfigError, ModelConfig, Recipe, model_config_from_dict

COMPLETE = "complete"
_EXPERT_RE = re.compile(r"(deepspeed_experts\.)(\d+)(\.)")
EXPORT_FORMAT = "ds-widenet-export-v1"


# --------------------------------------------------------------------------------------------
# Fault injection for the crash tests: DS_WIDENET_FAULT="<where>:<step>:<rank>" kills that rank
# with SIGKILL at a fixed point (where = train | save). Never set in normal use.


def maybe_fault(where: str, step: int, rank: int) -> None:
    spec = os.environ.get("DS_WIDENET_FAULT")
    if not spec:
        return
    w, s, r = spec.split(":")
    if w == where and int(s) == step and int(r) == rank:
        os.kill(os.getpid(), 9)


# --------------------------------------------------------------------------------------------
# fp32 masters and optimizer state, per parameter, whatever the ZeRO stage / precision


def _global_name(name: str, param: torch.nn.Parameter, ep_size: int, ep_rank: int, n_local: dict[str, int]) -> str:
    """Module name of a local parameter -> its name in an ep_size-1 model."""
    if getattr(param, "allreduce", True) is not False:
        return name
    m = _EXPERT_RE.search(name)
    assert m, name
    local = int(m.group(2))
    prefix = name[: m.start()]
    return f"{prefix}{m.group(1)}{ep_rank * n_local[prefix] + local}{m.group(3)}{name[m.end():]}"


def _local_expert_counts(module: torch.nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, _ in module.named_parameters():
        m = _EXPERT_RE.search(name)
        if m:
            prefix = name[: m.start()]
            counts[prefix] = max(counts.get(prefix, 0), int(m.group(2)) + 1)
    return counts


def _unfused_master(engine: Any, param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """ZeRO-0 with bf16/fp16: DeepSpeed's (Unfused)FP16 optimizer keeps fp32 copies group by group."""
    opt = engine.optimizer
    for lp_group, hp_group in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", [])):
        for lp, hp in zip(lp_group, hp_group):
            if lp is param:
                return hp
    return None


def _full_hp(param: torch.nn.Parameter, key: Optional[str]) -> torch.Tensor:
    """The full fp32 master (key None) or optimizer state of a ZeRO-1/2 / BF16_Optimizer param: each
    rank contributes its fragment, summed over the param's data-parallel group (a collective).
    As DeepSpeed's safe_get_full_optimizer_state, except that a rank whose partition has no state
    for the key (AdamW creates none for a partition that never had a gradient) contributes zeros
    instead of raising before the collective, which would hang the other ranks."""
    buf = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
    m = param._hp_mapping
    if m is not None:
        frag = m.hp_fragment if key is None else (m.optim_fragment or {}).get(key)
        if frag is not None:
            buf.narrow(0, m.lp_fragment_address.start, m.lp_fragment_address.numel).copy_(frag.data.flatten())
    dist.all_reduce(buf, group=param._dp_group)
    return buf.view(param.shape)


def _master(engine: Any, param: torch.nn.Parameter) -> torch.Tensor:
    if hasattr(param, "_hp_mapping"):
        return _full_hp(param, None)
    hp = _unfused_master(engine, param)
    return (hp if hp is not None else param).detach().float()


def _moments(engine: Any, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    out = {}
    for key in ("exp_avg", "exp_avg_sq"):
        if hasattr(param, "_hp_mapping"):
            t = _full_hp(param, key)
        else:
            hp = _unfused_master(engine, param)
            inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
            state = inner.state.get(hp if hp is not None else param, {})
            t = state.get(key)
        if t is not None:
            out[key] = t.detach().float().cpu()
    return out


def _owned_params(engine: Any) -> Iterator[tuple[str, torch.nn.Parameter, bool]]:
    """(global name, param, owned by this rank) for every parameter, in the same order on all ranks."""
    from deepspeed.utils import groups

    module = engine.module
    rank = dist.get_rank() if dist.is_initialized() else 0
    n_local = _local_expert_counts(module)
    for name, p in module.named_parameters():
        if getattr(p, "allreduce", True) is False:
            ep_size = int(p.group_name.split("_")[-1])
            ep_rank = rank % ep_size
            edp_rank = groups._get_expert_data_parallel_rank(p.group_name) if dist.is_initialized() else 0
            yield _global_name(name, p, ep_size, ep_rank, n_local), p, edp_rank == 0
        else:
            yield name, p, rank == 0


# --------------------------------------------------------------------------------------------
# Save / find / resume


def checkpoint_root(out: Union[str, Path]) -> Path:
    return Path(out) / "checkpoints"


def save_checkpoint(engine: Any, out: Path, recipe: Recipe, step: int, layout: dict[str, Any], keep_last: int = 0) -> Path:
    """Save at `step` (a collective: every rank calls it). Marks it complete after a barrier and
    then, on rank 0, prunes complete checkpoints beyond the newest `keep_last` (0 keeps all)."""
    from safetensors.torch import save_file

    root = checkpoint_root(out)
    tag = f"step{step}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    d = root / tag
    if d.exists():  # a crashed save of this step (or another layout's): no stale shard or marker may survive
        if rank == 0:
            shutil.rmtree(d)
        if dist.is_initialized():
            dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    weights, state = {}, {}
    for name, p, owned in _owned_params(engine):
        master = _master(engine, p)  # collective for ZeRO params: every rank calls, in order
        moments = _moments(engine, p)
        if owned:
            weights[name] = master.detach().float().cpu().contiguous()
            for k, v in moments.items():
                state[f"{name}::{k}"] = v.contiguous()
    (d / "weights").mkdir(parents=True, exist_ok=True)
    (d / "state").mkdir(parents=True, exist_ok=True)
    save_file(weights, str(d / "weights" / f"rank{rank}.safetensors"))
    opt_step = _optimizer_step(engine)
    save_file(state, str(d / "state" / f"rank{rank}.safetensors"), metadata={"optimizer_step": str(opt_step)})
    maybe_fault("save", step, rank)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        meta = {"step": step, "layout": layout, "recipe": recipe.to_dict(), "model": recipe.model.to_dict()}
        (d / "meta.json").write_text(json.dumps(meta, indent=2))
        (d / COMPLETE).write_text("ok\n")
        if keep_last > 0:
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return d


def _optimizer_step(engine: Any) -> int:
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for st in inner.state.values():
        s = st.get("step")
        if s is not None:
            return int(s)
    return 0


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and re.fullmatch(r"step\d+", d.name) and (d / COMPLETE).exists()]
    return sorted(found, key=lambda d: int(d.name[4:]))


def find_checkpoint(spec: str, out: Path) -> Path:
    """`auto` -> the newest complete checkpoint under <out>/checkpoints; else a checkpoint dir."""
    if spec == "auto":
        found = complete_checkpoints(checkpoint_root(out))
        if not found:
            raise ConfigError(f"--resume auto found no complete checkpoint under {checkpoint_root(out)}: "
                              "start without --resume or point --resume at a checkpoint directory")
        return found[-1]
    d = Path(spec)
    if not d.is_dir():
        raise ConfigError(f"--resume {spec}: no such checkpoint directory (expected .../checkpoints/step<N>)")
    if not (d / COMPLETE).exists():
        raise ConfigError(f"--resume {spec}: checkpoint is incomplete (a rank died while saving): "
                          "resume from an earlier one or use --resume auto")
    return d


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{ckpt}/meta.json is missing or corrupt ({type(e).__name__}): resume from another checkpoint") from None


def check_same_model(ckpt_model: dict[str, Any], model: ModelConfig, where: Path) -> None:
    """Refuse a checkpoint of another model shape (grad_checkpointing and dropout may differ)."""
    ignore = {"grad_checkpointing", "dropout", "attn_dropout", "preset"}
    mine = {k: v for k, v in model.to_dict().items() if k not in ignore}
    theirs = {k: v for k, v in ckpt_model.items() if k not in ignore}
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        k = diff[0]
        raise ConfigError(f"checkpoint {where} holds another model ({k}: {theirs.get(k)!r} there, {mine.get(k)!r} here): "
                          "use the recipe it was trained with, or --init_from for fine-tuning")


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
        except (SafetensorError, OSError, ValueError) as e:
            raise ConfigError(f"{f} is truncated or corrupt ({str(e).splitlines()[0][:80]}): resume or export from another checkpoint") from None
    return merged, meta


def load_weights_into(model: torch.nn.Module, full: dict[str, torch.Tensor], ep_size: int, ep_rank: int,
                      strict: bool = True) -> list[str]:
    """Copy an ep_size-1 state dict into a (possibly expert-parallel) model; returns missing keys."""
    n_local = _local_expert_counts(model)
    missing = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = _global_name(name, p, ep_size, ep_rank, n_local)
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


def load_moments_into(engine: Any, state: dict[str, torch.Tensor], ep_size: int, ep_rank: int, opt_step: int) -> bool:
    """Set Adam-style moments per parameter on a fresh engine after a reshard. Returns False (and
    sets nothing) where the layout is not one this knows or a parameter's moments are missing.

    The optimizer has no state before its first step, so the state is created here: under ZeRO
    1/2 for each flat fp32 partition (DeepSpeedZeroOptimizer.single_partition_of_fp32_groups),
    filled fragment by fragment through each parameter's `_hp_mapping`; under ZeRO-0 per
    parameter (or per fp32 copy of DeepSpeed's unfused fp16/bf16 optimizer)."""
    n_local = _local_expert_counts(engine.module)
    named = {id(p): _global_name(n, p, ep_size, ep_rank, n_local) for n, p in engine.module.named_parameters()}
    keys = ("exp_avg", "exp_avg_sq")
    if any(f"{k}::{m}" not in state for k in named.values() for m in keys):
        return False
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    step = torch.tensor(float(opt_step))
    if hasattr(opt, "single_partition_of_fp32_groups") and hasattr(opt, "bit16_groups"):
        for flat, lps in zip(opt.single_partition_of_fp32_groups, opt.bit16_groups):
            st = inner.state.setdefault(flat, {})
            for m in keys:
                buf = torch.zeros_like(flat)
                for lp in lps:
                    hm = getattr(lp, "_hp_mapping", None)
                    if hm is None:
                        continue
                    full = state[f"{named[id(lp)]}::{m}"].to(flat.device).flatten()
                    buf.narrow(0, hm.hp_fragment_address.start, hm.hp_fragment_address.numel).copy_(
                        full.narrow(0, hm.lp_fragment_address.start, hm.lp_fragment_address.numel))
                st[m] = buf
            st["step"] = step.clone()
        return True
    if any(hasattr(p, "_hp_mapping") for p in engine.module.parameters()):
        return False  # another partitioned layout (e.g. BF16_Optimizer): weights only
    for p in engine.module.parameters():
        hp = _unfused_master(engine, p)
        target = hp if hp is not None else p
        st = inner.state.setdefault(target, {})
        for m in keys:
            st[m] = state[f"{named[id(p)]}::{m}"].to(target.device, torch.float32).clone()
        st["step"] = step.clone()
    return True


# --------------------------------------------------------------------------------------------
# Export and load without DeepSpeed's engine


def export(ckpt: Path, out_file: Path, force: bool = False) -> Path:
    """One safetensors file + `<out>.json` (model config) from a checkpoint's weight shards."""
    from safetensors.torch import save_file

    from .models import build_model

    out_file = Path(out_file)
    cfg_file = out_file.with_suffix(".json")
    if not force and (out_file.exists() or cfg_file.exists()):
        raise ConfigError(f"{out_file} (or its .json) exists: choose another --out or pass --force to overwrite")
    if not (ckpt / COMPLETE).exists():
        raise ConfigError(f"checkpoint {ckpt} is incomplete (no '{COMPLETE}' marker): export an earlier one")
    meta = read_meta(ckpt)
    cfg = model_config_from_dict(meta["model"])
    weights, _ = read_shards(ckpt, "weights")
    expected = build_model(cfg, device="meta").state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ConfigError(f"checkpoint {ckpt} lacks {len(missing)} weights (e.g. {missing[0]}): a rank's shard is missing")
    for k, t in expected.items():
        if tuple(weights[k].shape) != tuple(t.shape):
            raise ConfigError(f"weight {k} has shape {tuple(weights[k].shape)} but the config says {tuple(t.shape)}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    save_file({k: weights[k].contiguous() for k in expected}, str(tmp),
              metadata={"format": EXPORT_FORMAT, "step": str(meta["step"])})
    cfg_file.write_text(json.dumps({"format": EXPORT_FORMAT, "step": meta["step"], "model": cfg.to_dict()}, indent=2))
    os.replace(tmp, out_file)  # the target appears only once it is whole
    return out_file


def load_exported(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                  overrides: Optional[dict[str, Any]] = None) -> torch.nn.Module:
    """Rebuild an exported model with plain PyTorch (no DeepSpeed engine, no torch.distributed).
    `overrides` change model fields that do not change the weights (e.g. eval_capacity_factor via
    {"moe": {"eval_capacity_factor": 4.0}})."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import build_model

    path = Path(path)
    cfg_file = path.with_suffix(".json")
    if not path.is_file() or not cfg_file.is_file():
        raise ConfigError(f"{path} and {cfg_file.name} must both exist (python -m ds_widenet.export writes them)")
    try:
        cfg_dict = json.loads(cfg_file.read_text())["model"]
    except (json.JSONDecodeError, KeyError):
        raise ConfigError(f"{cfg_file} is not an export config (no 'model' entry)") from None
    if overrides:
        cfg_dict = {**cfg_dict, **{k: v for k, v in overrides.items() if k != "moe"}}
        if "moe" in overrides and cfg_dict.get("moe"):
            cfg_dict["moe"] = {**cfg_dict["moe"], **overrides["moe"]}
    cfg = model_config_from_dict(cfg_dict)
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path} is truncated or corrupt ({str(e).splitlines()[0][:80]})") from None
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path} does not match its config ({len(missing)} missing, {len(unexpected)} unexpected weights)")
    return model.to(device).eval()


def adapt_for_finetune(weights: dict[str, torch.Tensor], src: ModelConfig, dst: ModelConfig) -> dict[str, torch.Tensor]:
    """Fine-tuning from an export: drop the head when the class count changes (it is re-initialised)
    and interpolate position embeddings (bicubic, as timm) when the patch grid changes."""
    import torch.nn.functional as F

    out = dict(weights)
    if src.num_classes != dst.num_classes:
        out.pop("head.weight", None)
        out.pop("head.bias", None)
    pe = out.get("pos_embed")
    if pe is not None:
        prefix = 1 if src.pool == "cls" else 0
        old = int(round((pe.shape[1] - prefix) ** 0.5))
        new = dst.img_size // dst.patch_size
        if old != new:
            grid = pe[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
            out["pos_embed"] = torch.cat([pe[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)
    return out
