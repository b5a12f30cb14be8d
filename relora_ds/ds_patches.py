"""Fixes for DeepSpeed 0.19.8's NVMe offload (ZeRO-Infinity): call ``patch_deepspeed_nvme()`` before
``deepspeed.initialize`` (the trainer does, for a config with anything on nvme). With them, the optimizer and
the parameters on NVMe train and reset bit for bit as with host offload, and a checkpoint of parameters on
NVMe, and of the optimizer on NVMe, resumes exactly (tests/test_nvme_offload.py).
Also here: ``release_engine``, for an engine replaced by another in the same process (item 4), and two
savings in every rank's start-up (items 5 and 7).

1. The optimizer offloaded to NVMe trains on wrong gradients without a word.

ZeRO-3 with ``offload_optimizer.device = "nvme"`` swaps each sub-group's fp32 gradient partition to files,
one piece per parameter, and reads the pieces back into a pinned buffer at each parameter's offset in the
partition (``gradient_tensor.narrow(0, offset, length)``). DeepSpeed's async_io op reads and writes with
O_DIRECT, which needs the buffer address aligned (512 bytes on ext4): into a buffer at another address the
read does nothing and still reports success, and a write from one leaves an empty file. A parameter's offset
is a sum of the numels before it in the partition (a bias of 2751, a LoRA factor of 5461 x 128, a split of
an odd numel across ranks), so every later gradient piece is one of these: the optimizer steps on whatever
the buffer held before (measured: 4 Linear layers of 2751 x 1024 in fp32 and bf16, one and two ranks:
3 of the 4 weights' gradients wrong, the loss after one step 0.0016-0.0024 against 0.00067 with the
optimizer offloaded to host memory; the `cpu` and `none` runs agree bit for bit).

The fix splits each gradient where DeepSpeed already splits one whose length is misaligned
(``OptimizerSwapper._adjust_for_misaligned_lengths``), and also at the first aligned offset inside it:
a head and a tail of fewer than ``numel_alignment`` (256 fp32) elements stay in host memory as DeepSpeed's
"unswapped" gradient pieces, and the middle, now at an aligned offset and length, is swapped as before.
Every read and write of a gradient piece then uses an aligned address, in the partitioned and the
pipelined swappers alike.

2. The parameters offloaded to NVMe stop the second step with ``AssertionError: param N already assigned
swap buffer id M``. The parameter coordinator's trace lists each parameter twice, once for the forward and
once for the backward, and ``__prefetch_nvme_param_partitions`` queues every entry of the prefetch window whose
partition is on disk, so a parameter of the last layer (used at the end of the forward and the start of the
backward) is queued twice and given two buffers. The fix queues each parameter once. (Setting
``stage3_prefetch_bucket_size`` to 0 also avoids it, by giving up every prefetch.)

3. A checkpoint loses the frozen parameters on NVMe (the merged ReLoRA base weights). ZeRO-3 saves each
frozen parameter's partition (``_get_param_fragment_func``: ``param.ds_tensor``) and loads it back into
``param.ds_tensor`` (``load_module_state_dict``), but for a partition the swapper holds in a file that is a
placeholder: a scalar is saved, and the loaded values never reach the file (measured: a new engine loading
the checkpoint had exactly the swapped MLP weights wrong, first loss 0.165 where the run had 0.091). The fix
swaps each such partition in to save it, and writes each loaded one through the swapper into its file.

4. A ZeRO-3 engine is never freed. Two module-level references keep its model, and through the model's
hooks the engine with its optimizer, alive for the life of the process: the parameter offload pushes the
model onto ``parameter_offload.FWD_MODULE_STACK`` when it is built and neither the forward nor ``destroy()``
pops it, and ``PartitionedParameterCoordinator.__params_to_release`` is an ``lru_cache`` on the class keyed
by (coordinator, submodule, step). Measured at the warm-start switch: the full-rank ZeRO-3 engine was still
alive when the ReLoRA engine was built (ZeRO-1/2 engines were freed once no longer referenced).
``release_engine`` drops both references (the cache only loses entries it recomputes).

5. Every rank imports torch's compiler (torch._inductor: ~2 s of CPU at start-up, where torch itself imports
in 2.5 s; measured on this project's 2-core machine) for an optimizer it does not use: ZeRO's gradient
reduction, ZeRO-3's and the bf16 optimizer's set-up import DeepSpeed's Muon optimizer to check whether the
optimizer is one, and that module decorates three functions with ``torch.compile``, whose set-up imports the
compiler at decoration, not at the first call. ``import_muon_compiling_on_first_call`` (called by
``relora_ds.distributed.init_distributed`` on every rank) imports it once with those decorations deferred
to each function's first call (which compiles exactly as before).

6. A checkpoint of the optimizer on NVMe resumes wrong. DeepSpeed saves the optimizer's swap files by copying
the swap folder into the checkpoint, skips the ZeRO checkpoint files at load, and copies the files back under
their old names, which are the sub-groups' ``ds_id``s: a counter over every parameter the process has
partitioned, so an engine built after another (the trainer's ReLoRA engine, after the warm start's; a
resume that builds only the ReLoRA engine) has other ids, and reads its own fresh files without a word. The
sub-groups too small to swap (< 1 MiB a rank), the optimizer's step counts and hyperparameters and the loss
scaler are not in those files at all (measured: every trainable parameter differed after the load, and the
first loss was 2.57 where the run had 0.094). The fix makes the ZeRO checkpoint files complete, as with
host offload: the optimizer's ``state_dict`` swaps each swapped sub-group in, one at a time, to copy its fp32
partition and moments, and its load writes them back through the swapper; the engine neither copies the swap
folder nor skips those files. A universal checkpoint (a resume on another number of ranks) is read the same
way (DeepSpeed's copied into the swapped sub-groups' empty placeholders: "start (0) + length (16500) exceeds
dimension size (0)"). The copies cost host memory for the optimizer's state while the checkpoint is written:
small with ReLoRA, whose optimizer holds the LoRA factors, embeddings and norms.

7. Every ``DeepSpeedCPUAdam`` (the offloaded optimizer; two a run with a warm start) and the first load of a
DeepSpeed op (twice: ``-march`` and the SIMD width) ask py-cpuinfo, whose ``get_cpu_info`` starts a Python
subprocess each time (~0.9 s of CPU each, measured on this project's 2-core machine: a one-rank, 12-step run
of the tests' recipe with the optimizer offloaded took 8.0-8.6 s of user CPU with 4 queries, 5.7-6.0 s with
one). The answer does not change while the process lives:
``memoize_cpu_info`` (called by ``relora_ds.distributed.init_distributed`` on every rank, and by
``relora_ds.hf_trainer.enable_relora`` on a DeepSpeed Trainer's, which accelerate starts, with item 5's) keeps
the first one and hands each caller its own copy.

8. An fp16 step that raises the dynamic loss scale trains on half its gradient. After ``loss_scale_window``
steps without an overflow, DeepSpeed's fp16 optimizers (ZeRO-1/2, ZeRO-3, and without ZeRO FP16_Optimizer and
FP16_UnfusedOptimizer) double the scale inside ``step()`` before they divide the gradients, scaled by the old
one, by it (ZeRO-3 and FP16_Optimizer also record the gradient norm over it). Measured against AdamW in
float64 (tests/test_stage0_review.py, window 1): that step's update 25% off at stage 0 and ZeRO-2 without a
clip (a clip between the norm and twice it is not applied), ZeRO-3's and FP16_Optimizer's logged norm half
the true one; once a window by default (1000 steps). ``raise_loss_scale_after_step`` (called by
``init_distributed`` on every rank and by ``enable_relora``) holds the raise until the step is done; a lowered
scale (an overflow) is applied at once, as before.
"""
from __future__ import annotations

