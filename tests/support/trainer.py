"""Test-only behaviour, installed from outside through the Trainer's hook methods.

* Negative controls (DS_WIDENET_NEGATIVE_CONTROL=<name>): each reproduces a known MoE bug, so the
  equivalence tests can show they catch it.
    expert_grad_scale   expert gradients multiplied by ep_size (DeepSpeed #5618, #6545)
    lamb_per_partition  LAMB's trust ratio per ZeRO partition (DeepSpeed #88, #490)
    clip_avg            DeepSpeed's ZeRO-0 clipping by the average of per-rank norms (#8475)
    noise_per_rank      router noise from each rank's own generator instead of keyed by sample
* Fault injection (DS_WIDENET_FAULT=<train|save>:<step>:<rank>[:kill|:pause]): that rank acts after
  optimizer step <step> (train) or once its files of the checkpoint at <step> are written (save):
  `kill` (the default) SIGKILLs itself; `pause` writes <out>/fault-paused-rank<rank> and waits
  (at most 300 s) until the test deletes it, so a test can act on the run at a known point (take a
  host's link down while the other ranks wait in that step's collectives or the save's barrier).
* Route digest (always): every log record gets `route_digest`, one integer per depth that
  identifies every token's expert choices (see route_digest), for the step-by-step comparison.
  It is computed on the device; the one read is at the log step.
* Sync counting (DS_WIDENET_COUNT_SYNCS=<dir>): every call of a host read (Tensor.item,
  __bool__, __float__, __int__, .cpu(), .tolist(), .numpy()) and of a torch.distributed collective
  made inside each micro-step (train_micro_step: forward, backward, the boundary's decisions,
  clipping and engine.step) is counted, and <dir>/rank<r>.json lists the counts per micro-step.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from ds_widenet import rng
from ds_widenet.trainer import Trainer

CONTROLS = ("expert_grad_scale", "lamb_per_partition", "clip_avg", "noise_per_rank")


def route_digest(routing: Sequence[Any], sample_ids: torch.Tensor) -> torch.Tensor:
    """One int64 per depth that identifies every token's expert choices: the sum over (sample,
    token, choice) of (expert + 2) x a 20-bit hash of (global sample id, token, choice). Sums are
    order-free, so all-reducing the micro-steps of all ranks gives the same digest for the same
    choices on any layout."""
    if not routing:
        return torch.zeros(0, dtype=torch.int64)
    experts = torch.stack([r.expert_index for r in routing]).to(torch.int64)  # [depths, k, b, t]
    dev = experts.device  # computed there: no host read per micro-step (log_record reads the sum)
    _, k, b, t = experts.shape
    ids = sample_ids.reshape(1, b, 1).to(device=dev, dtype=torch.int64)
    choice = torch.arange(k, dtype=torch.int64, device=dev).reshape(k, 1, 1)
    token = torch.arange(t, dtype=torch.int64, device=dev).reshape(1, 1, t)
    h = rng.hash_keys([0xD16E57, ids, choice, token], (k, b, t), dev) & 0xFFFFF  # the same for every depth
    return ((experts + 2) * h).sum(dim=(1, 2, 3))


def all_reduce_sum_int(t: torch.Tensor) -> list[int]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


HOST_READS = ("item", "__bool__", "__float__", "__int__", "cpu", "tolist", "numpy")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "all_to_all", "all_to_all_single", "broadcast", "reduce", "barrier", "all_reduce_coalesced",
               "send", "recv", "isend", "irecv", "gather", "scatter")


def _caller() -> str:
    """package/file.py:function of the nearest frame in ds_widenet or deepspeed (who issued the read
    or collective; deepspeed.comm's forwarding frames skipped)."""
    import traceback

    for fr in reversed(traceback.extract_stack()[:-2]):
        parts = Path(fr.filename).parts
        for pkg in ("ds_widenet", "deepspeed"):
            if pkg in parts and not (pkg == "deepspeed" and "comm" in parts):
                return "/".join(parts[parts.index(pkg):]) + f":{fr.name}"
    return "?"


@contextlib.contextmanager
def counting_syncs(counts: Counter, sites: Optional[Counter] = None) -> Iterator[None]:
    """Count host reads and collectives into `counts` ("read:item", "collective:all_reduce", ...)
    while the block runs (and, into `sites`, per calling line). Collectives are counted where DeepSpeed's comm layer and this project
    reach them: the torch.distributed module's functions (looked up at call time) and the two
    that deepspeed.comm keeps as bound references."""
    patched: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, key: str) -> None:
        orig = getattr(owner, name, None)
        if orig is None or getattr(orig, "_counted", False):
            return

        def counted(*a: Any, **k: Any) -> Any:
            counts[key] += 1
            if sites is not None:
                sites[f"{key} @ {_caller()}"] += 1
            return orig(*a, **k)

        counted._counted = True  # type: ignore[attr-defined]
        patched.append((owner, name, orig))
        setattr(owner, name, counted)

    for name in HOST_READS:
        wrap(torch.Tensor, name, f"read:{name}")
    for name in COLLECTIVES:
        wrap(dist, name, f"collective:{name}")
    try:
        from deepspeed.comm import comm as ds_comm

        cdb = getattr(ds_comm, "cdb", None)
        for attr, key in (("reduce_scatter_function", "reduce_scatter_tensor"),
                          ("all_gather_function", "all_gather_into_tensor")):
            if cdb is not None and getattr(cdb, attr, None) is not None:
                wrap(cdb, attr, f"collective:{key}")
    except ImportError:
        pass
    try:
        yield
    finally:
        for owner, name, orig in reversed(patched):
            setattr(owner, name, orig)


