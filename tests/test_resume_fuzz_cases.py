"""Stop-and-resume at the schedule's edges, on 1 CPU rank with launch/train.py's main() in this process (~0.5 s a
run): a run stopped after any step (as by SIGUSR1: it saves and stops) and resumed with --resume logs what the
uninterrupted run logs (loss, lr and merge/reset records, bit for bit) and ends with its weights; the lr and the
events follow the jagged cosine written out by hand here. Cases a seeded fuzzer over these settings picked
(warm start, cycle_length, merge_every, restart warmup, warmup, gradient accumulation, save_every, keep_last,
lowrank_schedule, changed cycle_length and total_steps on resume). Two ranks: tests/test_trainer_resume.py."""
import json
import math
import os
import runpy
import signal

import pytest
import torch
import yaml

from launch_utils import ROOT, free_port
from trainer_utils import FP32_ZERO2, packed_data_dir

BASE = dict(model="debug", seq_len=32, mode="relora", rank=4, alpha=8, lr=3e-3, micro_batch_size=4,
            global_batch_size=8, eval_every=0, export=False, keep_warm_start=False, log_every=1, min_lr_ratio=0.1)
# Records whose fields are timings, or that a stop adds by design (its checkpoint, the "preempted" record).
_TIMINGS = ("tokens_per_s", "tflops_per_gpu", "peak_memory_mb", "path", "mfu")
_ADDED_BY_A_STOP = ("checkpoint", "preempted", "resume_settings_changed")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return packed_data_dir(tmp_path_factory.mktemp("resume_fuzz") / "data", 60000, 4000)


@pytest.fixture
def run(monkeypatch, data_dir):
    """``run(out, recipe, *args, stop=k)``: launch/train.py's main() in this process; ``stop``: a stop signal
    before step k's training (the run finishes step k, saves and stops). Returns main()'s exit status."""
    from relora_ds import trainer as trainer_mod

    train = runpy.run_path(str(ROOT / "launch/train.py"), run_name="train")  # as imported: no main() run
    stop_at = {"step": None}
    train_step = trainer_mod.Trainer._train_step

    def stopping_train_step(self):
        if self.step + 1 == stop_at["step"]:
            self._request_stop(signal.SIGUSR1, None)
        return train_step(self)
    monkeypatch.setattr(trainer_mod.Trainer, "_train_step", stopping_train_step)

    def go(out, recipe, *args, stop=None):
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump({**BASE, **recipe, "data_dir": str(data_dir),
                                                         "output_dir": str(out / "run")}))
        (out / "ds.json").write_text(json.dumps(FP32_ZERO2))
        saved = dict(os.environ)  # the process group's start sets RANK, WORLD_SIZE, ... (conftest checks)
        stop_at["step"] = stop
        try:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
            return train["main"](["--config", str(out / "recipe.yaml"), "--deepspeed", str(out / "ds.json"), *args])
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return go


def _records(out):
    recs = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in _TIMINGS and not k.endswith("_seconds")}
            for r in recs if "step" in r and r.get("event") not in _ADDED_BY_A_STOP]


def _weights(out, step):
    from relora_ds.checkpoint import full_state_dict
    return full_state_dict(out / "run" / "checkpoints", f"step_{step}")


def _cosine(i, total, warmup, min_ratio):
    if i < warmup:
        return i / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warmup) / max(1, total - warmup))))


def _lr_by_hand(i, r, anchor=None):
    """The lr of 0-based optimizer step i (logged as step i + 1) of recipe ``r``: a reset at the switch (when
    warm_start_steps > 0) and at ``anchor`` + k·cycle_length (anchor: the switch, or where a resume that
    changed cycle_length counts from), each followed by a linear ramp over restart_warmup_steps up to the global
    cosine's value at the ramp's end; lowrank_schedule restart: the low-rank phase's own warmup and cosine."""
    r = {**BASE, **r}
    total, warmup, start, cycle = r["total_steps"], r["warmup_steps"], r["warm_start_steps"], r["cycle_length"]
    anchor = start if anchor is None else anchor
    ramp, lr = min(r["restart_warmup_steps"], cycle), r["lr"] if i >= start else r.get("warm_start_lr") or r["lr"]
    if r.get("lowrank_schedule") == "restart" and start:
        if i < start:
            return lr * _cosine(i, total, warmup, r["min_lr_ratio"])
        i, total, resets = i - start, total - start, range(anchor - start, total - start + 1, cycle)
        resets = [x for x in resets if x > 0]
    else:
        resets = [x for x in range(anchor, total + 1, cycle) if x > 0] + [start] * bool(start)
    last = max((x for x in resets if x <= i), default=None)
    if last is not None and i - last < ramp:
        return lr * (i - last) / ramp * _cosine(last + ramp, total, warmup, r["min_lr_ratio"])
    return lr * _cosine(i, total, warmup, r["min_lr_ratio"])


