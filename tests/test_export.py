"""Exports without processes: clean names both ways, v1 compatibility, one-line load errors,
fine-tune adaptation, the JSON's records (preprocess, class names, timm kwargs) and timm parity.
(The multi-process export of an ep_size-2 ZeRO-2 run is in tests/distributed/test_checkpoint.py.)"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ds_widenet  # noqa: F401  (selects DeepSpeed's CPU accelerator before deepspeed is imported)
from ds_widenet.config import ConfigError, ModelConfig, MoEConfig
from ds_widenet.export import (EXPORT_FORMAT, EXPORT_FORMAT_V1, adapt_for_finetune, clean_name, deepspeed_name,
                               expected_weights, export, load_exported, read_export, save_export, timm_kwargs,
                               to_clean_names, to_deepspeed_names)
from ds_widenet.models import build_model
from ds_widenet.reshard import load_weights_into


def tiny(arch: str = "widenet", pool: str = "avg", pre_logits: bool = False, **moe_kw: Any) -> ModelConfig:
    moe = None if arch == "vit" else MoEConfig(**{"num_experts": 4, "k": 2, "expert_dim": 32, "min_capacity": 1,
                                                  **moe_kw})
    return ModelConfig(arch=arch, img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=16, depth=3,
                       num_heads=2, mlp_dim=24, moe=moe, moe_last_n=2, pool=pool, pre_logits=pre_logits)


ARCHS = {
    "widenet": tiny(),
    "per_depth_gate": tiny(per_depth_gate=True),
    "vit": tiny("vit", pool="cls", pre_logits=True),
    "vit_avg": tiny("vit"),
    "vit_moe": tiny("vit_moe", pool="cls"),
}


def randomised(cfg: ModelConfig, seed: int = 4) -> torch.nn.Module:
    """A DeepSpeed model with every weight random (the init zeroes the head and biases)."""
    model = build_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def fake_checkpoint(root: Path, cfg: ModelConfig, step: int = 3, complete: bool = True,
                    recipe: Optional[dict[str, Any]] = None) -> tuple[torch.nn.Module, Path]:
    """A checkpoint directory as save_checkpoint lays it out, from an ep_size-1 model's weights."""
    model = randomised(cfg)
    d = root / f"step{step}"
    (d / "weights").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "weights" / "rank0.safetensors"))
    meta = {"step": step, "model": cfg.to_dict(), "layout": {}}
    if recipe is not None:
        meta["recipe"] = recipe
    (d / "meta.json").write_text(json.dumps(meta))
    if complete:
        (d / "complete").write_text("ok\n")
    return model, d


def images(b: int = 3) -> torch.Tensor:
    return torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("arch", list(ARCHS))
def test_clean_names_round_trip_exactly_and_match_the_standalone_model(arch):
    cfg = ARCHS[arch]
    ds = build_model(cfg, device="meta").state_dict()
    clean = to_clean_names(ds)
    assert len(clean) == len(ds)
    assert not [k for k in clean if "deepspeed" in k]
    assert {k: tuple(v.shape) for k, v in clean.items()} == expected_weights(cfg)
    back = to_deepspeed_names(clean, cfg)
    assert list(back) == list(ds) and all(back[k] is ds[k] for k in ds)
    # each mapping leaves names of its own side alone, so v1 and v2 inputs both work
    assert to_clean_names(clean) == clean and to_deepspeed_names(ds, cfg) == ds


def test_clean_names_follow_timm_and_the_widenet_structure():
    assert clean_name("moe.moe.deepspeed_moe.experts.deepspeed_experts.3.fc1.weight") == "moe.experts.3.fc1.weight"
    assert clean_name("moe.moe.deepspeed_moe.gate.wg.weight") == "moe.gate.weight"
    assert clean_name("blocks.5.ffn.moe.deepspeed_moe.experts.deepspeed_experts.0.fc2.bias") == \
        "blocks.5.mlp.experts.0.fc2.bias"
    assert clean_name("blocks.5.ffn.moe.deepspeed_moe.gate.wg.weight") == "blocks.5.mlp.gate.weight"
    assert clean_name("blocks.3.ffn.mlp.fc1.weight") == "blocks.3.mlp.fc1.weight"
    assert clean_name("pre_logits.0.weight") == "pre_logits.fc.weight"
    for same in ("attn.qkv.weight", "attn_norms.2.weight", "moe_norms.0.bias", "blocks.1.norm1.weight",
                 "blocks.1.attn.proj.bias", "patch_embed.proj.weight", "pos_embed", "cls_token", "norm.weight",
                 "head.bias"):
        assert clean_name(same) == same == deepspeed_name(same)
    widenet = expected_weights(tiny())
    assert {"moe.gate.weight", "moe.experts.3.fc2.bias", "attn_norms.2.weight", "moe_norms.2.bias"} <= set(widenet)
    assert widenet["moe.gate.weight"] == (4, 16)
    assert expected_weights(tiny(per_depth_gate=True))["moe.gate.weight"] == (3 * 4, 16)  # depth i: rows 4i..4i+3


