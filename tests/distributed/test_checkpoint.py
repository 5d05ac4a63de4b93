"""Checkpoints under 2 processes, ep_size 2, ZeRO-2: exact resume, crash safety, export, reshard."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.support.launch import run_with_deadline

from .launch import ROOT, child_env, metrics, run_train, write_ds_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RECIPE = ROOT / "ds_configs" / "digits_widenet.yaml"
# router noise (the paper's, on by default), dropout, mixup, keyed augmentation, 2 loader workers
TINY = ["model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.moe.expert_dim=64",
        "model.dropout=0.1", "train.mixup_alpha=0.5", "data.augment=digits", "data.num_workers=2",
        "schedule.max_steps=20", "schedule.warmup_steps=3", "train.log_interval=1", "train.eval_interval=20",
        "checkpoint.every_steps=5", "checkpoint.keep_last=0"]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """20 uninterrupted steps with checkpoints every 5 (the reference for everything below)."""
    d = tmp_path_factory.mktemp("straight")
    ds = write_ds_config(d / "ds.json", train_batch_size=32, train_micro_batch_size_per_gpu=16,
                         zero_optimization={"stage": 2})
    run_train("torchrun", 2, RECIPE, ds, d / "run", TINY + ["parallel.ep_size=2"])
    return d


def test_resume_mid_epoch_is_bitwise_identical_to_straight_training(straight, tmp_path):
    ref = losses(straight / "run")
    assert sorted(ref) == list(range(1, 21))
    run_train("torchrun", 2, RECIPE, straight / "ds.json", tmp_path / "resumed",
              TINY + ["parallel.ep_size=2", "--resume", str(straight / "run" / "checkpoints" / "step10")])
    got = losses(tmp_path / "resumed")
    assert sorted(got) == list(range(11, 21))
    for s in got:
        assert got[s] == ref[s], (s, got[s], ref[s])  # bitwise: the JSON floats are equal


@pytest.mark.parametrize("fault,last_complete", [("save:10:1", 5), ("train:12:1", 10)])
def test_a_rank_killed_leaves_the_previous_checkpoint_usable_and_the_run_resumable(straight, tmp_path, fault,
                                                                                  last_complete):
    out = tmp_path / "run"
    args = ["--recipe", str(RECIPE), "--deepspeed_config", str(straight / "ds.json"), "--out", str(out),
            *TINY, "parallel.ep_size=2"]
    env = {**child_env(), "DS_WIDENET_FAULT": fault, "DS_WIDENET_TIMEOUT": "30"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "tests.support.train", *args]
    res = run_with_deadline(cmd, env, ROOT, 300)
    assert res.returncode != 0
    assert f"TEST-ONLY SWITCH ACTIVE: fault injection {fault}" in res.stderr  # announced loudly
    ckpts = out / "checkpoints"
    complete = sorted(int(d.name[4:]) for d in ckpts.glob("step*") if (d / "complete").exists())
    assert complete[-1] == last_complete, complete
    assert not (ckpts / "step15").exists()
    run_train("torchrun", 2, RECIPE, straight / "ds.json", out, TINY + ["parallel.ep_size=2", "--resume", "auto"])
    ref, got = losses(straight / "run"), losses(out)
    for s in range(last_complete + 1, 21):
        assert got[s] == ref[s], (s, got[s], ref[s])  # the resumed run redid the lost steps identically


def _export(ckpt, out, *extra):
    return subprocess.run([sys.executable, "-m", "ds_widenet.export", str(ckpt), "--out", str(out), *extra], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=120)


def test_export_gathers_every_expert_and_reproduces_the_engines_evaluation_where_deepspeed_is_absent(straight,
                                                                                                     tmp_path):
    # the straight run is ep_size 2 under ZeRO-2: each rank held half the experts
    out = tmp_path / "widenet.safetensors"
    res = _export(straight / "run" / "checkpoints", out)
    assert res.returncode == 0, res.stderr[-2000:]
    from safetensors.torch import load_file

    weights = load_file(str(out))
    assert not [k for k in weights if "deepspeed" in k]
    experts = {k for k in weights if k.startswith("moe.experts.") and k.endswith(".fc1.weight")}
    assert experts == {f"moe.experts.{e}.fc1.weight" for e in range(4)}  # both ranks' experts, by global id
    assert len({weights[k].sum().item() for k in experts}) == 4
    from tests.test_standalone import blocked_deepspeed_env

    res = subprocess.run([sys.executable, "-m", "ds_widenet.evaluate", "--weights", str(out), "--json"], cwd=ROOT,
                         env=blocked_deepspeed_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    engine = metrics(straight / "run", "eval")[-1]
    assert got["images"] == engine["eval_images"] == 360
    assert got["top1"] == engine["top1"]
    assert abs(got["eval_loss"] - engine["eval_loss"]) <= 1e-5 * engine["eval_loss"], (got, engine)


@pytest.mark.parametrize("world,ep", [(2, 1), (1, 1)])
def test_reshard_to_another_world_or_ep_size_continues_with_the_same_loss(straight, tmp_path, world, ep):
    launcher = "torchrun" if world == 2 else "python"
    run_train(launcher, world, RECIPE, straight / "ds.json", tmp_path / "run",
              TINY + [f"parallel.ep_size={ep}", "schedule.max_steps=20",
                      "--resume", str(straight / "run" / "checkpoints" / "step5")])
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("moments" in r.get("event", "") for r in rows), rows[:2]
    ref, got = losses(straight / "run"), losses(tmp_path / "run")
    assert abs(got[6] - ref[6]) <= 1e-5 * abs(ref[6]), (got[6], ref[6])
    # every later step tests the optimizer moments that came along (all parameter groups: see
    # deepspeed_internals.full_optimizer_state: without it 3 of 4 groups resumed with zero moments)
    for s in (7, 8, 9):
        assert abs(got[s] - ref[s]) <= 1e-5 * abs(ref[s]), (s, got[s], ref[s])


def test_bf16_export_holds_the_fp32_masters_and_reproduces_the_bf16_engines_evaluation(tmp_path):
    ds = write_ds_config(tmp_path / "ds.json", train_batch_size=32, train_micro_batch_size_per_gpu=16,
                         zero_optimization={"stage": 2}, bf16={"enabled": True})
    no_drops = "model.moe.eval_capacity_factor=8"  # every token fits: per-rank and whole-batch capacity agree
    run_train("torchrun", 2, RECIPE, ds, tmp_path / "run",
              TINY + ["parallel.ep_size=2", "schedule.max_steps=12", "checkpoint.every_steps=0", no_drops])
    out = tmp_path / "m.safetensors"
    assert _export(tmp_path / "run" / "checkpoints", out).returncode == 0
    from safetensors.torch import load_file

    weights = load_file(str(out))
    bf16_module = torch.load(tmp_path / "run" / "checkpoints" / "step12" / "mp_rank_00_model_states.pt",
                             weights_only=False)["module"]
    w = weights["attn.qkv.weight"]
    assert w.dtype == torch.float32 and bf16_module["attn.qkv.weight"].dtype == torch.bfloat16
    assert torch.equal(w.to(torch.bfloat16), bf16_module["attn.qkv.weight"])  # the bf16 copy is the rounded master
    assert not torch.equal(w, bf16_module["attn.qkv.weight"].float())  # and the master holds more than it

    # plain PyTorch, one process, all experts local, cast to bf16 as the engine held them
    res = subprocess.run([sys.executable, "-m", "ds_widenet.evaluate", "--weights", str(out), "--json", "--dtype",
                          "bf16", "--eval_capacity_factor", "8"], cwd=ROOT, env=child_env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    engine = metrics(tmp_path / "run", "eval")[-1]
    assert got["images"] == engine["eval_images"] == 360 and got["top1"] == engine["top1"]
    assert abs(got["eval_loss"] - engine["eval_loss"]) <= 1e-5 * engine["eval_loss"], (got, engine)
    # depth 0 routes identically; later depths may flip a near-tied choice or two (of 11520), because a
    # bf16 matmul's rounding depends on its shape and the engine's experts see both ranks' tokens
    assert got["expert_share_per_depth"][0] == engine["eval_expert_share_per_depth"][0]
    for a, b in zip(got["expert_share_per_depth"], engine["eval_expert_share_per_depth"]):
        assert max(abs(x - y) for x, y in zip(a, b)) <= 5e-4, (a, b)
    assert max(got["drop_rate_per_depth"]) == max(engine["eval_drop_rate"]) == 0.0


def test_bad_checkpoints_and_targets_are_one_line_errors_and_nothing_is_lost(straight, tmp_path):
    import shutil

    ckpts = tmp_path / "checkpoints"
    shutil.copytree(straight / "run" / "checkpoints", ckpts)
    # an export target that exists
    target = tmp_path / "exists.safetensors"
    target.write_bytes(b"keep me")
    res = _export(ckpts, target)
    assert res.returncode == 2 and "--force" in res.stderr and target.read_bytes() == b"keep me"
    # a missing tag
    res = _export(ckpts, tmp_path / "a.safetensors", "--tag", "step7")
    assert res.returncode == 2 and "step7" in res.stderr and "Traceback" not in res.stderr
    # a truncated shard
    shard = ckpts / "step20" / "weights" / "rank1.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    res = _export(ckpts, tmp_path / "b.safetensors", "--tag", "step20")
    assert res.returncode == 2 and "corrupt" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b.safetensors").exists()
    # a checkpoint of another model
    res = subprocess.run([sys.executable, "-m", "ds_widenet.train", "--recipe", str(RECIPE), "--deepspeed_config",
                          str(straight / "ds.json"), "--out", str(tmp_path / "r"), *TINY, "model.depth=3",
                          "--resume", str(ckpts / "step10")], cwd=ROOT, env=child_env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "another model" in res.stderr and "depth" in res.stderr


def test_finetune_from_an_export_at_another_image_size(straight, tmp_path):
    out = tmp_path / "w.safetensors"
    assert _export(straight / "run" / "checkpoints", out).returncode == 0
    run_train("python", 1, RECIPE, straight / "ds.json", tmp_path / "ft",
              TINY + ["model.img_size=16", "schedule.max_steps=3", "data.num_workers=0", "--init_from", str(out)])
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert any("position embeddings interpolated to 16px" in r.get("event", "") for r in rows)
    assert metrics(tmp_path / "ft")[-1]["step"] == 3
