"""Guards: the non-finite-loss policy (`train.nan_policy`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from . import deepspeed_internals as dsi
from .distributed import any_rank

if TYPE_CHECKING:
    from .runlog import MetricsLog


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
      order and schedule stay those of the run without the skip; DeepSpeed's skipped-step counter counts it.
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
        with dsi.optimizer_update_skipped(self.engine):
            self.engine.step()
        self.poisoned = False
        self.skipped += 1
        self.consecutive += 1
        return True


