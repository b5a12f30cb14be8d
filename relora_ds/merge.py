"""Merge-and-reinit (paper Eq. 2–3): W += s·B·A, then A ← Kaiming(seeded), B ← 0.

Each merge adds a rank-r update to the frozen weight, so k merges can raise rank(W − W0) to k·r: the
mechanism by which ReLoRA trains a high-rank network through low-rank updates.
"""
from __future__ import annotations

import time

from torch import nn

from . import sharded
from .merge_stats import update_stats
from .relora import is_deepspeed_engine, relora_layers


def check_not_engine_managed(param, what: str) -> None:
    """Refuse a DeepSpeed ZeRO-managed parameter on the plain path: its values there are the engine's
    low-precision copy or a ZeRO-3 shard, and its fp32 master and moments would stay as they were (the
    merged update then comes back at the next step)."""
    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        raise ValueError(f"{what}: the model's parameters are managed by a DeepSpeed ZeRO engine; pass the engine "
                         f"itself (relora_ds.{what}(engine, ...)), not engine.module or engine.optimizer, so "
                         "that the fp32 masters and Adam moments are the ones changed")


def check_not_fsdp1(model: nn.Module, what: str = "merge_and_reinit") -> None:
    """Refuse a model inside torch's FSDP1 wrapper: outside its forward a layer's parameters are flat-shard
    views (empty, or 1-D slices), which no merge can read as matrices; FSDP2's DTensors are supported."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        how = ("fsdp_config={'fsdp_version': 2} in TrainingArguments, or fsdp_version: 2 in the accelerate "
               "config" if what == "enable_relora" else
               "torch.distributed.fsdp.fully_shard, on each decoder layer then the model")
        raise ValueError(f"{what}: the model is wrapped in FSDP1 (FullyShardedDataParallel), whose flat "
                         f"parameter shards no merge can read as matrices; shard it with FSDP2 instead ({how}), or "
                         "train it with a DeepSpeed engine")


def merge_and_reinit(model: nn.Module) -> dict:
    """Merge every ReLoRA layer of ``model`` (or of a DeepSpeed engine) and re-initialize its LoRA factors.

    The new lora_A comes from a generator seeded by (run seed, layer name, merge count), so every rank
    draws the same A without communication. Returns ``{"layers": n, "merge_seconds": t}`` and what the merge
    added (``merge_stats.update_stats``: ``update_norm_mean``, ``update_rel_mean``, ``update_rel_max``); for
    an engine also ``merge_comm_bytes`` (the bytes its gathers moved, 0 on one rank), and under ZeRO-3 the
    update statistics only on the ranks that merged every layer (rank 0 among them).
    """
    if is_deepspeed_engine(model):
        from .zero_reset import merge_and_reinit_engine  # only this path touches DeepSpeed

        return merge_and_reinit_engine(model)
    if not isinstance(model, nn.Module):
        raise ValueError(f"merge_and_reinit: got a {type(model).__module__}.{type(model).__name__}; pass the wrapped "
                         "model (or the DeepSpeed engine, or the DistributedDataParallel module), whose ReLoRA layers "
                         "merge; the optimizer goes to relora_ds.prune_optimizer_state")
    start = time.perf_counter()
    # FSDP2: merge into its shards, not into whole copies it never writes back; those of the FSDP2 modules the
    # model sits in too (merge_and_reinit(model.model) of a root-only sharded model after an evaluation forward
    # merged into the root's whole copies: every merge lost, merge_count advanced, no error)
    sharded.reshard_(model)
    for module in sharded.fsdp2_modules_above(model):
        module.reshard()
    layers = list(relora_layers(model))
    if not layers:
        raise ValueError("merge_and_reinit: the model has no ReLoRALinear layers (call relora_ds.wrap first)")
    check_not_engine_managed(layers[0][1].lora_A, "merge_and_reinit")
    check_not_fsdp1(model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        _broadcast_host_buffers(model, layers)
    norms = []
    for _, layer in layers:
        layer.merge_()
        norms.append(layer.last_update_norms)
        layer.merge_count += 1
        layer.reset_lora(restart_index=int(layer.merge_count))
        # Gradients of the old factors mean nothing for the new ones: a merge between backward and step would
        # otherwise hand them to the next step (B would not start at 0). None: the optimizer skips them.
        layer.lora_A.grad = layer.lora_B.grad = None
    return {"layers": len(layers), "merge_seconds": time.perf_counter() - start, **update_stats(norms)}


def _broadcast_host_buffers(ddp: nn.parallel.DistributedDataParallel, layers: list) -> None:
    """Rank 0's host-memory merge residuals (an int8 base's, merge_residual's) to every rank of ``ddp``'s group,
    before a merge reads them: DDP gives every rank rank 0's parameters and other buffers, but leaves these out
    (relora.ignore_host_buffers_in_ddp: NCCL refuses CPU tensors). Ranks that built the model apart (another
    seed, weights loaded on rank 0 only) then merged rank 0's weights with their own residuals and drifted
    apart. NCCL's broadcast goes through the factors' device, a layer's buffer at a time."""
    import torch
    import torch.distributed as dist

    group = ddp.process_group
    if dist.get_world_size(group) == 1:
        return
    src, via_device = dist.get_global_rank(group, 0), dist.get_backend(group) != "gloo"
    for _, layer in layers:
        for key in layer.HOST_BUFFERS:
            buffer = layer._buffers.get(key)
            if buffer is None:
                continue
            sent = buffer.to(layer.lora_A.device) if via_device else buffer
            dist.broadcast(sent, src, group=group)
            if sent is not buffer:
                with torch.no_grad():
                    buffer.copy_(sent)
