"""`python -m ds_widenet.export <ckpt_dir> [--tag T] --out model.safetensors [--force]`

Writes one safetensors file (fp32 master weights, every expert under its global id, named as in
an ep_size-1 model) and `model.json` (the model config) from a ds-widenet checkpoint. `ckpt_dir`
is a run's `checkpoints/` folder (newest complete checkpoint, or `--tag stepN`) or one checkpoint.
Load the result with `ds_widenet.checkpoint.load_exported` (plain PyTorch, no engine, no
torch.distributed, no pickle).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from .config import ConfigError


def resolve_checkpoint(path: Path, tag: Optional[str]) -> Path:
    from .checkpoint import COMPLETE, complete_checkpoints

    if tag:
        d = path / tag
        if not d.is_dir():
            have = ", ".join(p.name for p in complete_checkpoints(path)) or "none"
            raise ConfigError(f"no checkpoint {tag!r} under {path} (complete ones: {have}): pass an existing --tag")
        return d
    if (path / COMPLETE).exists() or (path / "meta.json").exists():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise ConfigError(f"no complete checkpoint under {path}: pass a run's checkpoints/ folder or one step<N> folder")
    return found[-1]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds_widenet.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt_dir", type=Path)
    ap.add_argument("--tag", default=None, help="checkpoint tag (stepN); default: the newest complete one")
    ap.add_argument("--out", type=Path, required=True, help="output .safetensors file (its .json goes beside it)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = ap.parse_args(argv)
    try:
        from . import select_accelerator
        from .checkpoint import export

        select_accelerator()
        if args.out.suffix != ".safetensors":
            raise ConfigError(f"--out {args.out} must end in .safetensors")
        ckpt = resolve_checkpoint(args.ckpt_dir, args.tag)
        out = export(ckpt, args.out, force=args.force)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} -> {out} (+ {out.with_suffix('.json').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
