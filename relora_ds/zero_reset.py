"""ReLoRA's reset under DeepSpeed ZeRO 1/2/3: merge into the frozen base and prune sharded Adam moments.

The one file that reads and writes ZeRO's fp32 master partitions and optimizer-state fragments (the other
places that reach into DeepSpeed, each for one thing: README, "Layout"). Facts it relies on (DeepSpeed
0.19.8's sources):
- Frozen base weights are in no optimizer group and have no fp32 master: a merge is an in-place edit
  that must be bit-identical on every rank, so it is computed from identical inputs (the gathered fp32
  masters of A and B) with the same ops everywhere. ZeRO-3 gathers W with GatheredParameters; an int8
  base (relora_ds/quant.py: the int8 weight a frozen parameter, scale and host residual buffers) is
  merged by every rank, so that every rank's buffers follow, and rank 0's weight is re-partitioned.
- For lora_A/B the fp32 master partition is the truth: writing only ``param.data`` is undone by the next
  ``step()`` (DeepSpeed #2424). We write the master (and the low-precision copy).
- Adam moments live in flat per-group partitions and a tensor can straddle ranks. Each tensor is gathered
  in full (all-reduce for ZeRO-1/2, all-gather for ZeRO-3), its mask computed exactly as one process
  would, and each rank writes back its own slice in place (replacing state tensors would leave stale
  fragment views).
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                             safe_set_full_fp32_param, safe_set_full_optimizer_state)

from .ds_schema import ROUND_ROBIN_WHY
from .prune import MOMENT_KEYS, PruneTally, moment_masks
from .merge_stats import update_stats
from .relora import relora_layers


def offloaded(engine) -> str:
    """What the engine's ZeRO optimizer really moved to the host, from its own flags (not the JSON):
    "optimizer", "parameters", "optimizer+parameters" or "none"."""
    opt = engine.optimizer
    parts = [name for name, flag in (
        ("optimizer", getattr(opt, "offload_optimizer", False) or getattr(opt, "cpu_offload", False)),  # ZeRO-3, 1/2
        ("parameters", getattr(opt, "offload_param", False))) if flag]
    return "+".join(parts) or "none"


def _is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def _is_partitioned(param: torch.Tensor) -> bool:
    return _is_zero3(param) or hasattr(param, "_hp_mapping")


def _zero3_set_full(param: torch.Tensor, value: torch.Tensor, key: str | None) -> None:
    """ZeRO-3 set-full that also handles a numel not divisible by the world size.

    DeepSpeed's ``set_full_hp_param`` narrows ``value`` at ``partition_numel · rank``, which runs past the
    end on the last (padded) partition; pad the value to ``partition_numel · world`` first.
    """
    if value.numel() != param.ds_numel:  # DeepSpeed's own set-full asserts this; a short value would zero-fill
        raise ValueError(f"ZeRO-3 set-full: {value.numel()} values for a parameter of {param.ds_numel} "
                         f"(shape {tuple(param.ds_shape)})")
    opt = param._z3_optimizer
    part, group_idx = _zero3_partition(param, key, release_swap_buffers=False)
    world = opt._get_param_partition_world_size(param)
    rank = opt._get_param_partition_rank(param)
    padded = torch.zeros(part.numel() * world, dtype=part.dtype, device=part.device)
    padded[: value.numel()] = value.reshape(-1).to(padded)
    part.data.copy_(padded.narrow(0, part.numel() * rank, part.numel()))
    if opt._swappable_optimizer_subgroup(group_idx):
        opt._optimizer_states_and_gradient_swap_out(group_idx)


def _zero3_backup_stepped(opt, group_idx: int) -> bool:
    """Whether ZeRO-3 steps sub-group ``group_idx`` with its backup torch AdamW: a partial optimizer offload
    (offload_optimizer.ratio < 1) keeps some sub-groups on the accelerator and steps them there with it, so their
    moments live in its state, which DeepSpeed's optimizer-state API (``self.optimizer.state``) never reads: the
    prune raised KeyError 'exp_avg' (DeepSpeed 0.19.8, stage3.py ``_optimizer_step``: any device but 'cpu'; its
    checkpoints save ``self.optimizer``'s state alone, so a resume loses these moments: DeepSpeed's to fix)."""
    return (getattr(opt, "backup_optimizer", None) is not None and getattr(opt, "offload_optimizer", False)
            and opt.subgroup_to_device[group_idx] != "cpu")


def _zero3_sub_group(param: torch.Tensor) -> int:
    opt = param._z3_optimizer
    return opt.grad_position[opt.get_param_id(param)][0]


def _zero3_partition(param: torch.Tensor, key: str | None, release_swap_buffers: bool) -> tuple[torch.Tensor, int]:
    """This rank's partition of ``param``'s fp32 master (key None) or optimizer state, and its sub-group."""
    opt = param._z3_optimizer
    group_idx, offset, count = opt.grad_position[opt.get_param_id(param)]  # (sub-group, start, partition numel)
    if key is not None and _zero3_backup_stepped(opt, group_idx):
        flat = opt.fp32_partitioned_groups_flat[group_idx]
        return opt.backup_optimizer.state[flat][key].narrow(0, offset, count), group_idx
    return opt._get_fp32_opt_state_partition(param, release_swap_buffers=release_swap_buffers, optim_state_key=key)


def get_full(param: torch.Tensor, key: str | None = None) -> torch.Tensor:
    """Full fp32 master (key None) or optimizer state of ``param``; a collective on every rank."""
    if key is not None and _is_zero3(param) and param.requires_grad and _zero3_backup_stepped(
            param._z3_optimizer, _zero3_sub_group(param)):  # DeepSpeed's get_full_hp_param, from the backup's state
        part, _ = _zero3_partition(param, key, release_swap_buffers=True)
        return param._z3_optimizer._fp32_state_allgather(param, part.to(get_accelerator().current_device_name()))
    out = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    if out is None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} has no ZeRO-managed fp32 state "
                         f"({'master' if key is None else key}); is it trainable?")
    return out


def set_full(param: torch.Tensor, value: torch.Tensor, key: str | None = None) -> None:
    """Write a full value (identical on every rank) into this rank's slice; no communication."""
    if _is_zero3(param):
        _zero3_set_full(param, value, key)
    elif key is None:
        safe_set_full_fp32_param(param, value)
    else:
        safe_set_full_optimizer_state(param, value, key)


