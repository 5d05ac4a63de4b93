"""What every model here shares: patch/position embedding, the head, weight init, the output type."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from .. import rng
from ..config import ModelConfig
from .layers import MoEFFN, PatchEmbed, _dropout
from .routing import RouteKey, RoutingStats


@dataclass
class ModelOutput:
    """logits [B, classes]; aux_loss: the balance loss summed over every MoE call (unweighted; the
    recipe's model.moe.aux_loss_weight multiplies it); routing: one RoutingStats per MoE call, in
    depth order (WideNet: one per depth; ViT-MoE: one per MoE block; ViT: empty)."""

    logits: Tensor
    aux_loss: Tensor
    routing: list[RoutingStats] = field(default_factory=list)


class VisionBackbone(nn.Module):
    """Embedding and head around a `forward_features` that subclasses define (timm's split)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, d)
        self.num_prefix = 1 if cfg.pool == "cls" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix, d))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.pre_logits = nn.Sequential(nn.Linear(d, d), nn.Tanh()) if cfg.pre_logits else nn.Identity()
        self.head = nn.Linear(d, cfg.num_classes)

    def embed(self, x: Tensor, key: Optional[RouteKey]) -> Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        return _dropout(x, self.cfg.dropout, self.training, key, 0, rng.SITE_EMBED_DROP)

    def forward_features(self, x: Tensor, key: Optional[RouteKey] = None,
                         used_token: Optional[Tensor] = None) -> tuple[Tensor, Tensor, list[RoutingStats]]:
        raise NotImplementedError

    def forward_head(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return self.head(self.pre_logits(x))

    def forward(self, x: Tensor, sample_ids: Optional[Tensor] = None, step: int = 0, seed: int = 0,
                valid: Optional[Tensor] = None) -> ModelOutput:
        """`sample_ids` (global ids [B]), `step` and `seed` key all randomness (router noise,
        dropout); `valid` [B] marks padding samples in evaluation, which take no expert capacity."""
        if sample_ids is None:
            sample_ids = torch.arange(x.shape[0], device=x.device)
        key = RouteKey(seed=int(seed), step=int(step), sample_ids=sample_ids)
        used_token = None
        if valid is not None:
            tokens = self.patch_embed.num_patches + self.num_prefix
            used_token = valid.to(x.device).float().repeat_interleave(tokens)
        feats, aux, routing = self.forward_features(x, key, used_token)
        return ModelOutput(logits=self.forward_head(feats), aux_loss=aux, routing=routing)

    @torch.no_grad()
    def init_weights(self, seed: int, ep_rank: int = 0) -> None:
        """timm-style init from one generator over the non-expert parameters (in a fixed order that
        does not depend on ep_size), then each expert from its global id."""
        g = torch.Generator().manual_seed(int(seed))
        for name, p in self.named_parameters():
            if getattr(p, "allreduce", True) is False or p.device.type == "meta":
                continue  # expert parameters: below
            if name.endswith("pos_embed"):
                p.copy_(torch.nn.init.trunc_normal_(torch.empty(p.shape), std=0.02, generator=g))
            elif name.endswith("cls_token") or name.startswith("head."):
                p.zero_()
            elif p.dim() > 1:
                p.copy_(torch.nn.init.trunc_normal_(torch.empty(p.shape), std=0.02, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        moe_layers = [m for m in self.modules() if isinstance(m, MoEFFN)]
        for layer_id, m in enumerate(moe_layers):
            m.init_experts(seed + 104_729 * layer_id, ep_rank)
