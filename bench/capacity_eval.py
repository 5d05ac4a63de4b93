"""Top-1 against the evaluation capacity factor, with and without Batch Prioritized Routing, as
V-MoE reports it: each trained model (an export) evaluated on its test split at every factor,
once with the paper's router (tokens take capacity in token order), once with BPR (in the order
of their top gate value, so the tokens the router is least sure of are the ones dropped) and once
with expert choice (each expert takes the tokens it scores highest, up to the same capacity; not at
factors where k * factor >= E, where every expert would take every token). The weights are the same;
only which tokens take the experts' capacity changes.

    python bench/capacity_eval.py --export digits=runs/digits/model.safetensors \\
        --export mnist5k=runs/mnist5k/model.safetensors --factors 0.5 1.0 1.5 2.0 \\
        --json bench/results/capacity_eval.json --plot bench/results/capacity_eval.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from ds_widenet.config import ConfigError, DataConfig  # noqa: E402
from ds_widenet.evaluate import evaluate_exported  # noqa: E402

ROUTERS = ("paper", "bpr", "expert_choice")
LABELS = {"paper": "paper (token order)", "bpr": "BPR", "expert_choice": "expert choice"}


def sweep(exports: dict[str, Path], factors: Sequence[float], log: Any = print) -> dict[str, Any]:
    """{data set: {"weights": path, "rows": [{"capacity_factor", "router", "top1", "drop_rate"}]}}."""
    from ds_widenet.export import read_export_info

    out: dict[str, Any] = {}
    for data, weights in exports.items():
        moe = read_export_info(weights)["model"].get("moe") or {}
        rows = []
        for cf in factors:
            for router in ROUTERS:
                if router == "expert_choice" and moe.get("k", 2) * cf >= moe.get("num_experts", 4):
                    continue  # every expert would take every token: no choice (MoEConfig refuses it)
                r = evaluate_exported(weights, DataConfig(name=data, augment="none"), "cpu", 128, cf, "fp32", router)
                drops = r.get("drop_rate_per_depth", [])
                rows.append({"capacity_factor": cf, "router": router, "top1": r["top1"], "images": r["images"],
                             "drop_rate": sum(drops) / len(drops) if drops else 0.0})
                log(f"  {data} cf {cf:g} {router:5s}: top-1 {r['top1']:.4f}, dropped {rows[-1]['drop_rate']:.1%}")
        out[data] = {"weights": str(weights), "rows": rows}
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = ["| data | capacity factor | top-1 paper | top-1 BPR | top-1 expert choice | dropped paper | dropped BPR "
             "| no expert (expert choice) |", "|---|---|---|---|---|---|---|---|"]
    for data, r in res.items():
        by = {(row["capacity_factor"], row["router"]): row for row in r["rows"]}
        for cf in sorted({row["capacity_factor"] for row in r["rows"]}):
            p, b, e = by[(cf, "paper")], by[(cf, "bpr")], by.get((cf, "expert_choice"))
            e_top1, e_drop = (f"{100 * e['top1']:.2f}%", f"{100 * e['drop_rate']:.1f}%") if e else ("-", "-")
            lines.append(f"| {data} | {cf:g} | {100 * p['top1']:.2f}% | {100 * b['top1']:.2f}% | {e_top1} | "
                         f"{100 * p['drop_rate']:.1f}% | {100 * b['drop_rate']:.1f}% | {e_drop} |")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: str) -> None:
    plt = common.pyplot()

    fig, axes = plt.subplots(1, len(res), figsize=(5.5 * len(res), 4), squeeze=False)
    for ax, (data, r) in zip(axes[0], res.items()):
        for router, style in zip(ROUTERS, ("o-", "s--", "^:")):
            rows = sorted((x for x in r["rows"] if x["router"] == router), key=lambda x: x["capacity_factor"])
            ax.plot([x["capacity_factor"] for x in rows], [100 * x["top1"] for x in rows], style, label=LABELS[router])
        ax.set_xlabel("evaluation capacity factor")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"{data}: {r['weights']}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    common.save_figure(fig, path)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", action="append", required=True, metavar="DATA=PATH",
                    help="a data set name (digits, mnist5k) and the export trained on it; repeat")
    ap.add_argument("--factors", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    try:
        exports = {}
        for spec in args.export:
            data, sep, path = spec.partition("=")
            if not sep:
                raise ConfigError(f"--export {spec}: write DATA=PATH, e.g. digits=runs/digits/model.safetensors")
            exports[data] = Path(path)
        res = sweep(exports, args.factors)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    common.write_json(args.json, {"benchmark": "capacity_eval", "command": " ".join(sys.argv),
                                  "machine": common.machine_info(), "results": res})
    if args.plot:
        plot(res, args.plot)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
