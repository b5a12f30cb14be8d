"""ZeRO-3 models partitioned from the start: no rank holds the whole model before the engine exists.

Without this, every rank builds the whole model (fp32, host memory) and DeepSpeed's engine moves it whole to
the device, casts it and only then partitions it (7b: 27 GB per rank on the host, 13.5 GB per GPU for a
moment). Under ZeRO stage 3 the trainer instead
- builds a fresh model inside ``deepspeed.zero.Init`` (`building`): each module's parameters are created
  in the config's dtype and partitioned as soon as that module exists; rank 0's values are broadcast, so
  every rank starts from the same weights (its ``apply(init_fn)`` runs on the gathered parameters);
- lets ``relora_ds.wrap`` swap each partitioned ``nn.Linear`` for a ReLoRA layer one at a time (its
  base gathered, the new layer partitioned before the next is built);
- partitions what arrives whole (a Hugging Face checkpoint, the warm-start switch's gathered weights) one
  parameter at a time (`partition_`), cast first as the engine would have cast it.

On DeepSpeed's CPU accelerator the weights are bitwise those of the whole-model build (the tests' oracle).
On a GPU, zero.Init creates the tensors on the device, so the initial weights come from the GPU's random
generator: a ZeRO-3 run starts from other random weights than a ZeRO-1/2 run of the same seed (as with
Hugging Face under zero.Init); ``zero_init: false`` in the recipe builds as the other stages do.
"""
from __future__ import annotations

import contextlib

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from .ds_config import uses_bf16, uses_fp16, zero_stage
from .relora import ReLoRALinear


def partitions_at_build(ds: dict, enabled: bool = True) -> bool:
    return enabled and zero_stage(ds) == 3


def building(ds: dict, enabled: bool = True):
    """Context in which a fresh model is built partitioned (ZeRO-3), else a no-op."""
    if not partitions_at_build(ds, enabled):
        return contextlib.nullcontext()
    return deepspeed.zero.Init(config_dict_or_path=ds)


@torch.no_grad()
def partition_(model: torch.nn.Module, ds: dict, enabled: bool = True) -> torch.nn.Module:
    """Partition the parameters of ``model`` that are still whole (ZeRO-3), one at a time, and move its
    buffers to the device, as DeepSpeed's engine does for a model it gets whole (a model whose parameters
    are all partitioned is neither moved nor cast by the engine). ReLoRA layers' host buffers (merge
    residuals) stay in host memory. A no-op below stage 3 or with ``enabled=False``."""
    if not partitions_at_build(ds, enabled):
        return model
    whole = [p for p in model.parameters() if not hasattr(p, "ds_id")]
    if whole:
        dtype = torch.bfloat16 if uses_bf16(ds) else torch.float16 if uses_fp16(ds) else torch.float32
        for p in whole:  # what the engine's cast does before it partitions; the int8 base stays int8
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        deepspeed.zero.Init(module=model, config_dict_or_path=ds)  # moves each to the device, then splits it
    device = torch.device(get_accelerator().current_device_name())
    for module in model.modules():
        host = ReLoRALinear.HOST_BUFFERS if isinstance(module, ReLoRALinear) else ()
        for name, buf in module._buffers.items():
            if buf is not None and name not in host and buf.device != device:
                module._buffers[name] = buf.to(device)
    return model
