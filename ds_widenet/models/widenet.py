"""WideNet ("Go Wider Instead of Deeper", Xue et al. 2022): ONE attention layer and ONE MoE layer
shared by every depth, a separate LayerNorm pair per depth.

    for i in range(depth):
        x = x + attn(attn_norms[i](x))
        x = x + moe(moe_norms[i](x))        # aux loss and routing stats at every depth

The depth loop itself is VisionBackbone.forward_features (base.py), shared with ViT. The shared
modules are registered once, so the state dict has one `attn.*`, one `moe.*` (one set
of DeepSpeed expert checkpoint files) and `depth` entries of `attn_norms` / `moe_norms`.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

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

    def depth_block(self, i: int, x: Tensor, key: Optional[RouteKey], used_token: Optional[Tensor]
                    ) -> tuple[Tensor, Tensor, RoutingStats]:
        """Depth i: the shared layers seen through depth i's own norms."""
        x = x + self.attn(self.attn_norms[i](x), i, key)
        y, aux, stats = self.moe(self.moe_norms[i](x), i, key, used_token)
        return x + y, aux, stats
