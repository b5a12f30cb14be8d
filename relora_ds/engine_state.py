"""Full fp32 weights out of a DeepSpeed engine (any ZeRO stage), via DeepSpeed's public helpers.

Used at the warm-start switch (full-rank engine → ReLoRA engine) and for the Hugging Face export. Every
rank must call these functions (they gather), in the same order.
"""
from __future__ import annotations

import deepspeed
import torch
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.utils import safe_get_full_fp32_param
from torch._utils import _unflatten_dense_tensors


@torch.no_grad()
def full_fp32_state_dict(engine, keep: bool = True) -> dict[str, torch.Tensor]:
    """name → full CPU tensor for every parameter (trainable: its fp32 master; frozen float: as fp32; the
    int8 base: int8, not 4× its size) and persistent buffer. ``keep=False``: take part in the gathers and
    return {} (the ranks that do not write an export need not hold a full copy in host memory each)."""
    state: dict[str, torch.Tensor] = {}
    stage0 = _stage0_masters(getattr(engine, "optimizer", None))
    for name, p in engine.module.named_parameters():
        master = stage0.get(id(p)) if id(p) in stage0 else safe_get_full_fp32_param(p) if p.requires_grad else None
        if master is not None:
            if keep:
                state[name] = master.detach().float().cpu().clone()
            continue
        # Frozen (no master), or ZeRO stage 0 in fp32 where the model copy is the master.
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            if keep:
                value = p.detach().float() if p.is_floating_point() else p.detach()
                state[name] = value.cpu().clone()
    if not keep:
        return state
    persistent = set(engine.module.state_dict().keys())
    for name, b in engine.module.named_buffers():
        if name in persistent:  # e.g. merge_count; not rotary tables
            state[name] = b.detach().cpu().clone()
    return state


def _stage0_masters(optimizer) -> dict[int, torch.Tensor]:
    """id(parameter) -> its fp32 master in DeepSpeed's FP16 optimizers, which hold bf16/fp16 weights without ZeRO
    (a ``mode: full`` run at stage 0): FP16_Optimizer's flat fp32 groups, FP16_UnfusedOptimizer's per-parameter
    copies. ``safe_get_full_fp32_param`` returns None there, and the model's 16-bit copy is the master rounded
    (by up to half a step: 0.4% of the weight in bf16, 0.05% in fp16), without the updates below that step.
    {} for other optimizers."""
    if not isinstance(optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        return {}
    masters = {}
    for i, group in enumerate(optimizer.fp16_groups):
        fp32 = optimizer.fp32_groups[i] if isinstance(optimizer, FP16_UnfusedOptimizer) else \
            _unflatten_dense_tensors(optimizer.fp32_groups_flat[i], group)
        masters.update({id(p): q for p, q in zip(group, fp32)})
    return masters
