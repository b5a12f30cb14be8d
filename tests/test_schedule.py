"""Jagged cosine against hand-computed values (paper Fig. 2 / the reference implementation)."""
import math

import pytest
import torch

from relora_ds import build_scheduler, cosine_with_warmup, jagged_cosine, linear_with_warmup

KW = dict(total_steps=1000, warmup_steps=100, cycle_length=300, restart_warmup_steps=50, min_lr_ratio=0.1)


def _cos(step):  # global cosine by hand: 0.1 + 0.9 * 0.5 * (1 + cos(pi * (step - 100) / 900))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - 100) / 900))


def test_warmup_cosine_resets_and_end():
    assert jagged_cosine(0, **KW) == 0.0
    assert jagged_cosine(50, **KW) == pytest.approx(0.5)
    assert jagged_cosine(100, **KW) == pytest.approx(1.0)
    assert jagged_cosine(299, **KW) == pytest.approx(_cos(299))
    assert jagged_cosine(300, **KW) == 0.0  # reset: drop to zero
    assert jagged_cosine(325, **KW) == pytest.approx(0.5 * _cos(350))  # halfway up the restart ramp
    assert jagged_cosine(349, **KW) == pytest.approx(49 / 50 * _cos(350))
    assert jagged_cosine(350, **KW) == pytest.approx(_cos(350))  # back on the global cosine
    assert jagged_cosine(600, **KW) == 0.0 and jagged_cosine(900, **KW) == 0.0
    assert jagged_cosine(1000, **KW) == pytest.approx(0.1)
    assert jagged_cosine(999, **KW) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 899 / 900)))


def test_start_step_offsets_resets_and_warm_start_switch_is_a_reset():
    kw = {**KW, "start_step": 150}
    assert jagged_cosine(120, **kw) == pytest.approx(_cos(120))  # still the warm start
    assert jagged_cosine(150, **kw) == 0.0  # the switch to ReLoRA is a reset
    assert jagged_cosine(175, **kw) == pytest.approx(0.5 * _cos(200))
    assert jagged_cosine(300, **kw) == pytest.approx(_cos(300))  # no reset at 300 any more
    assert jagged_cosine(450, **kw) == 0.0


def test_baselines():
    assert cosine_with_warmup(10, total_steps=100, warmup_steps=20) == pytest.approx(0.5)
    assert cosine_with_warmup(60, total_steps=100, warmup_steps=20, min_lr_ratio=0.0) == pytest.approx(0.5)
    assert linear_with_warmup(60, total_steps=100, warmup_steps=20) == pytest.approx(0.5)
    assert linear_with_warmup(100, total_steps=100, warmup_steps=20, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_lambdalr_follows_the_pure_function():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, "jagged_cosine", **KW)
    lrs = []
    for _ in range(400):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.0 * jagged_cosine(s, **KW) for s in range(400)])


def test_harmless_settings_are_accepted():
    """No re-warmup (the lr jumps back to the cosine after a reset), and a first warmup longer than a cycle
    when a warm start of at least that length comes first (the reference's 250M: warmup 600, cycle 500)."""
    kw = {**KW, "restart_warmup_steps": 0}
    reset = KW["cycle_length"]
    assert jagged_cosine(reset, **kw) == pytest.approx(cosine_with_warmup(
        reset, total_steps=KW["total_steps"], warmup_steps=KW["warmup_steps"], min_lr_ratio=KW.get("min_lr_ratio", 0.1)))
    kw = dict(total_steps=20000, warmup_steps=600, cycle_length=500, restart_warmup_steps=100, start_step=5000)
    assert jagged_cosine(5000, **kw) == 0.0 and jagged_cosine(5050, **kw) > 0
    with pytest.raises(ValueError, match="longer than a cycle"):
        jagged_cosine(0, **{**kw, "start_step": 0})


