"""Process-group start-up under any launcher, and the accelerator choice.

Launchers and what they leave in the environment:
* `deepspeed` / `torchrun`: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
* `mpirun` (Open MPI) / other MPI: OMPI_COMM_WORLD_* or PMI_*; rank discovery goes through
  mpi4py (`mpi_discovery` here: rank 0's MASTER_ADDR/MASTER_PORT if set, else its `hostname -I`
  address and 29500, broadcast to every rank).
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
from typing import Mapping, MutableMapping, Optional, Sequence

import torch

DEFAULT_PORT = 29500
# what torchrun / deepspeed export to each rank; a child launch must not inherit them
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def select_accelerator() -> str:
    """Pick DeepSpeed's accelerator before deepspeed is imported: the CPU one (with gloo) when
    there is no GPU, so a laptop or CI machine needs no flags. An explicit DS_ACCELERATOR wins."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    return os.environ.get("DS_ACCELERATOR", "cuda")


def free_port() -> int:
    """A TCP port free on this host now (for a master port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list, without scontrol: 'gpu[03-05,07],cpu1' -> 'gpu03',
    'node1' -> 'node1', 'a-[1-2]' -> 'a-1', 'rack[1-2]-n[01-04]' -> 'rack1-n01', 'n[1-2]-ib' -> 'n1-ib'.
    Commas inside brackets separate ranges, not hosts; zero padding is kept."""
    s = nodelist.strip()
    depth, end = 0, len(s)
    for i, c in enumerate(s):
        depth += (c == "[") - (c == "]")
        if depth < 0 or depth > 1:
            break
        if c == "," and depth == 0:
            end = i
            break
    first = s[:end]
    host = re.sub(r"\[([^\[\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0].strip(), first)
    if not first or not host or "[" in host or "]" in host or re.search(r"\[\s*[,\-\]]", first):
        from .config import ConfigError

        raise ConfigError(f"cannot parse SLURM_NODELIST={nodelist!r}: set MASTER_ADDR to the first node's address")
    return host


def _slurm_master_port(env: Mapping[str, str]) -> str:
    """The same port on every rank of a job and different ports for jobs sharing a node."""
    job = env.get("SLURM_JOB_ID", "0")
    return str(DEFAULT_PORT + (int(job) % 1000 if job.isdigit() else 0))


def discover_env(env: Optional[MutableMapping[str, str]] = None) -> str:
    """Fill torch.distributed's env:// variables from the launcher's; returns the launcher name.

    * RANK and WORLD_SIZE set (deepspeed, torchrun, or by hand): "env", left as they are (LOCAL_RANK
      defaults to 0, MASTER_ADDR/MASTER_PORT to 127.0.0.1:29500 as torch's own defaults).
    * OMPI_COMM_WORLD_SIZE / PMI_SIZE: "mpi"; init_distributed fills the rest through mpi4py.
    * SLURM_PROCID and SLURM_NTASKS (srun): "slurm"; MASTER_ADDR/MASTER_PORT are kept when set.
    * nothing: "single", one process on a free local port.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(DEFAULT_PORT))
        return "env"
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        return "mpi"  # init_distributed -> mpi_discovery fills the rest through mpi4py
    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]  # the step's, under salloc too
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if not env.get("MASTER_ADDR"):
            nodes = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
                     or "localhost")
            env["MASTER_ADDR"] = first_slurm_host(nodes)
        if not env.get("MASTER_PORT"):
            env["MASTER_PORT"] = _slurm_master_port(env)
        return "slurm"
    env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
    if not env.get("MASTER_PORT"):
        env["MASTER_PORT"] = str(free_port())
    return "single"


def _host_address() -> str:
    """This host's first address from `hostname -I` (what DeepSpeed's mpi_discovery uses)."""
    import subprocess

    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return socket.gethostbyname(socket.gethostname())


def mpi_discovery(env: Optional[MutableMapping[str, str]] = None, comm=None) -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK from MPI (mpi4py); MASTER_ADDR/MASTER_PORT decided on rank 0 and
    broadcast, so every rank agrees: rank 0's MASTER_ADDR / MASTER_PORT when set (`mpirun -x
    MASTER_PORT=29700 ...`), else its first `hostname -I` address and port 29500. DeepSpeed's own
    mpi_discovery always overwrites both (port 29500), so two mpirun jobs on one node collide."""
    env = os.environ if env is None else env
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    master = (env.get("MASTER_ADDR") or _host_address(), env.get("MASTER_PORT") or str(DEFAULT_PORT)) if rank == 0 else None
    addr, port = comm.bcast(master, root=0)
    local = env.get("OMPI_COMM_WORLD_LOCAL_RANK") or env.get("MPI_LOCALRANKID")
    if local is None:  # ranks on the same host, counted in rank order
        hosts = comm.allgather(socket.gethostname())
        local = str(sum(h == hosts[rank] for h in hosts[:rank]))
    env.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
                "MASTER_ADDR": str(addr), "MASTER_PORT": str(port)})