import functools
import sys
import warnings

import torch


def _aligned_gradient_pieces(self, tensors: list[torch.Tensor], offsets: list[int]):
    """Pieces of each swappable gradient that start at an offset that is a multiple of
    ``self.numel_alignment`` wherever they are long enough to be swapped; replaces DeepSpeed's
    ``_adjust_for_misaligned_lengths``, which aligned only the length."""
    align = self.numel_alignment
    out_tensors, out_offsets = [], []
    for tensor, offset in zip(tensors, offsets):
        n = tensor.numel()
        if not self.is_swappable_tensor(tensor=tensor):
            out_tensors.append(tensor)
            out_offsets.append(offset)
            continue
        head = min((-offset) % align, n)
        body = (n - head) // align * align
        for start, length in ((0, head), (head, body), (head + body, n - head - body)):
            if length:
                out_tensors.append(tensor.narrow(0, start, length))
                out_offsets.append(offset + start)
    return out_tensors, out_offsets


def _prefetch_nvme_param_partitions_once(self) -> None:
    """DeepSpeed's ``PartitionedParameterCoordinator.__prefetch_nvme_param_partitions`` (0.19.8) with each
    parameter queued for swap-in at most once."""
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus

    if not self.is_complete_trace():
        return
    own = "_PartitionedParameterCoordinator__"  # the class's private (name-mangled) attributes
    numel_in_flight = sum(param.ds_numel for param in getattr(self, own + "inflight_param_registry"))
    numel_considered, swap_in, queued = 0, [], set()
    for param_in_trace in getattr(self, own + "param_queue"):
        param = param_in_trace.param
        if param.nvme_swapper is None:
            continue
        if numel_considered > 2 * numel_in_flight or len(swap_in) >= param.nvme_swapper.available_swap_in_buffers():
            break
        if param.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE and param.ds_id not in queued:
            swap_in.append(param)
            queued.add(param.ds_id)
        numel_considered += param.ds_numel
    if swap_in:
        swap_in[0].nvme_swapper.swap_in(swap_in, async_op=True)