def optimizer_state_ready(engine) -> bool:
    """Whether the engine's optimizer holds Adam moments: created by its first step or brought by a checkpoint
    load. Read from the wrapped optimizer's own state (keyed by ZeRO-1/2's flat partitions, ZeRO-3's
    sub-groups), not from DeepSpeed's "fragments linked" flag, which a load leaves unset."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO and the BF16 optimizer wrap the torch optimizer
    backup = getattr(opt, "backup_optimizer", None)  # ZeRO-3's partial offload: the accelerator's sub-groups
    return len(getattr(inner, "state", {})) > 0 or (backup is not None and len(backup.state) > 0)


def relink_optimizer_fragments(engine) -> None:
    """Re-create every parameter's optimizer-state fragment views (ZeRO-1/2 and the BF16 optimizer).

    DeepSpeed 0.19 links them lazily inside the per-group optimizer step and sets its "linked" flag after
    the first group, so with two or more param groups (ours: LoRA and full-rank) every later group keeps
    empty fragments and ``safe_get_full_optimizer_state`` fails for it; and a checkpoint load loads the
    moments but links nothing until the next step (a reset right after a resume found no fragments).
    Re-running DeepSpeed's own linker once the optimizer has state is idempotent (it only builds views).
    """
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked") and optimizer_state_ready(engine):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def unshare_optimizer_steps(engine) -> int:
    """Give every optimizer state its own ``step`` tensor; returns how many were shared.

    DeepSpeed 0.19's ZeRO-3 universal-checkpoint load stores one ``step`` tensor object in the state of
    every sub-group. torch's Adam increments ``step`` in place, so with several param groups (ours: LoRA,
    full-rank matrices, norms and biases) each group after the first counts every step again and its bias
    correction drifts (seen as a 2e-5
    difference in the full-rank weights after one step). A checkpoint of an offloaded optimizer
    (DeepSpeedCPUAdam) holds ``step`` as an int, which torch's Adam refuses ("state_steps argument must
    contain a list of singleton tensors"): it becomes a float32 tensor, as torch's own load_state_dict makes it."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    torch_adam = isinstance(inner, torch.optim.Adam | torch.optim.AdamW)
    seen, shared = set(), 0
    for state in getattr(inner, "state", {}).values():
        step = state.get("step")
        if torch_adam and isinstance(step, int | float):
            state["step"] = torch.tensor(float(step), dtype=torch.float32)
        elif torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
                shared += 1
            seen.add(id(step))
    return shared


