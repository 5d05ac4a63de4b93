"""Helpers shared by the benchmarks: machine description, device sync, the matmul peak, model configs
from a preset plus `key=value` overrides, a plain (non-DeepSpeed) training step, JSON output."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

import ds_widenet  # noqa: E402,F401  (selects DeepSpeed's CPU accelerator before deepspeed is imported)
import torch  # noqa: E402

from ds_widenet.config import ConfigError, ModelConfig, apply_overrides, model_config_from_dict  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NOISE_NOTE = ("shared machine: other jobs may have been running; absolute times are noisy, compare the "
              "ratios measured side by side in one run")


# --------------------------------------------------------------------------------------------
# Machine and device


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def pick_device(name: Optional[str] = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def add_malloc_arg(ap: Any) -> None:
    ap.add_argument("--glibc-malloc-defaults", action="store_true",
                    help="leave glibc's malloc thresholds adaptive; by default they are fixed as the trainer "
                         "fixes them (train.retain_host_memory, ds_widenet/hostmem.py)")


def setup_malloc(glibc_defaults: bool = False) -> None:
    """Host memory as the trainer has it (hostmem.retain_freed_memory) unless `glibc_defaults`, so a
    benchmark times what the trainer runs; recorded in machine_info. Once per process: glibc's
    thresholds cannot be made adaptive again."""
    global RETAIN_HOST_MEMORY
    if not glibc_defaults:
        from ds_widenet import hostmem

        RETAIN_HOST_MEMORY = hostmem.retain_freed_memory()


RETAIN_HOST_MEMORY = False  # whether this process fixed glibc's thresholds (setup_malloc)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: Optional[torch.device] = None) -> dict[str, Any]:
    import deepspeed

    device = device or pick_device()
    info: dict[str, Any] = {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_model": cpu_model(),
        "nproc": nproc(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
        "retain_host_memory": RETAIN_HOST_MEMORY,
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "note": NOISE_NOTE,
    }
    return info


def set_threads(n: Optional[int]) -> int:
    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


# --------------------------------------------------------------------------------------------
# Timing


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for fn(), synchronising the device before and after (CUDA runs asynchronously)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def summary(xs: Sequence[float]) -> dict[str, Any]:
    xs = list(xs)
    return {"median": statistics.median(xs), "mean": statistics.fmean(xs), "min": min(xs), "max": max(xs),
            "n": len(xs), "all": [round(x, 6) for x in xs]}


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: Optional[Sequence[int]] = None,
                min_seconds: float = 0.25) -> dict[str, Any]:
    """Dense matmul throughput of square [n, n] x [n, n] products in `dtype` on `device`, each size
    repeated for at least `min_seconds` (best repetition counts). The peak is the best size: the
    same-run, same-device, same-dtype reference that utilization is measured against."""
    if sizes is None:
        sizes = (512, 1024, 2048) if device.type == "cpu" else (2048, 4096, 8192)
    by_size = {}
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.matmul(a, b)  # warm-up (thread pool, kernel selection)
        best, total, reps = float("inf"), 0.0, 0
        while total < min_seconds or reps < 3:
            dt = timed(lambda: torch.matmul(a, b), device)
            best, total, reps = min(best, dt), total + dt, reps + 1
        by_size[str(n)] = 2 * n ** 3 / best
    peak = max(by_size.values())
    return {"flops_per_s": peak, "by_size_flops_per_s": by_size, "dtype": str(dtype).replace("torch.", ""),
            "method": f"best of >= {min_seconds}s of torch.matmul per size; peak = best size"}


# --------------------------------------------------------------------------------------------
# Models and the plain training step


def model_config(preset: str, overrides: Sequence[str] = ()) -> ModelConfig:
    """A preset plus `model.key=value` (or `key=value`) overrides, e.g. model.depth=4 model.moe.k=1."""
    items = [o if o.startswith("model.") else f"model.{o}" for o in overrides]
    data = apply_overrides({"model": {"preset": preset}}, items)
    return model_config_from_dict(data["model"])


def synthetic_batch(cfg: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    return images.to(device, dtype), labels.to(device)


class MasterWeightAdamW:
    """AdamW for a bf16 model with fp32 master weights, as DeepSpeed's bf16 mode does: gradients
    are copied to fp32 masters, AdamW steps the masters, the bf16 weights are copied back."""

    def __init__(self, groups: list[dict[str, Any]], **kw: Any) -> None:
        self.pairs = []
        master_groups = []
        for g in groups:
            masters = []
            for p in g["params"]:
                m = p.detach().float().clone().requires_grad_(True)
                self.pairs.append((p, m))
                masters.append(m)
            master_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": masters})
        self.opt = torch.optim.AdamW(master_groups, **kw)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, m in self.pairs:
            p.grad = None
            m.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p, m in self.pairs:
            if p.grad is not None:
                m.grad = p.grad.float()
        self.opt.step()
        for p, m in self.pairs:
            p.copy_(m)


class PlainTrainer:
    """One model, optimizer and synthetic batch: `step()` runs forward + backward + optimizer step.
    The plain model from build_model with torch.optim.AdamW over the project's parameter groups
    (single process, no DeepSpeed engine)."""

    def __init__(self, cfg: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
        from ds_widenet.models import build_model
        from ds_widenet.optim import param_groups

        self.cfg, self.batch, self.device, self.dtype = cfg, batch, device, dtype
        self.model = build_model(cfg, seed=seed).to(device=device, dtype=dtype)
        self.model.train()
        groups = param_groups(self.model, 0.05)
        self.opt: Any = (torch.optim.AdamW(groups, lr=1e-4) if dtype == torch.float32
                         else MasterWeightAdamW(groups, lr=1e-4))
        self.images, self.labels = synthetic_batch(cfg, batch, device, dtype, seed)
        self.ids = torch.arange(batch, device=device)
        self.aux_w = cfg.moe.aux_loss_weight if cfg.moe else 0.0
        self.n = 0

    def forward_loss(self) -> torch.Tensor:
        out = self.model(self.images, sample_ids=self.ids, step=self.n, seed=0)
        return torch.nn.functional.cross_entropy(out.logits.float(), self.labels) + self.aux_w * out.aux_loss

    def step(self, phases: Optional[dict[str, list[float]]] = None) -> None:
        """One training step; with `phases`, appends the forward/backward/optimizer seconds."""
        dev = self.device
        if phases is None:
            loss = self.forward_loss()
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            box: dict[str, Any] = {}
            phases.setdefault("forward", []).append(timed(lambda: box.setdefault("loss", self.forward_loss()), dev))
            phases.setdefault("backward", []).append(timed(lambda: box["loss"].backward(), dev))
            phases.setdefault("optimizer", []).append(timed(self.opt.step, dev))
            self.opt.zero_grad(set_to_none=True)
        self.n += 1


def write_json(path: Optional[str], obj: Any) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str) -> None:
    """Lay out, write (creating the folder) and close a benchmark figure."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def parse_overrides(items: Sequence[str]) -> list[str]:
    for o in items:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not key=value (e.g. model.depth=4)")
    return list(items)
