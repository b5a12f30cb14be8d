"""Learning-rate schedules as pure functions of the step, bound into ``LambdaLR`` (nanoGPT's get_lr style).

The jagged cosine (paper Fig. 2, the reference implementation's cosine with multiple warmups): a linear
warmup, one global cosine from 1 to ``min_lr_ratio``, and at every optimizer reset a drop to 0 followed
by a linear ramp over ``restart_warmup_steps`` back onto the global cosine.
"""
from __future__ import annotations

import functools
import math
import typing

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from .model_config import _is_int

if typing.TYPE_CHECKING:
    from .train_config import TrainConfig


def _check(total_steps: int, warmup_steps: int, min_lr_ratio: float) -> None:
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be positive")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps})")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1]")


def cosine_with_warmup(step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup from 0, then cosine from 1 to ``min_lr_ratio`` at ``total_steps`` (held after)."""
    _check(total_steps, warmup_steps, min_lr_ratio)
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_with_warmup(step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup from 0, then linear decay from 1 to ``min_lr_ratio`` at ``total_steps``."""
    _check(total_steps, warmup_steps, min_lr_ratio)
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - (1.0 - min_lr_ratio) * progress


def jagged_cosine(step: int, *, total_steps: int, warmup_steps: int, cycle_length: int,
                  restart_warmup_steps: int, min_lr_ratio: float = 0.1, start_step: int = 0,
                  cycle_start: int | None = None) -> float:
    """LR multiplier of ReLoRA's jagged cosine at optimizer step ``step`` (0-based, as LambdaLR counts).

    Resets happen at ``start_step + k·cycle_length`` for k ≥ 1, and also at ``start_step`` itself when it
    is > 0 (the switch from a full-rank warm start to ReLoRA starts a fresh optimizer). At a reset step
    the multiplier is 0 and ramps linearly to the global cosine's value at the end of the ramp (with
    ``restart_warmup_steps`` 0: no ramp, the plain cosine).
    ``cycle_start``: a reset at or after ``start_step`` the cycles count from instead (a resume that changed
    cycle_length: schedule.cycle_anchor); steps before it are past and follow the plain cosine here.
    """
    _check(total_steps, warmup_steps, min_lr_ratio)
    if cycle_length <= 0:
        raise ValueError(f"cycle_length={cycle_length} must be positive (steps between optimizer resets)")
    if not 0 <= restart_warmup_steps <= cycle_length:  # 0: no re-warmup, the lr jumps back after a reset
        raise ValueError(f"restart_warmup_steps={restart_warmup_steps} must be in [0, cycle_length={cycle_length}]")
    anchor = start_step if cycle_start is None else cycle_start
    # after a warm start the warmup is long over; a resume that changed cycle_length counts from its last reset
    if start_step == 0 and warmup_steps > anchor + cycle_length:
        raise ValueError(f"warmup_steps={warmup_steps} is longer than a cycle (cycle_length={cycle_length}): "
                         f"the first reset (step {anchor + cycle_length}) would interrupt the warmup")
    if start_step < 0 or 0 < start_step < warmup_steps:
        raise ValueError(f"start_step={start_step} (the warm start's length) must be 0 or at least warmup_steps="
                         f"{warmup_steps}: the first warmup must end before the switch to the low-rank phase")
    cosine = functools.partial(cosine_with_warmup, total_steps=total_steps, warmup_steps=warmup_steps,
                               min_lr_ratio=min_lr_ratio)
    if step < warmup_steps or step < start_step or step < anchor:
        return cosine(step)
    cycle, in_cycle = divmod(step - anchor, cycle_length)
    if (cycle > 0 or anchor > 0) and in_cycle < restart_warmup_steps:
        return in_cycle / restart_warmup_steps * cosine(step - in_cycle + restart_warmup_steps)
    return cosine(step)


class CycleAnchor(typing.NamedTuple):
    start: int  # the reset step the cycles of cycle_length count from
    cycles_before: int  # cycles ended there
    reset_now: bool  # that reset is the resume step's own, not yet done: do it before the next step


def cycle_anchor(step: int, *, relora_start: int, cycle_length: int | None, saved_cycle_length: int | None,
                 saved_start: int | None = None, saved_before: int = 0) -> CycleAnchor:
    """Where the cycles of a run resumed at ``step`` count from (:class:`CycleAnchor`). The checkpoint's cycles
    (``saved_cycle_length``) started at ``saved_start`` (None: the switch to ReLoRA, ``relora_start``) with
    ``saved_before`` cycles before them. With the same length nothing moves. With another, the new length
    counts from the checkpoint's last reset at or before ``step``, so the next reset comes one new cycle after
    it with the lr's restart warmup after the last one intact. Counted from the switch instead, the next reset
    could come at once, without the restart warmup after the one just done (cycle 10 -> 15 at step 21: lr
    1.3e-3 at the step after a 99% prune, and the next reset 4 steps on). Where that new cycle has already
    ended (a shorter cycle, ``step`` a whole new cycle or more after the last reset), the overdue reset is
    ``step``'s own: ``reset_now``, and the cycles count from ``step`` (left at the last reset, the schedule
    would drop the lr to 0 and ramp at the missed boundaries, with no merge or prune behind them).
    ``saved_cycle_length=math.inf``: the checkpoint trained plain LoRA (mode lora), no reset since the switch;
    resumed as ReLoRA, the switch is its last reset."""
    start = relora_start if saved_start is None else saved_start
    if not cycle_length or not saved_cycle_length or saved_cycle_length == cycle_length or step <= start:
        return CycleAnchor(start, saved_before, False)
    lora = saved_cycle_length == math.inf
    done = 0 if lora else (step - start) // saved_cycle_length
    last = start if lora else last_reset(step, start, saved_cycle_length)
    if step - last >= cycle_length:
        return CycleAnchor(step, saved_before + done + 1, True)
    return CycleAnchor(last, saved_before + done, False)


def last_reset(step: int, start: int, cycle_length: int) -> int:
    """The last reset at or before ``step`` of cycles of ``cycle_length`` counted from ``start``."""
    return start + (step - start) // cycle_length * cycle_length


def restarted_at(step: int, *, start_step: int, first, second) -> float:
    """``first(step)`` before ``start_step``, then ``second`` counted from 0 there: the reference
    implementation's two runs (a full-rank warm start, then a ReLoRA run whose own schedule starts over)."""
    return first(step) if step < start_step else second(step - start_step)


SCHEDULES = {"jagged_cosine": jagged_cosine, "cosine": cosine_with_warmup, "linear": linear_with_warmup}


def build_scheduler(optimizer: Optimizer, name: str = "jagged_cosine", **kwargs) -> LambdaLR:
    """``LambdaLR`` over one of SCHEDULES with its keyword arguments bound (validated right away)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {sorted(SCHEDULES)}")
    for key in ("total_steps", "warmup_steps", "cycle_length", "restart_warmup_steps", "start_step", "cycle_start"):
        value = kwargs.get(key)  # a float would put resets and the warmup's end between steps, never reached
        if value is not None and not _is_int(value):
            raise ValueError(f"build_scheduler: {key}={value!r} must be a whole number of optimizer steps")
    fn = functools.partial(SCHEDULES[name], **kwargs)
    fn(0)  # raise ValueError on a bad combination now, not at the first step
    return LambdaLR(optimizer, fn)


def total_steps_for(cfg: TrainConfig, progress: dict | None = None) -> int:
    """The run's optimizer steps: total_steps, or the steps of token_budget at this run's global batch; a
    resumed token-budget run (``progress``: the checkpoint's ``{"step", "tokens_seen"}``,
    resume_plan.resume_progress) trains what is left of the budget at this run's batch, which may differ from
    the checkpoint's."""
    if cfg.total_steps:
        return cfg.total_steps
    per_step = cfg.global_batch_size * cfg.seq_len
    if progress is None:
        return math.ceil(cfg.token_budget / per_step)
    return int(progress["step"]) + math.ceil(max(0, cfg.token_budget - int(progress["tokens_seen"])) / per_step)


def schedule_problems(*, total_steps: int, warm_start_steps: int, warmup_steps: int, mode: str,
                      cycle_length: int | None, lowrank_schedule: str, merge_every: int | None = None,
                      token_budget: int | None = None, cycle_start: int | None = None,
                      resuming: bool = False) -> tuple[list[tuple], list[str]]:
    """A run's schedule settings against each other, as the trainer's schedule (relora_ds.startup.build_schedule)
    will call the functions above: ``(problems, warnings)``, every problem at once, each ``(message, the
    settings it names)`` with the change that fixes it. The settings' own ranges are checked before this.
    ``cycle_start``: the reset the cycles count from (cycle_anchor; default the switch to the low-rank phase);
    ``resuming`` without it: whether the first reset interrupts the warmup is left to the resume, which knows
    the checkpoint's last reset (a resume past the warmup with a cycle shorter than it is no problem)."""
    total, start, warmup = total_steps, warm_start_steps, warmup_steps
    # the reset the cycles count from, in the steps of the phase whose warmup the next one could interrupt
    anchor = None if resuming and cycle_start is None else \
        (start if cycle_start is None else cycle_start) - (start if lowrank_schedule == "restart" else 0)
    problems, warned = [], []
    # total_steps from token_budget: say so, and name the setting the user gave
    total_is = f"total_steps={total}" + (f" (token_budget={token_budget}'s)" if token_budget else "")
    raise_total = "raise token_budget (--token-budget)" if token_budget else "raise total_steps (--total-steps)"
    if mode != "full" and start >= total:
        problems.append((f"warm_start_steps={start} leaves no low-rank steps of {total_is}: lower "
                         f"warm_start_steps (--warm-start-steps) or {raise_total}",
                         ("warm_start_steps", "total_steps")))
    if warmup >= total:
        problems.append((f"warmup_steps={warmup} must be below {total_is}: lower warmup_steps "
                         f"(--warmup-steps) or {raise_total}", ("warmup_steps", "total_steps")))
    if mode == "full" or problems:  # below: the warmup against the phases, once both fit the run
        return problems, warned
    lowrank = total - start
    cycle = cycle_length if mode == "relora" else total  # lora: one "cycle" spanning the run
    if lowrank_schedule == "restart" and start:  # the low-rank phase warms up again, over its own steps
        if warmup >= lowrank:
            problems.append((f"warmup_steps={warmup} must be below the low-rank phase's {lowrank} steps "
                             f"(total_steps={total} - warm_start_steps={start}): lowrank_schedule='restart' "
                             "warms up again after the switch; lower warmup_steps or warm_start_steps, or raise "
                             "total_steps", ("warmup_steps",)))
        elif anchor is not None and warmup > anchor + cycle:
            problems.append((f"warmup_steps={warmup} is longer than a cycle (cycle_length={cycle}): "
                             "lowrank_schedule='restart' warms up again after the switch, and the first reset "
                             "would interrupt that warmup; lower warmup_steps or raise cycle_length",
                             ("warmup_steps",)))
    elif start == 0 and anchor is not None and warmup > anchor + cycle:
        problems.append((f"warmup_steps={warmup} is longer than a cycle (cycle_length={cycle}): the first reset "
                         "would interrupt the warmup; lower warmup_steps or raise cycle_length", ("warmup_steps",)))
    elif 0 < start < warmup:
        problems.append((f"warm_start_steps={start} must be 0 or at least warmup_steps={warmup}: the first "
                         "warmup must end before the switch to the low-rank phase; raise warm_start_steps or "
                         "lower warmup_steps", ("warm_start_steps", "warmup_steps")))
    if mode == "relora" and cycle >= lowrank:
        longer = (f"cycle_length={cycle} is not shorter than the low-rank phase ({lowrank} steps: total_steps="
                  f"{total} - warm_start_steps={start}): ")
        warned.append(longer + (f"no reset happens before the last step, so the merges every merge_every="
                                f"{merge_every} steps are never followed by an optimizer prune or a restart warmup "
                                "(set a smaller cycle_length, e.g. the paper's ~1/8 of the run)"
                                if merge_every and merge_every < lowrank else
                                "no ReLoRA reset happens before the last step, so this run trains as plain LoRA (set "
                                "a smaller cycle_length, e.g. the paper's ~1/8 of the run, or mode lora)"))
    return problems, warned
