"""`python -m ds_widenet.evaluate --weights model.safetensors [--data digits|cifar10|imagefolder|synthetic]
[--root DIR] [--eval_capacity_factor F] [--device cpu|cuda] [--batch N] [--json]`

Top-1 of an exported model on a test split, and a per-depth routing summary (expert shares, drop
rate, and how often a token's experts change from one depth to the next). Plain PyTorch: no
DeepSpeed engine, no torch.distributed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from .config import ConfigError, DataConfig


def evaluate_exported(weights: Path, data: DataConfig, device: str = "cpu", batch: int = 128,
                      eval_capacity_factor: Optional[float] = None) -> dict[str, Any]:
    import torch

    from .checkpoint import load_exported
    from .data import EvalSampler, build_datasets, build_loader

    overrides = {"moe": {"eval_capacity_factor": eval_capacity_factor}} if eval_capacity_factor else None
    model = load_exported(weights, device, overrides)
    _, test = build_datasets(data, model.cfg, seed=0)
    loader = build_loader(test, EvalSampler(len(test), batch, 1, 0), data.num_workers)
    correct = count = 0
    loss = 0.0
    tokens = dropped = changed = pairs = None
    with torch.no_grad():
        for images, labels, idx in loader:
            valid = idx >= 0
            out = model(images.to(device), valid=valid.to(device))
            logits = out.logits.float().cpu()
            correct += int((logits.argmax(-1)[valid] == labels[valid]).sum())
            count += int(valid.sum())
            loss += float(torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum"))
            if out.routing:
                t = torch.stack([r.expert_tokens.cpu() for r in out.routing])
                d = torch.stack([r.dropped.cpu() for r in out.routing])
                tokens = t if tokens is None else tokens + t
                dropped = d if dropped is None else dropped + d
                # a token's top-k set at depth i vs depth i+1 (routing only meaningful for WideNet's shared router)
                sets = [torch.sort(r.expert_index.cpu(), dim=0).values[:, valid] for r in out.routing]
                ch = torch.tensor([float((a != b).any(0).float().mean()) for a, b in zip(sets, sets[1:])])
                changed = ch if changed is None else changed + ch
                pairs = 1 if pairs is None else pairs + 1
    result: dict[str, Any] = {"weights": str(weights), "top1": correct / count, "eval_loss": loss / count, "images": count}
    if tokens is not None:
        share = tokens / tokens.sum(1, keepdim=True)
        result["expert_share_per_depth"] = [[round(v, 4) for v in row] for row in share.tolist()]
        result["drop_rate_per_depth"] = [round(v, 4) for v in (dropped / pairs).tolist()]
        if changed is not None and len(changed):
            result["experts_changed_next_depth"] = [round(v, 4) for v in (changed / pairs).tolist()]
    return result


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds_widenet.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--data", default="digits", choices=["digits", "cifar10", "cifar100", "imagefolder", "synthetic"])
    ap.add_argument("--root", default=None)
    ap.add_argument("--eval_capacity_factor", type=float, default=None)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    try:
        from . import select_accelerator
        import torch

        select_accelerator()
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.root and not Path(args.root).exists():
            raise ConfigError(f"--root {args.root} does not exist")
        data = DataConfig(name=args.data, root=args.root, augment="none")
        result = evaluate_exported(args.weights, data, device, args.batch, args.eval_capacity_factor)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"top-1 {result['top1']:.4f} on {result['images']} images ({args.data}), loss {result['eval_loss']:.4f}")
    for i, share in enumerate(result.get("expert_share_per_depth", [])):
        chg = result.get("experts_changed_next_depth", [])
        nxt = f"  experts change at next depth: {chg[i]:.1%}" if i < len(chg) else ""
        print(f"depth {i}: expert share {share}  dropped {result['drop_rate_per_depth'][i]:.2%}{nxt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
