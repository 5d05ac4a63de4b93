"""The test harness itself: a hung launch is reported with its stacks and leaves no process behind."""
from __future__ import annotations

import os
import sys
import textwrap

import pytest

from tests.support.launch import DeadlineExceeded, process_alive, run_with_deadline

HANG = textwrap.dedent('''
    import faulthandler, signal, subprocess, sys, time
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(child.pid, flush=True)

    def stuck_in_a_collective():
        time.sleep(600)

    stuck_in_a_collective()
''')


def test_a_hung_launch_reports_its_stacks_and_its_whole_group_is_killed(tmp_path):
    with pytest.raises(DeadlineExceeded) as err:
        run_with_deadline([sys.executable, "-c", HANG], os.environ, tmp_path, timeout=3, stack_grace_s=1)
    msg = str(err.value)
    assert "still running after 3 s" in msg
    assert "stuck_in_a_collective" in msg  # the SIGUSR1 stack dump names the function it hung in
    grandchild = int(msg.split("output tail:\n")[1].split()[0])
    assert not process_alive(grandchild)  # the launcher's own child went with the group


def test_a_finished_launch_returns_like_subprocess_run(tmp_path):
    res = run_with_deadline([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], os.environ, tmp_path, 30)
    assert res.returncode == 3 and res.stdout.strip() == "out"
