"""The imagefolder input pipeline: decode_jpeg loader (PIL fallback), keyed tensor augmentation,
and bench/input_pipeline.py's output (tiny settings; no timing assertions)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ds_widenet.config import DataConfig, ModelConfig
from ds_widenet.data import build_datasets, read_image

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29


def _photo(seed: int, h: int = 45, w: int = 60) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.float32)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def mixed_tree(tmp_path):
    """One class folder per file kind: RGB JPEG, grayscale JPEG, CMYK JPEG, RGB PNG, grayscale PNG."""
    kinds = {"jpeg_rgb": ("RGB", "jpg"), "jpeg_gray": ("L", "jpg"), "jpeg_cmyk": ("CMYK", "jpg"),
             "png_rgb": ("RGB", "png"), "png_gray": ("L", "png")}
    for split in ("train", "val"):
        for n, (kind, (mode, ext)) in enumerate(kinds.items()):
            folder = tmp_path / split / kind
            folder.mkdir(parents=True)
            Image.fromarray(_photo(n)).convert(mode).save(folder / f"0.{ext}", **({"quality": 90} if ext == "jpg" else {}))
    return tmp_path


def test_read_image_gives_rgb_uint8_chw_equal_to_pil(mixed_tree):
    files = sorted((mixed_tree / "train").glob("*/*"))
    assert len(files) == 5
    for path in files:
        image = read_image(str(path))
        assert image.dtype == torch.uint8 and image.shape == (3, 45, 60), path
        # The decode_jpeg path (JPEGs, grayscale and CMYK converted) and the PIL path give the same
        # pixels: both decoders are libjpeg-turbo with the same defaults (exact here; a different
        # libjpeg build could differ by an IDCT rounding of +-1).
        with Image.open(path) as im:
            expected = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(image, expected), path


def test_read_image_decodes_jpegs_with_decode_jpeg(mixed_tree, monkeypatch):
    import ds_widenet.data as data_module

    calls = []
    real = data_module.decode_jpeg
    monkeypatch.setattr(data_module, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    for path in sorted((mixed_tree / "train").glob("*/*")):
        read_image(str(path))
    assert len(calls) == 3  # the three JPEGs; the PNGs went through PIL


def test_a_jpeg_named_png_and_a_png_named_jpg_both_load(tmp_path):
    pixels = _photo(7)
    Image.fromarray(pixels).save(tmp_path / "really_a_jpeg.png", format="JPEG", quality=90)
    Image.fromarray(pixels).save(tmp_path / "really_a_png.jpg", format="PNG")
    assert read_image(str(tmp_path / "really_a_jpeg.png")).shape == (3, 45, 60)
    assert torch.equal(read_image(str(tmp_path / "really_a_png.jpg")), torch.from_numpy(pixels).permute(2, 0, 1))


@pytest.mark.parametrize("augment", ["imagenet", "none"])
def test_imagefolder_images_are_normalised_model_size_and_keyed(mixed_tree, augment):
    data = DataConfig(name="imagefolder", root=str(mixed_tree), augment=augment)
    model = ModelConfig(img_size=32, patch_size=16, in_chans=3, num_classes=5)
    train, test = build_datasets(data, model, seed=3)
    for dataset in (train, test):
        for index in range(len(dataset)):
            image, label, got = dataset[(2, index)]
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == got == index
            assert type(image) is torch.Tensor  # a plain tensor, not a tv_tensor (strides: any, collate stacks)
    for index in range(len(train)):
        assert torch.equal(train[(4, index)][0], train[(4, index)][0])  # same key, same augmentation
    again, _ = build_datasets(data, model, seed=3)
    assert torch.equal(train[(1, 0)][0], again[(1, 0)][0])  # a fresh dataset object, same key
    differs = [not torch.equal(train[(0, i)][0], train[(1, i)][0]) for i in range(len(train))]
    assert any(differs) == (augment == "imagenet")
    assert torch.equal(test[(0, 1)][0], test[(5, 1)][0])  # eval is never augmented


def test_bench_runs_with_tiny_settings(tmp_path):
    out = tmp_path / "input_pipeline.json"
    proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "bench" / "input_pipeline.py"), "--images", "4",
                           "--rounds", "1", "--dir", str(tmp_path / "images"), "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "PROJECTION" in proc.stdout
    result = json.loads(out.read_text())
    variants = {"pil", "decode_jpeg", "hybrid", "data.py"}
    assert set(result["images_per_s_per_worker"]) == variants
    assert all(r > 0 for r in result["images_per_s_per_worker"].values())
    assert result["ratio_vs_pil_paired_median"]["pil"] == 1.0
    assert result["threads"] == 1 and result["images"] == 4 and result["rounds"] == 1
    proj = result["projection"]
    assert "PROJECTION" in proj["note"] and proj["mfu"] == 0.4 and proj["peak_flops"] == 989e12
    assert [row["preset"] for row in proj["rows"]] == ["widenet-b", "widenet-l", "widenet-h"]
    for row in proj["rows"]:
        assert row["train_flops_per_image"] > row["forward_flops_per_image"] > 0
        assert set(row["workers_per_gpu"]) == variants and all(w >= 1 for w in row["workers_per_gpu"].values())
    assert len(list((tmp_path / "images" / "train").glob("*/*.jpg"))) == 4
