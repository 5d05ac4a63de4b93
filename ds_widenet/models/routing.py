"""Routers for DeepSpeed's MoE layer, and the routing statistics the models return.

Two gates plug into `deepspeed.moe.layer.MoE`:

* `DeepSpeedGate` (router="deepspeed"): DeepSpeed's own `TopKGate`, with the Gumbel sampling of
  the second expert in training only (see its doc).
* `PaperGate` (router="paper"; "bpr" adds V-MoE's Batch Prioritized Routing; "expert_choice" lets
  each expert take its top-C tokens instead, on the same gate), a `TopKGate` subclass
  with the WideNet/V-MoE routing of the authors' code: noise N(0, std^2) added to the logits in
  training, softmax, top-k; the gate
  values are the plain softmax probabilities (DeepSpeed renormalises g1+g2 for k=2); no Gumbel
  sampling of the second expert (DeepSpeed's default); capacity ceil(k*S/E*cf); first choices
  take capacity before second choices; balance loss E * sum_i f_i * P_i over used tokens.
  The noise is keyed by (seed, step, depth, global sample id, token, expert) - see rng.py - so it
  is the same on any world size and on activation-checkpoint recompute. With
  `per_depth_gate` it holds one gate matrix per depth (the Colossal-AI port), indexed by depth.

Both are called by `moe_layer.SparseMoELayer` as `gate(tokens, used_token, depth, key)` and return a
`Routes`: the call's context (depth, noise key) is an argument, the capacity a Python int (decided from
shapes: nothing read back from the device), the router entropy part of the result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate
from torch import Tensor

from .. import rng
from ..routing_core import (PaperRouter, RouteKey, RoutingStats, expert_choice_routing, once_per_forward,  # noqa: F401
                            paper_capacity, paper_routing, router_entropy, router_logits, router_z_loss, stats_from_routes)

NoiseSource = Callable[[torch.Size, int, Optional[RouteKey], torch.device], Tensor]


def keyed_router_noise(shape: torch.Size, depth: int, key: Optional[RouteKey], device: torch.device) -> Tensor:
    """Standard-normal router noise [tokens, experts] keyed by (seed, step, depth, global sample id,
    token, expert): the same for a token on any world size and on activation-checkpoint recompute."""
    return keyed_router_noise_depths(shape, [depth], key, device)[0]


def keyed_router_noise_depths(shape: torch.Size, depths: Sequence[int], key: Optional[RouteKey],
                              device: torch.device) -> Tensor:
    """keyed_router_noise at each of `depths`, stacked: [len(depths), tokens, experts]. Several depths
    are drawn in the ops of one (rng.keyed_normal_rows), bit for bit the per-depth noise."""
    tokens, experts = shape
    if key is None:  # no key from the caller (a bare forward): sample ids 0..B-1 with B=1
        head, keys, per = [0, 0], [], (tokens, experts)
    else:
        ids = key.sample_ids.to(device)
        b = ids.numel()
        head, keys, per = [key.seed, key.step], [ids.view(b, 1, 1)], (b, tokens // b, experts)
    prefixes = [[*head, d, rng.SITE_ROUTER] for d in depths]
    if len(prefixes) == 1 or torch.compiler.is_compiling():  # traced, the step may be symbolic: per depth
        noise = torch.stack([rng.keyed_normal([*p, *keys], per, 2, device) for p in prefixes])
    else:
        noise = rng.keyed_normal_rows(prefixes, keys, per, 2, device)
    return noise.view(len(prefixes), tokens, experts)


class KeyedRouterNoise:
    """keyed_router_noise for a gate called at `num_depths` depths (WideNet's one shared MoE layer), bit
    for bit, drawn for every depth at once: the first call of a forward computes [depths, tokens, E]
    with rng.keyed_normal_rows and memoises it on the forward's RouteKey; the other depths (and an
    activation-checkpoint recompute, which gets the same key) take their slice. At d 128 the hash's
    ~100 small ops, not its 4K elements, are its cost: once per forward instead of once per depth.
    Without a key, beyond num_depths or under torch.compile (which fuses the hash), per call."""

    def __init__(self, num_depths: int) -> None:
        self.num_depths = num_depths

    def __call__(self, shape: torch.Size, depth: int, key: Optional[RouteKey], device: torch.device) -> Tensor:
        if self.num_depths <= 1 or key is None or not 0 <= depth < self.num_depths or torch.compiler.is_compiling():
            return keyed_router_noise(shape, depth, key, device)
        slot = ("router_noise", id(self), tuple(shape), str(device))
        return once_per_forward(key, slot, lambda: keyed_router_noise_depths(shape, range(self.num_depths), key,
                                                                              device))[depth]


@dataclass
class Routes:
    """What a gate decides for one call: balance loss, capacity C (slots per expert), and per route
    ([k, S]; [E, S] with expert choice) the expert (-1: not routed), its slot in that expert and its
    gate value; the router entropy and z-loss of the call (see routing_core.RoutingStats); `counts`
    [E] int64, the routes each expert keeps, where the router has them at no cost (PaperGate's: the
    packing and the statistics then need not count the indices again)."""

    aux_loss: Tensor
    capacity: int
    indices: Tensor
    locations: Tensor
    gates: Tensor
    entropy: Optional[Tensor]
    z_loss: Optional[Tensor] = None
    expert_choice: bool = False
    counts: Optional[Tensor] = None


class PaperGate(TopKGate):
    """The paper's router (see module doc)."""

    def __init__(self, model_dim: int, num_experts: int, k: int, capacity_factor: float,
                 eval_capacity_factor: float, min_capacity: int, drop_tokens: bool,
                 noise_std: float, num_depths: int = 1, priority: bool = False, expert_choice: bool = False,
                 z_loss: bool = False, call_depths: int = 1) -> None:
        super().__init__(model_dim, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                         noisy_gate_policy=None, drop_tokens=drop_tokens, use_rts=False,
                         top2_2nd_expert_sampling=False)
        # One [E, d] matrix per depth stacked in one Linear, so the state dict stays `wg.weight`.
        self.num_depths = num_depths
        self.wg = torch.nn.Linear(model_dim, num_experts * num_depths, bias=False)
        self.noise_std = noise_std
        self.priority = priority  # router="bpr": capacity taken in the order of the top gate values
        self.expert_choice = expert_choice  # router="expert_choice": each expert takes its top-C tokens
        self.z_loss = z_loss  # compute ST-MoE's router z-loss (model.moe.z_loss_weight > 0)
        # Where the training noise comes from: keyed by default (drawn for all `call_depths` depths at
        # which the gate is called at once); anything with this signature (e.g. a rank-local generator,
        # to show what keyed noise protects against) can replace it.
        self.noise_source: NoiseSource = KeyedRouterNoise(call_depths)

    def weight(self, depth: int) -> Tensor:
        """The gate matrix [E, d] used at `depth`."""
        e = self.wg.out_features // self.num_depths
        w = self.wg.weight
        if self.num_depths > 1:
            w = w[depth * e:(depth + 1) * e]  # slice before the cast: only this depth's matrix
        return w

    def logits(self, x: Tensor, depth: int) -> Tensor:
        return router_logits(x, self.weight(depth))

    def forward(self, input: Tensor, used_token: Optional[Tensor] = None, depth: int = 0,  # type: ignore[override]
                key: Optional[RouteKey] = None) -> Routes:
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        noisy = self.training and self.noise_std > 0
        if self.drop_tokens and not (self.expert_choice or self.z_loss or torch.compiler.is_compiling()):
            # one autograd node (routing_core.PaperRouter); traced by torch.compile the ops below fuse instead
            s, e = input.shape[0], self.wg.out_features // self.num_depths
            noise = self.noise_source(torch.Size((s, e)), depth, key, input.device) if noisy else None
            l_aux, gates, indices, locations, counts, entropy = PaperRouter.apply(
                input, self.weight(depth), noise, self.noise_std, self.k, cf, self.min_capacity, used_token,
                self.priority)
            capacity = paper_capacity(s, e, self.k, cf, self.min_capacity)
            return Routes(l_aux, capacity, indices, locations, gates, entropy, None, False,
                          counts.clamp(max=capacity))
        logits = self.logits(input, depth)
        z = router_z_loss(logits, used_token) if self.z_loss else None  # of the logits before the noise
        if noisy:  # one op, in the logits' expert-major layout
            logits = torch.add(logits, self.noise_source(logits.shape, depth, key, logits.device), alpha=self.noise_std)
        if self.expert_choice:  # its counts are the routes kept
            l_aux, capacity, _, indices, locations, gates, counts = expert_choice_routing(
                logits, self.k, cf, self.min_capacity, used_token)
        else:  # its counts are the routes queued (padding excluded): each expert keeps the first C
            l_aux, capacity, _, indices, locations, gates, counts = paper_routing(
                logits, self.k, cf, self.min_capacity, used_token, self.drop_tokens, self.ep_group, self.priority)
            counts = counts.clamp(max=capacity)
        return Routes(l_aux, capacity, indices, locations, gates, router_entropy(logits, used_token), z,
                      self.expert_choice, counts)


