"""`python -m ds_widenet.hostfile check`: hostfile parsing, and the layout checks for its world size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_widenet.config import ConfigError
from ds_widenet.hostfile import check_ep_placement, loopback_warnings, main, parse_hostfile, probe_warnings, \
    read_hostfile

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "ds_configs" / "digits_widenet.yaml"
CPU_DS = ROOT / "ds_configs" / "cpu_fp32.json"


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def ds_json(tmp_path: Path, **cfg) -> Path:
    return write(tmp_path, "ds.json", json.dumps(cfg))


def run_check(capsys, hostfile, ds, *overrides, recipe=RECIPE, extra=()) -> tuple[int, str, str]:
    rc = main(["check", str(hostfile), "--deepspeed_config", str(ds), "--recipe", str(recipe), *extra, *overrides])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --------------------------------------------------------------------------------------------
# parsing


def test_comments_blank_lines_and_inline_comments_are_skipped():
    hosts = parse_hostfile("# cluster A\n\n  node1 slots=8   # rack 1\nnode2\tslots=4\n#node3 slots=8\n")
    assert [(h.name, h.slots, h.line) for h in hosts] == [("node1", 8, 3), ("node2", 4, 4)]


@pytest.mark.parametrize("name", ["1x8.txt", "2x8.txt", "4x8.txt", "localhost-2.txt"])
def test_example_hostfiles_parse_as_deepspeed_parses_them(name):
    from deepspeed.launcher.runner import fetch_hostfile

    path = ROOT / "hostfiles" / name
    ours = {h.name: h.slots for h in read_hostfile(path)}
    assert ours == dict(fetch_hostfile(str(path)))
    assert sum(ours.values()) == {"1x8.txt": 8, "2x8.txt": 16, "4x8.txt": 32, "localhost-2.txt": 2}[name]


@pytest.mark.parametrize("text,line,words", [
    ("node1 slots=8\nnode2\n", 2, ["'node2' has no slots", "node2 slots=8"]),
    ("node1 slots=8\nnode2:8\n", 2, ["MPICH", "node2 slots=N"]),
    ("node1 slots 8\n", 1, ["malformed", "hostname slots=N"]),
    ("node1 slots = 8\n", 1, ["malformed"]),
    ("# head\nnode1 slots=8 max_slots=8\n", 2, ["unexpected 'max_slots=8'", "remove it"]),
    ("node1 slots=8\nnode2 slots=8\nnode1 slots=8\n", 3, ["already listed on line 1", "list each host once"]),
    ("node1 slots=0\n", 1, ["slots=0", ">= 1"]),
    ("node1 slots=-2\n", 1, ["slots=-2", ">= 1"]),
])
def test_a_bad_hostfile_line_is_one_line_naming_the_line_and_the_fix(text, line, words):
    with pytest.raises(ConfigError) as e:
        parse_hostfile(text, "hf.txt")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"hf.txt:{line}: "), msg
    for w in words:
        assert w in msg, (w, msg)


def test_what_our_parser_refuses_deepspeed_refuses_or_mis_launches():
    """Our parser is stricter than DeepSpeed's: every line DeepSpeed rejects, we reject too."""
    from deepspeed.launcher.runner import _parse_hostfile

    for text in ["node1\n", "node1 slots 8\n", "node1 slots=-2\n", "node1 slots=8\nnode1 slots=8\n", "\n# only\n"]:
        with pytest.raises(ValueError):
            _parse_hostfile(text.splitlines())
        with pytest.raises(ConfigError):
            parse_hostfile(text)


def test_empty_and_missing_hostfiles_are_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="lists no hosts"):
        parse_hostfile("# nothing\n\n")
    rc, _, err = run_check(capsys, tmp_path / "nope.txt", CPU_DS)
    assert rc == 2 and "not found" in error_line(err)


# --------------------------------------------------------------------------------------------
# ep groups inside a node


@pytest.mark.parametrize("slots,ep,ok", [([8, 8], 8, True), ([8, 8], 4, True), ([8, 8, 8, 8], 2, True),
                                         ([8, 8], 16, False), ([6, 6], 4, False), ([8, 4], 8, False),
                                         ([3, 3], 1, True)])
def test_ep_groups_must_stay_inside_a_node(slots, ep, ok):
    hosts = parse_hostfile("".join(f"n{i} slots={s}\n" for i, s in enumerate(slots)))
    assert (check_ep_placement(hosts, ep) is None) == ok


def test_slots_not_a_multiple_of_ep_size_are_refused_with_a_fitting_ep_size(tmp_path, capsys):
    hf = write(tmp_path, "hf.txt", "a slots=6\nb slots=6\n")  # 12 ranks, ep 4: ranks 4-7 straddle a and b
    ds = ds_json(tmp_path, train_micro_batch_size_per_gpu=4)
    rc, out, err = run_check(capsys, hf, ds, "parallel.ep_size=4")
    msg = error_line(err)
    assert rc == 2 and out == ""
    assert "a has 6 slots (line 1), not a multiple of parallel.ep_size=4" in msg and "parallel.ep_size=2" in msg


