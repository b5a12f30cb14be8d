"""The DeepSpeed config checked against this machine and the run's model, before any engine exists: what
DeepSpeed 0.19.8 would otherwise fail on inside engine creation or in the first steps, on every rank
(ValueError naming the problem and what would work). Shared by the trainer and launch/preflight.py."""
from __future__ import annotations

import os
import warnings

import torch

from .ds_schema import as_bool
from .model_config import LlamaConfig
from .startup import meta_model
from .train_config import ConfigWarning, TrainConfig


def check_precision_on_device(ds: dict, accelerator) -> None:
    """fp16 on an accelerator DeepSpeed says has none (its CPU accelerator) fails inside engine creation, on
    every rank, after the data and model are built: fail first, naming the alternatives. ``accelerator``:
    DeepSpeed's ``get_accelerator()`` of the ranks."""
    from .ds_config import uses_bf16, uses_fp16
    if uses_fp16(ds) and not accelerator.is_fp16_supported():
        raise ValueError(f"fp16 (the DeepSpeed config's \"fp16\": {{\"enabled\": true}}) is not supported by "
                         f"DeepSpeed's {accelerator.device_name()} accelerator, which this run uses: use bf16 or fp32 "
                         "there (fp16 needs GPUs)")
    if uses_bf16(ds) and accelerator.device_name() == "cpu" and not cpu_has_native_bf16():
        warnings.warn("bf16 (the DeepSpeed config's \"bf16\": {\"enabled\": true}) on this CPU, which has no "
                      f"native bf16 matmul (PyTorch sees {torch.backends.cpu.get_cpu_capability()}, no AVX-512 or "
                      "AMX): every bf16 matmul takes PyTorch's slow fallback (a matmul 27x slower than fp32 measured "
                      "on a 2-core AMD EPYC; the whole tiny demo 12x: 370 vs 4,500 tokens/s). Train in fp32 on "
                      "this machine: a DeepSpeed config with bf16 off, e.g. ds_configs/zero2_fp32.json",
                      ConfigWarning, stacklevel=2)


