"""Markdown results tables from the benchmarks' JSON files; every row names its command and machine.

    python bench/report.py bench/results/*.json > /tmp/tables.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def machine(m: dict[str, Any]) -> str:
    dev = m.get("gpu") or m.get("cpu_model", "?")
    load = m.get("loadavg_at_start")
    s = f"{dev}, nproc {m.get('nproc')}"
    if load:
        s += f", load {load[0]:.1f}"
        if m.get("loadavg_at_end"):
            s += f"->{m['loadavg_at_end'][0]:.1f}"
    return s


def throughput_rows(docs: list[dict[str, Any]]) -> list[str]:
    out = ["| preset | batch | dtype | threads | step (median) | images/s | tokens/s | model GFLOP/s | matmul peak GFLOP/s | utilization (model / executed) | machine | command |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in docs:
        out.append(
            f"| {d['preset']} {' '.join(d['overrides'])} | {d['batch']} | {d['dtype']} | {d['threads']} | "
            f"{1e3 * d['step_time_s']['median']:.0f} ms | {d['images_per_s']:.1f} | {d['tokens_per_s']:.0f} | "
            f"{d['model_flops_per_s'] / 1e9:.1f} | {d['matmul_peak']['flops_per_s'] / 1e9:.0f} | "
            f"{100 * d['utilization']:.1f}% / {100 * d['utilization_executed']:.1f}% | {machine(d['machine'])} | `{d['command']}` |")
    return out


def overhead_rows(d: dict[str, Any]) -> list[str]:
    out = ["| size | variant | params | model / executed GFLOP per step | step (median) | ratio to dense-eq (medians) | paired ratio (median) | fwd / bwd / opt ms |",
           "|---|---|---|---|---|---|---|---|"]
    for size, res in d["sizes"].items():
        base = res["baseline"]
        for v, r in res["variants"].items():
            ph = r["phase_median_s"]
            out.append(f"| {size} (batch {res['batch']}) | {v} | {r['params']['total'] / 1e6:.2f}M | "
                       f"{r['flops_per_step']['model'] / 1e9:.2f} / {r['flops_per_step']['executed'] / 1e9:.2f} | "
                       f"{1e3 * r['step_time_s']['median']:.0f} ms | {r[f'ratio_vs_{base}']:.3f} | "
                       f"{r[f'paired_ratio_vs_{base}_median']:.3f} | "
                       f"{1e3 * ph['forward']:.0f} / {1e3 * ph['backward']:.0f} / {1e3 * ph['optimizer']:.0f} |")
    out.append(f"\nMachine: {machine(d['machine'])}, {d['machine']['torch_threads']} threads. Command: `{d['command']}`")
    return out


def breakdown_rows(d: dict[str, Any]) -> list[str]:
    parts = ("gate", "dispatch", "a2a", "experts", "combine")
    out = ["| size | variant | MoE fwd+bwd ms (all depths) | " + " | ".join(parts) + " | other in MoE | attention | profiled step |",
           "|---|---|---|" + "---|" * len(parts) + "---|---|---|"]
    for size, res in d["sizes"].items():
        for v, r in res["variants"].items():
            p = r.get("profile")
            if not p or "moe/fwd" not in p["totals_ms"]:
                continue
            t = p["totals_ms"]
            moe = t.get("moe/fwd", 0) + t.get("moe/bwd", 0)
            cells = []
            inner = 0.0
            for part in parts:
                x = t.get(f"{part}/fwd", 0) + t.get(f"{part}/bwd", 0)
                inner += x
                cells.append(f"{x:.1f} ({100 * x / moe:.0f}%)" if x else "-")
            attn = t.get("attn/fwd", 0) + t.get("attn/bwd", 0)
            out.append(f"| {size} | {v} | {moe:.1f} | " + " | ".join(cells) +
                       f" | {moe - inner:.1f} | {attn:.1f} | {p['profiled_step_ms']:.0f} ms |")
    return out


def sweep_rows(d: dict[str, Any]) -> list[str]:
    out = ["| world | ep | ZeRO | step (median) | images/s | efficiency | params MiB | grads MiB | optimizer MiB | activations MiB (est.) | peak RSS MiB (- after import) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in d["points"]:
        m = p["ranks"][0]["memory"]
        eff = p.get("scaling_efficiency")
        out.append(f"| {p['world']} | {p['ep_size']} | {p['zero_stage']} | {1e3 * p['step_time_s']['median']:.0f} ms | "
                   f"{p['images_per_s']:.1f} | {'-' if eff is None or p['world'] == 1 else f'{100 * eff:.0f}%'} | "
                   f"{m['params'] / 2**20:.1f} | {m['grads'] / 2**20:.1f} | {m['optimizer_state'] / 2**20:.1f} | "
                   f"{m['activations'] / 2**20:.1f} ({m['activations_estimate'] / 2**20:.1f}) | "
                   f"{m['rss_peak_step'] / 2**20:.0f} ({(m['rss_peak_step'] - m['rss_after_import']) / 2**20:.0f}) |")
    out.append(f"\n{d['label']}. Preset {d['preset']} {' '.join(d['overrides'])}, micro batch {d['micro_batch_per_rank']} per rank. "
               f"Machine: {machine(d['machine'])}. Command: `{d['command']}`")
    return out


def main(paths: list[str]) -> int:
    docs = [json.loads(Path(p).read_text()) for p in paths]
    tp = [d for d in docs if d.get("benchmark") == "throughput"]
    if tp:
        print("\n".join(throughput_rows(tp)) + "\n")
    for d in docs:
        if d.get("benchmark") == "moe_overhead":
            print("\n".join(overhead_rows(d)) + "\n")
            print("\n".join(breakdown_rows(d)) + "\n")
        elif d.get("benchmark") == "scaling_sweep":
            print("\n".join(sweep_rows(d)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
