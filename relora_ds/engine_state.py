"""Full fp32 weights out of a DeepSpeed engine (any ZeRO stage), via DeepSpeed's public helpers.

Used at the warm-start switch (full-rank engine → ReLoRA engine) and for the Hugging Face export. Every
rank must call these functions (they gather), in the same order.
"""
from __future__ import annotations

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param


@torch.no_grad()
def full_fp32_state_dict(engine, keep: bool = True) -> dict[str, torch.Tensor]:
    """name → full CPU tensor for every parameter (trainable: its fp32 master; frozen float: as fp32; the
    int8 base: int8, not 4× its size) and persistent buffer. ``keep=False``: take part in the gathers and
    return {} (the ranks that do not write an export need not hold a full copy in host memory each)."""
    state: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p) if p.requires_grad else None
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
