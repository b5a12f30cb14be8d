"""ReLoRA inside Hugging Face's ``transformers.Trainer`` (and its subclasses, e.g. TRL's), with or without
DeepSpeed: the schedule becomes the jagged cosine, and after every ``merge_every``-th optimizer step the
ReLoRA layers merge and re-initialize; every ``cycle_length``-th step also prunes their Adam moments (a reset).

    model = relora_ds.wrap(AutoModelForCausalLM.from_config(config), rank=128)
    trainer = Trainer(model=model, args=TrainingArguments(..., deepspeed="my_zero2.json"), ...)  # see below
    relora_ds.hf_trainer.enable_relora(trainer, cycle_length=5000, restart_warmup_steps=100)
    trainer.train()
    trainer.save_model("out")   # the merged model, plain layers: from_pretrained loads it

Under DeepSpeed the merge and prune run on the engine (``trainer.model_wrapped``): its fp32 masters and ZeRO
partitions of the moments, exactly as ``launch/train.py`` does (``relora_ds/reset_hook.py``). The peak lr is
``args.learning_rate``, the first warmup ``args.warmup_steps`` (a float below 1: that fraction of the run, as
transformers 5 reads it); ``lr_scheduler_type`` is replaced. Steps count from the Trainer's ``global_step``
(optimizer steps), and the lr is kept on it: a run resumed from a Trainer checkpoint merges, resets and
re-warms at the steps the uninterrupted run does (``merge_count`` is a saved buffer), also from a checkpoint
without scheduler state, and an fp16 step skipped for an overflow does not shift the later re-warm-ups.
``trainer.save_model`` writes the merged model (what ``from_pretrained`` loads), Trainer checkpoints the
wrapped state (what a resume needs).

The DeepSpeed config: best without an ``optimizer`` section (the Trainer builds its AdamW, norms and biases
without weight decay, and DeepSpeed runs it), e.g. ``{"zero_optimization": {"stage": 2}, "bf16": {"enabled":
"auto"}, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping":
"auto"}``. An ``optimizer`` section must set ``lr`` and ``weight_decay`` (``"auto"``: the Trainer's); without
them DeepSpeed would run its optimizer's defaults (refused). relora_ds's own ``ds_configs/*.json`` are for
``launch/train.py``, which fills their optimizer from the recipe.
"""
from __future__ import annotations

import functools
import logging
import os
import warnings

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .merge import check_not_fsdp1, merge_and_reinit
from .prune import MOMENT_KEYS, check_prune_args, prune_optimizer_state
from .relora import ignore_host_buffers_in_ddp, is_deepspeed_engine, lora_parameters, relora_layers
from .reset_hook import events_due
from .schedule import build_scheduler, cycle_anchor, jagged_cosine

logger = logging.getLogger(__name__)