def interfaces() -> dict[str, list[str]]:
    """This host's network interfaces and their IPv4 addresses (psutil, a DeepSpeed dependency)."""
    import psutil

    return {name: [a.address for a in addrs if a.family == socket.AF_INET]
            for name, addrs in psutil.net_if_addrs().items()}


def route_interface(dest: str) -> tuple[str, str]:
    """(interface, local address) this host's routing table uses to reach `dest` (a name or an IPv4
    address). Raises ConfigError (one line, with the fix) when `dest` does not resolve or is not
    routed from here."""
    from .config import ConfigError

    host = socket.gethostname()
    try:
        addr = socket.getaddrinfo(dest, None, socket.AF_INET)[0][4][0]
    except OSError:
        raise ConfigError(f"MASTER_ADDR={dest} does not resolve on {host}: launch with --master_addr <an IP address "
                          "of the first host that every host reaches> (or add the name to /etc/hosts)") from None
    try:
        # connect() on a UDP socket sends nothing: it only asks the kernel for the route's source address
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addr, DEFAULT_PORT))
            local = s.getsockname()[0]
    except OSError as e:
        raise ConfigError(f"no route from {host} to MASTER_ADDR={dest} ({addr}): {e.strerror}; launch with "
                          "--master_addr <an address of the first host on the network all hosts share>") from None
    for name, addrs in interfaces().items():
        if local in addrs:
            return name, local
    raise ConfigError(f"{host} reaches MASTER_ADDR={dest} from {local}, which no interface holds: set "
                      "GLOO_SOCKET_IFNAME to the interface of that network (in .deepspeed_env, for every host)")


def _check_ifname(var: str, value: str, have: dict[str, list[str]]) -> None:
    """An interface variable names interfaces this host has. NCCL's syntax: a comma list of name
    prefixes, `=` for exact names, `^` to exclude (not checked: any host satisfies an exclusion)."""
    from .config import ConfigError

    if value.startswith("^"):
        return
    exact = value.startswith("=") or var == "GLOO_SOCKET_IFNAME"
    wanted = [w for w in value.lstrip("=").split(",") if w]
    missing = [w for w in wanted if not any(n == w if exact else n.startswith(w) for n in have)]
    if missing:
        raise ConfigError(f"{var}={value}: no interface {', '.join(missing)} on {socket.gethostname()} (it has "
                          f"{', '.join(sorted(have))}): set it to the interface that reaches MASTER_ADDR on every "
                          "host, or unset it and ds_widenet picks that interface itself")


