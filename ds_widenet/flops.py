"""FLOPs, parameters and activation memory of WideNet / ViT / ViT-MoE, from a ModelConfig alone.

FLOP formula (one multiply-add = 2 FLOPs). B images per micro-batch, N patches per image, T tokens
per image (N, +1 with a CLS token), S = B*T tokens, d = embed_dim, h = mlp_dim, h_e = expert_dim,
E experts, k routes per token, P = in_chans * patch^2 pixels per patch, c = classes.

Forward, per micro-batch, in multiply-adds (MACs):
    patch embed   B*N * P * d                       (the stride-p conv is a [B*N, P] x [P, d] matmul)
    attention     per block:  qkv 3*S*d^2  +  QK^T S*T*d  +  AV S*T*d  +  proj S*d^2
                  (QK^T and AV summed over heads: heads * T*T*(d/heads) = T*T*d per image)
    dense FFN     per dense block:  2*S*d*h
    MoE FFN       per MoE call:  router S*d*E  +  experts k*S*2*d*h_e      (k experts per token)
    head          B*d*c  (+ B*d^2 with pre_logits)
    WideNet: L attention calls + L MoE calls (shared weights, counted per call);
    ViT: L blocks with dense FFN; ViT-MoE: L-n dense + n MoE blocks (n = moe_last_n).

Training step = forward + backward. The backward of a matmul is 2 matmuls of the same size (input
gradient and weight gradient), so 2x forward, for every layer except the patch embedding, whose
input (the images) needs no gradient: only its weight gradient, 1x. Hence
    train FLOPs = 2 * (3 * MACs_fwd - MACs_embed)
This "model" count is what utilization (MFU) is computed from.

"Executed" FLOPs count what the MoE layer really multiplies. The experts run as grouped matmuls over
the filled capacity slots only (models/moe_layer.py): k*S routes less those dropped by capacity, at
most min(E*C, k*S) rows, C = max(ceil(k*S/E * cf), min_capacity) (`drop_tokens=True`; S = tokens of the
rank's micro-batch). That bound is the executed count: exact when no route is dropped (drops are data
dependent). Where the device has no grouped matmul for the dtype, the fallback (and DeepSpeed's own
`Experts`) multiplies all E*C slots, empty ones included (`padded=True`: ~1.2x the activated work at the
paper's cf = 1.2). (With drop_tokens=False the capacity is data dependent; k*S is used.)
On the grouped path each expert bias rides inside its matmul as a ones column, padded with zero
columns to a 16-byte row (`moe_layer.bias_columns`: 4 columns in fp32, 8 in bf16): the executed count
adds those columns' MACs, forward and weight gradient (`moe_expert_bias`, `element_size` the model
dtype's bytes), not counted as model FLOPs.
`torch.utils.flop_counter.FlopCounterMode` (which reads the grouped matmuls' real row counts) agrees
with the executed count exactly when attention runs as explicit matmuls and no route is dropped
(tests/test_bench.py).

Not counted (not matmuls, O(S*d) or O(params)): softmax, LayerNorm, GELU, biases, residual adds,
dropout, the router's softmax/top-k/cumsum, dispatch/combine copies, the loss, the optimizer step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from . import deepspeed_internals as dsi
from .config import ModelConfig
from .routing_core import paper_capacity


def tokens_per_image(cfg: ModelConfig) -> int:
    return cfg.tokens_per_image


def moe_calls(cfg: ModelConfig) -> int:
    """MoE layer calls per forward (= all-to-all pairs per forward with ep_size > 1)."""
    if cfg.arch == "widenet":
        return cfg.depth
    if cfg.arch == "vit_moe":
        return cfg.moe_last_n
    return 0


def dense_ffn_calls(cfg: ModelConfig) -> int:
    return cfg.depth - moe_calls(cfg)


def capacity(cfg: ModelConfig, tokens: int) -> int:
    """Slots per expert for `tokens` tokens on one rank (drop_tokens=True), as the gates compute it."""
    moe = cfg.moe
    assert moe is not None
    if not moe.drop_tokens:
        return math.ceil(moe.k * tokens / moe.num_experts)
    if moe.paper_gate:  # routing_core.paper_routing; expert choice never takes more than the group's tokens
        c = paper_capacity(tokens, moe.num_experts, moe.k, moe.capacity_factor, moe.min_capacity)
        return min(tokens, c) if moe.expert_choice else c
    # deepspeed.moe.sharded_moe._capacity: float32 (S/E) * (cf*k), ceil
    import torch

    c = int(torch.ceil(torch.tensor(tokens / moe.num_experts) * torch.tensor(moe.capacity_factor * moe.k)))
    return max(c, moe.min_capacity)


@dataclass
class LayerCost:
    """One kind of layer: forward MACs per call (activated and executed) and calls per forward."""

    name: str
    calls: int
    fwd_macs: int  # activated (k experts per token)
    fwd_macs_executed: int  # experts on the filled slots' bound (or all E*C slots: padded)
    bwd_factor: int = 2  # backward MACs = bwd_factor * forward MACs

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "calls": self.calls, "fwd_flops_per_call": 2 * self.fwd_macs,
                "fwd_flops_executed_per_call": 2 * self.fwd_macs_executed, "bwd_factor": self.bwd_factor,
                "train_flops": 2 * self.fwd_macs * (1 + self.bwd_factor) * self.calls,
                "train_flops_executed": 2 * self.fwd_macs_executed * (1 + self.bwd_factor) * self.calls}


def expert_rows(cfg: ModelConfig, tokens: int, padded: bool = False, ep_size: int = 1) -> int:
    """Rows of a rank's expert buffer for `tokens` tokens per rank: all E*C slots (`padded`), or the
    grouped path's packed buffer, sized by the bound on the filled slots: from each of the ep_size
    source ranks at most min(L*C, k*S) (L = E / ep_size local experts; see the module doc)."""
    moe = cfg.moe
    assert moe is not None
    cap = capacity(cfg, tokens)
    if padded or moe.expert_choice:  # expert choice fills every slot
        return moe.num_experts * cap
    return ep_size * min(moe.num_experts // ep_size * cap, moe.k * tokens)


def layer_costs(cfg: ModelConfig, batch: int, padded: bool = False, element_size: int = 4) -> list[LayerCost]:
    """Per-layer forward costs of one micro-batch of `batch` images (see the module doc)."""
    d, t, n = cfg.embed_dim, tokens_per_image(cfg), cfg.num_patches
    s = batch * t
    pix = cfg.in_chans * cfg.patch_size ** 2
    out = [LayerCost("patch_embed", 1, batch * n * pix * d, batch * n * pix * d, bwd_factor=1)]
    attn = 3 * s * d * d + 2 * s * t * d + s * d * d
    out.append(LayerCost("attention", cfg.depth, attn, attn))
    if dense_ffn_calls(cfg):
        ffn = 2 * s * d * cfg.mlp_dim
        out.append(LayerCost("dense_ffn", dense_ffn_calls(cfg), ffn, ffn))
    if moe_calls(cfg):
        moe = cfg.moe
        assert moe is not None
        router = s * d * moe.num_experts
        out.append(LayerCost("moe_router", moe_calls(cfg), router, router))
        # activated: k experts per token; with expert choice every slot of every expert (E*C rows)
        act = (expert_rows(cfg, s) if moe.expert_choice else moe.k * s) * 2 * d * moe.expert_dim
        exe = expert_rows(cfg, s, padded) * 2 * d * moe.expert_dim
        out.append(LayerCost("moe_experts", moe_calls(cfg), act, exe))
        if not padded:  # the bias columns (forward, and in the weight gradient only: bwd_factor 1)
            from .models.moe_layer import bias_columns

            cols = bias_columns(d, element_size) * moe.expert_dim + bias_columns(moe.expert_dim, element_size) * d
            out.append(LayerCost("moe_expert_bias", moe_calls(cfg), 0, expert_rows(cfg, s) * cols, bwd_factor=1))
    head = batch * d * cfg.num_classes + (batch * d * d if cfg.pre_logits else 0)
    out.append(LayerCost("head", 1, head, head))
    return out


def step_flops(cfg: ModelConfig, batch: int, padded: bool = False, element_size: int = 4) -> dict[str, Any]:
    """FLOPs of one training step (forward + backward) of `batch` images, and of the forward
    (`element_size`: the model dtype's bytes, for the executed count's bias columns)."""
    layers = layer_costs(cfg, batch, padded, element_size)
    fwd = sum(2 * lc.fwd_macs * lc.calls for lc in layers)
    fwd_exe = sum(2 * lc.fwd_macs_executed * lc.calls for lc in layers)
    train = sum(2 * lc.fwd_macs * (1 + lc.bwd_factor) * lc.calls for lc in layers)
    train_exe = sum(2 * lc.fwd_macs_executed * (1 + lc.bwd_factor) * lc.calls for lc in layers)
    return {"forward": fwd, "forward_executed": fwd_exe, "train": train, "train_executed": train_exe,
            "train_per_image": train / batch, "tokens_per_image": tokens_per_image(cfg),
            "layers": [lc.as_dict() for lc in layers]}


def param_split(cfg: ModelConfig) -> dict[str, int]:
    """Unique parameters: non-expert (replicated on every rank) and expert (all experts, split over
    ep_size ranks). Built on the meta device: no memory, exact."""
    from ds_widenet.models import build_model

    model = build_model(cfg, device="meta")
    expert = sum(p.numel() for p in model.parameters() if dsi.is_expert_param(p))
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "expert": expert, "non_expert": total - expert}


def activation_elements_per_token(cfg: ModelConfig, batch: int, low_precision: bool = False,
                                  padded: bool = False, ep_size: int = 1) -> dict[str, float]:
    """Tensors saved for backward, per token, without activation checkpointing, split into elements
    of the model dtype (`act`) and of fp32 (`fp32`: LayerNorm statistics, attention log-sum-exp, the
    router, which computes in fp32). Counted op by op and calibrated against
    torch.autograd.graph.saved_tensors_hooks on the CPU (fp32, SDPA attention; see
    `measure_saved_bytes` and tests/test_bench.py). Per block:
        attention   6d (LN in/out, qkv, proj in) + heads (lse, fp32) + 2 (LN stats, fp32)
        dense FFN   2d (LN in/out) + 2h (fc1 out, GELU out) + 2 (LN stats, fp32)
        MoE FFN     2d + (R/S)*(2d + c_in + 2h_e + c_h) over the R = expert_rows rows, the filled
                    slots' bound (moe_layer.GroupedFFN: fc1 input and GELU output with their bias
                    columns c, fc1 and fc2 outputs; + (R/S)*(2 + 1 with one EP rank) fp32 for each
                    row's int64 source and gate value; + k*d, the combine's routed outputs, with
                    ep_size > 1); `padded` (all E*C slots, autograd's ops): (R/S)*(d + 2h_e) + k*d
                    + 5E + 2 (router, LN stats: fp32)
                    + d/2 fp32 when the model is bf16/fp16 (the router's fp32 copy of its input,
                    net of the 16-bit tensors it stands in for; measured)
        dropout p>0 d per dropout site (2 per block, 1 at the embedding)
        embedding and head   P + d + 10
    """
    d, t = cfg.embed_dim, tokens_per_image(cfg)
    s = batch * t
    pix = cfg.in_chans * cfg.patch_size ** 2
    act = float(pix + d)
    f32 = 10.0
    act += 6 * d * cfg.depth
    f32 += (cfg.num_heads + 2) * cfg.depth
    nd, nm = dense_ffn_calls(cfg), moe_calls(cfg)
    act += (2 * d + 2 * cfg.mlp_dim) * nd
    f32 += 2 * nd
    if nm:
        moe = cfg.moe
        assert moe is not None
        slots = expert_rows(cfg, s, padded, ep_size) / s
        if padded:  # autograd's: the slots' fc1 input, fc1 and GELU outputs; the combine's routed outputs
            act += (2 * d + slots * (d + 2 * moe.expert_dim) + moe.k * d) * nm
        else:  # moe_layer.GroupedFFN's: fc1 input and GELU output with their bias columns, fc1 and fc2
            # outputs per packed row, each row's source (int64) and, with one EP rank, gate value (fp32);
            # with several the combine's routed outputs too
            from .models.moe_layer import bias_columns

            size = 2 if low_precision else 4
            rows = d + bias_columns(d, size) + 2 * moe.expert_dim + bias_columns(moe.expert_dim, size) + d
            act += (2 * d + slots * rows + (moe.k * d if ep_size > 1 else 0)) * nm
            f32 += slots * (2 + (1 if ep_size == 1 else 0)) * nm
        f32 += (5 * moe.num_experts + 2 + (d / 2 if low_precision else 0)) * nm
    if cfg.dropout > 0:
        act += d * (2 * cfg.depth + 1)
    return {"act": act, "fp32": f32}


def activation_bytes(cfg: ModelConfig, batch: int, dtype_bytes: int = 4, grad_ckpt: bool = False,
                     padded: bool = False, ep_size: int = 1) -> float:
    """Estimated bytes saved for backward by one micro-batch: the activations, and the stacked expert
    weights (expert_stack_elements). With activation checkpointing per depth, only each block's input
    (d per token) is kept, plus one block recomputed at a time."""
    t = tokens_per_image(cfg)
    per = activation_elements_per_token(cfg, batch, low_precision=dtype_bytes < 4, padded=padded, ep_size=ep_size)
    full = batch * t * (per["act"] * dtype_bytes + per["fp32"] * 4)
    stacks = 0 if padded else expert_stack_elements(cfg, dtype_bytes, ep_size) * dtype_bytes
    if not grad_ckpt:
        return full + stacks
    one_block = (full - batch * t * (cfg.in_chans * cfg.patch_size ** 2 + cfg.embed_dim + 10) * dtype_bytes) / cfg.depth
    return batch * t * cfg.embed_dim * dtype_bytes * (cfg.depth + 1) + one_block + stacks


def expert_stack_elements(cfg: ModelConfig, dtype_bytes: int = 4, ep_size: int = 1) -> int:
    """Elements of the stacked expert weights one forward saves (moe_layer.with_bias: per MoE layer, its
    local experts' fc1 and fc2 with their bias and zero columns, built once per forward and shared by
    every call of the layer: WideNet's one layer at every depth). 0 without MoE."""
    moe = cfg.moe
    if moe is None or not moe_calls(cfg):
        return 0
    from .models.moe_layer import bias_columns

    d, h = cfg.embed_dim, moe.expert_dim
    layers = 1 if cfg.arch == "widenet" else moe_calls(cfg)
    per_expert = h * (d + bias_columns(d, dtype_bytes)) + d * (h + bias_columns(h, dtype_bytes))
    return layers * (moe.num_experts // ep_size) * per_expert


def measure_saved_bytes(model: Any, images: Any) -> int:
    """Bytes of the distinct storages autograd saves in one forward (parameters excluded)."""
    import torch

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            seen.setdefault(st.data_ptr(), st.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(images)
    del out
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in params)


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched against
# torch.cuda.get_device_name(). Used only to print MFU in the training log; benchmarks measure
# the peak in the same run instead (bench/common.matmul_peak).
_KNOWN_BF16_PEAKS = (("H200", 989e12), ("H100 SXM", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12),
                     ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("V100", 125e12))


def known_peak_flops(device_name: str) -> Optional[float]:
    """The data-sheet dense bf16 peak of a GPU by name, or None (CPUs, unknown devices)."""
    for key, peak in _KNOWN_BF16_PEAKS:
        if key.lower() in device_name.lower():
            return peak
    return None
