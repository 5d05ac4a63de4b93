"""The paper's comparison at small scale: WideNet against ViT and ViT-MoE at a matched training budget,
several seeds each, on the data sets that ship inside packages (digits, mnist5k).

    python bench/paper_table.py run --data digits mnist5k --archs widenet vit vit_moe --seeds 0 1 2 \\
        --jobs 2 --out runs/paper_table
    python bench/paper_table.py speed --data digits mnist5k --json bench/results/paper_table_speed.json
    python bench/paper_table.py table --out runs/paper_table --speed bench/results/paper_table_speed.json \\
        --json bench/results/paper_table.json

`run` trains every (data, arch, seed) with the real trainer (`python -m ds_widenet.train`) from the
recipes `ds_configs/{data}_{arch}.yaml` (the baselines mirror the WideNet recipe key for key:
same epochs, schedule, augmentation, optimizer; `tests/test_configs.py`) and `ds_configs/cpu_fp32.json`,
one thread per run, `--jobs` runs at a time, into `OUT/{data}/{arch}/seed{s}` (stdout in `seed{s}.log`
beside it). A run whose `final.json` exists is not run again, so an interrupted table continues where it
stopped: an unfinished run continues from its last complete checkpoint (`--resume auto`; one without
any is started over), and a finished run made with other settings (recipe or overrides) is refused
rather than tabulated. Every score is the test top-1 after the last epoch: no epoch or setting is
picked on the test split.

`speed` times a training step (forward, backward, AdamW; bench/common.PlainTrainer, synthetic images)
of the three models side by side in interleaved rounds (one process, `--threads`), per data set's
shape: the images/s column. The training runs' own images/s are not used (2 runs share the 2 cores).

`table` reads both and prints the markdown table (parameters, top-1 per seed, mean and worst,
images/s), and writes `--json`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402

DATA = ("digits", "mnist5k")
ARCHS = ("widenet", "vit", "vit_moe")
DS_CONFIG = "ds_configs/cpu_fp32.json"


def recipe_path(data: str, arch: str) -> Path:
    return ROOT / "ds_configs" / f"{data}_{arch}.yaml"


def run_dir(out: Path, data: str, arch: str, seed: int) -> Path:
    return out / data / arch / f"seed{seed}"


def train_command(data: str, arch: str, seed: int, out: Path, extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "ds_widenet.train", "--recipe", str(recipe_path(data, arch)),
            "--deepspeed_config", str(ROOT / DS_CONFIG), "--out", str(run_dir(out, data, arch, seed)),
            f"seed={seed}", "train.progress_bar=off", *extra]


def run_all(data: Sequence[str], archs: Sequence[str], seeds: Sequence[int], out: Path, jobs: int = 2,
            threads: int = 1, extra: Sequence[str] = (), log: Any = print) -> list[dict[str, Any]]:
    """Train every missing (data, arch, seed); returns one record per run (with its exit code)."""
    for d in data:
        for a in archs:
            if not recipe_path(d, a).is_file():
                raise common.ConfigError(f"no recipe {recipe_path(d, a)}: --data takes {', '.join(DATA)}, "
                                         f"--archs {', '.join(ARCHS)}")
    todo = []
    for d in data:
        for a in archs:
            for s in seeds:
                rd = run_dir(out, d, a, s)
                if not (rd / "final.json").is_file():
                    todo.append((d, a, s))
                elif _recipe_of(rd) != _recipe_for(d, a, s, extra):  # a finished run of other settings
                    raise common.ConfigError(f"{rd} finished with other settings than recipe {recipe_path(d, a).name} "
                                             f"with {' '.join([f'seed={s}', *extra]) or 'no overrides'}: "
                                             "give the table another --out")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    from ds_widenet.checkpoint import complete_checkpoints

    def one(job: tuple[str, str, int]) -> dict[str, Any]:
        d, a, s = job
        rd = run_dir(out, d, a, s)
        rd.parent.mkdir(parents=True, exist_ok=True)
        # an unfinished run continues from its last complete checkpoint (or starts over without one)
        cmd = train_command(d, a, s, out, extra) + (["--resume", "auto"] if complete_checkpoints(rd / "checkpoints") else
                                                    ["--overwrite"] if rd.exists() else [])
        t0 = time.time()
        with open(rd.parent / f"seed{s}.log", "w") as f:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        rec = {"data": d, "arch": a, "seed": s, "rc": rc, "wall_seconds": round(time.time() - t0, 1)}
        log(f"  {d} {a} seed {s}: exit {rc} after {rec['wall_seconds']} s")
        return rec

    log(f"{len(todo)} runs to do ({jobs} at a time, {threads} thread(s) each) under {out}")
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, todo))


def _recipe_for(data: str, arch: str, seed: int, extra: Sequence[str]) -> dict[str, Any]:
    from ds_widenet.config import load_recipe

    return load_recipe(recipe_path(data, arch), [f"seed={seed}", "train.progress_bar=off", *extra]).to_dict()


def _recipe_of(rd: Path) -> Optional[dict[str, Any]]:
    """The run's resolved recipe, read back through the current dataclasses (a key added since the
    run was made takes its default)."""
    from ds_widenet.config import ConfigError, recipe_from_dict

    try:
        return recipe_from_dict(json.loads((rd / "recipe.json").read_text())).to_dict()
    except (OSError, ValueError, ConfigError):
        return None


def speed(data: Sequence[str], archs: Sequence[str], batch: int = 64, rounds: int = 8, warmup: int = 2,
          steps_per_round: int = 2, threads: Optional[int] = 1, log: Any = print) -> dict[str, Any]:
    """{data: {arch: {"images_per_sec", "step_ms", "ratio_to_widenet"}}}: interleaved rounds, medians."""
    torch = common.torch
    common.set_threads(threads)
    dev = torch.device("cpu")
    res: dict[str, Any] = {"machine": common.machine_info(dev), "batch": batch, "threads": threads}
    from ds_widenet.config import load_recipe

    for d in data:
        trainers = {a: common.PlainTrainer(load_recipe(recipe_path(d, a)).model, batch, dev, torch.float32)
                    for a in archs}
        times: dict[str, list[float]] = {a: [] for a in archs}
        for r in range(warmup + rounds):
            for a, t in trainers.items():
                dt = sum(common.timed(t.step, dev) for _ in range(steps_per_round)) / steps_per_round
                if r >= warmup:
                    times[a].append(dt)
        med = {a: statistics.median(ts) for a, ts in times.items()}
        res[d] = {a: {"images_per_sec": batch / med[a], "step_ms": 1e3 * med[a],
                      "ratio_to_widenet": (med["widenet"] / med[a]) if "widenet" in med else None} for a in archs}
        log(f"  {d}: " + ", ".join(f"{a} {batch / med[a]:.0f} img/s" for a in archs))
    return res


def collect(out: Path, data: Sequence[str], archs: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """Per (data, arch): parameters, the seeds' test top-1 (the last evaluation), mean and worst."""
    from ds_widenet.config import load_recipe
    from ds_widenet.models.presets import build_model, count_params

    rows = []
    for d in data:
        for a in archs:
            recipe = load_recipe(recipe_path(d, a))
            top1, correct, images, epochs, missing, split = [], [], 0, 0.0, [], None
            for s in seeds:
                f = run_dir(out, d, a, s) / "final.json"
                if not f.is_file():
                    missing.append(s)
                    continue
                final = json.loads(f.read_text())
                top1.append(final["top1"])
                images, split = final["eval_images"], final.get("eval_split")
                correct.append(round(final["top1"] * images))
                epochs = max(epochs, final["epoch"])
            rows.append({"data": d, "arch": a, "preset": recipe.model.preset,
                         "params": count_params(build_model(recipe.model)), "epochs": epochs,
                         "seeds": [s for s in seeds if s not in missing], "top1": top1, "correct": correct,
                         "test_images": images, "eval_split": split, "missing_seeds": missing,
                         "mean": statistics.mean(top1) if top1 else None, "worst": min(top1) if top1 else None})
    return {"out": str(out), "rows": rows}