@pytest.mark.parametrize("bad, match", [
    (dict(cycle_length=0), "cycle_length=0"),
    (dict(warmup_steps=400), "longer than a cycle"),
    (dict(restart_warmup_steps=301), "restart_warmup_steps=301"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (dict(start_step=50), "start_step=50"),
])
def test_invalid_combinations_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        jagged_cosine(0, **{**KW, **bad})
    with pytest.raises(ValueError, match=match):
        build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), **{**KW, **bad})


@pytest.mark.parametrize("key, value", [("total_steps", 1000.5), ("cycle_length", 300.0), ("warmup_steps", True),
                                        ("restart_warmup_steps", "50")])
def test_a_step_count_that_is_no_whole_number_is_refused(key, value):
    """A float total_steps=1000.5 (or a whole-valued 300.0, a bool, a string) was taken: resets and the warmup's
    end then fall between steps. numpy's integers are whole numbers."""
    import numpy as np

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=rf"build_scheduler: {key}={value!r} must be a whole number of optimizer"):
        build_scheduler(opt, **{**KW, key: value})
    build_scheduler(opt, **{**KW, "total_steps": np.int64(1000)})


def _reference_multiple_warmups(step, *, num_training_steps, first_warmup_steps, restart_warmup_steps,
                                restart_every, min_lr_ratio):
    """Guitaricet/relora's peft_pretraining/training_utils.py `_get_cosine_schedule_with_multiple_warmups_lambda`
    (adjust_step 0), transcribed: the oracle for a ReLoRA run whose schedule starts at its own step 0."""
    if step < first_warmup_steps:
        return step / max(1, first_warmup_steps)
    restart_step, restart_number = step % restart_every, step // restart_every
    if restart_step < restart_warmup_steps and step >= restart_every:
        end_of_warmup_progress = (restart_number * restart_every + restart_warmup_steps - first_warmup_steps) / \
            max(1, num_training_steps - first_warmup_steps)
        decay = 0.5 * (1 + math.cos(math.pi * end_of_warmup_progress))
        return restart_step / max(1, restart_warmup_steps) * (min_lr_ratio + (1 - min_lr_ratio) * decay)
    progress = (step - first_warmup_steps) / max(1, num_training_steps - first_warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("lowrank_schedule", ["continue", "restart"])
def test_trainer_schedule_after_a_warm_start_matches_the_reference(lowrank_schedule):
    """The paper recipes' shape at 1/10 scale: total 2000, warm start 500, warmup 50, cycle 500, re-warmup 10.
    `restart` is the reference's second run (its own warmup, a cosine over the remaining 1500 steps);
    `continue` ramps back onto the one cosine of the whole run. Without a warm start they are the same."""
    from relora_ds.startup import build_schedule
    from relora_ds.train_config import TrainConfig

    cfg = TrainConfig(mode="relora", total_steps=2000, warmup_steps=50, warm_start_steps=500, warm_start_lr=5e-4,
                      cycle_length=500, restart_warmup_steps=10, min_lr_ratio=0.1, lowrank_schedule=lowrank_schedule)
    sched = build_schedule(cfg, 2000)
    full = [cosine_with_warmup(s, total_steps=2000, warmup_steps=50) for s in range(500)]
    assert [sched(s) for s in range(500)] == pytest.approx(full, abs=1e-12)  # the warm start: unchanged
    if lowrank_schedule == "restart":
        want = [_reference_multiple_warmups(s, num_training_steps=1500, first_warmup_steps=50, restart_warmup_steps=10,
                                            restart_every=500, min_lr_ratio=0.1) for s in range(1500)]
        assert sched(525) == pytest.approx(0.5)  # halfway up the fresh 50-step warmup
    else:
        want = [jagged_cosine(s, total_steps=2000, warmup_steps=50, cycle_length=500, restart_warmup_steps=10,
                              start_step=500) for s in range(500, 2000)]
        assert sched(510) == pytest.approx(_cos_at(510, total=2000, warmup=50))  # back on the run's cosine
        # by hand, not through jagged_cosine: halfway up the ramp after the reset at 1000, half the cosine where
        # the ramp ends; past the ramp, the run's own cosine
        assert sched(1005) == pytest.approx(0.5 * _cos_at(1010, total=2000, warmup=50))
        assert sched(1200) == pytest.approx(_cos_at(1200, total=2000, warmup=50))
    assert [sched(s) for s in range(500, 2000)] == pytest.approx(want, abs=1e-12)
    assert sched(500) == sched(1000) == sched(1500) == 0.0  # the switch and both resets
    no_warm = TrainConfig(mode="relora", total_steps=2000, warmup_steps=50, cycle_length=500, restart_warmup_steps=10,
                          lowrank_schedule=lowrank_schedule)
    plain = build_schedule(no_warm, 2000)
    assert [plain(s) for s in range(2000)] == pytest.approx(
        [_reference_multiple_warmups(s, num_training_steps=2000, first_warmup_steps=50, restart_warmup_steps=10,
                                     restart_every=500, min_lr_ratio=0.1) for s in range(2000)], abs=1e-12)


def _cos_at(step, *, total, warmup):
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_lr_is_held_at_the_floor_after_total_steps_and_no_warmup_starts_at_the_peak():
    for fn in (cosine_with_warmup, linear_with_warmup):
        assert fn(1000, total_steps=1000, warmup_steps=100, min_lr_ratio=0.25) == pytest.approx(0.25)
        assert fn(1500, total_steps=1000, warmup_steps=100, min_lr_ratio=0.25) == pytest.approx(0.25)  # held
        assert fn(0, total_steps=100, warmup_steps=0) == 1.0  # no warmup: the peak from the first step
        assert fn(99, total_steps=1000, warmup_steps=100) == pytest.approx(0.99)
        assert fn(100, total_steps=1000, warmup_steps=100) == 1.0  # the warmup ends exactly at the peak
        with pytest.raises(ValueError, match=r"warmup_steps=100 must be in \[0, total_steps=100\)"):
            fn(0, total_steps=100, warmup_steps=100)
    assert jagged_cosine(1100, **KW) == pytest.approx(0.1)  # past the end (1100 = 3 x 300 + 200: no re-warmup)


def _cos_tw(step, total=1000, warmup=100):
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_warmup_as_long_as_a_cycle_is_accepted():
    kw = dict(total_steps=1000, warmup_steps=300, cycle_length=300, restart_warmup_steps=50, min_lr_ratio=0.1)
    assert jagged_cosine(150, **kw) == pytest.approx(0.5)  # the first warmup, uninterrupted
    assert jagged_cosine(299, **kw) == pytest.approx(299 / 300)
    assert jagged_cosine(300, **kw) == 0.0  # the first reset, right where the warmup ends
    assert jagged_cosine(325, **kw) == pytest.approx(0.5 * _cos_tw(350, warmup=300))
    build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), **kw)


