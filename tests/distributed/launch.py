"""One helper for every multi-process test: run `ds_widenet.train` under a launcher, read its metrics."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from tests.support import launch as testing
from ds_widenet.distributed import free_port  # noqa: F401 (the launcher tests import it from here)
from tests.support.launch import run_with_deadline, signal_group

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def child_env() -> dict[str, str]:
    return testing.child_env(ROOT)


def write_ds_config(path: Path, **cfg: Any) -> Path:
    path.write_text(json.dumps(cfg))
    return path


def train_cmd(launcher: str, nproc: int, args: list[str]) -> list[str]:
    module = ["-m", "ds_widenet.train"]
    if launcher == "python":
        assert nproc == 1
        return [sys.executable, *module, *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}", *module, *args]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), f"--num_gpus={nproc}", f"--master_port={free_port()}",
                "--module", "ds_widenet.train", *args]
    raise ValueError(launcher)


def run_train(launcher: str, nproc: int, recipe: Path, ds_config: Path, out: Path, overrides: list[str],
              timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    args = ["--recipe", str(recipe), "--deepspeed_config", str(ds_config), "--out", str(out), *overrides]
    res = run_with_deadline(train_cmd(launcher, nproc, args), child_env(), ROOT, timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{launcher} x{nproc} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def metrics(out: Path, kind: str = "train") -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    key = "loss" if kind == "train" else "top1"
    return [r for r in rows if key in r]


def last_line(text: str) -> Optional[str]:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else None


def launch_all(cmds: dict[str, tuple[list[str], dict[str, str]]], logs: Path,
               timeout: float = 300) -> dict[str, tuple[int, str]]:
    """Start every command at once (name -> (argv, env)), each in its own process group with
    stdout+stderr in logs/NAME.log, and wait for all; returns name -> (returncode, log text).
    A command still running after `timeout` seconds has its whole process group killed (rc -9)."""
    import signal
    import time

    logs.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, (cmd, env) in cmds.items():
        with open(logs / f"{name}.log", "w") as f:
            procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    codes = {}
    for name, p in procs.items():
        try:
            codes[name] = p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            signal_group(p.pid, signal.SIGUSR1)  # stacks first (ds_widenet.train registers it)
            time.sleep(3)
            signal_group(p.pid, signal.SIGKILL)
            codes[name] = p.wait()
    return {name: (codes[name], (logs / f"{name}.log").read_text(errors="replace")) for name in cmds}
