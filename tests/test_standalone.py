"""The standalone inference model against the DeepSpeed models, and the evaluate CLI where
DeepSpeed cannot be imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import ds_widenet  # noqa: F401  (selects DeepSpeed's CPU accelerator before deepspeed is imported)
from ds_widenet.config import ConfigError, DataConfig, ModelConfig
from ds_widenet.export import load_exported, save_export, to_clean_names
from ds_widenet.models import build_model
from ds_widenet.routing_core import ModelOutput
from ds_widenet.standalone import build, deepspeed_top1_routes

from tests.test_export import tiny  # one tiny config per arch for both export and standalone tests

ROOT = Path(__file__).resolve().parents[1]


CASES = {
    "widenet": tiny(),
    "per_depth_gate": tiny(per_depth_gate=True),
    "bpr": tiny(router="bpr"),
    "vit_moe_bpr_k1": tiny("vit_moe", router="bpr", k=1),
    "expert_choice": tiny(router="expert_choice", eval_capacity_factor=1.0),
    "vit_moe_expert_choice_k1": tiny("vit_moe", router="expert_choice", k=1, eval_capacity_factor=2.0),
    "z_loss": tiny(z_loss_weight=1e-3),
    "deepspeed_k2_z_loss": tiny(router="deepspeed", z_loss_weight=1e-3),
    "vit": tiny("vit", pool="cls", pre_logits=True),
    "vit_moe": tiny("vit_moe", pool="cls"),
    "deepspeed_k1": tiny(router="deepspeed", k=1),
    "deepspeed_k2": tiny(router="deepspeed"),
    "vit_moe_deepspeed_k1": tiny("vit_moe", router="deepspeed", k=1),
    "paper_no_drop": tiny(drop_tokens=False),
    "deepspeed_k2_no_drop": tiny(router="deepspeed", drop_tokens=False),
}


def randomised(cfg: ModelConfig, seed: int = 4, scale: float = 0.3) -> torch.nn.Module:
    """A DeepSpeed model (ep_size 1) with every weight random, so routing is uneven and the
    capacity limit bites (the init zeroes the head and biases)."""
    model = build_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def assert_same_outputs(ref: ModelOutput, got: ModelOutput) -> None:
    """Logits within 1e-5 of the largest, the same aux loss, identical expert choices per depth."""
    assert (got.logits - ref.logits).abs().max() <= 1e-5 * ref.logits.abs().max()
    torch.testing.assert_close(got.aux_loss, ref.aux_loss, rtol=1e-6, atol=1e-7)
    assert (got.z_loss is None) == (ref.z_loss is None)
    if ref.z_loss is not None:
        torch.testing.assert_close(got.z_loss, ref.z_loss, rtol=1e-6, atol=1e-7)
    assert len(got.routing) == len(ref.routing)
    for depth, (a, b) in enumerate(zip(ref.routing, got.routing)):
        assert torch.equal(a.expert_index, b.expert_index), depth
        assert torch.equal(a.expert_tokens, b.expert_tokens), depth
        torch.testing.assert_close(b.dropped, a.dropped)
        torch.testing.assert_close(b.aux_loss, a.aux_loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b.entropy, a.entropy, rtol=1e-6, atol=1e-7)
        assert torch.equal(a.num_tokens, b.num_tokens)


@pytest.mark.parametrize("case,capacity", [(c, cap) for c in CASES for cap in ("default", "dropping")
                                           if cap == "default" or (CASES[c].moe and CASES[c].moe.drop_tokens)])
def test_the_standalone_model_computes_what_the_deepspeed_model_evaluates(tmp_path, case, capacity):
    cfg = CASES[case]
    if capacity == "dropping":  # a capacity factor low enough that every depth drops routes
        # (expert choice drops a token only when no expert takes it: fewer at the same factor)
        cfg = replace(cfg, moe=replace(cfg.moe, eval_capacity_factor=0.25 if cfg.moe.expert_choice else 0.5))
    model = randomised(cfg)
    standalone = load_exported(save_export(model.state_dict(), cfg, tmp_path / "m.safetensors"))
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    valid = torch.tensor([True, True, False, True, True, False])
    with torch.no_grad():
        for v in (None, valid):
            ref = model(x, sample_ids=torch.arange(6), valid=v)
            got = standalone(x, sample_ids=torch.arange(6), valid=v)
            assert_same_outputs(ref, got)
            if v is not None and ref.routing:
                assert (ref.routing[0].expert_index[:, ~valid] == -1).all()  # padding is not routed
    if capacity == "dropping":
        assert max(float(r.dropped) for r in ref.routing) > 0.05  # the capacity limit did drop routes
        assert min(float(r.dropped) for r in ref.routing) < 0.95


def test_deepspeeds_top1_gate_without_token_dropping_keeps_every_route():
    # Without padding only: DeepSpeed 0.19's top1gating with drop_tokens=False and a used_token
    # mask fails (its capacity becomes a float tensor that torch.topk refuses); ours keeps going.
    cfg = tiny(router="deepspeed", k=1, drop_tokens=False)
    model = randomised(cfg)
    standalone = build(cfg, device="meta")
    standalone.load_state_dict(to_clean_names(model.state_dict()), assign=True)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model(x), standalone(x)
    assert_same_outputs(ref, got)
    assert max(float(r.dropped) for r in got.routing) == 0.0


def test_fewer_tokens_than_min_capacity_is_an_error_for_deepspeeds_top1_gate():
    with pytest.raises(ValueError, match="min_capacity"):
        deepspeed_top1_routes(torch.randn(3, 4), 1.0, 4, None, True)


def test_bf16_evaluation_routes_as_the_deepspeed_model_does(tmp_path):
    cfg = CASES["widenet"]
    model = randomised(cfg)
    standalone = load_exported(save_export(model.state_dict(), cfg, tmp_path / "m.safetensors")).to(torch.bfloat16)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        ref, got = model.to(torch.bfloat16)(x), standalone(x)
    assert got.logits.dtype == torch.bfloat16
    assert torch.equal(ref.routing[0].expert_index, got.routing[0].expert_index)
    assert (got.logits.float() - ref.logits.float()).abs().max() <= 0.02 * ref.logits.float().abs().max()


# --------------------------------------------------------------------------------------------
# No DeepSpeed, no torch.distributed

CHECK = r"""
import sys, torch, torch.distributed as dist
def boom(*a, **k):
    raise AssertionError("torch.distributed was called")
