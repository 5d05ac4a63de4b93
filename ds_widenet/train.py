"""Training entry point:

    python -m ds_widenet.train --recipe R.yaml --deepspeed_config C.json --out DIR [key=value ...]
    deepspeed --num_gpus 2 --module ds_widenet.train --recipe ... (or torchrun / mpirun / srun)

The recipe owns model, data, optimizer and schedule; the DeepSpeed JSON owns batch sizes,
precision, ZeRO, clipping and monitors (see config.py). One optimizer step = `grad_accum`
micro-batches per rank; every rank gets the same number of tokens at every step.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from . import select_accelerator
from .config import (BatchLayout, ConfigError, Recipe, derived_steps, load_ds_config, load_recipe, validate,
                     zero_stage)


class TrainingError(RuntimeError):
    """A run-time failure with a one-line message (e.g. a non-finite loss)."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m ds_widenet.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help="YAML recipe (model, data, optim, schedule)")
    ap.add_argument("--deepspeed_config", "--ds_config", dest="deepspeed_config", required=True,
                    help="DeepSpeed JSON (batch sizes, precision, ZeRO, clipping, monitors)")
    ap.add_argument("--out", required=True, help="run directory (metrics.jsonl, resolved configs, checkpoints)")
    ap.add_argument("--overwrite", action="store_true", help="allow an --out that already holds a run")
    ap.add_argument("--resume", default=None, metavar="auto|DIR",
                    help="continue from the newest complete checkpoint in --out (auto) or from DIR; "
                         "another world size / ep_size / ZeRO stage is resharded")
    ap.add_argument("--init_from", default=None, metavar="FILE.safetensors",
                    help="start from exported weights (fine-tune: a new head for another class count, "
                         "position embeddings interpolated for another image size)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. optim.lr=0.001 model.depth=4")
    return ap.parse_args(argv)


@dataclass
class Plan:
    """Everything decided before the process group starts (so bad input fails fast, on every rank)."""

    recipe: Recipe
    ds_config: dict[str, Any]
    layout: BatchLayout
    out: Path
    resume: Optional[Path] = None  # a complete checkpoint directory
    resume_meta: Optional[dict[str, Any]] = None  # its meta.json
    init_from: Optional[Path] = None


def plan_run(args: argparse.Namespace) -> Plan:
    from .checkpoint import checkpoint_root, complete_checkpoints
    from .distributed import discover_env

    recipe = load_recipe(args.recipe, args.overrides)
    ds_config = load_ds_config(args.deepspeed_config)
    discover_env()
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE") or 1)
    layout = validate(recipe, ds_config, world)
    out = Path(args.out)
    resume = resume_meta = None
    if args.resume:
        from .checkpoint import check_same_model, find_checkpoint, read_meta

        resume = find_checkpoint(args.resume, out)
        resume_meta = read_meta(resume)
        check_same_model(resume_meta["model"], recipe.model, resume)
    elif not args.overwrite and ((out / "metrics.jsonl").exists() or complete_checkpoints(checkpoint_root(out))):
        raise ConfigError(f"{out} already holds a run (metrics.jsonl or checkpoints): pass --resume auto to continue it, "
                          "choose a new --out, or pass --overwrite (which deletes its checkpoints)")
    if args.init_from and args.resume:
        raise ConfigError("--init_from and --resume exclude each other: --resume continues a run, --init_from starts one")
    init_from = Path(args.init_from) if args.init_from else None
    if init_from is not None and not (init_from.is_file() and init_from.with_suffix(".json").is_file()):
        raise ConfigError(f"--init_from {init_from}: the .safetensors file and its .json config must exist "
                          "(python -m ds_widenet.export writes both)")
    if recipe.data.root and not Path(recipe.data.root).exists():
        raise ConfigError(f"data.root={recipe.data.root} does not exist: point data.root at your data directory")
    return Plan(recipe, ds_config, layout, out, resume, resume_meta, init_from)


def project_clips(plan: Plan) -> bool:
    """ZeRO-0 with expert parallelism: the project clips by the true global norm itself, since
    DeepSpeed's ZeRO-0 clipping averages per-rank norms although ranks hold different experts
    (DeepSpeed #8475). ZeRO 1/2 compute the global norm correctly and keep DeepSpeed's clipping."""
    from .testing import negative_control

    return (zero_stage(plan.ds_config) == 0 and plan.recipe.parallel.ep_size > 1 and float(plan.ds_config.get("gradient_clipping", 0)) > 0
            and negative_control() != "clip_avg")


