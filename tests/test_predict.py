"""`python -m ds_widenet.predict` on a folder of PNGs: predictions equal the standalone model on the
same tensors; one-line errors for a missing folder, no images, an unreadable image."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ds_widenet  # noqa: F401  (selects DeepSpeed's CPU accelerator before deepspeed is imported)
from ds_widenet.config import ModelConfig, MoEConfig
from ds_widenet.data import load_digits_split
from ds_widenet.export import load_exported, save_export
from ds_widenet.models import build_model
from ds_widenet.predict import main

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(arch="widenet", img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depth=2,
                  num_heads=2, moe=MoEConfig(num_experts=4, k=2, expert_dim=32, min_capacity=1,
                                             eval_capacity_factor=1.0))


def export_digits(tmp_path: Path, data: dict | None = None, cfg: ModelConfig = CFG) -> Path:
    model = build_model(cfg, seed=4)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_export(model.state_dict(), cfg, tmp_path / "digits.safetensors",
                       data={"name": "digits"} if data is None else data)


def write_pngs(folder: Path, n: int = 7) -> tuple[list[Path], np.ndarray]:
    """The first n digits test images as 8x8 grey PNGs (ink bright, as the arrays), some in a
    subfolder; returns the paths in the order predict reads them (sorted) and their pixels."""
    x_test = load_digits_split()[1][:n, 0]  # [n, 8, 8] in [0, 1]
    pixels = np.round(x_test * 255).astype(np.uint8)
    paths = []
    for i, img in enumerate(pixels):
        p = folder / ("sub" if i % 2 else "") / f"digit{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(p)
        paths.append(p)
    order = sorted(range(n), key=lambda i: paths[i])
    return [paths[i] for i in order], pixels[order]


def reference(weights: Path, pixels: np.ndarray, batch: int) -> tuple[torch.Tensor, list[list[int]], list[list[float]]]:
    """The standalone model on tensors made here from the PNG pixels: /255, then the digits
    normalisation recorded in the export; (probabilities, per-image expert, per-image drop)."""
    info = json.loads(weights.with_suffix(".json").read_text())["preprocess"]
    x = (torch.from_numpy(pixels).float() / 255.0 - info["mean"][0]) / info["std"][0]
    model = load_exported(weights)
    probs, experts, dropped = [], [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(x[i:i + batch, None])
            probs.append(torch.softmax(out.logits, -1))
            for b in range(out.logits.shape[0]):
                routes = [r.expert_index[:, b].flatten() for r in out.routing]
                experts.append([int(torch.bincount(r[r >= 0], minlength=4).argmax()) for r in routes])
                dropped.append([float((r < 0).float().mean()) for r in routes])
    return torch.cat(probs), experts, dropped


def test_predictions_equal_the_standalone_model_on_the_same_tensors(tmp_path, capsys):
    weights = export_digits(tmp_path)
    paths, pixels = write_pngs(tmp_path / "imgs")
    assert main(["--weights", str(weights), "--images", str(tmp_path / "imgs"), "--topk", "3", "--batch", "4",
                 "--out", str(tmp_path / "p.json"), "--device", "cpu"]) == 0
    records = json.loads((tmp_path / "p.json").read_text())
    probs, experts, dropped = reference(weights, pixels, batch=4)
    assert [r["path"] for r in records] == [str(p) for p in paths]
    for i, r in enumerate(records):
        top_p, top_i = probs[i].topk(3)
        assert [t["class"] for t in r["top"]] == top_i.tolist()
        assert [t["name"] for t in r["top"]] == [str(c) for c in top_i.tolist()]  # digits: names "0".."9"
        assert np.allclose([t["prob"] for t in r["top"]], top_p.tolist(), rtol=1e-6, atol=1e-7)
        assert [d["expert"] for d in r["routing"]] == experts[i]
        assert [d["dropped"] for d in r["routing"]] == pytest.approx(dropped[i])
        assert [d["depth"] for d in r["routing"]] == [0, 1]
    assert any(d["dropped"] > 0 for r in records for d in r["routing"])  # capacity 1.0 drops some routes

    # CSV on stdout without --out: the same predictions, one row per image
    capsys.readouterr()
    assert main(["--weights", str(weights), "--images", str(tmp_path / "imgs"), "--topk", "2", "--batch", "4"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["path"] for row in rows] == [str(p) for p in paths]
    assert list(rows[0]) == ["path", "top1_class", "top1_name", "top1_prob", "top2_class", "top2_name", "top2_prob",
                             "depth0_expert", "depth0_dropped", "depth1_expert", "depth1_dropped"]
    for i, row in enumerate(rows):
        assert int(row["top1_class"]) == records[i]["top"][0]["class"]
        assert float(row["top2_prob"]) == records[i]["top"][1]["prob"]
        assert int(row["depth1_expert"]) == records[i]["routing"][1]["expert"]


def test_without_a_preprocess_record_a_grey_model_falls_back_to_the_digits_statistics(tmp_path, capsys):
    weights = export_digits(tmp_path, data={})
    assert "preprocess" not in json.loads(weights.with_suffix(".json").read_text())
    _, pixels = write_pngs(tmp_path / "imgs", n=3)
    capsys.readouterr()
    assert main(["--weights", str(weights), "--images", str(tmp_path / "imgs"), "--topk", "1",
                 "--out", str(tmp_path / "p.csv")]) == 0
    assert "records no preprocessing" in capsys.readouterr().err
    rows = list(csv.DictReader(io.StringIO((tmp_path / "p.csv").read_text())))
    x_train = load_digits_split()[0]
    x = (torch.from_numpy(pixels).float() / 255.0 - float(x_train.mean())) / float(x_train.std())
    with torch.no_grad():
        probs = torch.softmax(load_exported(weights)(x[:, None]).logits, -1)
    assert [int(r["top1_class"]) for r in rows] == probs.argmax(-1).tolist()
    assert "top1_name" not in rows[0]  # no class names recorded: indices only


def test_rgb_pngs_are_resized_and_normalised_for_a_3_channel_model(tmp_path):
    cfg = replace(CFG, img_size=16, patch_size=4, in_chans=3)
    weights = export_digits(tmp_path, data={"name": "cifar10", "root": str(tmp_path)}, cfg=replace(cfg, num_classes=10))
    folder = tmp_path / "imgs"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb, mode="RGB").save(folder / "a.jpg", quality=95)
    assert main(["--weights", str(weights), "--images", str(folder), "--out", str(tmp_path / "p.json")]) == 0
    (rec,) = json.loads((tmp_path / "p.json").read_text())
    assert rec["top"][0]["name"] in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                     "truck") and len(rec["top"]) == 5


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ds_widenet.predict", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_a_missing_folder_no_images_and_an_unreadable_image_are_one_line_errors(tmp_path):
    weights = export_digits(tmp_path)
    res = _cli("--weights", str(weights), "--images", str(tmp_path / "nowhere"))
    assert res.returncode == 2 and "nowhere" in res.stderr and "not a directory" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    res = _cli("--weights", str(weights), "--images", str(empty))
    assert res.returncode == 2 and "no images under" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    write_pngs(tmp_path / "imgs", n=2)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG not really")
    res = _cli("--weights", str(weights), "--images", str(tmp_path / "imgs"))
    assert res.returncode == 2 and "broken.png" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = _cli("--weights", str(weights), "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "p.txt"))
    assert res.returncode == 2 and ".csv or .json" in res.stderr