def test_restart_warmup_as_long_as_a_cycle_ramps_over_the_whole_cycle():
    kw = dict(total_steps=1000, warmup_steps=100, cycle_length=300, restart_warmup_steps=300, min_lr_ratio=0.1)
    assert jagged_cosine(300, **kw) == 0.0
    assert jagged_cosine(450, **kw) == pytest.approx(0.5 * _cos_tw(600))  # halfway up, aiming at the next reset's value
    assert jagged_cosine(599, **kw) == pytest.approx(299 / 300 * _cos_tw(600))
    assert jagged_cosine(600, **kw) == 0.0
    build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), **kw)


def test_no_reset_inside_a_warm_start_longer_than_a_cycle():
    """The reference 250M recipe: warm start 5000 steps, cycle 500. During the full-rank warm start the lr is the
    plain warmup+cosine (oracle: cosine_with_warmup); the first reset is the switch at start_step, and the
    following ones come every cycle_length after it."""
    kw = dict(total_steps=20000, warmup_steps=600, cycle_length=500, restart_warmup_steps=100, min_lr_ratio=0.1)
    start = 5000
    cos = [cosine_with_warmup(s, total_steps=20000, warmup_steps=600, min_lr_ratio=0.1) for s in range(start)]
    assert [jagged_cosine(s, start_step=start, **kw) for s in range(start)] == pytest.approx(cos, abs=1e-12)
    assert all(jagged_cosine(s, start_step=start, **kw) > 0 for s in range(600, start))  # never dropped to 0
    assert [jagged_cosine(s, start_step=start, **kw) for s in (5000, 5500, 6000)] == [0.0, 0.0, 0.0]


