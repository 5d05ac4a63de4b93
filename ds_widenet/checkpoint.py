"""Checkpoints: save, the complete marker, finding one to resume from, verifying it.

A checkpoint directory `<out>/checkpoints/step<N>/` holds

* DeepSpeed's own engine checkpoint (pickles: model states, one file per global expert, ZeRO
  optimizer partitions) - the exact-resume path when the layout (world size, ep_size, ZeRO
  stage, precision) is unchanged;
* `weights/` and `state/`: layout-free fp32 shards (safetensors; see reshard.py), for resharding
  and export;
* `meta.json`: step, layout, the resolved recipe and model config;
* `manifest.json`: every file of the checkpoint with its size, so a truncated one is found
  before anything is loaded;
* `complete`: written by rank 0 after every rank has finished writing (a barrier). Only
  checkpoints with this marker are resumed from; a crash mid-save leaves the previous one.

Nothing complete is deleted except by `checkpoint.keep_last` pruning (of checkpoints older than
the one just saved): a run that saves a step again (after resuming from an earlier checkpoint)
first moves the old `step<N>` aside to `step<N>.superseded`, which nothing resumes from.

Every decision that a barrier depends on is taken on rank 0: ranks whose views of the file
system differ (node-local disks, NFS attribute caches) still enter the same collectives. At start
`ranks_not_seeing` finds the ranks that do not see the files rank 0 writes under `--out` (each rank
writes its own part of every checkpoint there and reads it back on resume, so the trainer refuses
a node-local `--out` with one line), and every rank resumes from the checkpoint rank 0 chose.
"""
from __future__ import annotations

import json
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch.distributed as dist

from .config import ConfigError, ModelConfig, Recipe

COMPLETE = "complete"
MANIFEST = "manifest.json"


