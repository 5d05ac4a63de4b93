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
        peak_sizes: Optional[Sequence[int]] = None, peak_seconds: float = 0.25) -> dict[str, Any]:
    import os

    torch = common.torch
    load_start = list(os.getloadavg())
    dev = common.pick_device(device)
    common.set_threads(threads)
    dt = common.DTYPES[dtype]
    cfg = common.model_config(preset, overrides)
    trainer = common.PlainTrainer(cfg, batch, dev, dt)
    for _ in range(warmup):
        trainer.step()
    times = [common.timed(trainer.step, dev) for _ in range(steps)]
    peak = common.matmul_peak(dev, dt, peak_sizes, peak_seconds)

    fl = step_flops(cfg, batch)
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
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("overrides", nargs="*", help="model overrides, e.g. model.depth=4 model.moe.k=1")
    args = ap.parse_args(argv)
    try:
        res = run(args.preset, common.parse_overrides(args.overrides), args.batch, args.steps, args.warmup,
                  args.dtype, args.threads, args.device, args.peak_sizes, args.peak_seconds)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