def check_engine_supported(engine, what: str) -> None:
    """Refusals checked before anything is changed: ZeRO stage 0 with bf16/fp16 (DeepSpeed's FP16 optimizer
    keeps the fp32 masters and Adam moments keyed by its own copies, out of the merge's and the prune's reach;
    ds_config.py refuses it for the trainer, this is the same refusal for the Python API), and LoRA factors in
    no optimizer group at any stage (a model wrapped after deepspeed.initialize)."""
    if getattr(engine.optimizer, "round_robin_gradients", False):
        raise ValueError(f"{what}: the engine's zero_optimization.round_robin_gradients is not supported: "
                         f"{ROUND_ROBIN_WHY}")
    low = [n for n, on in (("bf16", engine.bfloat16_enabled()), ("fp16", engine.fp16_enabled())) if on]
    stage = engine.zero_optimization_stage()
    if low and stage == 0:
        raise ValueError(f"{what}: the engine runs {low[0]} with ZeRO stage 0, whose fp32 masters and Adam moments "
                         "ReLoRA's merge and prune cannot reach: use ZeRO stage 1 or higher (on one rank it holds "
                         f"the same state as stage 0), or disable {low[0]} (fp32)")
    # LoRA factors the user froze: DeepSpeed gives them no optimizer state (ZeRO-1/2: no master, which read as
    # a late wrap; ZeRO-3: a master-less partition the merge failed on; stage 0: B stays 0, merges do nothing).
    frozen = [n for n, q in engine.module.named_parameters() if n.endswith(LORA_SUFFIXES) and not q.requires_grad]
    if frozen:
        raise ValueError(f"{what}: {len(frozen)} LoRA parameters ({frozen[0]}, ...) are frozen (requires_grad="
                         "False): they never train and ReLoRA's merge and prune have no optimizer state of them. "
                         "Leave every LoRA factor trainable (relora_ds.wrap makes them so); to keep a layer out of "
                         "ReLoRA, leave it out of wrap's target_modules")
    # A model wrapped after deepspeed.initialize: its LoRA factors are in no optimizer group and no ZeRO
    # partition (they would never train, and the merge would read the model copies as masters).
    if stage == 0:
        managed = {id(q) for g in getattr(engine.optimizer, "param_groups", []) for q in g["params"]}
        outside = [n for n, q in engine.module.named_parameters() if n.endswith(LORA_SUFFIXES) and id(q) not in managed]
    else:  # ZeRO-1/2 link each of its weights to the master (_hp_mapping, None where another rank holds it);
        # ZeRO-3 gives each its optimizer (a weight partitioned by a late wrap has a ds_id, not that)
        linked = (lambda q: hasattr(q, "_z3_optimizer")) if stage == 3 else (lambda q: hasattr(q, "_hp_mapping"))
        outside = [n for n, q in engine.module.named_parameters() if n.endswith(LORA_SUFFIXES) and not linked(q)]
    if outside:
        raise ValueError(f"{what}: {len(outside)} LoRA parameters ({outside[0]}, ...) are not in the engine's "
                         f"optimizer{'' if stage == 0 else f' (ZeRO stage {stage} holds no master of them)'}: the "
                         "model was wrapped after deepspeed.initialize, so they never train. Call relora_ds.wrap"
                         "(model, ...) before deepspeed.initialize (and before building a client optimizer)")


LORA_SUFFIXES = (".lora_A", ".lora_B")


def _rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