def _on_nvme(param) -> bool:
    """A ZeRO-3 partition the NVMe swapper holds in a file (not in a buffer) right now."""
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus

    return (hasattr(param, "ds_id") and getattr(param, "nvme_swapper", None) is not None
            and param.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE)


def _fragment_reading_nvme(original):
    """``DeepSpeedEngine._get_param_fragment_func``, which saves each frozen parameter's partition
    (``param.ds_tensor``), reading a partition that is on NVMe from its swap file."""
    def fragment(self, param):
        if not _on_nvme(param):
            return original(self, param)
        param.nvme_swapper.swap_in([param], async_op=False)
        try:
            return param.ds_tensor.detach().cpu().clone()  # the swap buffer is reused once released
        finally:
            param.nvme_swapper.remove_partition_and_release_buffers([param])
    return fragment


def _load_writing_nvme(original):
    """``DeepSpeedEngine.load_module_state_dict``, whose frozen-parameter restore copies each saved fragment
    into ``param.ds_tensor``: for a partition the NVMe swapper holds, that is a placeholder (the copy fails)
    or a buffer released without being written. Those fragments are written into their swap files instead
    (swapped in, overwritten, swapped out), one at a time."""
    def load(self, checkpoint, *args, **kwargs):
        from deepspeed.checkpoint.constants import FROZEN_PARAM_FRAGMENTS
        from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

        saved = checkpoint.get(FROZEN_PARAM_FRAGMENTS)
        on_nvme = {name: param for param, name in self.param_names.items()  # those swapped (>= 1 MiB a rank)
                   if not param.requires_grad and getattr(param, "nvme_swapper", None) is not None
                   and getattr(param.ds_tensor, "final_location", None) == OffloadDeviceEnum.nvme
                   and name in (saved or {})}
        if on_nvme:  # DeepSpeed's loop copies each into itself, a no-op; written below
            checkpoint = {**checkpoint, FROZEN_PARAM_FRAGMENTS: {**saved, **{n: p.ds_tensor for n, p in on_nvme.items()}}}
        out = original(self, checkpoint, *args, **kwargs)
        for name, param in on_nvme.items():
            if _on_nvme(param):
                param.nvme_swapper.swap_in([param], async_op=False)
            param.ds_tensor.data.copy_(saved[name].data)
            param.nvme_swapper.swap_out_and_release([param])
        return out
    return load


def _packed_index(optimizer) -> dict[int, int]:
    """Sub-group id -> its index in the state dict of ZeRO-3's inner optimizer, which torch numbers over the
    param groups' params in order, each group holding its sub-groups' fp32 partitions while DeepSpeed saves."""
    optimizer._set_fp32_optimizer_param_groups()
    try:
        position = {id(p): k for k, p in enumerate(p for g in optimizer.optimizer.param_groups for p in g["params"])}
    finally:
        optimizer._clear_fp32_optimizer_param_groups()
    return {i: position[id(flat)] for i, flat in enumerate(optimizer.fp32_partitioned_groups_flat)}


def _state_dict_swapping_in(original):
    """``DeepSpeedZeroOptimizer_Stage3._rigid_state_dict`` with each sub-group on NVMe swapped in, one at a
    time, to copy its fp32 partition and optimizer state (swapped out they are empty placeholders)."""
    def state_dict(self):
        from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT

        out = original(self)
        if not getattr(self, "swap_optimizer", False):
            return out
        index, flats = _packed_index(self), list(out[FP32_FLAT_GROUPS])
        for i, flat in enumerate(self.fp32_partitioned_groups_flat):
            if not self._swappable_optimizer_subgroup(i):
                continue
            self._optimizer_states_and_gradient_swap_in(i)
            try:
                flats[i] = flat.detach().clone()
                out[OPTIMIZER_STATE_DICT]["state"][index[i]] = {
                    k: v.detach().clone() if torch.is_tensor(v) else v for k, v in self.optimizer.state[flat].items()}
            finally:
                self._optimizer_states_and_gradient_swap_out(i)
        out[FP32_FLAT_GROUPS] = flats
        return out
    return state_dict


