"""The trainer's loop on stubs: tokens_per_s (and the TFLOP/s derived from it) against a fake clock, where each
training step, merge, evaluation, checkpoint and the warm-start switch takes a known time; what each record
holds, and what a stop signal or a resume at a given step does."""
import json
from types import SimpleNamespace

import pytest
import torch


def _stub(t, tmp_path, cfg, *, world=2, step=0, engine_phase="full", **overrides):
    """Fill the Trainer `t` (made without __init__) with what its loop reads: a 12-step run of 8 x 32 tokens per
    step, metrics logged to tmp_path (resumed at `step`); `overrides`: the stubbed steps, evaluation, save..."""
    from relora_ds.metrics import MetricsLogger

    t.__dict__.update(
        cfg=cfg, engine=SimpleNamespace(module=torch.nn.Linear(2, 2)), out=tmp_path, ds={}, world=world, rank=0,
        model_config=SimpleNamespace(num_hidden_layers=2), total_steps=12, step=step, tokens_seen=0,
        tokens_per_step=8 * 32, relora_start=2, cycle_start=2, cycles_before=0, flops_per_token=1e9,
        peak_tflops=None, grad_norm=1.0,
        engine_phase=engine_phase, _stop_agreed=False, _stop_signal=0,
        metrics=MetricsLogger(tmp_path, enabled=True, resume_step=step), _after_step_events=lambda: None,
        _print=lambda msg: None, batches=SimpleNamespace(close=lambda: None))
    t.__dict__.update(overrides)


def test_tokens_per_s_counts_the_training_steps_and_their_resets_only(tmp_path, monkeypatch):
    """Oracle, by hand: a record's tokens_per_s is (its steps x global batch x seq_len) / the clock time of
    those steps and of the resets inside them; the evaluations (7 s), the checkpoints (11 s) and the
    warm-start switch (13 s) between them are not counted, and each record covers only its own steps."""
    from relora_ds import trainer as trainer_mod
    from relora_ds.train_config import TrainConfig

    now = [0.0]
    monkeypatch.setattr(trainer_mod, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(trainer_mod, "offloaded", lambda engine: "none")
    cfg = TrainConfig(mode="relora", warm_start_steps=2, cycle_length=4, restart_warmup_steps=1, warmup_steps=1,
                      total_steps=12, log_every=3, eval_every=6, save_every=4, global_batch_size=8,
                      micro_batch_size=4, seq_len=32, export=False, warm_start_lr=5e-4,
                      output_dir=str(tmp_path))
    t = trainer_mod.Trainer.__new__(trainer_mod.Trainer)
    step_s = {1: 0.5, 2: 0.5, 3: 0.25, 4: 0.25, 5: 0.25, 6: 0.25, 7: 1.0, 8: 1.0, 9: 1.0, 10: 1.0, 11: 2.0, 12: 2.0}
    reset_s = 3.0  # at steps 6 and 10 (the warm start ends at 2, cycles of 4)

    def train_step():
        now[0] += step_s[t.step + 1]
        t.step_lr = 1e-3
        return 1.0

    def after_step_events():
        if t.step in (6, 10):
            now[0] += reset_s

    def switch_to_lowrank():
        now[0] += 13.0
        t.engine_phase = "lowrank"

    def evaluate(final=False):
        now[0] += 7.0
        return {}

    def save():
        now[0] += 11.0

    _stub(t, tmp_path, cfg, _stop_agreed_now=lambda: False, _train_step=train_step,
          _after_step_events=after_step_events, _switch_to_lowrank=switch_to_lowrank, evaluate=evaluate, save=save)
    t.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "tokens_per_s" in r]
    # Records end at log_every (3, 6, 9, 12), the warm-start switch (2) and the checkpoints (4, 8, 12).
    windows = {2: (1, 2), 3: (3, 3), 4: (4, 4), 6: (5, 6), 8: (7, 8), 9: (9, 9), 12: (10, 12)}
    assert [r["step"] for r in records] == sorted(windows)
    for r in records:
        first, last = windows[r["step"]]
        steps = range(first, last + 1)
        seconds = sum(step_s[s] for s in steps) + reset_s * sum(s in (6, 10) for s in steps)
        want = len(steps) * 8 * 32 / seconds
        assert r["tokens_per_s"] == pytest.approx(want, rel=1e-12), r
        assert r["tflops_per_gpu"] == pytest.approx(want * 1e9 / 2 / 1e12, rel=1e-12)