def checkpoint_root(out: Union[str, Path]) -> Path:
    return Path(out) / "checkpoints"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine: Any, out: Path, recipe: Recipe, step: int, layout: dict[str, Any], keep_last: int = 0,
                    after_write: Optional[Callable[[int], None]] = None) -> Path:
    """Save at `step` (a collective: every rank calls it). Marks it complete after a barrier and
    then, on rank 0, prunes complete checkpoints beyond the newest `keep_last` (0 keeps all).
    `after_write(step)` runs on every rank once its files are written, before the barrier."""
    from .reshard import write_shards

    root = checkpoint_root(out)
    tag = f"step{step}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    d = root / tag
    if rank == 0 and d.exists():
        if (d / COMPLETE).exists():  # a run resumed from before it saves this step again: keep the old one
            aside = next(root / f"{tag}.superseded{'' if k == 0 else k}" for k in range(10 ** 6)
                         if not (root / f"{tag}.superseded{'' if k == 0 else k}").exists())
            d.rename(aside)
        else:  # a crashed save of this step: no stale shard or marker may survive
            shutil.rmtree(d)
    _barrier()  # unconditional: every rank passes it whatever it sees of `d`
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    write_shards(engine, d, rank)
    if after_write is not None:
        after_write(step)
    _barrier()
    if rank == 0:
        meta = {"step": step, "layout": layout, "recipe": recipe.to_dict(), "model": recipe.model.to_dict()}
        (d / "meta.json").write_text(json.dumps(meta, indent=2))
        files = {str(f.relative_to(d)): f.stat().st_size for f in sorted(d.rglob("*")) if f.is_file()}
        (d / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        (d / COMPLETE).write_text("ok\n")
        if keep_last > 0:
            # Only checkpoints up to this one: a newer one left by an earlier attempt (e.g. a corrupt
            # one --resume auto fell back from) is not this run's to delete.
            mine = [c for c in complete_checkpoints(root) if step_of(c) <= step]
            for old in mine[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return d


def ranks_not_seeing(out: Path, wait_s: float = 3.0) -> list[tuple[int, str]]:
    """(rank, host) of every rank that does not see a file rank 0 writes in `out` (a collective;
    [] on one rank). Rank 0 creates `out` if needed and removes the probe and, if no rank shares
    it, the directory it made; a rank that does not see the probe at once looks again for `wait_s`
    (a network file system's directory cache)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return []
    rank, made = dist.get_rank(), False
    name: list[Optional[str]] = [None, None]  # the probe's name, or why rank 0 could not write it
    if rank == 0:
        try:
            made = not out.exists()
            out.mkdir(parents=True, exist_ok=True)
            name[0] = f".shared-probe-{secrets.token_hex(8)}"
            (out / name[0]).write_text(name[0])
        except OSError as e:  # every rank must hear of it: the others wait in the broadcast below
            name = [None, f"{type(e).__name__}: {e.strerror or e}"]
    dist.broadcast_object_list(name, src=0)  # after rank 0 wrote it
    if name[1] is not None:
        raise ConfigError(f"--out {out}: rank 0 cannot write there ({name[1]}): choose a writable --out")
    probe, deadline = out / str(name[0]), time.monotonic() + wait_s
    while True:
        try:
            seen = probe.read_text() == name[0]
        except OSError:
            seen = False
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    views: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(views, (rank, socket.gethostname(), seen))
    blind = [(r, h) for r, h, ok in views if not ok]
    if rank == 0:
        probe.unlink(missing_ok=True)
        if blind and made:
            try:
                out.rmdir()
            except OSError:  # something else appeared there meanwhile: not ours to delete
                pass
    return blind


def step_of(ckpt: Path) -> int:
    return int(ckpt.name[4:])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and re.fullmatch(r"step\d+", d.name) and (d / COMPLETE).exists()]
    return sorted(found, key=step_of)


def verify(ckpt: Path) -> Optional[str]:
    """What is wrong with a complete checkpoint (a missing or truncated file), or None.
    Checkpoints written before manifests existed are taken as they are."""
    mf = ckpt / MANIFEST
    if not mf.exists():
        return None if (ckpt / "meta.json").exists() else f"{ckpt}/meta.json is missing"
    try:
        files = json.loads(mf.read_text())["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return f"{mf} is corrupt"
    for rel, size in files.items():
        f = ckpt / rel
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} is truncated ({f.stat().st_size} of {size} bytes)"
    return None


def find_checkpoint(spec: str, out: Path) -> tuple[Path, Optional[str]]:
    """The checkpoint to resume from, and a notice when `auto` had to pass over a damaged one.

    `auto`: the newest complete checkpoint under <out>/checkpoints that verifies; damaged ones
    are left as they are (nothing saved is deleted) and named in the notice. A directory: that
    checkpoint, refused with the damaged file named when it does not verify."""
    if spec == "auto":
        found = complete_checkpoints(checkpoint_root(out))
        if not found:
            raise ConfigError(f"--resume auto found no complete checkpoint under {checkpoint_root(out)}: "
                              "start without --resume or point --resume at a checkpoint directory")
        skipped = []
        for d in reversed(found):
            problem = verify(d)
            if problem is None:
                notice = (f"passed over damaged checkpoint(s): {'; '.join(skipped)}; resuming from {d}"
                          if skipped else None)
                return d, notice
            skipped.append(problem)
        raise ConfigError(f"--resume auto: every complete checkpoint under {checkpoint_root(out)} is damaged "
                          f"({skipped[0]}): start a new run with another --out")
    d = Path(spec)
    if not d.is_dir():
        raise ConfigError(f"--resume {spec}: no such checkpoint directory (expected .../checkpoints/step<N>)")
    if not (d / COMPLETE).exists():
        raise ConfigError(f"--resume {spec}: checkpoint is incomplete (a rank died while saving): "
                          "resume from an earlier one or use --resume auto")
    problem = verify(d)
    if problem is not None:
        raise ConfigError(f"--resume {spec}: {problem}: resume from an earlier checkpoint or use --resume auto")
    return d, None


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        if not isinstance(meta, dict) or not {"step", "layout", "model"} <= set(meta):
            raise KeyError("step/layout/model")
        return meta
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ConfigError(f"{ckpt}/meta.json is missing or corrupt ({type(e).__name__}): resume from another checkpoint") from None


def check_same_model(ckpt_model: dict[str, Any], model: ModelConfig, where: Path) -> None:
    """Refuse a checkpoint of another model shape (grad_checkpointing and dropout may differ)."""
    ignore = {"grad_checkpointing", "dropout", "attn_dropout", "preset"}
    mine = {k: v for k, v in model.to_dict().items() if k not in ignore}
    theirs = {k: v for k, v in ckpt_model.items() if k not in ignore}
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        k = diff[0]
        raise ConfigError(f"checkpoint {where} holds another model ({k}: {theirs.get(k)!r} there, {mine.get(k)!r} here): "
                          "use the recipe it was trained with, or --init_from for fine-tuning")