def test_the_full_and_lora_baselines_schedules():
    """The paper's baselines. mode=full: one cosine with warmup over the run. mode=lora: that cosine, dropped
    to 0 only at the warm-start switch and re-warmed there, never at cycle_length (which mode=lora ignores).
    Hand-written values (a mutation audit found both schedules untested: a lora run dropping to 0 every
    cycle, a full run on the linear schedule, passed every test)."""
    from relora_ds.startup import build_schedule
    from relora_ds.train_config import ConfigWarning, TrainConfig

    full = build_schedule(TrainConfig(mode="full", total_steps=100, warmup_steps=10, min_lr_ratio=0.1), 100)
    assert [full(s) for s in range(100)] == pytest.approx(
        [s / 10 if s < 10 else _cos_at(s, total=100, warmup=10) for s in range(100)], abs=1e-12)
    with pytest.warns(ConfigWarning, match="cycle_length=4 is ignored"):
        cfg = TrainConfig(mode="lora", total_steps=12, warmup_steps=1, warm_start_steps=2, restart_warmup_steps=2,
                          min_lr_ratio=0.1, cycle_length=4)
    lora = build_schedule(cfg, 12)
    c = lambda s: _cos_at(s, total=12, warmup=1)  # noqa: E731
    assert [lora(s) for s in range(12)] == pytest.approx(
        [0.0, 1.0, 0.0, 0.5 * c(4), *(c(s) for s in range(4, 12))], abs=1e-12)


def test_a_restarted_warmup_longer_than_the_low_rank_phase_names_that_phase():
    """lowrank_schedule='restart' warms up again after the switch: a warmup_steps=750 of total_steps=800 with
    a 100-step warm start was refused as 'must be in [0, total_steps=700)', a total the user never gave."""
    from relora_ds.startup import build_schedule
    from relora_ds.train_config import TrainConfig

    cfg = TrainConfig(mode="relora", total_steps=800, warm_start_steps=100, warmup_steps=750, cycle_length=100,
                      restart_warmup_steps=10, lowrank_schedule="restart")
    with pytest.raises(ValueError, match=r"warmup_steps=750 must be below the low-rank phase's 700 steps "
                                         r"\(total_steps=800 - warm_start_steps=100\)"):
        build_schedule(cfg, 800)


