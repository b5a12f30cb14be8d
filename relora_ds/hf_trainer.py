"""ReLoRA inside Hugging Face's ``transformers.Trainer`` (and its subclasses, e.g. TRL's), with or without
DeepSpeed: the schedule becomes the jagged cosine, and after every ``merge_every``-th optimizer step the
ReLoRA layers merge and re-initialize; every ``cycle_length``-th step also prunes their Adam moments (a reset).

    model = relora_ds.wrap(AutoModelForCausalLM.from_config(config), rank=128)
    trainer = Trainer(model=model, args=TrainingArguments(..., deepspeed="ds_configs/zero2.json"), ...)
    relora_ds.hf_trainer.enable_relora(trainer, cycle_length=5000, restart_warmup_steps=100)
    trainer.train()

Under DeepSpeed the merge and prune run on the engine (``trainer.model_wrapped``): its fp32 masters and ZeRO
partitions of the moments, exactly as ``launch/train.py`` does (``relora_ds/reset_hook.py``). The peak lr is
``args.learning_rate``, the first warmup ``args.warmup_steps`` (or ``warmup_ratio``); ``lr_scheduler_type`` is
replaced. Steps count from the Trainer's ``global_step`` (optimizer steps), so a run resumed from a Trainer
checkpoint merges and resets at the steps the uninterrupted run does (``merge_count`` is a saved buffer, and
the scheduler's step count is saved with the checkpoint). With fp16 loss scaling, a step skipped for an
overflow does not step the scheduler while global_step still counts it, so each later re-warm-up starts that
many steps after its reset: train in bf16 (launch/train.py keeps the schedule on the step instead).
"""
from __future__ import annotations

import logging

from transformers import Trainer, TrainerCallback

from .merge import merge_and_reinit
from .prune import check_prune_args, prune_optimizer_state
from .relora import lora_parameters, relora_layers
from .schedule import build_scheduler

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
    ds = getattr(trainer.args, "hf_deepspeed_config", None)
    if ds is not None and "scheduler" in ds.config:
        raise ValueError("enable_relora: the DeepSpeed config has a 'scheduler' section, which would replace "
                         "ReLoRA's jagged cosine (the lr re-warms after each reset): remove it")

    def create_scheduler(num_training_steps: int, optimizer=None):
        """Trainer.create_scheduler with the jagged cosine. DeepSpeed with its own optimizer section asks a copy
        of the trainer for a schedule over that optimizer (``optimizer`` given): a new one each time."""
        schedule = dict(total_steps=num_training_steps, cycle_length=cycle_length,
                        warmup_steps=trainer.args.get_warmup_steps(num_training_steps),
                        restart_warmup_steps=restart_warmup_steps, min_lr_ratio=min_lr_ratio)
        if trainer.lr_scheduler is None:  # transformers' contract (4.x passes its own optimizer here)
            trainer.lr_scheduler = build_scheduler(optimizer if optimizer is not None else trainer.optimizer,
                                                   "jagged_cosine", **schedule)
            trainer._created_lr_scheduler = True
            return trainer.lr_scheduler
        if optimizer is not None:  # DeepSpeed's optimizer section: a schedule for that optimizer, asked of a copy
            return build_scheduler(optimizer, "jagged_cosine", **schedule)
        return trainer.lr_scheduler

    trainer.create_scheduler = create_scheduler
    callback = ReLoRACallback(trainer, cycle_length, merge_every, prune_method, prune_ratio, prune_joint)
    trainer.add_callback(callback)
    return callback


class ReLoRACallback(TrainerCallback):
    """The merge (and at a cycle's end the prune) due after each optimizer step; added by ``enable_relora``."""

    def __init__(self, trainer: Trainer, cycle_length: int, merge_every: int | None, prune_method: str,
                 prune_ratio: float, prune_joint: bool):
        self.trainer = trainer
        self.cycle_length, self.merge_every = cycle_length, merge_every or cycle_length
        self.prune_method, self.prune_ratio, self.prune_joint = prune_method, prune_ratio, prune_joint
        self.events: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        """What the first merge would refuse (bf16 at ZeRO stage 0, LoRA factors outside the engine's optimizer),
        refused before the first step rather than cycle_length steps in."""
        if self.trainer.is_deepspeed_enabled:
            from .distributed import release_shm_segment
            from .zero_reset import check_engine_supported

            check_engine_supported(self.trainer.model_wrapped, "enable_relora")
            # DeepSpeed's CPU accelerator leaves a 64 MB /dev/shm segment per rank behind every run
            # (relora_ds.distributed); unlinked now (every rank is here: it is collective), the mapping stays.
            release_shm_segment()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.merge_every:
            return
        trainer = self.trainer
        engine = trainer.model_wrapped if trainer.is_deepspeed_enabled else None
        event = {"step": step, **merge_and_reinit(engine if engine is not None else trainer.model)}
        if step % self.cycle_length == 0:
            if engine is not None:
                target, params = engine, lora_parameters(engine.module)
            else:  # accelerate's AcceleratedOptimizer around the torch one
                target, params = getattr(trainer.optimizer, "optimizer", trainer.optimizer), \
                    lora_parameters(trainer.model)
            # Each reset its own seed (a 'random' prune must not reuse a mask; a resumed run draws the same).
            event.update(prune_optimizer_state(target, params, method=self.prune_method, ratio=self.prune_ratio,
                                               seed=args.seed + step, joint=self.prune_joint), reset=True)
        event["event"] = "reset" if event.get("reset") else "merge"
        self.events.append(event)
        logger.info("relora_ds: %s after step %d (%d layers)", event["event"], step, event["layers"])
