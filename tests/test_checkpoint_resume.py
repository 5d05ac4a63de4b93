"""Saving and choosing a checkpoint to resume from, without processes: the barrier decided on
rank 0, the manifest, falling back from (or refusing) a damaged checkpoint, pruning."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import ds_widenet  # noqa: F401
from ds_widenet import checkpoint
from ds_widenet.checkpoint import MANIFEST, complete_checkpoints, find_checkpoint, save_checkpoint, verify
from ds_widenet.config import ConfigError, Recipe


class FakeEngine:
    def save_checkpoint(self, root, tag, client_state, save_latest):
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)


@pytest.fixture
def as_rank(monkeypatch):
    """Pretend to be `rank` of a 2-rank job: count barriers, write no shards."""
    calls = {"barriers": 0}

    def setup(rank: int):
        monkeypatch.setattr(checkpoint.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(checkpoint.dist, "get_rank", lambda: rank)
        monkeypatch.setattr(checkpoint.dist, "barrier", lambda: calls.__setitem__("barriers", calls["barriers"] + 1))
        import ds_widenet.reshard as reshard

        monkeypatch.setattr(reshard, "write_shards", lambda engine, d, r: (d / "weights").mkdir(parents=True, exist_ok=True))
        return calls

    return setup


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("stale_dir_visible", [True, False])
def test_every_rank_enters_the_same_barriers_whatever_it_sees_of_a_stale_step_directory(tmp_path, as_rank, rank,
                                                                                        stale_dir_visible):
    # A rank's view of a crashed save's directory (already deleted by rank 0, or on another
    # node's disk) must not decide whether it enters a barrier: that hung a resumed run.
    calls = as_rank(rank)
    stale = tmp_path / "checkpoints" / "step10"
    if stale_dir_visible:
        (stale / "weights").mkdir(parents=True)
        (stale / "weights" / "rank1.safetensors").write_bytes(b"partial")
    save_checkpoint(FakeEngine(), tmp_path, Recipe(), 10, {"world": 2})
    assert calls["barriers"] == 3
    if rank == 1 and stale_dir_visible:  # only rank 0 deletes
        assert (stale / "weights" / "rank1.safetensors").exists()
    if rank == 0:
        assert not (stale / "weights" / "rank1.safetensors").exists()
        assert (stale / "complete").exists() and verify(stale) is None
        files = json.loads((stale / MANIFEST).read_text())["files"]
        assert files["mp_rank_00_model_states.pt"] == 100 and "meta.json" in files


def make_ckpt(root: Path, step: int) -> Path:
    d = root / "checkpoints" / f"step{step}"
    (d / "weights").mkdir(parents=True)
    (d / "weights" / "rank0.safetensors").write_bytes(b"w" * 64)
    (d / "meta.json").write_text(json.dumps({"step": step, "layout": {}, "model": {}}))
    files = {str(f.relative_to(d)): f.stat().st_size for f in d.rglob("*") if f.is_file()}
    (d / MANIFEST).write_text(json.dumps({"files": files}))
    (d / "complete").write_text("ok\n")
    return d


def test_resume_auto_passes_over_a_truncated_checkpoint_and_leaves_it_as_it_was(tmp_path):
    make_ckpt(tmp_path, 5)
    bad = make_ckpt(tmp_path, 10)
    (bad / "weights" / "rank0.safetensors").write_bytes(b"w" * 10)  # truncated
    before = {f: f.read_bytes() for f in bad.rglob("*") if f.is_file()}
    d, notice = find_checkpoint("auto", tmp_path)
    assert d.name == "step5"
    assert "rank0.safetensors is truncated (10 of 64 bytes)" in notice and "resuming from" in notice
    assert {f: f.read_bytes() for f in bad.rglob("*") if f.is_file()} == before


def test_resume_from_a_named_damaged_checkpoint_is_refused_naming_the_file(tmp_path):
    bad = make_ckpt(tmp_path, 10)
    (bad / "weights" / "rank0.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"rank0.safetensors is missing: resume from an earlier checkpoint") as e:
        find_checkpoint(str(bad), tmp_path)
    assert "\n" not in str(e.value)


def test_resume_auto_with_only_damaged_checkpoints_is_refused(tmp_path):
    bad = make_ckpt(tmp_path, 10)
    (bad / MANIFEST).write_text("{not json")
    with pytest.raises(ConfigError, match="every complete checkpoint .* is damaged"):
        find_checkpoint("auto", tmp_path)


def test_checkpoints_from_before_manifests_are_taken_as_they_are(tmp_path):
    d = make_ckpt(tmp_path, 3)
    (d / MANIFEST).unlink()
    assert find_checkpoint("auto", tmp_path) == (d, None)


def test_pruning_keeps_checkpoints_newer_than_the_one_just_saved(tmp_path, as_rank):
    # after a fallback from a damaged step20, saving step15 must not prune step20 away (nor keep
    # step20 in place of the new save)
    as_rank(0)
    for s in (5, 10, 20):
        make_ckpt(tmp_path, s)
    save_checkpoint(FakeEngine(), tmp_path, Recipe(), 15, {"world": 2}, keep_last=1)
    assert [d.name for d in complete_checkpoints(tmp_path / "checkpoints")] == ["step15", "step20"]


def test_saving_a_step_again_moves_the_complete_one_aside_and_replaces_a_crashed_one(tmp_path, as_rank):
    as_rank(0)
    old = make_ckpt(tmp_path, 10)
    old_bytes = (old / "weights" / "rank0.safetensors").read_bytes()
    save_checkpoint(FakeEngine(), tmp_path, Recipe(), 10, {"world": 2})
    aside = tmp_path / "checkpoints" / "step10.superseded"
    assert (aside / "weights" / "rank0.safetensors").read_bytes() == old_bytes
    assert [d.name for d in complete_checkpoints(tmp_path / "checkpoints")] == ["step10"]
    (tmp_path / "checkpoints" / "step10" / "complete").unlink()  # now a crashed save of step 10
    save_checkpoint(FakeEngine(), tmp_path, Recipe(), 10, {"world": 2})
    assert not (tmp_path / "checkpoints" / "step10.superseded1").exists()


def _probe(rank: int, init: str, outs: list[str], results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=len(outs))
    try:
        blind = checkpoint.ranks_not_seeing(Path(outs[rank]), wait_s=0.3)
    except ConfigError as e:
        blind = f"error: {e}"
    Path(results, f"rank{rank}.json").write_text(json.dumps(blind))
    dist.destroy_process_group()


def _probe_views(tmp_path: Path, outs: list[Path]) -> list[list]:
    import torch.multiprocessing as mp

    results = tmp_path / "results"
    results.mkdir(parents=True)
    mp.spawn(_probe, args=(f"file://{tmp_path / 'store'}", [str(o) for o in outs], str(results)), nprocs=len(outs))
    return [json.loads((results / f"rank{r}.json").read_text()) for r in range(len(outs))]


def test_every_rank_learns_which_ranks_do_not_see_rank_zeros_out_directory(tmp_path):
    import socket

    # one directory for both ranks: nothing to report, and no probe file left in it
    shared = tmp_path / "shared" / "run"
    assert _probe_views(tmp_path / "a", [shared, shared]) == [[], []]
    assert shared.is_dir() and list(shared.iterdir()) == []
    # rank 1 looks at another directory (its node's local disk): both ranks hear of it, and rank 0
    # removes the directory it made for the probe
    local0, local1 = tmp_path / "node0" / "run", tmp_path / "node1" / "run"
    views = _probe_views(tmp_path / "b", [local0, local1])
    assert views == [[[1, socket.gethostname()]]] * 2
    assert not local0.exists() and not local1.exists()
    # rank 0 cannot write there (a file where a directory should be): both ranks get the same line
    (tmp_path / "a_file").write_text("")
    bad = tmp_path / "a_file" / "run"
    views = _probe_views(tmp_path / "c", [bad, bad])
    assert views[0] == views[1] and views[0].startswith(f"error: --out {bad}: rank 0 cannot write there"), views
