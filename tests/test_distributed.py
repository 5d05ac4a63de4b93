"""Launcher discovery from the environment alone (no process group): srun/SLURM, torchrun/deepspeed,
mpirun (rank discovery through a stand-in for mpi4py), and no launcher at all."""
from __future__ import annotations

import os
import socket

import pytest

from ds_widenet import distributed
from ds_widenet.config import ConfigError
from ds_widenet.distributed import DEFAULT_PORT, discover_env, first_slurm_host, mpi_discovery

DIST_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_environ():
    """os.environ without launcher variables for the test, restored exactly afterwards."""
    saved = dict(os.environ)
    for k in list(os.environ):
        if k in DIST_KEYS or k.startswith(("SLURM_", "OMPI_", "PMI_")):
            del os.environ[k]
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


# --------------------------------------------------------------------------------------------
# SLURM node lists


@pytest.mark.parametrize("nodelist,first", [
    ("gpu[03-05,07],cpu1", "gpu03"),
    ("node1", "node1"),
    ("a-[1-2]", "a-1"),
    ("cpu1,gpu[03-05]", "cpu1"),
    ("gpu[003]", "gpu003"),          # zero padding kept
    ("gpu[07,03-05]", "gpu07"),      # the first listed, as srun places task 0
    ("n[1-2]-ib", "n1-ib"),          # a suffix after the range
    ("rack[1-2]-n[01-04]", "rack1-n01"),
    ("  node7  ", "node7"),
    ("node-1.cluster.local,node-2.cluster.local", "node-1.cluster.local"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "gpu[03-05", "gpu[]", "gpu[,1]", "gpu]1["])
def test_an_unparsable_node_list_is_one_line_naming_master_addr(nodelist):
    with pytest.raises(ConfigError) as e:
        first_slurm_host(nodelist)
    assert "\n" not in str(e.value) and "MASTER_ADDR" in str(e.value)


# --------------------------------------------------------------------------------------------
# srun


def slurm(procid: int, ntasks: int = 8, localid: int = 0, nodelist: str = "gpu[03-05,07],cpu1", **extra) -> dict:
    return {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": str(localid),
            "SLURM_NODELIST": nodelist, "SLURM_JOB_ID": "4242", **extra}


def test_srun_variables_give_rank_world_local_rank_and_the_first_node_as_master():
    env = slurm(5, ntasks=8, localid=1)
    assert discover_env(env) == "slurm"
    assert {k: env[k] for k in DIST_KEYS} == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                             "MASTER_ADDR": "gpu03", "MASTER_PORT": str(DEFAULT_PORT + 242)}


def test_every_srun_task_agrees_on_the_master():
    envs = [slurm(r, ntasks=4, localid=r % 2, nodelist="a-[1-2]") for r in range(4)]
    for env in envs:
        discover_env(env)
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "0", "1"]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {("a-1", str(DEFAULT_PORT + 242))}


def test_srun_keeps_a_master_addr_and_port_the_batch_script_exported():
    env = slurm(1, MASTER_ADDR="10.0.0.7", MASTER_PORT="31000")
    assert discover_env(env) == "slurm"
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.7", "31000")


def test_srun_step_variables_win_over_the_allocation_ones():
    """`srun -n 2` inside `salloc -n 8`: the step's task count and node list."""
    env = slurm(1, ntasks=8, nodelist="node[1-4]", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="node[3-4]")
    discover_env(env)
    assert (env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("2", "node3")


def test_srun_without_localid_nodelist_or_job_id_still_starts():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "node9"}
    assert discover_env(env) == "slurm"
    assert {k: env[k] for k in DIST_KEYS} == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                                             "MASTER_ADDR": "node9", "MASTER_PORT": str(DEFAULT_PORT)}


# --------------------------------------------------------------------------------------------
# torchrun / deepspeed, mpirun, nothing


def test_torchrun_style_env_is_left_alone_even_under_srun_or_mpirun():
    torchrun = {"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "node1", "MASTER_PORT": "29400",
                "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "0"}
    for extra in ({}, slurm(0, ntasks=2), {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}):
        env = {**extra, **torchrun}
        before = dict(env)
        assert discover_env(env) == "env"
        assert env == before


def test_rank_and_world_size_alone_are_not_turned_into_a_single_process():
    env = {"RANK": "1", "WORLD_SIZE": "2"}
    assert discover_env(env) == "env"
    assert {k: env[k] for k in DIST_KEYS} == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(DEFAULT_PORT)}


