"""The DeepSpeed internals this project relies on. If DeepSpeed changes them, these fail loudly
(and requirements.txt pins DeepSpeed to the minor version they were written against)."""
from __future__ import annotations

import inspect

import torch
from torch import nn

import ds_widenet  # noqa: F401
import deepspeed
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer, TopKGate


def test_deepspeed_minor_version_is_the_one_the_project_was_written_for():
    major, minor = (int(v) for v in deepspeed.__version__.split(".")[:2])
    assert (major, minor) == (0, 19), deepspeed.__version__


def test_moe_layer_calls_its_gate_positionally_with_sparse_routes():
    # PaperGate implements this protocol: gate(input, used_token, True, use_tutel) -> 7-tuple
    src = inspect.getsource(MOELayer.forward)
    assert "self.gate(\n            reshaped_input, input[1], True, self.use_tutel)" in src or \
        "self.gate(reshaped_input, input[1], True, self.use_tutel)" in src
    gate = TopKGate(8, 4, k=2, min_capacity=1)
    out = gate(torch.randn(16, 8), None, True, False)
    assert len(out) == 7
    l_aux, capacity, experts, indices, locations, gates, counts = out
    assert indices.shape == (2, 16) and indices.dtype == torch.int32 and experts == 4


def test_moe_forward_returns_output_l_aux_and_counts_and_deep_copies_the_expert():
    moe = MoE(hidden_size=8, expert=nn.Linear(8, 8), num_experts=2, ep_size=1, k=1)
    out, l_aux, counts = moe(torch.randn(2, 4, 8))
    assert out.shape == (2, 4, 8) and l_aux.dim() == 0 and counts.shape == (2,)
    e = moe.deepspeed_moe.experts.deepspeed_experts
    assert torch.equal(e[0].weight, e[1].weight)  # identical copies: why the project re-inits experts
    assert all(getattr(p, "allreduce", True) is False for p in e.parameters())


def test_expert_parallel_groups_are_consecutive_ranks():
    # models.build_model derives ep_rank = rank % ep_size from this layout
    from deepspeed.utils import groups
    src = inspect.getsource(groups._create_expert_and_data_parallel)
    assert "expert_parallel_group = [0, 1], [2,3]" in src
