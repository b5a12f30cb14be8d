"""ZeRO-3 models partitioned from the start: no rank holds the whole model before the engine exists.

Without this, every rank builds the whole model (fp32, host memory) and DeepSpeed's engine moves it whole to
the device, casts it and only then partitions it (7b: 27 GB per rank on the host, 13.5 GB per GPU for a
moment). Under ZeRO stage 3 the trainer instead
- builds a fresh model inside ``deepspeed.zero.Init`` (`building`): each module's parameters are created
  in the config's dtype and partitioned as soon as that module exists; rank 0's values are broadcast, so
  every rank starts from the same weights (its ``apply(init_fn)`` runs on the gathered parameters);
- lets ``relora_ds.wrap`` swap each partitioned ``nn.Linear`` for a ReLoRA layer one at a time (its
  base gathered, the new layer partitioned before the next is built); a random model wrapped with an int8
  base is built in fp32 and cast after the wrap (`cast_partitions_`), so that its base is quantized from
  the fp32 init as the whole build's is;
- partitions what arrives whole one parameter at a time (`partition_`), cast first as the engine would
  have cast it;
- builds the model a Hugging Face directory gives, or the ReLoRA model at the warm-start switch, partitioned
  and fills it one tensor at a time (`load_`: from `relora_ds.hf.hf_tensors`, or the full-rank engine's fp32
  masters, `engine_tensors`).

On DeepSpeed's CPU accelerator the weights are bitwise those of the whole-model build (the tests' oracle).
On a GPU, zero.Init creates the tensors on the device, so the initial weights come from the GPU's random
generator: a ZeRO-3 run starts from other random weights than a ZeRO-1/2 run of the same seed (as with
Hugging Face under zero.Init); ``zero_init: false`` in the recipe builds as the other stages do.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param

from .ds_config import uses_bf16, uses_fp16, zero_stage
from .relora import ReLoRALinear, relora_layers


def partitions_at_build(ds: dict, enabled: bool = True) -> bool:
    return enabled and zero_stage(ds) == 3


def building(ds: dict, enabled: bool = True, fp32: bool = False):
    """Context in which a fresh model is built partitioned (ZeRO-3), else a no-op. Its parameters are created
    in the config's dtype, or with ``fp32`` in fp32 (then `cast_partitions_` before the engine)."""
    if not partitions_at_build(ds, enabled):
        return contextlib.nullcontext()
    if fp32:  # zero.Init's own dtype= is ignored where the accelerator lacks fp16 (0.19.8: `dtype or fp16 if
        # supported else ...` parses as `(dtype or fp16) if ...`): a config without bf16/fp16 gives fp32
        ds = {k: v for k, v in ds.items() if k not in ("bf16", "bfloat16", "fp16")}
    return deepspeed.zero.Init(config_dict_or_path=ds)


def _config_dtype(ds: dict) -> torch.dtype:
    return torch.bfloat16 if uses_bf16(ds) else torch.float16 if uses_fp16(ds) else torch.float32


@torch.no_grad()
def cast_partitions_(model: torch.nn.Module, ds: dict) -> torch.nn.Module:
    """The engine's cast for a model built partitioned in fp32 (``building(ds, fp32=True)``): each
    floating-point partition to the config's dtype, in place (DeepSpeed's attributes on it kept); the int8
    base stays int8. The values are those of the whole model cast, then partitioned."""
    dtype = _config_dtype(ds)
    for p in model.parameters():
        part = getattr(p, "ds_tensor", None)
        if part is None or not part.is_floating_point() or part.dtype == dtype:
            continue
        pinned = part.device.type == "cpu" and part.is_pinned()
        new = part.data.to(dtype)
        part.data = new.pin_memory() if pinned else new  # an offloaded partition stays pinned
        p.data = torch.empty(0, dtype=dtype, device=p.data.device)  # outside a gather: empty, of the new dtype
    return model


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
        dtype = _config_dtype(ds)
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


def engine_tensors(engine) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full fp32 tensor) for each parameter of ``engine``'s module, one at a time, gathered on every
    rank in turn: a trainable parameter's fp32 master, a frozen one as it is. Every rank must read it all."""
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:  # frozen: no master
            with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                full = p.detach().float().clone()
        yield name, full


@torch.no_grad()
def load_(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Fill a partitioned model (wrapped or not) with the whole tensors ``tensors`` yields, one at a time:
    each parameter gathered, written (rank 0's write kept), partitioned again. A ReLoRA layer's base takes
    the tensor named by the linear it replaced (``….q_proj.weight``) through ``load_base_``: copied, or
    quantized from it as ``wrap`` of the whole model quantizes; the LoRA factors keep their fresh init.
    Every rank must call it with the same tensors (they gather)."""
    bases = {f"{name}.weight": layer for name, layer in relora_layers(model)}
    params = dict(model.named_parameters())
    base_params = {f"{name[:-len('.weight')]}.{k}" for name in bases for k in ("weight", "weight_q")}
    expected = {n for n in params if not n.endswith((".lora_A", ".lora_B")) and n not in base_params} | bases.keys()
    loaded = set()
    for name, full in tensors:
        if name in bases:  # a base as the layer it replaced stored it: (out, in), a Conv1D's (in, out)
            layer = bases[name]
            shape = layer.from_replaced_layout(torch.empty(layer.out_features, layer.in_features, device="meta")).shape
        else:
            shape = getattr(params.get(name), "ds_shape", None)
        if shape is not None and tuple(full.shape) != tuple(shape):
            raise ValueError(f"{source}: {name} has shape {tuple(full.shape)}, the model's is {tuple(shape)}")
        if name in bases:
            layer = bases[name]
            with deepspeed.zero.GatheredParameters([layer.weight_q if layer.quantize else layer.weight],
                                                   modifier_rank=0):
                layer.load_base_(layer.from_replaced_layout(full))
        elif name in expected:
            with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
                params[name].copy_(full)
        else:
            raise ValueError(f"{source}: {name} is not a parameter of the model (its parameters: "
                             f"{sorted(expected)[:4]} ...)")
        loaded.add(name)
    if expected - loaded:
        raise ValueError(f"{source} lacks {len(expected - loaded)} of the model's parameters: "
                         f"{sorted(expected - loaded)[:6]}")
