"""Export / load / fine-tune adaptation without processes (the multi-process paths are in
tests/distributed/test_checkpoint.py)."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

import ds_widenet  # noqa: F401
from ds_widenet.checkpoint import adapt_for_finetune, complete_checkpoints, export, load_exported, load_weights_into
from ds_widenet.config import ConfigError, ModelConfig, MoEConfig
from ds_widenet.models import build_model


def tiny(**kw) -> ModelConfig:
    return ModelConfig(arch="widenet", img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=16, depth=2,
                       num_heads=2, moe=MoEConfig(num_experts=4, k=2, expert_dim=32, min_capacity=1), **kw)


def fake_checkpoint(root, cfg: ModelConfig, step: int = 3, complete: bool = True):
    """A checkpoint directory as save_checkpoint lays it out, from an ep_size-1 model's weights."""
    model = build_model(cfg, seed=4)
    d = root / f"step{step}"
    (d / "weights").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "weights" / "rank0.safetensors"))
    (d / "meta.json").write_text(json.dumps({"step": step, "model": cfg.to_dict(), "layout": {}}))
    if complete:
        (d / "complete").write_text("ok\n")
    return model, d


def test_export_then_load_gives_the_same_model_without_an_engine(tmp_path):
    model, d = fake_checkpoint(tmp_path, tiny())
    out = export(d, tmp_path / "m.safetensors")
    loaded = load_exported(out)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits, rtol=0, atol=0)
    assert json.loads((tmp_path / "m.json").read_text())["model"]["depth"] == 2


def test_export_refuses_incomplete_checkpoints_and_existing_targets(tmp_path):
    _, d = fake_checkpoint(tmp_path, tiny(), complete=False)
    with pytest.raises(ConfigError, match="incomplete"):
        export(d, tmp_path / "m.safetensors")
    (d / "complete").write_text("ok\n")
    (tmp_path / "m.safetensors").write_bytes(b"old")
    with pytest.raises(ConfigError, match="--force"):
        export(d, tmp_path / "m.safetensors")
    assert (tmp_path / "m.safetensors").read_bytes() == b"old"
    export(d, tmp_path / "m.safetensors", force=True)
    assert load_exported(tmp_path / "m.safetensors") is not None


def test_a_corrupt_export_is_a_one_line_error(tmp_path):
    _, d = fake_checkpoint(tmp_path, tiny())
    out = export(d, tmp_path / "m.safetensors")
    out.write_bytes(out.read_bytes()[:64])
    with pytest.raises(ConfigError) as e:
        load_exported(out)
    assert "corrupt" in str(e.value) and "\n" not in str(e.value)


def test_only_complete_checkpoints_are_candidates_for_resume(tmp_path):
    fake_checkpoint(tmp_path, tiny(), step=5)
    fake_checkpoint(tmp_path, tiny(), step=10, complete=False)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step5"]


def test_finetune_adaptation_replaces_the_head_and_interpolates_position_embeddings():
    src_cfg = tiny()
    dst_cfg = replace(tiny(), num_classes=3, img_size=16, moe=replace(src_cfg.moe))
    src = build_model(src_cfg, seed=1).state_dict()
    adapted = adapt_for_finetune(src, src_cfg, dst_cfg)
    assert "head.weight" not in adapted
    assert adapted["pos_embed"].shape == (1, 64, 16)
    dst = build_model(dst_cfg, seed=2)
    missing = load_weights_into(dst, adapted, ep_size=1, ep_rank=0, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"]
    torch.testing.assert_close(dst.attn.qkv.weight, src["attn.qkv.weight"])
    # a 4x4 grid upsampled to 8x8 keeps the corner embeddings close to the originals
    grid = adapted["pos_embed"].reshape(8, 8, 16)
    assert torch.allclose(grid[0, 0], src["pos_embed"].reshape(4, 4, 16)[0, 0], atol=0.02)


def test_weights_map_to_the_right_global_experts_under_expert_parallelism():
    full = build_model(tiny(), seed=3).state_dict()
    half = build_model(tiny(), ep_size=2, ep_rank=1, seed=99)
    load_weights_into(half, full, ep_size=2, ep_rank=1)
    for i in range(2):
        torch.testing.assert_close(half.moe.local_experts[i].fc1.weight,
                                   full[f"moe.moe.deepspeed_moe.experts.deepspeed_experts.{2 + i}.fc1.weight"])
