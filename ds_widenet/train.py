"""Training entry point:

    python -m ds_widenet.train --recipe R.yaml --deepspeed_config C.json --out DIR [key=value ...]
    deepspeed --num_gpus 2 --module ds_widenet.train --recipe ... (or torchrun / mpirun / srun)

The recipe owns model, data, optimizer and schedule; the DeepSpeed JSON owns batch sizes,
precision, ZeRO, clipping and monitors (see config.py). The run itself is trainer.Trainer.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from . import select_accelerator
from .config import ConfigError


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m ds_widenet.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help="YAML recipe (model, data, optim, schedule)")
    ap.add_argument("--deepspeed_config", "--ds_config", dest="deepspeed_config", required=True,
                    help="DeepSpeed JSON (batch sizes, precision, ZeRO, clipping, monitors)")
    ap.add_argument("--out", required=True, help="run directory (metrics.jsonl, resolved configs, checkpoints)")
    ap.add_argument("--overwrite", action="store_true", help="allow an --out that already holds a run")
    ap.add_argument("--resume", default=None, metavar="auto|DIR",
                    help="continue from the newest complete checkpoint in --out that verifies (auto) or from DIR; "
                         "another world size / ep_size / ZeRO stage is resharded")
    ap.add_argument("--init_from", default=None, metavar="FILE.safetensors",
                    help="start from exported weights (fine-tune: a new head for another class count, "
                         "position embeddings interpolated for another image size)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. optim.lr=0.001 model.depth=4")
    return ap.parse_args(argv)


def is_rank0() -> bool:
    from .distributed import env_rank

    return env_rank() == "0"


def main(argv: Optional[list[str]] = None, trainer_cls: Optional[type] = None) -> int:
    """The command line; `trainer_cls` (a Trainer subclass) is for test entry points."""
    import faulthandler
    import signal

    # `kill -USR1 <pid>` prints every thread's Python stack to stderr: the first thing to look at
    # when a multi-node job stops making progress.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    select_accelerator()
    args = parse_args(argv)
    from .trainer import Trainer, TrainingError, make_plan

    from .distributed import peer_failure, unreachable_hosts, where

    try:
        plan = make_plan(args.recipe, args.deepspeed_config, args.out, args.overrides, args.resume, args.init_from,
                         args.overwrite)
        final = (trainer_cls or Trainer)(plan).run()
    except (ConfigError, TrainingError) as e:
        import torch.distributed as dist

        if is_rank0():
            print(f"error: {e}", file=sys.stderr)
        elif not (dist.is_available() and dist.is_initialized()):
            # before the process group is up rank 0 may never hear of it (a host-local problem)
            print(f"error: {where()}: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        line = peer_failure(e)
        if line is None:
            raise
        # every surviving rank says it once, in one line, instead of a traceback per rank; the
        # process group is not torn down (that would wait on the dead peer): exit at once
        lost = unreachable_hosts()
        if lost:
            line += f"; unreachable from here: {', '.join(lost)}"
        print(f"error: {where()}: {line}; the run stopped; continue it with --resume auto "
              "(from the last complete checkpoint)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(3)
    if is_rank0():
        print(json.dumps({k: final[k] for k in ("step", "top1", "eval_loss", "train_seconds") if k in final}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
