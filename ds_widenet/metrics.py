"""metrics.jsonl, routing-statistic aggregation over depths and ranks, DeepSpeed's monitors,
routing warnings and the non-finite-loss policy.

Records in metrics.jsonl (one JSON object per line, rank 0 writes):

* a log step: `step`, `loss`, `aux_loss`, `lr`, ..., and per depth (lists indexed by depth, i.e.
  by MoE call: every depth of WideNet, the MoE blocks of ViT-MoE) `expert_share` ([depth][expert]
  fraction of that depth's processed routes), `drop_rate`, `aux_per_depth`, `router_entropy`
  (nats; ln(E) is a uniform router, 0 a collapsed one), plus `min_expert_share` (overall);
* an evaluation: `top1`, `eval_loss`, ..., `eval_drop_rate`, `eval_router_entropy`, and
  `eval_route_change`: for each pair of consecutive depths (i, i+1), the fraction of tokens whose
  chosen experts (the top-k set) differ between depth i and depth i+1;
* a warning: `{"step": N, "warning": "..."}` (also printed on rank 0 through `logging`).

DeepSpeed's monitors (TensorBoard / CSV / W&B) get every scalar as `Train/<key>` / `Eval/<key>`
and the per-depth lists as `Routing/depth{i}/{drop_rate,entropy,aux_loss,expert{e}_share}`,
`EvalRouting/depth{i}/{drop_rate,entropy}` and `EvalRouting/depth{i}_to_{i+1}/route_change`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.distributed as dist

if TYPE_CHECKING:  # annotations only: the report reads metrics without importing deepspeed
    from .models.routing import RoutingStats

logger = logging.getLogger("ds_widenet")


def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (a collective when torch.distributed is up)."""
    if _dist_world() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _r(v: float, nd: int = 4) -> Optional[float]:
    return round(float(v), nd) if math.isfinite(float(v)) else None


def route_changes(routing: Sequence[RoutingStats]) -> tuple[torch.Tensor, torch.Tensor]:
    """For consecutive depths (i, i+1): (tokens whose top-k expert set changed, tokens compared), [D-1] each,
    on the routes' device.

    A token is compared when all its k routes were kept at both depths: a dropped route (-1, also
    the padding mark) says nothing about which expert the router chose, so such tokens are left out."""
    changed, compared = [], []
    for a, b in zip(routing[:-1], routing[1:]):
        ia, ib = a.expert_index, b.expert_index  # [k, B, T]
        if ia.shape != ib.shape:
            changed.append(torch.zeros((), device=ia.device))
            compared.append(torch.zeros((), device=ia.device))
            continue
        full = (ia >= 0).all(0) & (ib >= 0).all(0)
        diff = (ia.sort(0).values != ib.sort(0).values).any(0)
        changed.append((diff & full).sum().float())
        compared.append(full.sum().float())
    if not changed:
        return torch.zeros(0), torch.zeros(0)
    return torch.stack(changed), torch.stack(compared)