@torch.no_grad()
def merge_and_reinit_engine(engine) -> dict:
    """``W += s·B·A`` from the fp32 masters, then A ← seeded Kaiming and B ← 0 in masters and model copies."""
    start = time.perf_counter()
    check_engine_supported(engine, "merge_and_reinit")
    gas = engine.gradient_accumulation_steps()
    # accelerate (the HF Trainer) sets the boundary at each backward and calls engine.step() only there, so
    # micro_steps counts optimizer steps; a driver of its own leaves it None and steps every micro-batch.
    boundary = getattr(engine, "_is_gradient_accumulation_boundary", None)
    if (boundary is False) if boundary is not None else engine.micro_steps % gas:
        done = f"{engine.micro_steps % gas} of {gas} micro-steps done" if boundary is None else f"of {gas} micro-steps"
        warnings.warn(f"merge_and_reinit: the engine is inside a gradient accumulation ({done}): their gradients "
                      "of the old factors would be applied to the new ones. Merge after engine.step() has stepped "
                      "the optimizer", stacklevel=3)
    layers = list(relora_layers(engine.module))
    if not layers:
        raise ValueError("merge_and_reinit: the engine's model has no ReLoRALinear layers")
    comm_bytes, norms = 0, []
    for _, layer in layers:
        layer.last_update_norms = None
        A_param, B_param = layer.lora_A, layer.lora_B
        partitioned = _is_partitioned(A_param)
        if partitioned:
            A, B = get_full(A_param), get_full(B_param)  # fp32 masters, identical on every rank
            comm_bytes += 4 * (A.numel() + B.numel())
        else:  # ZeRO stage 0 in fp32: the model copy is the master
            A, B = A_param.detach().float(), B_param.detach().float()
        new_count = int(layer.merge_count) + 1
        new_A = layer.draw_A(new_count)  # one draw: the module's copy and (under ZeRO) the fp32 master
        if _is_zero3(A_param):
            import deepspeed

            base = layer.weight_q if layer.quantize else layer.weight
            gathered = [base, A_param, B_param]  # the merge reads A and B and writes W; a bias is not touched
            # modifier_rank counts within each parameter's data-parallel group (DeepSpeed broadcasts from that
            # group's rank 0), which is the world only without model parallelism
            modifier = _rank(A_param.ds_process_group) == 0
            with deepspeed.zero.GatheredParameters(gathered, modifier_rank=0):
                # int8 or merge_residual: every rank, for its own residual (and scale) buffers
                if layer.quantize or layer.merge_residual is not None or modifier:
                    layer.merge_(A, B)
                if modifier:
                    layer.reset_lora(new_count, new_A)
            comm_bytes += base.ds_numel * base.element_size()
            layer.merge_count.fill_(new_count)  # buffers are not partitioned: keep every rank's counter
        else:
            layer.merge_(A, B)
            layer.merge_count.fill_(new_count)
            layer.reset_lora(new_count, new_A)
        if partitioned:
            set_full(A_param, new_A.to(A.device))
            set_full(B_param, torch.zeros_like(B))
        if layer.last_update_norms is not None:  # (ZeRO-3: on the ranks that merged, rank 0 among them)
            norms.append(layer.last_update_norms)
    return {"layers": len(layers), "merge_seconds": time.perf_counter() - start,
            "merge_comm_bytes": comm_bytes if _world_size() > 1 else 0,
            **(update_stats(norms) if len(norms) == len(layers) else {})}