def cpu_has_native_bf16() -> bool:
    """Whether PyTorch runs bf16 matmuls on this CPU through oneDNN's kernels (AVX-512 or AMX);
    without them a bf16 matmul takes a scalar fallback many times slower than fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def nvme_offloads(ds: dict) -> list[str]:
    """The ``zero_optimization`` offload entries of ``ds`` whose device is nvme."""
    zero = ds.get("zero_optimization") if isinstance(ds.get("zero_optimization"), dict) else {}
    return [k for k in ("offload_optimizer", "offload_param")
            if isinstance(zero.get(k), dict) and zero[k].get("device") == "nvme"]


def check_offload_on_device(ds: dict, accelerator, quantize: str | None = None) -> None:
    """NVMe offload (ZeRO-Infinity) on this machine, checked before any engine exists, where each of these
    failed inside engine creation with a traceback on every rank:
    - DeepSpeed's async_io op (libaio) must build, and each ``nvme_path`` be a writable directory;
    - the optimizer's pipelined swapping (``pipeline_read``/``pipeline_write``) stopped at the first step;
    - on DeepSpeed's CPU accelerator parameters swap only in bf16 (0.19.8's ``zero.Init`` gives its parameter
      swapper bf16 there, whatever the model's dtype: an fp32 model then fails in its first matmul);
    - int8 base weights (``quantize``) cannot swap: the parameter swapper has one dtype, the model's, for
      its buffers and its element size."""
    from .ds_config import uses_bf16

    nvme = nvme_offloads(ds)
    if not nvme:
        return
    # What no machine can run first, then what this machine lacks (a user need not install libaio to learn
    # that the combination is refused anyway).
    optimizer = ds["zero_optimization"]["offload_optimizer"] if "offload_optimizer" in nvme else {}
    pipelined = [k for k in ("pipeline_read", "pipeline_write")
                 if as_bool(optimizer.get(k, False)) is not False]  # DeepSpeed's pydantic bool: "false" is off
    if pipelined:
        raise ValueError(f"zero_optimization.offload_optimizer.{' and '.join(pipelined)}: DeepSpeed 0.19.8's "
                         "pipelined optimizer swapping stopped at the first optimizer step here (2 CPU ranks: an "
                         "assertion in its swap-buffer allocation; with more buffers, in its gradient swapper's "
                         "wait), with or without relora_ds's NVMe fixes. Remove them: the optimizer swaps to nvme "
                         "without the pipeline")
    if "offload_param" in nvme and quantize:
        raise ValueError(f"quantize={quantize!r} with zero_optimization.offload_param on nvme: DeepSpeed's parameter "
                         "swapper holds every partition in the model's dtype, not int8. Offload the parameters to "
                         "\"cpu\" (ds_configs/zero3_offload.json) or train without quantize")
    if "offload_param" in nvme and accelerator.device_name() == "cpu" and not uses_bf16(ds):
        raise ValueError("zero_optimization.offload_param offloads to nvme on DeepSpeed's CPU accelerator, where "
                         "DeepSpeed 0.19.8 swaps parameters only in bf16, and this config trains in fp32: enable "
                         "bf16, or offload the parameters to \"cpu\"")
    builder = accelerator.create_op_builder("AsyncIOBuilder")
    if builder is None or not builder.is_compatible(verbose=False):
        raise ValueError(f"zero_optimization.{nvme[0]} offloads to nvme, which needs DeepSpeed's async_io op, and "
                         "this machine cannot build it (libaio missing? `ds_report` lists async_io): install "
                         "libaio-dev, or offload to \"cpu\" (ds_configs/zero3_offload.json)")
    for key in nvme:
        path = ds["zero_optimization"][key].get("nvme_path")
        if not path or not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
            what = "is not set" if not path else f"{path!r} is not a writable directory on this machine"
            raise ValueError(f"zero_optimization.{key}.nvme_path {what}: set it to a directory on a local NVMe "
                             "drive, present on every node (each rank writes its swap files under it)")


def check_nvme_swap_buffers(cfg: TrainConfig, ds: dict, model_config: LlamaConfig, world_size: int) -> None:
    """ZeRO-3 with the parameters on NVMe: DeepSpeed swaps each partition of at least max(1 MiB, aio.block_size)
    a rank, and each one swapped in holds one of ``offload_param.buffer_count`` swap buffers. Refused before
    any engine, counted on a meta-device copy of the run's model wrapped as the trainer wraps it:
    - a parameter both persistent (at most ``stage3_param_persistence_threshold`` elements while the persistent
      ones sum to at most ``stage3_model_persistence_threshold``: never released) and swapped: DeepSpeed
      gathers every persistent parameter at once after each step, and they keep their buffers (measured:
      130m's width, 2 layers, 1 rank, threshold 1e6: ``Not enough buffers 5 for swapping 8`` in the first
      step, eagerly);
    - with --compile, a decoder layer whose swapped weights outnumber the buffers: its gather
      (relora_ds.engines.compile_for_engine) swaps them in together (measured: 130m on 1 rank, 7 a layer,
      ``Not enough buffers 5 for swapping 7`` in the first step)."""
    from .ds_config import _zero_config, uses_bf16, uses_fp16, zero_stage

    if zero_stage(ds) != 3 or "offload_param" not in nvme_offloads(ds):
        return
    zero = _zero_config(ds, "the DeepSpeed config")
    min_bytes = max(2**20, int((ds.get("aio") or {}).get("block_size", 2**20)))
    element = 2 if uses_bf16(ds) or uses_fp16(ds) else 4
    model = meta_model(cfg, model_config)

    def swapped(p):
        return -(-p.numel() // world_size) * element >= min_bytes
    threshold, buffers = zero.param_persistence_threshold, zero.offload_param.buffer_count
    persistent, kept = [], 0  # as DeepSpeed's mark_persistent_parameters picks them, in the module's order:
    for name, p in model.named_parameters():  # each up to the threshold while their sum stays in the model's
        if p.numel() <= threshold and kept + p.numel() <= zero.model_persistence_threshold:
            kept += p.numel()
            if swapped(p):
                persistent.append(name)
    if persistent:
        most = (-(-min_bytes // element) - 1) * world_size  # the largest parameter that does not swap
        raise ValueError(f"zero_optimization.stage3_param_persistence_threshold={threshold:g} keeps {len(persistent)} "
                         f"parameters gathered for good that DeepSpeed also swaps to nvme (>= {min_bytes:,} bytes a "
                         f"rank on {world_size} rank(s); e.g. {persistent[0]}): it swaps them all in at once after "
                         f"each step and they keep their swap buffers (buffer_count={buffers}), which the other "
                         f"parameters then lack. Set it to at most {most:,} (ds_configs/zero3_nvme.json: 1e4; "
                         "stage3_model_persistence_threshold caps their sum, in the module's order), or offload the "
                         "parameters to \"cpu\"")
    if not cfg.compile:
        return
    per_layer = max(sum(map(swapped, layer.parameters())) for layer in model.model.layers)
    if per_layer > buffers:
        raise ValueError(f"--compile under ZeRO-3 gathers a decoder layer's weights at once, and with the parameters "
                         f"on nvme {per_layer} of them swap in together on each of {world_size} rank(s), more than "
                         f"zero_optimization.offload_param.buffer_count={buffers}: set buffer_count to at least "
                         f"{per_layer} (each buffer holds buffer_size elements of pinned host memory), offload the "
                         "parameters to \"cpu\", or train without --compile")
