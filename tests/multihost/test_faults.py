"""Faults across two hosts, each ending the same way: every rank still running exits non-zero
within the collective timeout (DS_WIDENET_TIMEOUT, 10 s here), the launch prints one error line
naming the rank and host that saw the loss and the host lost (the peer gloo names when its
connection closed, or the hosts no longer reachable when a collective timed out), no traceback,
and `--resume auto` continues from the last complete checkpoint.

* every process of host 1 SIGKILLed mid-training (its sshd daemon kept, as a node rebooted
  into service), resumed on one host with both ranks: the same layout, so the losses continue
  within 1e-5 of the uninterrupted run;
* host 1's link taken down mid-step, resumed on one host with one rank (2 -> 1, a reshard), that
  run stopped too and resumed across two hosts again (1 -> 2, a reshard); the same global batch,
  so these losses continue within 1e-5 as well (they came out bitwise equal here);
* host 1's link taken down mid-save: the checkpoint being written is not marked complete, and the
  resumed 2-host run redoes the lost steps within 1e-5.
The faults come at known points through tests/support/trainer.py's `pause` (a rank waits after a
step, or after writing its checkpoint files, until the test has acted).
"""
from __future__ import annotations

import re
import time

import pytest

from tests.support.trainer import pause_marker

from .runs import INSTRUMENTED, STEPS, assert_close, cluster_env, ds_config, local_cmd, pdsh_cmd, run_on, \
    start_on, trace, wait_until

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(900)]

TIMEOUT_S = 10
# from the fault to the launcher's exit: the collective timeout, then ssh's keepalive verdict on a
# dead link (ServerAliveInterval 5 x ServerAliveCountMax 2 in the cluster's ssh_config), and slack
GRACE_S = TIMEOUT_S + 10 + 15


def complete_steps(out) -> list[int]:
    return sorted(int(d.name[4:]) for d in (out / "checkpoints").glob("step*")
                  if re.fullmatch(r"step\d+", d.name) and (d / "complete").exists())


def trainers_on(cluster, host: int) -> list[int]:
    """The training processes still alive on a host (its sshd and the test's own are not)."""
    alive = []
    for pid in cluster.pids(host):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"tests.support.train" in cmd or b"ds_widenet.train" in cmd:
            alive.append(pid)
    return alive


def fault_run(cluster, tmp_path, fault: str, act, name: str = "run"):
    """A 2-host pdsh launch with `fault` (a pause); once the paused rank waits, `act()`, let it go
    on, and wait for the launch to end. Returns (out, returncode, seconds from the act, log text)."""
    ds, out, log = ds_config(tmp_path), tmp_path / name, tmp_path / f"{name}.log"
    env = cluster_env(cluster, timeout_s=TIMEOUT_S, DS_WIDENET_FAULT=fault)
    proc = start_on(cluster, 0, pdsh_cmd(cluster, out, ds, module=INSTRUMENTED), env, log)
    try:
        rank = int(fault.split(":")[2])
        marker = pause_marker(out, rank)
        wait_until(marker.exists, 240, proc, what=f"the pause {fault}")
        t0 = time.monotonic()
        act()
        marker.unlink(missing_ok=True)
        rc = proc.wait(timeout=GRACE_S + 30)
        return out, rc, time.monotonic() - t0, log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()


def assert_one_error_line(text: str, rank: int, host: str) -> str:
    errors = [ln for ln in text.splitlines() if re.search(r"\berror: rank \d+ on ", ln)]
    assert len(errors) == 1, "\n".join(errors) or text[-3000:]
    assert f"error: rank {rank} on {host}: lost contact with another rank" in errors[0], errors[0]
    assert "--resume auto" in errors[0]
    assert "Traceback" not in text, text[-4000:]
    return errors[0]


