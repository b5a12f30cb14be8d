"""Tensors sharded by torch's FSDP2 (`fully_shard`: parameters and their Adam moments are DTensors).

A merge and a prune are computed as one process would compute them: on the whole tensor (`whole`, a
collective every rank calls, one tensor at a time), then each rank keeps its own shard (`keep_shard_`, no
communication: the whole is identical on every rank). The same rule as the DeepSpeed path (zero_reset.py).
And which modules torch's data-parallel wrappers (FSDP2 among them) already hold: wrap refuses to add LoRA
factors inside them.
"""
from __future__ import annotations

import torch
from torch import nn


def is_sharded(t) -> bool:
    """A DTensor (FSDP2's sharded parameter or optimizer state)."""
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (gathered from a DTensor's shards); a plain tensor as it is."""
    return t.full_tensor() if is_sharded(t) else t


def shard_of(like: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``full`` (the same on every rank) as a DTensor laid out as ``like``; no
    communication. A plain ``like``: ``full`` itself."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    local = like.to_local()
    if out.to_local().device != local.device:  # CPUOffloadPolicy: host shards of a GPU mesh (not yet run on a GPU)
        out = DTensor.from_local(out.to_local().to(local.device), like.device_mesh, like.placements, run_check=False,
                                 shape=like.shape, stride=like.stride())
    return out


@torch.no_grad()
def keep_shard_(dst: torch.Tensor, full: torch.Tensor) -> None:
    """dst ← full (in place; a DTensor ``dst`` takes this rank's shard of it)."""
    dst.copy_(shard_of(dst, full))


def fsdp2_modules(model: torch.nn.Module) -> list:
    """The modules of ``model`` that FSDP2's ``fully_shard`` manages."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard_(model: torch.nn.Module) -> None:
    """Put FSDP2's sharded parameters back in the model. After a forward that did not reshard
    (``reshard_after_forward=False``, or the root module, which FSDP2 never reshards after its forward) the
    layers hold FSDP2's whole copies, which it never writes back: a merge into them would be lost (and the
    optimizer's parameters are the shards). Dropping the copies loses nothing: the next forward gathers."""
    for module in fsdp2_modules(model):
        module.reshard()


def check_not_sharded(model: torch.nn.Module, what: str) -> None:
    """Refuse what needs a whole model in one process (unwrap, an export) on an FSDP2-sharded one."""
    if fsdp2_modules(model) or any(map(is_sharded, model.parameters())):
        raise ValueError(
            f"{what}: the model is sharded by FSDP2 (DTensor parameters); gather it first, on every rank: "
            "sd = torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
            "full_state_dict=True, cpu_offload=True)), then on rank 0 build and relora_ds.wrap the same model "
            f"unsharded, load_state_dict(sd), and call {what} on it")


def fsdp2_modules_above(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 modules (``fully_shard``) that hold ``module`` inside them (``module`` itself included): a
    submodule of a sharded model knows nothing of them, but its parameters are their shards, or after a forward
    that did not reshard their whole copies. Found through torch's registry of composable states (private: none
    found if it moves)."""
    from torch.distributed.fsdp import FSDPModule

    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:
        return []
    return [m for m in list(_module_state_mapping) if isinstance(m, FSDPModule) and any(
        sub is module for sub in m.modules())]


def refuse_data_parallel_wrappers(model: nn.Module) -> None:
    """DistributedDataParallel, FSDP1 and FSDP2 record the parameters they sync (DDP's reducer buckets, FSDP1's
    flat parameters, FSDP2's sharded parameters) when they wrap a model: LoRA factors added inside afterwards
    would train on each rank alone (relora_ds.wrap calls this first). A submodule of a sharded model is
    refused too: its new layers would be outside FSDP2 (a root-only ``fully_shard`` model after a forward, whose
    layers hold whole copies, took them, and every rank trained its own factors)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    for name, module in model.named_modules():
        if isinstance(module, DistributedDataParallel | FullyShardedDataParallel | FSDPModule):
            where = f"its submodule {name!r}" if name else "it"
            kind, call = (("FSDP2 (fully_shard)", "fully_shard(model)") if isinstance(module, FSDPModule) else
                          (type(module).__name__, f"{type(module).__name__}(model)"))
            raise ValueError(f"wrap: the model is in torch's {kind} ({where}), which syncs only the parameters it had "
                             "when it was built: LoRA factors added now would train on each rank alone and the ranks "
                             f"would drift apart. Call relora_ds.wrap(model, ...) first, then {call}")
    above = fsdp2_modules_above(model)
    if above or any(map(is_sharded, model.parameters())):
        raise ValueError("wrap: the module is part of a model sharded by torch's FSDP2 (fully_shard"
                         + (f" on a {type(above[0]).__name__}" if above else "") + "), which syncs only the "
                         "parameters it had when it was built: LoRA factors added now would train on each rank "
                         "alone and the ranks would drift apart. Call relora_ds.wrap(model, ...) on the whole model "
                         "first, then fully_shard it")