def test_ep_size_larger_than_a_node_is_refused_and_can_be_downgraded_to_a_warning(tmp_path, capsys):
    hf = write(tmp_path, "hf.txt", "".join(f"node{i} slots=2\n" for i in range(4)))  # 4 nodes x 2 GPUs
    ds = ds_json(tmp_path, train_micro_batch_size_per_gpu=4)
    rc, _, err = run_check(capsys, hf, ds, "parallel.ep_size=4")
    msg = error_line(err)
    assert rc == 2 and "larger than node0's 2 slots" in msg and "span nodes" in msg and "parallel.ep_size=2" in msg
    rc, out, err = run_check(capsys, hf, ds, "parallel.ep_size=4", extra=["--allow_cross_node_ep"])
    assert rc == 0 and err.startswith("warning: ") and "SPANNING NODES" in out


# --------------------------------------------------------------------------------------------
# config.validate for the hostfile's world size


def test_global_batch_not_divisible_by_micro_times_world_is_refused(tmp_path, capsys):
    hf = write(tmp_path, "hf.txt", "node1 slots=8\nnode2 slots=8\nnode3 slots=8\n")  # world 24
    ds = ds_json(tmp_path, train_batch_size=4096, train_micro_batch_size_per_gpu=64)
    rc, _, err = run_check(capsys, hf, ds)
    msg = error_line(err)
    assert rc == 2 and "train_batch_size=4096 is not divisible by micro batch 64 x world size 24" in msg


def test_zero3_with_moe_is_refused(tmp_path, capsys):
    ds = ds_json(tmp_path, train_batch_size=64, train_micro_batch_size_per_gpu=32, zero_optimization={"stage": 3})
    rc, _, err = run_check(capsys, ROOT / "hostfiles" / "localhost-2.txt", ds, "parallel.ep_size=2")
    assert rc == 2 and "ZeRO stage 3" in error_line(err)


def test_ep_size_not_dividing_the_world_is_refused(capsys):
    rc, _, err = run_check(capsys, ROOT / "hostfiles" / "localhost-2.txt", CPU_DS, "parallel.ep_size=4")
    assert rc == 2 and "does not divide the world size 2" in error_line(err)


def test_a_malformed_hostfile_fails_the_check_naming_its_line(tmp_path, capsys):
    hf = write(tmp_path, "hf.txt", "# two nodes\nnode1 slots=8\nnode2 8\n")
    rc, _, err = run_check(capsys, hf, CPU_DS)
    assert rc == 2 and f"{hf}:3: malformed line 'node2 8'" in error_line(err)


def test_a_good_layout_prints_nodes_world_ep_groups_and_batch(capsys):
    rc, out, err = run_check(capsys, ROOT / "hostfiles" / "4x8.txt", ROOT / "ds_configs" / "gpu_bf16_zero1_b.json",
                             "optim.name=adamw", recipe=ROOT / "ds_configs" / "imagenet_widenet_b.yaml")
    assert rc == 0 and err == "", err
    assert "nodes        4 (node1:8, node2:8, node3:8, node4:8)" in out
    assert "world size   32" in out
    assert "ep groups    8 of ep_size 4 (inside one node each); 4 experts, 1 per rank" in out
    assert "micro 128 x grad_accum 1 x world 32 = global 4096" in out


def test_the_cli_runs_as_a_module_and_exits_2_with_one_error_line(tmp_path):
    hf = write(tmp_path, "hf.txt", "a slots=6\nb slots=6\n")
    ds = ds_json(tmp_path, train_micro_batch_size_per_gpu=4)
    base = [sys.executable, "-m", "ds_widenet.hostfile", "check", str(hf), "--deepspeed_config", str(ds),
            "--recipe", str(RECIPE)]
    bad = subprocess.run(base + ["parallel.ep_size=4"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert bad.returncode == 2 and bad.stdout == ""
    assert error_line(bad.stderr).startswith("error: a has 6 slots")


# --------------------------------------------------------------------------------------------
# host names that resolve to loopback (the gloo connectFullMesh trap)


def test_a_listed_host_resolving_to_loopback_here_is_a_warning_on_a_multi_host_file():
    hosts = parse_hostfile("localhost slots=2\nnode7 slots=2\n")
    (w,) = loopback_warnings(hosts, here="launcher")
    assert w.startswith("localhost (line 1) resolves to 127.") and "on launcher" in w and "IP address" in w
    assert loopback_warnings(parse_hostfile("localhost slots=2\n")) == []  # one host: loopback is right
    assert loopback_warnings(hosts, here="localhost") == []  # this host's own name: DeepSpeed uses hostname -I


def test_the_probe_warns_for_names_another_host_resolves_to_loopback_or_not_at_all():
    # a stand-in for ssh that runs the probe here: `ssh HOST CMD` -> sh -c CMD
    fake_ssh = ["sh", "-c", 'eval "$2"', "fake-ssh"]
    hosts = parse_hostfile("localhost slots=1\nno-such-host.invalid slots=1\n")
    warnings = probe_warnings(hosts, ssh=fake_ssh)
    assert any(w.startswith("on no-such-host.invalid, localhost resolves to 127.") for w in warnings), warnings
    assert any(w.startswith("on localhost, no-such-host.invalid does not resolve") for w in warnings), warnings
    assert len(warnings) == 2, warnings
    unreachable = probe_warnings(parse_hostfile("a slots=1\nb slots=1\n"), ssh=["sh", "-c", "echo refused >&2; exit 255", "x"])
    assert [w.split(" (")[0] for w in unreachable] == ["cannot ssh to a", "cannot ssh to b"]
    assert "(refused)" in unreachable[0]