def _events_by_hand(r, anchor=None, after=0):
    """{step: "merge" | "reset"} of recipe ``r`` after step ``after``, counted from ``anchor`` (the switch)."""
    anchor = r["warm_start_steps"] if anchor is None else anchor
    every = r.get("merge_every") or r["cycle_length"]
    return {s: "reset" if (s - anchor) % r["cycle_length"] == 0 else "merge"
            for s in range(max(anchor, after) + 1, r["total_steps"] + 1) if (s - anchor) % every == 0}


def _check_by_hand(recs, r, anchor=None, after=0):
    lrs = {x["step"]: x["lr"] for x in recs if "loss" in x and x["step"] > after}
    assert sorted(lrs) == list(range(after + 1, r["total_steps"] + 1))
    for step, lr in lrs.items():
        assert lr == pytest.approx(_lr_by_hand(step - 1, r, anchor), rel=1e-9, abs=1e-15), f"lr of step {step}"
    events = {x["step"]: x["event"] for x in recs if x.get("event") in ("merge", "reset") and x["step"] > after
              and not x.get("overdue")}
    assert events == _events_by_hand(r, anchor, after)


def _stopped_and_resumed_as_uninterrupted(run, tmp_path, recipe, stops):
    assert run(tmp_path / "whole", recipe) == 0
    whole = _records(tmp_path / "whole")
    _check_by_hand(whole, recipe)
    end = _weights(tmp_path / "whole", recipe["total_steps"])
    for stop in stops:
        out = tmp_path / f"stop{stop}"
        assert run(out, recipe, stop=stop) == 0
        assert [json.loads(line) for line in (out / "run/metrics.jsonl").read_text().splitlines()][-1] == \
            {"event": "preempted", "step": stop}
        assert run(out, recipe, "--resume") == 0
        assert _records(out) == whole, f"stopped after step {stop}"
        resumed = _weights(out, recipe["total_steps"])
        assert [k for k in end if not torch.equal(end[k], resumed[k])] == [], f"stopped after step {stop}"


def test_stops_at_the_warm_start_warmup_resets_and_checkpoints_resume_as_the_uninterrupted_run(run, tmp_path):
    """Warm start to 3 (warmup to 2), resets at 7 and 11 with 2-step ramps, merges every 2, 2 micro-batches a
    step, a checkpoint every 5 with keep_last 1 (a stop's checkpoint deletes the one before), random pruning
    (seeded per reset) and LoRA dropout (its RNG restored). Stops: the warmup's last step and the next, the warm
    start's last (saved by the full-rank engine: the resumed run switches) and the switch's first, one before
    a reset, the reset, one after it, a checkpoint step, the second-to-last step."""
    recipe = dict(warm_start_steps=3, warmup_steps=2, cycle_length=4, restart_warmup_steps=2, merge_every=2,
                  total_steps=12, save_every=5, keep_last=1, prune_method="random", dropout=0.1, warm_start_lr=1e-3)
    _stopped_and_resumed_as_uninterrupted(run, tmp_path, recipe, stops=[2, 3, 4, 6, 7, 8, 10, 11])


@pytest.mark.parametrize("recipe, stops", [
    # no warm start: the warmup's end is the first reset (warmup_steps == cycle_length)
    (dict(warm_start_steps=0, warmup_steps=4, cycle_length=4, restart_warmup_steps=3, total_steps=11), [3, 4, 5]),
    # lowrank_schedule restart: the low-rank phase warms up again over 3 steps, up to its first reset at 5
    (dict(warm_start_steps=2, warmup_steps=2, cycle_length=3, restart_warmup_steps=1, total_steps=10,
          lowrank_schedule="restart", merge_every=1), [2, 4, 5, 6]),
], ids=["warmup-ends-at-the-first-reset", "restart-warmup-to-the-first-reset"])
def test_a_warmup_that_ends_at_a_cycle_boundary_resumes_as_the_uninterrupted_run(run, tmp_path, recipe, stops):
    """A warmup that runs up to a cycle boundary, stopped inside it, at its end (a reset) and after."""
    _stopped_and_resumed_as_uninterrupted(run, tmp_path, {**recipe, "save_every": 0, "keep_last": 2}, stops)