def choose_socket_interface(env: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
    """Make gloo listen on, and advertise, the interface that routes to MASTER_ADDR.

    Gloo's default device is the address this host's own name resolves to; on a stock Debian/Ubuntu
    node (`127.0.1.1 <hostname>` in /etc/hosts) that is loopback, so every other host is told to
    connect to 127.0.x.x and the job hangs in `connectFullMesh`. DeepSpeed's launcher does not
    forward GLOO_SOCKET_IFNAME, so each rank picks here, on its own host, the interface its routing
    table uses for MASTER_ADDR (the address every rank already reaches for the rendezvous). A
    GLOO_SOCKET_IFNAME or NCCL_SOCKET_IFNAME that is set is kept, and checked to exist on this host.
    NCCL's own choice (it skips loopback and docker interfaces) is left alone. Returns the interface
    gloo will use when it was chosen here, else None."""
    env = os.environ if env is None else env
    have = interfaces()
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if env.get(var):
            _check_ifname(var, env[var], have)
    if env.get("GLOO_SOCKET_IFNAME") or int(env.get("WORLD_SIZE", "1")) <= 1:
        return None
    name, _ = route_interface(env.get("MASTER_ADDR", "127.0.0.1"))
    env["GLOO_SOCKET_IFNAME"] = name
    return name


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


def process_group_backend(device_name: str, comm_backend: str) -> str:
    """gloo on the CPU. On an accelerator, its backend for device tensors plus gloo for CPU ones:
    the project's bookkeeping collectives (non-finite flags, metric sums, route digests, the
    global gradient norm, evaluation counts) reduce small CPU tensors, which NCCL alone rejects."""
    if device_name == "cpu":
        return "gloo"
    return f"cpu:gloo,{device_name}:{comm_backend}"


def run_timeout_s() -> float:
    """How long any wait may last before it counts as a hang: a collective (every process group,
    DeepSpeed's included) and a data-loader batch. $DS_WIDENET_TIMEOUT seconds, default 30 minutes."""
    return float(os.environ.get("DS_WIDENET_TIMEOUT", 1800))


def init_distributed(timeout_s: Optional[float] = None) -> DistInfo:
    """Start torch.distributed through DeepSpeed (gloo on the CPU, the accelerator's backend
    otherwise). `timeout_s` (or $DS_WIDENET_TIMEOUT) bounds collectives so a dead peer fails the
    run instead of hanging it."""
    select_accelerator()
    launcher = discover_env()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if timeout_s is None:
        timeout_s = run_timeout_s()
    acc = get_accelerator()
    backend = process_group_backend(acc.device_name(), acc.communication_backend_name())
    if launcher == "mpi" and not torch.distributed.is_initialized():
        mpi_discovery()  # fills RANK..MASTER_PORT, so DeepSpeed's own discovery (port 29500) stays off
    if not torch.distributed.is_initialized():
        choose_socket_interface()
    # DeepSpeed creates its expert and expert-data groups with dist.new_group(ranks), which takes
    # torch's default timeout (30 min on gloo, 10 on NCCL) rather than the one given here; an MoE
    # all-to-all waiting on a stuck peer would outlast the bound. Make the bound the default.
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timedelta(seconds=timeout_s)
    distributed_c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=timeout_s), verbose=False)
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if acc.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        acc.set_device(local_rank)
        device = torch.device(acc.device_name(local_rank))
    if world > 1:
        _learn_peers()  # after set_device: on NCCL the object collective runs on the current device
    return DistInfo(rank, world, local_rank, device, launcher)


# what gloo, NCCL and the store say when a peer or the link is gone; a bare "timed out" counts only
# from gloo (a data-loader timeout is a RuntimeError too, and not a lost peer)
_PEER_LOST = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|No route to host|"
                        r"Connection refused|Connect timeout|connectFullMesh|Socket Timeout|"
                        r"NCCL communicator was aborted|gloo.*[Tt]imed out")