class RoutingAccumulator:
    """Sums per-depth routing statistics over micro-steps; `reduce()` sums them over all ranks.
    `route_change=True` also compares consecutive depths' expert choices (a sort per depth pair:
    evaluation only, kept off the training hot path)."""

    def __init__(self, route_change: bool = False) -> None:
        self.track_changes = route_change
        self.tokens: Optional[torch.Tensor] = None  # [depth, E] routes processed
        self.dropped: Optional[torch.Tensor] = None  # [depth] sum of drop fractions x used tokens
        self.entropy: Optional[torch.Tensor] = None  # [depth] sum of mean entropies x used tokens
        self.weight: Optional[torch.Tensor] = None  # [depth] used tokens
        self.aux: Optional[torch.Tensor] = None  # [depth] sum of per-call aux losses
        self.changed: Optional[torch.Tensor] = None  # [depth-1] tokens whose top-k set changed i -> i+1
        self.compared: Optional[torch.Tensor] = None  # [depth-1] tokens compared
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
        tokens, dropped, ent, w, aux, changed, compared = torch.cat(parts).cpu().split(sizes)  # one device sync
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
        route change between consecutive depths, and the minimum overall expert share.
        Every rank must call it (it is a collective when torch.distributed is up)."""
        if self.tokens is None:
            return None
        parts = [self.tokens.flatten(), self.dropped, self.entropy, self.weight, self.aux, self.changed,
                 self.compared, torch.tensor([float(self.calls)])]
        sizes = [p.numel() for p in parts]
        packed = torch.cat(parts).double()
        if _dist_world() > 1:
            dist.all_reduce(packed)
        tokens, dropped, ent, weight, aux, changed, compared, calls = packed.split(sizes)
        tokens = tokens.view(self.tokens.shape)
        weight = weight.clamp(min=1e-12)
        share = tokens / tokens.sum(dim=1, keepdim=True).clamp(min=1)
        overall = tokens.sum(0) / tokens.sum().clamp(min=1)
        change = torch.where(compared > 0, changed / compared.clamp(min=1), torch.full_like(changed, float("nan")))
        return {
            "expert_share": [[_r(v) for v in row] for row in share.tolist()],
            "expert_share_overall": [_r(v) for v in overall.tolist()],
            "min_expert_share": _r(overall.min()),
            "drop_rate": [_r(v) for v in (dropped / weight).tolist()],
            "aux_per_depth": [_r(v) for v in (aux / calls.clamp(min=1)).tolist()],
            "router_entropy": [_r(v) for v in (ent / weight).tolist()],
            "route_change": [_r(v) for v in change.tolist()],
        }


TRAIN_ROUTING_KEYS = ("min_expert_share", "expert_share", "drop_rate", "aux_per_depth", "router_entropy")


def routing_fields(summary: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The routing part of a training log record (see the module doc)."""
    return {} if summary is None else {k: summary[k] for k in TRAIN_ROUTING_KEYS}