def _load_swapping_in(original):
    """``DeepSpeedZeroOptimizer_Stage3._rigid_load_state_dict`` writing each sub-group on NVMe through the
    swapper (swapped in, overwritten, its bf16 partition refreshed, swapped out), one at a time. DeepSpeed's
    own, for a swapping optimizer, restored the in-memory tensors and purged the swapped state."""
    def load(self, state_dict, load_optimizer_states=True):
        from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, LOSS_SCALER, OPTIMIZER_STATE_DICT

        if not getattr(self, "swap_optimizer", False):
            return original(self, state_dict, load_optimizer_states=load_optimizer_states)
        saved_groups = state_dict.get("ds_zero_partition_groups")
        if saved_groups is not None and saved_groups != self._zero3_partition_group_metadata():
            raise RuntimeError("this ZeRO-3 checkpoint's parameter placement differs from this engine's")
        saved_numel = [t.numel() for t in state_dict[FP32_FLAT_GROUPS]]
        if saved_numel != list(self.fp16_partitioned_groups_flat_numel):
            raise ValueError(
                f"this rank's ZeRO checkpoint file holds fp32 partitions of {saved_numel} elements, this engine's "
                f"optimizer sub-groups have {list(self.fp16_partitioned_groups_flat_numel)}: written by DeepSpeed's "
                "own save of an optimizer on NVMe (the swapped sub-groups are then only in offloaded_tensors/, "
                "under parameter ids a new process does not reproduce), or for another model or sub_group_size. "
                "Resume from a checkpoint written with relora_ds's NVMe fixes, or with the settings it was "
                "written with")
        self.loss_scaler = state_dict[LOSS_SCALER]
        self.dynamic_loss_scale = state_dict["dynamic_loss_scale"]
        self.overflow = state_dict["overflow"]
        saved, index = state_dict[OPTIMIZER_STATE_DICT], _packed_index(self)
        if load_optimizer_states:
            for group, saved_group in zip(self.optimizer.param_groups, saved["param_groups"], strict=True):
                group.update({k: v for k, v in saved_group.items() if k != "params"})
        self._partition_all_parameters()
        timer_names = set()
        for i, flat in enumerate(self.fp32_partitioned_groups_flat):
            self._prepare_sub_group(i, timer_names)  # swaps a swapped sub-group's partition and state in
            flat.data.copy_(state_dict[FP32_FLAT_GROUPS][i].data)
            if load_optimizer_states:
                state = self.optimizer.state[flat]
                for key, value in saved["state"][index[i]].items():
                    if torch.is_tensor(value) and torch.is_tensor(state.get(key)) and state[key].shape == value.shape:
                        state[key].data.copy_(value.data)  # into the swap buffer it is written from
                    else:
                        state[key] = value
            self._reassign_or_swap_out_partitioned_parameters(i)  # the bf16 partition from the fp32 one
            self._release_sub_group(i, timer_names)
        self._post_step(timer_names)
    return load


