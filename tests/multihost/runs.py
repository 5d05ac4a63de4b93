"""What the multi-host tests share: the run (a tiny WideNet on digits, ZeRO-2, checkpoints every 2
steps), the environment every host gets, the launch commands, and reading a trajectory back."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from tests.distributed.launch import BIN, ROOT, child_env, free_port, metrics, write_ds_config

RECIPE = ROOT / "ds_configs" / "digits_widenet.yaml"
STEPS = 8
TINY = ["model.depth=3", "model.embed_dim=32", "model.num_heads=2", "model.moe.expert_dim=64",
        "model.moe.capacity_factor=4.0", f"schedule.max_steps={STEPS}", "schedule.warmup_steps=0",
        "schedule.decay=constant", "train.log_interval=1", "optim.lr=0.01",
        "data.num_workers=0", "checkpoint.every_steps=2", "checkpoint.keep_last=0"]
DEEPSPEED = str(BIN / "deepspeed")
TRAIN = ["--module", "ds_widenet.train"]
INSTRUMENTED = ["--module", "tests.support.train"]  # the same, with DS_WIDENET_FAULT honoured


def ds_config(root: Path) -> Path:
    """ZeRO-2, a global batch of 32 whatever the world size (DeepSpeed derives the accumulation)."""
    return write_ds_config(Path(root) / "ds.json", train_batch_size=32, train_micro_batch_size_per_gpu=16,
                           zero_optimization={"stage": 2})


def cluster_env(cluster, timeout_s: float = 30, **extra: str) -> dict[str, str]:
    """The launch host's environment. The timeout (and `extra`) reach the other hosts through a
    deepspeed env file, as a user's .deepspeed_env carries them: DeepSpeed's launcher forwards only
    a few variable prefixes."""
    env_file = cluster.root / "deepspeed_env"
    lines = {"DS_WIDENET_TIMEOUT": f"{timeout_s:g}", "OMP_NUM_THREADS": "1", **extra}
    env_file.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    env = child_env()
    env.update(DS_ENV_FILE=str(env_file), PATH=f"{BIN}:{env['PATH']}", **lines)
    env.pop("GLOO_SOCKET_IFNAME", None)
    return env


def train_args(out: Path, ds: Path, *extra: str) -> list[str]:
    return ["--recipe", str(RECIPE), "--deepspeed_config", str(ds), "--out", str(out), *TINY, *extra]


def pdsh_cmd(cluster, out: Path, ds: Path, *extra: str, slots: int = 1, hosts: Optional[Sequence[int]] = None,
             module: Sequence[str] = TRAIN) -> list[str]:
    """`deepspeed --hostfile` with its default launcher (pdsh over ssh), run from host 0."""
    hf = cluster.hostfile(slots, hosts, name=f"hostfile.{out.name}")
    return [DEEPSPEED, "--hostfile", str(hf), f"--master_port={free_port()}", *module, *train_args(out, ds, *extra)]


def local_cmd(nproc: int, out: Path, ds: Path, *extra: str, module: Sequence[str] = TRAIN) -> list[str]:
    """`deepspeed --num_gpus=N` on one host."""
    return [DEEPSPEED, f"--num_gpus={nproc}", f"--master_port={free_port()}", *module, *train_args(out, ds, *extra)]


def run_on(cluster, host: int, argv: Sequence[str], env, log: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """argv on a host, to completion (killed after `timeout`); its output also in `log`."""
    res = cluster.run(host, ["timeout", "-s", "KILL", str(int(timeout)), *argv], env=env, cwd=ROOT,
                      timeout=timeout + 30)
    log.write_text(res.stdout + res.stderr)
    return res


def start_on(cluster, host: int, argv: Sequence[str], env, log: Path, timeout: float = 240) -> subprocess.Popen:
    """argv on a host in the background, stdout and stderr into `log`."""
    f = open(log, "w")
    return cluster.popen(host, ["timeout", "-s", "KILL", str(int(timeout)), *argv], env=env, cwd=ROOT,
                         stdout=f, stderr=subprocess.STDOUT)


def wait_until(cond: Callable[[], bool], timeout: float, proc: Optional[subprocess.Popen] = None,
               what: str = "condition") -> None:
    """Poll `cond`; fail if `proc` ends first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the launch ended ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.1)


def trace(out: Path) -> dict[int, float]:
    """step -> loss; a resumed run appends to metrics.jsonl, so a redone step keeps its last value."""
    return {r["step"]: r["loss"] for r in metrics(out)}


def assert_close(ref: dict[int, float], got: dict[int, float], steps, rel: float = 1e-5) -> None:
    for s in steps:
        assert s in got, (s, sorted(got))
        assert abs(got[s] - ref[s]) <= rel * abs(ref[s]), (s, ref[s], got[s])