class DeepSpeedGate(TopKGate):
    """DeepSpeed's TopKGate (router="deepspeed"), deterministic in evaluation.

    DeepSpeed samples the second expert with Gumbel noise from torch's global generator whenever
    `top2_2nd_expert_sampling` is set, evaluation included, so the same weights would score
    differently from run to run. Here the sampling runs in training only (as DeepSpeed's default,
    from the rank's own generator: this router's training randomness is not layout-invariant);
    evaluation takes the top-2 experts. Everything else is DeepSpeed's code path. Note that
    DeepSpeed's top-2 gating ignores `used_token`: evaluation padding takes expert capacity with
    this router (with router="paper" it takes none)."""

    def __init__(self, *args, z_loss: bool = False, **kwargs) -> None:  # noqa: ANN002, ANN003 (TopKGate's)
        super().__init__(*args, **kwargs)
        self.z_loss = z_loss  # compute ST-MoE's router z-loss (model.moe.z_loss_weight > 0)

    def forward(self, input: Tensor, used_token: Optional[Tensor] = None, depth: int = 0,  # type: ignore[override]
                key: Optional[RouteKey] = None) -> Routes:
        sampling = self.top2_2nd_expert_sampling
        self.top2_2nd_expert_sampling = sampling and self.training
        try:
            l_aux, capacity, _, indices, locations, gates, _ = super().forward(input, used_token, True, False)
        finally:
            self.top2_2nd_expert_sampling = sampling
        # softmax(wg(x)) is what routed (noisy_gate_policy is never set); with grad for the z-loss only
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.z_loss):
            logits = F.linear(input.float(), self.wg.weight.float())
        z = router_z_loss(logits, used_token) if self.z_loss else None
        entropy = router_entropy(logits, used_token)
        # DeepSpeed's capacity is a tensor: one host read (and a graph break under torch.compile)
        return Routes(l_aux, int(capacity), indices, locations, gates, entropy, z)