def all_reduce_mean(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if _dist_world() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


# Per-depth lists -> monitor scalars: key -> (group, name); "{e}" expands over experts.
_PER_DEPTH_EVENTS = {
    "expert_share": ("Routing/depth{i}", "expert{e}_share"),
    "drop_rate": ("Routing/depth{i}", "drop_rate"),
    "aux_per_depth": ("Routing/depth{i}", "aux_loss"),
    "router_entropy": ("Routing/depth{i}", "entropy"),
    "eval_drop_rate": ("EvalRouting/depth{i}", "drop_rate"),
    "eval_router_entropy": ("EvalRouting/depth{i}", "entropy"),
    "eval_route_change": ("EvalRouting/depth{i}_to_{j}", "route_change"),
    "eval_expert_share": ("EvalRouting", "expert{i}_share"),  # overall, one value per expert
}


def monitor_events(record: dict[str, Any], prefix: str = "Train") -> list[tuple[str, float, int]]:
    """(name, value, step) events for DeepSpeed's monitors from one metrics.jsonl record."""
    step = int(record.get("step", 0))
    events = []
    for key, value in record.items():
        if key in ("step", "time"):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            events.append((f"{prefix}/{key}", float(value), step))
        elif isinstance(value, list) and key in _PER_DEPTH_EVENTS:
            group, name = _PER_DEPTH_EVENTS[key]
            for i, v in enumerate(value):
                for e, x in (enumerate(v) if isinstance(v, list) else [(None, v)]):
                    if isinstance(x, (int, float)) and math.isfinite(float(x)):
                        events.append((f"{group.format(i=i, j=i + 1)}/{name.format(i=i, e=e)}", float(x), step))
    return events


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
            events = monitor_events(record, prefix)
            if events:
                self.monitor.write_events(events)

    def warn(self, step: int, message: str) -> None:
        """A `{"step", "warning"}` record, and the message on rank 0's stderr."""
        if not self.enabled:
            return
        self.write({"step": step, "warning": message})
        _warning_logger().warning("step %d: %s", step, message)


def _warning_logger() -> logging.Logger:
    # A CLI run has no logging configuration: print "warning: step N: ..." on stderr. An
    # application that configured logging (a root handler) gets the records instead.
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    return logger


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


def _innermost_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, BF16_Optimizer, FP16_Optimizer)."""
    seen = 0
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer") and seen < 8:
        opt, seen = opt.optimizer, seen + 1
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"no torch optimizer inside {type(opt).__name__}")
    return opt


class NonFiniteGuard:
    """The recipe's `train.nan_policy` for a loss that is non-finite on any rank.

    The caller computes `bad` with an all-rank OR, so every rank takes the same path:

    * `stop`: `stop_reason()` gives the one-line error for the caller to raise.
    * `skip`: the optimizer step that contains the micro-batch is skipped on every rank. DeepSpeed
      has no "skip this step" call outside its fp16 overflow path, and its engine cannot simply
      miss a backward: the boundary backward does the gradient all-reduce (ZeRO-0) or the ZeRO
      reduction, and ZeRO's bookkeeping starts in hooks on the forward's outputs. So the micro-batch
      still goes through `engine.backward(loss)` - every reduction and every rank stays aligned -
      but a hook on every parameter replaces its gradient by zeros before it is accumulated (a
      `loss * 0` or `nan_to_num(loss)` would still send NaN into the weights' gradients through
      the NaN activations). At the accumulation boundary `engine.step()` runs with the torch
      optimizer's `step` replaced by a no-op: ZeRO/BF16 wrappers copy back their unchanged fp32
      masters, the engine zeroes the gradients (the window's earlier micro-batches are discarded
      with them), weights and optimizer state (moments, step counts) are untouched. The LR
      scheduler still advances and the data of the step is consumed, so the step counter, data
      order and schedule stay those of the run without the skip; `engine.skipped_steps` counts it.
      Unrecoverable cases stop instead: non-finite weights, or more than
      `max_consecutive` skipped steps in a row.
    """

    def __init__(self, engine: Any, policy: str, log: MetricsLog, max_consecutive: int = 10) -> None:
        self.engine = engine
        self.policy = policy
        self.log = log
        self.max_consecutive = max_consecutive
        self.poisoned = False  # the current accumulation window holds a skipped micro-batch
        self.skipped = 0  # optimizer steps skipped in this process's run
        self.consecutive = 0

    @classmethod
    def from_config(cls, engine: Any, train_cfg: Any, log: MetricsLog) -> "NonFiniteGuard":
        return cls(engine, train_cfg.nan_policy, log, train_cfg.nan_max_consecutive_skips)

    def stop_reason(self, step: int) -> Optional[str]:
        """After a non-finite loss on some rank (call on every rank; `step` counts the completed
        optimizer steps, so the failing one is step + 1 as in metrics.jsonl): the error that ends
        the run, or None."""
        at = f"optimizer step {step + 1}"
        if self.policy == "stop":
            return (f"non-finite loss at {at} (nothing saved from this run is overwritten): lower optim.lr, enable "
                    "gradient_clipping in the DeepSpeed config, use fp32, or set train.nan_policy=skip")
        if any_rank(not all(bool(torch.isfinite(p).all()) for p in self.engine.module.parameters())):
            return (f"non-finite loss at {at} with non-finite weights: skipping steps cannot recover "
                    "(train.nan_policy=skip); lower optim.lr or enable gradient_clipping in the DeepSpeed config")
        if self.consecutive + (0 if self.poisoned else 1) > self.max_consecutive:
            return (f"non-finite loss in more than {self.max_consecutive} optimizer steps in a row ({at}; "
                    "train.nan_max_consecutive_skips): lower optim.lr, enable gradient_clipping, or check the data")
        return None

    def backward(self, loss: torch.Tensor, bad: bool, step: int) -> None:
        """`engine.backward(loss)`; with `bad`, every parameter receives a zero gradient instead."""
        if not bad:
            self.engine.backward(loss)
            return
        if not self.poisoned:
            self.log.warn(step + 1, f"non-finite loss: optimizer step {step + 1} is skipped on every rank "
                                    f"(train.nan_policy=skip; {self.skipped + 1} skipped so far)")
        self.poisoned = True
        hooks = [p.register_hook(torch.zeros_like) for p in self.engine.module.parameters() if p.requires_grad]
        try:
            self.engine.backward(loss)
        finally:
            for h in hooks:
                h.remove()

    def step(self) -> bool:
        """`engine.step()`; at the boundary of a window with a skipped micro-batch, without the update.
        Returns True when an optimizer step was skipped."""
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return False
        if not self.poisoned:
            self.engine.step()
            self.consecutive = 0
            return False
        opt = _innermost_optimizer(self.engine.optimizer)
        had_attr = "step" in opt.__dict__
        original = opt.__dict__.get("step")

        def no_update(*args: Any, **kwargs: Any) -> None:
            opt._opt_called = True  # type: ignore[attr-defined]  # keeps torch's LR-scheduler order check quiet

        no_update._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        opt.step = no_update  # type: ignore[method-assign]
        try:
            self.engine.step()
        finally:
            if had_attr:
                opt.step = original  # type: ignore[method-assign]
            else:
                del opt.step
        self.engine.skipped_steps += 1
        self.poisoned = False
        self.skipped += 1
        self.consecutive += 1
        return True


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read metrics.jsonl, ignoring a torn last line (a run still in progress or killed)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def split_metrics(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Train / eval / warning / event records. A resumed run appends to metrics.jsonl and logs again
    the steps after its checkpoint: a record whose step is not after the previous one of its kind
    supersedes the earlier records from that step on."""
    out: dict[str, list[dict[str, Any]]] = {"train": [], "eval": [], "warning": [], "event": []}
    for row in rows:
        kind = ("train" if "loss" in row else "eval" if "top1" in row else "warning" if "warning" in row
                else "event" if "event" in row else None)
        if kind is None:
            continue
        seq = out[kind]
        if kind in ("train", "eval"):
            step = row.get("step", 0)
            while seq and seq[-1].get("step", 0) >= step:
                seq.pop()
        seq.append(row)
    return out


