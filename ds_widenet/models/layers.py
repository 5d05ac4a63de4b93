"""Building blocks: patch embedding, attention, MLP and the MoE FFN around DeepSpeed's MoE layer."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from torch import Tensor, nn

from .. import rng
from ..config import MoEConfig
from .. import deepspeed_internals as dsi
from ..standalone import Mlp  # one definition for training and inference (standalone imports no DeepSpeed)
from .moe_layer import SparseMoELayer
from .routing import DeepSpeedGate, PaperGate, RouteKey, RoutingStats, stats_from_routes


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens ([B, C, H, W] -> [B, N, D])."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _dropout(x: Tensor, p: float, training: bool, key: Optional[RouteKey], depth: int, site: int) -> Tensor:
    """Dropout keyed by (seed, step, depth, site, sample): the same mask on any world size."""
    if not training or p <= 0.0:
        return x
    if key is None:
        return F.dropout(x, p, training=True)
    return rng.keyed_dropout(x, p, [key.seed, key.step, depth, site], key.sample_ids.to(x.device), training)


class Attention(nn.Module):
    """Multi-head self-attention (fused SDPA unless attention dropout is on)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = proj_drop

    def forward(self, x: Tensor, depth: int = 0, key: Optional[RouteKey] = None) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.training and self.attn_drop > 0:
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            attn = _dropout(attn.softmax(-1), self.attn_drop, True, key, depth, rng.SITE_ATTN_DROP)
            x = attn @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        x = self.proj(x.transpose(1, 2).reshape(b, n, c))
        return _dropout(x, self.proj_drop, self.training, key, depth, rng.SITE_PROJ_DROP)


class DenseFFN(nn.Module):
    """Dense FFN with the MoE FFN's call signature (no aux loss, no routing stats)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = Mlp(dim, hidden)
        self.dropout = dropout

    def forward(self, x: Tensor, depth: int = 0, key: Optional[RouteKey] = None,
                used_token: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor], Optional[RoutingStats]]:
        return _dropout(self.mlp(x), self.dropout, self.training, key, depth, rng.SITE_FFN_DROP), None, None


class MoEFFN(nn.Module):
    """One DeepSpeed MoE layer (gate + experts) returning (output, aux loss, RoutingStats).

    `num_depths`: the depths at which the layer is called (WideNet: all of them; its router noise is
    drawn for all at once); with `per_depth_gate` one gate matrix per depth (WideNet only).
    Expert i of rank r is global expert `ep_rank * local + i`; `init_experts` seeds each expert
    from its global id so all experts start different, identically on every ep_size.
    """

    def __init__(self, dim: int, cfg: MoEConfig, ep_size: int = 1, num_depths: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.dropout = dropout
        self.moe = MoE(hidden_size=dim, expert=Mlp(dim, cfg.expert_dim), num_experts=cfg.num_experts,
                       ep_size=ep_size, k=cfg.k, capacity_factor=cfg.capacity_factor,
                       eval_capacity_factor=cfg.eval_capacity_factor, min_capacity=cfg.min_capacity,
                       drop_tokens=cfg.drop_tokens, use_rts=False, top2_2nd_expert_sampling=True)
        if cfg.paper_gate:
            gate: TopKGate = PaperGate(
                dim, cfg.num_experts, cfg.k, cfg.capacity_factor, cfg.eval_capacity_factor, cfg.min_capacity,
                cfg.drop_tokens, cfg.effective_noise_std, num_depths if cfg.per_depth_gate else 1,
                priority=cfg.router == "bpr", expert_choice=cfg.expert_choice, z_loss=cfg.z_loss_weight > 0,
                call_depths=num_depths)
        else:
            gate = DeepSpeedGate(dim, cfg.num_experts, cfg.k, cfg.capacity_factor, cfg.eval_capacity_factor,
                                 cfg.min_capacity, noisy_gate_policy=None, drop_tokens=cfg.drop_tokens, use_rts=False,
                                 top2_2nd_expert_sampling=True, z_loss=cfg.z_loss_weight > 0)
        dsi.set_moe_gate(self.moe, gate)
        # DeepSpeed's layer with the experts as grouped matmuls over the filled slots (moe_layer.py)
        dsi.set_moe_layer(self.moe, SparseMoELayer.from_layer(dsi.moe_layer(self.moe), Mlp(dim, cfg.expert_dim)))

    @property
    def gate(self) -> TopKGate:
        return dsi.moe_gate(self.moe)

    @property
    def local_experts(self) -> nn.ModuleList:
        return dsi.moe_local_experts(self.moe)

    def forward(self, x: Tensor, depth: int = 0, key: Optional[RouteKey] = None,
                used_token: Optional[Tensor] = None) -> tuple[Tensor, Tensor, RoutingStats]:
        res = dsi.moe_layer(self.moe)(x, used_token, depth, key)
        r = res.routes
        stats = stats_from_routes(r.aux_loss, r.indices, self.cfg.num_experts, x.shape[0], used_token, r.entropy,
                                  r.z_loss, r.expert_choice, r.counts)
        return _dropout(res.output, self.dropout, self.training, key, depth, rng.SITE_FFN_DROP), r.aux_loss, stats

    @torch.no_grad()
    def init_experts(self, seed: int, ep_rank: int, std: float = 0.02) -> None:
        """Initialise each local expert from a generator seeded by (seed, global expert id)."""
        experts = self.local_experts
        for i, expert in enumerate(experts):
            gid = ep_rank * len(experts) + i
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919 * gid + 1)
            for p in expert.parameters():
                if p.device.type == "meta":
                    continue
                if p.dim() > 1:
                    p.copy_(torch.nn.init.trunc_normal_(torch.empty(p.shape), std=std, generator=g))
                else:
                    p.zero_()
