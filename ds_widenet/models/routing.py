"""Routers for DeepSpeed's MoE layer, and the routing statistics the models return.

Two gates plug into `deepspeed.moe.layer.MoE`:

* DeepSpeed's own `TopKGate`, unmodified (router="deepspeed").
* `PaperGate` (router="paper"), a `TopKGate` subclass with the WideNet/V-MoE routing of the
  authors' code: noise N(0, std^2) added to the logits in training, softmax, top-k; the gate
  values are the plain softmax probabilities (DeepSpeed renormalises g1+g2 for k=2); no Gumbel
  sampling of the second expert (DeepSpeed's default); capacity ceil(k*S/E*cf); first choices
  take capacity before second choices; balance loss E * sum_i f_i * P_i over used tokens.
  The noise is keyed by (seed, step, depth, global sample id, token, expert) - see rng.py - so it
  is the same on any world size and on activation-checkpoint recompute. With
  `per_depth_gate` it holds one gate matrix per depth (the Colossal-AI port), indexed by depth.

The MoE layer calls its gate with positional arguments only, so the per-call context (depth,
noise key) is handed over with `route_context`, set by the caller for the span of one call.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate
from torch import Tensor

from .. import rng
from ..testing import negative_control

_NOISE_PER_RANK = negative_control() == "noise_per_rank"


@dataclass
class RouteKey:
    """What keyed randomness needs from the training loop: the seed, the optimizer step and the
    global id of each sample of the micro-batch ([B], int64)."""

    seed: int
    step: int
    sample_ids: Tensor


@dataclass
class RoutingStats:
    """One MoE call (one depth): where the tokens went. `expert_index` is [k, B, T] with -1 for a
    route dropped by the capacity limit or masked as padding; `expert_tokens` is the number of
    routes each expert processed ([E]); `dropped` the fraction of routes dropped ([]);
    `entropy` the router entropy in nats, mean over the used tokens of the entropy of the softmax
    over experts (the probabilities that routed: with the paper gate's training noise), ln(E) for
    a uniform router, 0 for a collapsed one; `num_tokens` the number of used (non-padding) tokens."""

    aux_loss: Tensor
    expert_index: Tensor
    expert_tokens: Tensor
    dropped: Tensor
    entropy: Optional[Tensor] = None
    num_tokens: Optional[Tensor] = None


class PaperGate(TopKGate):
    """The paper's router (see module doc). Drop-in for DeepSpeed's MOELayer (sparse routes)."""

    def __init__(self, model_dim: int, num_experts: int, k: int, capacity_factor: float,
                 eval_capacity_factor: float, min_capacity: int, drop_tokens: bool,
                 noise_std: float, num_depths: int = 1) -> None:
        super().__init__(model_dim, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                         noisy_gate_policy=None, drop_tokens=drop_tokens, use_rts=False,
                         top2_2nd_expert_sampling=False)
        # One [E, d] matrix per depth stacked in one Linear, so the state dict stays `wg.weight`.
        self.num_depths = num_depths
        self.wg = torch.nn.Linear(model_dim, num_experts * num_depths, bias=False)
        self.noise_std = noise_std
        self.context: Optional[tuple[int, Optional[RouteKey]]] = None
        self.last_entropy: Optional[Tensor] = None  # router entropy of the last call (see RoutingStats)

    def logits(self, x: Tensor, depth: int) -> Tensor:
        e = self.wg.out_features // self.num_depths
        w = self.wg.weight
        if self.num_depths > 1:
            w = w[depth * e:(depth + 1) * e]  # slice before the cast: only this depth's matrix
        return F.linear(x.float(), w.float())

    def forward(self, input: Tensor, used_token: Optional[Tensor] = None, sparse_routes: bool = False,
                use_tutel: bool = False):  # type: ignore[override]
        if not sparse_routes or use_tutel:
            raise NotImplementedError("PaperGate implements DeepSpeed 0.19's sparse-route gate protocol only")
        depth, key = self.context if self.context is not None else (0, None)
        logits = self.logits(input, depth)
        if self.training and self.noise_std > 0:
            logits = logits + self.noise_std * _router_noise(logits.shape, depth, key, logits.device)
        self.last_entropy = router_entropy(logits, used_token)
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        return paper_routing(logits, self.k, cf, self.min_capacity, used_token, self.drop_tokens, self.ep_group)


def _router_noise(shape: torch.Size, depth: int, key: Optional[RouteKey], device: torch.device) -> Tensor:
    tokens, experts = shape
    if _NOISE_PER_RANK:  # negative control only (ds_widenet.testing): a rank-local generator
        return torch.randn(tokens, experts, device=device)
    if key is None:  # no key from the caller (a bare forward): sample ids 0..B-1 with B=1
        return rng.keyed_normal([0, 0, depth, rng.SITE_ROUTER], (tokens, experts), 2, device)
    ids = key.sample_ids.to(device)
    b = ids.numel()
    per_sample = tokens // b
    noise = rng.keyed_normal([key.seed, key.step, depth, rng.SITE_ROUTER, ids.view(b, 1, 1)],
                             (b, per_sample, experts), 2, device)
    return noise.reshape(tokens, experts)


def paper_routing(logits: Tensor, k: int, capacity_factor: float, min_capacity: int,
                  used_token: Optional[Tensor], drop_tokens: bool,
                  ep_group: Optional[torch.distributed.ProcessGroup] = None):
    """Top-k routing with plain softmax gate values; returns DeepSpeed's sparse-route tuple
    (l_aux, capacity, E, indices [k,S] (-1 dropped), locations [k,S], gates [k,S], exp_counts)."""
    num_tokens, num_experts = logits.shape
    probs = F.softmax(logits, dim=1)
    top_gates, top_idx = probs.topk(k, dim=1)  # [S, k]
    used = torch.ones(num_tokens, device=logits.device) if used_token is None else used_token.float().reshape(-1)
    masks = [F.one_hot(top_idx[:, j], num_experts) * used.long().unsqueeze(1) for j in range(k)]  # [S, E] each

    n_used = used.sum().clamp(min=1.0)
    me = (probs * used.unsqueeze(1)).sum(0) / n_used
    ce = masks[0].float().sum(0) / n_used
    l_aux = num_experts * torch.sum(me * ce)
    exp_counts = sum(m.sum(0) for m in masks).detach()

    if drop_tokens:
        capacity = max(math.ceil(num_tokens / num_experts * capacity_factor * k), min_capacity)
    else:
        cap = exp_counts.max().clone()
        if ep_group is not None and torch.distributed.get_world_size(ep_group) > 1:
            torch.distributed.all_reduce(cap, op=torch.distributed.ReduceOp.MAX, group=ep_group)
        capacity = max(int(cap), 1)

    indices, locations, gates = [], [], []
    taken = torch.zeros(num_experts, dtype=torch.long, device=logits.device)
    for j, mask in enumerate(masks):
        loc = torch.cumsum(mask, dim=0) - 1 + taken  # first choices queue before second choices
        taken = taken + mask.sum(0)
        kept = (mask * (loc < capacity)).sum(1).bool()
        loc_s = (loc * mask).sum(1)
        indices.append(torch.where(kept, top_idx[:, j], torch.full_like(top_idx[:, j], -1)))
        locations.append(torch.where(kept, loc_s, torch.zeros_like(loc_s)))
        gates.append(top_gates[:, j] * kept)
    return (l_aux, torch.tensor(capacity), num_experts, torch.stack(indices).to(torch.int32),
            torch.stack(locations).to(torch.int32), torch.stack(gates), exp_counts)


@contextlib.contextmanager
def route_context(gate: TopKGate, depth: int, key: Optional[RouteKey]) -> Iterator[None]:
    """Hand (depth, key) to a PaperGate for one call; a no-op for DeepSpeed's TopKGate."""
    if not isinstance(gate, PaperGate):
        yield
        return
    gate.context = (depth, key)
    try:
        yield
    finally:
        gate.context = None


def router_entropy(logits: Tensor, used_token: Optional[Tensor] = None) -> Tensor:
    """Mean over the used tokens of the entropy (nats) of softmax(logits) over experts ([S, E] -> [])."""
    with torch.no_grad():
        logp = F.log_softmax(logits.detach().float(), dim=-1)
        h = -(logp.exp() * logp).sum(-1)
        if used_token is None:
            return h.mean()
        w = used_token.reshape(-1).float()
        return (h * w).sum() / w.sum().clamp(min=1.0)


def gate_entropy(gate: TopKGate, args: tuple) -> Tensor:
    """Router entropy of the gate call whose positional arguments were `args` (input, used_token, ...):
    PaperGate keeps it from its forward (noise included); DeepSpeed's TopKGate has it recomputed from
    its weights (its probabilities are softmax(wg(x)): the project never sets noisy_gate_policy, and
    the Gumbel sampling of the second expert does not change them)."""
    if isinstance(gate, PaperGate) and gate.last_entropy is not None:
        return gate.last_entropy
    with torch.no_grad():
        logits = F.linear(args[0].float(), gate.wg.weight.float())
    return router_entropy(logits, args[1] if len(args) > 1 else None)


def stats_from_routes(l_aux: Tensor, indices: Tensor, num_experts: int, batch: int,
                      used_token: Optional[Tensor], entropy: Optional[Tensor] = None) -> RoutingStats:
    """Per-depth statistics from the gate's sparse routes ([k, S] expert ids, -1 = not routed)."""
    k, s = indices.shape
    idx = indices.long()
    if used_token is not None:
        used = used_token.reshape(1, s).bool()
        idx = torch.where(used, idx, torch.full_like(idx, -1))
        n_tokens = used.sum()
    else:
        n_tokens = torch.full((), s, dtype=torch.long, device=idx.device)
    n_routes = n_tokens * k
    kept = idx >= 0
    # counts by scatter-add: no host sync (boolean indexing and CUDA bincount both read sizes back)
    expert_tokens = torch.zeros(num_experts, device=idx.device).index_add_(
        0, idx.clamp(min=0).flatten(), kept.flatten().float())
    dropped = 1.0 - kept.sum().float() / n_routes.clamp(min=1).float()
    return RoutingStats(aux_loss=l_aux, expert_index=idx.reshape(k, batch, s // batch).detach(),
                        expert_tokens=expert_tokens.detach(), dropped=dropped.detach(),
                        entropy=None if entropy is None else entropy.detach(), num_tokens=n_tokens.detach())
