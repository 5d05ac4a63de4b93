"""Routing arithmetic and model outputs in plain PyTorch (no DeepSpeed import).

Shared by the DeepSpeed gates (models/routing.py) and the standalone inference model
(standalone.py), so an exported model routes exactly as it was trained and evaluated:
the paper's top-k with capacity (token order or BPR), expert choice, the router z-loss and
entropy, per-call routing statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import Tensor

_T = TypeVar("_T")


@dataclass
class RouteKey:
    """What keyed randomness needs from the training loop: the seed, the optimizer step and the
    global id of each sample of the micro-batch ([B], int64). `memo` holds what one forward draws once
    for several calls (WideNet's router noise of every depth): a key is made per forward."""

    seed: int
    step: int
    sample_ids: Tensor
    memo: dict = field(default_factory=dict, repr=False, compare=False)


def once_per_forward(key: Optional[RouteKey], slot: Hashable, make: Callable[[], _T]) -> _T:
    """make(), made at the forward's first call and kept on key.memo[slot] for the later ones (WideNet
    calls its shared layers at every depth); without a key, or traced by torch.compile (where a value
    kept from one traced call would leak into the next graph), made per call."""
    if key is None or torch.compiler.is_compiling():
        return make()
    value = key.memo.get(slot)
    if value is None:
        value = key.memo[slot] = make()
    return value


@dataclass
class RoutingStats:
    """One MoE call (one depth): where the tokens went. `expert_index` is [k, B, T] with -1 for a
    route dropped by the capacity limit or masked as padding; `expert_tokens` is the number of
    routes each expert processed ([E]); `dropped` the fraction of routes dropped ([]);
    `entropy` the router entropy in nats, mean over the used tokens of the entropy of the softmax
    over experts (the probabilities that routed: with the paper gate's training noise), ln(E) for
    a uniform router, 0 for a collapsed one; `num_tokens` the number of used (non-padding) tokens;
    `z_loss` the router z-loss of the call (only where model.moe.z_loss_weight > 0).

    With expert choice (`expert_choice`) a token has 0..E routes: `expert_index` is [E, B, T], row e
    holding e where expert e took the token and -1 elsewhere, and `dropped` is the fraction of used
    tokens that no expert took."""

    aux_loss: Tensor
    expert_index: Tensor
    expert_tokens: Tensor
    dropped: Tensor
    entropy: Optional[Tensor] = None
    num_tokens: Optional[Tensor] = None
    z_loss: Optional[Tensor] = None
    expert_choice: bool = False


@dataclass
class ModelOutput:
    """logits [B, classes]; aux_loss: the balance loss summed over every MoE call (unweighted; the
    recipe's model.moe.aux_loss_weight multiplies it); routing: one RoutingStats per MoE call, in
    depth order (WideNet: one per depth; ViT-MoE: one per MoE block; ViT: empty); z_loss: the router
    z-loss summed over MoE calls (unweighted), None where model.moe.z_loss_weight is 0."""

    logits: Tensor
    aux_loss: Tensor
    routing: list[RoutingStats] = field(default_factory=list)
    z_loss: Optional[Tensor] = None


def sum_z_loss(routing: list[RoutingStats]) -> Optional[Tensor]:
    """The calls' z-losses summed (None when no call computed one)."""
    zs = [r.z_loss for r in routing if r.z_loss is not None]
    return torch.stack(zs).sum() if zs else None


def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """fp32 router logits [S, E] of tokens x [S, d] and a gate matrix [E, d], stored expert-major (an
    [E, S] matrix, returned transposed): the routing's softmax and top-k, the entropy and the noise add
    then run over the experts across contiguous tokens with no copy (over the last dim of a contiguous
    [S, E] the CPU kernels are ~20x slower at E = 4), and the matmul is [E, d] x [d, S]."""
    return _fp32(weight).mm(_fp32(x).t()).t()


def _fp32(t: Tensor) -> Tensor:
    # `.float()` of a float32 tensor returns it, but through the dispatcher (a `to` call per use)
    return t if t.dtype == torch.float32 else t.float()


def paper_routing(logits: Tensor, k: int, capacity_factor: float, min_capacity: int,
                  used_token: Optional[Tensor], drop_tokens: bool,
                  ep_group: Optional[torch.distributed.ProcessGroup] = None, priority: bool = False):
    """Top-k routing with plain softmax gate values; returns DeepSpeed's sparse-route tuple
    (l_aux, capacity, E, indices [k,S] (-1 dropped), locations [k,S], gates [k,S], exp_counts), the
    capacity a Python int: from the shapes with drop_tokens (no host read), else the largest count.

    Every first choice queues for capacity before any second choice. Within a choice the queue is
    the token order, or with `priority` (V-MoE's Batch Prioritized Routing, router="bpr") the order
    of the tokens' top gate values, highest first (ties in token order): when an expert is full, the
    tokens its router was least sure of are the ones dropped."""
    r = _paper_routes(logits, k, capacity_factor, min_capacity, used_token, drop_tokens, ep_group, priority)
    return r.l_aux, r.capacity, logits.shape[1], r.indices, r.locations, r.gates, r.counts


def paper_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """Slots per expert with drop_tokens: ceil(k * S / E * cf), at least min_capacity."""
    return max(math.ceil(num_tokens / num_experts * capacity_factor * k), min_capacity)


@dataclass
class _PaperRoutes:
    """paper_routing's result and what its gradient needs: probs [E, S] (the softmax), idx [k, S] (the
    chosen experts, long), kept [k, S] (bool), daux [E] (d l_aux / d probs[e, s] for a used token s:
    the balance loss is linear in the probabilities)."""

    l_aux: Tensor
    capacity: int
    indices: Tensor
    locations: Tensor
    gates: Tensor
    counts: Tensor
    probs: Tensor
    idx: Tensor
    kept: Tensor
    daux: Tensor


def _paper_routes(logits: Tensor, k: int, capacity_factor: float, min_capacity: int,
                  used_token: Optional[Tensor], drop_tokens: bool,
                  ep_group: Optional[torch.distributed.ProcessGroup], priority: bool) -> _PaperRoutes:
    num_tokens, num_experts = logits.shape
    # The softmax and top-k run on the [E, S] layout: over the experts (a short dim) across contiguous
    # rows of tokens; over the last dim of [S, E] the CPU kernels are ~20x slower at E = 4.
    probs = F.softmax(logits.t().contiguous(), dim=0)  # [E, S]
    top_gates, idx = probs.topk(k, dim=0)  # [k, S]: the k choices as one block (no Python loop over them)
    # [k, S, E] one-hot (a scatter: F.one_hot also checks the index range, a reduction over idx)
    mask = torch.zeros(k, num_tokens, num_experts, dtype=torch.long, device=logits.device).scatter_(
        2, idx.unsqueeze(2), 1)
    # l_aux = E * sum_e me[e] * ce[e], me the mean probability and ce the first-choice fraction over the
    # n used tokens: computed as dot(probs summed over the used tokens, daux), daux = E * ce / n, the
    # gradient PaperRouter's backward needs (fewer small ops than the mean, the fractions and their product)
    n_used: Union[float, Tensor]
    if used_token is None:
        n_used = float(num_tokens)
        p_sum = probs.sum(1)
    else:
        used = used_token.reshape(-1)
        mask = mask * used.long().view(1, -1, 1)
        n_used = used.float().sum().clamp(min=1.0)
        p_sum = probs.mv(used.float())
    # One cumsum over the k-major [k*S, E] block: every first choice queues before any second choice;
    # its last row counts every expert's routes, its row S-1 the first choices (in any queue order).
    queue = mask
    if priority:  # tokens queue by their top gate value, highest first (a stable sort: ties in token order)
        order = torch.sort(top_gates[0].detach(), descending=True, stable=True).indices
        queue = mask.index_select(1, order)
    loc = queue.reshape(k * num_tokens, num_experts).cumsum(0)
    exp_counts = loc[-1]
    daux = loc[num_tokens - 1] * (num_experts / n_used ** 2)  # float (a long times a float)
    l_aux = torch.dot(p_sum, daux)

    if drop_tokens:
        capacity = paper_capacity(num_tokens, num_experts, k, capacity_factor, min_capacity)
    else:
        cap = exp_counts.max().clone()
        if ep_group is not None and torch.distributed.get_world_size(ep_group) > 1:
            torch.distributed.all_reduce(cap, op=torch.distributed.ReduceOp.MAX, group=ep_group)
        capacity = max(int(cap), 1)

    loc = loc.view(k, num_tokens, num_experts)
    if priority:  # back to token order: the token at queue position j is order[j]
        loc = torch.empty_like(loc).index_copy_(1, order, loc)
    # [k, S]: the route's place in its expert's queue (its count there, less one)
    loc_s = loc.gather(2, idx.unsqueeze(2)).squeeze(2) - 1
    kept = loc_s < capacity
    if used_token is not None:  # a padding token queues nowhere: none of its routes is kept
        kept &= mask.sum(-1) > 0
    indices = torch.where(kept, idx, -1)  # int64, as every consumer indexes with them
    locations = torch.where(kept, loc_s, 0)
    return _PaperRoutes(l_aux, capacity, indices, locations, top_gates * kept, exp_counts, probs, idx, kept, daux)


class PaperRouter(torch.autograd.Function):
    """The paper gate's training routing with drop_tokens as one autograd node: the logits
    (router_logits), the noise added, and paper_routing, with a hand-written backward from the gate
    values and the balance loss through the softmax to the tokens and the gate matrix.

    Why: traced by autograd the same routing is ~15 small nodes per call (the logits' matmul and
    transposes, the noise add, softmax, top-k, the balance loss's mean, products and sum, the gate
    values' product); at d 128 on the CPU each costs more in the engine than in its kernel. The forward
    is paper_routing's code, so the decisions are those of the reference; the gradients equal
    autograd's through it to rounding (tests/test_routers.py).

    apply(x [S, d], weight [E, d], noise [S, E] or None, noise_std, k, capacity_factor, min_capacity,
    used_token or None, priority) -> (l_aux, gates [k, S], indices, locations, counts, entropy); the
    last four carry no gradient, and the capacity is paper_capacity's."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, noise: Optional[Tensor], noise_std: float, k: int,  # noqa: ANN001
                capacity_factor: float, min_capacity: int, used_token: Optional[Tensor], priority: bool):
        logits = router_logits(x, weight)
        if noise is not None:
            logits = torch.add(logits, noise, alpha=noise_std)
        r = _paper_routes(logits, k, capacity_factor, min_capacity, used_token, True, None, priority)
        used = None if used_token is None else used_token.reshape(-1).float()
        # d l_aux / d probs[e, s] = daux[e] * used[s] (the balance loss is linear in probs)
        ctx.save_for_backward(x, weight, r.probs, r.idx, r.kept, r.daux, used)
        entropy = probs_entropy(r.probs, used_token)
        ctx.mark_non_differentiable(r.indices, r.locations, r.counts, entropy)
        return r.l_aux, r.gates, r.indices, r.locations, r.counts, entropy

    @staticmethod
    def backward(ctx, g_aux: Optional[Tensor], g_gates: Optional[Tensor], *_: Optional[Tensor]):  # noqa: ANN001, ANN205
        x, weight, probs, idx, kept, daux_dprobs, used = ctx.saved_tensors
        gp = torch.zeros_like(probs)
        if g_gates is not None:  # gates[j, s] = probs[idx[j, s], s] where kept (distinct experts per token)
            gp.scatter_(0, idx, g_gates.float() * kept)
        if g_aux is not None:
            da = (daux_dprobs * g_aux).unsqueeze(1)
            gp += da if used is None else da * used
        gl = (gp - (probs * gp).sum(0, keepdim=True)).mul_(probs)  # the softmax's backward: [E, S]
        gx = gl.t().mm(weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        gw = gl.mm(x.float()).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None, None, None, None, None, None


def expert_choice_routing(logits: Tensor, k: int, capacity_factor: float, min_capacity: int,
                          used_token: Optional[Tensor]):
    """Expert-choice routing (Zhou et al. 2022): each expert takes the C tokens of the group with its
    highest gate values (the softmax over experts, as the paper's router computes it), C =
    min(S, max(ceil(k*S/E*cf), min_capacity)): the token-choice capacity, so the experts do the same
    work as top-k token choice at that capacity factor. Ties go to the earlier token (a stable sort);
    padding is never taken. Returns paper_routing's tuple with E route rows per token: indices [E, S]
    (row e is e where expert e took the token, else -1), locations [E, S] (the token's place among
    the expert's C), gates [E, S] (its gate value, 0 where not taken); l_aux is 0 (no balance loss)."""
    num_tokens, num_experts = logits.shape
    probs = F.softmax(logits.t(), dim=0)  # [E, S] (see router_logits)
    capacity = min(num_tokens, paper_capacity(num_tokens, num_experts, k, capacity_factor, min_capacity))
    scores = probs.detach().nan_to_num(nan=-1.0)  # a NaN would sort first
    if used_token is not None:
        used = used_token.reshape(1, -1).bool()
        scores = torch.where(used, scores, torch.full_like(scores, -1.0))  # padding sorts last
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :capacity]  # [E, C]
    rank = torch.arange(capacity, device=logits.device).expand(num_experts, capacity)
    loc = torch.full((num_experts, num_tokens), -1, dtype=torch.long, device=logits.device).scatter_(1, order, rank)
    taken = loc >= 0
    if used_token is not None:
        taken = taken & used
    experts = torch.arange(num_experts, device=logits.device).view(-1, 1).expand_as(loc)
    indices = torch.where(taken, experts, torch.full_like(experts, -1)).to(torch.int32)
    locations = torch.where(taken, loc, torch.zeros_like(loc)).to(torch.int32)
    l_aux = logits.new_zeros(())
    return l_aux, capacity, num_experts, indices, locations, probs * taken, taken.sum(1).detach()


def router_z_loss(logits: Tensor, used_token: Optional[Tensor] = None) -> Tensor:
    """ST-MoE's router z-loss: mean over the used tokens of logsumexp(logits)^2 ([S, E] -> [])."""
    z = torch.logsumexp(logits.float(), dim=-1).square()
    if used_token is None:
        return z.mean()
    w = used_token.reshape(-1).float()
    return (z * w).sum() / w.sum().clamp(min=1.0)


def router_entropy(logits: Tensor, used_token: Optional[Tensor] = None) -> Tensor:
    """Mean over the used tokens of the entropy (nats) of softmax(logits) over experts ([S, E] -> [])."""
    with torch.no_grad():  # on the [E, S] layout, as paper_routing's softmax (a reduction over a short dim)
        return probs_entropy(F.softmax(logits.detach().float().t().contiguous(), dim=0), used_token)


def probs_entropy(probs: Tensor, used_token: Optional[Tensor] = None) -> Tensor:
    """router_entropy of the routing probabilities themselves ([E, S], each column a softmax): the
    paper router has them, so its statistics need no second softmax."""
    with torch.no_grad():
        h = torch.special.entr(probs)  # -p log p, 0 at p = 0
        if used_token is None:
            return h.sum().div_(probs.shape[1])
        w = used_token.reshape(-1).float()
        return h.sum(0).dot(w) / w.sum().clamp(min=1.0)


def stats_from_routes(l_aux: Tensor, indices: Tensor, num_experts: int, batch: int,
                      used_token: Optional[Tensor], entropy: Optional[Tensor] = None,
                      z_loss: Optional[Tensor] = None, expert_choice: bool = False,
                      counts: Optional[Tensor] = None) -> RoutingStats:
    """Per-depth statistics from the gate's sparse routes ([k, S] expert ids, -1 = not routed; with
    expert choice [E, S], see RoutingStats); `counts` [E], the routes each expert keeps where the
    router has them (padding excluded), spares counting them from the indices."""
    k, s = indices.shape
    idx = indices if indices.dtype == torch.long else indices.long()
    if used_token is not None:
        used = used_token.reshape(1, s).bool()
        idx = torch.where(used, idx, torch.full_like(idx, -1))
        n_tokens = used.sum()
    else:
        n_tokens = torch.full((), s, dtype=torch.long, device=idx.device)
    if counts is not None:
        expert_tokens = counts.float()
    else:  # counts by scatter-add: no host sync (boolean indexing and CUDA bincount both read sizes back)
        expert_tokens = torch.zeros(num_experts, device=idx.device).index_add_(
            0, idx.clamp(min=0).flatten(), (idx >= 0).flatten().float())
    if expert_choice:  # a token is dropped when no expert took it (padding is never taken: not counted)
        dropped = 1.0 - (idx >= 0).any(0).sum().float() / n_tokens.clamp(min=1).float()
    elif used_token is None:  # k * S routes (a Python number: fewer small ops on the hot path); a true
        # division, as below: a product with the rounded 1 / (k * S) leaves 6e-8 where no route dropped
        dropped = expert_tokens.sum().div_(-max(k * s, 1)).add_(1.0)
    else:
        dropped = 1.0 - expert_tokens.sum() / (n_tokens * k).clamp(min=1).float()
    return RoutingStats(aux_loss=l_aux, expert_index=_no_grad(idx.view(k, batch, s // batch)),
                        expert_tokens=_no_grad(expert_tokens), dropped=_no_grad(dropped),
                        entropy=None if entropy is None else _no_grad(entropy), num_tokens=n_tokens,
                        z_loss=z_loss, expert_choice=expert_choice)


def _no_grad(t: Tensor) -> Tensor:
    # statistics never carry a graph; `detach` of a tensor that has none is one more op per field
    return t.detach() if t.requires_grad else t
