"""One point of the scaling sweep, run on every rank by `torchrun --nproc_per_node N` (see scaling.py):

    torchrun --nproc_per_node 2 bench/scaling_worker.py --preset widenet-digits --micro 32 --zero 1 \
        --ep 2 --steps 10 --warmup 3 --out result.json [--profile 1] [model.depth=4 ...]

Builds the model and the DeepSpeed engine the way ds_widenet/train.py does (build_model with this rank's
experts, param_groups + build_optimizer(adamw), deepspeed.initialize with a DeepSpeed config dict; MoE
expert groups come from the model's ep_size), feeds synthetic images (the same number of tokens on every
rank), and times optimizer steps. Rank 0 writes the JSON.

Step time: each rank times each step; a step counts at the slowest rank's time (all_reduce MAX).

Memory per rank, after `--warmup` steps, measured on one more step:
    params          bytes of the model's parameter storages on this rank (local experts only)
    grads           after backward, before the step: the parameters' .grad storages plus the
                    gradient buffers DeepSpeed's ZeRO optimizer holds itself (its partitions and
                    buckets: every other tensor reachable from it)
    optimizer_state Adam moments plus any fp32 master copies that the optimizer holds apart from
                    the model's parameters (ZeRO 1/2 flat partitions), found by walking the
                    DeepSpeed optimizer down to the torch optimizer
    activations     bytes of the distinct storages autograd saves in the forward
                    (torch.autograd.graph.saved_tensors_hooks; parameters excluded)
    rss_*           process resident set size (psutil): after import, after build_model, after
                    deepspeed.initialize, before the measured step, and its peak over that step
                    (Linux VmHWM, reset with /proc/self/clear_refs before the step). The launcher
                    sets MALLOC_MMAP_THRESHOLD_ so large tensors are mmap'ed and freed back to the OS,
                    which keeps RSS honest; what RSS holds beyond the counted tensors (the torch and
                    DeepSpeed runtime, gloo buffers, allocator slack) above the RSS right after
                    `import torch, deepspeed` is reported as `unattributed_at_peak`.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

torch = common.torch


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def storage_bytes(tensors: Any, exclude: set[int] | None = None) -> tuple[int, set[int]]:
    seen: set[int] = set()
    total = 0
    exclude = exclude or set()
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in seen or key in exclude or st.nbytes() == 0:
            continue
        seen.add(key)
        total += st.nbytes()
    return total, seen


def held_tensors(obj: Any, depth: int = 3) -> list[torch.Tensor]:
    """Tensors reachable from obj's attributes through lists/tuples/dicts (depth-limited)."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()

    def walk(x: Any, d: int) -> None:
        if isinstance(x, torch.Tensor):
            out.append(x)
            if x.grad is not None:
                out.append(x.grad)
            return
        if d <= 0 or id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, dict):
            for v in x.values():
                walk(v, d - 1)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v, d - 1)

    for v in vars(obj).values():
        walk(v, depth)
    return out


def base_optimizer(opt: Any) -> Any:
    seen = set()
    while hasattr(opt, "optimizer") and id(opt) not in seen and opt.optimizer is not opt:
        seen.add(id(opt))
        opt = opt.optimizer
    return opt


