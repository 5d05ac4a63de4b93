"""The trainer's own images/s against a bare PyTorch loop over the same model, batch and optimizer
(issue 10, deliverable 5: trainer >= 0.98x bare, on digits and cifar).

    python bench/trainer_overhead.py --presets widenet-digits widenet-cifar --batch 64 8 \
        --steps-per-round 5 3 --rounds 24 12 --warmup-rounds 1 --threads 1 --profile \
        --json bench/results/trainer_overhead.json

One process, world size 1 (DeepSpeed's CPU accelerator and gloo without a GPU). Per preset:

* **trainer**: the project's real training loop, `ds_widenet.trainer.Trainer(make_plan(...)).run()`
  as `python -m ds_widenet.train` runs it, on the preset's recipe (`ds_configs/digits_widenet.yaml`:
  AdamW, label smoothing 0.1; `ds_configs/cifar10_widenet.yaml`: the project's LAMB, dropout 0.1,
  mixup 0.5) and a DeepSpeed JSON like `ds_configs/cpu_fp32.json` (fp32, ZeRO 0, clipping 1.0) with
  the batch given here. Evaluation and saving are out of the timing: `train.eval_interval` is past
  the end, so the only evaluation and the only checkpoint come after the last timed round. One log
  step per round (`train.log_interval` = steps per round: every 5 or 3 steps here, more often than
  the recipes' 20, so logging weighs more here than in a real run); every timed trainer round writes
  one metrics.jsonl line. The cifar recipe runs on synthetic images of CIFAR's shape (no CIFAR-10
  files on these machines), loaded in the process like digits (num_workers 0). The rounds are cut
  by the Trainer's `after_optimizer_step` hook (the one test entry points use), so nothing of the
  trainer is replaced; the other variants run inside that hook, and their time is taken out of the
  trainer's timing and out of its metrics.jsonl window (so metrics.jsonl's `images_per_sec` is the
  trainer's own too, reported as a cross-check).
* **bare**: what a user would write by hand with plain PyTorch, no DeepSpeed engine: the same
  `build_model(recipe.model, seed=recipe.seed)` (same weights), the optimizer the recipe builds
  (`optim.build_optimizer` over `optim.param_groups`: torch's AdamW, or the project's Lamb: the
  very class the engine steps under ZeRO 0 fp32, where DeepSpeed wraps nothing), the same LambdaLR
  schedule, `torch.nn.utils.clip_grad_norm_` at the JSON's `gradient_clipping`, the same loss
  (mixup/label smoothing targets, soft cross-entropy + aux_loss_weight x aux loss, divided by the
  gradient accumulation as DeepSpeed does), and the same batches: a second loader from the same
  `data.build_loader` / `GlobalBatchSampler` over the same dataset, so both variants read the
  same images in the same order at the same cost. Per micro-step it reads nothing back to the
  host except the first sample id (on the host already; mixup's key), logs nothing, keeps no
  statistics, checks nothing.
* **engine** (decomposition, not part of the target): the bare loop with the model wrapped in its
  own DeepSpeed engine (same engine config as the trainer's): `engine(x)`, `engine.backward(loss)`,
  `engine.step()`. trainer/engine is the project's own bookkeeping (finite checks, host reads of
  the loss, routing statistics, logging); engine/bare is DeepSpeed's engine.

Rounds are interleaved, trainer round i then engine round i then bare round i, so a slow patch of a
shared machine hits every variant; after warm-up rounds (discarded) it reports per variant the
median images/s over rounds, the ratio of medians trainer/bare, the ratio of totals, and the
per-round (paired) ratios and their median. Target: trainer/bare >= 0.98 (`meets_target`: the ratio
of medians and the paired median both). Every ratio is given twice: by wall clock (the target's
images/s) and by this process's CPU time (`cpu_time`), which another job on the machine disturbs
less (one thread, the loader in the process: CPU seconds are the work done). The three loops train
the same thing: each round's mean cross-entropy of the bare and engine loops is compared with the
trainer's metrics.jsonl loss of that round (`loss_agreement_with_trainer`, ~1e-7 relative: float32
against float64 sums), so their step times are those of the same model on the same route choices.

What a CPU measurement cannot show: on the CPU every op finishes before Python moves on, so a
host read (`float(loss)`, `bool(isfinite)`) costs only the read itself. On a GPU each one stalls
the launch queue until the device catches up; this script runs there too (the trainer picks the
device), but it has been run on the CPU only in this project.

`--profile` adds one more round pair under cProfile (trainer, then bare) and writes the functions
that take the most time (self and cumulative) into the JSON, for finding where the trainer's extra
time goes.
"""
from __future__ import annotations

