"""DeepSpeed engine checkpoints with the resolved recipe beside them.

DeepSpeed's checkpoint files are pickles (model states per rank, one file per global expert,
ZeRO optimizer partitions); `config.json` beside them is the run's recipe, so a checkpoint says
what model it holds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import Recipe


def save_run_checkpoint(engine: Any, out: Path, recipe: Recipe, step: int) -> Path:
    """Save an engine checkpoint under <out>/checkpoints/step<N> (a collective: every rank calls it)."""
    ckpt_dir = Path(out) / "checkpoints"
    tag = f"step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "recipe": recipe.to_dict()})
    if engine.global_rank == 0:
        (ckpt_dir / tag / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))
    return ckpt_dir / tag
