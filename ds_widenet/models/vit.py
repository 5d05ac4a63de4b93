"""The paper's baselines: ViT (dense) and ViT-MoE (MoE FFN in the last `moe_last_n` blocks, as in
the authors' code). Every block owns its attention and FFN: nothing is shared."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..config import ModelConfig
from .base import VisionBackbone
from .layers import Attention, DenseFFN, MoEFFN
from .routing import RouteKey, RoutingStats


class Block(nn.Module):
    """Pre-norm transformer block whose FFN is dense or MoE."""

    def __init__(self, cfg: ModelConfig, moe: bool, ep_size: int) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias, cfg.attn_dropout, cfg.dropout)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.ffn: nn.Module = (MoEFFN(d, cfg.moe, ep_size=ep_size, dropout=cfg.dropout) if moe
                               else DenseFFN(d, cfg.mlp_dim, cfg.dropout))

    def forward(self, x: Tensor, depth: int, key: Optional[RouteKey], used_token: Optional[Tensor]
                ) -> tuple[Tensor, Optional[Tensor], Optional[RoutingStats]]:
        x = x + self.attn(self.norm1(x), depth, key)
        y, aux, stats = self.ffn(self.norm2(x), depth, key, used_token)
        return x + y, aux, stats


class ViT(VisionBackbone):
    """ViT (arch='vit') or ViT-MoE (arch='vit_moe')."""

    def __init__(self, cfg: ModelConfig, ep_size: int = 1) -> None:
        super().__init__(cfg)
        first_moe = cfg.depth - cfg.moe_last_n if cfg.arch == "vit_moe" else cfg.depth
        self.blocks = nn.ModuleList(Block(cfg, i >= first_moe, ep_size) for i in range(cfg.depth))

    def depth_block(self, i: int, x: Tensor, key: Optional[RouteKey], used_token: Optional[Tensor]
                    ) -> tuple[Tensor, Optional[Tensor], Optional[RoutingStats]]:
        return self.blocks[i](x, i, key, used_token)
