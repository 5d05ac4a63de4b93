"""Recipe parsing and the one validation point where ep_size, experts, world, ZeRO and batch meet."""
from __future__ import annotations

import json

import pytest

from ds_widenet.config import (ConfigError, apply_overrides, derived_steps, load_ds_config, load_recipe, recipe_from_dict,
                               resolve_batch, validate)

DS = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 32, "zero_optimization": {"stage": 1}}


def recipe(**model_moe):
    return recipe_from_dict({"model": {"preset": "widenet-digits", "moe": model_moe}})


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_preset_with_overrides_resolves_and_records_the_preset():
    r = recipe_from_dict({"model": {"preset": "widenet-digits", "depth": 4, "moe": {"k": 1}}})
    assert r.model.depth == 4 and r.model.moe.k == 1 and r.model.moe.num_experts == 4
    assert r.model.preset == "widenet-digits"


def test_unknown_recipe_key_names_the_valid_keys():
    with pytest.raises(ConfigError) as e:
        recipe_from_dict({"optim": {"learning_rate": 0.1}})
    assert "optim.learning_rate" in one_line(e) and "lr" in str(e.value)


@pytest.mark.parametrize("key,owner", [("batch_size", "train_micro_batch_size_per_gpu"),
                                       ("gradient_clipping", "gradient_clipping"), ("bf16", "bf16.enabled")])
def test_a_deepspeed_setting_in_the_recipe_is_refused_with_its_json_key(key, owner):
    with pytest.raises(ConfigError) as e:
        recipe_from_dict({"train": {key: 1}})
    assert "DeepSpeed JSON" in one_line(e) and owner in str(e.value)


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_optimizer_or_scheduler_in_the_json_is_refused(section):
    with pytest.raises(ConfigError) as e:
        validate(recipe(), {**DS, section: {"type": "Adam"}}, world=2)
    assert "recipe" in one_line(e)


def test_ep_size_must_divide_experts_and_world():
    r = recipe()
    r.parallel.ep_size = 3
    with pytest.raises(ConfigError, match="num_experts"):
        validate(r, DS, world=3)
    r.parallel.ep_size = 4
    with pytest.raises(ConfigError, match="world size 2"):
        validate(r, DS, world=2)
    r.parallel.ep_size = 2
    assert validate(r, DS, world=2).grad_accum == 1


def test_zero_stage_3_with_moe_is_refused():
    with pytest.raises(ConfigError) as e:
        validate(recipe(), {**DS, "zero_optimization": {"stage": 3}}, world=1)
    assert "stage 3" in one_line(e)


def test_lamb_runs_with_zero_partitions_but_not_with_the_bf16_optimizer_layout():
    r = recipe_from_dict({"model": {"preset": "widenet-digits"}, "optim": {"name": "lamb"}})
    validate(r, DS, world=1)  # ZeRO-1: the ZeRO-aware LAMB
    bf16_opt = {**DS, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
    with pytest.raises(ConfigError, match="BF16_Optimizer"):
        validate(r, bf16_opt, world=1)


def test_batch_triplet_is_resolved_like_deepspeed_and_mismatches_are_one_line_errors():
    assert resolve_batch({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 16}, 2).grad_accum == 2
    assert resolve_batch({"train_micro_batch_size_per_gpu": 16}, 4).global_batch == 64
    with pytest.raises(ConfigError) as e:
        resolve_batch({"train_batch_size": 60, "train_micro_batch_size_per_gpu": 16}, 2)
    assert "not divisible" in one_line(e)
    with pytest.raises(ConfigError):
        resolve_batch({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 16,
                       "gradient_accumulation_steps": 3}, 2)


def test_overrides_parse_yaml_values_into_nested_sections():
    d = apply_overrides({"optim": {"lr": 1}}, ["optim.lr=0.5", "model.moe.k=1", "train.mixup_alpha=0"])
    assert d == {"optim": {"lr": 0.5}, "model": {"moe": {"k": 1}}, "train": {"mixup_alpha": 0}}
    with pytest.raises(ConfigError):
        apply_overrides({}, ["optim.lr"])


def test_missing_recipe_file_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_recipe(tmp_path / "nope.yaml")
    assert "not found" in one_line(e)


def test_schedule_steps_follow_epochs_and_the_global_batch():
    r = recipe_from_dict({"model": {"preset": "widenet-digits"}, "schedule": {"epochs": 3, "warmup_epochs": 1}})
    layout = resolve_batch({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 32}, 2)
    assert derived_steps(r, 1437, layout) == (22, 66, 22)


# --------------------------------------------------------------------------------------------
# DeepSpeed JSON keys: checked against the keys the installed DeepSpeed reads (ds_widenet/ds_schema.py)


def write_ds(tmp_path, cfg: dict) -> str:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({**DS, **cfg}))
    return str(path)


def test_a_misspelled_top_level_deepspeed_key_is_refused_with_the_nearest_valid_key(tmp_path):
    path = write_ds(tmp_path, {"zero_optimisation": {"stage": 2}})  # DeepSpeed would train with ZeRO-0
    with pytest.raises(ConfigError) as e:
        load_ds_config(path)
    assert one_line(e) == ("DeepSpeed config key 'zero_optimisation' is not a DeepSpeed setting: "
                           f"did you mean 'zero_optimization'? (fix the key in {path})")


