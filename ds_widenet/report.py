"""A run report from a run directory's metrics.jsonl: PNG plots and a short Markdown summary.

    python -m ds_widenet.report RUN_DIR [--out DIR]      # default: RUN_DIR/report/
    python -m ds_widenet.report RUN_A RUN_B ... --out DIR  # routing across depths, run by run

Plots: loss.png (train and eval loss), top1.png, lr.png, expert_load.png (the share of each
depth's routes taken by each expert, over time: one row per depth x expert), drop_rate.png and
router_entropy.png (per depth), route_change.png (per pair of consecutive depths: the fraction of
tokens whose chosen experts change, at each evaluation), depth_diversity.png (at the last evaluation:
each depth's expert share and, for every pair of depths, the tokens whose chosen experts differ).
Given several runs it writes depth_diversity.png with a column per run and compare.md instead.
report.md summarises them and lists the
warnings. Works on a run still in progress (a torn last line is ignored) and on a resumed run (the
steps it logged again replace the earlier ones). A plot with no data yet is left out.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .runlog import read_metrics, split_metrics


class ReportError(RuntimeError):
    """A user-facing error with a one-line message."""


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], _num(r.get(key))) for r in rows if key in r and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _per_depth(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[list[float]]]:
    """Steps and one series per depth from records holding a per-depth list under `key`."""
    rows = [r for r in rows if isinstance(r.get(key), list) and r[key]]
    if not rows:
        return [], []
    depth = max(len(r[key]) for r in rows)
    series = [[_num(r[key][d]) if d < len(r[key]) else math.nan for r in rows] for d in range(depth)]
    return [r["step"] for r in rows], series


def _fmt(v: Any, pct: bool = False, nd: int = 4) -> str:
    x = _num(v)
    if math.isnan(x):
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.{nd}g}"


# --------------------------------------------------------------------------------------------
# Plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _line_plot(path: Path, title: str, ylabel: str, lines: list[tuple[str, list[int], list[float]]],
               hline: Optional[tuple[float, str]] = None, ylim: Optional[tuple[float, float]] = None) -> bool:
    lines = [ln for ln in lines if ln[1] and any(not math.isnan(v) for v in ln[2])]
    if not lines:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, xs, ys in lines:
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle="--", linewidth=1, label=hline[1])
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(lines) > 1 or hline is not None:
        ax.legend(fontsize=8, ncol=2 if len(lines) > 8 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _load_heatmap(path: Path, train: Sequence[dict[str, Any]]) -> bool:
    rows = [r for r in train if isinstance(r.get("expert_share"), list) and r["expert_share"]]
    if not rows:
        return False
    depth = len(rows[-1]["expert_share"])
    experts = len(rows[-1]["expert_share"][0])
    rows = [r for r in rows if len(r["expert_share"]) == depth and all(len(x) == experts for x in r["expert_share"])]
    import numpy as np

    grid = np.array([[[_num(v) for v in d] for d in r["expert_share"]] for r in rows])  # [T, D, E]
    grid = grid.transpose(1, 2, 0).reshape(depth * experts, len(rows))  # rows: depth-major
    steps = np.array([r["step"] for r in rows], dtype=float)
    if len(steps) > 1:
        mids = (steps[1:] + steps[:-1]) / 2
        edges = np.concatenate([[steps[0] - (mids[0] - steps[0])], mids, [steps[-1] + (steps[-1] - mids[-1])]])
    else:
        edges = np.array([steps[0] - 0.5, steps[0] + 0.5])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, max(3.0, min(0.18 * depth * experts + 1.5, 14))))
    mesh = ax.pcolormesh(edges, np.arange(depth * experts + 1), np.ma.masked_invalid(grid), cmap="viridis",
                         vmin=0.0, vmax=max(float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0, 2.0 / experts))
    for d in range(1, depth):
        ax.axhline(d * experts, color="white", linewidth=1.2)
    ax.set_yticks([d * experts + experts / 2 for d in range(depth)])
    ax.set_yticklabels([f"depth {d}" for d in range(depth)], fontsize=8)
    ax.set_ylim(depth * experts, 0)
    ax.set_xlabel("optimizer step")
    ax.set_title(f"expert load: share of each depth's routes per expert (rows: experts 0..{experts - 1}; "
                 f"uniform {1 / experts:.2f})", fontsize=9)
    fig.colorbar(mesh, ax=ax, label="share of routes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _last_eval_with(evals: Sequence[dict[str, Any]], *keys: str) -> Optional[dict[str, Any]]:
    return next((r for r in reversed(evals) if all(isinstance(r.get(k), list) and r[k] for k in keys)), None)


def _grid(rows: Any) -> Any:
    import numpy as np

    return np.ma.masked_invalid(np.array([[_num(v) for v in row] for row in rows], dtype=float))


def _diversity_panels(axes: Any, rec: dict[str, Any], title: str) -> tuple[Any, Any]:
    """Two heatmaps from one evaluation record: expert share per depth ([depth, E], share of that
    depth's routes) and the route-change matrix ([depth, depth]: tokens whose chosen experts differ)."""
    import numpy as np

    share, change = _grid(rec["eval_expert_share_per_depth"]), _grid(rec["eval_route_change_matrix"])
    depth, experts = share.shape
    a = axes[0].imshow(share, cmap="viridis", vmin=0.0, vmax=max(2.0 / experts, float(share.max())), aspect="auto")
    axes[0].set(title=f"{title}\nexpert share per depth", xlabel="expert", ylabel="depth",
                xticks=range(experts), yticks=range(depth))
    for d, e in zip(*np.nonzero(~np.ma.getmaskarray(share))):
        axes[0].text(e, d, f"{share[d, e]:.2f}", ha="center", va="center", fontsize=7, color="white")
    b = axes[1].imshow(change, cmap="magma", vmin=0.0, vmax=1.0, aspect="auto")
    axes[1].set(title="tokens whose experts change\nbetween depths i and j", xlabel="depth j", ylabel="depth i",
                xticks=range(depth), yticks=range(depth))
    for i, j in zip(*np.nonzero(~np.ma.getmaskarray(change))):
        if i != j:
            axes[1].text(j, i, f"{change[i, j]:.2f}", ha="center", va="center", fontsize=7,
                         color="white" if change[i, j] < 0.6 else "black")
    return a, b


def _diversity_plot(path: Path, evals: Sequence[dict[str, Any]]) -> bool:
    rec = _last_eval_with(evals, "eval_expert_share_per_depth", "eval_route_change_matrix")
    if rec is None:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    a, b = _diversity_panels(axes, rec, f"evaluation at step {rec['step']}")
    fig.colorbar(a, ax=axes[0], label="share of routes")
    fig.colorbar(b, ax=axes[1], label="fraction of tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _depth_lines(steps: list[int], series: list[list[float]], label: str = "depth {d}") -> list:
    return [(label.format(d=d, e=d + 1), steps, s) for d, s in enumerate(series)]


def write_plots(out: Path, parts: dict[str, list[dict[str, Any]]], num_experts: Optional[int]) -> list[tuple[str, str]]:
    """Writes the PNGs that have data; returns [(file name, caption)]."""
    train, evals = parts["train"], parts["eval"]
    made: list[tuple[str, str]] = []

    def add(ok: bool, name: str, caption: str) -> None:
        if ok:
            made.append((name, caption))

    add(_line_plot(out / "loss.png", "loss", "loss", [("train loss", *_series(train, "loss")),
                                                     ("eval loss", *_series(evals, "eval_loss")),
                                                     ("train aux loss", *_series(train, "aux_loss"))]),
        "loss.png", "Training loss (mean over each log window), evaluation loss and the summed aux loss")
    add(_line_plot(out / "top1.png", "test top-1", "top-1", [("top-1", *_series(evals, "top1"))], ylim=(0, 1)),
        "top1.png", "Top-1 accuracy on the test set at each evaluation")
    add(_line_plot(out / "lr.png", "learning rate", "lr", [("lr", *_series(train, "lr"))]),
        "lr.png", "Learning rate")
    add(_load_heatmap(out / "expert_load.png", train), "expert_load.png",
        "Expert load per depth over time (share of that depth's processed routes)")
    add(_line_plot(out / "drop_rate.png", "dropped routes per depth", "fraction dropped",
                   _depth_lines(*_per_depth(train, "drop_rate")), ylim=(0, 1)),
        "drop_rate.png", "Fraction of routes dropped by the capacity limit, per depth")
    ln_e = (math.log(num_experts), f"ln({num_experts}) = uniform") if num_experts else None
    add(_line_plot(out / "router_entropy.png", "router entropy per depth", "nats",
                   _depth_lines(*_per_depth(train, "router_entropy")), hline=ln_e),
        "router_entropy.png", "Router entropy per depth (mean over tokens of the entropy of the softmax over experts)")
    add(_line_plot(out / "route_change.png", "tokens whose chosen experts change between consecutive depths",
                   "fraction of tokens", _depth_lines(*_per_depth(evals, "eval_route_change"), label="depth {d}->{e}"),
                   ylim=(0, 1)),
        "route_change.png", "At each evaluation: the fraction of test tokens whose top-k expert set at depth i+1 "
        "differs from depth i")
    add(_diversity_plot(out / "depth_diversity.png", evals), "depth_diversity.png",
        "At the last evaluation: each depth's expert share, and for every pair of depths the fraction of test "
        "tokens whose chosen experts differ (how differently the shared router routes at each depth)")
    return made


# --------------------------------------------------------------------------------------------
# Markdown


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def summary_markdown(run: Path, parts: dict[str, list[dict[str, Any]]], recipe: Optional[dict[str, Any]],
                     final: Optional[dict[str, Any]], plots: list[tuple[str, str]], max_warnings: int = 20) -> str:
    train, evals, warnings = parts["train"], parts["eval"], parts["warning"]
    lines = [f"# Run report: {run.resolve().name}", ""]
    if recipe:
        if recipe.get("description"):
            lines += [recipe["description"], ""]
        m = recipe.get("model") or {}
        moe = m.get("moe") or {}
        desc = f"{m.get('arch', '?')}"
        if m.get("preset"):
            desc += f" (preset {m['preset']})"
        desc += f", depth {m.get('depth', '?')}, hidden {m.get('embed_dim', '?')}"
        if moe:
            desc += (f", top-{moe.get('k', '?')} of {moe.get('num_experts', '?')} experts, router {moe.get('router', '?')}, "
                     f"capacity factor {moe.get('capacity_factor', '?')} (eval {moe.get('eval_capacity_factor', '?')})")
        lines += [f"Model: {desc}.", ""]
    last_step = max([r.get("step", 0) for r in train + evals] or [0])
    if final:
        status = f"finished at step {final.get('step', last_step)} (final.json)"
    elif train or evals:
        status = f"in progress or stopped: last record at step {last_step}, no final.json yet"
    else:
        status = "no training records yet"
    lines += [f"Status: {status}.", ""]

    table = [("last logged train loss", f"{_fmt(train[-1].get('loss'))} (step {train[-1]['step']})" if train else "-")]
    if evals:
        best = max(evals, key=lambda r: _num(r.get("top1")) if not math.isnan(_num(r.get("top1"))) else -1)
        split = "held-out" if (recipe or {}).get("data", {}).get("holdout") else "test"  # data.holdout runs
        table += [(f"best {split} top-1", f"{_fmt(best.get('top1'), pct=True)} (step {best['step']})"),
                  (f"last {split} top-1", f"{_fmt(evals[-1].get('top1'), pct=True)} (step {evals[-1]['step']})")]
    if train and "images_per_sec" in train[-1]:
        table.append(("throughput (last window)", f"{_num(train[-1]['images_per_sec']):.1f} images/s"))
    if train and "skipped_steps" in train[-1]:
        table.append(("optimizer steps skipped (non-finite loss)", str(train[-1]["skipped_steps"])))
    table.append(("warnings", str(len(warnings))))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in table] + [""]

    last = next((r for r in reversed(train) if isinstance(r.get("expert_share"), list)), None)
    if last is not None:
        shares = last["expert_share"]
        e = len(shares[0]) if shares else 0
        lines += [f"## Routing per depth (log step {last['step']})", "",
                  f"Share of each depth's processed routes per expert (uniform {1 / max(e, 1):.3f}), dropped "
                  "routes, router entropy (nats; ln(E) = uniform, 0 = collapsed) and aux loss.", "",
                  "| depth | " + " | ".join(f"e{i}" for i in range(e)) + " | dropped | entropy | aux |",
                  "|---" * (e + 4) + "|"]
        for d, row in enumerate(shares):
            def at(key: str, pct: bool = False) -> str:
                v = last.get(key)
                return _fmt(v[d], pct=pct) if isinstance(v, list) and d < len(v) else "-"
            lines.append(f"| {d} | " + " | ".join(_fmt(v, nd=3) for v in row)
                         + f" | {at('drop_rate', True)} | {at('router_entropy')} | {at('aux_per_depth')} |")
        lines.append("")

    last_eval = next((r for r in reversed(evals) if isinstance(r.get("eval_route_change"), list)), None)
    if last_eval is not None and last_eval["eval_route_change"]:
        rc = last_eval["eval_route_change"]
        lines += [f"## How routing differs across depths (evaluation at step {last_eval['step']})", "",
                  "The same test tokens at consecutive depths: the fraction whose chosen experts (the top-k set) "
                  "change from depth i to depth i+1 (tokens with a route dropped at either depth are left out).", "",
                  "| depths | tokens whose experts change |", "|---|---|"]
        lines += [f"| {d} -> {d + 1} | {_fmt(v, pct=True)} |" for d, v in enumerate(rc)]
        finite = [_num(v) for v in rc if not math.isnan(_num(v))]
        if finite:
            lines += ["", f"Mean over depth pairs: {100 * sum(finite) / len(finite):.1f}%."]
        lines.append("")

    if warnings:
        lines += [f"## Warnings ({len(warnings)})", ""]
        lines += [f"- step {w.get('step', '?')}: {w['warning']}" for w in warnings[:max_warnings]]
        if len(warnings) > max_warnings:
            lines.append(f"- ... and {len(warnings) - max_warnings} more (metrics.jsonl has them all)")
        lines.append("")
    if parts["event"]:
        lines += ["## Events", ""] + [f"- step {e.get('step', '?')}: {e['event']}" for e in parts["event"]] + [""]
    if plots:
        lines += ["## Plots", ""]
        for name, caption in plots:
            lines += [f"{caption}:", "", f"![{name[:-4]}]({name})", ""]
    else:
        lines += ["No plots yet: the run has no log steps.", ""]
    return "\n".join(lines)


def make_report(run: Path, out: Optional[Path] = None) -> Path:
    """Write the plots and report.md for `run` into `out` (default run/report); returns report.md's path."""
    run = Path(run)
    if not run.is_dir():
        raise ReportError(f"run directory {run} does not exist: pass the --out directory of a ds_widenet.train run")
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{run} holds no metrics.jsonl: pass the --out directory of a ds_widenet.train run")
    parts = split_metrics(read_metrics(metrics))
    recipe = _read_json(run / "recipe.json")
    final = _read_json(run / "final.json")
    num_experts = None
    if recipe and isinstance((recipe.get("model") or {}).get("moe"), dict):
        num_experts = recipe["model"]["moe"].get("num_experts")
    if num_experts is None:
        last = next((r for r in reversed(parts["train"]) if r.get("expert_share")), None)
        num_experts = len(last["expert_share"][0]) if last else None
    out = run / "report" if out is None else Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        plots = write_plots(out, parts, num_experts)
        path = out / "report.md"
        path.write_text(summary_markdown(run, parts, recipe, final, plots))
    except OSError as e:
        raise ReportError(f"cannot write the report into {out}: {e.strerror or e}") from None
    return path


def run_label(recipe: Optional[dict[str, Any]], run: Path) -> str:
    """A run's routing in a few words (router, per-depth gate, z-loss), else its directory name."""
    moe = ((recipe or {}).get("model") or {}).get("moe")
    if not isinstance(moe, dict):
        return run.name
    label = f"router {moe.get('router', '?')}"
    if moe.get("per_depth_gate"):
        label += ", per-depth gate"
    if moe.get("z_loss_weight"):
        label += f", z-loss {moe['z_loss_weight']:g}"
    return label


def compare_runs(runs: Sequence[Path], out: Path) -> Path:
    """depth_diversity.png (one column per run: expert share per depth and the route-change matrix at
    its last evaluation) and compare.md (a table per run) in `out`; returns compare.md's path."""
    loaded = []
    for run in runs:
        metrics = Path(run) / "metrics.jsonl"
        if not metrics.is_file():
            raise ReportError(f"{run} holds no metrics.jsonl: pass --out directories of ds_widenet.train runs")
        evals = split_metrics(read_metrics(metrics))["eval"]
        rec = _last_eval_with(evals, "eval_expert_share_per_depth", "eval_route_change_matrix")
        if rec is None:
            raise ReportError(f"{run} has no evaluation with per-depth routing: a dense ViT, a run logged before "
                              "eval_route_change_matrix existed, or no evaluation yet (compare MoE runs)")
        loaded.append((Path(run), _read_json(Path(run) / "recipe.json"), rec))
    rows = ["| run | routing | top-1 (step) | route change i -> i+1, mean | any two depths, mean | "
            "min expert share (depth) | dropped, mean |", "|---|---|---|---|---|---|---|"]
    for run, recipe, rec in loaded:
        rc = [_num(v) for v in rec["eval_route_change"] if not math.isnan(_num(v))]
        m = rec["eval_route_change_matrix"]
        pairs = [_num(m[i][j]) for i in range(len(m)) for j in range(i + 1, len(m)) if not math.isnan(_num(m[i][j]))]
        shares = [(min(_num(v) for v in row), d) for d, row in enumerate(rec["eval_expert_share_per_depth"])]
        low, low_d = min(shares)
        drops = [_num(v) for v in rec.get("eval_drop_rate") or []]
        rows.append(f"| {run.name} | {run_label(recipe, run)} | {_fmt(rec.get('top1'), pct=True)} ({rec['step']}) | "
                    f"{_fmt(sum(rc) / len(rc) if rc else math.nan, pct=True)} | "
                    f"{_fmt(sum(pairs) / len(pairs) if pairs else math.nan, pct=True)} | {low:.3f} ({low_d}) | "
                    f"{_fmt(sum(drops) / len(drops) if drops else math.nan, pct=True)} |")
    try:
        out.mkdir(parents=True, exist_ok=True)
        plt = _plt()
        fig, axes = plt.subplots(2, len(loaded), figsize=(4.2 * len(loaded), 8), squeeze=False)
        for c, (run, recipe, rec) in enumerate(loaded):
            _diversity_panels(axes[:, c], rec, f"{run.name}\n{run_label(recipe, run)}")
        fig.tight_layout()
        fig.savefig(out / "depth_diversity.png", dpi=100)
        plt.close(fig)
        path = out / "compare.md"
        path.write_text("\n".join(["# Routing across depths, run by run", "",
                                    "Each run's last evaluation (its test split, or held-out training images with "
                                    "data.holdout): top-1; the fraction of evaluated tokens "
                                    "whose chosen experts change between consecutive depths and between any two depths; "
                                    "the smallest expert share of any depth; the dropped share.", "", *rows, "",
                                    "![depth diversity](depth_diversity.png)", ""]))
    except OSError as e:
        raise ReportError(f"cannot write the comparison into {out}: {e.strerror or e}") from None
    return path


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds_widenet.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="+", help="a run directory (the --out of ds_widenet.train), finished or in "
                    "progress; several: compare their routing across depths (needs --out)")
    ap.add_argument("--out", default=None, help="where to write the plots and report.md (default RUN_DIR/report)")
    args = ap.parse_args(argv)
    try:
        if len(args.run_dir) > 1:
            if not args.out:
                raise ReportError("comparing several runs writes depth_diversity.png and compare.md: pass --out DIR")
            path = compare_runs([Path(r) for r in args.run_dir], Path(args.out))
        else:
            path = make_report(Path(args.run_dir[0]), Path(args.out) if args.out else None)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
