"""The trainer's pieces that need no process group: the logged gradient norm, the hook interface
test entry points use, the run-time warning when test-only switches are on."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

import ds_widenet  # noqa: F401
from ds_widenet.config import Recipe
from ds_widenet.trainer import Trainer


def trainer_with(engine, ds_config=None, log_now=True) -> Trainer:
    t = Trainer.__new__(Trainer)
    t.plan = SimpleNamespace(ds_config=ds_config or {}, recipe=Recipe())
    t.recipe = t.plan.recipe
    t.engine = engine
    t.log_now = log_now
    t.layout_record = {"zero_stage": 0}
    return t


def engine_with_grads(fp16: bool, scale: float):
    module = nn.Linear(3, 2, bias=False)
    module.weight.grad = torch.full((2, 3), 2.0)  # norm sqrt(6 * 4)
    opt = SimpleNamespace(loss_scale_config=SimpleNamespace(cur_scale=scale))
    return SimpleNamespace(module=module, optimizer=opt, fp16_enabled=lambda: fp16)


def test_the_logged_zero0_grad_norm_under_fp16_is_unscaled():
    # fp16 gradients carry the loss scale until DeepSpeed unscales them in step(): the norm read
    # before the step must be divided by it (it was logged x1024 before)
    true_norm = (6 * 4.0) ** 0.5
    scaled = engine_with_grads(fp16=True, scale=1024.0)
    scaled.module.weight.grad.mul_(1024.0)
    assert abs(trainer_with(scaled)._clip_or_measure() - true_norm) < 1e-9
    assert abs(trainer_with(engine_with_grads(False, 1024.0))._clip_or_measure() - true_norm) < 1e-9


def test_the_plain_trainer_has_no_test_switches_and_its_hooks_do_nothing():
    t = Trainer.__new__(Trainer)
    assert t.test_switches() == []
    rec = {"step": 1}
    assert t.log_record(rec) is rec and rec == {"step": 1}
    assert t.after_forward(None, None) is None and t.after_optimizer_step(1) is None
    assert t.before_optimizer_step() is None and t.after_checkpoint_write(1) is None


def test_test_switches_come_from_the_instrumented_entry_point_only():
    from tests.support.trainer import trainer_from_env

    cls = trainer_from_env({"DS_WIDENET_NEGATIVE_CONTROL": "clip_avg", "DS_WIDENET_FAULT": "save:10:1"})
    t = cls.__new__(cls)
    assert t.test_switches() == ["negative control clip_avg", "fault injection save:10:1"]
    assert trainer_from_env({}).__new__(trainer_from_env({})).test_switches() == []
    import pytest

    with pytest.raises(ValueError, match="use one of"):
        trainer_from_env({"DS_WIDENET_NEGATIVE_CONTROL": "typo"})