FAULT_ACTIONS = ("kill", "pause")


def parse_fault(spec: Optional[str]) -> Optional[tuple[str, int, int, str]]:
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) == 3:
        parts.append("kill")
    if len(parts) != 4 or parts[0] not in ("train", "save") or parts[3] not in FAULT_ACTIONS:
        raise ValueError(f"DS_WIDENET_FAULT={spec!r}: use train|save:<step>:<rank>[:kill|:pause]")
    where, step, rank, action = parts
    return where, int(step), int(rank), action


def pause_marker(out: Path, rank: int) -> Path:
    """The file a `pause` fault writes and waits on (the test deletes it to let the rank go on)."""
    return Path(out) / f"fault-paused-rank{rank}"


class InstrumentedTrainer(Trainer):
    """The Trainer with route digests, and optionally one negative control and one fault."""

    control: Optional[str] = None
    fault: Optional[tuple[str, int, int, str]] = None
    count_syncs: Optional[str] = None  # a directory: see the module doc

    def test_switches(self) -> list[str]:
        on = [f"negative control {self.control}"] if self.control else []
        if self.fault:
            shown = self.fault[:3] if self.fault[3] == "kill" else self.fault  # as written, the default left out
            on.append(f"fault injection {':'.join(map(str, shown))}")
        return on

    # -- negative controls --
    def project_clips(self) -> bool:
        return False if self.control == "clip_avg" else super().project_clips()

    def attach_zero_lamb(self) -> None:
        if self.control != "lamb_per_partition":
            super().attach_zero_lamb()

    def build_model(self) -> Any:
        from ds_widenet.models import PaperGate

        model = super().build_model()
        if self.control == "noise_per_rank":
            for m in model.modules():
                if isinstance(m, PaperGate):
                    m.noise_source = lambda shape, depth, key, device: torch.randn(*shape, device=device)
        return model

    def before_optimizer_step(self) -> None:
        if self.control == "expert_grad_scale":
            for p in self.engine.module.parameters():
                if getattr(p, "allreduce", True) is False and p.grad is not None:
                    p.grad.mul_(self.ep)

    # -- faults --
    def _maybe_fault(self, where: str, step: int) -> None:
        if self.fault is None or self.fault[:3] != (where, step, self.info.rank):
            return
        if self.fault[3] == "kill":
            os.kill(os.getpid(), 9)
        marker = pause_marker(self.plan.out, self.info.rank)
        marker.write_text(f"{where}:{step}\n")
        deadline = time.monotonic() + 300
        while marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def after_optimizer_step(self, step: int) -> None:
        self._maybe_fault("train", step)

    def after_checkpoint_write(self, step: int) -> None:
        self._maybe_fault("save", step)

    # -- sync counting --
    def train_micro_step(self, images: Any, labels: Any, idx: Any) -> bool:
        if not self.count_syncs:
            return super().train_micro_step(images, labels, idx)
        counts: Counter = Counter()
        sites: Counter = Counter()
        step, micro = self.step, self.micro
        with counting_syncs(counts, sites):
            boundary = super().train_micro_step(images, labels, idx)
        self._sync_counts = getattr(self, "_sync_counts", [])
        self._sync_counts.append({"step": step + 1, "micro": micro, "boundary": boundary,
                                  "log_step": bool(boundary and self.log_now), "counts": dict(counts),
                                  "sites": dict(sites)})
        return boundary

    def fit(self) -> dict[str, Any]:
        try:
            return super().fit()
        finally:
            if self.count_syncs:
                out = Path(self.count_syncs)
                out.mkdir(parents=True, exist_ok=True)
                (out / f"rank{self.info.rank}.json").write_text(json.dumps(getattr(self, "_sync_counts", [])))

    # -- route digest --
    def after_forward(self, out: Any, sample_ids: Any) -> None:
        d = route_digest(out.routing, sample_ids)
        self._digest = d if getattr(self, "_digest", None) is None else self._digest + d

    def log_record(self, rec: dict[str, Any]) -> dict[str, Any]:
        digest, self._digest = getattr(self, "_digest", None), None
        if digest is not None:
            rec["route_digest"] = all_reduce_sum_int(digest)
        return rec


def trainer_from_env(env: Optional[dict[str, str]] = None) -> type:
    env = dict(os.environ if env is None else env)
    control = env.get("DS_WIDENET_NEGATIVE_CONTROL") or None
    if control is not None and control not in CONTROLS:
        raise ValueError(f"DS_WIDENET_NEGATIVE_CONTROL={control!r}: use one of {', '.join(CONTROLS)}")
    fault = parse_fault(env.get("DS_WIDENET_FAULT"))
    return type("InstrumentedTrainer", (InstrumentedTrainer,),
                {"control": control, "fault": fault, "count_syncs": env.get("DS_WIDENET_COUNT_SYNCS") or None})