def test_schedule_problems_are_exactly_what_the_schedule_functions_refuse(monkeypatch):
    """schedule_problems (what the launch scripts check right after reading a recipe, all at once) against the
    oracle, the schedule functions themselves, built as the trainer builds them (startup.build_schedule with
    the up-front check switched off): over a grid of settings in every mode, a combination is named exactly
    when the functions refuse it; and a warm start as long as the run is named first (the functions accept
    it where the low-rank phase continues the schedule, and the run would train no low-rank step)."""
    import dataclasses
    import itertools

    from relora_ds.schedule import schedule_problems
    from relora_ds.startup import build_schedule
    from relora_ds.train_config import TrainConfig

    monkeypatch.setattr(TrainConfig, "check_schedule", lambda self, total_steps, warn=True, cycle_start=None: None)
    base = TrainConfig(total_steps=100, cycle_length=10, warmup_steps=5, restart_warmup_steps=2)
    named = refused = 0
    # after: a resume's anchor (the reset its cycles count from) this many steps after the switch, or none
    grid = itertools.product(("relora", "lora", "full"), ("continue", "restart"), (30, 40), (0, 5, 12, 30, 45),
                             (0, 3, 5, 12, 29, 30, 35, 60), (4, 12, 29, 100), (None, 2, 7))
    for mode, lowrank_schedule, total, start, warmup, cycle, after in grid:
        if mode == "full" and start:  # TrainConfig's own refusal: a warm start needs a low-rank phase
            continue
        anchor = None if after is None else start + after
        settings = dict(mode=mode, lowrank_schedule=lowrank_schedule, total_steps=total, warm_start_steps=start,
                        warmup_steps=warmup, cycle_length=cycle)
        problems, _ = schedule_problems(**settings, cycle_start=anchor)
        cfg = dataclasses.replace(base)  # then the settings as they are, unchecked
        for name, value in settings.items():
            setattr(cfg, name, value)
        try:
            build_schedule(cfg, total, anchor)
            refuses = False
        except ValueError:
            refuses = True
        if mode != "full" and start >= total:
            assert [m for m, _ in problems][0].startswith(f"warm_start_steps={start} leaves no low-rank steps of "
                                                          f"total_steps={total}: lower warm_start_steps"), settings
        else:
            assert bool(problems) == refuses, (settings, problems)
        named += bool(problems)
        refused += refuses
    assert 100 < refused < named  # the grid holds both kinds, and the warm starts as long as the run


def test_a_recipes_schedule_problems_are_named_together_before_the_run_starts(tmp_path):
    """The launch scripts' reading of a recipe (train_args.config_from_args) names every schedule problem in
    one error, each with the settings to change: launch/train.py's tiny recipe (a 100-step warm start) run
    for 40 steps with a 60-step warmup used to fail with the first of the two, after its process group and
    DeepSpeed's ops had started. A recipe whose schedule is right reads as before."""
    from launch_utils import ROOT

    from relora_ds.train_args import build_launch_parser, config_from_args

    parser = build_launch_parser()
    tiny = ["--config", str(ROOT / "launch/configs/tiny.yaml"), "--output-dir", str(tmp_path / "run")]
    with pytest.raises(ValueError) as e:
        config_from_args(parser.parse_args([*tiny, "--total-steps", "40", "--warmup-steps", "60"]))
    assert str(e.value).splitlines() == [
        "2 problems with the settings:",
        "  - warm_start_steps=100 leaves no low-rank steps of total_steps=40: lower warm_start_steps "
        "(--warm-start-steps) or raise total_steps (--total-steps)",
        "  - warmup_steps=60 must be below total_steps=40: lower warmup_steps (--warmup-steps) or raise total_steps "
        "(--total-steps)"]
    # total_steps from token_budget (a user trial: the error named only total_steps, which was never given)
    with pytest.raises(ValueError, match=r"warmup_steps=5 must be below total_steps=1 \(token_budget=100's\): lower "
                                         r"warmup_steps \(--warmup-steps\) or raise token_budget \(--token-budget\)"):
        config_from_args(parser.parse_args([*tiny, "--total-steps", "none", "--token-budget", "100",
                                            "--warmup-steps", "5", "--warm-start-steps", "0"]))
    with pytest.raises(ValueError, match=r"^warmup_steps=150 is longer than a cycle \(cycle_length=100\): the first "
                                         r"reset would interrupt the warmup; lower warmup_steps or raise cycle_length$"):
        config_from_args(parser.parse_args([*tiny, "--warm-start-steps", "0", "--warmup-steps", "150"]))
    assert config_from_args(parser.parse_args([*tiny, "--total-steps", "200"])).total_steps == 200
    # A token budget's steps at the recipe's batch (16 x 128 tokens): 40 steps, the same two problems.
    budget = [*tiny, "--total-steps", "none", "--token-budget", str(40 * 16 * 128), "--warmup-steps", "60"]
    with pytest.raises(ValueError, match=r"^2 problems with the settings:\n  - warm_start_steps=100 leaves no "
                                         r"low-rank steps of total_steps=40"):
        config_from_args(parser.parse_args(budget))
    # Resumed, a budget's steps depend on its checkpoint: the trainer and preflight check them at start-up.
    assert config_from_args(parser.parse_args([*budget, "--resume"])).token_budget == 40 * 16 * 128


