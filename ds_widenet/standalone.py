"""Inference for exported WideNet / ViT / ViT-MoE models in plain PyTorch.

Imports neither DeepSpeed nor torch.distributed (nor any ds_widenet module that does), so an
export runs wherever PyTorch runs. The evaluation math is the DeepSpeed models' (models/*.py in
eval mode), operation for operation, so logits and expert choices match the engine's:

* patch embedding, optional class token, position embedding, pre-norm blocks, final norm,
  avg or cls pooling, optional pre-logits (Linear + tanh), head;
* WideNet: ONE attention and ONE MoE FFN applied at every depth, through depth i's own
  LayerNorm pair (`attn_norms.{i}`, `moe_norms.{i}`);
* the MoE FFN as DeepSpeed's MOELayer computes it in eval mode: router="paper" routes with
  `routing_core.paper_routing` ("bpr": in priority order; "expert_choice":
  `routing_core.expert_choice_routing`) (padding marked by `used_token` takes no capacity; with
  per_depth_gate, depth i uses rows [i*E, (i+1)*E) of the gate); router="deepspeed" with
  `deepspeed_top1_routes` / `deepspeed_top2_routes`, copies of DeepSpeed 0.19's top1gating /
  top2gating eval paths (no Gumbel sampling). Dropped routes contribute nothing; a token's
  output is sum over its kept routes of gate * expert(token). Each expert runs on the tokens
  routed to it only (no capacity buffers).

Module names are the export's clean names (see export.py): `moe.gate.weight`,
`moe.experts.{i}.fc1.weight`, `blocks.{j}.mlp.fc1.weight`, `blocks.{j}.mlp.experts.{i}.fc1.weight`,
`pre_logits.fc.weight`, ... The model is inference-only: train() changes nothing (no dropout, no
router noise). Build one with `build(cfg)`; load an export with `export.load_exported`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, MoEConfig
from .routing_core import (ModelOutput, RoutingStats, expert_choice_routing, paper_routing, router_entropy,
                           router_logits, router_z_loss, stats_from_routes, sum_z_loss)

LN_EPS = 1e-6  # every LayerNorm of the DeepSpeed models (and timm's ViT default)


# --------------------------------------------------------------------------------------------
# DeepSpeed's gates in eval mode (deepspeed/moe/sharded_moe.py, 0.19), sparse-route outputs


def _ds_capacity(gates: Tensor, capacity_factor: Tensor, min_capacity: Tensor) -> Tensor:
    # DeepSpeed's _capacity: float32 arithmetic on purpose (cf is a float32 tensor there), since
    # float64 would round some capacities differently (e.g. 5 tokens/expert x 1.2 -> 7, not 6).
    num_tokens, num_experts = gates.shape
    capacity = torch.ceil((num_tokens / num_experts) * capacity_factor).to(torch.int64)
    return torch.maximum(capacity, min_capacity.to(torch.int64))


def deepspeed_top1_routes(logits: Tensor, capacity_factor: float, min_capacity: int,
                          used_token: Optional[Tensor], drop_tokens: bool) -> tuple[Tensor, Tensor, Tensor]:
    """DeepSpeed's top1gating in eval (no noise, use_rts=False): (l_aux, expert ids [1, S] with -1
    for a dropped or padding route, gate values [1, S]). The calls are DeepSpeed's own (einsum with
    the float used_token, torch.topk over the 0/1 mask) so that capacity ties resolve the same."""
    gates = F.softmax(logits, dim=1)
    capacity = _ds_capacity(gates, torch.tensor(capacity_factor), torch.tensor(min_capacity))
    indices1_s = torch.argmax(gates, dim=1)
    num_experts = int(gates.shape[1])
    mask1 = F.one_hot(indices1_s, num_classes=num_experts)
    if used_token is not None:
        mask1 = torch.einsum("s,se->se", used_token, mask1)
    exp_counts = torch.sum(mask1, dim=0).detach()
    if not drop_tokens:
        # DeepSpeed: the largest expert count (max-reduced over the expert group; single-process
        # here, where a larger capacity would keep the same routes anyway), at most the tokens.
        capacity = torch.minimum(torch.max(exp_counts).to(torch.int64), torch.tensor(mask1.size(0)))
    me = torch.mean(gates, dim=0)
    ce = torch.mean(mask1.float(), dim=0)
    l_aux = torch.sum(me * ce) * num_experts
    if logits.shape[0] < min_capacity:  # DeepSpeed asserts the same
        raise ValueError(f"{logits.shape[0]} tokens < min_capacity={min_capacity}: DeepSpeed's top-1 gate refuses this")
    selection_capacity = int(min(int(capacity), mask1.size(0)))
    top_idx = torch.topk(mask1, k=selection_capacity, dim=0)[1]
    mask1 = mask1 * torch.zeros_like(mask1).scatter_(0, top_idx, 1)
    indices_mask = mask1.sum(dim=1) * num_experts - 1
    indices1_s = torch.min(indices1_s, indices_mask)
    gates1_s = (gates * mask1).sum(dim=1)
    return l_aux, indices1_s.to(torch.int32).unsqueeze(0), gates1_s.unsqueeze(0)


def deepspeed_top2_routes(logits: Tensor, capacity_factor: float, min_capacity: int,
                          drop_tokens: bool) -> tuple[Tensor, Tensor, Tensor]:
    """DeepSpeed's top2gating in eval (no second-expert sampling): (l_aux, expert ids [2, S] with -1
    for a dropped route, renormalised gate values [2, S]). First choices take capacity before
    second choices; like DeepSpeed it ignores used_token, so padding takes capacity."""
    gates = F.softmax(logits, dim=1)
    indices1_s = torch.argmax(gates, dim=1)
    num_experts = int(gates.shape[1])
    mask1 = F.one_hot(indices1_s, num_classes=num_experts)
    logits_except1 = logits.masked_fill(mask1.bool(), float("-inf"))
    indices2_s = torch.argmax(logits_except1, dim=1)
    mask2 = F.one_hot(indices2_s, num_classes=num_experts)
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations2 = torch.cumsum(mask2, dim=0) - 1
    locations2 += torch.sum(mask1, dim=0, keepdim=True)
    me = torch.mean(gates, dim=0)
    ce = torch.mean(mask1.float(), dim=0)
    l_aux = torch.mean(me * ce) * num_experts * num_experts
    if drop_tokens:
        capacity = _ds_capacity(gates, torch.tensor(capacity_factor * 2), torch.tensor(min_capacity))
        mask1 = mask1 * torch.lt(locations1, capacity)
        mask2 = mask2 * torch.lt(locations2, capacity)
    # (without drop_tokens DeepSpeed's capacity is the largest expert count: nothing is dropped)
    mask1_float, mask2_float = mask1.float(), mask2.float()
    gates1_s = torch.einsum("se,se->s", gates, mask1_float)
    gates2_s = torch.einsum("se,se->s", gates, mask2_float)
    denom_s = torch.clamp(gates1_s + gates2_s, min=torch.finfo(gates1_s.dtype).eps)
    gates1_s = gates1_s / denom_s
    gates2_s = gates2_s / denom_s
    indices1_s = torch.where(mask1.any(dim=1), indices1_s, torch.full_like(indices1_s, -1))
    indices2_s = torch.where(mask2.any(dim=1), indices2_s, torch.full_like(indices2_s, -1))
    return l_aux, torch.stack([indices1_s, indices2_s]).to(torch.int32), torch.stack([gates1_s, gates2_s])


# --------------------------------------------------------------------------------------------
# Layers


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens ([B, C, H, W] -> [B, N, D]); timm's `patch_embed.proj`."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention (fused SDPA, as the DeepSpeed models in eval)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """The dense FFN, and one expert of the MoE FFN (timm's Mlp names: fc1, act, fc2)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MoE(nn.Module):
    """The MoE FFN in eval mode: gate (`gate.weight`, [E * num_depths, d] with per_depth_gate) and
    experts (`experts.{i}`, global ids). Returns (output, aux loss, RoutingStats)."""

    def __init__(self, dim: int, cfg: MoEConfig, num_depths: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_depths = num_depths if cfg.per_depth_gate else 1
        self.gate = nn.Linear(dim, cfg.num_experts * self.num_depths, bias=False)
        self.experts = nn.ModuleList(Mlp(dim, cfg.expert_dim) for _ in range(cfg.num_experts))

    def router_logits(self, x: Tensor, depth: int) -> Tensor:
        """fp32 router logits [S, E] (the gate computes in fp32 whatever the model's dtype)."""
        w = self.gate.weight
        if self.num_depths > 1:
            e = self.cfg.num_experts
            w = w[depth * e:(depth + 1) * e]
        # as the training gate computes them: PaperGate expert-major, DeepSpeed's TopKGate F.linear
        return router_logits(x, w) if self.cfg.paper_gate else F.linear(x.float(), w.float())

    def routes(self, logits: Tensor, used_token: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(l_aux, expert ids [k, S] (-1 = not routed), gate values [k, S] (0 where not routed)); with
        expert choice [E, S] each, row e for expert e (see routing_core.RoutingStats)."""
        c = self.cfg
        if c.expert_choice:
            l_aux, _, _, indices, _, gates, _ = expert_choice_routing(logits, c.k, c.eval_capacity_factor,
                                                                      c.min_capacity, used_token)
            return l_aux, indices, gates
        if c.paper_gate:
            l_aux, _, _, indices, _, gates, _ = paper_routing(logits, c.k, c.eval_capacity_factor, c.min_capacity,
                                                              used_token, c.drop_tokens, priority=c.router == "bpr")
            return l_aux, indices, gates
        if c.k == 1:
            return deepspeed_top1_routes(logits, c.eval_capacity_factor, c.min_capacity, used_token, c.drop_tokens)
        return deepspeed_top2_routes(logits, c.eval_capacity_factor, c.min_capacity, c.drop_tokens)

    def forward(self, x: Tensor, depth: int = 0, used_token: Optional[Tensor] = None
                ) -> tuple[Tensor, Tensor, RoutingStats]:
        b, d = x.shape[0], x.shape[-1]
        tokens = x.reshape(-1, d)
        s = tokens.shape[0]
        logits = self.router_logits(tokens, depth)
        l_aux, indices, gates = self.routes(logits, used_token)
        k = indices.shape[0]
        # Group the k*S routes by expert (one host sync for the counts); route r is token r % S.
        flat = indices.reshape(-1).long()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat + 1, minlength=self.cfg.num_experts + 1).tolist()
        routed = tokens.new_zeros(k * s, d)
        start = counts[0]  # the dropped routes (-1) sort first and stay zero
        for e, n in enumerate(counts[1:]):
            if n:
                sel = order[start:start + n]
                routed[sel] = self.experts[e](tokens[sel % s])
                start += n
        # As DeepSpeed's _sparse_decode: fp32 gates, the sum over routes in fp32, then the model dtype.
        out = (routed.view(k, s, d) * gates.unsqueeze(-1)).sum(0).to(tokens.dtype)
        z = router_z_loss(logits, used_token) if self.cfg.z_loss_weight > 0 else None
        stats = stats_from_routes(l_aux, indices, self.cfg.num_experts, b, used_token,
                                  router_entropy(logits, used_token), z, self.cfg.expert_choice)
        return out.reshape(x.shape), l_aux, stats


class Block(nn.Module):
    """Pre-norm ViT block (timm's names): norm1, attn, norm2, mlp (an Mlp or a MoE)."""

    def __init__(self, cfg: ModelConfig, moe: bool) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=LN_EPS)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(d, eps=LN_EPS)
        self.mlp: nn.Module = MoE(d, cfg.moe) if moe else Mlp(d, cfg.mlp_dim)

    def forward(self, x: Tensor, depth: int, used_token: Optional[Tensor]
                ) -> tuple[Tensor, Optional[Tensor], Optional[RoutingStats]]:
        x = x + self.attn(self.norm1(x))
        if isinstance(self.mlp, MoE):
            y, aux, stats = self.mlp(self.norm2(x), depth, used_token)
            return x + y, aux, stats
        return x + self.mlp(self.norm2(x)), None, None


# --------------------------------------------------------------------------------------------
# Models


class StandaloneModel(nn.Module):
    """Embedding and head shared by both architectures; subclasses define `forward_features`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.num_prefix = 1 if cfg.pool == "cls" else 0
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + self.num_prefix, d))
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.pre_logits = (nn.Sequential(OrderedDict([("fc", nn.Linear(d, d)), ("act", nn.Tanh())]))
                           if cfg.pre_logits else nn.Identity())
        self.head = nn.Linear(d, cfg.num_classes)

    def embed(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    def forward_features(self, x: Tensor, used_token: Optional[Tensor]
                         ) -> tuple[Tensor, Tensor, list[RoutingStats]]:
        raise NotImplementedError

    def forward_head(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return self.head(self.pre_logits(x))

    def forward(self, x: Tensor, sample_ids: Optional[Tensor] = None, step: int = 0, seed: int = 0,
                valid: Optional[Tensor] = None) -> ModelOutput:
        """The DeepSpeed models' call signature. `valid` [B] marks padding samples (False), which
        take no expert capacity with router="paper" and are left out of the routing stats;
        `sample_ids`, `step` and `seed` only key training randomness and are ignored here."""
        used_token = None
        if valid is not None:
            used_token = valid.to(x.device).float().repeat_interleave(self.cfg.tokens_per_image)
        feats, aux, routing = self.forward_features(x, used_token)
        return ModelOutput(logits=self.forward_head(feats), aux_loss=aux, routing=routing, z_loss=sum_z_loss(routing))


class WideNet(StandaloneModel):
    """Shared `attn` and `moe` at every depth, through `attn_norms[i]` / `moe_norms[i]`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        assert cfg.moe is not None
        d = cfg.embed_dim
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias)
        self.moe = MoE(d, cfg.moe, num_depths=cfg.depth)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(d, eps=LN_EPS) for _ in range(cfg.depth))
        self.moe_norms = nn.ModuleList(nn.LayerNorm(d, eps=LN_EPS) for _ in range(cfg.depth))

    def forward_features(self, x: Tensor, used_token: Optional[Tensor]
                         ) -> tuple[Tensor, Tensor, list[RoutingStats]]:
        x = self.embed(x)
        aux = x.new_zeros((), dtype=torch.float32)
        routing: list[RoutingStats] = []
        for i in range(self.cfg.depth):
            x = x + self.attn(self.attn_norms[i](x))
            y, aux_i, stats = self.moe(self.moe_norms[i](x), i, used_token)
            x = x + y
            aux = aux + aux_i
            routing.append(stats)
        return x, aux, routing


class ViT(StandaloneModel):
    """ViT (arch='vit') or ViT-MoE (arch='vit_moe': the last `moe_last_n` blocks are MoE)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        first_moe = cfg.depth - cfg.moe_last_n if cfg.arch == "vit_moe" else cfg.depth
        self.blocks = nn.ModuleList(Block(cfg, i >= first_moe) for i in range(cfg.depth))

    def forward_features(self, x: Tensor, used_token: Optional[Tensor]
                         ) -> tuple[Tensor, Tensor, list[RoutingStats]]:
        x = self.embed(x)
        aux = x.new_zeros((), dtype=torch.float32)
        routing: list[RoutingStats] = []
        for i, blk in enumerate(self.blocks):
            x, aux_i, stats = blk(x, i, used_token)
            if stats is not None:
                aux = aux + aux_i
                routing.append(stats)
        return x, aux, routing


def build(cfg: ModelConfig, device: Union[str, torch.device, None] = None) -> StandaloneModel:
    """An uninitialised standalone model in eval mode (load weights into it). `device='meta'`
    allocates nothing: load with `load_state_dict(..., assign=True)`, or list its names/shapes."""
    with torch.device(device or "cpu"):
        model = WideNet(cfg) if cfg.arch == "widenet" else ViT(cfg)
    return model.eval()
