"""Layout-free shards: names across ep_size, and the optimizer state a reshard creates."""
from __future__ import annotations

import torch
from torch import nn

import ds_widenet  # noqa: F401
from ds_widenet.config import ModelConfig, MoEConfig
from ds_widenet.models import build_model
from ds_widenet.optim import Lamb
from ds_widenet.reshard import _step_state, global_name, load_weights_into, local_expert_counts


def tiny() -> ModelConfig:
    return ModelConfig(arch="widenet", img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=16, depth=2,
                       num_heads=2, moe=MoEConfig(num_experts=4, k=2, expert_dim=32, min_capacity=1))


def test_local_experts_get_their_global_ids_on_every_expert_parallel_rank():
    model = build_model(tiny(), ep_size=2, ep_rank=1)
    n_local = local_expert_counts(model)
    assert list(n_local.values()) == [2]
    names = {global_name(n, p, 1, n_local) for n, p in model.named_parameters()}
    assert any("deepspeed_experts.3.fc1.weight" in n for n in names)
    assert not any("deepspeed_experts.0." in n for n in names)  # rank 1 holds global experts 2 and 3


def test_an_ep1_state_dict_loads_into_each_half_of_an_ep2_model():
    full = build_model(tiny(), seed=3).state_dict()
    for r in (0, 1):
        half = build_model(tiny(), ep_size=2, ep_rank=r, seed=9)
        load_weights_into(half, full, ep_size=2, ep_rank=r)
        n_local = local_expert_counts(half)
        for n, p in half.named_parameters():
            assert torch.equal(p, full[global_name(n, p, r, n_local)]), n


def test_a_resharded_step_count_has_the_type_each_optimizer_creates_itself():
    # FusedLamb's kernel takes `state['step']` as an int and the project's Lamb counts in ints;
    # torch's AdamW keeps a float32 tensor on the CPU (on the param's device when capturable/fused).
    from deepspeed.ops.lamb import FusedLamb

    w = nn.Parameter(torch.zeros(3))
    assert _step_state(Lamb([w]), 7, w.device) == 7 and type(_step_state(Lamb([w]), 7, w.device)) is int
    fused = FusedLamb.__new__(FusedLamb)  # its constructor builds a CUDA kernel; the type is what counts
    s = _step_state(fused, 7, w.device)
    assert type(s) is int and s == 7
    adamw = torch.optim.AdamW([w])
    t = _step_state(adamw, 7, w.device)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu" and float(t) == 7.0
    # the same type as AdamW gives itself after a real step
    w.grad = torch.ones(3)
    adamw.step()
    own = adamw.state[w]["step"]
    assert type(own) is type(t) and own.dtype == t.dtype and own.device == t.device
