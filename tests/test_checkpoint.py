"""Which checkpoint is used, without processes (export/load/fine-tune: tests/test_export.py; the
multi-process paths: tests/distributed/test_checkpoint.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import ds_widenet  # noqa: F401
from ds_widenet.checkpoint import complete_checkpoints
from ds_widenet.config import ConfigError
from ds_widenet.export import resolve_checkpoint


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    """The files that decide whether a checkpoint counts: its folder, meta.json, the marker."""
    d = root / f"step{step}"
    (d / "weights").mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"step": step, "model": {}, "layout": {}}))
    if complete:
        (d / "complete").write_text("ok\n")
    return d


def test_only_complete_checkpoints_are_candidates_for_resume(tmp_path):
    fake_checkpoint(tmp_path, 5)
    fake_checkpoint(tmp_path, 10, complete=False)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step5"]


def test_export_takes_the_newest_complete_checkpoint_a_tag_or_one_checkpoint_folder(tmp_path):
    fake_checkpoint(tmp_path, 5)
    fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 30, complete=False)
    assert resolve_checkpoint(tmp_path, None).name == "step20"
    assert resolve_checkpoint(tmp_path, "step5").name == "step5"
    assert resolve_checkpoint(tmp_path / "step5", None).name == "step5"
    with pytest.raises(ConfigError, match="step7.*step5, step20"):
        resolve_checkpoint(tmp_path, "step7")
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "empty", None)