def enable_relora(trainer: Trainer, *, cycle_length: int, restart_warmup_steps: int = 100,
                  min_lr_ratio: float = 0.1, merge_every: int | None = None, prune_method: str = "magnitude",
                  prune_ratio: float = 0.99, prune_joint: bool = False) -> "ReLoRACallback":
    """Turn ``trainer`` (whose model holds ReLoRA layers: ``relora_ds.wrap`` it first) into a ReLoRA run.

    ``cycle_length``: optimizer steps between resets (the paper: 5000); ``merge_every`` (a divisor of it)
    merges more often; ``restart_warmup_steps``: the lr ramp after each reset; ``min_lr_ratio``: the cosine's
    floor; ``prune_*``: as ``relora_ds.prune_optimizer_state``. Call before ``trainer.train()``. Returns the
    callback it adds (its ``events`` list records each merge and reset)."""
    if not isinstance(trainer, Trainer):
        raise TypeError(f"enable_relora takes a transformers Trainer, got {type(trainer).__name__}")
    if not any(True for _ in relora_layers(trainer.model)):
        raise ValueError("enable_relora: the trainer's model has no ReLoRA layers; call relora_ds.wrap(model, ...) "
                         "before building the Trainer")
    for name, value in (("cycle_length", cycle_length), ("merge_every", merge_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"enable_relora: {name}={value!r} must be a positive whole number of optimizer steps")
    if merge_every is not None and cycle_length % merge_every:
        raise ValueError(f"enable_relora: merge_every={merge_every} must divide cycle_length={cycle_length} "
                         "(every reset is also a merge)")
    if isinstance(restart_warmup_steps, bool) or not isinstance(restart_warmup_steps, int):
        raise ValueError(f"enable_relora: restart_warmup_steps={restart_warmup_steps!r} must be a whole number of "
                         "optimizer steps")
    if not 0 <= restart_warmup_steps <= cycle_length:
        raise ValueError(f"enable_relora: restart_warmup_steps={restart_warmup_steps} must be in [0, cycle_length="
                         f"{cycle_length}]")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"enable_relora: min_lr_ratio={min_lr_ratio} must be in [0, 1]")
    check_prune_args(prune_method, prune_ratio)
    if any(isinstance(cb, ReLoRACallback) for cb in trainer.callback_handler.callbacks):
        raise ValueError("enable_relora: this trainer is already a ReLoRA run (each reset would run twice)")
    if trainer.lr_scheduler is not None:
        raise ValueError("enable_relora: the trainer already has its lr scheduler (built by train(), or passed as "
                         "optimizers=(..., scheduler)); call enable_relora on a Trainer built without one, before "
                         "train()")
    args = trainer.args
    schedule, strategy = (str(getattr(v, "value", v)) for v in (args.lr_scheduler_type, args.hub_strategy))
    if schedule != "linear" or args.lr_scheduler_kwargs:  # "linear": TrainingArguments' default
        warnings.warn(f"enable_relora: lr_scheduler_type={schedule!r}"
                      + (f" and lr_scheduler_kwargs={args.lr_scheduler_kwargs} are" if args.lr_scheduler_kwargs
                         else " is") + " not used: ReLoRA's jagged cosine replaces the Trainer's schedule (warmup_steps, then "
                      "enable_relora's cycle_length, restart_warmup_steps and min_lr_ratio)", UserWarning, stacklevel=2)
    if args.push_to_hub and strategy != "end":
        warnings.warn(f"enable_relora: push_to_hub with hub_strategy={strategy!r} uploads each checkpoint's model "
                      "files, the wrapped state (base weights and LoRA factors), which from_pretrained loads without "
                      "s·B·A; save_model / push_to_hub upload the merged model. hub_strategy='end' uploads only "
                      "that", UserWarning, stacklevel=2)
    ds_config = _deepspeed_config(trainer)
    if "scheduler" in ds_config:
        raise ValueError("enable_relora: the DeepSpeed config has a 'scheduler' section, which would replace "
                         "ReLoRA's jagged cosine (the lr re-warms after each reset): remove it")
    section = ds_config.get("optimizer")
    missing = [k for k in ("lr", "weight_decay") if k not in ((section or {}).get("params") or {})]
    if isinstance(section, dict) and missing:
        raise ValueError(f"enable_relora: the DeepSpeed config's 'optimizer' section sets no {' and '.join(missing)}, "
                         "so DeepSpeed would take its optimizer's defaults (torch's AdamW: lr 1e-3, weight_decay "
                         "0.01 on every parameter) instead of TrainingArguments' learning_rate and weight_decay. "
                         "Remove the 'optimizer' section (the Trainer then builds its AdamW, with its decay groups, "
                         "and DeepSpeed runs it), or set them to \"auto\" in its params (the Trainer fills them)")
    # transformers fills only "auto" values (and reports a different one): a key left out runs the optimizer's
    # default, (0.9, 0.999) and 1e-8 in torch's AdamW, FusedAdam and DeepSpeedCPUAdam alike
    given = (section or {}).get("params") or {}
    unset = [f"{key} (TrainingArguments: {value}; DeepSpeed would run {default})" for key, value, default in
             (("betas", [args.adam_beta1, args.adam_beta2], [0.9, 0.999]), ("eps", args.adam_epsilon, 1e-8))
             if isinstance(section, dict) and key not in given and value != default]
    if unset:
        raise ValueError(f"enable_relora: the DeepSpeed config's 'optimizer' section sets no {' and '.join(unset)}. "
                         "Set them to \"auto\" in its params (the Trainer fills them), or remove the 'optimizer' "
                         "section")
    if (message := _one_group_decay(ds_config, trainer.args.weight_decay)) is not None:
        warnings.warn(message, UserWarning, stacklevel=2)

    def create_scheduler(num_training_steps: int, optimizer=None):
        """Trainer.create_scheduler with the jagged cosine. DeepSpeed with its own optimizer section asks a copy
        of the trainer for a schedule over that optimizer (``optimizer`` given): a new one each time."""
        schedule = dict(total_steps=num_training_steps, cycle_length=cycle_length,
                        warmup_steps=trainer.args.get_warmup_steps(num_training_steps),
                        restart_warmup_steps=restart_warmup_steps, min_lr_ratio=min_lr_ratio)
        if (trainer.lr_scheduler is None or optimizer is not None) and cycle_length >= num_training_steps:
            warnings.warn(f"enable_relora: cycle_length={cycle_length} but the run is {num_training_steps} "
                          "optimizer steps: no reset happens before its last step (LoRA, not ReLoRA); use a "
                          "cycle_length below it", UserWarning, stacklevel=3)
        if trainer.lr_scheduler is None:  # transformers' contract (4.x passes its own optimizer here)
            trainer.lr_scheduler = _record_cycles(build_scheduler(
                optimizer if optimizer is not None else trainer.optimizer, "jagged_cosine", **schedule))
            trainer._created_lr_scheduler = True
            return trainer.lr_scheduler
        if optimizer is not None:  # DeepSpeed's optimizer section: a schedule for that optimizer, asked of a copy
            return _record_cycles(build_scheduler(optimizer, "jagged_cosine", **schedule))
        return trainer.lr_scheduler

    trainer.create_scheduler = create_scheduler
    _save_merged_models(trainer)
    if trainer.is_deepspeed_enabled:
        # The start-up savings relora_ds.distributed.init_distributed gives the trainer's ranks, for these, which
        # accelerate starts (relora_ds/ds_patches.py, items 5 and 7: torch's compiler imported for DeepSpeed's
        # Muon module; py-cpuinfo asked 3-4 times a rank with the optimizer offloaded, ~0.9 s of CPU each), and
        # item 8's fix: an fp16 step that raises the loss scale trained on half its gradient.
        from .ds_patches import import_muon_compiling_on_first_call, memoize_cpu_info, raise_loss_scale_after_step

        import_muon_compiling_on_first_call()
        memoize_cpu_info()
        raise_loss_scale_after_step()
    ignore_host_buffers_in_ddp(trainer.model)  # the model accelerate hands to DDP, if wrap saw only a part of it
    callback = ReLoRACallback(trainer, cycle_length, merge_every, prune_method, prune_ratio, prune_joint)
    trainer.add_callback(callback)
    return callback


