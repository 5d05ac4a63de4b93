"""`python -m ds_widenet.predict --weights model.safetensors --images DIR [--topk 5]
[--out preds.csv|preds.json] [--device cpu|cuda] [--batch N]`

Classifies every image under DIR (recursively: png, jpg, jpeg, bmp, webp) with an exported model
in plain PyTorch (standalone.py: no DeepSpeed, no torch.distributed), and writes per image its
path, the top-k classes (index, name where the export records class names, probability) and, per
MoE depth, the expert most of the image's routes went to (-1: all dropped) and the fraction of
its routes dropped by the capacity limit. CSV or JSON by the --out suffix; CSV on stdout without
--out.

Preprocessing is the training data's evaluation transform, recorded in the export's JSON
(`preprocess`): grey or RGB to the model's in_chans, pixels scaled to [0, 1], resized to the
model's img_size ("square"; CIFAR, digits) or resized to img_size / crop_ratio and centre-cropped
("center_crop"; image folders), normalised by the recorded mean / std. Exports without the record
(v1 exports, synthetic data, checkpoints without a recipe) fall back, with a note on stderr, to
the digits statistics for 1-channel models and ImageNet's centre-crop transform for 3-channel ones.
Digits models expect bright strokes on a dark background, as sklearn's arrays (0 = background).

Expert capacity is computed per batch, as in training and evaluation: with a low
eval_capacity_factor an image's routing (and so its prediction) can depend on the other images of
its batch; --batch 1 makes every prediction independent of the others.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .config import ConfigError, ModelConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class Prediction:
    """One image: its top-k (class index, probability) and per MoE depth (expert, drop fraction)."""

    path: str
    classes: list[int]
    probs: list[float]
    experts: list[int] = field(default_factory=list)
    dropped: list[float] = field(default_factory=list)


def find_images(root: Path) -> list[Path]:
    """Every image file under `root`, recursively, in sorted order; one-line errors for a missing
    directory or one without images."""
    if not root.is_dir():
        raise ConfigError(f"--images {root} is not a directory: pass a folder of images")
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ConfigError(f"no images under {root} (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)")
    return found


def preprocess_of(info: dict[str, Any], cfg: ModelConfig) -> tuple[dict[str, Any], bool]:
    """(the export's recorded preprocessing, False), or (the fallback for its channel count, True)."""
    spec = info.get("preprocess")
    if spec is not None:
        return spec, False
    from .export import preprocess_spec

    return preprocess_spec("digits" if cfg.in_chans == 1 else "imagefolder", cfg), True  # type: ignore[return-value]


def image_transform(spec: dict[str, Any], cfg: ModelConfig) -> Callable[[Any], Tensor]:
    """PIL image (already in the model's mode) -> normalised float32 [C, img_size, img_size], the
    ops of data.py's evaluation transforms."""
    from torchvision.transforms import v2

    mean, std = list(spec["mean"]), list(spec["std"])
    if len(mean) != cfg.in_chans or len(std) != cfg.in_chans:
        raise ConfigError(f"the export's preprocess has {len(mean)}-channel statistics but the model has "
                          f"in_chans={cfg.in_chans}: re-export the checkpoint")
    size = cfg.img_size
    if spec.get("resize") == "center_crop":
        geometry = [v2.Resize(int(size / float(spec.get("crop_ratio", 0.875))), antialias=True), v2.CenterCrop(size)]
    else:  # "square": an image already img_size square passes unchanged
        geometry = [v2.Resize((size, size), antialias=True)]
    return v2.Compose([*geometry, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std),
                       v2.ToPureTensor()])


