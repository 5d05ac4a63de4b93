"""Training-step throughput of one model: forward + backward + optimizer step.

    python bench/throughput.py --preset widenet-cifar --batch 32 --steps 10 --warmup 3 \
        --dtype fp32 --threads 2 --json bench/results/throughput_widenet-cifar.json [model.depth=4 ...]

Single process, the plain model (`build_model`) with torch.optim.AdamW over the project's parameter
groups, synthetic images; on CUDA when available (synchronised around every timed step), else CPU.
bf16: bf16 weights and activations with fp32 master weights for AdamW (what DeepSpeed's bf16 does).

Reports images/s and tokens/s (median step), the model FLOP/s achieved and utilization against a dense
matmul peak measured in the same run, on the same device, dtype and thread count.

FLOP formula (bench/flops.py has the full derivation). Forward multiply-adds per micro-batch of B images,
T tokens each (S = B*T), width d, FFN h, expert width h_e, E experts, k routes, P pixels per patch:
    patch embed B*N*P*d;  per attention call 4*S*d^2 + 2*S*T*d (qkv, proj, QK^T, AV);
    per dense FFN 2*S*d*h;  per MoE call S*d*E (router) + k*S*2*d*h_e (k activated experts);
    head B*d*classes.  WideNet: depth attention calls and depth MoE calls (shared weights run each time).
    train FLOPs/step = 2 * (3 * forward MACs - patch-embed MACs)   (backward = 2x forward; the patch
    embedding needs no input gradient).
"model" FLOPs count k experts per token (MFU-style utilization). "executed" FLOPs count the E*C capacity
slots DeepSpeed's experts really multiply (cf = 1.2: ~1.2x the expert work).

--compile [--compile-backend inductor|aot_eager|eager]: a second, identical model (same seed, batch and
optimizer) compiled in place (nn.Module.compile, as train.compile does), timed against the eager one in
interleaved rounds (eager then compiled, then the other way round, ...), so load drifts hit both. Its
warm-up (at least 2 steps: the first compiles with the step counter as a constant, the second recompiles
it as a dynamic int, then no more) is the compile time, reported on its own and excluded from timing.
Both models take the same steps, so their parameters must end equal (the largest difference is reported).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from ds_widenet.flops import param_split, step_flops  # noqa: E402


def run(preset: str, overrides: Sequence[str] = (), batch: int = 32, steps: int = 10, warmup: int = 3,
        dtype: str = "fp32", threads: Optional[int] = None, device: Optional[str] = None,
        peak_sizes: Optional[Sequence[int]] = None, peak_seconds: float = 0.25,
        compile: bool = False, compile_backend: str = "inductor", glibc_malloc_defaults: bool = False) -> dict[str, Any]:
    import os

    torch = common.torch
    load_start = list(os.getloadavg())
    dev = common.pick_device(device)
    common.set_threads(threads)
    common.setup_malloc(glibc_malloc_defaults)
    dt = common.DTYPES[dtype]
    cfg = common.model_config(preset, overrides)
    trainer = common.PlainTrainer(cfg, batch, dev, dt)
    compiled: Optional[dict[str, Any]] = None
    if compile:
        warmup = max(warmup, 2)  # both models take the same steps (their parameters are compared)
        compiled, times = _compiled_against_eager(trainer, cfg, batch, dev, dt, warmup, steps, compile_backend)
    else:
        for _ in range(warmup):
            trainer.step()
        times = [common.timed(trainer.step, dev) for _ in range(steps)]
    peak = common.matmul_peak(dev, dt, peak_sizes, peak_seconds)

    fl = step_flops(cfg, batch, element_size=dt.itemsize)
    st = common.summary(times)
    med = st["median"]
    tokens = batch * fl["tokens_per_image"]
    model_fps = fl["train"] / med
    exe_fps = fl["train_executed"] / med
    info = common.machine_info(dev)
    info["loadavg_at_start"] = load_start
    info["loadavg_at_end"] = list(os.getloadavg())
    return {
        "benchmark": "throughput",
        "command": None,  # main() fills it in
        "machine": info,
        "preset": preset,
        "overrides": list(overrides),
        "model": cfg.to_dict(),
        "params": param_split(cfg),
        "batch": batch,
        "tokens_per_step": tokens,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "warmup": warmup,
        "steps": steps,
        "step_time_s": st,
        "images_per_s": batch / med,
        "tokens_per_s": tokens / med,
        "flops_per_step": {"model": fl["train"], "executed": fl["train_executed"], "layers": fl["layers"]},
        "model_flops_per_s": model_fps,
        "executed_flops_per_s": exe_fps,
        "matmul_peak": peak,
        "utilization": model_fps / peak["flops_per_s"],
        "utilization_executed": exe_fps / peak["flops_per_s"],
        "method": "median step time of forward+backward+AdamW step; device synchronised around each step",
        **({"compiled": _compiled_summary(compiled, st, fl, batch, tokens, peak)} if compiled else {}),
    }


def _compiled_against_eager(eager: Any, cfg: Any, batch: int, dev: Any, dt: Any, warmup: int, steps: int,
                            backend: str) -> tuple[dict[str, Any], list[float]]:
    """Warm both up (the compiled model's warm-up is its compile time), then time them in interleaved
    rounds. Returns the compiled model's record and the eager step times."""
    torch = common.torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    comp = common.PlainTrainer(cfg, batch, dev, dt)
    comp.model.compile(backend=backend)  # in place, as the trainer's train.compile does
    for _ in range(warmup):
        eager.step()
    compile_steps = [common.timed(comp.step, dev) for _ in range(warmup)]
    graphs_warm = counters["stats"]["unique_graphs"]
    e_times: list[float] = []
    c_times: list[float] = []
    for i in range(steps):
        order = [(eager, e_times), (comp, c_times)]
        for t, out in (order if i % 2 == 0 else order[::-1]):
            out.append(common.timed(t.step, dev))
    diff = max((a - b).abs().max().item() for a, b in zip(eager.model.parameters(), comp.model.parameters()))
    return {"backend": backend, "times": c_times, "compile_steps_s": compile_steps, "graphs_compiled": graphs_warm,
            "recompiles_while_timed": counters["stats"]["unique_graphs"] - graphs_warm,
            "graph_breaks": sum(counters["graph_break"].values()), "max_param_diff": diff}, e_times


def _compiled_summary(c: dict[str, Any], eager_st: dict[str, Any], fl: dict[str, Any], batch: int, tokens: int,
                      peak: dict[str, Any]) -> dict[str, Any]:
    st = common.summary(c.pop("times"))
    med = st["median"]
    return {
        **c,
        "compile_s": sum(c["compile_steps_s"]),
        "step_time_s": st,
        "images_per_s": batch / med,
        "tokens_per_s": tokens / med,
        "model_flops_per_s": fl["train"] / med,
        "utilization": fl["train"] / med / peak["flops_per_s"],
        "step_time_ratio": med / eager_st["median"],  # compiled / eager median step time (< 1: compiled is faster)
        "speedup": eager_st["median"] / med,
        "method": "interleaved rounds (order alternating); compile_s = the compiled model's warm-up steps, not timed",
    }


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="widenet-digits")
    ap.add_argument("--batch", type=int, default=32, help="images per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--dtype", choices=sorted(common.DTYPES), default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    ap.add_argument("--peak-sizes", type=int, nargs="+", default=None, help="matmul sizes for the peak")
    ap.add_argument("--peak-seconds", type=float, default=0.25, help="time per matmul size")
    ap.add_argument("--compile", action="store_true", help="also time the model compiled, side by side")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (inductor, aot_eager, eager)")
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("overrides", nargs="*", help="model overrides, e.g. model.depth=4 model.moe.k=1")
    common.add_malloc_arg(ap)
    args = ap.parse_args(argv)
    try:
        res = run(args.preset, common.parse_overrides(args.overrides), args.batch, args.steps, args.warmup,
                  args.dtype, args.threads, args.device, args.peak_sizes, args.peak_seconds, args.compile,
                  args.compile_backend, args.glibc_malloc_defaults)
    except common.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res["command"] = "python bench/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    common.write_json(args.json, res)
    m = res["machine"]
    print(f"{res['preset']} {' '.join(res['overrides'])} batch {res['batch']} {res['dtype']} on {m['device']} "
          f"({m['gpu'] or m['cpu_model']}, {res['threads']} threads)")
    print(f"  step {res['step_time_s']['median'] * 1e3:.1f} ms (median of {res['steps']}), "
          f"{res['images_per_s']:.1f} images/s, {res['tokens_per_s']:.0f} tokens/s")
    print(f"  {res['model_flops_per_s'] / 1e9:.1f} GFLOP/s model ({res['executed_flops_per_s'] / 1e9:.1f} executed); "
          f"matmul peak {res['matmul_peak']['flops_per_s'] / 1e9:.1f} GFLOP/s -> utilization "
          f"{100 * res['utilization']:.1f}% ({100 * res['utilization_executed']:.1f}% executed)")
    c = res.get("compiled")
    if c:
        print(f"  compiled ({c['backend']}): step {c['step_time_s']['median'] * 1e3:.1f} ms vs eager "
              f"{res['step_time_s']['median'] * 1e3:.1f} ms (interleaved): compiled/eager {c['step_time_ratio']:.3f} "
              f"(speedup {c['speedup']:.2f}x), {c['images_per_s']:.1f} images/s; compile {c['compile_s']:.1f} s "
              f"(not timed), {c['graphs_compiled']} graphs, {c['graph_breaks']} graph breaks, "
              f"{c['recompiles_while_timed']} recompiles while timed, parameters differ by {c['max_param_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