def test_a_top_level_key_like_no_deepspeed_setting_is_refused(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_ds_config(write_ds(tmp_path, {"xyzzy": 1}))
    assert "'xyzzy' is not a DeepSpeed setting" in one_line(e) and "did you mean" not in str(e.value)


def test_a_misspelled_key_inside_zero_optimization_names_its_section_and_the_nearest_key(tmp_path):
    path = write_ds(tmp_path, {"zero_optimization": {"stagee": 2}})
    with pytest.raises(ConfigError) as e:
        load_ds_config(path)
    assert one_line(e) == ("DeepSpeed config key 'zero_optimization.stagee' is not a DeepSpeed setting in section "
                           f"'zero_optimization': did you mean 'stage'? (fix the key in {path})")


@pytest.mark.parametrize("cfg,path,nearest", [
    ({"bf16": {"enable": True}}, "bf16.enable", "enabled"),
    ({"fp16": {"loss_scale_windw": 100}}, "fp16.loss_scale_windw", "loss_scale_window"),
    ({"tensorboard": {"output_pth": "tb"}}, "tensorboard.output_pth", "output_path"),
    ({"csv_monitor": {"job_nam": "x"}}, "csv_monitor.job_nam", "job_name"),
    ({"wandb": {"projekt": "x"}}, "wandb.projekt", "project"),
    ({"comms_logger": {"verbos": True}}, "comms_logger.verbos", "verbose"),
    ({"flops_profiler": {"enabeld": True}}, "flops_profiler.enabeld", "enabled"),
    ({"data_types": {"grad_acum_dtype": "fp32"}}, "data_types.grad_acum_dtype", "grad_accum_dtype"),
    ({"activation_checkpointing": {"partition_activation": True}}, "activation_checkpointing.partition_activation",
     "partition_activations"),
    ({"zero_optimization": {"stage": 1, "offload_optimizer": {"devic": "cpu"}}}, "zero_optimization.offload_optimizer.devic",
     "device"),
])
def test_a_misspelled_key_in_every_section_the_project_uses_is_refused(tmp_path, cfg, path, nearest):
    with pytest.raises(ConfigError) as e:
        load_ds_config(write_ds(tmp_path, cfg))
    section = path.rsplit(".", 1)[0]
    assert f"'{path}' is not a DeepSpeed setting in section '{section}': did you mean '{nearest}'?" in one_line(e)


def test_rarely_used_deepspeed_keys_and_aliases_are_accepted(tmp_path):
    cfg = {"zero_optimization": {"stage": 2, "round_robin_gradients": True, "stage3_prefetch_bucket_size": 1000,
                                 "prefetch_bucket_size": 1000, "offload_optimizer": {"device": "none", "pin_memory": True}},
           "bf16": {"enabled": True, "immediate_grad_update": True}, "fp16": {"enabled": False, "hysteresis": 2},
           "comms_logger": {"enabled": False, "prof_ops": ["all_reduce"]}, "wandb": {"enabled": False, "team": "t"},
           "flops_profiler": {"enabled": False, "top_modules": 3}, "data_types": {"grad_accum_dtype": "fp32"},
           "activation_checkpointing": {"cpu_checkpointing": False}, "dataloader_drop_last": False,
           "wall_clock_breakdown": False, "memory_breakdown": False, "sequence_parallel_size": 1}
    assert load_ds_config(write_ds(tmp_path, cfg))["zero_optimization"]["round_robin_gradients"] is True


def test_a_feature_deepspeed_removed_is_refused_with_deepspeeds_reason(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_ds_config(write_ds(tmp_path, {"amp": {"enabled": True}}))
    assert "'amp' is a feature deepspeed" in one_line(e) and "removed" in str(e.value)


@pytest.mark.parametrize("section", ["optimizer", "scheduler", "moe"])
def test_sections_deepspeed_reads_but_the_project_refuses_keep_their_validate_message(tmp_path, section):
    ds = load_ds_config(write_ds(tmp_path, {section: {"type": "Adam", "params": {"lr": 0.1}}}))
    with pytest.raises(ConfigError) as e:
        validate(recipe(), ds, world=2)
    assert "recipe" in one_line(e)


def test_use_data_before_expert_parallelism_is_refused():
    r = recipe()
    r.parallel.ep_size = 2
    with pytest.raises(ConfigError) as e:
        validate(r, {**DS, "use_data_before_expert_parallelism": True}, world=2)
    assert "remove the key" in one_line(e) and "use_data_before_expert_parallelism" in str(e.value)
    assert validate(r, {**DS, "use_data_before_expert_parallelism": False}, world=2).world == 2


def test_deepspeeds_old_bfloat16_section_is_refused_because_the_project_reads_bf16():
    with pytest.raises(ConfigError) as e:
        validate(recipe(), {**DS, "bfloat16": {"enabled": True}}, world=2)
    assert "rename it to 'bf16'" in one_line(e)


def test_a_key_set_twice_in_the_deepspeed_json_is_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"train_micro_batch_size_per_gpu": 32, "zero_optimization": {"stage": 1, "stage": 2}}')
    with pytest.raises(ConfigError) as e:
        load_ds_config(path)
    assert "'stage' twice" in one_line(e)