def _one_group_decay(ds_config: dict, weight_decay: float) -> str | None:
    """The warning for a DeepSpeed config whose optimizer section makes transformers hand DeepSpeed every
    trainable parameter in one group (transformers 5's deepspeed_optim_sched: ``DummyOptim(params)``), so that a
    weight decay above 0 ("auto": the Trainer's ``weight_decay``) decays the norms and biases too, which the
    Trainer's own optimizer spares; None otherwise."""
    section = ds_config.get("optimizer")
    if not isinstance(section, dict):
        return None
    decay = (section.get("params") or {}).get("weight_decay")
    decay = weight_decay if decay == "auto" else decay
    if not isinstance(decay, (int, float)) or decay <= 0:
        return None
    return (f"enable_relora: the DeepSpeed config has an 'optimizer' section, so transformers hands DeepSpeed all "
            f"trainable parameters as one group and weight_decay={decay} decays the norms' gains and biases too "
            "(the Trainer's own AdamW spares them, as relora_ds's trainer does); to spare them, remove the "
            "'optimizer' section (the Trainer then builds its AdamW with its decay groups) or set weight_decay 0")


def _deepspeed_config(trainer: Trainer) -> dict:
    """The DeepSpeed config the trainer runs with: given as ``deepspeed=`` in its arguments, or through
    accelerate's config (``accelerate launch --use_deepspeed``); {} without DeepSpeed."""
    ds = getattr(trainer.args, "hf_deepspeed_config", None)
    if ds is None:
        plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
        ds = getattr(plugin, "hf_ds_config", None)
    return getattr(ds, "config", None) or {}


