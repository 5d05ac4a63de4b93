"""Switches that break distributed equivalence on purpose: the negative controls of
tests/distributed/test_equivalence.py show the equivalence test catches each known MoE bug.
Set DS_WIDENET_NEGATIVE_CONTROL to one name; never set it in real runs.

* expert_grad_scale   expert gradients multiplied by ep_size (DeepSpeed #5618, #6545)
* lamb_per_partition  LAMB's trust ratio per ZeRO partition (DeepSpeed #88, #490)
* clip_avg            DeepSpeed's ZeRO-0 clipping by the average of per-rank norms (#8475)
* noise_per_rank      router noise from each rank's own generator instead of keyed by sample
"""
from __future__ import annotations

import os
from typing import Optional

CONTROLS = ("expert_grad_scale", "lamb_per_partition", "clip_avg", "noise_per_rank")


def negative_control() -> Optional[str]:
    name = os.environ.get("DS_WIDENET_NEGATIVE_CONTROL") or None
    if name is not None and name not in CONTROLS:
        raise ValueError(f"DS_WIDENET_NEGATIVE_CONTROL={name!r}: use one of {', '.join(CONTROLS)}")
    return name
