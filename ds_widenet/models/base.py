"""What every model here shares: patch/position embedding, the head, weight init, the output type."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import deepspeed_internals as dsi
from .. import rng
from ..config import ModelConfig
from .layers import MoEFFN, PatchEmbed, _dropout
from ..routing_core import ModelOutput, RouteKey, RoutingStats, sum_z_loss  # noqa: F401


class VisionBackbone(nn.Module):
    """Embedding, THE depth loop and the head; subclasses say what depth i is (`depth_block`).

    timm's conventions: `forward_features` / `forward_head`, `no_weight_decay()`,
    `set_grad_checkpointing()`, `reset_classifier()`."""

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
        self.grad_checkpointing = cfg.grad_checkpointing

    def no_weight_decay(self) -> set[str]:
        """Parameters that are embeddings, not weights: decaying them pulls positions and the class
        token towards zero, which ViT recipes avoid (optim.param_groups reads this)."""
        return {"pos_embed"} | ({"cls_token"} if self.cls_token is not None else set())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each depth in backward (the memory lever); keyed randomness makes the recompute
        take the same routing decisions and dropout masks as the forward."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        """A new zero-initialised head for `num_classes` classes (fine-tuning)."""
        self.head = nn.Linear(self.cfg.embed_dim, num_classes, device=self.head.weight.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.cfg.num_classes = num_classes

    def embed(self, x: Tensor, key: Optional[RouteKey]) -> Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        return _dropout(x, self.cfg.dropout, self.training, key, 0, rng.SITE_EMBED_DROP)

    def depth_block(self, i: int, x: Tensor, key: Optional[RouteKey], used_token: Optional[Tensor]
                    ) -> tuple[Tensor, Optional[Tensor], Optional[RoutingStats]]:
        """Depth i: (x, its MoE aux loss, its RoutingStats), or None for both where depth i is dense."""
        raise NotImplementedError

    def forward_features(self, x: Tensor, key: Optional[RouteKey] = None,
                         used_token: Optional[Tensor] = None) -> tuple[Tensor, Tensor, list[RoutingStats]]:
        """Tokens after every depth, the aux loss summed over MoE calls, one RoutingStats per call."""
        x = self.embed(x, key)
        aux = x.new_zeros((), dtype=torch.float32)
        routing: list[RoutingStats] = []
        for i in range(self.cfg.depth):
            if self.grad_checkpointing and self.training:
                # Router noise and dropout are keyed by (step, depth, sample), so the recompute
                # in backward makes the same routing decisions as this forward.
                x, aux_i, stats = checkpoint(self.depth_block, i, x, key, used_token, use_reentrant=False)
            else:
                x, aux_i, stats = self.depth_block(i, x, key, used_token)
            if stats is not None:
                aux = aux + aux_i
                routing.append(stats)
        return x, aux, routing

    def forward_head(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return self.head(self.pre_logits(x))

    def compile(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 (nn.Module.compile's signature)
        """nn.Module.compile (in place; what DeepSpeed's engine.compile calls), with forward's `step`
        traced as a dynamic int from the first call: Dynamo would otherwise trace step 0 (or the
        first resumed step) as a constant and recompile the whole model at the next step (automatic
        dynamic), one full compile thrown away. The int still reaches the keyed hashes unchanged."""
        super().compile(*args, **kwargs)
        compiled, config = self._compiled_call_impl, torch.compiler.config
        if compiled is None or not hasattr(config, "dynamic_sources"):
            return
        sources = ",".join(s for s in (config.dynamic_sources, "L['step']") if s)

        def call(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            # set for this call only (Dynamo reads it while tracing): ~10 us, a third of config.patch
            old = config.dynamic_sources
            config.dynamic_sources = sources
            try:
                return compiled(*a, **kw)
            finally:
                config.dynamic_sources = old

        self._compiled_call_impl = call

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
        return ModelOutput(logits=self.forward_head(feats), aux_loss=aux, routing=routing, z_loss=sum_z_loss(routing))

    @torch.no_grad()
    def init_weights(self, seed: int, ep_rank: int = 0) -> None:
        """timm-style init from one generator over the non-expert parameters (in a fixed order that
        does not depend on ep_size), then each expert from its global id."""
        g = torch.Generator().manual_seed(int(seed))
        for name, p in self.named_parameters():
            if dsi.is_expert_param(p) or p.device.type == "meta":
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
