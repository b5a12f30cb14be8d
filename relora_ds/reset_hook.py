"""ReLoRA's hook after each optimizer step: merge ``W += s·B·A`` (and re-initialize A, B) every
``merge_every`` steps, and at each cycle's end also prune the LoRA parameters' Adam moments (a "reset").

Both count from the switch to ReLoRA (the end of the warm start), never at the switch itself: the fresh
engine built there is the first cycle's start; after a resume that changed cycle_length, from the
checkpoint's last reset (schedule.cycle_anchor, recorded in each checkpoint). Which steps merge and which
reset depends on the step, the config and that anchor alone (so a resumed run does what an uninterrupted one
does); the trainer logs the record returned.
"""
from __future__ import annotations

from .merge import merge_and_reinit
from .prune import prune_optimizer_state
from .relora import lora_parameters


def events_due(since: int, cycle_length: int, merge_every: int | None) -> tuple[bool, bool]:
    """``(merge, reset)`` due ``since`` steps after the cycles' anchor (the switch, or the checkpoint's last
    reset): a merge every ``merge_every`` steps (default: at each cycle's end), a reset (a merge and a prune)
    at each cycle's end; nothing at the anchor itself."""
    if since <= 0:
        return False, False
    return since % (merge_every or cycle_length) == 0, since % cycle_length == 0


def after_step(engine, step: int, cfg, cycle_start: int) -> dict | None:
    """The merge or reset due after global step `step` (already counted), done on `engine`; returns its
    record for the metrics log (``{"event": "merge" | "reset", "step": step, ...}``) or None. `cycle_start`:
    the step the cycles count from, the switch to ReLoRA or, after a resume that changed cycle_length, the
    checkpoint's last reset (schedule.cycle_anchor).

    `cfg`: the TrainConfig (mode, cycle_length, merge_every, prune_method, prune_ratio, prune_joint, seed).
    Called on the low-rank engine only. A reset happens at the last step too: the final checkpoint is then
    the one a longer run writes at that step, so resuming it with a larger total_steps continues exactly
    (its merge rounds s·B·A into a bf16 or int8 base like every merge; in fp32 the function is unchanged).
    """
    if cfg.mode != "relora":
        return None
    merge, reset = events_due(step - cycle_start, cfg.cycle_length, cfg.merge_every)
    event = {}
    if merge:
        event.update(merge_and_reinit(engine))
    if reset and engine.global_steps == engine.skipped_steps:
        # fp16 overflows skipped every update since the switch: Adam has no moments yet, nothing to prune
        event.update(reset=True, prune_skipped="no optimizer update since the switch (fp16 overflows)")
    elif reset:
        # Each reset its own seed (a `random` prune must not reuse one mask; a resumed run draws the same).
        event.update(prune_optimizer_state(engine, lora_parameters(engine.module), method=cfg.prune_method,
                                           ratio=cfg.prune_ratio, seed=cfg.seed + step, joint=cfg.prune_joint))
        event["reset"] = True
    if not event:
        return None
    return {"event": "reset" if event.get("reset") else "merge", "step": step, **event}