def _save_merged_models(trainer: Trainer) -> None:
    """``trainer.save_model`` (and ``push_to_hub``) write the merged model, plain layers that ``from_pretrained``
    loads; a save of the wrapped state would load with the base weights alone (s·B·A dropped, an int8 base
    not loaded at all) and only a load report saying so. Checkpoints (``_save_checkpoint``) keep the wrapped
    state a resume needs."""
    save_model, save_checkpoint = trainer.save_model, trainer._save_checkpoint
    in_checkpoint = []

    def checkpoint(*args, **kwargs):
        in_checkpoint.append(True)
        try:
            return save_checkpoint(*args, **kwargs)
        finally:
            in_checkpoint.pop()

    def save_merged(output_dir: str | None = None, _internal_call: bool = False) -> None:
        if in_checkpoint:
            return save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir or trainer.args.output_dir
        engine = trainer.model_wrapped if is_deepspeed_engine(trainer.model_wrapped) else None
        if engine is not None and hasattr(getattr(engine.module, "config", None), "to_dict"):
            # every rank: the fp32 masters, ZeRO-3 partitions gathered (before train() there is no engine yet:
            # the model itself, gathered below if zero.Init built it)
            from .hf import export_hf

            # in the dtype the engine trains the model in (a bf16 run: 2 bytes a weight, as transformers saves it)
            dtype = next(p.dtype for p in engine.module.parameters() if p.is_floating_point())
            export_hf(engine, output_dir, dtype=dtype)
        else:
            from .hf import merged_state_dict

            # A module with no transformers config (no copy can be built from one) under an engine: its own
            # weights, ZeRO-3 partitions gathered, as the Trainer saves it (accelerate's get_state_dict).
            model = engine.module if engine is not None else \
                trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
            # every rank: an FSDP2-sharded model is gathered (a collective); the saving rank keeps and writes it
            state = merged_state_dict(model, keep=trainer.args.should_save)
            if trainer.args.should_save and hasattr(model, "save_pretrained"):
                model.save_pretrained(output_dir, state_dict=state)
            elif trainer.args.should_save:  # any nn.Module, as Trainer._save writes one
                from safetensors.torch import save_file

                os.makedirs(output_dir, exist_ok=True)
                save_file(state, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
        if trainer.args.should_save:  # what Trainer._save writes beside the model
            collator_tokenizer = getattr(trainer.data_collator, "tokenizer", None)
            if trainer.processing_class is not None:
                trainer.processing_class.save_pretrained(output_dir)
            elif hasattr(collator_tokenizer, "save_pretrained"):
                collator_tokenizer.save_pretrained(output_dir)
            torch.save(trainer.args, os.path.join(output_dir, "training_args.bin"))
        if trainer.args.push_to_hub and not _internal_call:
            trainer.push_to_hub(commit_message="Model save", revision=trainer.args.hub_revision)

    trainer._save_checkpoint, trainer.save_model = checkpoint, save_merged


def jagged_scheduler(trainer: Trainer) -> LambdaLR | None:
    """The jagged-cosine LambdaLR the run steps (the engine's under DeepSpeed; inside accelerate's wrapper),
    or None when another scheduler is in use."""
    sched = trainer.model_wrapped.lr_scheduler if trainer.is_deepspeed_enabled else None
    sched = trainer.lr_scheduler if sched is None else sched  # the engine steps its own, when it has one
    while sched is not None and not isinstance(sched, LambdaLR) and hasattr(sched, "scheduler"):
        sched = sched.scheduler
    if isinstance(sched, LambdaLR) and getattr(sched.lr_lambdas[0], "func", None) is jagged_cosine:
        return sched
    return None


# trainer_state.json's stateful_callbacks entry holding where the cycles count from (no callback of that name:
# with restore_callback_states_from_checkpoint, transformers logs that it ignores it)
CYCLES_RECORD = "relora_ds_cycles"


def _record_cycles(sched: LambdaLR, cycle_start: int = 0, cycles_before: int = 0) -> LambdaLR:
    """Note on each lr function where its cycles count from, as an attribute: LambdaLR's state_dict keeps a
    callable's ``__dict__`` (not a partial's bound arguments), so the Trainer's and DeepSpeed's checkpoints
    carry it and their load puts the checkpoint's back, which ReLoRACallback.on_train_begin reads when a
    resume changes cycle_length (schedule.cycle_anchor)."""
    for fn in sched.lr_lambdas:
        fn.relora_cycles = {"cycle_length": fn.keywords["cycle_length"], "cycle_start": cycle_start,
                            "cycles_before": cycles_before}
    return sched


def _set_step(sched: LambdaLR, step: int) -> None:
    """Put the schedule at ``step`` (the lr of every param group as LambdaLR computes it there)."""
    sched.last_epoch = step
    for group, lr_lambda, base in zip(sched.optimizer.param_groups, sched.lr_lambdas, sched.base_lrs):
        group["lr"] = base * lr_lambda(step)
    sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]


