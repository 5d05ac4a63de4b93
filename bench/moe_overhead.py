"""What the MoE costs: WideNet vs ViT-MoE vs a dense ViT with the same activated FLOPs, side by side in
one run, and where the MoE time goes per depth.

    python bench/moe_overhead.py --sizes digits cifar --json bench/results/moe_overhead.json \
        --plot bench/results/moe_overhead.png

Variants per size (`--variants`; the small presets, digits = 8x8 / d 128, cifar = 32x32 / d 512):
    widenet          the preset (top-2 of 4, capacity factor 1.2, the paper's router)
    widenet-cf1      capacity factor 1.0: the experts then multiply exactly k*S slots, as many rows
                     as the dense FFN below, so what is left of the gap is routing overhead
    widenet-dsgate   DeepSpeed's TopKGate instead of the paper's router (model.moe.router=deepspeed)
    vit-moe          the ViT-MoE preset (MoE in the last 2 of 6 blocks, dense FFN elsewhere)
    dense-eq         a dense ViT whose FFN has WideNet's activated FLOPs: mlp_dim = k * expert_dim,
                     same depth, width, heads and pooling (its own attention per block: same FLOPs)
Timing: the plain model + AdamW (bench/common.PlainTrainer), one process. The variants are interleaved
(A B C A B C ...) for `--rounds` rounds after `--warmup` rounds, so a slow patch of a shared machine hits
all of them; medians are reported, and the ratio to dense-eq both as a ratio of medians and as the
median of the per-round ratios (paired, the more robust one on a noisy machine).

Breakdown: after timing, `--profile-steps` steps of each MoE variant run under torch.profiler with
named ranges per depth, forward and backward (bench/instrument.py: gate, dispatch, experts, combine,
all-to-all). DeepSpeed's MoE layer is wrapped in this process only; the package is unchanged. With one
process (ep_size 1) DeepSpeed skips the all-to-all; `bench/scaling.py sweep` profiles it with 2 ranks.

`--compile [--compile-backend B]`: every variant's model is compiled in place (as `train.compile`),
so the ratio is compiled WideNet against the compiled dense model, where the MoE's many small
elementwise ops and gathers can fuse. Compilation happens in the warm-up rounds (at least 2: the
first call traces, the second makes the step counter dynamic), which are not timed; the profile is
skipped (its per-depth ranges are module hooks that compiled graphs do not run).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from ds_widenet.flops import param_split, step_flops  # noqa: E402

DEFAULT_VARIANTS = ("widenet", "widenet-cf1", "widenet-dsgate", "vit-moe", "dense-eq")
DEFAULT_BATCH = {"digits": 64, "cifar": 16}  # 1024 tokens per step either way


def variant_spec(name: str, size: str) -> tuple[str, list[str]]:
    """(preset, overrides) of a variant at a size."""
    if name == "widenet":
        return f"widenet-{size}", []
    if name == "widenet-cf1":
        return f"widenet-{size}", ["model.moe.capacity_factor=1.0"]
    if name == "widenet-dsgate":
        return f"widenet-{size}", ["model.moe.router=deepspeed"]
    if name == "vit-moe":
        return f"vit-moe-{size}", []
    if name == "dense-eq":
        w = common.model_config(f"widenet-{size}")
        assert w.moe is not None
        return f"vit-{size}", [f"model.mlp_dim={w.moe.k * w.moe.expert_dim}", f"model.pool={w.pool}"]
    raise common.ConfigError(f"unknown variant {name!r}; choose from {', '.join(DEFAULT_VARIANTS)}")


def profile_variant(trainer: common.PlainTrainer, steps: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from bench.instrument import moe_ranges, range_times, top_ops_in

    torch = common.torch
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with moe_ranges(trainer.model):
        trainer.step()  # one instrumented step outside the profiler (first-call effects)
        times = []
        with profile(activities=acts) as prof:
            for _ in range(steps):
                times.append(common.timed(trainer.step, trainer.device))
    per_depth = range_times(prof, steps)
    totals: dict[str, float] = {}
    for parts in per_depth.values():
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v
    has_moe = any(k.startswith("moe/") for k in totals)
    top = {p: top_ops_in(prof, p, 6) for p in ("gate", "dispatch", "combine", "experts")} if has_moe else {}
    del torch
    return {"profiled_step_ms": 1e3 * statistics.median(times), "per_depth_ms": per_depth,
            "totals_ms": totals, "top_ops": {p: [{"op": o, "ms": ms / steps, "calls": n // steps} for o, ms, n in rows]
                                             for p, rows in top.items()}}


def run_size(size: str, variants: Sequence[str], batch: int, rounds: int, warmup: int, dtype: str,
             profile_steps: int, device: Any, log: Any = print, compile_backend: Optional[str] = None) -> dict[str, Any]:
    dt = common.DTYPES[dtype]
    trainers: dict[str, common.PlainTrainer] = {}
    specs = {}
    for v in variants:
        preset, over = variant_spec(v, size)
        cfg = common.model_config(preset, over)
        specs[v] = (preset, over, cfg)
        trainers[v] = common.PlainTrainer(cfg, batch, device, dt)
        if compile_backend:
            trainers[v].model.compile(backend=compile_backend)
    if compile_backend:
        warmup, profile_steps = max(warmup, 2), 0
    phases: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    faults: dict[str, list[float]] = {v: [] for v in variants}  # minor page faults per step
    sys_s: dict[str, list[float]] = {v: [] for v in variants}  # system CPU seconds per step
    for r in range(warmup + rounds):
        for v in variants:  # interleaved: A B C A B C ...
            ph: dict[str, list[float]] = {}
            u0 = resource.getrusage(resource.RUSAGE_SELF)
            trainers[v].step(ph)
            u1 = resource.getrusage(resource.RUSAGE_SELF)
            if r >= warmup:
                for k, xs in ph.items():
                    phases[v].setdefault(k, []).extend(xs)
                faults[v].append(u1.ru_minflt - u0.ru_minflt)
                sys_s[v].append(u1.ru_stime - u0.ru_stime)
        if r >= warmup:
            log(f"  [{size}] round {r - warmup + 1}/{rounds}: " + "  ".join(
                f"{v} {1e3 * sum(x[-1] for x in phases[v].values()):.0f}ms" for v in variants))
    out: dict[str, Any] = {"batch": batch, "dtype": dtype, "rounds": rounds, "warmup_rounds": warmup,
                           "compiled": compile_backend, "variants": {}}
    step_times = {v: [sum(t) for t in zip(*phases[v].values())] for v in variants}
    base = "dense-eq" if "dense-eq" in variants else variants[-1]
    for v in variants:
        preset, over, cfg = specs[v]
        fl = step_flops(cfg, batch, element_size=dt.itemsize)
        st = common.summary(step_times[v])
        paired = [a / b for a, b in zip(step_times[v], step_times[base])]
        out["variants"][v] = {
            "preset": preset, "overrides": over, "params": param_split(cfg),
            "flops_per_step": {"model": fl["train"], "executed": fl["train_executed"]},
            "step_time_s": st,
            "phase_median_s": {k: statistics.median(xs) for k, xs in phases[v].items()},
            "images_per_s": batch / st["median"],
            f"ratio_vs_{base}": st["median"] / statistics.median(step_times[base]),
            f"paired_ratio_vs_{base}_median": statistics.median(paired),
            "model_gflops_per_s": fl["train"] / st["median"] / 1e9,
            # the kernel's share: glibc giving freed heap back and faulting it in again (hostmem.py)
            "minor_faults_per_step_median": statistics.median(faults[v]),
            "system_cpu_s_per_step_mean": statistics.fmean(sys_s[v]),
        }
    out["baseline"] = base
    if profile_steps > 0:
        for v in variants:
            log(f"  [{size}] profiling {v} ({profile_steps} steps)")
            out["variants"][v]["profile"] = profile_variant(trainers[v], profile_steps)
    return out


def plot(result: dict[str, Any], path: str) -> None:
    plt = common.pyplot()

    sizes = list(result["sizes"])
    fig, axes = plt.subplots(2, len(sizes), figsize=(6.5 * len(sizes), 8.5), squeeze=False)
    colors = {"forward": "#4c72b0", "backward": "#dd8452", "optimizer": "#55a868"}
    for j, size in enumerate(sizes):
        res = result["sizes"][size]
        base = res["baseline"]
        names = list(res["variants"])
        ax = axes[0][j]
        base_t = res["variants"][base]["step_time_s"]["median"]
        bottom = [0.0] * len(names)
        for ph in ("forward", "backward", "optimizer"):
            vals = [res["variants"][n]["phase_median_s"].get(ph, 0.0) / base_t for n in names]
            ax.bar(names, vals, bottom=bottom, color=colors[ph], label=ph)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for i, n in enumerate(names):
            r = res["variants"][n][f"paired_ratio_vs_{base}_median"]
            ax.text(i, bottom[i] + 0.02, f"{r:.2f}x", ha="center", fontsize=9)
        ax.axhline(1.15, color="red", ls="--", lw=1, label="1.15x target")
        ax.set_ylabel(f"step time / {base} (median)")
        ax.set_title(f"{size}: batch {res['batch']}, {res['dtype']}")
        ax.tick_params(axis="x", rotation=20)
        ax.set_ylim(0, max(1.3, max(bottom) + 0.12))
        ax.legend(fontsize=7, loc="upper right", ncol=2)
        ax = axes[1][j]
        prof = res["variants"].get("widenet", {}).get("profile")
        if not prof:
            ax.axis("off")
            continue
        depths = sorted(prof["per_depth_ms"])
        parts = ["gate", "dispatch", "experts", "combine", "a2a"]
        pal = {"gate": "#c44e52", "dispatch": "#8172b2", "experts": "#4c72b0", "combine": "#937860",
               "a2a": "#da8bc3", "other": "#bbbbbb"}
        for k, phase in enumerate(("fwd", "bwd")):
            xs = [i + (k - 0.5) * 0.4 for i in range(len(depths))]
            bottom = [0.0] * len(depths)
            for p in parts + ["other"]:
                if p == "other":
                    vals = [max(0.0, prof["per_depth_ms"][d].get(f"moe/{phase}", 0.0)
                                - sum(prof["per_depth_ms"][d].get(f"{q}/{phase}", 0.0) for q in parts)) for d in depths]
                else:
                    vals = [prof["per_depth_ms"][d].get(f"{p}/{phase}", 0.0) for d in depths]
                ax.bar(xs, vals, width=0.38, bottom=bottom, color=pal[p], label=p if k == 0 else None,
                       hatch="//" if phase == "bwd" else None, edgecolor="white")
                bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(depths)), [d.replace("d", "depth ") for d in depths], fontsize=8)
        ax.set_ylabel("ms per step (profiled)")
        ax.set_title(f"{size}: WideNet MoE time per depth (left fwd, right bwd, hatched)")
        ax.legend(fontsize=8)
    common.save_figure(fig, path)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["digits", "cifar"], choices=["digits", "cifar"])
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="per size (default digits 64, cifar 16)")
    ap.add_argument("--rounds", type=int, default=10, help="measured rounds (each runs every variant once)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    ap.add_argument("--profile-steps", type=int, default=2, help="profiled steps per variant (0: none)")
    ap.add_argument("--dtype", choices=sorted(common.DTYPES), default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG path")
    ap.add_argument("--replot", default=None, metavar="JSON", help="only redraw --plot from an earlier --json")
    ap.add_argument("--compile", action="store_true", help="compile every variant's model (see the module doc)")
    ap.add_argument("--compile-backend", default="inductor")
    common.add_malloc_arg(ap)
    args = ap.parse_args(argv)
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), args.plot or str(Path(args.replot).with_suffix(".png")))
        return 0
    dev = common.pick_device(args.device)
    common.set_threads(args.threads)
    common.setup_malloc(args.glibc_malloc_defaults)
    batches = args.batch or [DEFAULT_BATCH[s] for s in args.sizes]
    if len(batches) == 1:
        batches = batches * len(args.sizes)
    try:
        for v in args.variants:
            variant_spec(v, args.sizes[0])
    except common.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"benchmark": "moe_overhead",
                              "command": "python bench/moe_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                              "machine": common.machine_info(dev), "sizes": {}}
    for size, b in zip(args.sizes, batches):
        result["sizes"][size] = run_size(size, args.variants, b, args.rounds, args.warmup, args.dtype,
                                         args.profile_steps, dev,
                                         compile_backend=args.compile_backend if args.compile else None)
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    common.write_json(args.json, result)
    if args.plot:
        plot(result, args.plot)
    for size, res in result["sizes"].items():
        base = res["baseline"]
        how = f", compiled ({res['compiled']})" if res.get("compiled") else ", eager"
        how += "" if result["machine"]["retain_host_memory"] else ", glibc malloc defaults"
        print(f"{size} (batch {res['batch']}, {res['dtype']}, {result['machine']['torch_threads']} threads{how}): "
              f"median step time and ratio to {base}")
        for v, r in res["variants"].items():
            print(f"  {v:15s} {1e3 * r['step_time_s']['median']:8.1f} ms  ratio {r[f'ratio_vs_{base}']:.3f}  "
                  f"paired {r[f'paired_ratio_vs_{base}_median']:.3f}  "
                  f"(model {r['flops_per_step']['model'] / 1e9:.2f} / executed {r['flops_per_step']['executed'] / 1e9:.2f} GFLOP; "
                  f"{r['minor_faults_per_step_median']:.0f} page faults, {1e3 * r['system_cpu_s_per_step_mean']:.1f} ms system CPU per step)")
            prof = r.get("profile")
            if prof and any(k.startswith("moe/") for k in prof["totals_ms"]):
                t = prof["totals_ms"]
                parts = " ".join(f"{p} {t.get(f'{p}/fwd', 0):.1f}+{t.get(f'{p}/bwd', 0):.1f}"
                                 for p in ("gate", "dispatch", "experts", "combine", "a2a"))
                print(f"      MoE ms fwd+bwd (all depths): moe {t.get('moe/fwd', 0):.1f}+{t.get('moe/bwd', 0):.1f} | {parts}"
                      f" | profiled step {prof['profiled_step_ms']:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
