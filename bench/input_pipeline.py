"""The ImageNet train input pipeline, per DataLoader worker: PIL vs torchvision's decode_jpeg.

    python bench/input_pipeline.py --images 300 --rounds 5 --json bench/results/input_pipeline.json

Writes `--images` ImageNet-sized JPEGs (about 500x375, smooth gradients + blobs + noise, PIL
quality 90) into a temp dir (or `--dir`) in an ImageFolder layout, then times one loader worker
(one process, torch.set_num_threads(1)) turning a file into a normalised float32 [3, 224, 224]
training image with the paper's augmentation (Inception crop, flip, RandAugment 2/15, normalise):

  pil          PIL.Image.open + convert("RGB"), every op on the PIL image (ImageFolder's default
               loader; what ds_widenet/data.py did before)
  decode_jpeg  torchvision.io.read_file + decode_jpeg (uint8 [3, H, W]), every op as
               torchvision.transforms.v2 on the uint8 tensor, then to float and normalise
  hybrid       decode_jpeg, crop and flip on the tensor, RandAugment on a PIL image (PIL's affine,
               sharpness, autocontrast and equalize kernels are 3-10x faster than torchvision's
               tensor ones, but the round trip to PIL and back costs about as much)
  data.py      ds_widenet.data.build_datasets' imagefolder train set, read by keys (the path a
               training run takes: decode_jpeg + tensor ops, keyed seeding and fork_rng included)

Each image of round r is seeded with the same key in every variant, so all variants draw the same
crops and RandAugment ops. The variants run in alternation, a full pass over the images each,
for `--rounds` rounds; medians of images/s are reported, and ratios as medians of the per-round
ratios against `pil`.

Then a PROJECTION (no GPU is measured here): the images/s one GPU would consume training
widenet-b/l/h at 224 px at an assumed MFU (`--mfu`, default 0.4) of an H100's dense bf16 peak
(ds_widenet.flops.known_peak_flops("H100 SXM") = 989e12), with ds_widenet.flops' training FLOPs
per image (forward + backward = 3x forward less the patch embedding's unneeded input gradient,
the count the training log's MFU uses), and the loader workers per GPU that needs at the
measured per-worker rates: ceil(projected images/s / images/s per worker).
"""
from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from ds_widenet import data as data_module  # noqa: E402
from ds_widenet import flops  # noqa: E402
from ds_widenet.config import DataConfig, ModelConfig  # noqa: E402
from ds_widenet.models.presets import get_preset  # noqa: E402

PRESETS = ("widenet-b", "widenet-l", "widenet-h")
VARIANTS = ("pil", "decode_jpeg", "hybrid", "data.py")
CLASSES = ("class_a", "class_b")
PEAK_GPU = "H100 SXM"
PEAK_FALLBACK = 989e12