def test_to_deepspeed_names_refuses_a_weight_of_another_model():
    clean = to_clean_names(build_model(tiny("vit_moe"), device="meta").state_dict())
    with pytest.raises(ConfigError, match="blocks.0.norm1.weight.*widenet"):
        to_deepspeed_names(clean, tiny())


# --------------------------------------------------------------------------------------------
# Export and load


def test_export_then_load_gives_the_same_model_without_an_engine(tmp_path):
    model, d = fake_checkpoint(tmp_path, tiny())
    out = export(d, tmp_path / "m.safetensors")
    loaded = load_exported(out)
    x = images()
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-6, atol=0)
    info = json.loads((tmp_path / "m.json").read_text())
    assert info["format"] == EXPORT_FORMAT and info["step"] == 3 and info["model"]["depth"] == 3
    assert "preprocess" not in info and "timm" not in info  # no recipe in this checkpoint; not a ViT
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["format"] == EXPORT_FORMAT
        assert not [k for k in f.keys() if "deepspeed" in k]


def test_export_records_the_recipes_preprocessing_and_class_names(tmp_path):
    from ds_widenet.data import load_digits_split

    _, d = fake_checkpoint(tmp_path, replace(tiny(), num_classes=10), recipe={"data": {"name": "digits"}})
    export(d, tmp_path / "m.safetensors")
    info = json.loads((tmp_path / "m.json").read_text())
    x_train = load_digits_split()[0]
    assert info["preprocess"] == {"data": "digits", "mean": [float(x_train.mean())], "std": [float(x_train.std())],
                                  "resize": "square"}
    assert info["class_names"] == [str(i) for i in range(10)]


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


def test_export_refuses_a_checkpoint_missing_a_weight(tmp_path):
    _, d = fake_checkpoint(tmp_path, tiny())
    shard = d / "weights" / "rank0.safetensors"
    from safetensors.torch import load_file

    w = load_file(str(shard))
    del w["moe.moe.deepspeed_moe.experts.deepspeed_experts.2.fc1.weight"]
    save_file(w, str(shard))
    with pytest.raises(ConfigError, match="lacks 1 weight.*moe.experts.2.fc1.weight"):
        export(d, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def _v1_export(tmp_path: Path, cfg: ModelConfig) -> tuple[torch.nn.Module, Path]:
    """An export as ds-widenet wrote them before v2: DeepSpeed module names, format v1."""
    model = randomised(cfg)
    out = tmp_path / "v1.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out),
              metadata={"format": EXPORT_FORMAT_V1, "step": "7"})
    out.with_suffix(".json").write_text(json.dumps({"format": EXPORT_FORMAT_V1, "step": 7, "model": cfg.to_dict()}))
    return model, out


@pytest.mark.parametrize("arch", ["widenet", "vit", "vit_moe"])
def test_v1_exports_in_deepspeed_names_still_load(tmp_path, arch):
    model, out = _v1_export(tmp_path, ARCHS[arch])
    weights, cfg = read_export(out)
    assert not [k for k in weights if "deepspeed" in k] and cfg == ARCHS[arch]
    x = images()
    torch.testing.assert_close(load_exported(out)(x).logits, model(x).logits, rtol=1e-6, atol=0)


