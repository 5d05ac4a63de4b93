"""bench/gpu_check.py cannot rot: its CPU dry run (tiny presets, gloo) runs every section that does
not need CUDA and writes the JSON; the section runner keeps going past a failure, skips what the
time budget cannot hold, and a watchdog ends a run stuck past it with the JSON written."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_check  # noqa: E402  (stdlib only at import: no torch)
from tests.support import launch as testing  # noqa: E402

SECTIONS = ["environment", "pytest_cuda", "bf16_engine_step", "nccl_all_reduce", "export_evaluate", "sync_debug_step",
            "fused_lamb_vs_lamb", "keyed_dropout_vs_F_dropout",
            *[f"throughput/{p}/{m}" for m in ("eager", "compiled") for p in ("widenet-digits", "vit-digits", "vit-moe-digits")]]
CUDA_ONLY = ["nccl_all_reduce", "sync_debug_step", "fused_lamb_vs_lamb"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--out", str(out)], cwd=ROOT,
                         env=testing.child_env(ROOT), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return res, json.loads(out.read_text()) if out.exists() else None, time.monotonic() - t0


def test_the_cpu_dry_run_runs_every_section_that_does_not_need_cuda(dry_run):
    res, d, wall = dry_run
    assert d is not None, res.stderr[-4000:]
    secs = d["sections"]
    failed = [n for n, s in secs.items() if s["status"] not in gpu_check.CPU_OK_STATUSES]
    assert not failed, {n: secs[n].get("error", secs[n]["status"]) for n in failed}
    assert res.returncode == 0, res.stderr[-4000:]
    assert d["benchmark"] == "gpu_check" and d["device"] == "cpu" and d["dry_run"] is True
    assert d["budget_s"] == 480 and d["total_seconds"] < 90 and wall < 110, (d["total_seconds"], wall)  # ~20 s idle
    assert list(secs) == SECTIONS
    assert all(s["seconds"] >= 0 for s in secs.values())
    for name in CUDA_ONLY:
        assert secs[name]["status"] == gpu_check.NEEDS_CUDA, name
    assert secs["pytest_cuda"]["status"] in (gpu_check.NO_CUDA_TESTS, gpu_check.NEEDS_CUDA)
    ran = ["environment", "bf16_engine_step", "export_evaluate", "keyed_dropout_vs_F_dropout",
           *[f"throughput/{p}/{m}" for m in ("eager", "compiled") for p in ("widenet-digits", "vit-digits", "vit-moe-digits")]]
    assert all(secs[n]["status"] == "ok" for n in ran), {n: secs[n]["status"] for n in ran}

    eng = secs["bf16_engine_step"]
    assert eng["param_dtypes"] == ["bfloat16"] and eng["steps"] == 3 and len(eng["losses"]) == 3
    assert eng["process_group_backend"] == "gloo" and max(eng["max_weight_change"].values()) > 0
    ex = secs["export_evaluate"]
    assert ex["exported"]["top1"] == ex["engine"]["top1"] and ex["exported"]["images"] == 360
    kd = secs["keyed_dropout_vs_F_dropout"]
    assert kd["bits_equal_definition"] is True and kd["keyed_ms"] > 0 and kd["F_dropout_ms"] > 0
    for p in ("widenet-digits", "vit-digits", "vit-moe-digits"):
        t = secs[f"throughput/{p}/eager"]
        assert t["images_per_s"] > 0 and 0 < t["mfu"] and t["matmul_peak_flops_per_s"] > 0, t
    c = secs["throughput/vit-digits/compiled"]
    assert c["compile_backend"] == "eager" and c["compile_seconds"] > 0 and c["dynamo"]["stats"]["unique_graphs"] >= 1


def test_the_moe_models_trace_under_torch_compile(dry_run):
    _, d, _ = dry_run
    for p in ("widenet-digits", "vit-moe-digits"):
        c = d["sections"][f"throughput/{p}/compiled"]
        assert c["status"] == "ok" and c["dynamo"]["stats"]["unique_graphs"] >= 1, c


def test_a_failing_section_is_recorded_and_the_next_ones_still_run(tmp_path):
    chk = gpu_check.Check("cpu", tmp_path / "c.json", budget_s=60, grace_s=60, only=None)

    def boom():
        raise ValueError("broken on purpose")

    def skip():
        raise gpu_check.Skip(gpu_check.NEEDS_CUDA)

    chk.section("a", 0, boom)
    chk.section("b", 0, lambda: {"value": 1})
    chk.section("c", 0, skip)
    chk.section("d", 0, lambda: {}, needs_cuda=True)
    chk.section("e", 3600, lambda: {"never": True})  # more than the budget holds
    d = json.loads((tmp_path / "c.json").read_text())["sections"]
    assert d["a"]["status"] == "failed" and "ValueError: broken on purpose" in d["a"]["error"] and "boom" in d["a"]["traceback"]
    assert d["b"] == {"status": "ok", "seconds": d["b"]["seconds"], "value": 1}
    assert d["c"]["status"] == d["d"]["status"] == gpu_check.NEEDS_CUDA
    assert d["e"]["status"].startswith("skipped: time budget") and "never" not in d["e"]
    only = gpu_check.Check("cpu", tmp_path / "o.json", 60, 60, only=["throughput"])
    only.section("environment", 0, lambda: {})
    only.section("throughput/x/eager", 0, lambda: {})
    assert list(json.loads((tmp_path / "o.json").read_text())["sections"]) == ["throughput/x/eager"]


def test_the_watchdog_ends_a_stuck_section_and_keeps_the_json(tmp_path):
    out = tmp_path / "w.json"
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from bench import gpu_check; "
            "from pathlib import Path; chk = gpu_check.Check('cpu', Path(sys.argv[2]), 0.5, 0.5, None); "
            "chk.section('fast', 0, lambda: {}); chk.section('stuck', 0, lambda: time.sleep(30))")
    res = subprocess.run([sys.executable, "-c", code, str(ROOT), str(out)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 3, res.stderr[-2000:]
    d = json.loads(out.read_text())["sections"]
    assert d["fast"]["status"] == "ok" and d["stuck"]["status"] == "timeout" and "budget" in d["stuck"]["error"]