def _innermost_optimizer(optimizer):
    """The torch optimizer holding the state inside accelerate's and DeepSpeed's wrappers."""
    while hasattr(optimizer, "optimizer") and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


class ReLoRACallback(TrainerCallback):
    """The merge (and at a cycle's end the prune) due after each optimizer step; added by ``enable_relora``."""

    def __init__(self, trainer: Trainer, cycle_length: int, merge_every: int | None, prune_method: str,
                 prune_ratio: float, prune_joint: bool):
        self.trainer = trainer
        self.cycle_length, self.merge_every = cycle_length, merge_every or cycle_length
        self.prune_method, self.prune_ratio, self.prune_joint = prune_method, prune_ratio, prune_joint
        self.events: list[dict] = []
        self.scheduler: LambdaLR | None = None  # found at train begin
        self.moments_checked = False
        self.cycle_start = 0  # where cycles count from: a resume that changed cycle_length moves it
        self.save_failed: list[Exception] = []  # rank 0's recovery scripts' write, held for on_save

    def on_train_begin(self, args, state, control, **kwargs):
        """What the first merge would refuse (bf16 at ZeRO stage 0, LoRA factors outside the engine's optimizer,
        FSDP1), refused before the first step rather than cycle_length steps in; a scheduler other than the jagged
        cosine; and the schedule put at global_step (a checkpoint without scheduler state restarted it)."""
        trainer = self.trainer
        if trainer.is_deepspeed_enabled:
            from .shm_comm import release_shm_segment
            from .zero_reset import check_engine_supported

            # transformers' inference engine: no optimizer, or (transformers 5, ZeRO-3) DeepSpeed's parameter
            # offload object in its place, which has no param groups
            if not hasattr(trainer.model_wrapped.optimizer, "param_groups"):
                raise ValueError("enable_relora: the DeepSpeed engine has no optimizer: it is the inference engine "
                                 "transformers builds for evaluate()/predict() before train() under ZeRO-3; build "
                                 "the Trainer anew, or evaluate after training")
            check_engine_supported(trainer.model_wrapped, "enable_relora")
            if trainer.model_wrapped.zero_optimization_stage() == 3:
                # A resume's load leaves parameters gathered (those below the persistence threshold): the first
                # forward then gathers fewer than its recompute, whose op counts selective activation
                # checkpointing requires to match ("c10d._allgather_base_ ... not found in storage").
                trainer.model_wrapped.empty_partition_cache()
            # DeepSpeed's CPU accelerator leaves a 66 MiB /dev/shm segment per rank behind every run
            # (relora_ds/shm_comm.py); unlinked now (every rank is here: it is collective), the mapping stays.
            release_shm_segment()
            self._replace_recovery_scripts_at_copy(trainer.model_wrapped)
        else:  # accelerate's FSDP1 (fsdp_version 1, its default): refused now, not at the first merge
            check_not_fsdp1(trainer.model_wrapped, "enable_relora")
            # An optimizer built before wrap (optimizers=(opt, None)) never trains the factors: a whole cycle of
            # plain training before the first reset refused it.
            held = {id(p) for g in _innermost_optimizer(trainer.optimizer).param_groups for p in g["params"]}
            outside = [f"{name}.{kind}" for name, layer in relora_layers(trainer.model) for p, kind in
                       ((layer.lora_A, "lora_A"), (layer.lora_B, "lora_B")) if id(p) not in held]
            if outside:
                raise ValueError(f"enable_relora: {len(outside)} LoRA parameters ({outside[0]}, ...) are not "
                                 "in the Trainer's optimizer: an optimizer built before relora_ds.wrap (passed as "
                                 "optimizers=(opt, None)) would never train them; wrap the model first, then build "
                                 "the optimizer, or let the Trainer build it")
        self.scheduler = jagged_scheduler(trainer)
        if self.scheduler is None:
            found = (trainer.model_wrapped.lr_scheduler if trainer.is_deepspeed_enabled else None) or trainer.lr_scheduler
            raise ValueError(f"enable_relora: the run steps a {type(found).__name__}, not ReLoRA's jagged cosine "
                             "(a 'scheduler' section in a DeepSpeed config given through accelerate?): remove it")
        self.moments_checked = False
        if self.scheduler.last_epoch != state.global_step:  # resumed from a checkpoint without scheduler state
            warnings.warn(f"enable_relora: resumed at step {state.global_step} with the schedule at step "
                          f"{self.scheduler.last_epoch} (a checkpoint without scheduler state, e.g. save_only_model="
                          f"True): the jagged cosine continues at step {state.global_step}; optimizer moments the "
                          "checkpoint lacks start from zero", stacklevel=2)
            _set_step(self.scheduler, state.global_step)
        self._anchor_cycles(state, args.seed)

    def _anchor_cycles(self, state, seed: int) -> None:
        """Resumed with another cycle_length than the checkpoint's (its trainer_state.json records it, and its
        scheduler state): the cycles count from the checkpoint's last reset, in the schedule and here, so the next
        reset comes one new cycle after it, not at once or at full lr; where that cycle has already ended, the
        overdue reset is done now and the cycles count from here (schedule.cycle_anchor, as relora_ds's own
        trainer). The record goes into the TrainerState, which every checkpoint writes (save_only_model's too,
        which have no scheduler state: their resume counted the cycles from step 0)."""
        sched, step = self.scheduler, state.global_step
        record = state.stateful_callbacks.get(CYCLES_RECORD) or getattr(sched.lr_lambdas[0], "relora_cycles", None) \
            or {}
        start, before, reset_now = cycle_anchor(
            step, relora_start=0, cycle_length=self.cycle_length, saved_cycle_length=record.get("cycle_length"),
            saved_start=record.get("cycle_start"), saved_before=record.get("cycles_before", 0))
        self.cycle_start = start
        state.stateful_callbacks[CYCLES_RECORD] = {"cycle_length": self.cycle_length, "cycle_start": start,
                                                   "cycles_before": before}
        if start != (sched.lr_lambdas[0].keywords.get("cycle_start") or 0):
            sched.lr_lambdas = [functools.partial(jagged_cosine, **{**fn.keywords, "cycle_start": start})
                                for fn in sched.lr_lambdas]
            _record_cycles(sched, start, before)
            _set_step(sched, step)
        if reset_now:
            logger.warning("relora_ds: cycle_length %s -> %s: the checkpoint's last reset is a whole new cycle or "
                           "more back, so the reset is overdue: it is done now, at step %d, and cycles count from "
                           "here; the next reset is at step %d", record.get("cycle_length"), self.cycle_length, step,
                           step + self.cycle_length)
            # A checkpoint without optimizer state (save_only_model): the moments start fresh, nothing to prune
            fresh = not any(self._optimizer().state.values())
            if not fresh:
                self._check_moments(merging=True)
            self._merge(step, reset=True, seed=seed, overdue=True, prune=not fresh)
        elif start != record.get("cycle_start", 0):
            logger.warning("relora_ds: cycle_length %s -> %s: cycles now count from the reset at step %d, the "
                           "checkpoint's last; the next reset is at step %d", record.get("cycle_length"),
                           self.cycle_length, start, start + self.cycle_length)

    def _check_moments(self, merging: bool) -> None:
        """After each optimizer step until it holds them: the optimizer keeps Adam moments of the LoRA factors,
        which every reset prunes (an Adafactor, SGD or 8-bit optimizer would otherwise fail at the first reset,
        cycle_length steps in, after its merge). Other state is refused at once; no state at all (the first
        steps of an fp16 run, skipped for overflows; or an SGD without momentum) at the latest before the
        first merge."""
        trainer = self.trainer
        engine = trainer.model_wrapped if trainer.is_deepspeed_enabled else None
        optimizer = self._optimizer()
        if engine is not None:  # a group without Adam moments (Muon's), though others have them: refused now
            from .zero_reset import check_adam_groups  # DeepSpeed's internals: imported only under it
            check_adam_groups(engine, "enable_relora")
        # DeepSpeed keeps its state by flat partitions; the torch optimizer by parameter: the factors' own
        states = list(optimizer.state.values()) if engine is not None else \
            [optimizer.state.get(p, {}) for p in lora_parameters(trainer.model)]
        if any(all(k in st for k in MOMENT_KEYS) for st in states):
            self.moments_checked = True
            return
        kept = next((sorted(st) for st in states if st), None)
        if kept is not None or merging:
            raise ValueError(f"enable_relora: the optimizer ({type(optimizer).__name__}) keeps "
                             f"{kept or 'no state'} for the LoRA factors, not the Adam moments {list(MOMENT_KEYS)} "
                             "that ReLoRA prunes at each reset: use an Adam/AdamW optimizer (optim='adamw_torch', "
                             "'adamw_torch_fused', or DeepSpeed's AdamW)")

    def _optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer inside accelerate's wrapper or DeepSpeed's engine (its state by flat partition)."""
        trainer = self.trainer
        wrapped = trainer.model_wrapped.optimizer if trainer.is_deepspeed_enabled else trainer.optimizer
        return _innermost_optimizer(wrapped)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        merge, reset = events_due(step - self.cycle_start, self.cycle_length, self.merge_every)
        if not self.moments_checked:
            self._check_moments(merging=merge)
        if self.scheduler is not None and self.scheduler.last_epoch != step:  # an fp16 step skipped for an
            # overflow did not step the schedule
            _set_step(self.scheduler, step)
        if merge:
            self._merge(step, reset, args.seed)

    def _replace_recovery_scripts_at_copy(self, engine) -> None:
        """DeepSpeed's rank 0 copies its recovery scripts into each checkpoint-N/ it saves, whose state dict is not
        the trained model: in their place, as it copies them, one that exits 1 and says what exports it
        (relora_ds/recovery.py). At the copy, not at on_save: the Trainer pushes a checkpoint to the Hub
        (push_to_hub, hub_strategy 'checkpoint'/'all_checkpoints') before the callbacks hear of the save. A
        failure is held until on_save, where every rank hears of it: raised inside DeepSpeed's save it would leave
        the other ranks in its closing barrier, raised at rank 0's on_save alone in the next step's collectives."""
        from .recovery import replace_recovery_scripts

        self.save_failed = []
        real = type(engine)._copy_recovery_script.__get__(engine)  # the class's: a second train() wraps it once

        def copy_then_replace(save_path):
            if self.save_failed:
                return
            try:
                real(save_path)
                replace_recovery_scripts(save_path, engine, hf_trainer=True)
            except Exception as e:  # every error: the other ranks must hear of it (on_save)
                self.save_failed.append(e)

        engine._copy_recovery_script = copy_then_replace

    def on_save(self, args, state, control, **kwargs):
        """Every rank, after a checkpoint: stop every rank if rank 0's copy of the recovery scripts failed (the
        failing rank raises its error, the others a RuntimeError naming it)."""
        if not self.trainer.is_deepspeed_enabled:
            return
        from .distributed import failed_ranks

        failed, checkpoint = failed_ranks(bool(self.save_failed)), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if self.save_failed:
            error, self.save_failed = self.save_failed[0], []
            raise RuntimeError(f"enable_relora: saving {checkpoint}: writing its recovery scripts (zero_to_fp32.py, "
                               f"zero_to_torch.py) failed: {error}") from error
        if failed:
            raise RuntimeError(f"enable_relora: saving {checkpoint}: rank {failed[0]} failed writing its recovery "
                               "scripts (its error is in its output)")

    def _merge(self, step: int, reset: bool, seed: int, overdue: bool = False, prune: bool = True) -> None:
        """The merge after global step ``step``, and with ``reset`` the prune (``prune=False``: the optimizer
        holds no state to prune); recorded in ``self.events``."""
        trainer = self.trainer
        engine = trainer.model_wrapped if trainer.is_deepspeed_enabled else None
        # under DDP its module: the merge gives every rank rank 0's host residuals first, which DDP does not sync
        ddp = isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
        event = {"step": step, **merge_and_reinit(engine if engine is not None else
                                                  trainer.model_wrapped if ddp else trainer.model)}
        if reset and not prune:
            event.update(reset=True, prune_skipped="the optimizer holds no state yet (a checkpoint without it)")
        elif reset:
            if engine is not None:
                target, params = engine, lora_parameters(engine.module)
            else:  # accelerate's AcceleratedOptimizer around the torch one
                target, params = _innermost_optimizer(trainer.optimizer), lora_parameters(trainer.model)
            # Each reset its own seed (a 'random' prune must not reuse a mask; a resumed run draws the same).
            event.update(prune_optimizer_state(target, params, method=self.prune_method, ratio=self.prune_ratio,
                                               seed=seed + step, joint=self.prune_joint), reset=True)
        event["event"] = "reset" if event.get("reset") else "merge"
        if overdue:
            event["overdue"] = True
        self.events.append(event)
        logger.info("relora_ds: %s after step %d (%d layers)", event["event"], step, event["layers"])
