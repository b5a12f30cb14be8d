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
    since = step - cycle_start
    if cfg.mode != "relora" or since <= 0:
        return None
    event = {}
    if since % (cfg.merge_every or cfg.cycle_length) == 0:
        event.update(merge_and_reinit(engine))
    if since % cfg.cycle_length == 0 and engine.global_steps == engine.skipped_steps:
        # fp16 overflows skipped every update since the switch: Adam has no moments yet, nothing to prune
        event.update(reset=True, prune_skipped="no optimizer update since the switch (fp16 overflows)")
    elif since % cfg.cycle_length == 0:
        # Each reset its own seed (a `random` prune must not reuse one mask; a resumed run draws the same).
        event.update(prune_optimizer_state(engine, lora_parameters(engine.module), method=cfg.prune_method,
                                           ratio=cfg.prune_ratio, seed=cfg.seed + step, joint=cfg.prune_joint))
        event["reset"] = True
    if not event:
        return None
    return {"event": "reset" if event.get("reset") else "merge", "step": step, **event}
