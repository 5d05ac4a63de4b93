"""The run log: metrics.jsonl, DeepSpeed's monitors, and rank 0's stdout.

Records in metrics.jsonl (one JSON object per line, rank 0 writes):

* a log step: `step`, `loss`, `aux_loss`, `z_loss` (with model.moe.z_loss_weight > 0), `lr`, ..., and per depth (lists indexed by depth, i.e.
  by MoE call: every depth of WideNet, the MoE blocks of ViT-MoE) `expert_share` ([depth][expert]
  fraction of that depth's processed routes), `drop_rate`, `aux_per_depth`, `router_entropy`
  (nats; ln(E) is a uniform router, 0 a collapsed one), plus `min_expert_share` (overall);
* an evaluation: `top1`, `eval_loss`, ..., `eval_drop_rate`, `eval_router_entropy`, and
  `eval_route_change`: for each pair of consecutive depths (i, i+1), the fraction of tokens whose
  chosen experts (the top-k set; with expert choice the set of experts that took the token) differ
  between depth i and depth i+1, and `eval_route_change_matrix`
  the same for every pair of depths ([depth][depth], symmetric, 0 on the diagonal);
* a warning: `{"step": N, "warning": "..."}`; an event: `{"step": N, "event": "..."}`.

DeepSpeed's monitors (TensorBoard / CSV / W&B) get every scalar as `Train/<key>` / `Eval/<key>`
and the per-depth lists as `Routing/depth{i}/{drop_rate,entropy,aux_loss,expert{e}_share}`,
`EvalRouting/depth{i}/{drop_rate,entropy}` and `EvalRouting/depth{i}_to_{i+1}/route_change`.

Rank 0's stdout (`train.log_format`): `text` writes one line per log step, evaluation, warning
and event (what a cluster job's log file needs), `json` the records themselves, `off` nothing.
On a terminal the progress bar replaces the per-step lines; warnings and events still print.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

logger = logging.getLogger("ds_widenet")


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


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _num(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _max_or_none(values: Optional[list]) -> Optional[float]:
    vals = [v for v in values or [] if v is not None]
    return max(vals) if vals else None


def train_line(rec: dict[str, Any], total_steps: int, eta_s: Optional[float]) -> str:
    """One human-readable line for a log step (see the module doc)."""
    step = rec["step"]
    parts = [f"step {step}/{total_steps} ({100 * step / max(total_steps, 1):.0f}%) epoch {rec.get('epoch', 0):.2f}",
             f"loss {_num(rec.get('loss'), '.4f')} aux {_num(rec.get('aux_loss'), '.4f')}",
             f"lr {rec.get('lr', 0):.2e}", f"{rec.get('images_per_sec', 0):.0f} img/s"]
    if rec.get("mfu") is not None:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    if eta_s is not None:
        parts.append(f"ETA {_fmt_duration(eta_s)}")
    if rec.get("min_expert_share") is not None:
        parts.append(f"min expert share {rec['min_expert_share']:.3f} max drop {_num(_max_or_none(rec.get('drop_rate')), '.3f')}")
    if rec.get("skipped_steps"):
        parts.append(f"skipped {rec['skipped_steps']}")
    return " | ".join(parts)


def eval_line(rec: dict[str, Any]) -> str:
    """One human-readable line for an evaluation."""
    n = rec.get("eval_images")
    correct = f" ({round(rec['top1'] * n)}/{n})" if n else ""
    parts = [f"eval step {rec['step']} epoch {rec.get('epoch', 0):.2f}", f"top-1 {rec['top1']:.4f}{correct}",
             f"loss {rec['eval_loss']:.4f}"]
    if rec.get("eval_min_expert_share") is not None:
        parts.append(f"min expert share {rec['eval_min_expert_share']:.3f} "
                     f"max drop {_num(_max_or_none(rec.get('eval_drop_rate')), '.3f')}")
    if rec.get("train_seconds") is not None:
        parts.append(f"{_fmt_duration(rec['train_seconds'])} training")
    return " | ".join(parts)


class Console:
    """Rank 0's live output: a tqdm bar on a terminal, else one line per record (`train.log_format`:
    text | json | off). Warnings and events print in every format but off, on the same stream
    (through the bar, on a terminal, so it stays intact)."""

    def __init__(self, fmt: str = "text", total_steps: int = 0, start_step: int = 0, bar: bool = False,
                 stream: Optional[TextIO] = None) -> None:
        self.fmt = fmt
        self.total_steps = total_steps
        self.stream = stream if stream is not None else sys.stdout
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        self._t0: Optional[tuple[float, int]] = None  # (time, step) of the first log step seen

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _eta(self, step: int) -> Optional[float]:
        now = time.time()
        if self._t0 is None:
            self._t0 = (now, step)
            return None
        t0, s0 = self._t0
        return (now - t0) / (step - s0) * (self.total_steps - step) if step > s0 else None

    def record(self, rec: dict[str, Any]) -> None:
        kind = "train" if "loss" in rec else "eval" if "top1" in rec else None
        if kind == "train":
            eta = self._eta(rec["step"])
            if self.bar is not None:
                self.bar.set_postfix(loss=_num(rec.get("loss"), ".3f"), lr=f"{rec.get('lr', 0):.2e}")
                return
        elif kind == "eval" and self.bar is not None:
            self.bar.set_postfix(top1=f"{rec['top1']:.4f}")
        if self.fmt == "off" or kind is None:
            return
        if self.fmt == "json":
            self._print(json.dumps(rec))
        elif kind == "train":
            self._print(train_line(rec, self.total_steps, eta))
        else:
            self._print(eval_line(rec))

    def message(self, step: int, kind: str, text: str) -> None:
        """A warning or an event."""
        if self.fmt == "json":
            self._print(json.dumps({"step": step, kind: text}))
        elif self.fmt == "text" or self.bar is not None:
            self._print(f"{kind} at step {step}: {text}")
        elif kind == "warning":
            _warning_logger().warning("step %d: %s", step, text)  # log_format=off: stderr only

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsLog:
    """Appends one JSON object per line to <out>/metrics.jsonl (rank 0 only), mirrors scalars to
    DeepSpeed's monitors (TensorBoard / CSV / W&B, as configured in the DeepSpeed JSON) and shows
    each record on rank 0's console."""

    def __init__(self, path: Path, enabled: bool, monitor: Any = None, console: Optional[Console] = None) -> None:
        self.path = path
        self.enabled = enabled
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) else None
        self.console = console if enabled else None
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
        if self.console is not None and ("loss" in record or "top1" in record):
            self.console.record(record)

    def warn(self, step: int, message: str) -> None:
        """A `{"step", "warning"}` record, shown on rank 0's console (stderr with no console)."""
        self._message(step, "warning", message)

    def event(self, step: int, message: str) -> None:
        """A `{"step", "event"}` record (resume, reshard, fine-tune), shown on rank 0's console."""
        self._message(step, "event", message)

    def _message(self, step: int, kind: str, message: str) -> None:
        if not self.enabled:
            return
        self.write({"step": step, kind: message})
        if self.console is not None:
            self.console.message(step, kind, message)
        elif kind == "warning":
            _warning_logger().warning("step %d: %s", step, message)
        else:
            print(f"ds_widenet: {message}", file=sys.stderr)


def _warning_logger() -> logging.Logger:
    # Without a console (library use) or with log_format=off: "warning: step N: ..." on stderr. An
    # application that configured logging (a root handler) gets the records instead.
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    return logger


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