def _one_line(e: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_a_truncated_or_corrupt_export_is_a_one_line_error_naming_the_file(tmp_path):
    _, d = fake_checkpoint(tmp_path, tiny())
    out = export(d, tmp_path / "m.safetensors")
    good = out.read_bytes()
    out.write_bytes(good[:64])
    with pytest.raises(ConfigError) as e:
        load_exported(out)
    _one_line(e, "m.safetensors", "corrupt", "re-export")
    out.write_bytes(b"\x00" * 8 + good[8:])  # a broken header length
    with pytest.raises(ConfigError) as e:
        load_exported(out)
    _one_line(e, "m.safetensors", "corrupt")


def test_a_missing_or_corrupt_json_is_a_one_line_error(tmp_path):
    _, d = fake_checkpoint(tmp_path, tiny())
    out = export(d, tmp_path / "m.safetensors")
    cfg_file = out.with_suffix(".json")
    text = cfg_file.read_text()
    cfg_file.unlink()
    with pytest.raises(ConfigError) as e:
        load_exported(out)
    _one_line(e, "m.json", "missing", "ds_widenet.export")
    cfg_file.write_text(text[: len(text) // 2])
    with pytest.raises(ConfigError) as e:
        load_exported(out)
    _one_line(e, "m.json", "corrupt")
    cfg_file.write_text(json.dumps({"format": EXPORT_FORMAT}))
    with pytest.raises(ConfigError) as e:
        load_exported(out)
    _one_line(e, "m.json", "model")
    cfg_file.write_text(json.dumps({"format": "ds-widenet-export-v9", "model": tiny().to_dict()}))
    with pytest.raises(ConfigError) as e:
        load_exported(out)
    _one_line(e, "v9", "upgrade")
    cfg_file.write_text(json.dumps({"format": EXPORT_FORMAT, "model": {**tiny().to_dict(), "depth": "three"}}))
    with pytest.raises(ConfigError) as e:
        load_exported(out)
    _one_line(e, "m.json", "depth")
    with pytest.raises(ConfigError) as e:
        load_exported(tmp_path / "nothing.safetensors")
    _one_line(e, "nothing.safetensors", "does not exist")


def test_weights_that_do_not_match_the_config_are_one_line_errors_naming_a_key(tmp_path):
    _, d = fake_checkpoint(tmp_path, tiny())
    out = export(d, tmp_path / "m.safetensors")
    cfg_file = out.with_suffix(".json")
    info = json.loads(cfg_file.read_text())
    for change, words in [({"depth": 4}, ["lacks", "attn_norms.3.", "m.json"]),
                          ({"depth": 2}, ["does not know", "attn_norms.2.", "m.json"]),
                          ({"num_classes": 7}, ["head.", "shape", "(5,", "(7,"])]:
        cfg_file.write_text(json.dumps({**info, "model": {**info["model"], **change}}))
        with pytest.raises(ConfigError) as e:
            load_exported(out)
        _one_line(e, "m.safetensors", *words)


def test_overrides_change_what_does_not_change_the_weights(tmp_path):
    _, d = fake_checkpoint(tmp_path, tiny())
    out = export(d, tmp_path / "m.safetensors")
    m = load_exported(out, overrides={"moe": {"eval_capacity_factor": 0.25}})
    assert m.cfg.moe.eval_capacity_factor == 0.25 and m.cfg.moe.k == 2


def test_an_export_evaluates_with_bpr_at_a_low_capacity_and_a_deepspeed_gate_is_refused(tmp_path):
    from ds_widenet.config import DataConfig
    from ds_widenet.evaluate import evaluate_exported

    _, d = fake_checkpoint(tmp_path, tiny())
    out = export(d, tmp_path / "m.safetensors")
    low = {"eval_capacity_factor": 0.5, "min_capacity": 1}
    paper = load_exported(out, overrides={"moe": low})
    bpr = load_exported(out, overrides={"moe": {**low, "router": "bpr"}})
    x = images(8)
    a, b = paper(x), bpr(x)
    # depth 0 (the same input): as many routes kept per expert, but other tokens kept
    assert a.routing[0].expert_tokens.tolist() == b.routing[0].expert_tokens.tolist()
    assert a.routing[0].dropped > 0 and not torch.equal(a.routing[0].expert_index, b.routing[0].expert_index)
    res = evaluate_exported(out, DataConfig(name="synthetic", augment="none"), "cpu", 64, 0.5, "fp32", "bpr")
    assert 0.0 <= res["top1"] <= 1.0 and res["images"] > 0
    _, d2 = fake_checkpoint(tmp_path / "ds", tiny(router="deepspeed"))
    out2 = export(d2, tmp_path / "ds.safetensors")
    with pytest.raises(ConfigError, match="router=deepspeed"):
        evaluate_exported(out2, DataConfig(name="synthetic", augment="none"), "cpu", 64, None, "fp32", "bpr")


# --------------------------------------------------------------------------------------------
# Fine-tuning (the trainer's --init_from: read_export -> adapt_for_finetune -> to_deepspeed_names)


def test_finetune_adaptation_replaces_the_head_and_interpolates_position_embeddings(tmp_path):
    src_cfg = tiny()
    src_model = build_model(src_cfg, seed=1)  # the init's smooth-enough position embeddings (std 0.02)
    out = save_export(src_model.state_dict(), src_cfg, tmp_path / "m.safetensors")
    dst_cfg = replace(tiny(), num_classes=3, img_size=16, moe=replace(src_cfg.moe))
    weights, read_cfg = read_export(out)
    assert read_cfg == src_cfg
    adapted = adapt_for_finetune(weights, read_cfg, dst_cfg)
    assert "head.weight" not in adapted
    assert adapted["pos_embed"].shape == (1, 64, 16)
    dst = build_model(dst_cfg, seed=2)
    missing = load_weights_into(dst, to_deepspeed_names(adapted, dst_cfg), ep_size=1, ep_rank=0, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"]
    src = src_model.state_dict()
    torch.testing.assert_close(dst.attn.qkv.weight, src["attn.qkv.weight"])
    torch.testing.assert_close(dst.moe.local_experts[3].fc2.weight,
                               src["moe.moe.deepspeed_moe.experts.deepspeed_experts.3.fc2.weight"])
    # a 4x4 grid upsampled to 8x8 keeps the corner embeddings close to the originals
    grid = adapted["pos_embed"].reshape(8, 8, 16)
    assert torch.allclose(grid[0, 0], src["pos_embed"].reshape(4, 4, 16)[0, 0], atol=0.02)


def test_an_export_loads_into_an_expert_parallel_deepspeed_model_under_global_ids(tmp_path):
    cfg = tiny()
    full = randomised(cfg).state_dict()
    weights, _ = read_export(save_export(full, cfg, tmp_path / "m.safetensors"))
    half = build_model(cfg, ep_size=2, ep_rank=1, seed=99)
    load_weights_into(half, to_deepspeed_names(weights, cfg), ep_size=2, ep_rank=1)
    for i in range(2):
        torch.testing.assert_close(half.moe.local_experts[i].fc1.weight, weights[f"moe.experts.{2 + i}.fc1.weight"])


# --------------------------------------------------------------------------------------------
# timm


def test_timm_kwargs_are_recorded_for_dense_vits_only(tmp_path):
    kw, _ = timm_kwargs(tiny("vit", pool="cls"))
    assert kw == {"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 5, "embed_dim": 16, "depth": 3,
                  "num_heads": 2, "mlp_ratio": 1.5, "qkv_bias": True, "class_token": True, "global_pool": "token",
                  "fc_norm": False, "no_embed_class": False}
    assert timm_kwargs(tiny("vit"))[0]["global_pool"] == "avg"
    kw, reason = timm_kwargs(tiny("vit", pre_logits=True))
    assert kw is None and "pre_logits" in reason
    assert timm_kwargs(tiny("vit_moe"))[0] is None
    out = save_export(randomised(tiny("vit")).state_dict(), tiny("vit"), tmp_path / "m.safetensors")
    assert json.loads(out.with_suffix(".json").read_text())["timm"]["kwargs"]["global_pool"] == "avg"


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_a_vit_export_loads_into_timm_strictly_with_the_same_logits(tmp_path, pool):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    cfg = tiny("vit", pool=pool)
    model = randomised(cfg)
    out = save_export(model.state_dict(), cfg, tmp_path / "m.safetensors")
    from safetensors.torch import load_file

    kwargs = json.loads(out.with_suffix(".json").read_text())["timm"]["kwargs"]
    vit = timm_vit.VisionTransformer(**kwargs).eval()
    vit.load_state_dict(load_file(str(out)), strict=True)
    assert all(m.eps == 1e-6 for m in vit.modules() if isinstance(m, torch.nn.LayerNorm))
    x = images(4)
    with torch.no_grad():
        ref, got = model(x).logits, vit(x)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
