"""The training run: plan (every check before a process group starts), build, the step, log,
evaluate, save. `python -m ds_widenet.train` (train.py) is the command line around it.

One optimizer step = `grad_accum` micro-batches per rank; every rank gets the same number of
tokens at every step (an uneven batch would hang the MoE all-to-all).

`Trainer` exposes a few hook methods (`after_forward`, `before_optimizer_step`,
`after_optimizer_step`, `after_checkpoint_write`, `log_record`, `test_switches`) that do nothing
here: the multi-process tests subclass it (tests/support/) to inject faults, record route digests
or reproduce known bugs. A subclass that reports test switches is announced loudly on every run.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from . import deepspeed_internals as dsi
from . import hostmem, rng
from .config import BatchLayout, ConfigError, Recipe, derived_steps, load_ds_config, load_recipe, validate, zero_stage
from .data import mixup
from .distributed import all_reduce_mean_tensor
from .optim import clip_grad_norm_global_, global_grad_norm
from .routing_stats import RoutingAccumulator, routing_fields


class TrainingError(RuntimeError):
    """A run-time failure with a one-line message (e.g. a non-finite loss)."""


@dataclass
class _Micro:
    """One micro-batch of the accumulation window, kept on the device until its boundary."""

    finite: torch.Tensor  # this rank's loss was finite (0-dim bool)
    ce: torch.Tensor
    aux: torch.Tensor
    z: Optional[torch.Tensor]  # the router z-loss, where model.moe.z_loss_weight > 0
    images: int
    out: Any  # the ModelOutput (its routing statistics)
    sample_ids: torch.Tensor


# --------------------------------------------------------------------------------------------
# Plan: everything decided before the process group starts (so bad input fails fast, on every rank)


@dataclass
class Plan:
    recipe: Recipe
    ds_config: dict[str, Any]
    layout: BatchLayout
    out: Path
    resume: Optional[Path] = None  # a complete checkpoint directory
    resume_meta: Optional[dict[str, Any]] = None  # its meta.json
    init_from: Optional[Path] = None
    init_weights: Optional[tuple[dict[str, Any], str]] = None  # read_init_weights(init_from): read once
    notices: list[str] = field(default_factory=list)  # for the run log once it exists


def make_plan(recipe_path: Optional[str], ds_config_path: str, out: str, overrides: Optional[list[str]] = None,
              resume: Optional[str] = None, init_from: Optional[str] = None, overwrite: bool = False) -> Plan:
    """Read and validate everything; raises ConfigError with a one-line message."""
    from .checkpoint import check_same_model, checkpoint_root, complete_checkpoints, find_checkpoint, read_meta
    from .distributed import discover_env

    recipe = load_recipe(recipe_path, overrides or [])
    ds_config = load_ds_config(ds_config_path)
    discover_env()
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE") or 1)
    layout = validate(recipe, ds_config, world)
    out_dir = Path(out)
    if init_from and resume:
        raise ConfigError("--init_from and --resume exclude each other: --resume continues a run, --init_from starts one")
    plan = Plan(recipe, ds_config, layout, out_dir)
    if resume:
        plan.resume, notice = find_checkpoint(resume, out_dir)
        plan.resume_meta = read_meta(plan.resume)
        check_same_model(plan.resume_meta["model"], recipe.model, plan.resume)
        if notice:
            plan.notices.append(notice)
    elif not overwrite and ((out_dir / "metrics.jsonl").exists() or complete_checkpoints(checkpoint_root(out_dir))):
        raise ConfigError(f"{out_dir} already holds a run (metrics.jsonl or checkpoints): pass --resume auto to continue it, "
                          "choose a new --out, or pass --overwrite (which deletes its checkpoints)")
    if init_from:
        plan.init_from = Path(init_from)
        plan.init_weights = read_init_weights(plan.init_from, recipe)  # a truncated or mismatched export fails now
    if recipe.data.root and not Path(recipe.data.root).exists():
        raise ConfigError(f"data.root={recipe.data.root} does not exist: point data.root at your data directory")
    return plan


def read_init_weights(path: Path, recipe: Recipe) -> tuple[dict[str, Any], str]:
    """An export's weights in the DeepSpeed model's names, adapted to the recipe's model (new head,
    interpolated position embeddings), and a notice of what was adapted."""
    from .export import adapt_for_finetune, read_export, to_deepspeed_names

    weights, src = read_export(path)
    if src.arch != recipe.model.arch:
        raise ConfigError(f"--init_from {path} is a {src.arch} model, the recipe trains a {recipe.model.arch}: "
                          "use an export of the same architecture")
    weights = to_deepspeed_names(adapt_for_finetune(weights, src, recipe.model), recipe.model)
    changes = []
    if src.num_classes != recipe.model.num_classes:
        changes.append(f"new head for {recipe.model.num_classes} classes")
    if src.img_size // src.patch_size != recipe.model.img_size // recipe.model.patch_size:
        changes.append(f"position embeddings interpolated to {recipe.model.img_size}px")
    return weights, f"initialised from {path}" + (f" ({', '.join(changes)})" if changes else "")


def run_layout(plan: Plan) -> dict[str, Any]:
    """What decides whether a checkpoint resumes exactly or is resharded."""
    ds = plan.ds_config
    return {"world": plan.layout.world, "ep_size": plan.recipe.parallel.ep_size, "zero_stage": zero_stage(ds),
            "bf16": bool((ds.get("bf16") or {}).get("enabled")), "fp16": bool((ds.get("fp16") or {}).get("enabled"))}


def soft_cross_entropy(logits, targets):
    return torch.sum(-targets * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()


# --------------------------------------------------------------------------------------------
# The run


class Trainer:
    """Runs a Plan on every rank: `Trainer(plan).run()` returns the final evaluation."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.recipe = plan.recipe
        self.layout = plan.layout

    # ---- hooks (no-ops here; see the module doc) ----------------------------------------------

    def test_switches(self) -> list[str]:
        """Names of test-only behaviours this trainer has switched on (announced at start)."""
        return []

    def after_forward(self, out: Any, sample_ids: Any) -> None:
        """Called at the accumulation boundary for each counted micro-batch of the window, in order,
        with its forward's output (not for one whose loss was non-finite on some rank)."""

    def before_optimizer_step(self) -> None:
        """Called at each accumulation boundary, after backward, before clipping and the step."""

    def after_optimizer_step(self, step: int) -> None:
        """Called after optimizer step `step` (1-based), before saving and evaluating."""

    def after_checkpoint_write(self, step: int) -> None:
        """Called on every rank once its files of the checkpoint at `step` are written."""

    def log_record(self, rec: dict[str, Any]) -> dict[str, Any]:
        """The log-step record about to be written (every rank calls it; may add fields)."""
        return rec

    # ---- build --------------------------------------------------------------------------------

    def project_clips(self) -> bool:
        """ZeRO-0 with expert parallelism: the project clips by the true global norm itself, since
        DeepSpeed's ZeRO-0 clipping averages per-rank norms although ranks hold different experts
        (DeepSpeed #8475). ZeRO 1/2 compute the global norm correctly and keep DeepSpeed's clipping."""
        ds = self.plan.ds_config
        return zero_stage(ds) == 0 and self.recipe.parallel.ep_size > 1 and float(ds.get("gradient_clipping", 0)) > 0

    def engine_config(self) -> dict[str, Any]:
        cfg = copy.deepcopy(self.plan.ds_config)
        if self.project_clips():
            cfg["gradient_clipping"] = 0.0
        if self.recipe.optim.name == "lamb":
            cfg["zero_allow_untested_optimizer"] = True  # the project's LAMB is ZeRO-aware (attach_zero_lamb)
        cfg["train_micro_batch_size_per_gpu"] = self.layout.micro
        cfg["gradient_accumulation_steps"] = self.layout.grad_accum
        cfg["train_batch_size"] = self.layout.global_batch
        cfg.setdefault("steps_per_print", 10 ** 9)  # the project logs; keep DeepSpeed's own log quiet
        return cfg

    def build_model(self) -> Any:
        from .models import build_model

        return build_model(self.recipe.model, ep_size=self.ep, ep_rank=self.ep_rank, seed=self.recipe.seed)

    def attach_zero_lamb(self) -> None:
        """Under ZeRO 1/2 the project's LAMB must learn the flat-partition layout to keep its trust
        ratio per parameter (optim.Lamb.attach_zero_partitions)."""
        from .optim import Lamb

        basic = dsi.basic_optimizer(self.engine)
        if not isinstance(basic, Lamb) or self.engine.zero_optimization_stage() == 0:
            return
        if not dsi.has_zero_partitions(self.engine.optimizer):
            raise ConfigError(f"optim.name=lamb cannot read {type(self.engine.optimizer).__name__}'s partition layout: "
                              "use ZeRO stage 2 (or ZeRO-1 without data_types.grad_accum_dtype=fp32)")
        basic.attach_zero_partitions(self.engine.optimizer)

    def build(self) -> None:
        """Process group, data, model, engine, resume; then the run directory and its log."""
        import deepspeed

        from .data import EvalSampler, GlobalBatchSampler, build_datasets, build_loader
        from .distributed import init_distributed
        from .optim import build_optimizer, build_scheduler, param_groups

        plan, recipe, layout = self.plan, self.recipe, self.layout
        self.info = init_distributed()
        self._agree_on_out()
        torch.manual_seed(recipe.seed)
        self.ep = recipe.parallel.ep_size
        # DeepSpeed's default expert groups are consecutive ranks (config.validate refuses
        # use_data_before_expert_parallelism); checked against the real groups after initialize.
        self.ep_rank = self.info.rank % self.ep
        train_set, test_set = build_datasets(recipe.data, recipe.model, recipe.seed)
        self.steps_per_epoch, self.total_steps, warmup = derived_steps(recipe, len(train_set), layout)
        meta = plan.resume_meta or {}
        self.start_step = meta.get("step", 0)
        sampler = GlobalBatchSampler(len(train_set), layout.micro, layout.grad_accum, layout.world, self.info.rank,
                                     recipe.seed, shuffle=True, start_step=self.start_step, total_steps=self.total_steps)
        self.train_loader = build_loader(train_set, sampler, recipe.data.num_workers)
        eval_batch = recipe.data.eval_batch_size or layout.micro
        self.eval_loader = build_loader(test_set, EvalSampler(len(test_set), eval_batch, layout.world, self.info.rank),
                                        recipe.data.num_workers)

        model = self.build_model()
        self.layout_record = run_layout(plan)
        self.reshard = plan.resume is not None and meta["layout"] != self.layout_record
        notices = list(plan.notices)
        if plan.init_from is not None:
            from .reshard import load_weights_into

            weights, notice = plan.init_weights or read_init_weights(plan.init_from, recipe)
            plan.init_weights = None  # loaded below: the model holds them from here on
            missing = load_weights_into(model, weights, self.ep, self.ep_rank, strict=False)
            unexpected = [m for m in missing if not m.startswith("head.")]
            if unexpected:
                raise ConfigError(f"--init_from {plan.init_from}: {len(unexpected)} weights missing (e.g. {unexpected[0]}): "
                                  "it is not the same architecture as the recipe's model")
            notices.append(notice)
        elif self.reshard:  # weights from the layout-free shards; the engine's own files assume the old layout
            from .reshard import load_weights_into, read_shards

            load_weights_into(model, read_shards(plan.resume, "weights")[0], self.ep, self.ep_rank)
        optimizer = build_optimizer(recipe.optim, param_groups(model, recipe.optim.weight_decay))
        self.ds_engine_config = self.engine_config()
        scheduler = build_scheduler(optimizer, recipe.schedule, self.total_steps, warmup)
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                                 config=self.ds_engine_config)
        self._check_expert_ranks()
        dsi.skip_single_rank_gradient_allreduce(self.engine)  # a no-op's cost with one rank
        if recipe.train.compile:  # in place (nn.Module.compile): parameter names and checkpoints unchanged
            self.engine.compile(backend=recipe.train.compile_backend)
        self.dtype = next(self.engine.module.parameters()).dtype
        self.device = self.engine.device
        self.attach_zero_lamb()
        notices.extend(self._resume())
        self._open_run_dir(notices)

    def _agree_on_out(self) -> None:
        """Every rank sees the same --out, and resumes from the checkpoint rank 0 chose (every rank
        made the plan from its own view of the file system; only rank 0's counts)."""
        import torch.distributed as dist

        from .checkpoint import ranks_not_seeing

        if self.info.world_size == 1:
            return
        plan = self.plan
        blind = ranks_not_seeing(plan.out)
        if blind:
            hosts = sorted({h for _, h in blind})
            raise ConfigError(f"--out {plan.out} is not one directory for every rank: rank(s) "
                              f"{', '.join(str(r) for r, _ in blind)} on {', '.join(hosts)} do not see the files rank 0 "
                              "writes there (a node-local disk?): put --out on a file system every host mounts (each "
                              "rank writes its part of every checkpoint there and reads it back on resume)")
        choice = [(None if plan.resume is None else str(plan.resume), plan.resume_meta)]
        dist.broadcast_object_list(choice, src=0)
        resume, plan.resume_meta = choice[0]
        plan.resume = None if resume is None else Path(resume)

    def _check_expert_ranks(self) -> None:
        for p in self.engine.module.parameters():
            if dsi.is_expert_param(p):
                actual = dsi.expert_parallel_rank(dsi.expert_group_name(p))
                if actual != self.ep_rank:
                    raise ConfigError(f"rank {self.info.rank} holds the experts of expert-parallel rank {actual}, not "
                                      f"{self.ep_rank}: remove use_data_before_expert_parallelism from the DeepSpeed config")
                return

    def _resume(self) -> list[str]:
        plan = self.plan
        if plan.resume is None:
            return []
        if not self.reshard:
            try:
                self.engine.load_checkpoint(str(plan.resume.parent), tag=plan.resume.name)  # exact: same layout
            except Exception as e:  # a corrupt pickle of the right size: DeepSpeed's own loader fails
                raise TrainingError(f"--resume {plan.resume}: DeepSpeed could not load its engine checkpoint "
                                    f"({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}): "
                                    "resume from an earlier checkpoint") from None
            return [f"resumed from {plan.resume} (same layout: weights, optimizer and schedule state)"]
        from .reshard import load_moments_into, read_shards

        state, meta = read_shards(plan.resume, "state")
        ok = bool(state) and load_moments_into(self.engine, state, self.ep, self.ep_rank, int(meta.get("optimizer_step", 0)))
        for _ in range(self.start_step):
            self.scheduler.step()
        what = "weights and optimizer moments" if ok else "weights only (optimizer state starts fresh)"
        return [f"resharded {plan.resume} from {plan.resume_meta['layout']} : {what}"]

    def _open_run_dir(self, notices: list[str]) -> None:
        from .checkpoint import checkpoint_root
        from .guards import NonFiniteGuard
        from .routing_stats import RoutingWatch
        from .runlog import Console, MetricsLog

        plan, train_cfg = self.plan, self.recipe.train
        if self.info.is_main:
            plan.out.mkdir(parents=True, exist_ok=True)
            if plan.resume is None:  # a new run (make_plan refused an existing one unless --overwrite)
                (plan.out / "metrics.jsonl").write_text("")
                shutil.rmtree(checkpoint_root(plan.out), ignore_errors=True)  # or pruning and --resume auto mix runs
            (plan.out / "recipe.json").write_text(json.dumps(self.recipe.to_dict(), indent=2))
            (plan.out / "ds_config.json").write_text(json.dumps(self.ds_engine_config, indent=2))
        bar = train_cfg.progress_bar == "on" or (train_cfg.progress_bar == "auto" and sys.stderr.isatty())
        console = Console(train_cfg.log_format, self.total_steps, self.start_step, bar=bar and self.info.is_main) \
            if self.info.is_main else None
        self.log = MetricsLog(plan.out / "metrics.jsonl", self.info.is_main, self.engine.monitor, console)
        self.watch = RoutingWatch.from_config(train_cfg, self.log)
        self.guard = NonFiniteGuard.from_config(self.engine, train_cfg, self.log)
        for switch in self.test_switches():
            msg = f"TEST-ONLY SWITCH ACTIVE: {switch}: results of this run are wrong on purpose"
            self.log.event(self.start_step, msg)
            print(f"ds_widenet: WARNING: {msg}", file=sys.stderr, flush=True)
        for notice in notices:
            self.log.event(self.start_step, notice)
        self.peak_flops = self._peak_flops()
        if self.peak_flops:
            from .flops import step_flops

            self.flops_per_image = step_flops(self.recipe.model, 1)["train_per_image"]  # once, not per log step

    def _peak_flops(self) -> Optional[float]:
        """The device's data-sheet bf16 peak times the world size, where known (MFU in the log)."""
        from .flops import known_peak_flops

        if self.device.type != "cuda" or self.dtype != torch.bfloat16:
            return None
        peak = known_peak_flops(torch.cuda.get_device_name(self.device))
        return None if peak is None else peak * self.layout.world

    # ---- the loop -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        if self.recipe.train.retain_host_memory:
            hostmem.retain_freed_memory()
        try:
            self.build()
            return self.fit()
        finally:
            log = getattr(self, "log", None)  # absent when build() failed early
            if log is not None and log.console is not None:
                log.console.close()

    def fit(self) -> dict[str, Any]:
        self.step, self.micro = self.start_step, 0
        self.window = self._new_window()
        self.pending: list[_Micro] = []  # the current accumulation window's micro-batches
        self.routing = RoutingAccumulator()
        self.final: dict[str, Any] = {}
        self.train_start = time.time()
        self.eval_every = self.recipe.train.eval_interval or self.steps_per_epoch
        for images, labels, idx in self.train_loader:
            if not self.train_micro_step(images, labels, idx):
                continue
            self.step += 1
            if self.log.console is not None:
                self.log.console.advance()
            if self.log_now:
                self.log_step()
            self.after_optimizer_step(self.step)
            paused = time.time()  # saving and evaluating do not count in the window's images/s
            self.maybe_save_and_evaluate()
            self.window["t0"] += time.time() - paused
            if self.step >= self.total_steps:
                break
        if self.step > self.start_step or self.plan.resume is None:
            self.save()
        if not self.final:  # resumed at its last step: nothing trained, nothing evaluated yet
            self.evaluate()
        if self.info.is_main:
            (self.plan.out / "final.json").write_text(json.dumps(self.final, indent=2))
        return self.final

    def _new_window(self) -> dict[str, Any]:
        # loss sums in float64 on the device: the same sums as Python floats of the fp32 losses
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        return {"loss": zero, "aux": zero, "z": zero, "n": 0, "t0": time.time(), "images": 0, "grad_norm": None}

    def train_micro_step(self, images: Any, labels: Any, idx: Any) -> bool:
        """Forward and backward of one micro-batch, and the optimizer step at the accumulation
        boundary. Returns whether this micro-batch ended an optimizer step.

        Between two boundaries nothing is read back from the device and no collective is issued
        by the trainer: the loss's finiteness, the losses and the routing statistics stay on the
        device until the boundary, where one all-reduce and one read decide every rank's
        nan_policy path (guards.NonFiniteGuard) and the window's counted micro-batches are added."""
        recipe, engine, step = self.recipe, self.engine, self.step
        # the mixup key: the loader's CPU tensor (not a device read); _keyed_beta draws on the host
        first = int(idx[0]) if recipe.train.mixup_alpha > 0 and len(idx) else 0
        images, idx = images.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True)
        images, targets = mixup(images, labels.to(self.device, non_blocking=True), recipe.model.num_classes,
                                recipe.train.mixup_alpha, recipe.train.label_smoothing,
                                [recipe.seed, step, rng.SITE_MIXUP, first])
        out = engine(images.to(self.dtype), sample_ids=idx, step=step, seed=recipe.seed)
        ce = soft_cross_entropy(out.logits, targets)
        moe = recipe.model.moe
        loss = ce + (moe.aux_loss_weight if moe else 0.0) * out.aux_loss
        z = out.z_loss
        if z is not None:
            loss = loss + moe.z_loss_weight * z
            z = z.detach()
        self.pending.append(_Micro(self.guard.finite(loss), ce.detach(), out.aux_loss.detach(), z, images.shape[0],
                                   out, idx))
        self.guard.backward(loss)  # a non-finite one too: see guards.NonFiniteGuard
        boundary = (self.micro + 1) % self.layout.grad_accum == 0
        self.log_now = boundary and ((step + 1) % recipe.train.log_interval == 0 or step + 1 == self.total_steps)
        skip = False
        if boundary:
            skip = self._close_window(step)
            self.before_optimizer_step()
            self.window["grad_norm"] = self._clip_or_measure()
        self.guard.step(skip)
        if self.log_now and self.window["grad_norm"] is None:
            self.window["grad_norm"] = engine.get_global_grad_norm()  # ZeRO 1/2 compute the global norm themselves
        self.micro += 1
        return boundary

    def _close_window(self, step: int) -> bool:
        """At the boundary: which of the window's micro-batches were finite on every rank (one
        reduction, one read); stop or log the skip (train.nan_policy); add the counted ones to
        the log window and the routing statistics. Returns whether the step is skipped."""
        pending, self.pending = self.pending, []
        finite = self.guard.window_finite([m.finite for m in pending])
        skip = not all(finite)
        if skip:
            stop = self.guard.bad_window(step)
            if stop:
                raise TrainingError(stop)
        w = self.window
        for m, ok in zip(pending, finite):
            if not ok:  # excluded from the logged means, as on every rank
                continue
            w["loss"] = w["loss"] + m.ce.double()
            w["aux"] = w["aux"] + m.aux.double()
            if m.z is not None:
                w["z"] = w["z"] + m.z.double()
            w["n"] += 1
            w["images"] += m.images
            self.routing.add(m.out.routing)
            self.after_forward(m.out, m.sample_ids)
        return skip

    def _clip_or_measure(self) -> Optional[float]:
        """At the boundary (gradients all-reduced): the project's global-norm clip where it clips
        (see project_clips), else the norm for the log under ZeRO-0 (ZeRO 1/2 report their own)."""
        clip = float(self.plan.ds_config.get("gradient_clipping", 0)) if self.project_clips() else 0.0
        if clip:
            return float(clip_grad_norm_global_(self.engine.module, clip))
        if self.log_now and self.layout_record["zero_stage"] == 0:
            # fp16 gradients still carry the loss scale here: the logged norm is the true one
            return float(global_grad_norm(self.engine.module)) / dsi.gradient_loss_scale(self.engine)
        return None

    def log_step(self) -> None:
        w = self.window
        n = max(w["n"], 1)  # 0: every micro-batch of the window was skipped (train.nan_policy=skip)
        loss_avg, aux_avg, z_avg, imgs = all_reduce_mean_tensor(
            torch.stack([w["loss"] / n, w["aux"] / n, w["z"] / n, w["loss"].new_tensor(float(w["images"]))]))
        elapsed = time.time() - w["t0"]
        ips = imgs * self.layout.world / max(elapsed, 1e-9)
        rec: dict[str, Any] = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 3), "loss": loss_avg,
                               "aux_loss": aux_avg, "lr": self.scheduler.get_last_lr()[0], "images_per_sec": ips,
                               "grad_norm": None if w["grad_norm"] is None else float(w["grad_norm"])}
        z_on = self.recipe.model.moe is not None and self.recipe.model.moe.z_loss_weight > 0
        if z_on:
            rec["z_loss"] = z_avg
        if self.peak_flops:
            rec["mfu"] = ips * self.flops_per_image / self.peak_flops
        if not w["n"]:
            rec["loss"] = rec["aux_loss"] = None
            if z_on:
                rec["z_loss"] = None
        r = self.routing.reduce()
        rec.update({**routing_fields(r), "skipped_steps": self.guard.skipped})  # per-depth routing
        self.log.write(self.log_record(rec))
        self.watch.update(self.step, r)  # routing warnings
        self.window = self._new_window()
        self.routing = RoutingAccumulator()

    def maybe_save_and_evaluate(self) -> None:
        every = self.recipe.checkpoint.every_steps
        if every and self.step % every == 0 and self.step < self.total_steps:
            self.save()
        if self.step % self.eval_every == 0 or self.step == self.total_steps:
            self.evaluate()

    def evaluate(self) -> dict[str, Any]:
        """Exact top-1 over the whole test set under any world size (evaluation.evaluate_loader)."""
        from .evaluation import evaluate_loader

        self.engine.eval()
        try:
            result = evaluate_loader(self.engine, self.eval_loader, self.device, self.dtype)
        finally:
            self.engine.train()
        self.final = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 3), **result,
                      "train_seconds": round(time.time() - self.train_start, 1)}
        if self.recipe.data.holdout:  # top1 is on held-out training images, not on the test split
            self.final["eval_split"] = f"holdout of {self.recipe.data.holdout} training images"
        self.log.write(self.final, prefix="Eval")
        return result

    def save(self) -> None:
        from .checkpoint import save_checkpoint

        save_checkpoint(self.engine, self.plan.out, self.recipe, self.step, self.layout_record,
                        self.recipe.checkpoint.keep_last, after_write=self.after_checkpoint_write)
