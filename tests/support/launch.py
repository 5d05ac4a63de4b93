"""Launching a run from a test or a benchmark, with a deadline and stack dumps.

`run_with_deadline` runs a launcher and everything it starts as one process group: on a hang it
asks every process for its Python stacks (SIGUSR1, which ds_widenet.train registers), kills the
group, and reports both, so a stuck CI run says where it stuck and leaves no orphans behind.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence


def child_env(root: Path, timeout_s: float = 90, **extra: str) -> dict[str, str]:
    """The environment for a launch from a test or benchmark: this one without the launcher
    variables a parent run may carry, on the CPU accelerator, one thread per process (two
    multi-threaded processes on 2 cores thrash), `root` importable, a short hang timeout."""
    from ds_widenet.distributed import LAUNCHER_VARS

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    # this interpreter's bin first, as in an activated venv: DeepSpeed JIT-builds its CPU comm op at
    # start-up, and launches that find different `ninja`s (the venv's, the system's) rebuild it in turn
    bin_dir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1",
                "DS_WIDENET_TIMEOUT": str(timeout_s), **extra})
    return env


class DeadlineExceeded(AssertionError):
    """A launched run outlived its deadline; the message ends with the stacks it printed."""


def run_with_deadline(cmd: Sequence[str], env: Mapping[str, str], cwd: Path, timeout: float,
                      stack_grace_s: float = 5.0) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True, text=True) in a new session. Past `timeout` seconds:
    SIGUSR1 to the whole group (each trainer prints all its threads' stacks), then SIGKILL to the
    group (torchrun's workers included, which a plain subprocess timeout leaves running)."""
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_group(proc.pid, signal.SIGUSR1)
        try:
            out, err = proc.communicate(timeout=stack_grace_s)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        signal_group(proc.pid, signal.SIGKILL)  # stragglers whose parent already died
        raise DeadlineExceeded(f"{' '.join(cmd[:6])} ... still running after {timeout:.0f} s; "
                               f"stacks and output tail:\n{out[-2000:]}\n{err[-12000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def signal_group(pgid: int, sig: int) -> None:
    """Send `sig` to a process group that may already be gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def process_alive(pid: int, settle_s: float = 2.0) -> bool:
    """Whether `pid` is still running after up to `settle_s` seconds (a zombie counts as ended:
    a killed orphan lingers as one until its new parent reaps it)."""
    import time

    deadline = time.monotonic() + settle_s
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state in ("Z", "X"):
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)