def _universal_load_swapping_in(original):
    """``DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3`` (a universal
    checkpoint: another world size or config) for a swapping optimizer: DeepSpeed's copies each parameter's
    fp32 and moments into the sub-groups' in-memory tensors, empty for a swapped one, then purges the swapped
    state. Here they are read the same way into this rank's partition of each sub-group, and written through
    the swapper as a checkpoint of this topology would be (``_load_swapping_in``)."""
    def load(self, checkpoint_dir):
        import os

        from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, LOSS_SCALER, OPTIMIZER_STATE_DICT

        if not getattr(self, "swap_optimizer", False):
            return original(self, checkpoint_dir)
        folder = os.path.join(checkpoint_dir, "zero")
        saved = torch.load(os.path.join(folder, "optimizer_state.pt"), weights_only=False)
        step = saved[OPTIMIZER_STATE_DICT]["state"][0]["step"]
        index, flats, state = _packed_index(self), [], {}
        for i, group in enumerate(self.fp16_groups):
            parts = {}
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                flat = torch.zeros(self.fp16_partitioned_groups_flat_numel[i], dtype=torch.float32)
                offset = 0
                for param in group:
                    part = self.load_hp_checkpoint_state(os.path.join(folder, self.param_names[param]), key,
                                                         param=param)
                    flat.narrow(0, offset, part.numel()).copy_(part.flatten())
                    offset += part.numel()
                parts[key] = flat
            flats.append(parts.pop("fp32"))
            state[index[i]] = {"step": step, **parts}
        hyper = {k: v for k, v in saved[OPTIMIZER_STATE_DICT]["param_groups"][0].items() if k != "params"}
        self._rigid_load_state_dict({  # DeepSpeed's takes every group's hyperparameters from the first
            LOSS_SCALER: saved.get(LOSS_SCALER, self.loss_scaler),
            "dynamic_loss_scale": saved.get("dynamic_loss_scale", self.dynamic_loss_scale),
            "overflow": saved.get("overflow", self.overflow), FP32_FLAT_GROUPS: flats,
            OPTIMIZER_STATE_DICT: {"state": state, "param_groups": [dict(hyper) for _ in self.optimizer.param_groups]}})
    return load