@pytest.mark.parametrize("save_every", [4, 6], ids=["save-due-there", "save-not-due"])
def test_a_stop_signal_during_an_evaluation_stops_there_with_a_checkpoint(tmp_path, monkeypatch, save_every):
    """From a review: the stop flag was read only in the next step's all-reduce, so a signal that arrived during
    an evaluation (SLURM's 120 s warning; the final one reads up to ~100M tokens in the paper recipes) got one
    more step and a second save, and the final checkpoint came after the final evaluation. Oracle, by hand:
    with eval_every 4 and a signal during the step-4 evaluation, the run trains 4 steps, saves step 4 once
    (before the evaluation when a save is due there), and ends with the "preempted" record."""
    from relora_ds import trainer as trainer_mod
    from relora_ds.train_config import TrainConfig

    monkeypatch.setattr(trainer_mod, "offloaded", lambda engine: "none")
    cfg = TrainConfig(mode="relora", warm_start_steps=2, cycle_length=4, restart_warmup_steps=1, warmup_steps=1,
                      total_steps=12, log_every=3, eval_every=4, save_every=save_every, global_batch_size=8,
                      micro_batch_size=4, seq_len=32, export=False, warm_start_lr=5e-4, output_dir=str(tmp_path),
                      keep_warm_start=False)  # (else step 2 is saved too)
    t = trainer_mod.Trainer.__new__(trainer_mod.Trainer)
    calls = []

    def train_step():
        calls.append(f"step {t.step + 1}")
        t.step_lr = 1e-3
        return 1.0

    def evaluate(final=False):
        calls.append(f"eval {t.step}")
        if t.step == 4:
            t._stop_signal = 10  # SIGUSR1 arrives while the evaluation runs
        return {}

    def switch_to_lowrank():
        t.engine_phase = "lowrank"

    _stub(t, tmp_path, cfg, _stop_agreed_now=lambda: t._stop_signal > 0, _train_step=train_step,
          _switch_to_lowrank=switch_to_lowrank, evaluate=evaluate, save=lambda: calls.append(f"save {t.step}"))
    assert t.train() == {"preempted": True, "step": 4}
    steps = ["step 1", "step 2", "step 3", "step 4"]
    assert calls == steps + (["save 4", "eval 4"] if save_every == 4 else ["eval 4", "save 4"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "preempted" and records[-1]["step"] == 4
    # Every trained step is in a record (a review: with no save due at 4, step 4 was in none, and the run
    # resumed from step 4 logged a step-6 record of steps 5-6 where the uninterrupted run's covers 4-6).
    # Windows end at the switch (2), log_every (3) and the evaluation (4).
    assert [r["step"] for r in records if "loss" in r] == [2, 3, 4]


@pytest.mark.parametrize("resume_step,logged,owed", [(12, False, True), (12, True, False), (8, False, True),
                                                     (8, True, False), (6, False, False)])
def test_a_resumed_run_evaluates_the_step_its_previous_run_was_killed_evaluating(tmp_path, monkeypatch,
                                                                                resume_step, logged, owed):
    """From a review: evaluations run after their step's checkpoint, so a run killed during one (the final one
    reads up to ~100M tokens) resumes past it, and resumed at total_steps it ended with no final validation
    loss. Oracle, by hand: resumed at a step due an evaluation (8: eval_every 4; 12: the last) whose val_loss
    metrics.jsonl lacks, the run evaluates it first, once, as the final one at 12; not where it is logged, nor
    at a step not due one (6)."""
    from relora_ds import trainer as trainer_mod
    from relora_ds.train_config import TrainConfig

    monkeypatch.setattr(trainer_mod, "offloaded", lambda engine: "none")
    cfg = TrainConfig(mode="relora", warm_start_steps=2, cycle_length=4, restart_warmup_steps=1, warmup_steps=1,
                      total_steps=12, log_every=1, eval_every=4, save_every=2, global_batch_size=8,
                      micro_batch_size=4, seq_len=32, export=False, warm_start_lr=5e-4, output_dir=str(tmp_path))
    previous = [{"step": s, "loss": 1.0} for s in range(1, resume_step + 1)]
    previous += [{"step": s, "val_loss": 2.0} for s in range(4, resume_step + logged, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in previous) + '{"step": 1')
    t = trainer_mod.Trainer.__new__(trainer_mod.Trainer)
    calls = []

    def train_step():
        calls.append(f"step {t.step + 1}")
        t.step_lr = 1e-3
        return 1.0

    def evaluate(final=False):
        calls.append(f"eval {t.step}{' final' if final else ''}")
        return {"val_loss": 2.0, "step": t.step}

    _stub(t, tmp_path, cfg, world=1, step=resume_step, engine_phase="lowrank", _any_rank=lambda flag: flag,
          _train_step=train_step, _switch_to_lowrank=None, evaluate=evaluate,
          save=lambda: calls.append(f"save {t.step}"))
    result = t.train()
    first = [f"eval {resume_step}{' final' if resume_step == 12 else ''}"] if owed else []
    trained = []
    for s in range(resume_step + 1, 13):
        trained += [f"step {s}"] + ([f"save {s}"] if s % 2 == 0 else []) + ([f"eval {s}{' final' if s == 12 else ''}"]
                                                                             if s % 4 == 0 else [])
    assert calls == first + trained
    assert result == ({"val_loss": 2.0, "step": 12} if owed or resume_step < 12 else {})


def test_each_record_holds_its_steps_mean_loss_and_its_last_steps_values(tmp_path, monkeypatch):
    """A record's loss is the mean of the step losses since the previous record (Megatron's and the HF Trainer's
    log); lr, grad_norm (the trainer's own where it computes one) and phase are its last step's; tokens_seen
    counts every step so far; mfu is tflops_per_gpu over the peak. Oracle, by hand: step s's loss is s, its
    grad norm s / 2, its lr s / 1000; windows end at the warm-start switch (2, also --keep-warm-start's save),
    log_every (5, 10) and the last step (12, its save). A mutation trial's survivors: the loss divided by
    log_every or summed over the whole run, the engine's grad norm preferred, tokens_seen not summed, mfu from
    tokens/s, the final or the warm-start checkpoint skipped, --compile's report after every step rather than
    the first of each phase."""
    from relora_ds import trainer as trainer_mod
    from relora_ds.train_config import TrainConfig

    now = [0.0]
    monkeypatch.setattr(trainer_mod, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(trainer_mod, "offloaded", lambda engine: "none")
    cfg = TrainConfig(mode="relora", warm_start_steps=2, cycle_length=4, restart_warmup_steps=1, warmup_steps=1,
                      total_steps=12, log_every=5, eval_every=0, save_every=0, global_batch_size=8,
                      micro_batch_size=4, seq_len=32, export=False, warm_start_lr=5e-4, keep_warm_start=True,
                      compile=True, output_dir=str(tmp_path))
    t = trainer_mod.Trainer.__new__(trainer_mod.Trainer)
    saves = []
    # --compile: what torch.compile made, reported after the first step of each phase (tests/test_compile.py)
    monkeypatch.setattr(trainer_mod, "compile_stats", lambda: dict(graphs=1, graph_breaks=0, break_reasons={},
                                                                   recompile_limit_hits=0))
    monkeypatch.setattr(trainer_mod, "cache_entries", lambda module: 1)

    def train_step():
        s = t.step + 1
        now[0] += 1.0  # one second a step: tokens_per_s is 256
        t.step_lr, t.grad_norm = s / 1000, s / 2
        return float(s)

    def switch_to_lowrank():
        t.engine_phase = "lowrank"

    engine = SimpleNamespace(module=torch.nn.Linear(2, 2), get_global_grad_norm=lambda: -1.0)
    _stub(t, tmp_path, cfg, engine=engine, peak_tflops=0.256, _stop_agreed_now=lambda: False,
          _train_step=train_step, _switch_to_lowrank=switch_to_lowrank, evaluate=None,
          save=lambda: saves.append(t.step), _compile_reports=set(), _compile_reported=None)
    t.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["phase"]) for r in records if r.get("event") == "compiled"] == [(1, "full"), (3, "lowrank")]
    records = [r for r in records if "loss" in r]
    windows = {2: (1, 2), 5: (3, 5), 10: (6, 10), 12: (11, 12)}
    assert [r["step"] for r in records] == list(windows)
    for r in records:
        first, last = windows[r["step"]]
        assert r["loss"] == pytest.approx(sum(range(first, last + 1)) / (last - first + 1), rel=1e-12), r
        assert (r["lr"], r["grad_norm"], r["tokens_seen"]) == (last / 1000, last / 2, last * 8 * 32), r
        assert r["phase"] == ("full" if last <= 2 else "lowrank")
        assert r["tokens_per_s"] == 256 and r["tflops_per_gpu"] == pytest.approx(256 * 1e9 / 2 / 1e12, rel=1e-12)
        assert r["mfu"] == pytest.approx(0.5, rel=1e-12)  # 0.128 TFLOP/s per rank of a 0.256 peak
    assert saves == [2, 12]  # the warm start's last step (--keep-warm-start) and the run's last


@pytest.mark.parametrize("stop_at", [7, 12, None])
def test_a_stop_signal_during_a_step_logs_saves_and_evaluates_only_the_last_step(tmp_path, monkeypatch, stop_at):
    """A stop agreed in a step's all-reduce (SIGTERM/SIGUSR1 on some rank): that step ends a record (every
    trained step is logged, as at a checkpoint), is saved, and the run stops with the "preempted" record; at the
    run's last step the final evaluation still runs, after the save. Oracle, by hand: eval_every 5, log_every 5,
    a stop in step 7 (no record, save or evaluation due there), in step 12 (the last: its evaluation is due
    though 12 is no multiple of eval_every) or none. A mutation trial's survivors: the stop's record, its save
    or the final evaluation dropped; the last step's evaluation only where eval_every divides it."""
    from relora_ds import trainer as trainer_mod
    from relora_ds.train_config import TrainConfig

    monkeypatch.setattr(trainer_mod, "offloaded", lambda engine: "none")
    cfg = TrainConfig(mode="relora", warm_start_steps=2, cycle_length=4, restart_warmup_steps=1, warmup_steps=1,
                      total_steps=12, log_every=5, eval_every=5, save_every=0, global_batch_size=8,
                      micro_batch_size=4, seq_len=32, export=False, warm_start_lr=5e-4, keep_warm_start=False,
                      output_dir=str(tmp_path))
    t = trainer_mod.Trainer.__new__(trainer_mod.Trainer)
    calls = []

    def train_step():
        calls.append(f"step {t.step + 1}")
        t.step_lr = 1e-3
        t._stop_agreed = t.step + 1 == stop_at  # what the step's all-reduce tells every rank
        return 1.0

    def switch_to_lowrank():
        t.engine_phase = "lowrank"

    def evaluate(final=False):
        calls.append(f"eval {t.step}{' final' if final else ''}")
        return {"step": t.step, "val_loss": 2.0}

    _stub(t, tmp_path, cfg, _stop_signal=15 if stop_at else 0, _stop_agreed_now=lambda: False,
          _train_step=train_step, _switch_to_lowrank=switch_to_lowrank, evaluate=evaluate,
          save=lambda: calls.append(f"save {t.step}"))
    last = stop_at or 12
    result = t.train()
    assert result == ({"preempted": True, "step": stop_at} if stop_at else {"step": 12, "val_loss": 2.0})
    want = [f"step {s}" for s in range(1, last + 1)] + [f"eval {s}" for s in (5, 10) if s <= last]
    want = sorted(want, key=lambda c: (int(c.split()[1]), c.startswith("eval")))
    assert calls == want + [f"save {last}"] + (["eval 12 final"] if last == 12 else [])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == ([2, 5, 7] if stop_at == 7 else [2, 5, 10, 12])
    assert (records[-1] == {"event": "preempted", "step": stop_at}) == bool(stop_at)


def test_a_finished_run_resumed_with_a_stop_signal_still_finishes(tmp_path, monkeypatch):
    """Resumed at total_steps (nothing left to train) with a stop signal during start-up: the run ends as a
    finished one (its owed final evaluation, its export), not "preempted", after which the SLURM scripts would
    requeue it again and again. (A mutation trial's survivor: the start-up stop not limited to unfinished runs.)"""
    from relora_ds import trainer as trainer_mod
    from relora_ds.train_config import TrainConfig

    monkeypatch.setattr(trainer_mod, "offloaded", lambda engine: "none")
    cfg = TrainConfig(mode="relora", warm_start_steps=2, cycle_length=4, restart_warmup_steps=1, warmup_steps=1,
                      total_steps=12, log_every=1, eval_every=4, save_every=2, global_batch_size=8,
                      micro_batch_size=4, seq_len=32, export=True, warm_start_lr=5e-4, output_dir=str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 13)))
    t = trainer_mod.Trainer.__new__(trainer_mod.Trainer)
    calls = []
    _stub(t, tmp_path, cfg, world=1, step=12, engine_phase="lowrank", _stop_signal=15, _any_rank=lambda flag: flag,
          _train_step=lambda: pytest.fail("a step trained"), evaluate=lambda final=False: calls.append(
              f"eval 12{' final' if final else ''}") or {"step": 12, "val_loss": 2.0},
          export=lambda out: calls.append(f"export {out.name}"), save=lambda: pytest.fail("saved"))
    assert t.train() == {"step": 12, "val_loss": 2.0}
    assert calls == ["eval 12 final", "export hf"]
    assert not any(r.get("event") == "preempted" for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text()
                                                             .splitlines()))
