"""Test-only behaviour, installed from outside through the Trainer's hook methods.

* Negative controls (DS_WIDENET_NEGATIVE_CONTROL=<name>): each reproduces a known MoE bug, so the
  equivalence tests can show they catch it.
    expert_grad_scale   expert gradients multiplied by ep_size (DeepSpeed #5618, #6545)
    lamb_per_partition  LAMB's trust ratio per ZeRO partition (DeepSpeed #88, #490)
    clip_avg            DeepSpeed's ZeRO-0 clipping by the average of per-rank norms (#8475)
    noise_per_rank      router noise from each rank's own generator instead of keyed by sample
* Fault injection (DS_WIDENET_FAULT=<train|save>:<step>:<rank>): that rank SIGKILLs itself after
  optimizer step <step> (train) or once its files of the checkpoint at <step> are written (save).
* Route digest (always): every log record gets `route_digest`, one integer per depth that
  identifies every token's expert choices (see route_digest), for the step-by-step comparison.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

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


def parse_fault(spec: Optional[str]) -> Optional[tuple[str, int, int]]:
    if not spec:
        return None
    where, step, rank = spec.split(":")
    if where not in ("train", "save"):
        raise ValueError(f"DS_WIDENET_FAULT={spec!r}: use train|save:<step>:<rank>")
    return where, int(step), int(rank)


class InstrumentedTrainer(Trainer):
    """The Trainer with route digests, and optionally one negative control and one fault."""

    control: Optional[str] = None
    fault: Optional[tuple[str, int, int]] = None

    def test_switches(self) -> list[str]:
        on = [f"negative control {self.control}"] if self.control else []
        if self.fault:
            on.append(f"fault injection {':'.join(map(str, self.fault))}")
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
    def _maybe_die(self, where: str, step: int) -> None:
        if self.fault == (where, step, self.info.rank):
            os.kill(os.getpid(), 9)

    def after_optimizer_step(self, step: int) -> None:
        self._maybe_die("train", step)

    def after_checkpoint_write(self, step: int) -> None:
        self._maybe_die("save", step)

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
    return type("InstrumentedTrainer", (InstrumentedTrainer,), {"control": control, "fault": fault})