for name in ("is_initialized", "get_world_size", "get_rank", "all_reduce", "all_to_all_single", "new_group"):
    setattr(dist, name, boom)
from ds_widenet.export import load_exported
import ds_widenet.standalone, ds_widenet.evaluate, ds_widenet.predict
m = load_exported(sys.argv[1])
out = m(torch.randn(3, 1, 8, 8), valid=torch.tensor([True, False, True]))
assert len(out.routing) == 3, out
bad = sorted(k for k in sys.modules if k == "deepspeed" or k.startswith("deepspeed."))
assert not bad, bad
print("ok")
"""


def blocked_deepspeed_env(tmp_path: Path) -> dict[str, str]:
    """An environment where `import deepspeed` raises ImportError (a stub package first on the path)."""
    stub = tmp_path / "stub" / "deepspeed"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ImportError("deepspeed blocked for this test")\n')
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join([str(stub.parent), str(ROOT)])
    return env


def test_the_stub_really_blocks_deepspeed(tmp_path):
    res = subprocess.run([sys.executable, "-c", "import deepspeed"], env=blocked_deepspeed_env(tmp_path), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "deepspeed blocked for this test" in res.stderr


def test_loading_and_running_an_export_imports_no_deepspeed_and_calls_no_torch_distributed(tmp_path):
    cfg = CASES["widenet"]
    out = save_export(randomised(cfg).state_dict(), cfg, tmp_path / "m.safetensors")
    # with DeepSpeed importable (and not imported: sys.modules is checked) and with it blocked
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(ROOT)}
    for env in (plain, blocked_deepspeed_env(tmp_path)):
        res = subprocess.run([sys.executable, "-c", CHECK, str(out)], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_the_evaluate_cli_runs_without_deepspeed_and_equals_the_deepspeed_models_evaluation(tmp_path):
    from ds_widenet.data import EvalSampler, build_datasets, build_loader
    from ds_widenet.evaluation import evaluate_loader

    cfg = replace(tiny(), num_classes=10, moe=replace(tiny().moe, eval_capacity_factor=1.0))
    model = randomised(cfg, scale=0.2)
    w = save_export(model.state_dict(), cfg, tmp_path / "digits.safetensors", data={"name": "digits"})
    _, test = build_datasets(DataConfig(name="digits", augment="none"), cfg, seed=0)
    loader = build_loader(test, EvalSampler(len(test), 128, 1, 0), 0)  # 360 images: the last batch is padded
    ref = evaluate_loader(model, loader, "cpu", torch.float32)

    env = blocked_deepspeed_env(tmp_path)
    cmd = [sys.executable, "-m", "ds_widenet.evaluate", "--weights", str(w), "--device", "cpu", "--batch", "128"]
    res = subprocess.run([*cmd, "--json"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["images"] == ref["eval_images"] == 360
    assert got["top1"] == ref["top1"]
    assert abs(got["eval_loss"] - ref["eval_loss"]) <= 1e-5 * ref["eval_loss"]
    assert got["expert_share_per_depth"] == ref["eval_expert_share_per_depth"]
    assert got["drop_rate_per_depth"] == ref["eval_drop_rate"] and max(ref["eval_drop_rate"]) > 0
    assert got["experts_changed_next_depth"] == ref["eval_route_change"]

    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith(f"top-1 {ref['top1']:.4f} on 360 images (digits)")
    assert "depth 2: expert share" in res.stdout


def test_the_evaluate_cli_reports_a_bad_export_in_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    bad.with_suffix(".json").write_text(json.dumps({"format": "ds-widenet-export-v2", "model": tiny().to_dict()}))
    res = subprocess.run([sys.executable, "-m", "ds_widenet.evaluate", "--weights", str(bad)],
                         env=blocked_deepspeed_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "bad.safetensors" in res.stderr and "corrupt" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_config_errors_from_the_standalone_path_are_config_errors():
    with pytest.raises(ConfigError):
        load_exported(Path("/nonexistent/model.safetensors"))