@pytest.mark.parametrize("var", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
def test_mpi_is_recognised_and_left_to_mpi_discovery(var):
    env = {var: "2", "MASTER_PORT": "29777"}
    assert discover_env(env) == "mpi"
    assert env == {var: "2", "MASTER_PORT": "29777"}


def test_no_launcher_is_one_process_on_a_free_port():
    env: dict = {}
    assert discover_env(env) == "single"
    assert {k: env[k] for k in DIST_KEYS[:4]} == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                                                 "MASTER_ADDR": "127.0.0.1"}
    port = int(env["MASTER_PORT"])
    with socket.socket() as s:  # free: it can be bound
        s.bind(("127.0.0.1", port))


def test_no_launcher_keeps_an_explicit_master_port():
    env = {"MASTER_PORT": "31234"}
    discover_env(env)
    assert env["MASTER_PORT"] == "31234" and env["WORLD_SIZE"] == "1"


def test_discover_env_defaults_to_os_environ(clean_environ):
    clean_environ.update(slurm(2, ntasks=4, localid=0, nodelist="node[1-2]"))
    assert discover_env() == "slurm"
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("2", "4", "node1")


# --------------------------------------------------------------------------------------------
# mpi_discovery (mpi4py replaced by a recording stand-in; the real one runs in test_launchers.py)


class FakeWorld:
    """COMM_WORLD for `size` ranks called one after another, rank 0 first (bcast/allgather replay)."""

    def __init__(self, size: int, hosts: list[str]):
        self.size, self.hosts, self.root = size, hosts, None

    def comm(self, rank: int):
        world = self

        class Comm:
            def Get_rank(self):
                return rank

            def Get_size(self):
                return world.size

            def bcast(self, obj, root=0):
                if rank == root:
                    world.root = obj
                return world.root

            def allgather(self, obj):
                assert obj == socket.gethostname()
                return list(world.hosts)

        return Comm()


def test_mpi_ranks_take_rank_zeros_master_addr_and_port(monkeypatch):
    """mpirun -x MASTER_PORT on rank 0's node only (a remote rank without it still agrees)."""
    monkeypatch.setattr(distributed, "_host_address", lambda: pytest.fail("MASTER_ADDR was set"))
    world = FakeWorld(2, [socket.gethostname()] * 2)
    env0 = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29777"}
    env1 = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    mpi_discovery(env0, world.comm(0))
    mpi_discovery(env1, world.comm(1))
    for rank, env in enumerate((env0, env1)):
        assert {k: env[k] for k in DIST_KEYS} == {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                                                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29777"}
        assert discover_env(env) == "env"  # complete now: DeepSpeed's own discovery stays off


def test_mpi_without_master_uses_rank_zeros_address_and_counts_local_ranks_per_host(monkeypatch):
    monkeypatch.setattr(distributed, "_host_address", lambda: "10.1.2.3")
    me = socket.gethostname()
    world = FakeWorld(4, [me, me, me + "-other", me])
    envs = [{"PMI_SIZE": "4"} for _ in range(4)]
    for rank, env in enumerate(envs):
        mpi_discovery(env, world.comm(rank))
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "0", "2"]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {("10.1.2.3", str(DEFAULT_PORT))}


GROUP_TIMEOUT_SCRIPT = '''
import json, os
os.environ.update({"DS_ACCELERATOR": "cpu"})
import torch
from ds_widenet.distributed import init_distributed
from deepspeed.utils import groups

init_distributed(timeout_s=42)
groups._create_expert_and_data_parallel(1)  # as deepspeed.initialize does for an MoE model
timeouts = {name: g._get_backend(torch.device("cpu")).options._timeout.total_seconds()
            for name, g in {**groups._get_expert_parallel_group_dict(),
                            **groups._get_expert_data_parallel_group_dict()}.items()}
print(json.dumps(timeouts))
'''


