"""bench/trainer_overhead.py at tiny settings: the real trainer, a DeepSpeed-engine loop and a bare
PyTorch loop interleaved in one process, the same training in all three (equal losses per round),
and the JSON the README quotes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import launch as testing  # noqa: E402

TINY = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.moe.expert_dim=64"]


def test_trainer_overhead_json_at_tiny_settings(tmp_path):
    out = tmp_path / "o.json"
    cmd = [sys.executable, "bench/trainer_overhead.py", "--presets", "widenet-digits", "--batch", "8", "--micro", "4",
           "--steps-per-round", "2", "--rounds", "2", "--warmup-rounds", "1", "--profile", "--workdir", str(tmp_path),
           "--json", str(out), *TINY]
    res = subprocess.run(cmd, cwd=ROOT, env=testing.child_env(ROOT), capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-4000:]
    d = json.loads(out.read_text())
    assert d["benchmark"] == "trainer_overhead" and d["threads"] == 1
    assert d["command"].startswith("python bench/trainer_overhead.py") and d["variants"] == ["trainer", "engine", "bare"]
    (r,) = d["results"]
    assert r["preset"] == "widenet-digits" and r["batch"] == 8 and r["micro"] == 4 and r["grad_accum"] == 2
    assert r["optimizer"] == "adamw" and r["threads_seen"] == [1] and r["rounds"] == 2
    for name in ("trainer", "engine", "bare"):
        v = r["variants"][name]
        assert len(v["round_wall_seconds"]) == len(v["round_cpu_seconds"]) == 2
        assert v["images_per_s"]["median"] > 0 and v["images_per_cpu_s"]["median"] > 0 and v["step_ms_median"] > 0
    for src in (r, r["cpu_time"]):
        for key in ("trainer_vs_bare", "engine_vs_bare", "trainer_vs_engine"):
            x = src[key]
            assert x["ratio_of_medians"] > 0 and x["ratio_of_totals"] > 0 and x["paired_median"] > 0
            assert len(x["paired"]) == 2 and x["paired_min"] <= x["paired_median"] <= x["paired_max"]
    assert isinstance(r["meets_target"], bool) and r["target"] == 0.98
    # metrics.jsonl's images/s of the timed rounds: the trainer's own, the other loops' time taken out
    m = r["metrics_jsonl_images_per_s"]
    assert len(m["timed_rounds"]) == 2 and m["median"] > 0
    # the three loops train the same thing: the same loss in every round (float32 vs float64 sums apart)
    for name in ("engine", "bare"):
        agree = r["loss_agreement_with_trainer"][name]
        assert len(agree["trainer_round_losses"]) == 4  # 1 warm-up + 2 timed + 1 profiled round
        assert agree["max_relative_loss_difference"] < 1e-5, agree
    pieces = r["engine_pieces_cpu_ms"]  # what the engine adds per step at world size 1, timed alone
    for key in ("deepspeed_allreduce_gradients_ms", "deepspeed_clip_grad_norm_ms", "bare_clip_by_global_norm_ms",
                "torch_clip_grad_norm_ms", "deepspeed_zero_grad_ms", "torch_zero_grad_ms"):
        assert pieces[key] > 0, key
    prof = r["profile"]
    for name in ("trainer", "bare"):
        assert prof[name]["profiled_cpu_ms_per_step"] > 0 and prof[name]["top_self"] and prof[name]["loop_side"]
    assert any("train_micro_step" in row["function"] for row in prof["trainer"]["top_cumulative"])
    assert not (tmp_path / "run_widenet-digits").exists()  # the trainer's run directory was temporary
