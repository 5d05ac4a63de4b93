"""`python -m ds_widenet.evaluate --weights model.safetensors [--data digits|mnist5k|cifar10|imagefolder|synthetic]
[--root DIR] [--eval_capacity_factor F] [--router paper|bpr|expert_choice] [--device cpu|cuda] [--dtype fp32|bf16|fp16]
[--batch N] [--json]`

Top-1 of an exported model on a test split, and a per-depth routing summary (expert shares, drop
rate, and how often a token's experts change from one depth to the next). Runs the standalone
model (standalone.py) in plain PyTorch: nothing on this path imports DeepSpeed, so it works where
DeepSpeed is not installed; torch.distributed is never initialised (one process, all experts).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from .config import PAPER_GATE_ROUTERS, ConfigError, DataConfig


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def evaluate_exported(weights: Path, data: DataConfig, device: str = "cpu", batch: int = 128,
                      eval_capacity_factor: Optional[float] = None, dtype: str = "fp32",
                      router: Optional[str] = None) -> dict[str, Any]:
    """Top-1, loss and per-depth routing of an exported model (the standalone model, exact padded
    evaluation as the trainer's); `dtype` casts the fp32 weights as a bf16/fp16 engine holds them
    (the router still computes in fp32, as DeepSpeed's gate does). `router` evaluates a model trained
    with the paper's gate with Batch Prioritized Routing instead, or back (the same gate weights: only
    the order in which tokens take capacity differs), as V-MoE evaluates at lower capacity factors."""
    import torch

    from .export import load_exported
    from .data import EvalSampler, build_datasets, build_loader
    from .evaluation import evaluate_loader

    moe: dict[str, Any] = {}
    if eval_capacity_factor:
        moe["eval_capacity_factor"] = eval_capacity_factor
    if router:
        from .export import read_export_info

        trained = (read_export_info(Path(weights))["model"].get("moe") or {}).get("router", "paper")
        if trained not in PAPER_GATE_ROUTERS:
            raise ConfigError(f"--router {router}: this export was trained with router={trained}, whose gate only "
                              "it evaluates: drop --router")
        moe["router"] = router
    overrides = {"moe": moe} if moe else None
    torch_dtype = getattr(torch, DTYPES[dtype])
    model = load_exported(weights, device, overrides).to(torch_dtype)
    _, test = build_datasets(data, model.cfg, seed=0)
    loader = build_loader(test, EvalSampler(len(test), batch, 1, 0), data.num_workers)
    r = evaluate_loader(model, loader, device, torch_dtype)
    result: dict[str, Any] = {"weights": str(weights), "top1": r["top1"], "eval_loss": r["eval_loss"],
                              "images": r["eval_images"]}
    if "eval_expert_share_per_depth" in r:
        result["expert_share_per_depth"] = r["eval_expert_share_per_depth"]
        result["drop_rate_per_depth"] = r["eval_drop_rate"]
        result["experts_changed_next_depth"] = r["eval_route_change"]
    return result


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds_widenet.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--data", default="digits", choices=["digits", "mnist5k", "cifar10", "cifar100", "imagefolder", "synthetic"])
    ap.add_argument("--root", default=None)
    ap.add_argument("--eval_capacity_factor", type=float, default=None)
    ap.add_argument("--router", default=None, choices=list(PAPER_GATE_ROUTERS),
                    help="evaluate a model trained with one of these routers with another (the same gate weights: "
                         "only which tokens take the experts' capacity changes)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                    help="cast the fp32 weights for evaluation (bf16 reproduces a bf16 engine's evaluation)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    try:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.root and not Path(args.root).exists():
            raise ConfigError(f"--root {args.root} does not exist")
        data = DataConfig(name=args.data, root=args.root, augment="none")
        result = evaluate_exported(args.weights, data, device, args.batch, args.eval_capacity_factor, args.dtype,
                                   args.router)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"top-1 {result['top1']:.4f} on {result['images']} images ({args.data}), loss {result['eval_loss']:.4f}")
    for i, share in enumerate(result.get("expert_share_per_depth", [])):
        chg = result.get("experts_changed_next_depth", [])
        nxt = f"  experts change at next depth: {chg[i]:.1%}" if i < len(chg) and chg[i] is not None else ""
        print(f"depth {i}: expert share {share}  dropped {result['drop_rate_per_depth'][i]:.2%}{nxt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