def link_down_run(cluster, tmp_path, fault: str):
    """A 2-host launch whose host 1 loses its link at the paused `fault`: the run stops within the
    timeout, rank 0's one line names host 1 as unreachable (rank 1 cannot be heard over the dead
    link: rank 0's line is the one the launch prints), and host 1's rank exits on its own; the
    link is back up afterwards. Returns the run's --out."""
    out, rc, took, text = fault_run(cluster, tmp_path, fault, lambda: cluster.set_link(1, False))
    try:
        assert rc != 0 and took <= GRACE_S, (rc, took, text[-3000:])
        line = assert_one_error_line(text, 0, "node0")
        assert f"unreachable from here: node1 ({cluster.nodes[1].addr}, rank 1)" in line, line
        wait_until(lambda: not trainers_on(cluster, 1), TIMEOUT_S + 10, what="host 1's rank exiting on its own")
    finally:
        cluster.set_link(1, True)
    return out


def test_a_host_killed_mid_training_stops_the_run_in_one_line_and_resumes_on_one_host(cluster, reference, tmp_path):
    out, rc, took, text = fault_run(cluster, tmp_path, "train:3:1:pause", lambda: cluster.kill_host(1, keep_sshd=True))
    assert rc != 0 and took <= GRACE_S, (rc, took, text[-3000:])
    line = assert_one_error_line(text, 0, "node0")
    assert f"peer {cluster.nodes[1].addr} = node1" in line, line  # the lost host, by address and name
    assert "unreachable" not in line  # its sshd still answers: the host is up, its ranks are gone
    assert complete_steps(out) == [2]
    pause_marker(out, 1).unlink(missing_ok=True)  # the killed rank's
    log = tmp_path / "resume.log"
    res = run_on(cluster, 0, local_cmd(2, out, ds_config(tmp_path), "--resume", "auto"), cluster_env(cluster), log)
    assert res.returncode == 0, log.read_text()[-4000:]
    assert "step2 (same layout" in log.read_text()
    # steps 1-2 from the 2-host pdsh launch (2 hosts x 1 slot), 3-8 from the resumed one
    assert_close(reference, trace(out), range(1, STEPS + 1))


def test_a_link_down_mid_step_stops_both_hosts_and_resumes_on_fewer_and_then_more_hosts(cluster, reference,
                                                                                       tmp_path):
    out = link_down_run(cluster, tmp_path, "train:3:1:pause")
    assert complete_steps(out) == [2]
    ds, env = ds_config(tmp_path), cluster_env(cluster)
    # 2 -> 1: one rank on one host (DeepSpeed accumulates 2 micro-batches for the same global
    # batch); stopped after step 5 by a fault, with step 4 saved
    log = tmp_path / "to_one.log"
    res = run_on(cluster, 0, local_cmd(1, out, ds, "--resume", "auto", module=INSTRUMENTED),
                 {**env, "DS_WIDENET_FAULT": "train:5:0"}, log)
    assert res.returncode != 0 and complete_steps(out) == [2, 4], log.read_text()[-4000:]
    assert "resharded" in log.read_text() and "step2 from" in log.read_text()
    # the same losses after the reshard too: the weights and every group's optimizer moments came along
    assert_close(reference, trace(out), [3, 4, 5])
    # 1 -> 2: across both hosts again, to the end
    log = tmp_path / "to_two.log"
    res = run_on(cluster, 0, pdsh_cmd(cluster, out, ds, "--resume", "auto"), env, log)
    assert res.returncode == 0, log.read_text()[-4000:]
    assert "resharded" in log.read_text() and "step4 from" in log.read_text()
    assert_close(reference, trace(out), range(5, STEPS + 1))


def test_a_link_down_mid_save_leaves_the_previous_checkpoint_and_the_resume_redoes_the_steps(cluster, reference,
                                                                                           tmp_path):
    out = link_down_run(cluster, tmp_path, "save:4:1:pause")
    assert complete_steps(out) == [2] and (out / "checkpoints" / "step4").is_dir()  # written, never marked
    log = tmp_path / "resume.log"
    res = run_on(cluster, 0, pdsh_cmd(cluster, out, ds_config(tmp_path), "--resume", "auto"), cluster_env(cluster), log)
    assert res.returncode == 0, log.read_text()[-4000:]
    assert "step2 (same layout" in log.read_text()
    assert_close(reference, trace(out), range(3, STEPS + 1))
    assert complete_steps(out) == [2, 4, 6, 8]
