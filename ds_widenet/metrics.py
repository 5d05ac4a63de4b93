"""metrics.jsonl, routing-statistic aggregation over depths and ranks, DeepSpeed's monitors."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from .models.routing import RoutingStats


class RoutingAccumulator:
    """Sums per-depth routing statistics over micro-steps; `reduce()` sums them over all ranks."""

    def __init__(self) -> None:
        self.tokens: Optional[torch.Tensor] = None  # [depth, E] routes processed
        self.dropped: Optional[torch.Tensor] = None  # [depth] sum of per-call drop fractions
        self.aux: Optional[torch.Tensor] = None  # [depth]
        self.calls = 0

    def add(self, routing: Sequence[RoutingStats]) -> None:
        if not routing:
            return
        tokens = torch.stack([r.expert_tokens.float().cpu() for r in routing])
        dropped = torch.stack([r.dropped.float().cpu() for r in routing])
        aux = torch.stack([r.aux_loss.detach().float().cpu() for r in routing])
        if self.tokens is None:
            self.tokens, self.dropped, self.aux = tokens, dropped, aux
        else:
            self.tokens += tokens
            self.dropped += dropped
            self.aux += aux
        self.calls += 1

    def reduce(self) -> Optional[dict[str, Any]]:
        """All-reduce and summarise: expert share per depth, drop rate per depth, the minimum share.
        Every rank must call it (it is a collective when torch.distributed is up)."""
        if self.tokens is None:
            return None
        packed = torch.cat([self.tokens.flatten(), self.dropped, self.aux, torch.tensor([float(self.calls)])])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed)
        d, e = self.tokens.shape
        tokens = packed[: d * e].view(d, e)
        calls = packed[-1].clamp(min=1)
        dropped = packed[d * e: d * e + d] / calls
        aux = packed[d * e + d: d * e + 2 * d] / calls
        share = tokens / tokens.sum(dim=1, keepdim=True).clamp(min=1)
        overall = tokens.sum(0) / tokens.sum().clamp(min=1)
        return {
            "expert_share": [[round(v, 4) for v in row] for row in share.tolist()],
            "expert_share_overall": [round(v, 4) for v in overall.tolist()],
            "min_expert_share": round(float(overall.min()), 4),
            "drop_rate": [round(v, 4) for v in dropped.tolist()],
            "aux_per_depth": [round(v, 4) for v in aux.tolist()],
        }


def all_reduce_mean(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


class MetricsLog:
    """Appends one JSON object per line to <out>/metrics.jsonl (rank 0 only) and mirrors scalars
    to DeepSpeed's monitors (TensorBoard / CSV / W&B, as configured in the DeepSpeed JSON)."""

    def __init__(self, path: Path, enabled: bool, monitor: Any = None) -> None:
        self.path = path
        self.enabled = enabled
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) else None
        self.start = time.time()

    def write(self, record: dict[str, Any], prefix: str = "Train") -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time() - self.start, 3), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.monitor is not None:
            step = int(record.get("step", 0))
            events = [(f"{prefix}/{k}", float(v), step) for k, v in record.items()
                      if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(float(v))]
            self.monitor.write_events(events)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read metrics.jsonl, ignoring a torn last line (a run still in progress or killed)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