@pytest.mark.parametrize("stop, cycle, anchor", [(8, 3, 6), (9, 2, 9)], ids=["from-the-last-reset", "overdue"])
def test_lowrank_schedule_restart_resumed_with_another_cycle_length(run, tmp_path, stop, cycle, anchor):
    """lowrank_schedule restart (the paper recipes'), resets at 6 and 10 (cycle 4 from the switch at 2), resumed
    with another cycle_length and total_steps: the cycles count from the checkpoint's last reset (6), or, where a
    whole new cycle has passed since (2 at step 9), from an overdue reset done at the resume step; the lr is the
    restarted schedule's over the new total, anchored there (schedule.cycle_anchor's promise)."""
    recipe = dict(warm_start_steps=2, warmup_steps=2, cycle_length=4, restart_warmup_steps=2, total_steps=14,
                  lowrank_schedule="restart", save_every=0, keep_last=2)
    assert run(tmp_path, recipe, stop=stop) == 0
    assert run(tmp_path, recipe, "--resume", "--cycle-length", str(cycle), "--total-steps", "15") == 0
    recs = _records(tmp_path)
    before = [x for x in recs if x["step"] <= stop]
    assert [x["lr"] for x in before if "loss" in x] == pytest.approx(
        [_lr_by_hand(s, recipe) for s in range(stop)], rel=1e-9, abs=1e-15)
    assert {x["step"]: x["event"] for x in before if x.get("event") in ("merge", "reset") and not x.get("overdue")} == \
        {s: e for s, e in _events_by_hand(recipe).items() if s <= stop}
    _check_by_hand(recs, {**recipe, "cycle_length": cycle, "total_steps": 15}, anchor=anchor, after=stop)
    assert [x["step"] for x in recs if x.get("overdue")] == ([stop] if anchor == stop else [])


@pytest.mark.parametrize("recipe, stop, anchor", [
    # no warm start, warmup 4: the last reset was at 6, and 9 - 6 is a whole new cycle: an overdue reset at 9
    (dict(warm_start_steps=0, warmup_steps=4, cycle_length=6, restart_warmup_steps=2, total_steps=14), 9, 9),
    # lowrank_schedule restart, the low-rank warmup over 2..6: cycles count from the last reset, at 7
    (dict(warm_start_steps=2, warmup_steps=4, cycle_length=5, restart_warmup_steps=2, total_steps=14,
          lowrank_schedule="restart"), 9, 7),
], ids=["overdue", "restart-from-the-last-reset"])
def test_a_cycle_shorter_than_the_warmup_is_taken_by_a_resume_past_the_warmup(run, tmp_path, capsys, recipe, stop,
                                                                             anchor):
    """cycle_length 3 < warmup_steps 4 given on a resume after the warmup ended: no reset can cut into it (the
    cycles count from the checkpoint's last reset, past the warmup), but the resume was refused with "the first
    reset would interrupt the warmup" (a review's find). Now it runs the schedule written out by hand; a resume
    still inside the warmup is refused (stopped at 1, the first reset would come at step 3, inside the warmup)."""
    recipe = {**recipe, "save_every": 0, "keep_last": 2}
    assert run(tmp_path / "inside", recipe, stop=1) == 0
    capsys.readouterr()
    try:
        status = run(tmp_path / "inside", recipe, "--resume", "--cycle-length", "3")
    except SystemExit as e:
        status = e.code
    assert status == 2 and "warmup_steps=4 is longer than a cycle (cycle_length=3)" in capsys.readouterr().err
    assert run(tmp_path / "past", recipe, stop=stop) == 0
    assert run(tmp_path / "past", recipe, "--resume", "--cycle-length", "3") == 0
    _check_by_hand(_records(tmp_path / "past"), {**recipe, "cycle_length": 3}, anchor=anchor, after=stop)
