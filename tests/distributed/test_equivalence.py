"""Distributed training is the same math: 2 processes against one process accumulating the same
micro-batches, for ZeRO 0/1/2 x ep_size 1/2 (AdamW) and ZeRO 1/2 x ep_size 2 (the ZeRO-aware
LAMB), over 30 steps with router noise, token drops, the aux loss and gradient clipping occurring;
and each negative control (tests/support/trainer.py) breaking the bound at least 100x.
The runs and the comparison are bench/equivalence.py's, which prints the same table for the docs."""
from __future__ import annotations

import pytest

from bench.equivalence import CLIP, CONFIGS, CONTROLS, OPTIM, compare, ds_config, launch, tiny

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 30
BOUND = 1e-5
_REFS: dict = {}


def reference(tmp_path_factory, optim: str):
    if optim not in _REFS:
        d = tmp_path_factory.mktemp(f"ref-{optim}")
        _REFS[optim] = launch(1, ds_config(d / "ds.json", 0), d / "run", tiny(STEPS) + OPTIM[optim])
    return _REFS[optim]


@pytest.mark.parametrize("optim,stage,ep", CONFIGS, ids=[f"{o}-zero{s}-ep{e}" for o, s, e in CONFIGS])
def test_two_ranks_match_one_rank_accumulating_their_micro_batches(tmp_path_factory, tmp_path, optim, stage, ep):
    ref = reference(tmp_path_factory, optim)
    run = launch(2, ds_config(tmp_path / "ds.json", stage), tmp_path / "run",
                 tiny(STEPS) + OPTIM[optim] + [f"parallel.ep_size={ep}"])
    c = compare(ref, run)
    assert c["max_rel_loss_diff"] <= BOUND, c
    assert c["max_rel_param_diff"] <= BOUND, c
    assert c["identical_expert_choices"], c
    # what makes the comparison hard really happened: dropped tokens, and clipping (norm above CLIP)
    assert c["max_drop_rate"] > 0.01 and c["max_grad_norm"] > CLIP, c


@pytest.mark.parametrize("control", list(CONTROLS))
def test_negative_control_breaks_the_bound(tmp_path_factory, tmp_path, control):
    optim, stage, ep = CONTROLS[control]
    ref = reference(tmp_path_factory, optim)
    run = launch(2, ds_config(tmp_path / "ds.json", stage), tmp_path / "run",
                 tiny(STEPS) + OPTIM[optim] + [f"parallel.ep_size={ep}"], control=control)
    c = compare(ref, run)
    assert max(c["max_rel_loss_diff"], c["max_rel_param_diff"]) >= 100 * BOUND, c
    if control == "noise_per_rank":  # router noise is really on: drawing it per rank changes the routing
        assert not c["identical_expert_choices"]