def optimizer_bytes(engine_opt: Any, model_storages: set[int]) -> tuple[dict[str, Any], set[int]]:
    """Adam moments and fp32 master copies held apart from the model's parameters; also returns
    every storage counted, so gradient buffers can be told apart from them."""
    base = base_optimizer(engine_opt)
    state = [v for s in base.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    moments, seen_m = storage_bytes(state)
    masters = [p for g in base.param_groups for p in g["params"]]
    master_b, seen_p = storage_bytes(masters, model_storages)
    return ({"moments": moments, "masters": master_b, "total": moments + master_b,
             "optimizer_class": type(engine_opt).__name__, "base_class": type(base).__name__},
            seen_m | seen_p)


def gradient_bytes(engine: Any, exclude: set[int]) -> dict[str, int]:
    """After backward: the parameters' .grad storages, plus gradient buffers DeepSpeed's ZeRO
    optimizer holds itself (partitions, buckets: any other tensor reachable from it)."""
    pg, seen = storage_bytes([p.grad for p in engine.module.parameters() if p.grad is not None])
    extra, _ = storage_bytes(held_tensors(engine.optimizer), exclude | seen)
    return {"param_grads": pg, "optimizer_held": extra, "total": pg + extra}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="widenet-digits")
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", type=int, default=0, help="profiled steps with MoE ranges after timing")
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import deepspeed
    import torch.distributed as dist

    from ds_widenet.config import OptimConfig
    from ds_widenet.distributed import init_distributed
    from ds_widenet.models import build_model
    from ds_widenet.optim import build_optimizer, param_groups

    rss_import = rss()
    cfg = common.model_config(args.preset, args.overrides)
    info = init_distributed(timeout_s=300)
    world, rank = info.world_size, info.rank
    rss_dist = rss()
    model = build_model(cfg, ep_size=args.ep, ep_rank=rank % args.ep, seed=0)
    rss_model = rss()
    optimizer = build_optimizer(OptimConfig(name="adamw", lr=1e-4, weight_decay=0.05), param_groups(model, 0.05))
    ds_config = {
        "train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1,
        "train_batch_size": args.micro * world, "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
        "bf16": {"enabled": False},
        # small buckets: DeepSpeed's default 5e8-element buckets would dwarf these models on the CPU
        "zero_optimization": {"stage": args.zero, "reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    rss_engine = rss()
    # ZeRO 1/2 re-point the parameters into flat buffers: count them after initialize
    params_b, model_storages = storage_bytes(engine.module.parameters())
    device = engine.device
    g = torch.Generator().manual_seed(1234 + rank)
    images = torch.randn(args.micro, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g).to(device)
    labels = torch.randint(0, cfg.num_classes, (args.micro,), generator=g).to(device)
    ids = torch.arange(rank * args.micro, (rank + 1) * args.micro, device=device)
    aux_w = cfg.moe.aux_loss_weight if cfg.moe else 0.0
    step_no = [0]

    def forward() -> torch.Tensor:
        out = engine(images, sample_ids=ids, step=step_no[0], seed=0)
        return torch.nn.functional.cross_entropy(out.logits.float(), labels) + aux_w * out.aux_loss

    def step() -> None:
        loss = forward()
        engine.backward(loss)
        engine.step()
        step_no[0] += 1

    for _ in range(args.warmup):
        step()
    dist.barrier()
    local = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        local.append(time.perf_counter() - t0)
    t = torch.tensor(local, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    step_times = t.tolist()

    # memory, on one more step
    dist.barrier()
    hwm_ok = reset_peak_rss()
    rss_before = rss()
    from ds_widenet.flops import activation_bytes

    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        st = x.untyped_storage()
        saved.setdefault(st.data_ptr(), st.nbytes())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = forward()
    act_b = sum(v for k, v in saved.items() if k not in model_storages)
    engine.backward(loss)
    opt_b, opt_storages = optimizer_bytes(engine.optimizer, model_storages)
    grads = gradient_bytes(engine, model_storages | opt_storages | set(saved))
    engine.step()
    step_no[0] += 1
    rss_peak = peak_rss() if hwm_ok else 0
    opt_b, _ = optimizer_bytes(engine.optimizer, model_storages)  # moments exist after the first step

    profile, collectives = None, None
    if args.profile > 0:
        from torch.profiler import ProfilerActivity, profile as tprofile

        from bench.instrument import collective_times, moe_ranges, range_times

        with moe_ranges(engine.module):
            step()
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.profile):
                    step()
        profile = range_times(prof, args.profile)
        collectives = collective_times(prof, args.profile)

    mem = {"params": params_b, "grads": grads["total"], "grads_detail": grads, "optimizer_state": opt_b["total"], "optimizer_detail": opt_b,
           "activations": act_b, "activations_estimate": activation_bytes(cfg, args.micro, 4, ep_size=args.ep),
           "rss_after_import": rss_import, "rss_after_init_distributed": rss_dist, "rss_after_build_model": rss_model,
           "rss_after_deepspeed_initialize": rss_engine, "rss_before_step": rss_before, "rss_peak_step": rss_peak,
           "peak_rss_method": "VmHWM reset via /proc/self/clear_refs" if hwm_ok else "unavailable"}
    counted = params_b + grads["total"] + opt_b["total"] + act_b
    mem["unattributed_at_peak"] = rss_peak - rss_import - counted if hwm_ok else None
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "memory": mem, "profile": profile, "collectives": collectives,
                                  "host": socket.gethostname(), "local_step_times": local})
    if rank == 0:
        med = statistics.median(step_times)
        res = {"preset": args.preset, "overrides": args.overrides, "world": world, "ep_size": args.ep,
               "zero_stage": args.zero, "micro_batch": args.micro, "threads_per_rank": args.threads,
               "steps": args.steps, "warmup": args.warmup, "step_time_s": common.summary(step_times),
               "images_per_s": args.micro * world / med,
               "tokens_per_s": args.micro * world * cfg.tokens_per_image / med,
               "optimizer": opt_b["optimizer_class"], "ranks": gathered}
        Path(args.out).write_text(json.dumps(res, indent=2))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
