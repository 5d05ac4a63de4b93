"""The DeepSpeed config schema read from the installed DeepSpeed: cross-checked against DeepSpeed's
own constants modules and pydantic models, so that a probe missing a key shows here and not as a
valid config refused."""
from __future__ import annotations

import pytest

from ds_widenet.ds_schema import deepspeed_schema

ds_config = pytest.importorskip("deepspeed.runtime.config")


def constants(module, prefix: str, exclude: tuple[str, ...] = ()) -> set[str]:
    """String values of `module`'s constants named PREFIX_*, less the *_DEFAULT / *_FORMAT ones."""
    return {v for k, v in vars(module).items() if k.startswith(prefix) and isinstance(v, str) and k not in exclude
            and not k.endswith(("_DEFAULT", "_FORMAT"))}


def test_top_level_holds_the_keys_deepspeeds_parser_and_initialize_read():
    from deepspeed.runtime import constants as C

    top = deepspeed_schema().top_level
    for key in (C.TRAIN_BATCH_SIZE, C.TRAIN_MICRO_BATCH_SIZE_PER_GPU, C.GRADIENT_ACCUMULATION_STEPS, C.GRADIENT_CLIPPING,
                C.STEPS_PER_PRINT, C.WALL_CLOCK_BREAKDOWN, C.DATA_TYPES, C.USE_DATA_BEFORE_EXPERT_PARALLEL,
                "zero_optimization", "bf16", "bfloat16", "fp16", "optimizer", "scheduler", "tensorboard", "csv_monitor",
                "wandb", "comet", "comms_logger", "flops_profiler", "activation_checkpointing"):
        assert key in top, key
    assert {"sequence_parallel_size", "data_parallel_size", "tensor_parallel"} <= top  # read by deepspeed.initialize
    assert "zero_optimisation" not in top and "moe" not in top and "enabled" not in top


def test_features_deepspeed_removed_are_not_valid_and_keep_deepspeeds_reason():
    schema = deepspeed_schema()
    assert "amp" in schema.removed and "amp" not in schema.top_level
    assert set(schema.removed) == set(ds_config._REMOVED_TOP_LEVEL_CONFIG_KEYS)
    assert "mics_shard_size" in schema.removed_in_section["zero_optimization"]


def test_pydantic_sections_are_the_models_deepspeed_validates_them_with():
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.monitor.config import CSVConfig, TensorBoardConfig, WandbConfig
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    sections = deepspeed_schema().sections
    for key, model in (("zero_optimization", DeepSpeedZeroConfig), ("bf16", DeepSpeedBF16Config),
                       ("fp16", DeepSpeedFP16Config), ("tensorboard", TensorBoardConfig), ("csv_monitor", CSVConfig),
                       ("wandb", WandbConfig), ("comms_logger", CommsLoggerConfig)):
        assert sections[key].parser == model.__name__, key
        assert set(model.model_fields) <= sections[key].keys, key
    zero = sections["zero_optimization"]
    assert "stage3_prefetch_bucket_size" in zero.keys and "prefetch_bucket_size" in zero.keys  # alias and name
    assert "device" in zero.nested["offload_optimizer"].keys


def test_dict_sections_the_project_checks_are_found_in_full():
    from deepspeed.profiling import constants as profiling
    from deepspeed.runtime import constants as C
    from deepspeed.runtime.activation_checkpointing import config as act

    sections = deepspeed_schema().sections
    assert sections["flops_profiler"].parser == "dict"
    assert sections["flops_profiler"].keys == constants(profiling, "FLOPS_PROFILER_", ("FLOPS_PROFILER",))
    assert sections["activation_checkpointing"].keys == constants(act, "ACT_CHKPT_", ("ACT_CHKPT",))
    assert sections["data_types"].keys == {C.GRAD_ACCUM_DTYPE, C.PARAM_DTYPE, C.BUFFER_DTYPE, C.KEEP_IN_FP32_MODULES}
