"""`python -m tests.support.train ...`: ds_widenet.train with the test instrumentation
(tests/support/trainer.py: route digests, and the negative control / fault named in the
environment). Launch it exactly as the real entry point (torchrun -m, deepspeed --module)."""
from __future__ import annotations

import sys

from ds_widenet.train import main
from tests.support.trainer import trainer_from_env

if __name__ == "__main__":
    sys.exit(main(trainer_cls=trainer_from_env()))
