"""Process-group start-up under any launcher, and the accelerator choice.

Launchers and what they leave in the environment:
* `deepspeed` / `torchrun`: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
* `mpirun` (Open MPI) / other MPI: OMPI_COMM_WORLD_* or PMI_*; rank discovery goes through
  mpi4py (DeepSpeed's `mpi_discovery`, which also broadcasts rank 0's address).
* `srun` (SLURM): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODELIST; the first host of
  the node list is the master unless MASTER_ADDR is set.
* nothing: one process, a free local port.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, MutableMapping, Optional

import torch

DEFAULT_PORT = 29500


def select_accelerator() -> str:
    """Pick DeepSpeed's accelerator before deepspeed is imported: the CPU one (with gloo) when
    there is no GPU, so a laptop or CI machine needs no flags. An explicit DS_ACCELERATOR wins."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    return os.environ.get("DS_ACCELERATOR", "cuda")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[03-05,07],cpu1' -> 'gpu03' (no scontrol needed)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def discover_env(env: Optional[MutableMapping[str, str]] = None) -> str:
    """Fill torch.distributed's env:// variables from the launcher's; returns the launcher name."""
    env = os.environ if env is None else env
    required = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if all(k in env for k in required):
        env.setdefault("LOCAL_RANK", "0")
        return "env"
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        return "mpi"  # deepspeed.init_distributed's mpi_discovery fills the rest through mpi4py
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_NODELIST", env.get("SLURM_JOB_NODELIST", "localhost"))))
        env.setdefault("MASTER_PORT", str(DEFAULT_PORT + int(env.get("SLURM_JOB_ID", "0")) % 1000))
        return "slurm"
    env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
    env.setdefault("MASTER_PORT", str(_free_port()))
    return "single"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: Optional[float] = None) -> DistInfo:
    """Start torch.distributed through DeepSpeed (gloo on the CPU, the accelerator's backend
    otherwise). `timeout_s` (or $DS_WIDENET_TIMEOUT) bounds collectives so a dead peer fails the
    run instead of hanging it."""
    select_accelerator()
    launcher = discover_env()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if timeout_s is None:
        timeout_s = float(os.environ.get("DS_WIDENET_TIMEOUT", 1800))
    acc = get_accelerator()
    backend = "gloo" if acc.device_name() == "cpu" else acc.communication_backend_name()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=launcher == "mpi",
                                   timeout=timedelta(seconds=timeout_s), verbose=False)
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if acc.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        acc.set_device(local_rank)
        device = torch.device(acc.device_name(local_rank))
    return DistInfo(rank, world, local_rank, device, launcher)


def env_summary(env: Mapping[str, str]) -> str:
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return " ".join(f"{k}={env.get(k)}" for k in keys)