def test_a_changed_cycle_length_counts_from_the_checkpoints_last_reset():
    """Resumed with another cycle_length, the cycles count from the checkpoint's last reset (hand-computed),
    after the cycles done before it; counted from the switch instead, the trial's 10 -> 15 at step 21 (switch
    at 10, a reset at 20) trained step 21 at the cosine's full lr right after a 99% prune and reset again at 25.
    Where the new cycle from that reset has already ended at the checkpoint's step, the reset is overdue: done at
    that step (reset_now), the cycles count from it (left at 20, cycles of 5 resumed at 29 trained step 30 at lr
    0 with no reset behind it: a review)."""
    from relora_ds.schedule import cycle_anchor

    at = dict(relora_start=10, saved_cycle_length=10)
    assert cycle_anchor(21, cycle_length=15, **at) == (20, 1, False)
    assert cycle_anchor(20, cycle_length=15, **at) == (20, 1, False)  # resumed on the reset's own step
    assert cycle_anchor(24, cycle_length=5, **at) == (20, 1, False)
    assert cycle_anchor(25, cycle_length=5, **at) == (25, 2, True)  # the new cycle's first reset: this step's
    assert cycle_anchor(29, cycle_length=5, **at) == (29, 2, True)  # missed at 25: done now, at 29
    assert cycle_anchor(21, cycle_length=10, **at) == (10, 0, False)  # unchanged: nothing moves
    assert cycle_anchor(8, cycle_length=15, **at) == (10, 0, False)  # still in the warm start
    assert cycle_anchor(21, cycle_length=None, **at) == (10, 0, False)  # mode lora: no cycles
    # Changed again: from where the previous change left them (cycle 15 from step 20, 1 cycle before).
    again = dict(relora_start=10, saved_cycle_length=15, saved_start=20, saved_before=1)
    assert cycle_anchor(40, cycle_length=10, **again) == (35, 2, False)
    assert cycle_anchor(40, cycle_length=15, **again) == (20, 1, False)
    assert cycle_anchor(48, cycle_length=10, **again) == (48, 3, True)  # 35 + 10 passed: overdue
    # A LoRA checkpoint resumed as ReLoRA (a review: the lr dropped to 0 and ramped at step 11 with no reset): the
    # switch is its last reset; a whole cycle or more since, the first reset is overdue.
    lora = dict(relora_start=2, saved_cycle_length=math.inf)
    assert cycle_anchor(5, cycle_length=4, **lora) == (2, 0, False)
    assert cycle_anchor(6, cycle_length=4, **lora) == (6, 1, True)
    assert cycle_anchor(13, cycle_length=4, **lora) == (13, 1, True)


@pytest.mark.parametrize("lowrank_schedule", ["continue", "restart"])
def test_the_schedule_restarts_from_the_cycle_anchor(lowrank_schedule):
    """build_schedule(cycle_start=1000) for a run whose cycles of 300 count from the reset at 1000: the lr drops
    to 0 there and every 300 steps after, ramping for 10; `continue` ramps back onto the run's one cosine,
    `restart` onto the low-rank phase's own (the reference's second run: 1500 steps from the switch at 500)."""
    from relora_ds.startup import build_schedule
    from relora_ds.train_config import TrainConfig

    cfg = TrainConfig(mode="relora", total_steps=2000, warmup_steps=50, warm_start_steps=500, cycle_length=300,
                      restart_warmup_steps=10, min_lr_ratio=0.1, lowrank_schedule=lowrank_schedule)
    sched = build_schedule(cfg, 2000, cycle_start=1000)
    if lowrank_schedule == "continue":
        cos = lambda s: _cos_at(s, total=2000, warmup=50)  # noqa: E731
    else:
        cos = lambda s: _cos_at(s - 500, total=1500, warmup=50)  # noqa: E731
    for reset in (1000, 1300, 1600, 1900):
        assert sched(reset) == 0.0
        assert sched(reset + 5) == pytest.approx(0.5 * cos(reset + 10))
        assert sched(reset + 10) == pytest.approx(cos(reset + 10))
    assert sched(1150) == pytest.approx(cos(1150)) and sched(1200) == pytest.approx(cos(1200))