import argparse
import cProfile
import copy
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

torch = common.torch
ROOT = common.ROOT

RECIPES = {  # preset -> (recipe, recipe overrides that make it run here)
    "widenet-digits": ("ds_configs/digits_widenet.yaml", []),
    # No CIFAR-10 files on these machines: synthetic images of CIFAR's shape (3x32x32, 10 classes),
    # no augmentation, loaded in the process (num_workers 0), the rest of the paper's CIFAR recipe.
    "widenet-cifar": ("ds_configs/cifar10_widenet.yaml",
                      ["data.name=synthetic", "data.root=null", "data.augment=none", "data.num_workers=0"]),
}
VARIANTS = ("trainer", "engine", "bare")
# Where a training loop spends time outside the model: the trainer's modules, DeepSpeed, the optimizers,
# clipping, the loader, host reads (profile rows whose location contains one of these).
LOOP_SIDE = ("ds_widenet/trainer.py", "ds_widenet/guards.py", "ds_widenet/routing_stats.py", "ds_widenet/runlog.py",
             "ds_widenet/distributed.py", "ds_widenet/optim.py", "ds_widenet/data.py", "ds_widenet/deepspeed_internals.py",
             "deepspeed/", "torch/optim/", "clip_grad", "trainer_overhead.py", "torch/utils/data/",
             "'item'", "'tolist'", "isfinite", "__float__", "__bool__", "_local_scalar_dense")
TARGET = 0.98


def ds_config_for(batch: int, micro: int) -> dict[str, Any]:
    """ds_configs/cpu_fp32.json with the batch of this benchmark."""
    cfg = json.loads((ROOT / "ds_configs" / "cpu_fp32.json").read_text())
    cfg["train_batch_size"] = batch
    cfg["train_micro_batch_size_per_gpu"] = micro
    return cfg


# --------------------------------------------------------------------------------------------
# The variants that run inside the trainer's hook


