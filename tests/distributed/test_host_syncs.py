"""Between two optimizer steps the trainer reads nothing back from the device and issues no
collective of its own (issue 10): counted in a real 2-rank run (expert parallelism over both ranks,
ZeRO-2, 2 micro-batches per step) by tests/support/trainer.py's sync counter, which wraps every
host read (Tensor.item, __bool__, __float__, __int__, .cpu(), .tolist(), .numpy()) and every
torch.distributed collective inside each micro-step and names the function that issued it.

The pinned numbers, per rank:
* a micro-step inside the window: 0 host reads; collectives only on the data path: DeepSpeed's
  MoE all-to-alls (dispatch and combine per MoE call, forward and backward: 8 at depth 2), the
  project's exchange of slot occupancy before each grouped expert call (2), and ZeRO-2's gradient
  bucket all-reduce that it issues in every backward (2);
* the boundary micro-step: the trainer's non-finite check is one all-reduce and one read
  (guards.NonFiniteGuard.window_finite); everything else is DeepSpeed's ZeRO-2 step (its gradient
  norm and overflow check, the partition all-gather), pinned too, so a new one shows up here.
"""
from __future__ import annotations

import json
import sys
from collections import Counter

import pytest

from ds_widenet.distributed import free_port
from tests.distributed.launch import ROOT, child_env, write_ds_config
from tests.support.launch import run_with_deadline

RECIPE = ROOT / "ds_configs" / "digits_widenet.yaml"
OVERRIDES = ["model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.moe.expert_dim=64",
             "model.dropout=0.1", "parallel.ep_size=2", "schedule.max_steps=6", "train.log_interval=3",
             "train.eval_interval=100", "data.num_workers=0"]

DATA_PATH_ONLY = {  # what a micro-step inside the window issues
    # dispatch and combine per MoE call, forward and backward (its backward is an _AllToAll too)
    "collective:all_to_all_single @ deepspeed/moe/sharded_moe.py:forward": 8,
    "collective:all_to_all_single @ ds_widenet/deepspeed_internals.py:all_to_all_tensor": 2,
    "collective:all_reduce @ deepspeed/runtime/zero/stage_1_and_2.py:allreduce_bucket": 2,
}
TRAINER_AT_BOUNDARY = {
    "collective:all_reduce @ ds_widenet/guards.py:window_finite": 1,
    "read:tolist @ ds_widenet/guards.py:window_finite": 1,
}


def split(sites: dict[str, int]) -> tuple[Counter, Counter]:
    """(this project's sites, DeepSpeed's)."""
    ours, theirs = Counter(), Counter()
    for k, v in sites.items():
        (ours if "@ ds_widenet/" in k else theirs)[k] += v
    return ours, theirs


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("syncs")
    ds = write_ds_config(tmp / "ds.json", train_batch_size=32, train_micro_batch_size_per_gpu=8, gradient_clipping=1.0,
                         zero_optimization={"stage": 2})
    env = {**child_env(), "DS_WIDENET_COUNT_SYNCS": str(tmp / "counts")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "tests.support.train", "--recipe", str(RECIPE), "--deepspeed_config", str(ds), "--out", str(tmp / "run"),
           *OVERRIDES]
    res = run_with_deadline(cmd, env, ROOT, 240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return [json.loads((tmp / "counts" / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_inside_the_window_nothing_is_read_back_and_only_data_moves(counts):
    for rank, recs in enumerate(counts):
        assert [r["boundary"] for r in recs] == [False, True] * 6
        for r in recs[2:]:  # from step 2 on (the first forward caches e.g. dropout's keep threshold)
            if r["boundary"]:
                continue
            assert not [k for k in r["counts"] if k.startswith("read:")], (rank, r)
            assert r["sites"] == DATA_PATH_ONLY, (rank, r["step"], r["sites"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_boundary_costs_the_trainer_one_all_reduce_and_one_read(counts):
    deepspeed_boundary = None
    for rank, recs in enumerate(counts):
        for r in recs[2:]:
            if not r["boundary"]:
                continue
            ours, theirs = split(r["sites"])
            data = {k: v for k, v in DATA_PATH_ONLY.items() if "@ ds_widenet/" in k}
            assert ours == Counter({**data, **TRAINER_AT_BOUNDARY}), (rank, r["step"], ours)
            # DeepSpeed's own: the same at every boundary and on both ranks (pinned below)
            deepspeed_boundary = deepspeed_boundary or theirs
            assert theirs == deepspeed_boundary, (rank, r["step"], theirs)
    totals = Counter()
    for k, v in deepspeed_boundary.items():
        totals[k.split(" @ ")[0]] += v
    # ZeRO-2's step: 4 + 2 gradient-norm all-reduces and the partition all-gather, its norm's 4
    # .item() and 5 bool() of the overflow check; plus the data path above
    assert totals == Counter({"collective:all_to_all_single": 8, "collective:all_reduce": 2 + 4 + 2,
                              "collective:all_gather_into_tensor": 2, "read:item": 4, "read:__bool__": 5}), totals