def test_an_anchor_before_a_longer_warmup_is_no_warm_start():
    """No warm start, cycles of 10 resumed at step 15 with cycles of 20 and warmup_steps raised to 12: the anchor
    (the reset at 10) lies before the warmup's end, which the warm start's length may not; the schedule builds
    (a review found a crash blaming a warm start the run does not have) and resets at 30 and 50."""
    from relora_ds.startup import build_schedule
    from relora_ds.train_config import TrainConfig

    cfg = TrainConfig(mode="relora", total_steps=100, warmup_steps=12, cycle_length=20, restart_warmup_steps=5)
    sched = build_schedule(cfg, 100, cycle_start=10)
    assert sched(30) == sched(50) == 0.0 and sched(40) == pytest.approx(_cos_at(40, total=100, warmup=12))
    assert sched(32) == pytest.approx(2 / 5 * _cos_at(35, total=100, warmup=12))


def test_a_restart_warmup_longer_than_the_cycle_is_cut_to_the_cycle():
    """restart_warmup_steps >= cycle_length is accepted with a warning (the ramp is cut to the cycle), and a
    lora run's one cycle is the run: the default 100-step re-warmup in a 40-step lora run. The schedule is the
    jagged cosine with the re-warmup equal to the cycle, written out here (the function itself refuses a
    longer one)."""
    import warnings

    from relora_ds.startup import build_schedule
    from relora_ds.train_config import TrainConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the settings' own warnings: tested in test_train_config.py
        cfg = TrainConfig(mode="relora", total_steps=40, warmup_steps=4, cycle_length=10, restart_warmup_steps=12)
        lora = TrainConfig(mode="lora", total_steps=40, warmup_steps=4)
    assert lora.restart_warmup_steps > 40
    for c, cycle in ((cfg, 10), (lora, 40)):
        want = [jagged_cosine(s, total_steps=40, warmup_steps=4, cycle_length=cycle, restart_warmup_steps=cycle)
                for s in range(40)]
        assert [build_schedule(c, 40)(s) for s in range(40)] == pytest.approx(want, abs=1e-12)


def test_a_restart_warmup_longer_than_the_first_warmup_ramps_only_after_a_reset():
    """Without a warm start the first cycle has no reset at its start: with restart_warmup_steps (200) longer
    than warmup_steps (100), steps 100..299 follow the plain cosine (hand-computed), not a second ramp from 0
    after the first warmup; the ramp comes only after the reset at 300. (A mutation audit found that counting
    cycle 0 as a reset, `cycle >= 0`, passed every test: the existing cases have the re-warmup shorter than the
    warmup, or compare against jagged_cosine itself.)"""
    kw = dict(total_steps=1000, warmup_steps=100, cycle_length=300, restart_warmup_steps=200, min_lr_ratio=0.1)
    assert jagged_cosine(100, **kw) == 1.0  # the warmup's end: the peak, not the start of a ramp
    assert [jagged_cosine(s, **kw) for s in range(100, 300)] == pytest.approx(
        [_cos_tw(s) for s in range(100, 300)], abs=1e-12)
    assert jagged_cosine(300, **kw) == 0.0
    assert jagged_cosine(400, **kw) == pytest.approx(0.5 * _cos_tw(500))  # the ramp after the first reset


