"""Guards: the non-finite-loss policy (`train.nan_policy`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from . import deepspeed_internals as dsi
from .distributed import any_rank, dist_world

if TYPE_CHECKING:
    from .runlog import MetricsLog


class NonFiniteGuard:
    """The recipe's `train.nan_policy` for a loss that is non-finite on any rank.

    Nothing is read back to the host between optimizer steps: each micro-batch's loss gives a
    device flag (`finite`), and at the accumulation boundary `window_finite` reduces the window's
    flags over all ranks in one collective and reads them once, so every rank takes the same path:

    * `stop`: `bad_window()` gives the one-line error for the caller to raise.
    * `skip`: the optimizer step is skipped on every rank. DeepSpeed has no "skip this step" call
      outside its fp16 overflow path, and its engine cannot simply miss a backward: the boundary
      backward does the gradient all-reduce (ZeRO-0) or the ZeRO reduction, and ZeRO's bookkeeping
      starts in hooks on the forward's outputs. So every micro-batch goes through
      `engine.backward(loss)` (every reduction and every rank stays aligned), its non-finite
      gradients included: they are not known to be bad until the boundary. There `engine.step()`
      runs with the torch optimizer's `step` replaced by a no-op (ZeRO 1/2 in fp32/fp16 find the
      non-finite norm themselves and take their own overflow path: the same outcome), ZeRO/BF16
      wrappers copy back their unchanged fp32 masters, and the engine zeroes the gradients: the
      whole window's gradients, NaN ones included, are discarded; weights and optimizer state
      (moments, step counts) are untouched. The LR scheduler still advances and the data of the
      step is consumed, so the step counter, data order and schedule stay those of the run without
      the skip; DeepSpeed's skipped-step counter counts it once. Under fp16 the NaN gradients also
      take DeepSpeed's overflow path, which lowers the dynamic loss scale as any overflow does.
      Unrecoverable cases stop instead: non-finite weights, or more than `max_consecutive`
      skipped steps in a row.
    """

    def __init__(self, engine: Any, policy: str, log: MetricsLog, max_consecutive: int = 10) -> None:
        self.engine = engine
        self.policy = policy
        self.log = log
        self.max_consecutive = max_consecutive
        self.skipped = 0  # optimizer steps skipped in this process's run
        self.consecutive = 0

    @classmethod
    def from_config(cls, engine: Any, train_cfg: Any, log: MetricsLog) -> "NonFiniteGuard":
        return cls(engine, train_cfg.nan_policy, log, train_cfg.nan_max_consecutive_skips)

    @staticmethod
    def finite(loss: torch.Tensor) -> torch.Tensor:
        """This rank's flag for one micro-batch: a 0-dim bool on the loss's device (no host read)."""
        return torch.isfinite(loss.detach())

    @staticmethod
    def window_finite(flags: Sequence[torch.Tensor]) -> list[bool]:
        """Per micro-batch of the window, whether its loss was finite on every rank: one MIN
        all-reduce of the stacked flags (on their device: NCCL on a GPU) and one host read. Every
        rank must call it at the same boundary."""
        t = torch.stack(list(flags)).to(torch.float32)
        if dist_world() > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return [v > 0 for v in t.tolist()]

    def bad_window(self, step: int) -> Optional[str]:
        """After a window with a non-finite loss on some rank (call on every rank at the boundary;
        `step` counts the completed optimizer steps, so the failing one is step + 1 as in
        metrics.jsonl): the error that ends the run, or None once the skip is logged (then call
        `step(skip=True)`)."""
        at = f"optimizer step {step + 1}"
        if self.policy == "stop":
            return (f"non-finite loss at {at} (nothing saved from this run is overwritten): lower optim.lr, enable "
                    "gradient_clipping in the DeepSpeed config, use fp32, or set train.nan_policy=skip")
        # only after a bad window: one read per parameter is fine here
        if any_rank(not all(bool(torch.isfinite(p).all()) for p in self.engine.module.parameters())):
            return (f"non-finite loss at {at} with non-finite weights: skipping steps cannot recover "
                    "(train.nan_policy=skip); lower optim.lr or enable gradient_clipping in the DeepSpeed config")
        if self.consecutive + 1 > self.max_consecutive:
            return (f"non-finite loss in more than {self.max_consecutive} optimizer steps in a row ({at}; "
                    "train.nan_max_consecutive_skips): lower optim.lr, enable gradient_clipping, or check the data")
        self.log.warn(step + 1, f"non-finite loss: optimizer step {step + 1} is skipped on every rank "
                                f"(train.nan_policy=skip; {self.skipped + 1} skipped so far)")
        return None

    def backward(self, loss: torch.Tensor) -> None:
        """`engine.backward(loss)`, whatever the loss (see the class doc)."""
        self.engine.backward(loss)

    def step(self, skip: bool = False) -> bool:
        """`engine.step()`; with `skip` (at a boundary whose window had a non-finite loss on some
        rank), without the update. Returns True when an optimizer step was skipped."""
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return False
        if not skip:
            self.engine.step()
            self.consecutive = 0
            return False
        with dsi.optimizer_update_skipped(self.engine):
            self.engine.step()
        self.skipped += 1
        self.consecutive += 1
        return True
