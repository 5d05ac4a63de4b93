"""What the paper's keyed router noise costs per MoE call, fast path vs its definition, side by side.

    python bench/keyed_rng.py --presets widenet-digits widenet-cifar --batch 64 16 --rounds 30 \
        --threads 1 --json bench/results/keyed_rng.json

The router adds N(0, 1/E^2) noise keyed by (seed, step, depth, global sample id, element), so a
token's noise does not depend on the world size (ds_widenet/rng.py). `definition` mixes every key
into a state of the full [B, T, E] shape (rng.keyed_normal_full_shape); `fast` folds the scalar keys
in Python and mixes each key at its own broadcast shape (rng.keyed_normal), giving the same bits
(checked here on every call). The two are timed in alternation (A B A B ...); medians are
reported, with the cost per training step (one call per depth, forward only: noise has no grad).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from ds_widenet import rng  # noqa: E402


def measure(preset: str, batch: int, rounds: int, warmup: int) -> dict[str, Any]:
    cfg = common.model_config(preset)
    assert cfg.moe is not None, f"{preset} has no MoE"
    shape = (batch, cfg.tokens_per_image, cfg.moe.num_experts)
    ids = torch.arange(batch).view(batch, 1, 1) * 7 + 3

    def keys(r: int) -> list:
        return [0, r, r % cfg.depth, rng.SITE_ROUTER, ids]

    times: dict[str, list[float]] = {"definition": [], "fast": []}
    for r in range(warmup + rounds):
        out = {}
        for name, fn in (("definition", rng.keyed_normal_full_shape), ("fast", rng.keyed_normal)):
            t0 = time.perf_counter()
            out[name] = fn(keys(r), shape, 2)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
        if not torch.equal(out["definition"], out["fast"]):
            raise AssertionError(f"{preset}: fast keyed noise differs from the definition at round {r}")
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    paired = statistics.median(a / b for a, b in zip(times["definition"], times["fast"]))
    return {"preset": preset, "batch": batch, "noise_shape": list(shape), "depth": cfg.depth,
            "definition_ms": med["definition"], "fast_ms": med["fast"], "speedup_paired_median": paired,
            "per_step_ms": {k: v * cfg.depth for k, v in med.items()}}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["widenet-digits", "widenet-cifar"])
    ap.add_argument("--batch", nargs="+", type=int, default=[64, 16])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if len(args.batch) not in (1, len(args.presets)):
        raise SystemExit("error: give one --batch, or one per preset")
    threads = common.set_threads(args.threads)
    batches = args.batch * len(args.presets) if len(args.batch) == 1 else args.batch
    rows = [measure(p, b, args.rounds, args.warmup) for p, b in zip(args.presets, batches)]
    print("| preset | batch | noise shape | definition ms/call | fast ms/call | speed-up (paired median) | per step: definition / fast ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['batch']} | {'x'.join(map(str, r['noise_shape']))} | {r['definition_ms']:.2f} | "
              f"{r['fast_ms']:.2f} | {r['speedup_paired_median']:.1f}x | "
              f"{r['per_step_ms']['definition']:.1f} / {r['per_step_ms']['fast']:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": common.machine_info(), "threads": threads, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
