"""relora_ds/metrics.py: what a resumed run's metrics.jsonl keeps and what it moves aside."""
from __future__ import annotations

import json

import pytest

from relora_ds.metrics import MetricsLogger


def test_resume_rewinds_later_steps_and_the_switch_logged_after_the_checkpoint(tmp_path):
    """The warm-start switch is logged with step N at the start of step N + 1, after step N's checkpoint:
    a run resumed from step N switches again, so the earlier record moves aside with the later steps
    (each record once, as before the interruption). Step N's own records stay."""
    recs = [{"step": 9, "loss": 2.0}, {"step": 10, "loss": 1.9}, {"step": 10, "event": "checkpoint"},
            {"event": "switch_to_relora", "step": 10}, {"step": 11, "loss": 1.8}, {"step": 11, "event": "reset"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 12, "lo')
    logger = MetricsLogger(tmp_path, enabled=True, resume_step=10)
    logger.close()
    kept = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    moved = (tmp_path / MetricsLogger.REWOUND).read_text().splitlines()
    assert kept == recs[:3]
    assert [json.loads(l) for l in moved[:3]] == recs[3:] and moved[3] == '{"step": 12, "lo'
    assert logger.rewound == 4


def test_a_rewound_starts_settings_record_moves_aside_with_its_steps(tmp_path):
    """A start resumed at step N logs its settings changes at step N; a later resume from step N (a rewind, or
    a requeue after a stop during start-up) logs its own, so the earlier record moves aside (a user trial saw
    two records at step 60, one of them the abandoned run's)."""
    recs = [{"step": 60, "loss": 1.9}, {"step": 60, "event": "checkpoint"},
            {"step": 60, "event": "resume_settings_changed", "total_steps": "60 -> 80"}, {"step": 61, "loss": 1.8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    MetricsLogger(tmp_path, enabled=True, resume_step=60).close()
    assert [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == recs[:2]
    assert [json.loads(l) for l in (tmp_path / MetricsLogger.REWOUND).read_text().splitlines()] == recs[2:]


def test_progress_line_for_log_files():
    """Without a terminal (a SLURM .out file) each metrics record becomes one plain line; the time left is
    the remaining steps at this process's pace so far (hand-computed: 90 s for 30 steps, 60 left -> 180 s)."""
    from relora_ds.metrics import progress_line

    rec = {"step": 40, "loss": 3.14159, "lr": 1e-3, "tokens_per_s": 12345.6, "tflops_per_gpu": 101.25, "mfu": 0.4321}
    line = progress_line(rec, total_steps=100, elapsed_s=90.0, steps_done=30, cycle={"cycle": "2/5", "in_cycle": "7/10"})
    assert line == ("step 40/100 | loss 3.1416 | lr 1.000e-03 | 12,346 tok/s | 101.2 TFLOP/s/GPU | MFU 43.2% | "
                    "cycle 2/5 step 7/10 | elapsed 0:01:30 | left ~0:03:00")
    cpu = progress_line({**rec, "tflops_per_gpu": 0.004321}, 100, 90.0, 30, {})  # a CPU's rate is not "0.0"
    assert "| 0.0043 TFLOP/s/GPU |" in cpu


@pytest.mark.parametrize("step, want", [
    (100, {}),  # the last warm-start step
    (101, {"cycle": "1/3", "in_cycle": "1/100"}),
    (200, {"cycle": "1/3", "in_cycle": "100/100"}),  # the step whose reset closes cycle 1
    (201, {"cycle": "2/3", "in_cycle": "1/100"}),
    (350, {"cycle": "3/3", "in_cycle": "50/100"}),  # the last, cut short: 250 low-rank steps are 3 cycles
])
def test_cycle_position_of_the_step_just_done(step, want):
    """Hand-counted for a 100-step warm start, cycles of 100, 350 steps: step 200 ends cycle 1 (the old
    count showed it as cycle 2's step 0, clamped to 1/1 at a run's last reset)."""
    from relora_ds.metrics import cycle_position

    assert cycle_position(step, cycle_start=100, cycle_length=100, total_steps=350) == want


def test_metrics_jsonl_is_strict_json(tmp_path):
    """A skipped step's gradient norm is inf (DeepSpeed's): metrics.jsonl holds null there, not Python's
    Infinity/NaN, which jq, JavaScript and strict parsers refuse; finite values and nested ones are kept."""
    import json
    import math

    logger = MetricsLogger(tmp_path, enabled=True)
    logger.log({"step": 1, "loss": 2.5, "grad_norm": math.inf, "nested": {"a": [1.0, math.nan]}, "n": 3})
    logger.close()
    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]

    def refuse(name):
        raise ValueError(name)
    assert json.loads(line, parse_constant=refuse) == {"step": 1, "loss": 2.5, "grad_norm": None,
                                                      "nested": {"a": [1.0, None]}, "n": 3}


def test_tensorboard_after_a_resume_keeps_the_checkpoint_step_and_replaces_the_later_ones(tmp_path, monkeypatch):
    """A resume from step 3 of a run that logged steps 1-5: TensorBoard drops the old 4 and 5 (purge_step,
    as metrics.jsonl moves them aside) but keeps 3, the checkpoint's own step (a purge from 3 lost it on
    every resume: a mutation no test saw). Read back with TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer import event_file_writer

    # Both event files are named in the same second; their last part is a per-process counter, which readers
    # sort as text ("10" before "9"): counted from 0 here, as in a fresh run's process, not after whatever
    # writers this test process made before.
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(0))
    logger = MetricsLogger(tmp_path, enabled=True)
    for step in range(1, 6):
        logger.log({"step": step, "loss": float(step)})
    logger.close()
    logger = MetricsLogger(tmp_path, enabled=True, resume_step=3)
    for step in (4, 5):
        logger.log({"step": step, "loss": 10.0 + step})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]


def test_a_second_rewind_keeps_the_first_ones_records_each_on_its_line(tmp_path):
    """Two crashes, two resumes from step 1: metrics.rewound.jsonl keeps what both rewinds moved, each record on
    its own line, the first crash's cut line too (ended there, so the second rewind's first record is not glued
    onto it and lost to every JSON reader). Oracle: the records written, in order. (A mutation trial's survivors:
    the rewound file opened for writing, not appending; a cut line moved without its newline.)"""
    first = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 3, "loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first) + '{"step": 4, "lo')
    logger = MetricsLogger(tmp_path, enabled=True, resume_step=1)
    second = [{"step": 2, "loss": 2.4}, {"step": 3, "loss": 1.9}]
    for r in second:
        logger.log(r)
    logger.close()
    MetricsLogger(tmp_path, enabled=True, resume_step=1).close()
    moved = (tmp_path / MetricsLogger.REWOUND).read_text().splitlines()
    assert moved == [json.dumps(r) for r in first[1:]] + ['{"step": 4, "lo'] + [json.dumps(r) for r in second]
    assert [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == first[:1]


def test_a_line_of_json_that_is_no_record_is_moved_aside_on_resume(tmp_path):
    """A line that parses as JSON but is no object (a hand edit; blocks a power loss left) stopped the resume
    with an AttributeError in the rewind (`logged` skips such lines); it is moved aside with the redone
    records, as a cut line is. Oracle: the lines written."""
    lines = ['{"step": 1, "loss": 7.0}', "0", '{"step": 2, "loss": 6.0}', "[1, 2]"]
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    MetricsLogger(tmp_path, enabled=True, resume_step=1).close()
    assert (tmp_path / MetricsLogger.REWOUND).read_text().splitlines() == lines[1:]
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:1]


def test_a_tuple_in_a_record_is_strict_json_too(tmp_path):
    """A non-finite number inside a tuple (a record's pair of values) is null as in a list: json.dumps with
    allow_nan=False refused the record, and the run stopped (a mutation trial's survivor)."""
    import math

    logger = MetricsLogger(tmp_path, enabled=True)
    logger.log({"step": 1, "pair": (1.5, math.inf), "nested": {"t": (math.nan,)}})
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "pair": [1.5, None],
                                                                   "nested": {"t": [None]}}


def test_peak_memory_is_this_processs_peak_rss_in_mib_where_cuda_is_not_in_use(monkeypatch):
    """Without CUDA in use (no GPU, or a GPU host running on DeepSpeed's CPU accelerator: CUDA available but
    never initialized) the peak is the process's peak RSS, in MiB. Oracle: the kernel's VmHWM (kB) in
    /proc/self/status, read after; a factor of two apart at most (the two read the same peak, a moment apart).
    (A mutation trial's survivors: ru_maxrss taken as bytes, and CUDA's counter read where CUDA was never
    initialized, which reports 0.)"""
    from relora_ds import metrics

    def hwm_mib():
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    assert 0.5 * hwm_mib() <= metrics.peak_memory_mb() <= 2 * hwm_mib()
    monkeypatch.setattr(metrics.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(metrics.torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(metrics.torch.cuda, "max_memory_allocated", lambda *a: 0)
    assert 0.5 * hwm_mib() <= metrics.peak_memory_mb() <= 2 * hwm_mib()
    monkeypatch.setattr(metrics.torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(metrics.torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**20)
    assert metrics.peak_memory_mb() == 3.0


@pytest.mark.parametrize("step, want", [
    (201, {"cycle": "2/4", "in_cycle": "1/50"}),
    (250, {"cycle": "2/4", "in_cycle": "50/50"}),
    (300, {"cycle": "3/4", "in_cycle": "50/50"}),
    (350, {"cycle": "4/4", "in_cycle": "50/50"}),
])
def test_cycle_position_after_a_resume_that_re_counted_the_cycles(step, want):
    """A resume changed cycle_length from 100 to 50 at step 200, the end of cycle 1 (100 warm-start steps
    before it): the cycles count on from there, after the one before, 1 + 150 / 50 = 4 in all. The trainer
    passes its re-count (cycle_start, cycles_before) through, and shows no cycles outside mode relora.
    Hand-counted. (A mutation trial's survivors: cycles_before dropped from the total, from the cycle's
    number, or by the trainer.)"""
    from types import SimpleNamespace

    from relora_ds.metrics import cycle_position
    from relora_ds.trainer import Trainer

    assert cycle_position(step, cycle_start=200, cycle_length=50, total_steps=350, cycles_before=1) == want
    stub = SimpleNamespace(cfg=SimpleNamespace(mode="relora", cycle_length=50), step=step, cycle_start=200,
                           total_steps=350, cycles_before=1)
    assert Trainer._cycle_position(stub) == want
    stub.cfg.mode = "lora"  # merges and resets never come: no cycles to count
    assert Trainer._cycle_position(stub) == {}
