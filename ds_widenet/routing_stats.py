"""Routing statistics over depths, micro-steps and ranks, and the warnings drawn from them."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.distributed as dist

from .distributed import dist_world

if TYPE_CHECKING:
    from .routing_core import RoutingStats
    from .runlog import MetricsLog


def _r(v: float, nd: int = 4) -> Optional[float]:
    return round(float(v), nd) if math.isfinite(float(v)) else None


def depth_pairs(depth: int) -> list[tuple[int, int]]:
    """Every pair of depths (i, j), i < j, row-major: (0, 1), (0, 2), ..., (1, 2), ..."""
    return [(i, j) for i in range(depth) for j in range(i + 1, depth)]


def route_changes(routing: Sequence[RoutingStats]) -> tuple[torch.Tensor, torch.Tensor]:
    """For every pair of depths (depth_pairs): (tokens whose top-k expert set changed, tokens
    compared), one entry per pair, on the routes' device.

    A token is compared when all its k routes were kept at both depths: a dropped route (-1, also
    the padding mark) says nothing about which expert the router chose, so such tokens are left out.
    With expert choice (rows indexed by expert, see RoutingStats) a token is compared when some
    expert took it at both depths, and it changed when the set of experts that took it differs."""
    pairs = depth_pairs(len(routing))
    if not pairs:
        return torch.zeros(0), torch.zeros(0)
    # per depth once: the chosen set in a canonical order, and which tokens count
    sets = [r.expert_index if r.expert_choice else r.expert_index.sort(0).values for r in routing]
    full = [(r.expert_index >= 0).any(0) if r.expert_choice else (r.expert_index >= 0).all(0) for r in routing]
    changed, compared = [], []
    for i, j in pairs:
        a, b = routing[i], routing[j]
        if sets[i].shape != sets[j].shape or a.expert_choice != b.expert_choice:
            changed.append(torch.zeros((), device=sets[i].device))
            compared.append(torch.zeros((), device=sets[i].device))
            continue
        both = full[i] & full[j]
        changed.append(((sets[i] != sets[j]).any(0) & both).sum().float())
        compared.append(both.sum().float())
    return torch.stack(changed), torch.stack(compared)


class RoutingAccumulator:
    """Sums per-depth routing statistics over micro-steps, on their device; `reduce()` sums them
    over all ranks and reads them back once.
    `route_change=True` also compares every pair of depths' expert choices (a sort per depth and a
    comparison per pair: evaluation only, kept off the training hot path)."""

    def __init__(self, route_change: bool = False) -> None:
        self.track_changes = route_change
        self.tokens: Optional[torch.Tensor] = None  # [depth, E] routes processed
        self.dropped: Optional[torch.Tensor] = None  # [depth] sum of drop fractions x used tokens
        self.entropy: Optional[torch.Tensor] = None  # [depth] sum of mean entropies x used tokens
        self.weight: Optional[torch.Tensor] = None  # [depth] used tokens
        self.aux: Optional[torch.Tensor] = None  # [depth] sum of per-call aux losses
        # per depth pair (depth_pairs; zeros for consecutive pairs without route_change): tokens whose
        # top-k set changed, tokens compared
        self.changed: Optional[torch.Tensor] = None
        self.compared: Optional[torch.Tensor] = None
        self.calls = 0

    def add(self, routing: Sequence[RoutingStats]) -> None:
        if not routing:
            return
        d = len(routing)
        dev = routing[0].expert_tokens.device
        one, nan = torch.ones((), device=dev), torch.full((), float("nan"), device=dev)
        w = torch.stack([r.num_tokens.float() if r.num_tokens is not None else one for r in routing])
        if self.track_changes:
            changed, compared = route_changes(routing)
        else:
            changed = compared = torch.zeros(max(d - 1, 0), device=dev)
        parts = [torch.stack([r.expert_tokens.float() for r in routing]).flatten(),
                 torch.stack([r.dropped.float() for r in routing]) * w,
                 torch.stack([r.entropy.float() if r.entropy is not None else nan for r in routing]) * w,
                 w, torch.stack([r.aux_loss.detach().float() for r in routing]), changed.to(dev), compared.to(dev)]
        sizes = [p.numel() for p in parts]
        # on the device: no host read per micro-step (reduce() reads once, at a log step)
        tokens, dropped, ent, w, aux, changed, compared = torch.cat(parts).split(sizes)
        tokens = tokens.view(d, -1)
        if self.tokens is None:
            self.tokens, self.dropped, self.entropy, self.weight, self.aux = tokens, dropped, ent, w, aux
            self.changed, self.compared = changed, compared
        else:
            self.tokens += tokens
            self.dropped += dropped
            self.entropy += ent
            self.weight += w
            self.aux += aux
            self.changed += changed
            self.compared += compared
        self.calls += 1

    def reduce(self) -> Optional[dict[str, Any]]:
        """All-reduce and summarise per depth: expert share, drop rate, aux loss, router entropy,
        route change between consecutive depths (with route_change=True also `route_change_matrix`,
        every pair of depths), and the minimum overall expert share.
        Every rank must call it (it is a collective when torch.distributed is up)."""
        if self.tokens is None:
            return None
        parts = [self.tokens.flatten(), self.dropped, self.entropy, self.weight, self.aux, self.changed,
                 self.compared, self.tokens.new_tensor([float(self.calls)])]
        sizes = [p.numel() for p in parts]
        packed = torch.cat(parts).double()
        if dist_world() > 1:
            dist.all_reduce(packed)  # on the statistics' device (NCCL on a GPU)
        packed = packed.cpu()  # the one read
        tokens, dropped, ent, weight, aux, changed, compared, calls = packed.split(sizes)
        tokens = tokens.view(self.tokens.shape)
        weight = weight.clamp(min=1e-12)
        share = tokens / tokens.sum(dim=1, keepdim=True).clamp(min=1)
        overall = tokens.sum(0) / tokens.sum().clamp(min=1)
        change = torch.where(compared > 0, changed / compared.clamp(min=1), torch.full_like(changed, float("nan")))
        depth = tokens.shape[0]
        matrix = None
        if self.track_changes:  # every pair i < j: the consecutive ones are route_change
            m = torch.zeros(depth, depth, dtype=change.dtype)
            for v, (i, j) in zip(change.tolist(), depth_pairs(depth)):
                m[i, j] = m[j, i] = v
            matrix = m
            change = torch.stack([m[i, i + 1] for i in range(depth - 1)]) if depth > 1 else change[:0]
        out = {
            "expert_share": [[_r(v) for v in row] for row in share.tolist()],
            "expert_share_overall": [_r(v) for v in overall.tolist()],
            "min_expert_share": _r(overall.min()),
            "drop_rate": [_r(v) for v in (dropped / weight).tolist()],
            "aux_per_depth": [_r(v) for v in (aux / calls.clamp(min=1)).tolist()],
            "router_entropy": [_r(v) for v in (ent / weight).tolist()],
            "route_change": [_r(v) for v in change.tolist()],
        }
        if matrix is not None:
            out["route_change_matrix"] = [[_r(v) for v in row] for row in matrix.tolist()]
        return out


TRAIN_ROUTING_KEYS = ("min_expert_share", "expert_share", "drop_rate", "aux_per_depth", "router_entropy")


def routing_fields(summary: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The routing part of a training log record (see the module doc)."""
    return {} if summary is None else {k: summary[k] for k in TRAIN_ROUTING_KEYS}


