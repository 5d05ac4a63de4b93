"""WideNet ("Go Wider Instead of Deeper", Xue et al. 2022): ONE attention layer and ONE MoE layer
shared by every depth, a separate LayerNorm pair per depth.

    for i in range(depth):
        x = x + attn(attn_norms[i](x))
        x = x + moe(moe_norms[i](x))        # aux loss and routing stats at every depth

The shared modules are registered once, so the state dict has one `attn.*`, one `moe.*` (one set
of DeepSpeed expert checkpoint files) and `depth` entries of `attn_norms` / `moe_norms`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .base import VisionBackbone
from .layers import Attention, MoEFFN
from .routing import RouteKey, RoutingStats


class WideNet(VisionBackbone):
    """WideNet: shared attention + shared MoE FFN, per-depth LayerNorms, a loop over depth."""

    def __init__(self, cfg: ModelConfig, ep_size: int = 1) -> None:
        super().__init__(cfg)
        assert cfg.moe is not None
        d = cfg.embed_dim
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias, cfg.attn_dropout, cfg.dropout)
        self.moe = MoEFFN(d, cfg.moe, ep_size=ep_size, num_depths=cfg.depth, dropout=cfg.dropout)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(d, eps=1e-6) for _ in range(cfg.depth))
        self.moe_norms = nn.ModuleList(nn.LayerNorm(d, eps=1e-6) for _ in range(cfg.depth))

    def block(self, i: int, x: Tensor, key: Optional[RouteKey], used_token: Optional[Tensor]
              ) -> tuple[Tensor, Tensor, RoutingStats]:
        """Depth i: the shared layers seen through depth i's own norms."""
        x = x + self.attn(self.attn_norms[i](x), i, key)
        y, aux, stats = self.moe(self.moe_norms[i](x), i, key, used_token)
        return x + y, aux, stats

    def forward_features(self, x: Tensor, key: Optional[RouteKey] = None,
                         used_token: Optional[Tensor] = None) -> tuple[Tensor, Tensor, list[RoutingStats]]:
        x = self.embed(x, key)
        aux = x.new_zeros((), dtype=torch.float32)
        routing: list[RoutingStats] = []
        for i in range(self.cfg.depth):
            if self.cfg.grad_checkpointing and self.training:
                # Router noise and dropout are keyed by (step, depth, sample), so the recompute
                # in backward makes the same routing decisions as this forward.
                x, aux_i, stats = checkpoint(self.block, i, x, key, used_token, use_reentrant=False)
            else:
                x, aux_i, stats = self.block(i, x, key, used_token)
            aux = aux + aux_i
            routing.append(stats)
        return x, aux, routing