def route_digest(routing: Sequence[RoutingStats], sample_ids: torch.Tensor) -> torch.Tensor:
    """One int64 per depth that identifies every token's expert choices: the sum over (sample,
    token, choice) of (expert + 2) x a 20-bit hash of (global sample id, token, choice). Sums are
    order-free, so all-reducing the micro-steps of all ranks gives the same digest for the same
    choices on any layout (the equivalence tests compare it step by step)."""
    from . import rng

    if not routing:
        return torch.zeros(0, dtype=torch.int64)
    experts = torch.stack([r.expert_index for r in routing]).cpu().to(torch.int64)  # [depths, k, b, t]: one copy
    _, k, b, t = experts.shape
    ids = sample_ids.reshape(1, b, 1).to(torch.int64).cpu()
    choice = torch.arange(k, dtype=torch.int64).reshape(k, 1, 1)
    token = torch.arange(t, dtype=torch.int64).reshape(1, 1, t)
    h = rng.hash_keys([0xD16E57, ids, choice, token], (k, b, t)) & 0xFFFFF  # the same for every depth
    return ((experts + 2) * h).sum(dim=(1, 2, 3))


def all_reduce_sum_int(t: torch.Tensor) -> list[int]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


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
    if _dist_world() > 1:
        dist.all_reduce(sums)
    result: dict[str, Any] = {"top1": float(sums[0] / sums[1]), "eval_loss": float(sums[2] / sums[1]),
                              "eval_images": int(sums[1])}
    r = routing.reduce()
    if r is not None:
        result.update({"eval_min_expert_share": r["min_expert_share"], "eval_expert_share": r["expert_share_overall"],
                       "eval_expert_share_per_depth": r["expert_share"], "eval_drop_rate": r["drop_rate"],
                       "eval_router_entropy": r["router_entropy"], "eval_route_change": r["route_change"]})
    return result