def test_steps_before_the_cycle_anchor_follow_the_plain_cosine():
    """jagged_cosine(cycle_start=...) as its docstring says: steps before the anchor are past and follow the
    plain cosine (hand-computed), with no reset at the switch (500) nor at 700, a cycle before the anchor; from
    the anchor (1000) on, a reset every cycle_length. (A
    mutation audit found `step < anchor` removable with every test passing: the resumed trainer only evaluates
    steps at or after the anchor.)"""
    kw = dict(total_steps=2000, warmup_steps=50, cycle_length=300, restart_warmup_steps=10, min_lr_ratio=0.1,
              start_step=500, cycle_start=1000)
    for s in (500, 505, 700, 705, 800, 999):
        assert jagged_cosine(s, **kw) == pytest.approx(_cos_at(s, total=2000, warmup=50)), s
    assert jagged_cosine(1000, **kw) == 0.0 and jagged_cosine(1300, **kw) == 0.0
    assert jagged_cosine(1005, **kw) == pytest.approx(0.5 * _cos_at(1010, total=2000, warmup=50))


def test_a_token_budget_already_spent_at_the_resume_trains_no_further_step():
    """A run resumed with a token_budget below the tokens its checkpoint has seen (the budget lowered, or the
    batch changed) ends at the step it resumed at: 20 steps saw 20,480 tokens, the budget is now 10,240, so
    total_steps is 20 (hand-computed: nothing is left), not 20 + ceil((10,240 - 20,480) / 2,048) = 15, a total
    below the step already done. (A mutation audit found the max(0, ...) removable: the existing case spends
    the budget exactly.)"""
    from relora_ds.schedule import total_steps_for
    from relora_ds.train_config import TrainConfig

    cfg = TrainConfig(cycle_length=10, restart_warmup_steps=2, token_budget=10240, seq_len=64,
                      global_batch_size=32, micro_batch_size=4)
    assert total_steps_for(cfg, {"step": 20, "tokens_seen": 20480}) == 20
    assert total_steps_for(cfg, {"step": 20, "tokens_seen": 10241}) == 20


def test_schedule_edges_a_mutation_audit_left_untested():
    """min_lr_ratio=1.0 (TrainConfig's range is [0, 1]) is a constant lr after the warmup, accepted by
    build_scheduler; steps between an anchor before the warmup's end and that end follow the first warmup (hand
    values 10/12, 11/12), no restart ramp from 0; a cycle exactly as long as the low-rank phase warns (its only
    reset would be the last step: plain LoRA); a negative start_step is refused."""
    from relora_ds.schedule import schedule_problems

    for fn in (cosine_with_warmup, linear_with_warmup):
        assert fn(500, total_steps=1000, warmup_steps=100, min_lr_ratio=1.0) == 1.0
    assert jagged_cosine(450, total_steps=1000, warmup_steps=100, cycle_length=300, restart_warmup_steps=50,
                         min_lr_ratio=1.0) == 1.0
    build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), total_steps=1000,
                    warmup_steps=100, cycle_length=300, restart_warmup_steps=50, min_lr_ratio=1.0)
    kw = dict(total_steps=100, warmup_steps=12, cycle_length=20, restart_warmup_steps=5, min_lr_ratio=0.1,
              cycle_start=10)
    assert jagged_cosine(10, **kw) == pytest.approx(10 / 12) and jagged_cosine(11, **kw) == pytest.approx(11 / 12)
    for start in (0, 20):
        problems, warned = schedule_problems(total_steps=100, warm_start_steps=start, warmup_steps=5, mode="relora",
                                             cycle_length=100 - start, lowrank_schedule="continue")
        assert not problems and len(warned) == 1 and "not shorter than the low-rank phase" in warned[0]
    with pytest.raises(ValueError, match="start_step=-5"):
        jagged_cosine(0, total_steps=1000, warmup_steps=100, cycle_length=300, restart_warmup_steps=50, start_step=-5)