def test_deepspeeds_expert_groups_take_the_run_timeout_not_torchs_30_minutes(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in (*distributed.LAUNCHER_VARS, "DS_WIDENET_TIMEOUT")}
    res = subprocess.run([sys.executable, "-c", GROUP_TIMEOUT_SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"ep_size_1": 42.0}, got  # expert and expert-data groups (one name at world size 1)


def test_accelerators_get_gloo_for_the_cpu_tensors_of_the_bookkeeping_collectives():
    from ds_widenet.distributed import process_group_backend

    assert process_group_backend("cpu", "ccl") == "gloo"
    assert process_group_backend("cuda", "nccl") == "cpu:gloo,cuda:nccl"
    # torch accepts the device:backend form (its parser, as init_process_group uses it)
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    backends = BackendConfig(Backend(process_group_backend("cuda", "nccl"))).get_device_backend_map()
    assert backends == {"cpu": "gloo", "cuda": "nccl"}


# ---------------------------------------------------------------- socket interface for gloo

def test_route_interface_names_the_interface_holding_the_source_address():
    from ds_widenet.distributed import interfaces, route_interface

    name, local = route_interface("127.0.0.1")
    assert local in interfaces()[name]


def test_choose_socket_interface_sets_gloo_to_the_route_to_master_addr():
    from ds_widenet.distributed import choose_socket_interface, route_interface

    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    assert choose_socket_interface(env) == route_interface("127.0.0.1")[0] == env["GLOO_SOCKET_IFNAME"]


def test_choose_socket_interface_keeps_a_set_interface_and_skips_one_rank():
    from ds_widenet.distributed import choose_socket_interface, route_interface

    lo = route_interface("127.0.0.1")[0]
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": lo}
    assert choose_socket_interface(env) is None and env["GLOO_SOCKET_IFNAME"] == lo
    one = {"WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert choose_socket_interface(one) is None and "GLOO_SOCKET_IFNAME" not in one


@pytest.mark.parametrize("var,value", [("GLOO_SOCKET_IFNAME", "nosuch0"), ("NCCL_SOCKET_IFNAME", "=nosuch0"),
                                       ("NCCL_SOCKET_IFNAME", "ib,nosuch")])
def test_an_interface_variable_naming_no_interface_here_is_one_line_with_the_fix(var, value):
    from ds_widenet.config import ConfigError
    from ds_widenet.distributed import choose_socket_interface

    with pytest.raises(ConfigError, match=f"{var}={value}: no interface .* unset it"):
        choose_socket_interface({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", var: value})


def test_nccl_exclusion_lists_are_not_checked():
    from ds_widenet.distributed import choose_socket_interface

    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "NCCL_SOCKET_IFNAME": "^docker,lo"}
    assert choose_socket_interface(env) is not None


def test_an_unresolvable_master_addr_is_one_line_naming_master_addr():
    from ds_widenet.config import ConfigError
    from ds_widenet.distributed import choose_socket_interface

    with pytest.raises(ConfigError, match="MASTER_ADDR=no-such-host.invalid does not resolve .* --master_addr"):
        choose_socket_interface({"WORLD_SIZE": "2", "MASTER_ADDR": "no-such-host.invalid"})


# --------------------------------------------------------------------------------------------
# A lost peer, as the backends word it


def test_a_gloo_lost_peer_is_one_line_naming_the_peer_and_its_host_name():
    # as gloo raises it from a collective when the other host's process is gone
    e = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:40123: "
                     "Connection closed by peer [127.0.0.1]:40123. This is typically caused by a remote worker crashing. GLHF!"
                     "\nException raised from ... (most recent call first):\nframe #0")
    line = distributed.peer_failure(e)
    assert line is not None and "\n" not in line
    assert line.startswith("lost contact with another rank (peer 127.0.0.1")
    assert "pair.cc" not in line and "typically" not in line
    assert line.endswith(": Read error [127.0.0.1]:40123: Connection closed by peer [127.0.0.1]:40123")
    name = distributed.host_name("127.0.0.1")
    if name:  # whatever this machine's /etc/hosts calls loopback
        assert f"= {name})" in line


def test_a_gloo_timeout_is_a_lost_peer_but_other_runtime_errors_keep_their_traceback():
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
                        "10000ms for recv operation to complete")
    assert distributed.peer_failure(gloo).startswith("lost contact with another rank: Timed out waiting 10000ms")
    assert distributed.peer_failure(RuntimeError("DataLoader timed out after 30 seconds")) is None
    assert distributed.peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_host_name_of_an_address_nothing_names_is_none():
    assert distributed.host_name("192.0.2.77", timeout_s=2.0) is None  # TEST-NET-1: never assigned


def test_unreachable_hosts_leaves_out_this_host_and_every_host_that_answers():
    # a live host answers a connect, accepting or refusing it; an unreachable one (a link down) is
    # named by tests/multihost/test_faults.py, where a namespace's link can really be taken down
    here = socket.gethostname()
    peers = [(0, here, "127.0.0.1"), (1, "alive", "127.0.0.1"), (2, "alive", "127.0.0.1")]
    assert distributed.unreachable_hosts(peers, timeout_s=0.5) == []
    assert distributed.unreachable_hosts(peers, timeout_s=0.5, port=free_tcp_port()) == []


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