def peer_failure(e: BaseException) -> Optional[str]:
    """One line for an exception that says a peer or the network went away (a collective or the
    rendezvous failed), naming the peer address when the backend gave it; None for anything else.
    Backends raise these as RuntimeError (gloo) or DistError subclasses (NCCL, the store), with
    the C++ site first and often a multi-line tail: the line keeps only what a user can act on."""
    import torch.distributed as dist

    text = str(e)
    if not (isinstance(e, dist.DistError) or isinstance(e, RuntimeError) and _PEER_LOST.search(text)):
        return None
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    first = re.sub(r"\[[^\]]*(?:/|\\)[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", first)  # drop [.../pair.cc:534]
    first = first.split(". ", 1)[0]  # gloo adds advice ("This is typically caused by ... GLHF!")
    peer = re.search(r"\[(\d{1,3}(?:\.\d{1,3}){3})\]:(\d+)", text)
    who = ""
    if peer:
        name = host_name(peer.group(1))
        who = f" (peer {peer.group(1)}{f' = {name}' if name else ''})"
    return f"lost contact with another rank{who}: {first[:200]}"


def host_name(addr: str, timeout_s: float = 1.0) -> Optional[str]:
    """The host name of `addr` (/etc/hosts or DNS), or None. Asked in a thread and given up after
    `timeout_s`: the network may be the thing that just failed, and a reverse DNS lookup has no
    timeout of its own."""
    import threading

    found: list[str] = []

    def look() -> None:
        try:
            found.append(socket.gethostbyaddr(addr)[0])
        except OSError:
            pass

    t = threading.Thread(target=look, daemon=True)
    t.start()
    t.join(timeout_s)
    return found[0] if found and found[0] != addr else None


# (rank, host name, address other hosts reach it at) of every rank, learnt once the group is up:
# after a lost peer the error line can say which hosts this one can no longer reach
_PEERS: list[tuple[int, str, str]] = []


def _learn_peers() -> None:
    import torch.distributed as dist

    try:
        _, addr = route_interface(os.environ.get("MASTER_ADDR", "127.0.0.1"))
    except Exception:  # the rendezvous just worked through MASTER_ADDR; a lookup failure is not fatal here
        addr = ""
    mine = (dist.get_rank(), socket.gethostname(), addr)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    _PEERS[:] = [tuple(p) for p in everyone]


def unreachable_hosts(peers: Optional[Sequence[tuple[int, str, str]]] = None, timeout_s: float = 1.0,
                      port: int = 22) -> list[str]:
    """`host (address, ranks r, ...)` for each other host of the run that this one cannot reach now:
    a TCP connect to `port` that neither connects nor is refused within `timeout_s` (a refusal
    comes from a live host). All hosts are asked at once, so this takes at most about `timeout_s`."""
    import threading

    peers = _PEERS if peers is None else peers
    here = socket.gethostname()
    hosts: dict[tuple[str, str], list[int]] = {}
    for rank, host, addr in peers:
        if host != here and addr:
            hosts.setdefault((host, addr), []).append(rank)
    down: dict[tuple[str, str], bool] = {}

    def probe(key: tuple[str, str]) -> None:
        try:
            socket.create_connection((key[1], port), timeout=timeout_s).close()
            down[key] = False
        except ConnectionRefusedError:
            down[key] = False
        except OSError:  # timed out, no route, network unreachable
            down[key] = True

    threads = [threading.Thread(target=probe, args=(k,), daemon=True) for k in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 0.5)
    return [f"{h} ({a}, rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))})"
            for (h, a), r in hosts.items() if down.get((h, a), True)]


def env_rank() -> str:
    """This process's global rank as its launcher wrote it (before the process group exists)."""
    return next((os.environ[k] for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
                 if k in os.environ), "0")


def where() -> str:
    """`rank R on HOST` for messages printed by every rank."""
    return f"rank {env_rank()} on {socket.gethostname()}"


def env_summary(env: Mapping[str, str]) -> str:
    return " ".join(f"{k}={env.get(k)}" for k in LAUNCHER_VARS)


# --------------------------------------------------------------------------------------------
# Small CPU-side collectives for the trainer's bookkeeping (metrics, flags)


def dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (a collective when torch.distributed is up)."""
    import torch.distributed as dist

    if dist_world() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_mean_tensor(t: torch.Tensor) -> list[float]:
    """The mean over ranks of a small float64 tensor on the training device (an NCCL all-reduce
    on a GPU, not a gloo one through the host), read back once."""
    import torch.distributed as dist

    if dist_world() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()