def _ds_config_for_engine(plan: Plan) -> dict[str, Any]:
    cfg = copy.deepcopy(plan.ds_config)
    if project_clips(plan):
        cfg["gradient_clipping"] = 0.0
    if plan.recipe.optim.name == "lamb":
        cfg["zero_allow_untested_optimizer"] = True  # the project's LAMB is ZeRO-aware (attach_zero_lamb)
    cfg["train_micro_batch_size_per_gpu"] = plan.layout.micro
    cfg["gradient_accumulation_steps"] = plan.layout.grad_accum
    cfg["train_batch_size"] = plan.layout.global_batch
    cfg.setdefault("steps_per_print", 10 ** 9)  # the project logs; keep DeepSpeed's own log quiet
    return cfg


def soft_cross_entropy(logits, targets):
    import torch

    return torch.sum(-targets * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def evaluate(engine, loader, dtype, device) -> dict[str, Any]:
    """Exact top-1 over the whole test set under any world size (metrics.evaluate_loader)."""
    from .metrics import evaluate_loader

    engine.eval()
    try:
        return evaluate_loader(engine, loader, device, dtype)
    finally:
        engine.train()


def initialise_from_export(model, path: Path, recipe: Recipe, ep_size: int, ep_rank: int) -> str:
    """Load exported weights for fine-tuning; returns a notice of what was adapted."""
    from .checkpoint import adapt_for_finetune, load_weights_into
    from .config import model_config_from_dict
    from safetensors.torch import load_file

    src = model_config_from_dict(json.loads(path.with_suffix(".json").read_text())["model"])
    weights = adapt_for_finetune(load_file(str(path)), src, recipe.model)
    missing = load_weights_into(model, weights, ep_size, ep_rank, strict=False)
    unexpected = [m for m in missing if not m.startswith("head.")]
    if unexpected:
        raise ConfigError(f"--init_from {path}: {len(unexpected)} weights missing (e.g. {unexpected[0]}): "
                          "it is not the same architecture as the recipe's model")
    changes = []
    if missing:
        changes.append(f"new head for {recipe.model.num_classes} classes")
    if src.img_size // src.patch_size != recipe.model.img_size // recipe.model.patch_size:
        changes.append(f"position embeddings interpolated to {recipe.model.img_size}px")
    return f"initialised from {path}" + (f" ({', '.join(changes)})" if changes else "")


def reshard_optimizer(engine, scheduler, ckpt: Path, old_layout: dict[str, Any], ep_size: int, ep_rank: int,
                      step: int) -> str:
    """After a layout change: optimizer moments per parameter from the shards, the schedule moved
    to `step`. Returns the notice for the log."""
    from .checkpoint import load_moments_into, read_shards

    state, meta = read_shards(ckpt, "state")
    ok = bool(state) and load_moments_into(engine, state, ep_size, ep_rank, int(meta.get("optimizer_step", 0)))
    for _ in range(step):
        scheduler.step()
    what = "weights and optimizer moments" if ok else "weights only (optimizer state starts fresh)"
    return f"resharded {ckpt} from {old_layout} : {what}"


def attach_zero_lamb(engine) -> None:
    """Under ZeRO 1/2 the project's LAMB must learn the flat-partition layout to keep its trust
    ratio per parameter (optim.Lamb.attach_zero_partitions)."""
    from .optim import Lamb

    basic = getattr(engine, "basic_optimizer", None)
    if not isinstance(basic, Lamb) or engine.zero_optimization_stage() == 0:
        return
    from .testing import negative_control

    if negative_control() == "lamb_per_partition":
        return  # tests only: the broken per-partition LAMB, to show the equivalence test catches it
    if not hasattr(engine.optimizer, "single_partition_of_fp32_groups"):
        raise ConfigError(f"optim.name=lamb cannot read {type(engine.optimizer).__name__}'s partition layout: use ZeRO stage 2 "
                          "(or ZeRO-1 without data_types.grad_accum_dtype=fp32)")
    basic.attach_zero_partitions(engine.optimizer)


def train(plan: Plan) -> dict[str, Any]:
    """Run the plan; returns the final evaluation. Called on every rank."""
    import deepspeed
    import torch

    from .data import EvalSampler, GlobalBatchSampler, build_datasets, build_loader, mixup
    from .distributed import init_distributed
    from .metrics import (MetricsLog, NonFiniteGuard, RoutingAccumulator, RoutingWatch, all_reduce_mean,
                          all_reduce_sum_int, any_rank, route_digest, routing_fields)
    from .models import build_model
    from .optim import build_optimizer, build_scheduler, clip_grad_norm_global_, global_grad_norm, param_groups
    from . import rng
    from .checkpoint import checkpoint_root, load_weights_into, maybe_fault, read_shards, save_checkpoint

    recipe, layout = plan.recipe, plan.layout
    info = init_distributed()
    torch.manual_seed(recipe.seed)
    ep = recipe.parallel.ep_size

    train_set, test_set = build_datasets(recipe.data, recipe.model, recipe.seed)
    steps_per_epoch, total_steps, warmup_steps = derived_steps(recipe, len(train_set), layout)
    meta = plan.resume_meta or {}
    start_step = meta.get("step", 0)
    sampler = GlobalBatchSampler(len(train_set), layout.micro, layout.grad_accum, layout.world, info.rank,
                                 recipe.seed, shuffle=True, start_step=start_step, total_steps=total_steps)
    train_loader = build_loader(train_set, sampler, recipe.data.num_workers)
    eval_batch = recipe.data.eval_batch_size or layout.micro
    eval_loader = build_loader(test_set, EvalSampler(len(test_set), eval_batch, layout.world, info.rank),
                               recipe.data.num_workers)

    model = build_model(recipe.model, ep_size=ep, ep_rank=info.rank % ep, seed=recipe.seed)
    run_layout = {"world": layout.world, "ep_size": ep, "zero_stage": zero_stage(plan.ds_config),
                  "bf16": bool((plan.ds_config.get("bf16") or {}).get("enabled")), "fp16": bool((plan.ds_config.get("fp16") or {}).get("enabled"))}
    reshard = plan.resume is not None and meta["layout"] != run_layout
    if plan.init_from is not None:
        init_notice = initialise_from_export(model, plan.init_from, recipe, ep, info.rank % ep)
    elif reshard:  # weights from the layout-free shards; the engine's own files assume the old layout
        load_weights_into(model, read_shards(plan.resume, "weights")[0], ep, info.rank % ep)
    optimizer = build_optimizer(recipe.optim, param_groups(model, recipe.optim.weight_decay))
    engine_config = _ds_config_for_engine(plan)
    scheduler = build_scheduler(optimizer, recipe.schedule, total_steps, warmup_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=engine_config)
    dtype = next(engine.module.parameters()).dtype
    device = engine.device
    attach_zero_lamb(engine)
    resume_notice = None
    if plan.resume is not None and not reshard:
        engine.load_checkpoint(str(plan.resume.parent), tag=plan.resume.name)  # exact: same layout
        resume_notice = f"resumed from {plan.resume} (same layout: weights, optimizer and schedule state)"
    elif reshard:
        resume_notice = reshard_optimizer(engine, scheduler, plan.resume, meta["layout"], ep, info.rank % ep, start_step)

    if info.is_main:
        plan.out.mkdir(parents=True, exist_ok=True)
        if plan.resume is None:  # a new run (plan_run refused an existing one unless --overwrite)
            (plan.out / "metrics.jsonl").write_text("")
            shutil.rmtree(checkpoint_root(plan.out), ignore_errors=True)  # or pruning and --resume auto mix runs
        (plan.out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))
        (plan.out / "ds_config.json").write_text(json.dumps(engine_config, indent=2))
    log = MetricsLog(plan.out / "metrics.jsonl", info.is_main, engine.monitor)
    watch, guard = RoutingWatch.from_config(recipe.train, log), NonFiniteGuard.from_config(engine, recipe.train, log)
    for notice in (resume_notice, init_notice if plan.init_from is not None else None):
        if notice:
            log.write({"step": start_step, "event": notice})
            if info.is_main:
                print(f"ds_widenet: {notice}", file=sys.stderr)
    eval_every = recipe.train.eval_interval or steps_per_epoch
    clip_norm = float(plan.ds_config.get("gradient_clipping", 0)) if project_clips(plan) else 0.0
    from .testing import negative_control

    scale_expert_grads = negative_control() == "expert_grad_scale"
    aux_w = recipe.model.moe.aux_loss_weight if recipe.model.moe else 0.0

    bar = None
    show_bar = recipe.train.progress_bar == "on" or (recipe.train.progress_bar == "auto" and sys.stderr.isatty())
    if info.is_main and show_bar:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def new_window() -> dict[str, Any]:
        return {"loss": 0.0, "aux": 0.0, "n": 0, "t0": time.time(), "images": 0}

    step, micro = start_step, 0
    window = new_window()
    routing = RoutingAccumulator()
    digest = None  # [MoE calls] int64, summed over the log window
    final: dict[str, Any] = {}
    train_start = time.time()
    for images, labels, idx in train_loader:
        first = int(idx[0]) if len(idx) else 0  # read on the host, before the copy to the device
        images, idx = images.to(device), idx.to(device)
        images, targets = mixup(images, labels.to(device), recipe.model.num_classes, recipe.train.mixup_alpha,
                                recipe.train.label_smoothing, [recipe.seed, step, rng.SITE_MIXUP, first])
        out = engine(images.to(dtype), sample_ids=idx, step=step, seed=recipe.seed)
        ce = soft_cross_entropy(out.logits, targets)
        loss = ce + aux_w * out.aux_loss
        bad = any_rank(not bool(torch.isfinite(loss.detach())))
        stop = guard.stop_reason(step) if bad else None  # train.nan_policy (metrics.NonFiniteGuard)
        if stop:
            raise TrainingError(stop)
        guard.backward(loss, bad, step)  # bad: zero gradients, and this optimizer step is skipped on every rank
        boundary = (micro + 1) % layout.grad_accum == 0
        log_now = boundary and ((step + 1) % recipe.train.log_interval == 0 or step + 1 == total_steps)
        grad_norm = None
        if boundary and scale_expert_grads:  # negative control only (ds_widenet.testing)
            for p in engine.module.parameters():
                if getattr(p, "allreduce", True) is False and p.grad is not None:
                    p.grad.mul_(ep)
        if clip_norm and boundary:  # gradients are all-reduced at the boundary
            grad_norm = float(clip_grad_norm_global_(engine.module, clip_norm))
        elif log_now and run_layout["zero_stage"] == 0:
            grad_norm = float(global_grad_norm(engine.module))
        guard.step()
        if log_now and grad_norm is None:
            grad_norm = engine.get_global_grad_norm()  # ZeRO 1/2 compute the global norm themselves
        if not bad:
            window["loss"] += float(ce.detach())
            window["aux"] += float(out.aux_loss.detach())
            window["n"] += 1
            window["images"] += images.shape[0]
            routing.add(out.routing)
            d = route_digest(out.routing, idx)
            digest = d if digest is None else digest + d
        micro += 1
        if not boundary:
            continue
        step += 1
        if bar is not None:
            bar.update(1)
        if log_now:
            n = max(window["n"], 1)  # 0: every micro-batch of the window was skipped (train.nan_policy=skip)
            loss_avg, aux_avg, imgs = all_reduce_mean([window["loss"] / n, window["aux"] / n, float(window["images"])])
            elapsed = time.time() - window["t0"]
            rec = {"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": loss_avg, "aux_loss": aux_avg,
                   "lr": scheduler.get_last_lr()[0], "images_per_sec": imgs * layout.world / max(elapsed, 1e-9),
                   "grad_norm": None if grad_norm is None else float(grad_norm)}
            if not window["n"]:
                rec["loss"] = rec["aux_loss"] = None
            r = routing.reduce()
            rec.update({**routing_fields(r), "skipped_steps": guard.skipped})  # per-depth routing (metrics.py)
            if digest is not None:
                rec["route_digest"] = all_reduce_sum_int(digest)
            log.write(rec)
            watch.update(step, r)  # routing warnings
            if bar is not None:
                bar.set_postfix(loss=f"{loss_avg:.3f}", lr=f"{rec['lr']:.2e}")
            window = new_window()
            routing = RoutingAccumulator()
            digest = None
        maybe_fault("train", step, info.rank)
        paused = time.time()  # saving and evaluating do not count in the window's images/s
        every = recipe.checkpoint.every_steps
        if every and step % every == 0 and step < total_steps:
            save_checkpoint(engine, plan.out, recipe, step, run_layout, recipe.checkpoint.keep_last)
        if step % eval_every == 0 or step == total_steps:
            result = evaluate(engine, eval_loader, dtype, device)
            final = {"step": step, "epoch": round(step / steps_per_epoch, 3), **result,
                     "train_seconds": round(time.time() - train_start, 1)}
            log.write(final, prefix="Eval")
            if bar is not None:
                bar.set_postfix(top1=f"{result['top1']:.4f}")
        window["t0"] += time.time() - paused
        if step >= total_steps:
            break
    if bar is not None:
        bar.close()
    if step > start_step or plan.resume is None:
        save_checkpoint(engine, plan.out, recipe, step, run_layout, recipe.checkpoint.keep_last)
    if info.is_main:
        (plan.out / "final.json").write_text(json.dumps(final, indent=2))
    return final


def main(argv: Optional[list[str]] = None) -> int:
    import faulthandler
    import signal

    # `kill -USR1 <pid>` prints every thread's Python stack to stderr: the first thing to look at
    # when a multi-node job stops making progress.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    select_accelerator()
    args = parse_args(argv)
    rank0 = "0" == next((os.environ[k] for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
                         if k in os.environ), "0")
    try:
        plan = plan_run(args)
        final = train(plan)
    except (ConfigError, TrainingError) as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if rank0:
        print(json.dumps({k: final[k] for k in ("step", "top1", "eval_loss", "train_seconds") if k in final}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