def _natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour gradients, a few soft blobs and sensor-like noise: compresses like a photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y /= height
    x /= width
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 90 * np.sin(3 * a * x + 2 * b * y + 6 * p)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-80, 80, 3)
    img += rng.normal(0, 24, img.shape)  # ~110 KiB per file at quality 90, like ImageNet's JPEGs
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(root: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` train JPEGs under root/train/<class>/ (+ one per class under root/val/ for ImageFolder)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = ((375, 500), (500, 375), (333, 500), (375, 500))  # (H, W): ImageNet's common shapes
    paths = []
    for split, count in (("train", n), ("val", len(CLASSES))):
        for i in range(count):
            folder = root / split / CLASSES[i % len(CLASSES)]
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{i:05d}.jpg"
            Image.fromarray(_natural_image(rng, *sizes[i % len(sizes)])).save(path, quality=90)
            if split == "train":
                paths.append(path)
    return sorted(paths)  # ImageFolder's order: the data.py variant reads index i = paths[i]


def pipelines(img_size: int, root: Path) -> dict[str, Callable[[int, Path], torch.Tensor]]:
    """variant -> fn(index, path) -> normalised float32 [3, img_size, img_size]."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms import v2

    cfg = DataConfig(name="imagefolder", root=str(root), augment="imagenet")
    norm = data_module._to_normalised(data_module._IMAGENET_MEAN, data_module._IMAGENET_STD)
    on_pil = v2.Compose([*data_module._inception_ops(cfg, img_size), *norm])
    on_tensor = v2.Compose([*data_module._inception_ops(cfg, img_size), *norm])
    crop, flip, randaug = data_module._inception_ops(cfg, img_size)
    hybrid = v2.Compose([crop, flip, v2.ToPILImage(), randaug, *norm])
    train, _ = data_module.build_datasets(cfg, ModelConfig(img_size=img_size, patch_size=16, in_chans=3,
                                                           num_classes=len(CLASSES)), seed=0)

    def pil(i: int, path: Path) -> torch.Tensor:
        with Image.open(path) as im:
            return on_pil(im.convert("RGB"))

    def tensor(i: int, path: Path) -> torch.Tensor:
        return on_tensor(decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB))

    def mixed(i: int, path: Path) -> torch.Tensor:
        return hybrid(decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB))

    def keyed(i: int, path: Path) -> torch.Tensor:
        return train[(_round, i)][0]

    return {"pil": pil, "decode_jpeg": tensor, "hybrid": mixed, "data.py": keyed}


_round = 0  # the epoch the data.py variant reads (the other variants seed with the same key)


def run_pass(fn: Callable[[int, Path], torch.Tensor], paths: list[Path], rnd: int, img_size: int) -> float:
    """Images/s of one pass over `paths`, each image seeded with data.py's key (0, rnd, i)."""
    global _round
    _round = rnd
    t0 = time.perf_counter()
    for i, path in enumerate(paths):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(data_module.sample_seed(0, rnd, i))
            out = fn(i, path)
        assert out.shape == (3, img_size, img_size) and out.dtype == torch.float32, (out.shape, out.dtype)
    return len(paths) / (time.perf_counter() - t0)


def measure(paths: list[Path], root: Path, rounds: int, img_size: int) -> dict[str, Any]:
    fns = pipelines(img_size, root)
    for fn in fns.values():  # warm-up: first calls pay one-off dispatch and allocation costs
        run_pass(fn, paths[: min(8, len(paths))], -1, img_size)
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]  # alternate, and alternate the order
        for v in order:
            rates[v].append(run_pass(fns[v], paths, r, img_size))
    ratios = {v: statistics.median(a / b for a, b in zip(rates[v], rates["pil"])) for v in VARIANTS}
    return {"images_per_s_per_worker": {v: statistics.median(x) for v, x in rates.items()},
            "summary": {v: common.summary(x) for v, x in rates.items()},
            "ratio_vs_pil_paired_median": ratios}


def projection(rates: dict[str, float], mfu: float, peak: float, img_size: int) -> list[dict[str, Any]]:
    rows = []
    for name in PRESETS:
        cfg = get_preset(name)
        assert cfg.img_size == img_size, f"{name} is {cfg.img_size} px"
        f = flops.step_flops(cfg, 1)
        per_gpu = mfu * peak / f["train_per_image"]
        rows.append({"preset": name, "img_size": cfg.img_size, "forward_flops_per_image": f["forward"],
                     "train_flops_per_image": f["train_per_image"], "projected_images_per_s_per_gpu": per_gpu,
                     "workers_per_gpu": {v: math.ceil(per_gpu / r) for v, r in rates.items()}})
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300, help="train JPEGs to write and time (default 300)")
    ap.add_argument("--rounds", type=int, default=5, help="passes over the images per variant (default 5)")
    ap.add_argument("--dir", type=Path, default=None, help="write the images here (default: a temp dir, removed)")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization for the projection")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.images < 1 or args.rounds < 1:
        raise SystemExit("error: --images and --rounds must be at least 1")
    threads = common.set_threads(1)  # one loader worker = one process on one core
    img_size = 224
    tmp = None if args.dir else tempfile.mkdtemp(prefix="ds_widenet_input_")
    root = args.dir or Path(tmp)  # type: ignore[arg-type]
    try:
        t0 = time.perf_counter()
        paths = write_images(root, args.images)
        write_s = time.perf_counter() - t0
        mean_kb = statistics.fmean(p.stat().st_size for p in paths) / 1024
        result = measure(paths, root, args.rounds, img_size)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    peak = flops.known_peak_flops(PEAK_GPU) or PEAK_FALLBACK
    rates = result["images_per_s_per_worker"]
    rows = projection(rates, args.mfu, peak, img_size)

    print(f"{args.images} JPEGs (~500x375, mean {mean_kb:.0f} KiB, written in {write_s:.1f} s), {args.rounds} rounds, "
          f"1 process x {threads} thread, out: float32 [3, {img_size}, {img_size}]")
    print("| variant | images/s per worker (median) | min..max | vs pil (paired median) |")
    print("|---|---|---|---|")
    for v in VARIANTS:
        s = result["summary"][v]
        print(f"| {v} | {rates[v]:.1f} | {s['min']:.1f}..{s['max']:.1f} | {result['ratio_vs_pil_paired_median'][v]:.2f}x |")
    print()
    print(f"PROJECTION, no GPU measured: images/s per GPU = MFU {args.mfu} x {PEAK_GPU} bf16 peak {peak:.3g} FLOP/s "
          f"/ training FLOPs per image; loader workers per GPU = ceil(that / measured images/s per worker)")
    print("| preset | train GFLOPs/image | projected images/s per GPU | workers/GPU: " + " | ".join(VARIANTS) + " |")
    print("|---|---|---|" + "---|" * len(VARIANTS))
    for row in rows:
        print(f"| {row['preset']} | {row['train_flops_per_image'] / 1e9:.1f} | {row['projected_images_per_s_per_gpu']:.0f} | "
              + " | ".join(str(row["workers_per_gpu"][v]) for v in VARIANTS) + " |")
    common.write_json(str(args.json) if args.json else None, {
        "machine": common.machine_info(torch.device("cpu")), "threads": threads, "images": args.images,
        "rounds": args.rounds, "img_size": img_size, "mean_file_kib": mean_kb, **result,
        "projection": {"note": "PROJECTION: no GPU measured", "mfu": args.mfu, "peak_gpu": PEAK_GPU,
                       "peak_flops": peak, "rows": rows}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