def check_adam_groups(engine, who: str) -> None:
    """Every param group of the engine's optimizer an Adam one (its state: exp_avg, exp_avg_sq): DeepSpeed's Muon
    keeps a momentum_buffer for the 2-D parameters, the LoRA factors among them, and Adam moments for the rest.
    The state itself is read too, once there is one: torch's Adamax has Adam's betas and eps but keeps exp_inf,
    not exp_avg_sq; found missing inside the gather, DeepSpeed raised on the ranks holding a piece of the tensor
    while the others waited in its all-reduce. Every rank's optimizer is the same class: all decide alike."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    optimizers = (inner, getattr(opt, "backup_optimizer", None))  # ZeRO-3's partial offload: a second AdamW
    states = [st for o in optimizers if o is not None for st in getattr(o, "state", {}).values()]
    kept = next((sorted(st) for st in states if st and not all(k in st for k in MOMENT_KEYS)), None)
    if kept is not None or not all("betas" in g and "eps" in g and not g.get("use_muon") for g in opt.param_groups):
        raise ValueError(f"{who}: the engine's optimizer ({type(inner).__name__}) keeps no Adam moments (exp_avg, "
                         "exp_avg_sq) in every param group" + (f" (its state: {kept})" if kept else "") + "; ReLoRA "
                         "under DeepSpeed supports Adam/AdamW (optimizer.type Adam or AdamW, or a torch Adam/AdamW "
                         "client optimizer)")


@torch.no_grad()
def prune_engine_optimizer_state(engine, params, method: str, ratio: float, seed: int, joint: bool = False) -> dict:
    """Prune each LoRA tensor's Adam moments exactly as a single process holding the whole tensor would."""
    start = time.perf_counter()
    check_engine_supported(engine, "prune_optimizer_state")
    if any(g.get("amsgrad") for g in getattr(engine.optimizer, "param_groups", [])):
        raise ValueError("prune_optimizer_state: the engine's optimizer runs amsgrad, whose running max of "
                         "exp_avg_sq would keep every pruned entry; ReLoRA under DeepSpeed supports Adam/AdamW "
                         "without amsgrad (remove optimizer.params.amsgrad)")
    # checked here, on every rank alike: a missing moment found later fails only on the ranks holding a piece of
    # the tensor, while the others wait in the gather's all-reduce
    check_adam_groups(engine, "prune_optimizer_state")
    if not optimizer_state_ready(engine):
        raise ValueError("prune_optimizer_state: the DeepSpeed optimizer holds no Adam moments yet; DeepSpeed "
                         "creates them at the first optimizer step (or loads them with a checkpoint), so prune "
                         "only after engine.step() or engine.load_checkpoint()")
    relink_optimizer_fragments(engine)
    tally, comm_bytes = PruneTally(), 0
    for i, p in enumerate(params):
        full = {}
        for key in MOMENT_KEYS:
            if _is_partitioned(p):
                full[key] = get_full(p, key)
                comm_bytes += full[key].element_size() * full[key].numel()  # gathered in its master dtype
            else:  # ZeRO stage 0 keeps plain torch optimizer state
                full[key] = engine.optimizer.state[p][key]
        masks = moment_masks(full, method, ratio, seed + 1000003 * i, joint)
        tally.add(full, masks, p.ds_numel if _is_zero3(p) else p.numel())
        for key in MOMENT_KEYS:
            full[key].masked_fill_(masks[key], 0.0)
            if _is_partitioned(p):
                set_full(p, full[key], key)
    stats = tally.stats()
    stats.update(prune_seconds=time.perf_counter() - start, prune_comm_bytes=comm_bytes if _world_size() > 1 else 0)
    return stats


def bf16_optimizer_masters(src: Path, shapes: dict) -> dict[str, torch.Tensor] | None:
    """The fp32 masters saved by DeepSpeed's bf16 optimizer (BF16_Optimizer: ZeRO-1, bf16 weights, fp32
    gradient accumulation) in checkpoint folder ``src``, whole; ``shapes``: each parameter's shape (the
    module states'). None when ``src`` holds another optimizer's files: DeepSpeed names every bf16 ZeRO
    checkpoint ``bf16_zero_pp_rank_*``, ZeRO-1/2/3 included, and those its zero_to_fp32 reads.

    Each rank's file holds, per param group, its contiguous partition of the group's flat fp32 buffer
    (``single_partition_of_fp32_groups``) and where each parameter's piece lies in it
    (``param_slice_mappings``: name -> (numel, start in the partition)); a parameter that straddles ranks
    has a piece in each, in rank order; padding only ends a partition."""
    files = sorted(Path(src).glob("bf16_zero_pp_rank_*_optim_states.pt"),
                   key=lambda f: int(f.name.split("_pp_rank_")[1].split("_")[0]))
    pieces: dict[str, list[torch.Tensor]] = {}
    for f in files:
        sd = torch.load(f, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
        if "param_slice_mappings" not in sd or "single_partition_of_fp32_groups" not in sd:
            return None
        for flat, mapping in zip(sd["single_partition_of_fp32_groups"], sd["param_slice_mappings"]):
            for name, address in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, address.start, address.numel))
    if not pieces:
        return None
    out = {}
    for name, parts in pieces.items():
        full = torch.cat(parts)
        if name not in shapes or full.numel() != math.prod(shapes[name]):
            raise ValueError(f"{src}: the bf16 optimizer's pieces of {name} hold {full.numel()} values, the "
                             f"module states' shape is {tuple(shapes.get(name, ()))}")
        out[name] = full.view(shapes[name]).clone()
    return out


def _world_size() -> int:
    """Ranks the gathers span: on one, the merge's and prune's collectives move no bytes (comm_bytes 0)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