class ManualLoop:
    """The bare loop (plain PyTorch) or, with `engine_config`, the same loop through a DeepSpeed engine."""

    def __init__(self, trainer: Any, engine_config: Optional[dict[str, Any]] = None) -> None:
        from ds_widenet.config import derived_steps
        from ds_widenet.data import GlobalBatchSampler, build_loader
        from ds_widenet.models import build_model
        from ds_widenet.optim import build_optimizer, build_scheduler, param_groups

        recipe, layout = trainer.recipe, trainer.layout
        self.recipe, self.layout = recipe, layout
        self.device, self.dtype = trainer.device, trainer.dtype
        model = build_model(recipe.model, seed=recipe.seed).to(self.device)
        model.train()
        opt = build_optimizer(recipe.optim, param_groups(model, recipe.optim.weight_decay))
        _, total, warmup = derived_steps(recipe, len(trainer.train_loader.dataset), layout)
        sched = build_scheduler(opt, recipe.schedule, total, warmup)
        self.clip = float(trainer.plan.ds_config.get("gradient_clipping", 0) or 0)
        self.engine = None
        if engine_config is not None:
            import deepspeed

            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                        config=copy.deepcopy(engine_config))
        self.model, self.opt, self.sched = model, opt, sched
        self.params = [p for p in model.parameters() if p.requires_grad]
        train_set = trainer.train_loader.dataset
        sampler = GlobalBatchSampler(len(train_set), layout.micro, layout.grad_accum, 1, 0, recipe.seed,
                                     shuffle=True, total_steps=None)
        self.batches = iter(build_loader(train_set, sampler, recipe.data.num_workers))
        self.aux_w = recipe.model.moe.aux_loss_weight if recipe.model.moe else 0.0
        self.step_n = 0
        self.ce_sum: Any = 0.0  # a device tensor: read once per round, outside the timing
        self.ce_n = 0
        self.round_losses: list[float] = []

    def end_round(self) -> None:
        """The round's mean cross-entropy per micro-batch (what metrics.jsonl's `loss` is for the trainer)."""
        self.round_losses.append(float(self.ce_sum) / max(self.ce_n, 1))
        self.ce_sum, self.ce_n = 0.0, 0

    def step(self) -> None:
        """One optimizer step: grad_accum micro-batches of forward + backward, clip, step, schedule."""
        from ds_widenet import rng
        from ds_widenet.data import mixup
        from ds_widenet.trainer import soft_cross_entropy

        recipe, accum, engine = self.recipe, self.layout.grad_accum, self.engine
        for _ in range(accum):
            images, labels, idx = next(self.batches)
            first = int(idx[0])
            images, idx = images.to(self.device), idx.to(self.device)
            images, targets = mixup(images, labels.to(self.device), recipe.model.num_classes, recipe.train.mixup_alpha,
                                    recipe.train.label_smoothing, [recipe.seed, self.step_n, rng.SITE_MIXUP, first])
            fwd = engine if engine is not None else self.model
            out = fwd(images.to(self.dtype), sample_ids=idx, step=self.step_n, seed=recipe.seed)
            ce = soft_cross_entropy(out.logits, targets)
            loss = ce + self.aux_w * out.aux_loss
            self.ce_sum = self.ce_sum + ce.detach()
            self.ce_n += 1
            if engine is not None:
                engine.backward(loss)  # scales by 1/accum itself
                engine.step()  # the optimizer step only at the boundary
            else:
                (loss / accum if accum > 1 else loss).backward()
        if engine is None:
            if self.clip:
                clip_by_global_norm(self.params, self.clip)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
        self.step_n += 1


def clip_by_global_norm(params: Sequence[Any], max_norm: float) -> Any:
    """Gradient clipping in plain torch with DeepSpeed's ZeRO-0 arithmetic (deepspeed.runtime.utils.
    clip_grad_norm_ at world size 1, without its process-group calls): the norm is sqrt(sum of the
    squared per-parameter fp32 norms) and every gradient is multiplied by min(1, max / (norm + 1e-6)).
    torch.nn.utils.clip_grad_norm_ computes the same norm in another order; over a hundred MoE steps
    one ulp of difference flips a route and the loops stop training the same thing."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.stack([g.detach().float().norm(2) for g in grads]).pow(2).sum().float().pow(0.5)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)
    return norm


def piece_costs(trainer: Any, loop: "ManualLoop", reps: int = 10) -> dict[str, Any]:
    """CPU ms of the pieces of an optimizer step the engine adds at world size 1, timed alone on the
    trainer's own engine and gradients (no profiler): DeepSpeed's gradient all-reduce (it all-reduces
    and copies back even with one rank), its gradient clipping against this script's (same norm) and
    torch's clip_grad_norm_, its zero_grad against the torch optimizer's."""
    from deepspeed.runtime.utils import clip_grad_norm_ as ds_clip

    engine = trainer.engine
    params = [p for p in engine.module.parameters() if p.requires_grad]
    images, labels, idx = next(loop.batches)
    out = engine.module(images.to(trainer.device, trainer.dtype), sample_ids=idx.to(trainer.device), step=0,
                        seed=trainer.recipe.seed)
    (out.logits.float().logsumexp(-1).mean() + out.aux_loss).backward()
    saved = [p.grad.clone() if p.grad is not None else None for p in params]

    def restore() -> None:
        for p, g in zip(params, saved):
            p.grad = None if g is None else g.clone()

    def cost(fn: Any) -> float:
        ts = []
        for _ in range(reps):
            restore()
            common.sync(trainer.device)
            t0 = time.process_time()
            fn()
            common.sync(trainer.device)
            ts.append(time.process_time() - t0)
        return 1e3 * statistics.median(ts)

    clip = float(trainer.plan.ds_config.get("gradient_clipping", 0) or 1.0)
    res = {
        "deepspeed_allreduce_gradients_ms": cost(engine.allreduce_gradients),
        "deepspeed_clip_grad_norm_ms": cost(lambda: ds_clip(parameters=engine.module.parameters(), max_norm=clip,
                                                            mpu=engine.mpu)),
        "bare_clip_by_global_norm_ms": cost(lambda: clip_by_global_norm(params, clip)),
        "torch_clip_grad_norm_ms": cost(lambda: torch.nn.utils.clip_grad_norm_(params, clip)),
        "deepspeed_zero_grad_ms": cost(engine.zero_grad),
        "torch_zero_grad_ms": cost(lambda: trainer.engine.optimizer.zero_grad(set_to_none=True)),
        "reps": reps,
        "method": "median CPU ms of `reps` calls on the trainer engine's gradients of one micro-batch, restored "
                  "before each call",
    }
    for p in params:
        p.grad = None
    return res


def _trainer_class():
    from ds_widenet.trainer import Trainer

    class InterleavedTrainer(Trainer):
        """The project's Trainer, unchanged, with its after_optimizer_step hook cutting rounds."""

        def __init__(self, plan: Any, bench: "Bench") -> None:
            super().__init__(plan)
            self.bench = bench

        def fit(self) -> dict[str, Any]:
            self.bench.mark = clocks()
            return super().fit()

        def after_optimizer_step(self, step: int) -> None:
            if step % self.bench.steps_per_round:
                return
            common.sync(self.device)  # the round's kernels are done (CUDA); nothing on the CPU
            entered = clocks()
            self.bench.round_boundary(self, entered)
            paused = time.perf_counter() - entered[0]
            window = getattr(self, "window", None)
            if isinstance(window, dict) and "t0" in window:  # metrics.jsonl's images/s stays the trainer's own
                window["t0"] += paused
            self.bench.mark = clocks()

    return InterleavedTrainer