class RoutingWatch:
    """Warnings at log steps when routing goes wrong (from the all-reduced summary, so every rank
    sees the same; only rank 0 writes):

    * an expert under `min_share` of a depth's routes for `patience` consecutive log steps
      (a collapsing router; the uniform share is 1/num_experts);
    * a depth dropping more than `max_drop` of its routes (capacity too small for the load).

    One warning per episode: a condition is reported when it starts and again only after it has
    cleared. `min_share` 0 / `max_drop` 1 turn a check off."""

    def __init__(self, log: MetricsLog, min_share: float = 0.05, patience: int = 3, max_drop: float = 0.3) -> None:
        self.log = log
        self.min_share = min_share
        self.patience = patience
        self.max_drop = max_drop
        self.streak: Optional[torch.Tensor] = None  # [depth, E] consecutive low log steps
        self.dropping: set[int] = set()

    @classmethod
    def from_config(cls, train_cfg: Any, log: MetricsLog) -> "RoutingWatch":
        return cls(log, train_cfg.warn_min_expert_share, train_cfg.warn_patience, train_cfg.warn_max_drop_rate)

    def update(self, step: int, summary: Optional[dict[str, Any]]) -> list[str]:
        """Check one log step's routing summary; returns (and logs) the warnings issued."""
        if summary is None:
            return []
        issued = []
        if self.min_share > 0:
            share = torch.tensor([[float("nan") if v is None else v for v in row] for row in summary["expert_share"]])
            low = share < self.min_share
            if self.streak is None or self.streak.shape != low.shape:
                self.streak = torch.zeros(low.shape, dtype=torch.long)
            self.streak = torch.where(low, self.streak + 1, torch.zeros_like(self.streak))
            hit = (self.streak == self.patience).nonzero().tolist()
            if hit:
                where = ", ".join(f"depth {d} expert {e} ({share[d, e]:.3f})" for d, e in hit)
                issued.append(f"expert share under {self.min_share:g} of a depth's routes for {self.patience} "
                              f"consecutive log steps: {where} (uniform is {1 / share.shape[1]:.3f}): the router is "
                              "collapsing; consider a larger model.moe.aux_loss_weight or a lower optim.lr")
        if self.max_drop < 1:
            rates = summary["drop_rate"]
            over = {d for d, v in enumerate(rates) if v is not None and v > self.max_drop}
            new = sorted(over - self.dropping)
            self.dropping = over
            if new:
                where = ", ".join(f"depth {d} ({rates[d]:.3f})" for d in new)
                issued.append(f"drop rate above {self.max_drop:g} at {where}: those routes exceed the experts' "
                              "capacity and skip the MoE layer; raise model.moe.capacity_factor (or "
                              "model.moe.aux_loss_weight if the load is unbalanced)")
        for msg in issued:
            self.log.warn(step, msg)
        return issued


