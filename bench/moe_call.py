"""One MoE call against the dense FFN of equal FLOPs, forward + backward, and its parts: where WideNet's
per-depth overhead is (moe_overhead.py times whole steps; this times what one depth adds).

    python bench/moe_call.py --size digits --batch 64 --rounds 80 --threads 1 --json bench/results/moe_call.json

Timed, interleaved in shuffled order for `--rounds` rounds (medians, and paired ratios to the dense FFN),
each on the activations of a `--batch` of the size's images ([B, T, d], fixed random input):
    moe          WideNet's MoE layer (gate, packing, grouped experts, statistics) at depth 0
    dense        the dense-eq model's FFN (mlp_dim = k * expert_dim: the same FLOPs up to the router)
    gate         the router alone (its gate values and aux loss back-propagated)
    experts      the grouped experts alone on that routing (GroupedExperts.routed: the tokens gathered
                 into their packed rows, both projections, the gate-weighted sum back: dispatch and
                 combine included)
    mlp          the dense FFN's MLP alone, on the tokens
    pack         the routes' packed rows, row sources and row gate values (SparseMoELayer's bookkeeping)
Each call is timed as it runs in a step, after other work (`median_ms`: its code and data partly evicted
from the caches), and again at once after itself (`hot_median_ms`): the difference is what the many small
ops of routing and packing pay for running cold between the matmuls.
The router noise is keyed and, in WideNet, drawn for every depth at a forward's first call: here every
call reuses one key, so the noise's cost (one draw per forward) is not in these numbers.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.moe_overhead import variant_spec  # noqa: E402


def build(size: str, batch: int, seed: int = 0) -> dict[str, Callable[[], None]]:
    """The timed callables of module doc, on one fixed input."""
    torch = common.torch
    from ds_widenet import deepspeed_internals as dsi
    from ds_widenet.models import build_model, moe_layer
    from ds_widenet.routing_core import RouteKey

    models = {}
    for v in ("widenet", "dense-eq"):
        preset, over = variant_spec(v, size)
        models[v] = build_model(common.model_config(preset, over), seed=seed).train()
    w, dense = models["widenet"], models["dense-eq"]
    cfg = w.cfg
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.tokens_per_image, cfg.embed_dim, generator=g)
    tok = x.reshape(-1, cfg.embed_dim)
    key = RouteKey(seed, 5, torch.arange(batch))
    moe, ffn = w.moe, dense.blocks[0].ffn
    layer = dsi.moe_layer(moe.moe)
    with torch.no_grad():
        r = moe.gate(tok, None, 0, key)
    num_experts = cfg.moe.num_experts
    sink = min(num_experts * r.capacity, r.indices.numel())

    def pack() -> tuple:
        rows, offs = moe_layer.packed_routes(r.indices, r.locations, num_experts, sink)
        return (*moe_layer.row_sources(rows, r.gates, sink), offs)

    src, weight, offs = pack()

    def f_moe() -> None:
        y, aux, _ = moe(x.detach().requires_grad_(), 0, key, None)
        (y.sum() + aux).backward()

    def f_dense() -> None:
        y, _, _ = ffn(x.detach().requires_grad_(), 0, key, None)
        y.sum().backward()

    def f_gate() -> None:
        rr = moe.gate(tok.detach().requires_grad_(), None, 0, key)
        (rr.gates.sum() + rr.aux_loss).backward()

    def f_experts() -> None:
        layer.experts.routed(tok.detach().requires_grad_(), src, weight.detach().requires_grad_(), offs).sum().backward()

    def f_mlp() -> None:
        ffn.mlp(tok.detach().requires_grad_()).sum().backward()

    def f_pack() -> None:
        pack()

    return {"moe": f_moe, "dense": f_dense, "gate": f_gate, "experts": f_experts, "mlp": f_mlp, "pack": f_pack}


def run(size: str = "digits", batch: int = 64, rounds: int = 80, warmup: int = 5, threads: Optional[int] = 1,
        glibc_malloc_defaults: bool = False, seed: int = 0) -> dict[str, Any]:
    common.set_threads(threads)
    common.setup_malloc(glibc_malloc_defaults)
    fns = build(size, batch, seed)
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    hot: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)  # a slow patch of a shared machine hits every callable alike
        for k in order:
            t = time.perf_counter()
            fns[k]()
            t1 = time.perf_counter()
            fns[k]()  # at once again: its code and data still in the caches
            t2 = time.perf_counter()
            times[k].append(t1 - t)
            hot[k].append(t2 - t1)
    out: dict[str, Any] = {"benchmark": "moe_call", "size": size, "batch": batch, "rounds": rounds,
                           "machine": common.machine_info(common.pick_device("cpu")), "calls": {}}
    for k, ts in times.items():
        out["calls"][k] = {"median_ms": 1e3 * statistics.median(ts), "hot_median_ms": 1e3 * statistics.median(hot[k]),
                           "paired_vs_dense": statistics.median(a / b for a, b in zip(ts, times["dense"]))}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["digits", "cifar"], default="digits")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    common.add_malloc_arg(ap)
    args = ap.parse_args(argv)
    res = run(args.size, args.batch, args.rounds, args.warmup, args.threads or None, args.glibc_malloc_defaults)
    res["command"] = "python bench/moe_call.py " + " ".join(argv if argv is not None else sys.argv[1:])
    common.write_json(args.json, res)
    print(f"{args.size}, batch {args.batch}, {res['machine']['torch_threads']} threads: one call, forward + backward "
          f"(median of {args.rounds} shuffled rounds; paired ratio to the dense FFN)")
    print("  (hot: the same call repeated at once, its code and data still cached)")
    for k, c in res["calls"].items():
        print(f"  {k:8s} {c['median_ms']:8.3f} ms   {c['paired_vs_dense']:.3f}x dense   hot {c['hot_median_ms']:8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