def patch_deepspeed_nvme() -> bool:
    """Install the NVMe fixes, items 1-3 and 6 (idempotent); False where DeepSpeed is not installed."""
    try:
        from deepspeed.runtime.swap_tensor.optimizer_utils import OptimizerSwapper
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    except ImportError:  # no DeepSpeed: nothing to patch
        return False
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    # Each fix replaces a DeepSpeed 0.19.8 method: where a version has renamed one, assigning would still
    # succeed and the bug it fixes (wrong gradients, lost weights) come back silently.
    _require_targets([(OptimizerSwapper, "_adjust_for_misaligned_lengths"),
                      (PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__prefetch_nvme_param_partitions"),
                      (DeepSpeedEngine, "_get_param_fragment_func"), (DeepSpeedEngine, "load_module_state_dict"),
                      (DeepSpeedEngine, "zero_nvme_offload_optimizer"),
                      (DeepSpeedZeroOptimizer_Stage3, "_rigid_state_dict"),
                      (DeepSpeedZeroOptimizer_Stage3, "_rigid_load_state_dict"),
                      (DeepSpeedZeroOptimizer_Stage3, "load_hp_checkpoint_state_from_checkpoint_dir_stage3")])
    OptimizerSwapper._adjust_for_misaligned_lengths = _aligned_gradient_pieces
    PartitionedParameterCoordinator._PartitionedParameterCoordinator__prefetch_nvme_param_partitions = \
        _prefetch_nvme_param_partitions_once
    if not getattr(DeepSpeedEngine.load_module_state_dict, "_relora_nvme", False):
        for cls, name, wrap in ((DeepSpeedEngine, "_get_param_fragment_func", _fragment_reading_nvme),
                                (DeepSpeedEngine, "load_module_state_dict", _load_writing_nvme),
                                (DeepSpeedZeroOptimizer_Stage3, "_rigid_state_dict", _state_dict_swapping_in),
                                (DeepSpeedZeroOptimizer_Stage3, "_rigid_load_state_dict", _load_swapping_in),
                                (DeepSpeedZeroOptimizer_Stage3, "load_hp_checkpoint_state_from_checkpoint_dir_stage3",
                                 _universal_load_swapping_in)):
            patched = wrap(getattr(cls, name))
            patched._relora_nvme = True
            setattr(cls, name, patched)
        # Item 6: it gates the swap-folder copies in save_checkpoint and load_checkpoint, the skip of the ZeRO
        # checkpoint files at load (and AutoEP's refusal, for the same missing state): those files are complete.
        DeepSpeedEngine.zero_nvme_offload_optimizer = lambda self: False
    return True


def _require_targets(targets: list[tuple[type, str]]) -> None:
    """Refuse to patch a DeepSpeed that lacks a method these fixes replace (another version than 0.19.8)."""
    import deepspeed

    missing = [f"{cls.__name__}.{name}" for cls, name in targets if not hasattr(cls, name)]
    if missing:
        raise RuntimeError(f"DeepSpeed {deepspeed.__version__} has no {', '.join(missing)}: relora_ds's NVMe-offload "
                           "fixes (relora_ds/ds_patches.py) replace these methods of DeepSpeed 0.19.8, and without "
                           "them NVMe offload gives wrong gradients and checkpoints that lose weights. Install "
                           "deepspeed==0.19.8, or offload to the CPU instead of NVMe")


def import_muon_compiling_on_first_call() -> None:
    """Item 5 (idempotent): import DeepSpeed's Muon optimizer with its ``torch.compile`` decorations made at
    each decorated function's first call. Nothing where DeepSpeed is missing or the module is imported."""
    import functools
    import importlib.util

    name = "deepspeed.runtime.zero.muon.original_muon"
    if name in sys.modules or importlib.util.find_spec("deepspeed") is None:
        return
    if importlib.util.find_spec("deepspeed.runtime.zero.muon") is None:  # a DeepSpeed without Muon: nothing compiles
        return
    compile_now = torch.compile

    def compile_on_first_call(model=None, **kwargs):
        if model is None:  # used as @torch.compile(...)
            return lambda fn: compile_on_first_call(fn, **kwargs)
        compiled = []

        @functools.wraps(model)
        def call(*args, **kw):
            if not compiled:  # torch.compile is torch's own again once the import is done
                compiled.append(torch.compile(model, **kwargs))
            return compiled[0](*args, **kw)
        return call

    torch.compile = compile_on_first_call
    try:
        importlib.import_module(name)
        importlib.import_module("deepspeed.runtime.zero.muon.muon_optimizer")
    finally:
        torch.compile = compile_now


def memoize_cpu_info() -> None:
    """Item 7: ``cpuinfo.get_cpu_info`` answers from the first call's result, a deep copy each time (a caller
    may change its dict). A failed query (py-cpuinfo's ``{}``) is not kept: the next call asks again. Nothing
    where py-cpuinfo is missing (DeepSpeed then reads ``lscpu``). A second call wraps the first's wrapper,
    which answers without asking."""
    import copy
    import functools

    try:
        import cpuinfo
    except ImportError:
        return
    ask = cpuinfo.get_cpu_info
    kept = {}

    @functools.wraps(ask)
    def get_cpu_info():
        if not kept:
            kept.update(ask())
        return copy.deepcopy(kept)
    cpuinfo.get_cpu_info = get_cpu_info


def release_engine(engine) -> None:
    """``engine.destroy()``, and drop the reference DeepSpeed itself keeps to a ZeRO-3 engine's model (item 4),
    so that the engine's weights, fp32 masters, optimizer state and buffers are freed once the caller drops
    its own references and cycles are collected (``gc.collect()``): destroy() frees no tensor."""
    engine.destroy()
    try:
        from deepspeed.runtime.zero import parameter_offload
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    except ImportError:
        return
    stack = parameter_offload.FWD_MODULE_STACK
    stack[:] = [m for m in stack if m is not engine.module]
    # The lru_cache sits under DeepSpeed's NVTX wrapper (no functools.wraps): reach it through the closure.
    fn = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    caches = [f for f in (fn, *(c.cell_contents for c in (getattr(fn, "__closure__", None) or ())))
              if hasattr(f, "cache_clear")]
    for f in caches:
        f.cache_clear()
    if not caches and engine.zero_optimization_stage() == 3:
        import deepspeed

        warnings.warn(f"DeepSpeed {deepspeed.__version__}: found no cache of PartitionedParameterCoordinator."
                      "__params_to_release to clear (relora_ds/ds_patches.py, item 4, written for 0.19.8): a "
                      "released ZeRO-3 engine may stay in memory until the process ends", RuntimeWarning,
                      stacklevel=2)


def raise_loss_scale_after_step() -> None:
    """Item 8 (idempotent): the fp16 optimizers' ``step`` raises the loss scale after the update, not before
    dividing the gradients by it. Nothing where DeepSpeed is missing."""
    try:
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:
        return
    for cls in (FP16_Optimizer, FP16_UnfusedOptimizer, DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        if not getattr(cls.step, "_relora_scale_after_step", False):
            cls.step = _scale_raised_after(cls.step)
            cls.step._relora_scale_after_step = True


def _scale_raised_after(step):
    @functools.wraps(step)
    def step_then_raise(self, *args, **kwargs):
        update, held = self._update_scale, []  # (skip) in the FP16 optimizers, (has_overflow) in ZeRO's

        def lower_now_raise_later(*a, **k):
            overflow = a[0] if a else next(iter(k.values()), False)
            return update(*a, **k) if overflow else held.append((a, k))

        self._update_scale = lower_now_raise_later
        try:
            return step(self, *args, **kwargs)
        finally:
            del self._update_scale
            for a, k in held:
                update(*a, **k)
    return step_then_raise