def markdown(table: dict[str, Any], speeds: Optional[dict[str, Any]] = None) -> str:
    lines = ["| data (evaluated images) | model | params | epochs | top-1 per seed | mean | worst | images/s (x WideNet's) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        per_seed = ", ".join(f"{100 * t:.2f}" for t in r["top1"]) or "-"
        sp = (speeds or {}).get(r["data"], {}).get(r["arch"])
        if sp:
            ratio = sp.get("ratio_to_widenet")
            ips = f"{sp['images_per_sec']:.0f}" + (f" ({ratio:.2f}x)" if ratio else "")
        else:
            ips = "-"
        mean = f"{100 * r['mean']:.2f}%" if r["mean"] is not None else "-"
        worst = f"{100 * r['worst']:.2f}%" if r["worst"] is not None else "-"
        lines.append(f"| {r['data']} ({r['test_images']}{' held out' if r.get('eval_split') else ''}) | {r['preset']} | {r['params'] / 1e6:.2f}M | {r['epochs']:.3g} | "
                     f"{per_seed} | {mean} | {worst} | {ips} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "speed", "table"):
        p = sub.add_parser(name)
        p.add_argument("--data", nargs="+", default=list(DATA), choices=DATA)
        p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
        if name != "speed":
            p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
            p.add_argument("--out", default="runs/paper_table")
        p.add_argument("--json", default=None)
        if name == "run":
            p.add_argument("--jobs", type=int, default=2, help="runs at a time")
            p.add_argument("--threads", type=int, default=1, help="OMP threads per run")
            p.add_argument("overrides", nargs="*", help="recipe overrides for every run (e.g. schedule.max_steps=2)")
        if name == "speed":
            p.add_argument("--batch", type=int, default=64)
            p.add_argument("--rounds", type=int, default=8)
            p.add_argument("--warmup", type=int, default=2)
            p.add_argument("--threads", type=int, default=1)
        if name == "table":
            p.add_argument("--speed", default=None, help="a `speed` JSON for the images/s column")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "run":
            recs = run_all(args.data, args.archs, args.seeds, Path(args.out), args.jobs, args.threads, args.overrides)
            common.write_json(args.json, recs)
            failed = [r for r in recs if r["rc"] != 0]
            if failed:
                print(f"error: {len(failed)} run(s) failed: " + ", ".join(
                    f"{r['data']} {r['arch']} seed {r['seed']} (see {run_dir(Path(args.out), r['data'], r['arch'], r['seed']).parent}"
                    f"/seed{r['seed']}.log)" for r in failed), file=sys.stderr)
                return 1
            return 0
        if args.cmd == "speed":
            res = speed(args.data, args.archs, args.batch, args.rounds, args.warmup, threads=args.threads)
            common.write_json(args.json, res)
            return 0
        table = collect(Path(args.out), args.data, args.archs, args.seeds)
        speeds = json.loads(Path(args.speed).read_text()) if args.speed else None
        if args.speed and speeds is not None:
            table["speed"] = speeds
        common.write_json(args.json, table)
        print(markdown(table, speeds))
        return 0
    except common.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
