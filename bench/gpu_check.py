"""One-shot check of the CUDA paths on one GPU (issue 10, deliverable 7); writes one JSON.

    python bench/gpu_check.py --out bench/results/gpu_check.json              # one H100/H200, <= 8 minutes
    python bench/gpu_check.py --device cpu --out /tmp/gpu_check_cpu.json      # CPU dry run (CI), tiny, < 40 s

**This script has not been run on a GPU in this project: no GPU was lent to its sessions.** Only the CPU
dry run has run (in CI, tests/test_gpu_check.py), which exercises the same code with tiny presets and
skips what needs CUDA. Expect the first GPU run to find problems; each section records its own.

Sections, in this order (each in its own try/except with its status, error and seconds; the JSON is
rewritten after every section, so a crash or a kill keeps what ran before):

* `environment`: GPU, capability, torch / CUDA / NCCL / DeepSpeed versions.
* `pytest_cuda`: the tests marked `cuda` (`pytest -m cuda`) when any exist; this project has none
  today, so the CUDA checks are implemented here.
* `bf16_engine_step`: the real trainer (`ds_widenet.trainer.Trainer`, as `python -m ds_widenet.train`
  runs it) on digits with a bf16 DeepSpeed engine (ZeRO 0, clipping 1.0, gradient accumulation 2),
  world size 1: process group `cpu:gloo,cuda:nccl` on CUDA, gloo on the CPU. Checks: bf16 weights,
  finite losses, the optimizer stepped, the backend that holds CUDA tensors.
* `nccl_all_reduce`: an all-reduce of a CUDA tensor through the trainer's process group (NCCL).
* `export_evaluate`: exports the run's last checkpoint (`ds_widenet.export`) and evaluates it with
  `ds_widenet.evaluate` on the device in bf16: top-1 and loss against the engine's own evaluation
  (eval capacity factor 8 so no token is dropped in either).
* `sync_debug_step`: `torch.cuda.set_sync_debug_mode` around one optimizer step of the trainer
  (`Trainer.train_micro_step` for each micro-batch): first "warn", recording where every host sync
  happens, then "error": ok only if no sync is raised.
* `fused_lamb_vs_lamb`: DeepSpeed's FusedLamb (CUDA kernel, JIT-built if the wheel has no prebuilt
  op) against the project's `optim.Lamb` over 5 steps on the same weights and gradients.
* `throughput/<preset>/<eager|compiled>`: forward + backward + AdamW (fp32 masters) of widenet-b,
  vit-b and vit-moe-b in bf16 (bench/common.py's PlainTrainer, as bench/throughput.py), images/s and
  MFU against the bf16 matmul peak measured in the same run (`matmul_peak`, bench/common.py);
  compiled = `torch.compile(model)`, its compile time reported apart.
* `keyed_dropout_vs_F_dropout`: `rng.keyed_dropout` against `torch.nn.functional.dropout` on a ViT-B
  activation (forward + backward), its bits against `rng.keyed_dropout_full_shape`, its keep rate.

Time: a global budget (`--budget-s`, default 480 s = 8 minutes) from the start of the process; a
section is skipped ("skipped: time budget ...") when less time is left than its estimate, and a
watchdog ends the process (after writing the JSON, the running section marked "timeout") if a section
runs past the budget by more than `--grace-s`.

`--device cpu`: tiny presets (digits-size models, few steps), one thread, gloo, and the compiled
sections with `torch.compile(backend="eager")`: Dynamo's trace only, which is what breaks first (graph
breaks, fake-tensor strides, custom ops), without Inductor's minute-long C++ build per model here
(`--compile-on-cpu` builds it). The sections that need CUDA say "skipped: needs CUDA".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
NEEDS_CUDA = "skipped: needs CUDA"
NO_CUDA_TESTS = "skipped: no tests are marked cuda in this project (the checks are implemented in this script)"
# Statuses a CPU dry run may give (tests/test_gpu_check.py).
CPU_OK_STATUSES = ("ok", NEEDS_CUDA, NO_CUDA_TESTS)

DIGITS_RECIPE = ROOT / "ds_configs" / "digits_widenet.yaml"
TINY_MODEL = ["model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.moe.expert_dim=64"]


class Skip(Exception):
    """Raised by a section that does not apply here; its message is the status."""


class Check:
    """Runs the sections, keeps the JSON, enforces the budget."""

    def __init__(self, device: str, out: Path, budget_s: float, grace_s: float, only: Optional[list[str]]) -> None:
        self.device, self.out, self.budget_s, self.grace_s = device, out, budget_s, grace_s
        self.cuda = device.startswith("cuda")
        self.only = only
        self.t0 = time.monotonic()
        self.state: dict[str, Any] = {}  # shared between sections (the trainer, its run directory)
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.result: dict[str, Any] = {
            "benchmark": "gpu_check",
            "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:]),
            "device": device,
            "dry_run": not self.cuda,
            "note": "not run on a GPU in this project: no GPU lent to its sessions" if self.cuda else
                    "CPU dry run: tiny presets, sections that need CUDA skipped",
            "budget_s": budget_s,
            "sections": {},
        }
        self.current: Optional[str] = None
        self.lock = threading.Lock()
        threading.Thread(target=self._watchdog, name="gpu_check-watchdog", daemon=True).start()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def write(self) -> None:
        with self.lock:
            self.result["total_seconds"] = round(self.elapsed(), 2)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_name(self.out.name + ".tmp")
            tmp.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
            os.replace(tmp, self.out)

    def _watchdog(self) -> None:
        import faulthandler

        while True:
            time.sleep(0.5)
            if self.current is not None and self.elapsed() > self.budget_s + self.grace_s:
                with self.lock:
                    sec = self.result["sections"].setdefault(self.current, {})
                    sec.update({"status": "timeout", "error": f"still running {self.grace_s:.0f} s past the "
                                f"{self.budget_s:.0f} s budget; the process was ended"})
                self.write()
                faulthandler.dump_traceback(all_threads=True)
                os._exit(3)

    def section(self, name: str, estimate_s: float, fn: Callable[[], Optional[dict[str, Any]]],
                needs_cuda: bool = False) -> None:
        if self.only and not any(name == o or name.startswith(o + "/") for o in self.only):
            return
        rec: dict[str, Any] = {"status": None, "seconds": 0.0}
        self.result["sections"][name] = rec
        if needs_cuda and not self.cuda:
            rec["status"] = NEEDS_CUDA
        elif self.left() < estimate_s:
            rec["status"] = f"skipped: time budget ({self.left():.0f} s left, the section needs ~{estimate_s:.0f} s)"
        else:
            self.current = name
            start = time.monotonic()
            try:
                rec.update(fn() or {})
                rec["status"] = rec.get("status") or "ok"
            except Skip as e:
                rec["status"] = str(e)
            except BaseException as e:  # noqa: BLE001 - one failure must not lose the other sections
                if isinstance(e, KeyboardInterrupt):
                    raise
                rec["status"] = "failed"
                rec["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
                rec["traceback"] = traceback.format_exc()[-4000:]
            finally:
                self.current = None
                rec["seconds"] = round(time.monotonic() - start, 2)
        print(f"gpu_check: {name}: {rec['status']} ({rec['seconds']} s)", file=sys.stderr, flush=True)
        self.write()


# --------------------------------------------------------------------------------------------
# Sections


def environment(chk: Check) -> dict[str, Any]:
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    info: dict[str, Any] = {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                            "python": sys.version.split()[0], "accelerator": get_accelerator().device_name(),
                            "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if chk.cuda:
        dev = torch.device(chk.device)
        p = torch.cuda.get_device_properties(dev)
        info.update({"gpu": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2 ** 30, 1),
                     "multiprocessors": p.multi_processor_count, "bf16_supported": torch.cuda.is_bf16_supported(),
                     "gpus_visible": torch.cuda.device_count()})
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # noqa: BLE001
            info["nccl"] = f"unknown ({type(e).__name__})"
        from ds_widenet.flops import known_peak_flops

        info["datasheet_bf16_peak_flops"] = known_peak_flops(p.name)
    else:
        from bench.common import cpu_model, nproc

        info.update({"cpu_model": cpu_model(), "nproc": nproc()})
    return info


def pytest_cuda(chk: Check) -> dict[str, Any]:
    import subprocess

    marked = [str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
              if "mark.cuda" in p.read_text(errors="replace")]
    if not marked:
        raise Skip(NO_CUDA_TESTS)
    if not chk.cuda:
        raise Skip(NEEDS_CUDA)
    budget = max(30.0, chk.left() - 60)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *marked],
                         cwd=ROOT, capture_output=True, text=True, timeout=budget)
    tail = (res.stdout + res.stderr)[-3000:]
    return {"status": "ok" if res.returncode == 0 else "failed", "files": marked, "returncode": res.returncode,
            "output_tail": tail}


def bf16_engine_step(chk: Check) -> dict[str, Any]:
    import torch.distributed as dist

    from ds_widenet.trainer import Trainer, make_plan

    steps = 10 if chk.cuda else 3
    micro = 32 if chk.cuda else 8
    ds = {"train_batch_size": 2 * micro, "train_micro_batch_size_per_gpu": micro, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}
    ds_path = chk.tmp / "ds_bf16.json"
    ds_path.write_text(json.dumps(ds))
    out = chk.tmp / "run"
    overrides = [f"schedule.max_steps={steps}", "train.log_interval=1", "train.eval_interval=1000000",
                 "train.progress_bar=off", "train.log_format=off", "model.moe.eval_capacity_factor=8",
                 "data.eval_batch_size=120", *([] if chk.cuda else TINY_MODEL)]
    plan = make_plan(str(DIGITS_RECIPE), str(ds_path), str(out), overrides)
    trainer = Trainer(plan)
    trainer.build()  # then fit(), as Trainer.run() does, with a look at the weights in between
    first = {n: p.detach().float().clone() for n, p in list(trainer.engine.module.named_parameters())[:4]}
    final = trainer.fit()
    if trainer.log.console is not None:
        trainer.log.console.close()
    chk.state["trainer"] = trainer
    chk.state["run"] = out
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainer.engine.module.parameters()})
    moved = {n: float((p.detach().float() - first[n]).abs().max()) for n, p in trainer.engine.module.named_parameters()
             if n in first}
    backend = str(dist.get_backend())
    problems = []
    if not trainer.engine.bfloat16_enabled():
        problems.append("the engine is not in bf16")
    if dtypes != ["bfloat16"]:
        problems.append(f"parameter dtypes {dtypes}")
    if len(losses) != steps or not all(map(lambda x: x == x and abs(x) != float("inf"), losses)):
        problems.append(f"losses {losses}")
    if not any(v > 0 for v in moved.values()):
        problems.append("no weight changed")
    if chk.cuda and "nccl" not in backend:
        problems.append(f"process group backend {backend} has no nccl")
    return {"status": "ok" if not problems else "failed", "problems": problems, "steps": trainer.step,
            "losses": losses, "param_dtypes": dtypes, "max_weight_change": moved, "process_group_backend": backend,
            "engine_device": str(trainer.device), "final_eval": final, "ds_config": ds, "recipe_overrides": overrides}


def nccl_all_reduce(chk: Check) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    if "trainer" not in chk.state:
        raise RuntimeError("needs the process group of bf16_engine_step, which did not complete")
    t = torch.full((1024,), 2.0, device=chk.device)
    dist.all_reduce(t)
    torch.cuda.synchronize()
    world = dist.get_world_size()
    ok = bool(torch.all(t == 2.0 * world))
    return {"status": "ok" if ok else "failed", "world": world, "backend": str(dist.get_backend()),
            "value": float(t[0])}


def export_evaluate(chk: Check) -> dict[str, Any]:
    from ds_widenet.checkpoint import checkpoint_root, complete_checkpoints
    from ds_widenet.config import DataConfig
    from ds_widenet.evaluate import evaluate_exported
    from ds_widenet.export import export

    if "run" not in chk.state:
        raise RuntimeError("needs the checkpoint of bf16_engine_step, which did not complete")
    ckpt = complete_checkpoints(checkpoint_root(chk.state["run"]))[-1]
    target = chk.tmp / "model.safetensors"
    export(ckpt, target)
    got = evaluate_exported(target, DataConfig(name="digits", augment="none"), device=chk.device, batch=128,
                            dtype="bf16")
    engine = chk.state["trainer"].final
    dloss = abs(got["eval_loss"] - engine["eval_loss"])
    ok = (got["images"] == engine["eval_images"] and abs(got["top1"] - engine["top1"]) <= 1.0 / engine["eval_images"]
          and dloss <= 1e-3 * max(engine["eval_loss"], 1e-6))
    return {"status": "ok" if ok else "failed", "checkpoint": ckpt.name,
            "exported": {k: got[k] for k in ("top1", "eval_loss", "images")},
            "engine": {k: engine[k] for k in ("top1", "eval_loss", "eval_images")}, "abs_loss_diff": dloss,
            "tolerance": "top-1 within one image, loss within 1e-3 relative (bf16 matmul rounding depends on the "
                         "batch shape)"}


def sync_debug_step(chk: Check) -> dict[str, Any]:
    import warnings

    import torch

    trainer = chk.state.get("trainer")
    if trainer is None:
        raise RuntimeError("needs the trainer of bf16_engine_step, which did not complete")
    it = iter(trainer.train_loader)
    accum = trainer.layout.grad_accum

    def one_step() -> None:
        for _ in range(accum):
            trainer.train_micro_step(*next(it))

    one_step()  # warm: nothing first-time (allocations, lazy init) is counted
    torch.cuda.synchronize()
    syncs: list[dict[str, Any]] = []
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        stack = [f"{Path(f.filename).name}:{f.lineno}({f.name})" for f in traceback.extract_stack()[:-1]
                 if "ds_widenet" in f.filename or "deepspeed" in f.filename]
        syncs.append({"message": str(message)[:200], "where": stack[-4:]})

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            one_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown
    error = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        one_step()
    except RuntimeError as e:
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        error_where = [f"{Path(f.filename).name}:{f.lineno}({f.name})" for f in traceback.extract_tb(e.__traceback__)
                       if "ds_widenet" in f.filename or "deepspeed" in f.filename][-4:]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    res: dict[str, Any] = {"micro_steps_per_step": accum, "syncs_in_warn_mode": len(syncs), "syncs": syncs[:50]}
    if error is None:
        res["status"] = "ok"
    else:
        res.update({"status": "failed", "error": error, "error_where": error_where})
    return res


def fused_lamb_vs_lamb(chk: Check) -> dict[str, Any]:
    import torch

    from ds_widenet.optim import Lamb

    t0 = time.monotonic()
    from deepspeed.ops.lamb import FusedLamb

    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(512, 256), (1024,), (256, 768), (4096, 64)]
    init = [0.1 * torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(5)]
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.05)
    a = [torch.nn.Parameter(w.clone().to(chk.device)) for w in init]
    b = [torch.nn.Parameter(w.clone().to(chk.device)) for w in init]
    ours = Lamb([{"params": a, "lamb_trust_ratio": True}], max_trust_ratio=10.0, **kw)
    fused = FusedLamb(b, max_coeff=10.0, min_coeff=0.01, **kw)
    build_s = time.monotonic() - t0
    for step in grads:
        for p, q, gr in zip(a, b, step):
            p.grad = gr.to(chk.device).clone()
            q.grad = gr.to(chk.device).clone()
        ours.step()
        fused.step()
    torch.cuda.synchronize()
    diffs, rel = [], []
    for p, q, w in zip(a, b, init):
        moved = (p.detach().cpu() - w).abs().max().item()
        d = (p.detach() - q.detach()).abs().max().item()
        diffs.append(d)
        rel.append(d / max(moved, 1e-12))
    ok = max(rel) <= 1e-3
    return {"status": "ok" if ok else "failed", "steps": len(grads), "shapes": shapes, "max_abs_diff": diffs,
            "max_diff_relative_to_update": rel, "tolerance": "1e-3 of the largest weight change",
            "import_and_build_seconds": round(build_s, 2)}


def throughput(chk: Check, preset: str, mode: str, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    import torch

    from bench import common
    from ds_widenet.flops import step_flops

    # The CPU dry run compiles with backend "eager": Dynamo traces the model (graph breaks, fake-tensor
    # shapes and strides, the custom ops' fake functions) but no Inductor C++ build, which takes about a
    # minute per tiny model on these CPUs (--compile-on-cpu runs Inductor anyway).
    backend = "inductor" if chk.cuda or chk.state.get("compile_on_cpu") else "eager"
    dev = torch.device(chk.device)
    if "peak" not in chk.state:
        sizes = (4096, 8192) if chk.cuda else (128, 256)
        chk.state["peak"] = common.matmul_peak(dev, torch.bfloat16, sizes, 0.5 if chk.cuda else 0.02)
    peak = chk.state["peak"]
    # the dry run: one depth (one MoE block for ViT-MoE), less to trace
    overrides = [] if chk.cuda else ["model.depth=1"] + (["model.moe_last_n=1"] if "moe" in preset else [])
    cfg = common.model_config(preset, overrides)
    trainer = common.PlainTrainer(cfg, batch, dev, torch.bfloat16)
    compile_s = None
    if mode == "compiled":
        import torch._dynamo

        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        trainer.model = torch.compile(trainer.model, backend=backend)
        t0 = time.monotonic()
        trainer.step()
        common.sync(dev)
        compile_s = time.monotonic() - t0
    warm = [common.timed(trainer.step, dev) for _ in range(warmup)]  # a recompile (the step number) lands here
    times = [common.timed(trainer.step, dev) for _ in range(steps)]
    med = statistics.median(times)
    fl = step_flops(cfg, batch, element_size=2)  # bf16
    res: dict[str, Any] = {"preset": preset, "overrides": overrides, "mode": mode, "batch": batch, "dtype": "bf16",
                           "steps": steps, "warmup": warmup, "warmup_step_seconds": [round(t, 3) for t in warm],
                           "step_ms_median": 1e3 * med, "step_ms_all": [round(1e3 * t, 3) for t in times],
                           "images_per_s": batch / med, "model_flops_per_s": fl["train"] / med,
                           "matmul_peak_flops_per_s": peak["flops_per_s"],
                           "mfu": fl["train"] / med / peak["flops_per_s"],
                           "mfu_executed": fl["train_executed"] / med / peak["flops_per_s"]}
    if compile_s is not None:
        res["compile_seconds"] = round(compile_s, 2)
        res["compile_backend"] = backend
        res["dynamo"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles", "graph_break")}
    if chk.cuda:
        res["max_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2)
        torch.cuda.reset_peak_memory_stats(dev)
    del trainer
    if chk.cuda:
        torch.cuda.empty_cache()
    return res


def keyed_dropout_check(chk: Check) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from bench import common
    from ds_widenet import rng

    dev = torch.device(chk.device)
    shape = (128, 197, 768) if chk.cuda else (8, 64, 128)
    p = 0.1
    x = torch.randn(shape, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.arange(shape[0], device=dev)
    keys = [0, 7, 3, rng.SITE_FFN_DROP]
    gy = torch.randn(shape, device=dev, dtype=torch.bfloat16)

    def keyed() -> None:
        rng.keyed_dropout(x, p, keys, ids, True).backward(gy)

    def plain() -> None:
        F.dropout(x, p, True).backward(gy)

    with torch.no_grad():
        y = rng.keyed_dropout(x, p, keys, ids, True)
        ref = rng.keyed_dropout_full_shape(x, p, keys, ids, True)
        same_bits = bool(torch.equal(y, ref))
        keep = float((y != 0).float().mean())
    reps = 20 if chk.cuda else 5
    times: dict[str, list[float]] = {"keyed": [], "F.dropout": []}
    for fn in (keyed, plain):  # warm both
        fn()
    for _ in range(reps):  # alternated
        times["keyed"].append(common.timed(keyed, dev))
        times["F.dropout"].append(common.timed(plain, dev))
    k, f = statistics.median(times["keyed"]), statistics.median(times["F.dropout"])
    ok = same_bits and abs(keep - (1 - p)) < 0.01
    return {"status": "ok" if ok else "failed", "shape": list(shape), "dtype": "bf16", "p": p,
            "bits_equal_definition": same_bits, "keep_rate": keep, "keyed_ms": 1e3 * k, "F_dropout_ms": 1e3 * f,
            "keyed_over_F_dropout": k / f, "method": f"median of {reps} alternated forward+backward calls"}


# --------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda[:i] or cpu (default: cuda if available)")
    ap.add_argument("--out", default="bench/results/gpu_check.json")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole run's time budget (default 8 minutes)")
    ap.add_argument("--grace-s", type=float, default=30.0, help="past the budget, end the process after this long")
    ap.add_argument("--sections", nargs="+", default=None, help="run only these sections (names or prefixes)")
    ap.add_argument("--batch", type=int, default=None, help="throughput batch (default 128 on CUDA, 4 on cpu)")
    ap.add_argument("--compile-on-cpu", action="store_true", help="--device cpu: run the compiled sections too (minutes)")
    args = ap.parse_args(argv)

    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # before anything imports deepspeed
    sys.path.insert(0, str(ROOT))
    import torch

    import ds_widenet  # noqa: F401  (accelerator choice)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda, but no CUDA device is available: use --device cpu", file=sys.stderr)
        return 2
    if device == "cpu":
        torch.set_num_threads(1)  # two threads on a shared 2-core machine thrash
    out = Path(args.out)
    chk = Check(device, out, args.budget_s, args.grace_s, args.sections)
    cuda = chk.cuda
    chk.state["compile_on_cpu"] = args.compile_on_cpu
    chk.section("environment", 1, lambda: environment(chk))
    chk.section("pytest_cuda", 60, lambda: pytest_cuda(chk))
    chk.section("bf16_engine_step", 30 if cuda else 5, lambda: bf16_engine_step(chk))
    chk.section("nccl_all_reduce", 5, lambda: nccl_all_reduce(chk), needs_cuda=True)
    chk.section("export_evaluate", 15 if cuda else 3, lambda: export_evaluate(chk))
    chk.section("sync_debug_step", 15, lambda: sync_debug_step(chk), needs_cuda=True)
    chk.section("fused_lamb_vs_lamb", 60, lambda: fused_lamb_vs_lamb(chk), needs_cuda=True)
    chk.section("keyed_dropout_vs_F_dropout", 10 if cuda else 2, lambda: keyed_dropout_check(chk))
    presets = ("widenet-b", "vit-b", "vit-moe-b") if cuda else ("widenet-digits", "vit-digits", "vit-moe-digits")
    batch = args.batch or (128 if cuda else 4)
    steps, warmup = (10, 3) if cuda else (2, 2)
    for mode, estimate in (("eager", 20 if cuda else 2), ("compiled", 90)):
        for preset in presets:
            chk.section(f"throughput/{preset}/{mode}", estimate,
                        lambda preset=preset, mode=mode: throughput(chk, preset, mode, batch, steps, warmup))
    chk.write()
    statuses = [s["status"] for s in chk.result["sections"].values()]
    failed = [n for n, s in chk.result["sections"].items() if s["status"] in ("failed", "timeout")]
    print(f"gpu_check: {len(statuses)} sections, {statuses.count('ok')} ok, {len(failed)} failed "
          f"({', '.join(failed) or 'none'}) in {chk.elapsed():.1f} s -> {out}", file=sys.stderr)
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
