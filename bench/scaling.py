"""Scaling: a measured CPU sweep, a projection model for GPU clusters, and a layout advisor.

    # measured: world size (1, 2) x ep_size (1, 2 where valid) x ZeRO stage (0, 1, 2), one CPU
    # process per rank, ONE thread each, launched with `torchrun --nproc_per_node N`
    python bench/scaling.py sweep --preset widenet-cifar --micro 8 --json bench/results/scaling_sweep.json \
        --plot bench/results/scaling_sweep.png
    # and across 2 hosts (network namespaces joined by veth links, root): world 2 and 4, ep 1 and 2,
    # next to the same points on one host, with the all-to-all and reduction time of each
    python bench/scaling.py sweep --hosts 1 2 --worlds 2 4 --zero 2 --json bench/results/scaling_hosts.json

    # a MODEL (not a measurement): per-step compute / all-to-all / all-reduce time on 8..512 GPUs
    python bench/scaling.py project --presets widenet-b vit-moe-b --gpus 8 16 32 64 128 256 512 \
        --json bench/results/projection.json --plot bench/results/projection.png

    # rank (ep_size, ZeRO stage, micro batch, activation checkpointing) by projected step time
    python bench/scaling.py advise --preset widenet-l --nodes 4 --gpus-per-node 8 --global-batch 4096

On a 2-core machine the sweep measures contention as much as scaling: two ranks with one thread each
share the two cores with each other, with gloo's progress threads and with whatever else runs there.

Projection model (every number it uses is printed with its results; change them with the flags):
  compute    per micro-batch and layer: executed training FLOPs (bench/flops.py: forward + backward,
             experts on their E*C capacity slots) / (GPU peak * `--mfu` * rows / (rows + half_rows)),
             rows = the GEMM's row count (tokens of the micro-batch; for an expert, its C slots from
             each of the ep ranks: expert parallelism makes the expert GEMMs taller), so small
             micro-batches run less efficiently; the forward once more with activation checkpointing.
  all-to-all DeepSpeed's MoE does 2 all-to-alls per MoE call in the forward (dispatch, combine) and 2 in
             the backward (+2 on recompute): WideNet makes one MoE call per depth (12 pairs per forward
             for WideNet-B), ViT-MoE one per MoE block (2 for ViT-MoE-B). Each sends the rank's
             [E, C, d] dispatch buffer, (ep-1)/ep of it to other ranks; expert-parallel groups are
             contiguous ranks (DeepSpeed's layout), so peers on the same node go over NVLink, the
             rest over InfiniBand (one NIC per GPU): time = max(intra / NVLink, inter / IB) + latency.
  all-reduce once per optimizer step, ring volume 2(n-1)/n of the gradient bytes: non-expert gradients
             over all ranks, expert gradients over the world/ep ranks holding the same experts;
             IB bandwidth when the group spans nodes, NVLink otherwise; latency 2*log2(n)*alpha.
             ZeRO 1/2 move the same volume (reduce-scatter + all-gather). `--overlap` is the share
             hidden behind the backward (default 0: fully exposed; an upper bound).
  optimizer  bytes the AdamW update touches on this rank (master, moments, gradient: read+write)
             / (HBM bandwidth * 0.7); ZeRO 1/2 partition it.
  memory     per GPU: weights, gradients and optimizer state per parameter by precision (bf16:
             2 + 2 + 12 bytes, fp32: 4 + 4 + 8), ZeRO 1 partitions the optimizer state, ZeRO 2 also
             the gradients, over the data-parallel ranks of each parameter (all ranks for non-expert
             parameters, world/ep for expert parameters); activations from bench/flops.py (calibrated
             on the CPU against the tensors autograd saves); plus a fixed runtime reserve.
Not modelled: pipeline/tensor parallelism, compute/communication overlap inside the MoE layer, load
imbalance across experts (the capacity factor bounds it), network contention between jobs, stragglers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from ds_widenet.flops import activation_bytes, capacity, moe_calls, param_split, step_flops, tokens_per_image  # noqa: E402

GiB = 1024 ** 3


# --------------------------------------------------------------------------------------------
# The projection model


@dataclass
class Hardware:
    """Stated (datasheet) numbers and assumed efficiencies. Nothing here was measured."""

    name: str
    peak_flops: float  # dense 16-bit matmul peak per GPU, FLOP/s
    mem_bytes: float  # GPU memory
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # per GPU, per direction
    ib_bytes_per_s: float  # per GPU (one NIC per GPU), per direction
    mfu: float = 0.45  # achieved fraction of peak for the model's matmuls
    link_efficiency: float = 0.7  # achieved fraction of link bandwidth in collectives
    alpha_intra_s: float = 10e-6  # latency per collective step inside a node
    alpha_inter_s: float = 20e-6  # across nodes
    overlap: float = 0.0  # share of the gradient all-reduce hidden behind the backward
    half_rows: float = 1024.0  # a GEMM with this many rows runs at half the MFU (small-GEMM falloff)
    reserve_bytes: float = 3 * GiB  # CUDA context, NCCL buffers, allocator fragmentation


GPUS = {
    # NVIDIA datasheets: H100 SXM5 989 TFLOP/s dense BF16, 80 GB HBM3 3.35 TB/s, NVLink4 900 GB/s
    # bidirectional per GPU; NDR InfiniBand 400 Gb/s per NIC.
    "h100": Hardware("H100-SXM 80GB, NVLink4, 8 x NDR400 IB per node", 989e12, 80e9, 3.35e12, 450e9, 50e9),
    # A100 SXM4 312 TFLOP/s dense BF16, 80 GB HBM2e 2.0 TB/s, NVLink3 600 GB/s bidirectional; HDR 200 Gb/s.
    "a100": Hardware("A100-SXM 80GB, NVLink3, 8 x HDR200 IB per node", 312e12, 80e9, 2.0e12, 300e9, 25e9),
}


@dataclass
class Layout:
    nodes: int
    gpus_per_node: int
    ep_size: int = 1
    zero_stage: int = 1
    micro_batch: int = 32
    global_batch: Optional[int] = None  # None: micro * world (no accumulation)
    grad_ckpt: bool = False
    dtype: str = "bf16"

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


class LayoutError(ValueError):
    """A layout that cannot run (the message says why)."""


def check_layout(cfg: common.ModelConfig, lay: Layout) -> int:
    """Gradient-accumulation steps of a valid layout; LayoutError with the reason otherwise."""
    world = lay.world
    if lay.ep_size < 1:
        raise LayoutError(f"ep_size {lay.ep_size} < 1")
    if cfg.moe is None:
        if lay.ep_size != 1:
            raise LayoutError(f"ep_size {lay.ep_size}: a dense model has no experts to split (use 1)")
        if lay.zero_stage == 3:
            raise LayoutError("ZeRO stage 3 is not modelled here")
    else:
        if cfg.moe.num_experts % lay.ep_size:
            raise LayoutError(f"ep_size {lay.ep_size} does not divide the {cfg.moe.num_experts} experts")
        if lay.zero_stage == 3:
            raise LayoutError("ZeRO stage 3 does not support DeepSpeed MoE layers")
    if world % lay.ep_size:
        raise LayoutError(f"ep_size {lay.ep_size} does not divide the world size {world}")
    if lay.ep_size > lay.gpus_per_node and lay.ep_size % lay.gpus_per_node:
        raise LayoutError(f"ep_size {lay.ep_size} spans nodes unevenly ({lay.gpus_per_node} GPUs per node)")
    if lay.zero_stage not in (0, 1, 2, 3):
        raise LayoutError(f"ZeRO stage {lay.zero_stage} does not exist")
    if lay.micro_batch < 1:
        raise LayoutError("micro batch < 1")
    gb = lay.global_batch or lay.micro_batch * world
    if gb % (lay.micro_batch * world):
        raise LayoutError(f"global batch {gb} is not a multiple of micro {lay.micro_batch} x world {world}")
    return gb // (lay.micro_batch * world)


def _allreduce_s(nbytes: float, n: int, spans_nodes: bool, hw: Hardware) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    bw = (hw.ib_bytes_per_s if spans_nodes else hw.nvlink_bytes_per_s) * hw.link_efficiency
    alpha = hw.alpha_inter_s if spans_nodes else hw.alpha_intra_s
    return 2 * (n - 1) / n * nbytes / bw + 2 * math.log2(n) * alpha


def _all_to_all_s(nbytes: float, ep: int, gpn: int, hw: Hardware) -> float:
    """One all-to-all in which every rank of a contiguous group of `ep` ranks holds `nbytes`."""
    if ep <= 1:
        return 0.0
    local = min(ep, gpn)  # group members on this rank's node (self included)
    intra = nbytes * (local - 1) / ep
    inter = nbytes * (ep - local) / ep
    t = max(intra / (hw.nvlink_bytes_per_s * hw.link_efficiency), inter / (hw.ib_bytes_per_s * hw.link_efficiency))
    return t + (hw.alpha_inter_s if inter > 0 else hw.alpha_intra_s)


def gemm_rows(cfg: common.ModelConfig, layer: str, micro: int, ep: int) -> int:
    """Rows of the GEMMs of a layer kind for one micro-batch on one GPU."""
    s = micro * tokens_per_image(cfg)
    if layer == "patch_embed":
        return micro * cfg.num_patches
    if layer == "head":
        return micro
    if layer == "moe_experts":
        return capacity(cfg, s) * ep
    return s


def per_layer_times(cfg: common.ModelConfig, micro: int, hw: Hardware, ep: int = 1,
                    grad_ckpt: bool = False) -> list[dict[str, Any]]:
    """Compute time of each layer kind per micro-batch per GPU: executed FLOPs (forward + backward,
    + forward again with checkpointing) / (peak * mfu * rows / (rows + half_rows))."""
    rows = []
    for lc in step_flops(cfg, micro)["layers"]:
        flops = lc["train_flops_executed"] + (lc["fwd_flops_executed_per_call"] * lc["calls"] if grad_ckpt else 0)
        r = gemm_rows(cfg, lc["name"], micro, ep)
        eff = hw.mfu * r / (r + hw.half_rows)
        rows.append({"layer": lc["name"], "calls": lc["calls"], "train_flops": flops, "gemm_rows": r,
                     "efficiency": eff, "ms": 1e3 * flops / (hw.peak_flops * eff)})
    return rows


def project(cfg: common.ModelConfig, lay: Layout, hw: Hardware, params: Optional[dict[str, int]] = None) -> dict[str, Any]:
    """Projected time of one optimizer step and memory per GPU (see the module doc)."""
    ga = check_layout(cfg, lay)
    world, ep, z = lay.world, lay.ep_size, lay.zero_stage
    params = params or param_split(cfg)
    act_b = 2 if lay.dtype == "bf16" else 4
    layers = per_layer_times(cfg, lay.micro_batch, hw, ep, lay.grad_ckpt)
    flops = sum(r["train_flops"] for r in layers)
    compute = ga * sum(r["ms"] for r in layers) / 1e3

    n_moe = moe_calls(cfg)
    a2a_per_call = 0.0
    a2a_bytes = 0
    if cfg.moe is not None and ep > 1:
        tokens = lay.micro_batch * tokens_per_image(cfg)
        a2a_bytes = cfg.moe.num_experts * capacity(cfg, tokens) * cfg.embed_dim * act_b
        a2a_per_call = _all_to_all_s(a2a_bytes, ep, lay.gpus_per_node, hw)
    a2a_count = n_moe * (6 if lay.grad_ckpt else 4) if ep > 1 else 0
    a2a = ga * a2a_count * a2a_per_call

    p_ne, p_e_local = params["non_expert"], params["expert"] / ep
    dp_e = world // ep
    grad_b = 2 if lay.dtype == "bf16" else 4
    spans = lay.nodes > 1
    allreduce = (_allreduce_s(p_ne * grad_b, world, spans, hw)
                 + _allreduce_s(p_e_local * grad_b, dp_e, spans and dp_e > 1, hw))
    exposed_ar = (1 - hw.overlap) * allreduce

    w_b, g_b, o_b = (2, 2, 12) if lay.dtype == "bf16" else (4, 4, 8)
    opt_div_ne, opt_div_e = (world, dp_e) if z >= 1 else (1, 1)
    grad_div_ne, grad_div_e = (world, dp_e) if z >= 2 else (1, 1)
    local_opt_params = p_ne / opt_div_ne + p_e_local / opt_div_e
    optimizer = local_opt_params * (o_b + g_b) * 2 / (hw.hbm_bytes_per_s * 0.7)

    mem = {
        "weights": w_b * (p_ne + p_e_local),
        "gradients": g_b * (p_ne / grad_div_ne + p_e_local / grad_div_e),
        "optimizer_state": o_b * local_opt_params,
        "activations": activation_bytes(cfg, lay.micro_batch, act_b, lay.grad_ckpt, ep_size=lay.ep_size),
        "reserve": hw.reserve_bytes,
    }
    mem["total"] = sum(mem.values())
    step = compute + a2a + exposed_ar + optimizer
    gb = lay.micro_batch * world * ga
    return {"layout": asdict(lay), "world": world, "grad_accum": ga, "global_batch": gb,
            "time_s": {"compute": compute, "all_to_all": a2a, "allreduce": allreduce, "allreduce_exposed": exposed_ar,
                       "optimizer": optimizer, "step": step},
            "all_to_all": {"per_call_s": a2a_per_call, "bytes_per_call": a2a_bytes, "calls_per_step": ga * a2a_count,
                           "moe_calls_per_forward": n_moe},
            "memory_bytes": mem, "fits": mem["total"] <= hw.mem_bytes, "per_layer": layers,
            "samples_per_s": gb / step, "flops_per_micro_batch": flops}


def assumptions(hw: Hardware, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    a = asdict(hw)
    a["note"] = ("PROJECTION from a model, not a measurement: datasheet peaks times assumed efficiencies; "
                 "no GPU was used to produce these numbers")
    a.update(extra or {})
    return a


def hardware_from_args(args: argparse.Namespace) -> Hardware:
    hw = Hardware(**asdict(GPUS[args.gpu]))
    for k in ("mfu", "link_efficiency", "overlap", "half_rows"):
        v = getattr(args, k, None)
        if v is not None:
            setattr(hw, k, v)
    if getattr(args, "nvlink_gbps", None):
        hw.nvlink_bytes_per_s = args.nvlink_gbps * 1e9
    if getattr(args, "ib_gbps", None):
        hw.ib_bytes_per_s = args.ib_gbps * 1e9
    return hw


# --------------------------------------------------------------------------------------------
# The advisor


def advise(cfg: common.ModelConfig, nodes: int, gpus_per_node: int, hw: Hardware, global_batch: int,
           ep_sizes: Optional[Sequence[int]] = None, zero_stages: Sequence[int] = (0, 1, 2),
           micro_batches: Sequence[int] = (8, 16, 32, 64, 128, 256), grad_ckpt: Sequence[bool] = (False, True),
           dtype: str = "bf16") -> dict[str, Any]:
    """Every (ep_size, ZeRO stage, micro batch, checkpointing) layout: the valid ones ranked by
    projected step time (then memory), the others refused with the reason."""
    world = nodes * gpus_per_node
    if ep_sizes is None:
        e = cfg.moe.num_experts if cfg.moe else 1
        ep_sizes = [d for d in range(1, e + 1) if e % d == 0]
    params = param_split(cfg)
    ranked, refused = [], []
    for ep in ep_sizes:
        for z in zero_stages:
            for mb in micro_batches:
                for ck in grad_ckpt:
                    lay = Layout(nodes, gpus_per_node, ep, z, mb, global_batch, ck, dtype)
                    try:
                        r = project(cfg, lay, hw, params)
                    except LayoutError as err:
                        refused.append({"ep_size": ep, "zero_stage": z, "micro_batch": mb, "grad_ckpt": ck,
                                        "reason": str(err)})
                        continue
                    if not r["fits"]:
                        refused.append({"ep_size": ep, "zero_stage": z, "micro_batch": mb, "grad_ckpt": ck,
                                        "reason": f"does not fit: {r['memory_bytes']['total'] / GiB:.1f} GiB > "
                                                  f"{hw.mem_bytes / GiB:.1f} GiB per GPU"})
                        continue
                    ranked.append(r)
    ranked.sort(key=lambda r: (r["time_s"]["step"], r["memory_bytes"]["total"]))
    return {"world": world, "nodes": nodes, "gpus_per_node": gpus_per_node, "global_batch": global_batch,
            "params": params, "ranked": ranked, "refused": refused, "assumptions": assumptions(hw, {"dtype": dtype})}


# --------------------------------------------------------------------------------------------
# The measured sweep


def sweep_points(worlds: Sequence[int] = (1, 2), num_experts: int = 4, hosts: Sequence[int] = (1,),
                 zero: Sequence[int] = (0, 1, 2)) -> list[tuple[int, int, int, int]]:
    """(hosts, world, ep, zero) of every valid point: world a multiple of the host count (the same
    number of ranks on every host), ep dividing the world and the experts; ep groups are contiguous
    ranks (DeepSpeed's layout) and a host holds contiguous ranks, so with 2 ranks per host an ep-2
    group stays inside a host and with 1 rank per host it spans the link."""
    pts = []
    for h in hosts:
        for world in worlds:
            if world < h or world % h:
                continue
            for ep in (1, 2):
                if ep > world or world % ep or num_experts % ep:
                    continue
                for z in zero:
                    pts.append((h, world, ep, z))
    return pts


def worker_cmd(preset: str, micro: int, zero: int, ep: int, steps: int, warmup: int, profile: int,
               out: Path, overrides: Sequence[str]) -> list[str]:
    return [str(common.ROOT / "bench" / "scaling_worker.py"), "--preset", preset, "--micro", str(micro),
            "--zero", str(zero), "--ep", str(ep), "--steps", str(steps), "--warmup", str(warmup),
            "--threads", "1", "--profile", str(profile), "--out", str(out), *overrides]


def launch_point(world: int, ep: int, zero: int, preset: str, micro: int, steps: int, warmup: int,
                 overrides: Sequence[str], out: Path, profile: int, timeout: float = 600,
                 cluster: Any = None) -> dict[str, Any]:
    """One point: `torchrun --nproc_per_node world` here, or with a `cluster` (tests/support/cluster.py:
    hosts as network namespaces joined by veth links) `torchrun --nnodes H --node_rank i` on each of
    its H hosts, world/H ranks each, rendezvous at host 0's address: every byte between hosts
    crosses the veth link and the namespaces' own network stacks."""
    from ds_widenet.distributed import free_port
    from tests.support.launch import child_env, run_with_deadline

    port = free_port()
    env = child_env(common.ROOT, timeout_s=300, MKL_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    worker = worker_cmd(preset, micro, zero, ep, steps, warmup, profile, out, overrides)
    t0 = time.time()
    if cluster is None:
        hosts = 1
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={port}", *worker]
        res = run_with_deadline(cmd, env, common.ROOT, timeout)  # kills torchrun's ranks too on a hang
        failed = [] if res.returncode == 0 else [f"({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"]
    else:
        hosts = len(cluster.nodes)
        procs, logs = [], []
        for i in range(hosts):
            cmd = ["timeout", "-s", "KILL", str(int(timeout)), sys.executable, "-m", "torch.distributed.run",
                   f"--nnodes={hosts}", f"--node_rank={i}", f"--nproc_per_node={world // hosts}",
                   f"--master_addr={cluster.nodes[0].addr}", f"--master_port={port}", *worker]
            logs.append(out.with_suffix(f".host{i}.log"))
            procs.append(cluster.popen(i, cmd, env=env, cwd=common.ROOT, stdout=open(logs[-1], "w"),
                                       stderr=subprocess.STDOUT))
        codes = [p.wait() for p in procs]
        failed = [f"host {i} ({rc}):\n{logs[i].read_text()[-3000:]}" for i, rc in enumerate(codes) if rc != 0]
    if failed:
        raise RuntimeError(f"hosts {hosts} world {world} ep {ep} zero {zero} failed " + "\n".join(failed))
    r = json.loads(out.read_text())
    r["hosts"] = hosts
    r["launch_wall_s"] = time.time() - t0
    launch = (f"torchrun --nproc_per_node {world}" if hosts == 1 else
              f"torchrun --nnodes {hosts} --node_rank <i> --nproc_per_node {world // hosts} --master_addr <host 0>")
    r["command"] = (f"{launch} bench/scaling_worker.py --preset {preset} --micro {micro} "
                    f"--zero {zero} --ep {ep} --steps {steps} --warmup {warmup} --threads 1 --profile {profile} "
                    f"--out ... {' '.join(overrides)}").strip()
    return r


def sweep(preset: str, micro: int, steps: int, warmup: int, overrides: Sequence[str], workdir: Path,
          worlds: Sequence[int] = (1, 2), profile_steps: int = 1, log: Any = print, hosts: Sequence[int] = (1,),
          zero: Sequence[int] = (0, 1, 2)) -> dict[str, Any]:
    """Every point of sweep_points; the 2-host ones on a cluster of network namespaces built here
    (root only) and torn down after. Points with more than one rank are profiled for
    `profile_steps` steps: MoE ranges (all-to-all included) and the time in each collective."""
    from contextlib import ExitStack

    cfg = common.model_config(preset, overrides)
    e = cfg.moe.num_experts if cfg.moe else 1
    points = []
    with ExitStack() as stack:
        clusters: dict[int, Any] = {}
        for h, world, ep, z in sweep_points(worlds, e if cfg.moe else 1, hosts, zero):
            if h > 1 and h not in clusters:
                from tests.support.cluster import Cluster

                why = Cluster.unavailable()
                if why:
                    raise RuntimeError(f"--hosts {h}: {why}")
                clusters[h] = stack.enter_context(Cluster.create(workdir / f"cluster{h}", hosts=h))
            prof = profile_steps if world > 1 else 0
            r = launch_point(world, ep, z, preset, micro, steps, warmup, overrides,
                             workdir / f"h{h}_w{world}_ep{ep}_z{z}.json", prof, cluster=clusters.get(h))
            log(f"  hosts {h} world {world} ep {ep} ZeRO {z}: {1e3 * r['step_time_s']['median']:.0f} ms/step, "
                f"{r['images_per_s']:.1f} images/s ({r['launch_wall_s']:.0f} s incl. launch)")
            points.append(r)
    base = {p["zero_stage"]: p for p in points if p["world"] == 1 and p["ep_size"] == 1}
    for p in points:
        b = base.get(p["zero_stage"])
        p["scaling_efficiency"] = p["images_per_s"] / (p["world"] * b["images_per_s"]) if b else None
    return {"preset": preset, "overrides": list(overrides), "micro_batch_per_rank": micro, "points": points,
            "label": "CPU processes, 1 thread each (torchrun, gloo); on a 2-core machine this measures "
                     "contention as much as scaling; 2-host points: network namespaces on this machine, "
                     "joined by veth links (a kernel copy, not a NIC)",
            "efficiency": "images/s at world N / (N x images/s at world 1, ep 1, same ZeRO stage): weak scaling, "
                          "fixed micro batch per rank"}


def comm_summary(p: dict[str, Any]) -> dict[str, float]:
    """Milliseconds per step in all-to-all and in the gradient reductions (ZeRO's reduce-scatter,
    shown as all_reduce on gloo, and all-gather), the least over the ranks: a collective's time on a
    rank includes waiting for the last rank to arrive, and the last one waits least, so the minimum
    is the closest to the transfer itself (and still an upper bound)."""
    ranks = [r.get("collectives") or {} for r in p["ranks"]]
    if not any(ranks):
        return {"all_to_all": 0.0, "reductions": 0.0}
    return {"all_to_all": min(c.get("all_to_all", 0.0) for c in ranks),
            "reductions": min(sum(v for k, v in c.items() if k != "all_to_all" and k != "broadcast") for c in ranks)}


def sweep_table(res: dict[str, Any]) -> str:
    """The sweep as a markdown table (bench/README.md's)."""
    rows = ["| hosts | world | ep | ranks per host | ZeRO | step (median) | images/s | efficiency | "
            "all-to-all ms/step | reductions ms/step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in res["points"]:
        c, e, h = comm_summary(p), p["scaling_efficiency"], p.get("hosts", 1)
        rows.append(f"| {h} | {p['world']} | {p['ep_size']} | {p['world'] // h} | {p['zero_stage']} | "
                    f"{1e3 * p['step_time_s']['median']:.0f} ms | {p['images_per_s']:.1f} | "
                    f"{'-' if e is None else f'{100 * e:.0f}%'} | {c['all_to_all']:.0f} | {c['reductions']:.0f} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Plots


def plot_sweep(res: dict[str, Any], path: str) -> None:
    plt = common.pyplot()
    pts = res["points"]
    labels = [f"{'' if p.get('hosts', 1) == 1 else str(p['hosts']) + 'h '}w{p['world']} ep{p['ep_size']} z{p['zero_stage']}"
              for p in pts]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    ax.bar(labels, [p["images_per_s"] for p in pts], color=["#4c72b0" if p["world"] == 1 else "#dd8452" for p in pts])
    for i, p in enumerate(pts):
        if p.get("scaling_efficiency") is not None and p["world"] > 1:
            ax.text(i, p["images_per_s"], f"{100 * p['scaling_efficiency']:.0f}%", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("images/s (all ranks)")
    ax.set_title(f"{res['preset']}, micro {res['micro_batch_per_rank']}/rank, 1 CPU thread per rank\n"
                 "(% = weak-scaling efficiency vs world 1; 2 cores: contention as much as scaling)", fontsize=9)
    ax.tick_params(axis="x", rotation=45)
    ax = axes[1]
    parts = [("params", "params"), ("grads", "grads"), ("optimizer_state", "optimizer state"),
             ("activations", "activations (saved tensors)")]
    bottom = [0.0] * len(pts)
    for key, lab in parts:
        vals = [p["ranks"][0]["memory"][key] / 2 ** 20 for p in pts]
        ax.bar(labels, vals, bottom=bottom, label=lab)
        bottom = [b + v for b, v in zip(bottom, vals)]
    peaks = [(p["ranks"][0]["memory"]["rss_peak_step"] - p["ranks"][0]["memory"]["rss_after_import"]) / 2 ** 20 for p in pts]
    ax.plot(labels, peaks, "k_", markersize=18, mew=2, label="peak RSS - RSS after import")
    ax.set_ylabel("MiB, rank 0")
    ax.set_title("memory per rank (rank 0)", fontsize=9)
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


def plot_projection(res: dict[str, Any], path: str) -> None:
    plt = common.pyplot()
    presets = list(res["presets"])
    fig, axes = plt.subplots(1, len(presets), figsize=(6.5 * len(presets), 4.8), squeeze=False, sharey=True)
    for j, name in enumerate(presets):
        rows = res["presets"][name]["rows"]
        ax = axes[0][j]
        xs = [str(r["world"]) for r in rows]
        bottom = [0.0] * len(rows)
        for key, lab, col in (("compute", "compute", "#4c72b0"), ("all_to_all", "all-to-all", "#c44e52"),
                              ("allreduce_exposed", "all-reduce (exposed)", "#55a868"), ("optimizer", "optimizer", "#8172b2")):
            vals = [1e3 * r["time_s"][key] for r in rows]
            ax.bar(xs, vals, bottom=bottom, label=lab, color=col)
            bottom = [b + v for b, v in zip(bottom, vals)]
        lay = res["layout"]
        ax.set_title(f"{name}: ep {lay['ep_size']}, ZeRO {lay['zero_stage']}, micro {lay['micro_batch']}/GPU\n"
                     f"PROJECTION ({res['assumptions']['name']}, MFU {res['assumptions']['mfu']})", fontsize=9)
        ax.set_xlabel("GPUs (8 per node)")
        if j == 0:
            ax.set_ylabel("ms per step (model, not measured)")
        ax.legend(fontsize=8)
    common.save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# CLI


def _fmt_row(r: dict[str, Any]) -> str:
    t, m, lay = r["time_s"], r["memory_bytes"], r["layout"]
    return (f"ep {lay['ep_size']:>2}  ZeRO {lay['zero_stage']}  micro {lay['micro_batch']:>4}  ga {r['grad_accum']:>3}  "
            f"ckpt {'on ' if lay['grad_ckpt'] else 'off'}  step {1e3 * t['step']:8.1f} ms  "
            f"(compute {1e3 * t['compute']:7.1f}, a2a {1e3 * t['all_to_all']:6.1f}, all-reduce {1e3 * t['allreduce_exposed']:6.1f}, "
            f"opt {1e3 * t['optimizer']:5.1f})  mem {m['total'] / GiB:5.1f} GiB  {r['samples_per_s']:8.0f} img/s")


def _print_assumptions(a: dict[str, Any]) -> None:
    print("ASSUMPTIONS (" + a["note"] + "):")
    print(f"  GPU {a['name']}: peak {a['peak_flops'] / 1e12:.0f} TFLOP/s x MFU {a['mfu']} x rows/(rows+{a['half_rows']:.0f}) per GEMM, memory {a['mem_bytes'] / 1e9:.0f} GB, "
          f"HBM {a['hbm_bytes_per_s'] / 1e12:.2f} TB/s")
    print(f"  NVLink {a['nvlink_bytes_per_s'] / 1e9:.0f} GB/s and IB {a['ib_bytes_per_s'] / 1e9:.0f} GB/s per GPU per direction, "
          f"x link efficiency {a['link_efficiency']}; latency {a['alpha_intra_s'] * 1e6:.0f} us intra / "
          f"{a['alpha_inter_s'] * 1e6:.0f} us inter-node; all-reduce overlap {a['overlap']}; "
          f"runtime reserve {a['reserve_bytes'] / GiB:.0f} GiB/GPU")


def _add_hw_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    ap.add_argument("--mfu", type=float, default=None, help="achieved fraction of the matmul peak (default 0.45)")
    ap.add_argument("--link-efficiency", type=float, default=None, help="achieved fraction of link bandwidth (0.7)")
    ap.add_argument("--overlap", type=float, default=None, help="share of the all-reduce hidden (0)")
    ap.add_argument("--nvlink-gbps", type=float, default=None, help="GB/s per GPU per direction")
    ap.add_argument("--ib-gbps", type=float, default=None, help="GB/s per GPU per direction")
    ap.add_argument("--half-rows", type=float, default=None, help="GEMM rows at half the MFU (1024)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    sw = sub.add_parser("sweep", help="measure on CPU processes (torchrun)")
    sw.add_argument("--preset", default="widenet-cifar")
    sw.add_argument("--micro", type=int, default=8, help="images per rank per step")
    sw.add_argument("--steps", type=int, default=5)
    sw.add_argument("--warmup", type=int, default=2)
    sw.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="world sizes (ranks in all)")
    sw.add_argument("--hosts", type=int, nargs="+", default=[1],
                    help="host counts: 1 = this machine; 2 = two network namespaces joined by veth links, built "
                         "for the sweep (root; tests/support/cluster.py), world/2 ranks on each")
    sw.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2], help="ZeRO stages")
    sw.add_argument("--profile", type=int, default=1,
                    help="profiled steps at world > 1: MoE ranges (all-to-all) and time per collective")
    sw.add_argument("--workdir", default=None, help="per-point JSONs (default: a temp dir)")
    sw.add_argument("--json", default=None)
    sw.add_argument("--plot", default=None)
    sw.add_argument("overrides", nargs="*")

    rp = sub.add_parser("plot", help="redraw the sweep plot from its JSON")
    rp.add_argument("--sweep", required=True, help="JSON written by `sweep --json`")
    rp.add_argument("--out", required=True, help="PNG path")

    pj = sub.add_parser("project", help="projection model for GPU clusters")
    pj.add_argument("--presets", nargs="+", default=["widenet-b", "vit-moe-b"])
    pj.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    pj.add_argument("--gpus-per-node", type=int, default=8)
    pj.add_argument("--ep-size", type=int, default=4)
    pj.add_argument("--zero", type=int, default=1)
    pj.add_argument("--micro", type=int, default=32, help="images per GPU per micro-batch (no accumulation)")
    pj.add_argument("--grad-ckpt", action="store_true")
    pj.add_argument("--json", default=None)
    pj.add_argument("--plot", default=None)
    _add_hw_args(pj)

    ad = sub.add_parser("advise", help="rank layouts by projected step time and memory")
    ad.add_argument("--preset", required=True)
    ad.add_argument("--nodes", type=int, required=True)
    ad.add_argument("--gpus-per-node", type=int, default=8)
    ad.add_argument("--global-batch", type=int, default=4096, help="images per optimizer step (paper: 4096)")
    ad.add_argument("--ep-sizes", type=int, nargs="+", default=None, help="default: every divisor of the expert count")
    ad.add_argument("--zero-stages", type=int, nargs="+", default=[0, 1, 2])
    ad.add_argument("--micro-batches", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    ad.add_argument("--grad-ckpt", choices=["off", "on", "both"], default="both")
    ad.add_argument("--top", type=int, default=10)
    ad.add_argument("--json", default=None)
    ad.add_argument("overrides", nargs="*", help="model overrides, e.g. model.moe.num_experts=8")
    _add_hw_args(ad)

    args = ap.parse_args(argv)
    command = "python bench/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        if args.cmd == "sweep":
            import tempfile

            workdir = Path(args.workdir or tempfile.mkdtemp(prefix="widenet_sweep_"))
            workdir.mkdir(parents=True, exist_ok=True)
            machine = common.machine_info(common.torch.device("cpu"))
            machine["torch_threads"] = "1 per rank (OMP_NUM_THREADS=1, torch.set_num_threads(1))"
            res = sweep(args.preset, args.micro, args.steps, args.warmup, args.overrides, workdir, args.worlds,
                        args.profile, hosts=args.hosts, zero=args.zero)
            machine["loadavg_at_end"] = list(os.getloadavg())
            res.update({"benchmark": "scaling_sweep", "command": command, "machine": machine})
            common.write_json(args.json, res)
            if args.plot:
                plot_sweep(res, args.plot)
            print(f"{res['label']}")
            for p in res["points"]:
                m = p["ranks"][0]["memory"]
                eff = p["scaling_efficiency"]
                c = comm_summary(p)
                print(f"  hosts {p['hosts']} world {p['world']} ep {p['ep_size']} ZeRO {p['zero_stage']}: "
                      f"{1e3 * p['step_time_s']['median']:.0f} ms/step {p['images_per_s']:7.1f} img/s"
                      f"  eff {'-' if eff is None else f'{100 * eff:.0f}%'}  ms/step (least over ranks): all-to-all "
                      f"{c['all_to_all']:.1f} reductions {c['reductions']:.1f}  rank0 MiB: params {m['params'] / 2**20:.1f}"
                      f" grads {m['grads'] / 2**20:.1f} opt {m['optimizer_state'] / 2**20:.1f} act {m['activations'] / 2**20:.1f}"
                      f" (est {m['activations_estimate'] / 2**20:.1f}) peak RSS {m['rss_peak_step'] / 2**20:.0f}")
            print(sweep_table(res))
            return 0
        if args.cmd == "plot":
            plot_sweep(json.loads(Path(args.sweep).read_text()), args.out)
            return 0
        hw = hardware_from_args(args)
        if args.cmd == "project":
            out: dict[str, Any] = {"benchmark": "projection", "command": command,
                                   "assumptions": assumptions(hw, {"dtype": args.dtype}),
                                   "layout": {"ep_size": args.ep_size, "zero_stage": args.zero, "micro_batch": args.micro,
                                              "grad_ckpt": args.grad_ckpt, "gpus_per_node": args.gpus_per_node},
                                   "presets": {}}
            _print_assumptions(out["assumptions"])
            for name in args.presets:
                cfg = common.model_config(name)
                ep = args.ep_size if cfg.moe else 1
                rows = []
                for n in args.gpus:
                    if n % args.gpus_per_node and n > args.gpus_per_node:
                        raise LayoutError(f"{n} GPUs is not a whole number of {args.gpus_per_node}-GPU nodes")
                    nodes, gpn = (n // args.gpus_per_node, args.gpus_per_node) if n >= args.gpus_per_node else (1, n)
                    rows.append(project(cfg, Layout(nodes, gpn, ep, args.zero, args.micro, None, args.grad_ckpt, args.dtype), hw))
                out["presets"][name] = {"ep_size": ep, "rows": rows,
                                        "per_layer": per_layer_times(cfg, args.micro, hw, ep, args.grad_ckpt)}
                print(f"\n{name} (ep {ep}, ZeRO {args.zero}, micro {args.micro}/GPU, {moe_calls(cfg)} MoE calls "
                      f"= {moe_calls(cfg)} all-to-all pairs per forward):")
                for lr in out["presets"][name]["per_layer"]:
                    print(f"    {lr['layer']:12s} x{lr['calls']:<3d} {lr['train_flops'] / 1e12:8.3f} TFLOP  GEMM rows {lr['gemm_rows']:6d}"
                          f"  at {100 * lr['efficiency']:4.1f}% of peak  {lr['ms']:7.2f} ms")
                for r in rows:
                    t = r["time_s"]
                    print(f"  {r['world']:4d} GPUs: step {1e3 * t['step']:7.1f} ms = compute {1e3 * t['compute']:6.1f} "
                          f"+ a2a {1e3 * t['all_to_all']:6.1f} + all-reduce {1e3 * t['allreduce_exposed']:6.1f} "
                          f"+ opt {1e3 * t['optimizer']:4.1f}; {r['samples_per_s']:8.0f} img/s; "
                          f"mem {r['memory_bytes']['total'] / GiB:5.1f} GiB")
            common.write_json(args.json, out)
            if args.plot:
                plot_projection(out, args.plot)
            return 0
        if args.cmd == "advise":
            cfg = common.model_config(args.preset, args.overrides)
            ck = {"off": (False,), "on": (True,), "both": (False, True)}[args.grad_ckpt]
            res = advise(cfg, args.nodes, args.gpus_per_node, hw, args.global_batch, args.ep_sizes,
                         args.zero_stages, args.micro_batches, ck, args.dtype)
            res.update({"benchmark": "advise", "command": command, "preset": args.preset})
            _print_assumptions(res["assumptions"])
            print(f"\n{args.preset}: {res['world']} GPUs ({args.nodes} x {args.gpus_per_node}), global batch "
                  f"{args.global_batch}, {res['params']['total'] / 1e6:.1f}M params "
                  f"({res['params']['expert'] / 1e6:.1f}M in experts); ranked by projected step time:")
            for i, r in enumerate(res["ranked"][:args.top], 1):
                print(f"  {i:2d}. {_fmt_row(r)}")
            reasons: dict[str, int] = {}
            for r in res["refused"]:
                reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
            if reasons:
                print(f"refused {len(res['refused'])} layouts:")
                for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
                    print(f"  {n:3d} x {reason}")
            common.write_json(args.json, res)
            if not res["ranked"]:
                print("error: no valid layout (see the refusals above)", file=sys.stderr)
                return 2
            return 0
    except (common.ConfigError, LayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
