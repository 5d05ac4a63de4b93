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


def ds_config(root: Path, micro: int = 16) -> Path:
    """ZeRO-2, a global batch of 32 whatever the world size (DeepSpeed derives the accumulation)."""
    return write_ds_config(Path(root) / f"ds{micro}.json", train_batch_size=32, train_micro_batch_size_per_gpu=micro,
                           zero_optimization={"stage": 2})


def cluster_env(cluster, timeout_s: float = 30, **extra: str) -> dict[str, str]:
    """The launch host's environment. The timeout (and `extra`) reach the other hosts through a
    deepspeed env file, as a user's .deepspeed_env carries them: DeepSpeed's launcher forwards only
    a few variable prefixes."""
    env_file = cluster.root / "deepspeed_env"
    env = child_env()
    # PATH too, the venv first on every host (an activated venv on a shared home): DeepSpeed JIT-builds
    # its CPU comm op into the shared ~/.cache/torch_extensions at start-up, and a host whose PATH finds
    # another ninja (mpirun starts rank 0 with this PATH, the others with their ssh login's) rebuilds
    # it for 30-60 s while the other ranks' rendezvous times out
    lines = {"DS_WIDENET_TIMEOUT": f"{timeout_s:g}", "OMP_NUM_THREADS": "1", "PATH": env["PATH"], **extra}
    env_file.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    env.update(DS_ENV_FILE=str(env_file), **lines)
    env.pop("GLOO_SOCKET_IFNAME", None)
    return env


def train_args(out: Path, ds: Path, *extra: str) -> list[str]:
    return ["--recipe", str(RECIPE), "--deepspeed_config", str(ds), "--out", str(out), *TINY, *extra]


def pdsh_cmd(cluster, out: Path, ds: Path, *extra: str, slots: int = 1, hosts: Optional[Sequence[int]] = None,
             module: Sequence[str] = TRAIN) -> list[str]:
    """`deepspeed --hostfile` with its default launcher (pdsh over ssh), run from host 0."""
    hf = cluster.hostfile(slots, hosts, name=f"hostfile.{out.name}")
    return [DEEPSPEED, "--hostfile", str(hf), f"--master_port={free_port()}", *module, *train_args(out, ds, *extra)]


def mpirun_cmd(cluster, out: Path, ds: Path, *extra: str, slots: int = 1, mpi_args: str = "") -> list[str]:
    """`deepspeed --hostfile --launcher openmpi` from host 0: DeepSpeed's runner calls mpirun, whose
    ssh starts Open MPI's daemon on the other host; `--prefix` is where that daemon lives there (the
    venv's pip-installed Open MPI: an ssh login's PATH does not have it)."""
    hf = cluster.hostfile(slots, name=f"hostfile.{out.name}")
    return [DEEPSPEED, "--hostfile", str(hf), "--launcher", "openmpi",
            "--launcher_args", f"--prefix {BIN.parent} --bind-to none {mpi_args}".strip(), *TRAIN, *train_args(out, ds, *extra)]


def mpirun_env(env: dict[str, str]) -> dict[str, str]:
    """Open MPI refuses to start as root (CI runs as root) unless told twice."""
    return {**env, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


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