def load_image(path: Path, in_chans: int, transform: Callable[[Any], Tensor]) -> Tensor:
    """One image file as the model's input; a one-line ConfigError naming it when unreadable."""
    from PIL import Image

    if in_chans not in (1, 3):
        raise ConfigError(f"the model takes {in_chans}-channel images: predict reads grey (1) or RGB (3) images only")
    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert("L" if in_chans == 1 else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ConfigError(f"cannot read image {path} ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None
    return transform(img)


@torch.no_grad()
def predict_batch(model: torch.nn.Module, images: Tensor, paths: Sequence[str], topk: int) -> list[Prediction]:
    """Top-k classes and per-depth routing of one batch of preprocessed images."""
    out = model(images)
    probs = torch.softmax(out.logits.float(), dim=-1).cpu()
    top_p, top_i = probs.topk(min(topk, probs.shape[-1]), dim=-1)
    preds = [Prediction(str(p), top_i[b].tolist(), top_p[b].tolist()) for b, p in enumerate(paths)]
    for stats in out.routing:
        idx = stats.expert_index.cpu().long()  # [k, B, T], -1 = dropped
        num_experts = int(stats.expert_tokens.numel())
        for b, pred in enumerate(preds):
            routes = idx[:, b].flatten()
            kept = routes[routes >= 0]
            counts = torch.bincount(kept, minlength=num_experts)
            pred.experts.append(int(counts.argmax()) if kept.numel() else -1)  # ties: the lowest id
            pred.dropped.append(1.0 - kept.numel() / routes.numel())
    return preds


def predict_paths(model: torch.nn.Module, cfg: ModelConfig, paths: Sequence[Path], transform: Callable[[Any], Tensor],
                  topk: int = 5, batch: int = 64, device: str = "cpu") -> list[Prediction]:
    """Predictions for image files, `batch` at a time (images are read batch by batch)."""
    preds: list[Prediction] = []
    for i in range(0, len(paths), batch):
        chunk = paths[i:i + batch]
        x = torch.stack([load_image(p, cfg.in_chans, transform) for p in chunk]).to(device)
        preds += predict_batch(model, x, [str(p) for p in chunk], topk)
    return preds


def to_records(preds: Sequence[Prediction], class_names: Optional[Sequence[str]]) -> list[dict[str, Any]]:
    """JSON records: {"path", "top": [{"class", ["name"], "prob"}], "routing": [{"depth", "expert", "dropped"}]}."""
    records = []
    for p in preds:
        top = []
        for c, prob in zip(p.classes, p.probs):
            entry: dict[str, Any] = {"class": c}
            if class_names:
                entry["name"] = class_names[c]
            entry["prob"] = prob
            top.append(entry)
        routing = [{"depth": d, "expert": e, "dropped": f} for d, (e, f) in enumerate(zip(p.experts, p.dropped))]
        records.append({"path": p.path, "top": top, "routing": routing})
    return records


def to_csv(preds: Sequence[Prediction], class_names: Optional[Sequence[str]]) -> str:
    """CSV: path, top{j}_class, [top{j}_name], top{j}_prob for j = 1..k, depth{d}_expert, depth{d}_dropped."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    k = len(preds[0].classes) if preds else 0
    depths = len(preds[0].experts) if preds else 0
    header = ["path"]
    for j in range(1, k + 1):
        header += [f"top{j}_class"] + ([f"top{j}_name"] if class_names else []) + [f"top{j}_prob"]
    for d in range(depths):
        header += [f"depth{d}_expert", f"depth{d}_dropped"]
    w.writerow(header)
    for p in preds:
        row: list[Any] = [p.path]
        for c, prob in zip(p.classes, p.probs):
            row += [c] + ([class_names[c]] if class_names else []) + [repr(prob)]
        for e, f in zip(p.experts, p.dropped):
            row += [e, repr(f)]
        w.writerow(row)
    return buf.getvalue()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds_widenet.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, required=True, help="an export's .safetensors (its .json beside it)")
    ap.add_argument("--images", type=Path, required=True, help="folder of images, read recursively")
    ap.add_argument("--topk", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="preds.csv or preds.json (default: CSV on stdout)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args(argv)
    try:
        from .export import load_exported, read_export_info

        if args.topk < 1 or args.batch < 1:
            raise ConfigError("--topk and --batch must be >= 1")
        if args.out is not None and args.out.suffix.lower() not in (".csv", ".json"):
            raise ConfigError(f"--out {args.out} must end in .csv or .json")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device cuda, but no CUDA device is available: use --device cpu")
        paths = find_images(args.images)
        model = load_exported(args.weights, device)
        cfg = model.cfg
        info = read_export_info(args.weights)
        spec, fallback = preprocess_of(info, cfg)
        if fallback:
            print(f"note: {args.weights.with_suffix('.json').name} records no preprocessing; using the "
                  f"{spec['data']} normalisation for a {cfg.in_chans}-channel model", file=sys.stderr)
        names = info.get("class_names")
        if not isinstance(names, list) or len(names) != cfg.num_classes:
            names = None  # no names, or not one per class: indices only
        preds = predict_paths(model, cfg, paths, image_transform(spec, cfg), args.topk, args.batch, device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(to_csv(preds, names))
        return 0
    text = json.dumps(to_records(preds, names), indent=1) if args.out.suffix.lower() == ".json" else to_csv(preds, names)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"{len(preds)} predictions -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
