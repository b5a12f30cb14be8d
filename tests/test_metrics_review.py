"""What metrics.jsonl and TensorBoard show after resumes that redo, or no longer do, the reset a resume with a
shorter cycle_length owes at its resume step (schedule.cycle_anchor's reset_now; resume.py logs it with
"overdue"). The records are the ones the trainer logs, in its order; the oracle is the recipe's resets by hand
and TensorBoard's own reader."""
from __future__ import annotations

import json
import sys

import pytest

from launch_utils import ROOT
from relora_ds.metrics import MetricsLogger

sys.path.insert(0, str(ROOT / "launch"))
from plot_metrics import curves  # noqa: E402


def _reset(step: int, **extra) -> dict:
    return {"event": "reset", "step": step, "layers": 14, "exp_avg": 0.99, "reset": True, **extra}


def _train(logger: MetricsLogger, steps, lr: float) -> None:
    for step in steps:
        logger.log({"step": step, "loss": 10.0 - step, "lr": lr, "tokens_seen": 256 * step})


def _first_run(tmp_path) -> None:
    """Warm start 2 steps, cycles of 4 (resets at 6, 10), a checkpoint at step 5; killed during step 7."""
    logger = MetricsLogger(tmp_path, enabled=True)
    _train(logger, (1, 2), lr=1e-3)
    logger.log({"event": "switch_to_relora", "step": 2})
    _train(logger, (3, 4, 5), lr=1e-3)
    logger.log({"event": "checkpoint", "step": 5, "save_seconds": 0.5})
    logger.log(_reset(6))
    _train(logger, (6,), lr=1e-3)
    logger.close()


def _resumed_with_cycle_3(tmp_path) -> None:
    """--resume --cycle-length 3: step 5 is 3 steps after the switch, so its reset is overdue and done at once
    (logged as resume.py logs it: once); killed during step 7."""
    logger = MetricsLogger(tmp_path, enabled=True, resume_step=5)
    logger.log({"event": "resume_settings_changed", "step": 5, "cycle_length": "4 -> 3"})
    if not logger.logged(5, "overdue"):
        logger.log(_reset(5, overdue=True))
    _train(logger, (6,), lr=0.0)
    logger.close()


def _tensorboard(tmp_path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _records(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def fresh_event_file_counter(monkeypatch):
    """The event files of one test are named in the same second; readers order them by their last part, a
    per-process counter, as text ("10" before "9"): counted from 0 here, as in a fresh run's process."""
    from tensorboard.summary.writer import event_file_writer

    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(0))


def test_a_resume_back_to_the_recipes_cycle_drops_the_abandoned_overdue_reset(tmp_path, fresh_event_file_counter):
    """Resumed from step 5 with cycle_length 3 (an overdue reset at 5), killed, then resumed from step 5 again
    with the recipe's cycle_length 4: the run that continues does no reset at 5. Before, metrics.jsonl kept the
    abandoned start's reset at 5 (its settings record moved aside), the plot drew a reset line there and
    TensorBoard showed its numbers. Oracle, by hand: warm start 2, cycles of 4 -> resets at 6 and 10."""
    _first_run(tmp_path)
    _resumed_with_cycle_3(tmp_path)
    logger = MetricsLogger(tmp_path, enabled=True, resume_step=5)
    logger.log(_reset(6))
    _train(logger, range(6, 11), lr=1e-3)
    logger.log(_reset(10))  # (its record: after step 10's training record here; the order does not matter)
    logger.close()

    recs = _records(tmp_path)
    assert [r["step"] for r in recs if r.get("event") == "reset"] == [6, 10]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 11))
    assert curves(recs)[2] == [2, 6, 10]  # the plot's dotted lines: the switch and the resets
    moved = [json.loads(line) for line in (tmp_path / MetricsLogger.REWOUND).read_text().splitlines()]
    assert {"event": "resume_settings_changed", "step": 5, "cycle_length": "4 -> 3"} in moved
    assert _reset(5, overdue=True) in moved
    tb = _tensorboard(tmp_path)
    assert [step for step, _ in tb["reset/layers"]] == [6, 10]
    # The resume step's own records stay in TensorBoard, once each, with their values (metrics.jsonl's).
    assert tb["loss"] == [(s, 10.0 - s) for s in range(1, 11)]
    assert tb["checkpoint/save_seconds"] == [(5, 0.5)]
    assert [step for step, _ in tb["tokens_seen"]] == list(range(1, 11))


def test_resumed_twice_with_the_shorter_cycle_the_overdue_reset_shows_once(tmp_path, fresh_event_file_counter):
    """Resumed from step 5 with cycle_length 3 twice (a requeue before the next checkpoint): each start does the
    overdue reset at 5, and metrics.jsonl and TensorBoard show it once."""
    _first_run(tmp_path)
    _resumed_with_cycle_3(tmp_path)
    _resumed_with_cycle_3(tmp_path)

    recs = _records(tmp_path)
    assert [(r["step"], r.get("overdue")) for r in recs if r.get("event") == "reset"] == [(5, True)]
    assert [r for r in recs if r.get("event") == "resume_settings_changed"] == [
        {"event": "resume_settings_changed", "step": 5, "cycle_length": "4 -> 3"}]
    tb = _tensorboard(tmp_path)
    assert tb["reset/layers"] == [(5, 14.0)]
    assert tb["loss"] == [(s, 10.0 - s) for s in range(1, 7)]
    assert tb["lr"][-1] == (6, 0.0)  # the last start's step 6, not the first run's
    assert tb["checkpoint/save_seconds"] == [(5, 0.5)]
