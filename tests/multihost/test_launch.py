"""WideNet on digits across two hosts (network namespaces, each with its own sshd and hostname;
shared file system): every launch path reproduces the same global batch on one host.

* `deepspeed --hostfile` with its default pdsh launcher over ssh, 2 hosts x 1 slot, ZeRO-2 across
  the hosts; host 1 also has a second interface with an address nothing routes to;
* `deepspeed --no_ssh --node_rank N` started on each host, as on a cluster without ssh;
* the reference: 2 ranks on one host.
No GLOO_SOCKET_IFNAME is set anywhere: each host's own name resolves to 127.0.1.1 (as Debian writes
/etc/hosts), so without distributed.choose_socket_interface gloo would tell the other host to
connect to loopback and the launch would hang in connectFullMesh.
"""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.distributed.launch import BIN, ROOT, child_env, free_port, metrics, write_ds_config

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(600)]

RECIPE = ROOT / "ds_configs" / "digits_widenet.yaml"
TINY = ["model.depth=3", "model.embed_dim=32", "model.num_heads=2", "model.moe.expert_dim=64",
        "model.moe.capacity_factor=4.0", "schedule.max_steps=4", "schedule.warmup_steps=0",
        "schedule.decay=constant", "train.log_interval=1", "optim.lr=0.01", "data.num_workers=0"]
DS = ["--module", "ds_widenet.train"]


def cluster_env(cluster, timeout_s: float = 30) -> dict[str, str]:
    """The launch host's environment; the timeout reaches the other hosts through a deepspeed env
    file, as a user's .deepspeed_env would carry it (DeepSpeed's launcher forwards only a few prefixes)."""
    env_file = cluster.root / "deepspeed_env"
    env_file.write_text(f"DS_WIDENET_TIMEOUT={timeout_s:g}\nOMP_NUM_THREADS=1\n")
    env = child_env()
    env.update(DS_ENV_FILE=str(env_file), PATH=f"{BIN}:{env['PATH']}", DS_WIDENET_TIMEOUT=f"{timeout_s:g}")
    env.pop("GLOO_SOCKET_IFNAME", None)
    return env


def train_args(root, name: str, ds) -> list[str]:
    return ["--recipe", str(RECIPE), "--deepspeed_config", str(ds), "--out", str(root / name), *TINY]


def trace(out) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(out)]


def assert_same_trace(ref, got) -> None:
    assert [s for s, _ in got] == [s for s, _ in ref] == [1, 2, 3, 4]
    for (step, a), (_, b) in zip(ref, got):
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)


@pytest.fixture(scope="module")
def runs(cluster):
    cluster.add_dead_interface(1)  # host 1: a second NIC nothing routes to
    root = cluster.root
    ds = write_ds_config(root / "ds.json", train_batch_size=32, train_micro_batch_size_per_gpu=16,
                         zero_optimization={"stage": 2})
    env = cluster_env(cluster)
    deepspeed = str(BIN / "deepspeed")
    results = {}

    def run(name, host, argv, timeout=240):
        res = cluster.run(host, ["timeout", "-s", "KILL", str(timeout), *argv], env=env, cwd=ROOT, timeout=timeout + 30)
        results[name] = res
        (root / f"{name}.log").write_text(res.stdout + res.stderr)

    run("one_host", 0, [deepspeed, "--num_gpus=2", f"--master_port={free_port()}", *DS,
                        *train_args(root, "one_host", ds)])
    run("pdsh", 0, [deepspeed, "--hostfile", str(cluster.hostfile(1)), f"--master_port={free_port()}", *DS,
                    *train_args(root, "pdsh", ds)])
    # --no_ssh: each host runs the same command with its own --node_rank; MASTER_ADDR is host 0's name
    hf, port = cluster.hostfile(1), free_port()
    procs = {}
    for i in (0, 1):
        log = open(root / f"no_ssh{i}.log", "w")
        procs[i] = cluster.popen(i, ["timeout", "-s", "KILL", "240", deepspeed, "--hostfile", str(hf), "--no_ssh",
                                     f"--node_rank={i}", f"--master_addr={cluster.nodes[0].name}",
                                     f"--master_port={port}", *DS, *train_args(root, "no_ssh", ds)],
                                 env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    for i, p in procs.items():
        results[f"no_ssh{i}"] = subprocess.CompletedProcess(p.args, p.wait(timeout=270),
                                                            (root / f"no_ssh{i}.log").read_text(), "")
    return root, results


def check_ok(runs, *names):
    _, results = runs
    for n in names:
        r = results[n]
        assert r.returncode == 0, f"{n} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}"


def test_one_host_reference_trains(runs):
    check_ok(runs, "one_host")
    assert len(trace(runs[0] / "one_host")) == 4


def test_pdsh_over_ssh_across_two_hosts_reproduces_one_host(runs):
    root, results = runs
    check_ok(runs, "one_host", "pdsh")
    log = results["pdsh"].stdout + results["pdsh"].stderr
    assert "node0: " in log and "node1: " in log  # pdsh prefixes each host's lines: both hosts ran ranks
    assert "'node0': [0], 'node1': [1]" in log
    assert_same_trace(trace(root / "one_host"), trace(root / "pdsh"))
    assert json.loads((root / "pdsh" / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2


def test_no_ssh_launch_on_each_host_reproduces_one_host(runs):
    root, results = runs
    check_ok(runs, "one_host", "no_ssh0", "no_ssh1")
    for i in (0, 1):
        assert f"node_rank={i}" in results[f"no_ssh{i}"].stdout
    assert_same_trace(trace(root / "one_host"), trace(root / "no_ssh"))
