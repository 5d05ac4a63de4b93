"""Bad input to the training entry point: one line naming the fix, a non-zero exit, no traceback,
nothing written; and a short real digits training with an accuracy floor."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.distributed.launch import ROOT, child_env, metrics, run_train, write_ds_config

RECIPE = ROOT / "ds_configs" / "digits_widenet.yaml"
DS_OK = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 32, "zero_optimization": {"stage": 0}}


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ds_widenet.train", *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    for n in needles:
        assert n in errors[0], errors[0]


@pytest.mark.parametrize("overrides,ds_extra,needles", [
    (["optim.learnin_rate=0.1"], {}, ["unknown recipe key", "optim.learnin_rate"]),
    (["parallel.ep_size=3"], {}, ["ep_size=3", "num_experts"]),
    (["parallel.ep_size=2"], {}, ["ep_size=2", "world size 1"]),
    ([], {"zero_optimization": {"stage": 3}}, ["stage 3"]),
    (["data.name=cifar10", "data.root=/nonexistent/cifar"], {}, ["data.root", "does not exist"]),
    (["train.gradient_clipping=1.0"], {}, ["DeepSpeed JSON", "gradient_clipping"]),
    ([], {"optimizer": {"type": "Adam", "params": {"lr": 0.1}}}, ["optimizer", "recipe"]),
    ([], {"train_batch_size": 60}, ["not divisible"]),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, overrides, ds_extra, needles):
    ds = write_ds_config(tmp_path / "ds.json", **{**DS_OK, **ds_extra})
    out = tmp_path / "run"
    res = run_cli(["--recipe", str(RECIPE), "--deepspeed_config", str(ds), "--out", str(out), *overrides])
    assert_one_line_error(res, *needles)
    assert not out.exists()


def test_an_existing_run_is_not_overwritten_without_the_flag(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    ds = write_ds_config(tmp_path / "ds.json", **DS_OK)
    res = run_cli(["--recipe", str(RECIPE), "--deepspeed_config", str(ds), "--out", str(out)])
    assert_one_line_error(res, "--overwrite")
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


TINY = ["model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.moe.expert_dim=64", "checkpoint.keep_last=1",
        "checkpoint.every_steps=2", "train.eval_interval=100"]


@pytest.mark.timeout(300)
def test_overwrite_deletes_the_old_runs_checkpoints_and_only_overwrite_does(tmp_path):
    ds = write_ds_config(tmp_path / "ds.json", **DS_OK)
    out = tmp_path / "run"
    run_train("python", 1, RECIPE, ds, out, TINY + ["schedule.max_steps=4"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step4"]
    (out / "metrics.jsonl").unlink()  # checkpoints alone still make it a run that is not overwritten silently
    res = run_cli(["--recipe", str(RECIPE), "--deepspeed_config", str(ds), "--out", str(out), *TINY])
    assert_one_line_error(res, "--overwrite")
    assert (out / "checkpoints" / "step4" / "complete").exists()
    # with the flag: a new run whose keep_last pruning and --resume auto cannot pick the old step4
    run_train("python", 1, RECIPE, ds, out, TINY + ["schedule.max_steps=2", "--overwrite"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step2"]
    assert (out / "checkpoints" / "step2" / "complete").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_input_under_the_deepspeed_launcher_is_still_one_line(tmp_path):
    ds = write_ds_config(tmp_path / "ds.json", **DS_OK)
    res = run_train("deepspeed", 2, RECIPE, ds, tmp_path / "run", ["parallel.ep_size=3"], check=False, timeout=240)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr + res.stdout
    errors = [ln for ln in (res.stderr + res.stdout).splitlines() if "error: parallel.ep_size=3" in ln]
    assert len(errors) == 1, res.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_short_digits_training_learns_and_keeps_every_expert_busy(tmp_path):
    ds = write_ds_config(tmp_path / "ds.json", **DS_OK)
    out = tmp_path / "run"
    run_train("python", 1, RECIPE, ds, out, ["schedule.epochs=12", "train.eval_interval=132"], timeout=540)
    final = json.loads((out / "final.json").read_text())
    assert final["eval_images"] == 360
    assert final["top1"] >= 0.85, final
    assert final["eval_min_expert_share"] >= 0.10, final
    train_rows = metrics(out)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5
    for key in ("step", "loss", "aux_loss", "lr", "images_per_sec"):
        assert key in train_rows[0]
    assert (out / "recipe.json").exists() and (out / "ds_config.json").exists()
    assert (out / "checkpoints" / "step264" / "complete").exists()
    assert (out / "checkpoints" / "step264" / "meta.json").exists()


def test_a_holdout_run_evaluates_held_out_training_images_and_logs_the_z_loss(tmp_path):
    ds = write_ds_config(tmp_path / "ds.json", **DS_OK)
    out = tmp_path / "run"
    run_train("python", 1, RECIPE, ds, out, ["schedule.max_steps=2", "data.holdout=100", "train.log_interval=1",
                                             "model.moe.z_loss_weight=0.001"], timeout=240)
    final = json.loads((out / "final.json").read_text())
    assert final["eval_images"] == 100 and final["eval_split"] == "holdout of 100 training images"
    evals = metrics(out, "eval")
    assert evals and all(r["eval_images"] == 100 for r in evals)
    # the router z-loss is logged at every log step: near-zero logits at the start give about ln(4)^2 = 1.9
    # per depth, 6 depths
    assert [r["step"] for r in metrics(out)] == [1, 2] and all(r["z_loss"] > 5.0 for r in metrics(out))


def test_a_non_finite_loss_stops_the_run_with_one_line(tmp_path):
    ds = write_ds_config(tmp_path / "ds.json", **DS_OK)
    res = run_cli(["--recipe", str(RECIPE), "--deepspeed_config", str(ds), "--out", str(tmp_path / "run"),
                   "optim.lr=1.0e+30", "schedule.warmup_steps=1", "schedule.max_steps=20"])
    assert_one_line_error(res, "non-finite loss", "optim.lr")


def tree_bytes(root) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bad_input_against_a_saved_run_is_one_line_and_leaves_every_saved_byte_as_it_was(tmp_path):
    ds = write_ds_config(tmp_path / "ds.json", **DS_OK)
    out = tmp_path / "run"
    run_train("python", 1, RECIPE, ds, out, TINY + ["schedule.max_steps=4", "checkpoint.keep_last=0"])
    ckpts = out / "checkpoints"
    exp = tmp_path / "m.safetensors"
    res = subprocess.run([sys.executable, "-m", "ds_widenet.export", str(ckpts), "--out", str(exp)], cwd=ROOT,
                         env=child_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    # the damaged inputs, each a copy (the originals are checked below)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(exp.read_bytes()[: exp.stat().st_size // 2])
    truncated.with_suffix(".json").write_text(exp.with_suffix(".json").read_text())
    other = tmp_path / "other.safetensors"  # an export of another architecture
    other.write_bytes(exp.read_bytes())
    cfg = json.loads(exp.with_suffix(".json").read_text())
    cfg["model"]["embed_dim"] = 48
    other.with_suffix(".json").write_text(json.dumps(cfg))
    broken_run = tmp_path / "broken"
    import shutil

    shutil.copytree(out, broken_run)
    newest = sorted((broken_run / "checkpoints").glob("step*"), key=lambda d: int(d.name[4:]))[-1]
    pickle = next(newest.glob("*model_states.pt"))
    pickle.write_bytes(pickle.read_bytes()[:100])
    misspelled = tmp_path / "typo.json"
    misspelled.write_text(json.dumps({**DS_OK, "zero_optimisation": {"stage": 2}}))
    before = tree_bytes(out)
    base = ["--recipe", str(RECIPE), "--deepspeed_config", str(ds)]
    cases = [  # (options, overrides, what the one line must name)
        (["--out", str(out), "--resume", "auto", "--deepspeed_config", str(misspelled)], [],
         ["zero_optimisation", "zero_optimization"]),
        (["--out", str(broken_run), "--resume", str(newest)], [], [pickle.name, "truncated"]),
        (["--out", str(tmp_path / "ft1"), "--init_from", str(truncated)], [], [truncated.name]),
        (["--out", str(tmp_path / "ft2"), "--init_from", str(other)], [], [other.name]),
        (["--out", str(out)], [], ["already holds a run"]),
        (["--out", str(out), "--resume", "auto"], ["parallel.ep_size=3"], ["ep_size=3"]),
    ]
    for opts, overrides, needles in cases:
        res = run_cli([*base, *opts, *TINY, *overrides])
        assert_one_line_error(res, *needles)
    assert tree_bytes(out) == before
    # --resume auto over the damaged run falls back to the previous complete checkpoint, with a notice
    res = run_cli([*base, "--out", str(broken_run), "--resume", "auto", *TINY, "schedule.max_steps=4"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"passed over damaged checkpoint(s): {pickle}" in res.stdout
    aside = broken_run / "checkpoints" / f"{newest.name}.superseded" / pickle.name
    assert aside.stat().st_size == 100  # the re-save of that step moved the damaged one aside, byte for byte
