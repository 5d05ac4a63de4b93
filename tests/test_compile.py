"""torch.compile (train.compile): every model traces as one graph, no break, in training and in
evaluation at ep_size 1 (capacity and routing need no Tensor.item(); the grouped experts' matmuls are
opaque custom ops; keyed randomness folds its int keys in one); the step counter, a Python int that
changes every step, is traced as a dynamic int (no recompile); and 20 steps of the real trainer
compiled give the eager losses.

aot_eager runs the traced forward and backward graphs without generating C++ (inductor's C++
compile takes ~50 s cold on this CPU): the inductor run is opt-in, DS_WIDENET_COMPILE_TESTS=1.
ep_size 2 (measured, not a test: it needs 2 processes): also 1 graph, 0 breaks; Dynamo turns
DeepSpeed's all-to-all (torch.distributed.all_to_all_single) into functional collectives."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

import ds_widenet  # noqa: F401
from ds_widenet.models import build_model, get_preset
from tests.distributed.launch import ROOT, metrics, run_train, write_ds_config

RECIPE = ROOT / "ds_configs" / "digits_widenet.yaml"
TINY = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.moe.expert_dim=64",
        "checkpoint.every_steps=1000", "train.eval_interval=1000", "schedule.max_steps=20", "train.log_interval=1"]


def tiny(preset: str):
    cfg = get_preset(preset)
    # dropout on, so keyed dropout is in the traced graph too. WideNet: 2 depths through its one shared
    # attention and MoE layer; ViT-MoE: depth 0 dense, depth 1 MoE; ViT: 1 depth
    depth = {"widenet": 2, "vit_moe": 2, "vit": 1}[cfg.arch]
    cfg = replace(cfg, depth=depth, moe_last_n=1, embed_dim=32, num_heads=2, mlp_dim=64, dropout=0.1)
    if cfg.moe is not None:
        cfg.moe = replace(cfg.moe, expert_dim=64)
    return build_model(cfg, seed=0)


def graph_ops(explained) -> set[str]:
    """Every function a traced graph calls, its subgraphs included (an autograd.Function traces as a
    higher-order op whose forward and backward bodies are submodules)."""
    return {str(n.target) for g in explained.graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if n.op == "call_function"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("preset", ["widenet-digits", "vit-digits", "vit-moe-digits"])
def test_one_graph_and_no_break_in_training_and_evaluation(preset):
    model = tiny(preset)
    x, ids = torch.randn(4, 1, 8, 8), torch.arange(4)
    for training in (True, False):
        model.train(training)
        valid = None if training else torch.tensor([True, True, True, False])  # evaluation's padding mask
        ex = torch._dynamo.explain(model)(x, ids, step=3, seed=0, valid=valid)
        assert (ex.graph_count, ex.graph_break_count) == (1, 0), (training, [b.reason for b in ex.break_reasons])
        ops = graph_ops(ex)
        if preset != "vit-digits":
            # the grouped experts, not the padded fallback: grouped_mm_available is evaluated on real
            # tensors (traced under fake tensors the probe fails and the graph would take baddbmm)
            assert "ds_widenet.grouped_mm.default" in ops and not any("baddbmm" in o for o in ops), ops
        assert ("ds_widenet.keyed_fold.default" in ops) == training, ops  # router noise / dropout keys


def test_the_step_counter_does_not_recompile():
    from torch._dynamo.utils import counters

    model = tiny("widenet-digits").train()
    counters.clear()
    model.compile(backend="eager")  # in place, as the trainer's engine.compile; Dynamo alone
    x, ids = torch.randn(4, 1, 8, 8), torch.arange(4)
    for step in range(6):
        got = model(x, ids, step=step, seed=0)
        want = model.forward(x, ids, step=step, seed=0)  # eager
        assert torch.equal(got.logits, want.logits) and torch.equal(got.aux_loss, want.aux_loss), step
    # VisionBackbone.compile traces `step` as a dynamic int from the first call (left to Dynamo, step 0
    # is a constant and step 1 recompiles the whole model); evaluation is the one other graph
    assert counters["stats"]["unique_graphs"] == 1
    model.eval()
    for step in range(3):
        assert torch.equal(model(x, ids, step=step).logits, model.forward(x, ids, step=step).logits)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]


def _compiled_training_matches_eager(tmp_path, backend: str) -> None:
    ds = write_ds_config(tmp_path / "ds.json", train_batch_size=32, train_micro_batch_size_per_gpu=32,
                         zero_optimization={"stage": 0})
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["train.compile=true", f"train.compile_backend={backend}"])):
        run_train("python", 1, RECIPE, ds, tmp_path / name, TINY + extra)
        runs[name] = metrics(tmp_path / name)
    eager, compiled = runs["eager"], runs["compiled"]
    assert [r["step"] for r in eager] == [r["step"] for r in compiled] == list(range(1, 21))
    for e, c in zip(eager, compiled):
        assert abs(c["loss"] - e["loss"]) <= 1e-5 * abs(e["loss"]), (e["step"], e["loss"], c["loss"])
        assert abs(c["aux_loss"] - e["aux_loss"]) <= 1e-5 * abs(e["aux_loss"]), e["step"]
    assert metrics(tmp_path / "compiled", "eval")[-1]["top1"] == metrics(tmp_path / "eager", "eval")[-1]["top1"]


@pytest.mark.timeout(300)
def test_20_compiled_trainer_steps_give_the_eager_losses(tmp_path):
    _compiled_training_matches_eager(tmp_path, "aot_eager")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not os.environ.get("DS_WIDENET_COMPILE_TESTS"),
                    reason="inductor's C++ compile takes ~50 s cold on this CPU; set DS_WIDENET_COMPILE_TESTS=1")
def test_20_inductor_compiled_trainer_steps_give_the_eager_losses(tmp_path):
    _compiled_training_matches_eager(tmp_path, "inductor")