class Bench:
    """Round bookkeeping: called at each trainer round boundary; runs the other variants' rounds."""

    def __init__(self, steps_per_round: int, warmup_rounds: int, rounds: int, variants: Sequence[str],
                 profile: bool, profile_top: int = 25) -> None:
        self.steps_per_round, self.warmup_rounds, self.rounds = steps_per_round, warmup_rounds, rounds
        self.variants = list(variants)
        self.profile, self.profile_top = profile, profile_top
        self.times: dict[str, list[tuple[float, float]]] = {v: [] for v in self.variants}  # (wall, cpu) per round
        self.threads_seen: set[int] = set()
        self.loops: dict[str, ManualLoop] = {}
        self.round = 0
        self.mark = (0.0, 0.0)
        self.profiler: Optional[cProfile.Profile] = None
        self.profiles: dict[str, Any] = {}
        self.pieces: Optional[dict[str, Any]] = None

    @property
    def total_rounds(self) -> int:
        return self.warmup_rounds + self.rounds + (1 if self.profile else 0)

    def round_boundary(self, trainer: Any, entered: tuple[float, float]) -> None:
        timed = self.warmup_rounds <= self.round < self.warmup_rounds + self.rounds
        profiling = self.round == self.warmup_rounds + self.rounds  # the extra round when profiling
        if self.profiler is not None:  # the profiled trainer round just ended
            self.profiler.disable()
            self.profiles["trainer"] = self._summary(self.profiler, self.steps_per_round)
            self.profiler = None
        if timed and "trainer" in self.times:
            self.times["trainer"].append((entered[0] - self.mark[0], entered[1] - self.mark[1]))
        self.threads_seen.add(torch.get_num_threads())
        if not self.loops:  # built after the trainer's engine, in the same process group
            if "engine" in self.variants:
                self.loops["engine"] = ManualLoop(trainer, engine_config=trainer.ds_engine_config)
            if "bare" in self.variants:
                self.loops["bare"] = ManualLoop(trainer)
        for name, loop in self.loops.items():
            prof = cProfile.Profile(time.process_time) if profiling and name == "bare" else None
            common.sync(loop.device)
            t0 = clocks()
            if prof is not None:
                prof.enable()
            for _ in range(self.steps_per_round):
                loop.step()
            common.sync(loop.device)
            t1 = clocks()
            if prof is not None:
                prof.disable()
                self.profiles[name] = self._summary(prof, self.steps_per_round)
            if timed:
                self.times[name].append((t1[0] - t0[0], t1[1] - t0[1]))
            loop.end_round()
        self.round += 1
        if self.round == self.total_rounds and "bare" in self.loops:  # the end: nothing is timed any more
            self.pieces = piece_costs(trainer, self.loops["bare"])
        if self.profile and self.round == self.warmup_rounds + self.rounds:  # profile the next trainer round
            self.profiler = cProfile.Profile(time.process_time)
            self.profiler.enable()
        common.sync(trainer.device)

    def _summary(self, prof: cProfile.Profile, steps: int) -> dict[str, Any]:
        st = pstats.Stats(prof)
        rows = []
        for (path, line, fn), (cc, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
            where = _short(path)
            rows.append({"function": f"{where}:{line}({fn})", "calls_per_step": nc / steps,
                         "self_ms_per_step": 1e3 * tt / steps, "cum_ms_per_step": 1e3 * ct / steps})
        total = 1e3 * st.total_tt / steps  # type: ignore[attr-defined]
        by_self = sorted(rows, key=lambda r: -r["self_ms_per_step"])[:self.profile_top]
        by_cum = sorted(rows, key=lambda r: -r["cum_ms_per_step"])[:self.profile_top]
        rnd = lambda rs: [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rs]  # noqa: E731
        loop_side = sorted((r for r in rows if any(m in r["function"] for m in LOOP_SIDE) and r["cum_ms_per_step"] >= 0.02),
                           key=lambda r: -r["cum_ms_per_step"])
        return {"profiled_cpu_ms_per_step": round(total, 3), "top_self": rnd(by_self), "top_cumulative": rnd(by_cum),
                "loop_side": rnd(loop_side)}


def clocks() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds). With one thread and the loader in the process, CPU
    seconds are what the work costs, whatever else the machine runs; wall seconds include waiting
    for a core that another job holds."""
    return time.perf_counter(), time.process_time()


def _short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", str(ROOT) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


# --------------------------------------------------------------------------------------------
# One preset


def run_preset(preset: str, batch: int, micro: Optional[int], steps_per_round: int, rounds: int, warmup_rounds: int,
               variants: Sequence[str], overrides: Sequence[str], workdir: Path, profile: bool) -> dict[str, Any]:
    from ds_widenet.trainer import make_plan

    recipe_path, recipe_overrides = RECIPES[preset]
    micro = micro or batch
    ds_path = workdir / f"ds_{preset}.json"
    ds_path.write_text(json.dumps(ds_config_for(batch, micro)))
    bench = Bench(steps_per_round, warmup_rounds, rounds, variants, profile)
    out = workdir / f"run_{preset}"
    ovr = [*recipe_overrides, f"schedule.max_steps={bench.total_rounds * steps_per_round}",
           f"train.log_interval={steps_per_round}", "train.eval_interval=1000000000", "checkpoint.every_steps=0",
           "checkpoint.keep_last=1", "train.progress_bar=off", "train.log_format=off", *overrides]
    plan = make_plan(str(ROOT / recipe_path), str(ds_path), str(out), ovr, overwrite=True)
    trainer = _trainer_class()(plan, bench)
    t0 = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - t0

    per_variant: dict[str, Any] = {}
    ips: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}
    for name in variants:
        walls = [w for w, _ in bench.times[name]]
        cpus = [c for _, c in bench.times[name]]
        ips["wall"][name] = [batch * steps_per_round / t for t in walls]
        ips["cpu"][name] = [batch * steps_per_round / max(t, 1e-9) for t in cpus]
        per_variant[name] = {"round_wall_seconds": [round(t, 6) for t in walls],
                             "round_cpu_seconds": [round(t, 6) for t in cpus],
                             "images_per_s": common.summary(ips["wall"][name]),
                             "images_per_cpu_s": common.summary(ips["cpu"][name]),
                             "step_ms_median": 1e3 * statistics.median(walls) / steps_per_round,
                             "step_cpu_ms_median": 1e3 * statistics.median(cpus) / steps_per_round}

    def ratios(a: str, b: str, clock: str = "wall") -> Optional[dict[str, Any]]:
        xs = ips[clock]
        if a not in xs or b not in xs:
            return None
        paired = [x / y for x, y in zip(xs[a], xs[b])]
        return {"ratio_of_medians": statistics.median(xs[a]) / statistics.median(xs[b]),
                # every round holds the same images: total images/s of a over b = total time of b over a
                "ratio_of_totals": sum(1 / x for x in xs[b]) / sum(1 / x for x in xs[a]),
                "paired_median": statistics.median(paired), "paired_min": min(paired), "paired_max": max(paired),
                "paired": [round(r, 4) for r in paired]}

    def meets(r: Optional[dict[str, Any]]) -> Optional[bool]:
        return None if r is None else bool(r["ratio_of_medians"] >= TARGET and r["paired_median"] >= TARGET)

    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    logged = [r["images_per_sec"] for r in rows if "images_per_sec" in r]
    timed_logged = logged[warmup_rounds:warmup_rounds + rounds]
    tb, tb_cpu = ratios("trainer", "bare"), ratios("trainer", "bare", "cpu")
    # Same training? metrics.jsonl's loss of each round (mean cross-entropy) against the other loops'.
    logged_loss = [r["loss"] for r in rows if "images_per_sec" in r]
    agreement = {}
    for name, loop in bench.loops.items():
        pairs = list(zip(logged_loss, loop.round_losses))
        rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in pairs if a is not None]
        agreement[name] = {"max_relative_loss_difference": max(rel) if rel else None,
                           "first_round_relative_loss_difference": rel[0] if rel else None,
                           "trainer_round_losses": [round(a, 6) for a, _ in pairs if a is not None],
                           f"{name}_round_losses": [round(b, 6) for _, b in pairs]}
    res: dict[str, Any] = {
        "preset": preset,
        "recipe": recipe_path,
        "recipe_overrides": ovr,
        "optimizer": plan.recipe.optim.name,
        "ds_config": ds_config_for(batch, micro),
        "batch": batch, "micro": micro, "grad_accum": plan.layout.grad_accum,
        "steps_per_round": steps_per_round, "rounds": rounds, "warmup_rounds": warmup_rounds,
        "threads_seen": sorted(bench.threads_seen),
        "variants": per_variant,
        "trainer_vs_bare": tb,
        "engine_vs_bare": ratios("engine", "bare"),
        "trainer_vs_engine": ratios("trainer", "engine"),
        "cpu_time": {"trainer_vs_bare": tb_cpu, "engine_vs_bare": ratios("engine", "bare", "cpu"),
                     "trainer_vs_engine": ratios("trainer", "engine", "cpu")},
        "loss_agreement_with_trainer": agreement,
        "engine_pieces_cpu_ms": bench.pieces,
        "metrics_jsonl_images_per_s": {"timed_rounds": [round(x, 3) for x in timed_logged],
                                       "median": statistics.median(timed_logged) if timed_logged else None},
        "target": TARGET,
        "meets_target": meets(tb),
        "meets_target_cpu_time": meets(tb_cpu),
        "wall_seconds": round(wall, 1),
    }
    if bench.profiles:
        res["profile"] = {"method": "cProfile with a CPU-time clock over one extra round of each (after the timed "
                                    "rounds); cProfile inflates Python-heavy code, read it for where, not how much",
                          **bench.profiles}
    return res


def run(presets: Sequence[str], batches: Sequence[int], steps_per_round: Sequence[int], rounds: Sequence[int] = (8,),
        warmup_rounds: int = 1, micro: Optional[Sequence[int]] = None, threads: Optional[int] = 1,
        variants: Sequence[str] = VARIANTS, overrides: Sequence[str] = (), workdir: Optional[str] = None,
        profile: bool = False, glibc_malloc_defaults: bool = False) -> dict[str, Any]:
    def per(xs: Optional[Sequence[Any]], i: int) -> Any:
        if not xs:
            return None
        return xs[i] if i < len(xs) else xs[-1]

    load_start = list(os.getloadavg())
    common.set_threads(threads)
    # every variant under the trainer's host-memory settings (the trainer would set them at its start)
    common.setup_malloc(glibc_malloc_defaults)
    if glibc_malloc_defaults:
        overrides = [*overrides, "train.retain_host_memory=false"]
    results = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for i, preset in enumerate(presets):
            results.append(run_preset(preset, per(batches, i), per(micro, i), per(steps_per_round, i), per(rounds, i),
                                      warmup_rounds, variants, overrides, Path(tmp), profile))
    info = common.machine_info(common.pick_device("cuda" if torch.cuda.is_available() else "cpu"))
    info["loadavg_at_start"] = load_start
    info["loadavg_at_end"] = list(os.getloadavg())
    return {
        "benchmark": "trainer_overhead",
        "command": None,
        "machine": info,
        "threads": torch.get_num_threads(),
        "variants": list(variants),
        "method": ("one process, world size 1; trainer = ds_widenet.trainer.Trainer.run() (real loop, rounds cut by "
                   "its after_optimizer_step hook, evaluation and saving after the last timed round); engine = "
                   "manual loop through a DeepSpeed engine; bare = plain PyTorch loop, same model init, optimizer, "
                   "schedule, clipping, loss and batches; rounds interleaved trainer/engine/bare; images/s per "
                   "round, medians over rounds, paired per-round ratios"),
        "results": results,
    }


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["widenet-digits", "widenet-cifar"], choices=sorted(RECIPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 8], help="global batch per preset")
    ap.add_argument("--micro", type=int, nargs="+", default=None, help="micro batch per preset (default: the batch)")
    ap.add_argument("--steps-per-round", type=int, nargs="+", default=[5, 3],
                    help="optimizer steps per round, per preset (also the trainer's log interval: one log step per round)")
    ap.add_argument("--rounds", type=int, nargs="+", default=[24, 12], help="timed rounds, per preset")
    ap.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--profile", action="store_true", help="cProfile one extra trainer and bare round")
    ap.add_argument("--workdir", default=None, help="where the trainer's temporary run directories go")
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("overrides", nargs="*", help="recipe overrides for every preset, e.g. model.depth=2")
    common.add_malloc_arg(ap)
    args = ap.parse_args(argv)
    if "trainer" not in args.variants:
        ap.error("--variants must include trainer (the rounds are cut inside its loop)")
    try:
        res = run(args.presets, args.batch, args.steps_per_round, args.rounds, args.warmup_rounds, args.micro,
                  args.threads or None, args.variants, common.parse_overrides(args.overrides), args.workdir,
                  args.profile, args.glibc_malloc_defaults)
    except common.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res["command"] = "python bench/trainer_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    common.write_json(args.json, res)
    for r in res["results"]:
        v = r["variants"]
        print(f"{r['preset']} batch {r['batch']} ({r['optimizer']}), {r['rounds']} rounds of {r['steps_per_round']} steps:")
        print("  images/s (wall):      " + "  ".join(f"{k} {v[k]['images_per_s']['median']:.1f}" for k in v))
        print("  images per CPU-second: " + "  ".join(f"{k} {v[k]['images_per_cpu_s']['median']:.1f}" for k in v))
        for clock, src in (("wall", r), ("cpu", r["cpu_time"])):
            for k in ("trainer_vs_bare", "engine_vs_bare", "trainer_vs_engine"):
                x = src.get(k)
                if x:
                    print(f"  {clock:4s} {k.replace('_vs_', '/'):15s} {x['ratio_of_medians']:.4f} (medians), paired median "
                          f"{x['paired_median']:.4f} [{x['paired_min']:.4f}, {x['paired_max']:.4f}]")
        print(f"  target trainer/bare >= {TARGET}: wall {'met' if r['meets_target'] else 'NOT met'}, "
              f"CPU time {'met' if r['meets_target_cpu_time'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
