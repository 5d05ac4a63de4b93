"""Exact evaluation over a padded loader, for the trainer and for exported models alike."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .distributed import dist_world
from .routing_stats import RoutingAccumulator


@torch.no_grad()
def evaluate_loader(forward: Any, loader: Any, device: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Top-1, loss and routing over a padded evaluation loader (index -1 = padding: masked out of
    routing and of the counts, so every real sample counts once on any world size). `forward` is a
    DeepSpeed engine or a plain model in eval mode; counts are summed over ranks when distributed."""
    routing = RoutingAccumulator(route_change=True)
    sums = torch.zeros(3, dtype=torch.float64)  # correct, count, loss sum
    for images, labels, idx in loader:
        valid = idx >= 0
        out = forward(images.to(device, dtype), sample_ids=idx.clamp(min=0).to(device), valid=valid.to(device))
        logits = out.logits.float().cpu()
        sums[0] += (logits.argmax(-1)[valid] == labels[valid]).sum()
        sums[1] += valid.sum()
        sums[2] += torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum")
        routing.add(out.routing)
    if dist_world() > 1:
        dist.all_reduce(sums)
    result: dict[str, Any] = {"top1": float(sums[0] / sums[1]), "eval_loss": float(sums[2] / sums[1]),
                              "eval_images": int(sums[1])}
    r = routing.reduce()
    if r is not None:
        result.update({"eval_min_expert_share": r["min_expert_share"], "eval_expert_share": r["expert_share_overall"],
                       "eval_expert_share_per_depth": r["expert_share"], "eval_drop_rate": r["drop_rate"],
                       "eval_router_entropy": r["router_entropy"], "eval_route_change": r["route_change"],
                       "eval_route_change_matrix": r["route_change_matrix"]})
    return result

