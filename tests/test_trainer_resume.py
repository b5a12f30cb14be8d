"""The trainer's resume on 2 CPU ranks (gloo): a crash while saving, a stop signal during start-up, new
settings (lr, cycle_length), a finished run extended, a rewind and requeue, dropout masks, other data. Onto
another engine layout (ranks, ZeRO stage, offload, precision): tests/test_trainer_resume_layouts.py."""
import json
import math
import os
import re
import textwrap

import pytest
import torch

from launch_utils import ROOT, run_ranks
from trainer_utils import read_losses, rewind_to, train1, train2, write

@pytest.mark.parametrize("save_every, crash_at", [(3, 9), (7, 12), (2, 4)],
                         ids=["after-reset", "in-restart-warmup", "at-warm-start-switch"])
def test_crash_while_saving_then_exact_resume(tmp_path, small_data_dir, uninterrupted_run, save_every, crash_at):
    """Die inside the save at `crash_at`: `latest` must still name the previous checkpoint (step 6: right
    after the reset at 6; step 7: inside its restart warmup, the crash in the run's last save; step 2: written
    by the full-rank engine at the end of the warm start, so the resumed run must switch to ReLoRA itself),
    and resuming from it reproduces the uninterrupted run's losses bit for bit, and its final weights: the
    last reset's new lora_A and the merge counts, which no loss of the run sees (the step after a reset
    trains at lr 0, B stays 0)."""
    overrides = dict(save_every=save_every)
    proc = train2(tmp_path, small_data_dir, env={"RELORA_TEST_CRASH_IN_SAVE": str(crash_at)}, check=False,
                  **overrides)
    assert proc.returncode != 0
    ckpts = tmp_path / "run" / "checkpoints"
    resume_step = (crash_at - 1) // save_every * save_every
    assert (ckpts / "latest").read_text() == f"step_{resume_step}"
    assert (ckpts / f"step_{crash_at}").exists()  # the partial one is there, but not pointed to
    stale = ckpts / f"step_{crash_at}" / "zero_pp_rank_7_mp_rank_00_optim_states.pt"  # as from another world size
    stale.write_bytes(b"stale shard")
    os.remove(tmp_path / "run" / "metrics.jsonl")
    train2(tmp_path, small_data_dir, "--resume", **overrides)
    assert not stale.exists()  # the partial directory was cleared before the step was saved again
    resumed, _ = read_losses(tmp_path / "run")
    assert min(resumed) == resume_step + 1
    reference, _ = uninterrupted_run["losses"]
    from relora_ds.checkpoint import full_state_dict
    ours = full_state_dict(ckpts, "step_12")
    theirs = full_state_dict(uninterrupted_run["run_dir"] / "checkpoints", "step_12")
    assert ours.keys() == theirs.keys() and any(k.endswith("lora_A") for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])]
    for step, loss in resumed.items():
        assert loss == reference[step], f"step {step}: resumed {loss!r} != uninterrupted {reference[step]!r}"


def test_a_stop_signal_during_start_up_stops_every_rank_before_the_first_step(tmp_path, small_data_dir,
                                                                               uninterrupted):
    """USR1 reaching one rank before its Trainer exists (SLURM's warning can come while a big model loads;
    before, the SLURM scripts had to drop it, or it killed the rank, and the job ended without a requeue):
    launch/train.py records it, both ranks stop before step 1 with the "preempted" record the scripts requeue
    on, exit 0 and save nothing; the requeued command (--resume) then trains the run exactly."""
    wrapper = tmp_path / "signal_at_start.py"  # launch/train.py's own lines, with USR1 to rank 1 before main()
    wrapper.write_text(textwrap.dedent(f"""
        import os, runpy, signal
        train = runpy.run_path({str(ROOT / "launch/train.py")!r}, run_name="train")  # as imported: no main()
        train["catch_early_stops"]()  # what its __main__ does first
        if os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGUSR1)
        from relora_ds.distributed import run_and_exit
        run_and_exit(train["main"])
    """))
    recipe, ds = write(tmp_path, small_data_dir)
    proc = run_ranks(wrapper, "--config", recipe, "--deepspeed", ds)
    assert ("stopped by signal on another rank during start-up, before training a step: nothing to save "
            "(nothing trained since the start)") in proc.stdout + proc.stderr
    _, recs = read_losses(tmp_path / "run")
    assert [r for r in recs if "step" in r] == [{"event": "preempted", "step": 0}]
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))
    train2(tmp_path, small_data_dir, "--resume")
    resumed, recs = read_losses(tmp_path / "run")
    assert resumed == uninterrupted[0]
    assert recs[-1].get("event") != "preempted" and len([r for r in recs if r.get("event") == "preempted"]) == 1


def test_ctrl_c_finishes_the_step_saves_and_stops_a_second_aborts(tmp_path, small_data_dir, capfd):
    """A user's Ctrl-C (found by a user-journey review: a KeyboardInterrupt traceback, and every step since the
    last checkpoint lost). The first SIGINT stops the run as SIGTERM does: the step finishes, a checkpoint of
    it is saved, the "preempted" record, exit 0 (a plain one-process run here; under the deepspeed launcher
    every rank gets the terminal's SIGINT). A second SIGINT raises KeyboardInterrupt at once (under torchrun,
    which passes the terminal's SIGINT on, a third: tests/test_diff_review2.py)."""
    import signal
    import subprocess
    import sys
    import time

    from launch_utils import free_port, launch_env
    recipe, ds = write(tmp_path, small_data_dir, total_steps=200, eval_every=0, save_every=0)
    env = {**launch_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch/train.py"), "--config", str(recipe), "--deepspeed",
                             str(ds)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.is_file() and '"step": 3,' in metrics.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()  # a run still going would make communicate() wait out its 200 steps
            pytest.fail(f"the run ended or did not reach step 3 within 300 s: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "interrupted: finishing the step, saving a checkpoint" in err and "KeyboardInterrupt" not in err
    _, recs = read_losses(tmp_path / "run")
    n = recs[-1]["step"]
    assert recs[-1] == {"event": "preempted", "step": n} and 3 <= n < 200
    assert max(r["step"] for r in recs if "loss" in r) == n  # no step trained after the signal's step
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == f"step_{n}"
    assert f"stopped by signal {int(signal.SIGINT)} after step {n}; checkpoint saved" in out + err

    from relora_ds.trainer import Trainer
    t = Trainer.__new__(Trainer)
    t.rank, t._stop_signal, t._interrupted = 0, 0, 0
    t._request_stop(signal.SIGINT, None)
    assert t._stop_signal == signal.SIGINT and "Ctrl-C again to abort without saving" in capfd.readouterr().err
    t._request_stop(signal.SIGTERM, None)  # the deepspeed launcher's TERM after the terminal's SIGINT
    assert t._stop_signal == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        t._request_stop(signal.SIGINT, None)


def test_resume_applies_the_recipes_new_lr(tmp_path, small_data_dir):
    """Resuming with another lr (the advice after a divergence) trains with it: DeepSpeed restores the old
    one into the param groups and LambdaLR unless the trainer re-applies the recipe's."""
    from relora_ds.schedule import jagged_cosine

    train1(tmp_path, small_data_dir, save_every=6, warm_start_lr=5e-4)
    _, recs = read_losses(tmp_path / "run")
    # The full-rank warm start (steps 1-2) peaks at warm_start_lr, the ReLoRA phase at lr.
    kw = dict(total_steps=12, warmup_steps=2, cycle_length=4, restart_warmup_steps=2, start_step=2)
    assert [r["lr"] for r in recs if "loss" in r][:6] == pytest.approx(
        [(5e-4 if s <= 2 else 3e-3) * jagged_cosine(s - 1, **kw) for s in range(1, 7)], rel=1e-6)
    assert [r["lr"] for r in recs if "loss" in r][1] > 0
    first_val = {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}
    rewind_to(tmp_path / "run", "step_6")
    train1(tmp_path, small_data_dir, "--resume", "--lr", "1e-3", "--adam-beta2", "0.95", save_every=6,
            warm_start_lr=5e-4)
    losses, recs = read_losses(tmp_path / "run")
    assert sorted(losses) == list(range(7, 13))
    # The log lost the step-6 evaluation, which runs after step 6's checkpoint (as a job killed during it
    # would): the resumed run evaluates step 6 first, on the weights of that checkpoint.
    assert [r["val_loss"] for r in recs if r.get("step") == 6 and "val_loss" in r] == [first_val[6]]
    logged = [r["lr"] for r in recs if "loss" in r]
    want = [1e-3 * jagged_cosine(s - 1, **kw) for s in range(7, 13)]
    assert logged == pytest.approx(want, rel=1e-6) and max(want) > 0
    event = next(r for r in recs if r.get("event") == "resume_settings_changed")
    assert event["lr"] == "0.003 -> 0.001" and event["adam_beta2"] == "0.999 -> 0.95"
    # The same resume with a tighter --grad-clip: DeepSpeed's ZeRO-2 optimizer took the clip saved in the
    # checkpoint (found by a review: the losses equalled the clip-1.0 resume's at every step). Steps 7 and 8
    # come before any update that can differ (step 7 trains at lr 0 after the reset at 6); then they differ.
    rewind_to(tmp_path / "run", "step_6")
    train1(tmp_path, small_data_dir, "--resume", "--lr", "1e-3", "--adam-beta2", "0.95", "--grad-clip", "0.001",
           save_every=6, warm_start_lr=5e-4)
    clipped, recs = read_losses(tmp_path / "run")
    assert [clipped[s] == losses[s] for s in range(7, 13)] == [True, True, False, False, False, False]
    assert next(r for r in recs if r.get("event") == "resume_settings_changed")["grad_clip"] == "1.0 -> 0.001"
    # Killed during its final evaluation (after the final checkpoint): resumed at step 12, nothing is left to
    # train, and the run still logs the final validation loss, that of the step-12 checkpoint.
    final_val = [r for r in recs if r.get("step") == 12 and "val_loss" in r]
    assert len(final_val) == 1
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in recs if not (r.get("step") == 12 and "val_loss" in r)))
    train1(tmp_path, small_data_dir, "--resume", "--lr", "1e-3", "--adam-beta2", "0.95", "--grad-clip", "0.001",
           save_every=6, warm_start_lr=5e-4)
    _, recs = read_losses(tmp_path / "run")
    assert [r["val_loss"] for r in recs if r.get("step") == 12 and "val_loss" in r] == [final_val[0]["val_loss"]]


def test_a_changed_cycle_length_counts_from_the_checkpoints_last_reset(tmp_path, small_data_dir):
    """Resumed at step 8 (resets at 6 and 10 with cycle 4) with cycle_length 3: the cycles count from the reset
    at 6, so the next resets are at 9 and 12 and the lr follows the jagged cosine anchored there (written out
    by hand below). Counted from the switch at 2, as before, they came at 11 only, and the lr skipped the
    restart warmup a trial saw (full lr right after a 99% prune). Extended again with the same 3, the run keeps
    that anchor, which the checkpoint records: a reset at 15."""
    train1(tmp_path, small_data_dir, save_every=4)
    rewind_to(tmp_path / "run", "step_8")
    proc = train1(tmp_path, small_data_dir, "--resume", "--cycle-length", "3", save_every=4)
    assert ("cycle_length 4 -> 3: cycles now count from the reset at step 6, the checkpoint's last; the next reset "
            "is at step 9") in proc.stdout + proc.stderr
    losses, recs = read_losses(tmp_path / "run")
    assert sorted(losses) == [9, 10, 11, 12]
    assert [r["step"] for r in recs if r.get("event") == "reset"] == [9, 12]
    # By hand: LambdaLR's step i = logged step - 1; the run's cosine from 1 to 0.1 over steps 2..12; cycles of 3
    # from the reset at 6, so i = 9 (the step after the reset at 9) is 0 and i = 10 half-way up the 2-step ramp.
    cos = lambda i: 0.1 + 0.45 * (1 + math.cos(math.pi * (i - 2) / 10))  # noqa: E731
    want = [3e-3 * cos(8), 0.0, 3e-3 * 0.5 * cos(11), 3e-3 * cos(11)]
    assert [r["lr"] for r in recs if "loss" in r] == pytest.approx(want, rel=1e-6, abs=1e-12)
    progress = json.loads((tmp_path / "run/checkpoints/step_12/config.json").read_text())["progress"]
    assert (progress["cycle_start"], progress["cycles_before"]) == (6, 1)
    proc = train1(tmp_path, small_data_dir, "--resume", "--cycle-length", "3", "--total-steps", "15", save_every=4)
    assert "cycles now count" not in proc.stdout + proc.stderr
    _, recs = read_losses(tmp_path / "run")
    assert [r["step"] for r in recs if r.get("event") == "reset"] == [9, 12, 15]
    progress = json.loads((tmp_path / "run/checkpoints/step_15/config.json").read_text())["progress"]
    assert (progress["cycle_start"], progress["cycles_before"]) == (6, 1)  # carried over, not counted anew


def test_a_shorter_cycle_length_that_has_already_ended_resets_on_resume(tmp_path, small_data_dir):
    """Resumed at step 8 (a reset at 6, cycle 4) with cycle_length 2, whose first reset from 6 falls at 8: the
    reset is overdue, done right after the load, and the cycles count from 8 (resets at 8, 10, 12). The oracle:
    the same change resumed at step 6, where the reset at 8 comes in its turn (its steps 7-8 train at the lrs
    the cycles of 4 gave them, the restart warmup being 2 either way): steps 9-12 bit for bit. Left at 6, the
    run trained step 9 at lr 0 with no reset behind it, and the first reset came at 10 (a review)."""
    train1(tmp_path, small_data_dir, save_every=2)
    rewind_to(tmp_path / "run", "step_8")
    proc = train1(tmp_path, small_data_dir, "--resume", "--cycle-length", "2", save_every=2)
    assert ("cycle_length 4 -> 2: the checkpoint's last reset (step 6) is a whole new cycle or more back, so the "
            "reset is overdue: it is done now, at step 8, and cycles count from here; the next reset is at step 10"
            ) in proc.stdout + proc.stderr
    overdue, recs = read_losses(tmp_path / "run")
    resets = [(r["step"], r.get("overdue", False)) for r in recs if r.get("event") == "reset"]
    assert resets == [(8, True), (10, False), (12, False)]
    lrs = [r["lr"] for r in recs if "loss" in r]
    progress = json.loads((tmp_path / "run/checkpoints/step_12/config.json").read_text())["progress"]
    assert (progress["cycle_start"], progress["cycles_before"]) == (8, 2)
    # Resumed from the same checkpoint again (a requeue before the next save): done again, logged once.
    rewind_to(tmp_path / "run", "step_8")
    (tmp_path / "run/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs if r["step"] <= 8))
    train1(tmp_path, small_data_dir, "--resume", "--cycle-length", "2", save_every=2)
    again, recs = read_losses(tmp_path / "run")
    assert again == overdue and [r["step"] for r in recs if r.get("event") == "reset"] == [8, 10, 12]
    rewind_to(tmp_path / "run", "step_6")
    train1(tmp_path, small_data_dir, "--resume", "--cycle-length", "2", save_every=2)
    in_turn, recs = read_losses(tmp_path / "run")
    assert [r["step"] for r in recs if r.get("event") == "reset"] == [8, 10, 12]
    assert [in_turn[s] for s in range(9, 13)] == [overdue[s] for s in range(9, 13)]
    assert [r["lr"] for r in recs if "loss" in r and r["step"] > 8] == lrs
    assert lrs[0] == 0.0 and lrs[2] == 0.0  # steps 9 and 11: right after a reset


def test_a_finished_run_extended_with_resume_keeps_its_last_reset(tmp_path, small_data_dir):
    """The reset at a run's last step is done too, so `--resume --total-steps` longer continues from a
    checkpoint taken after it (it used to be skipped there, and never done)."""
    train2(tmp_path, small_data_dir, total_steps=10, eval_every=0)
    train2(tmp_path, small_data_dir, "--resume", "--total-steps", "14", total_steps=10, eval_every=0)
    losses, recs = read_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 15))
    assert [r["step"] for r in recs if r.get("event") == "reset"] == [6, 10, 14]
    assert [r for r in recs if r.get("event") == "resume_settings_changed"][0]["total_steps"] == "10 -> 14"


def test_resume_from_an_earlier_checkpoint_and_requeue(tmp_path, small_data_dir, uninterrupted):
    """--resume-from step_4 of a finished run (checkpoints 4, 8, 12) goes back there: the later checkpoints
    and metrics move aside (kept), and the run retrains steps 5-12 with the uninterrupted run's losses bit for
    bit. The same command again (a requeued job) continues the rewound run instead of going back again; a
    total_steps below the checkpoint's step is refused, not a silent no-op."""
    from relora_ds.metrics import MetricsLogger

    import torch

    proc = train2(tmp_path, small_data_dir, save_every=4)
    # No terminal here (as in a SLURM .out file): plain progress lines instead of the bar.
    assert re.search(r"step 12/12 \| loss \d+\.\d+ \| lr .* \| left ~0:00:00", proc.stdout + proc.stderr)
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    client = torch.load(ckpts / "step_4" / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["step"] == 4 and client["step_events_done"] is True  # no merge catch-up for it on resume
    assert client["tokens_seen"] == 4 * 8 * 32  # steps x global batch x seq_len
    # config.json says the same, for a token-budget resume that plans its length before any engine
    progress = json.loads((ckpts / "step_4" / "config.json").read_text())["progress"]
    assert (progress["step"], progress["tokens_seen"]) == (4, 4 * 8 * 32)
    first_12 = (ckpts / "step_12" / "config.json").stat().st_mtime_ns
    proc = train2(tmp_path, small_data_dir, "--resume-from", "step_4", save_every=4)
    assert "moved the later checkpoints to" in proc.stdout + proc.stderr
    assert sorted(p.name for p in (ckpts / "rewound").iterdir()) == ["step_12", "step_8"]
    assert (ckpts / "rewound" / "step_12" / "config.json").stat().st_mtime_ns == first_12  # the old one, kept
    assert (ckpts / "latest").read_text() == "step_12" and (ckpts / "step_8").is_dir()
    resumed, _ = read_losses(run)
    assert sorted(resumed) == list(range(1, 13))
    reference, _ = uninterrupted
    for step, loss in resumed.items():
        assert loss == reference[step], f"step {step}: resumed {loss!r} != uninterrupted {reference[step]!r}"
    _, recs = read_losses(run)  # each checkpoint and evaluation with its time (not in tokens_per_s)
    assert [r["tokens_seen"] for r in recs if "loss" in r] == [s * 8 * 32 for s in range(1, 13)]
    saves = [r for r in recs if r.get("event") == "checkpoint"]
    assert [r["step"] for r in saves] == [4, 8, 12] and all(r["save_seconds"] > 0 for r in saves)
    assert [r["step"] for r in recs if r.get("eval_seconds", 0) > 0] == [6, 12]
    moved = [json.loads(l) for l in (run / MetricsLogger.REWOUND).read_text().splitlines()]
    assert sorted(r["step"] for r in moved if "loss" in r) == list(range(5, 13))
    # The requeue: same command line, the rewound run's step_12 says resume_from=step_4: nothing to go back for.
    proc = train2(tmp_path, small_data_dir, "--resume-from", "step_4", save_every=4)
    assert f"resumed from {ckpts / 'step_12'} at step 12" in proc.stdout + proc.stderr
    assert sorted(p.name for p in (ckpts / "rewound").iterdir()) == ["step_12", "step_8"]
    assert read_losses(run)[0] == resumed
    starts = [json.loads(l) for l in (run / "run_info.jsonl").read_text().splitlines()]
    assert [r["resume_step"] for r in starts] == [None, 4, 12] and all(r["world_size"] == 2 for r in starts)
    assert json.loads((ckpts / "step_12" / "config.json").read_text())["environment"]["versions"] == \
        starts[1]["versions"]
    proc = train1(tmp_path, small_data_dir, "--resume", "--total-steps", "8", check=False, save_every=4)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"checkpoint {ckpts / 'step_12'} is at step 12, past this run's total_steps=8" in proc.stderr
    proc = train1(tmp_path, small_data_dir, "--resume-from", "step_5", check=False, save_every=4)
    assert proc.returncode == 2 and "--resume-from step_5: no complete checkpoint" in proc.stderr
    assert "there: ['step_4', 'step_8', 'step_12']" in proc.stderr


def test_a_resumed_run_draws_the_dropout_masks_the_uninterrupted_one_draws(tmp_path, small_data_dir):
    """LoRA dropout draws from the global RNG: the checkpoint keeps each rank's RNG state, so a resume from
    step 4 trains steps 5-8 with the same masks, hence bit for bit the same losses, as the uninterrupted run
    (without the restore the masks, and the losses, differ). One rank, plain python."""
    overrides = dict(dropout=0.2, total_steps=8, save_every=4, eval_every=0)
    fresh = train1(tmp_path, small_data_dir, **overrides)
    run = tmp_path / "run"
    uninterrupted, _ = read_losses(run)
    rewind_to(run, "step_4")
    again = train1(tmp_path, small_data_dir, "--resume", **overrides)
    # The start-up line counts the model's parameters alike in both phases, the LoRA factors apart.
    full = re.search(r"model: 2 layers, ([\d,]+) parameters;", fresh.stdout + fresh.stderr)
    low = re.search(r"model: 2 layers, ([\d,]+) parameters \(\+ ([\d,]+) LoRA\);", again.stdout + again.stderr)
    assert full and low and full.group(1) == low.group(1), (full, low)
    resumed, _ = read_losses(run)
    assert sorted(resumed) == [5, 6, 7, 8]
    for step, loss in resumed.items():
        assert loss == uninterrupted[step], f"step {step}: resumed {loss!r} != uninterrupted {uninterrupted[step]!r}"
    # Without the rank's saved state the stream is the one a start at step 4 gets (it had been step 0's again,
    # a review's find), and a checkpoint from before each rank had its own stream (its config.json without
    # "dropout_streams": every rank saved the same state) is seeded the same way, said at start-up. Both runs
    # draw the same masks, not the uninterrupted run's.
    import json

    ckpt = run / "checkpoints" / "step_4"
    state = (ckpt / "rng_rank0.pt").read_bytes()
    (ckpt / "rng_rank0.pt").unlink()
    rewind_to(run, "step_4")
    train1(tmp_path, small_data_dir, "--resume", **overrides)
    without_state, _ = read_losses(run)
    (ckpt / "rng_rank0.pt").write_bytes(state)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "dropout_streams"}))
    rewind_to(run, "step_4")
    old = train1(tmp_path, small_data_dir, "--resume", **overrides)
    assert "was written when every rank drew the same LoRA dropout masks" in old.stdout + old.stderr
    old_losses, _ = read_losses(run)
    assert without_state == old_losses and without_state[5] != uninterrupted[5], (without_state, uninterrupted)


def test_resume_on_data_prepared_again_is_one_error_line(tmp_path):
    """A 4-step run (one rank, plain python) on a data dir, then that dir prepared again with more tokens:
    --resume is refused by the start-up check (the checkpoint's recorded data vs the manifest's), one `error:`
    line and exit 2, before the effective configuration is printed (the engine's start). A checkpoint from
    before the record (its config.json without "data") is caught once loaded, by its sampler's window count,
    still one line (launch/train.py's start-up handler covers Trainer.start), and trains no step."""
    from trainer_utils import packed_data_dir

    data = packed_data_dir(tmp_path / "data", 4_000, 3_000)
    overrides = dict(total_steps=4, save_every=4, eval_every=0)
    train1(tmp_path, data, **overrides)
    ckpt = tmp_path / "run" / "checkpoints" / "step_4"
    saved = json.loads((ckpt / "config.json").read_text())
    assert {k: saved["data"][k] for k in ("train_tokens", "train_windows")} == {"train_tokens": 4_000,
                                                                                 "train_windows": 124}
    packed_data_dir(data, 4_100, 3_000)  # prepared again: (4100 - 1) // 32 = 128 windows
    proc = train1(tmp_path, data, "--resume", check=False, **{**overrides, "total_steps": 8})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"\nerror: checkpoint {ckpt} was trained on other data than {data} holds now: its training split had 4,000 " \
           "tokens, 124 windows of seq_len 32, now 4,100 tokens, 128 windows (data fingerprint " in "\n" + proc.stderr
    assert "Traceback" not in proc.stderr and "effective configuration" not in proc.stdout
    (ckpt / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "data"}))
    proc = train1(tmp_path, data, "--resume", check=False, **{**overrides, "total_steps": 8})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"\nerror: checkpoint {ckpt} was trained on 124 windows of training data, but {data} holds 128 windows " \
           "of seq_len 32: other data (another --data-dir, or this one prepared again" in "\n" + proc.stderr
    assert "Traceback" not in proc.stderr
    losses, _ = read_losses(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3, 4]


def test_resume_restores_a_ranks_rng_only_on_its_own_world_size_and_counts_an_old_checkpoints_tokens(tmp_path):
    """Trainer._resume without an engine (stubs stand in for DeepSpeed's load): on the world size the checkpoint
    was written on, the rank's saved RNG state comes back (its LoRA dropout masks go on as uninterrupted); on
    another, rank r's file holds another layout's stream, so the rank is seeded as a start at that step is
    (dropout_seed(seed, step, rank)), its file present or not. A checkpoint from before the token counter
    counts its steps at its own global batch and seq_len. Oracle: torch's generator seeded by hand. (Mutation
    trial: loading the file on another world size, and tokens_seen without seq_len, passed every test.)"""
    from types import SimpleNamespace

    from relora_ds import checkpoint
    from relora_ds.engines import EnginesMixin
    from relora_ds.relora import dropout_seed
    from relora_ds.resume import CheckpointsMixin
    from relora_ds.train_config import TrainConfig

    tag = "step_4"
    (tmp_path / tag).mkdir()
    torch.manual_seed(1234)
    saved_rng = checkpoint.rng_state()
    torch.save(saved_rng, tmp_path / tag / "rng_rank0.pt")
    cfg = TrainConfig(cycle_length=4, restart_warmup_steps=2, total_steps=20, warm_start_steps=2, warm_start_lr=1e-3,
                      dropout=0.1, seed=7)

    def resume(world, saved_world, **client_extra):
        client = {"step": 4, "phase": "lowrank", "sampler": {"num_samples": 32}, "step_events_done": True,
                  **client_extra}
        saved = {"world_size": saved_world, "dropout_streams": 1, "train": {"global_batch_size": 8, "seq_len": 32}}
        t = SimpleNamespace(
            cfg=cfg, world=world, rank=0, step=0, tokens_seen=0, ckpt_dir=tmp_path, engine_phase="lowrank",
            reset_on_resume=False, resume_plan={"tag": tag, "saved": saved, "universal": False},
            batches=SimpleNamespace(num_samples=32, load_state_dict=lambda state: None),
            engine=SimpleNamespace(load_checkpoint=lambda path, tag: (None, client), zero_optimization_stage=lambda: 2),
            _phase=lambda step: "lowrank", _fresh_model=lambda: None, _build_engine=lambda *a, **kw: None,
            _optimizer_as_built=lambda: None, _apply_optimizer_settings=lambda *a: None,
            _catch_up_missed_merge=lambda client: None, _print=lambda *a: None)
        t.load_state_dict = lambda state: CheckpointsMixin.load_state_dict(t, state)
        t._seed_dropout = lambda: EnginesMixin._seed_dropout(t)
        torch.manual_seed(99)  # neither stream
        assert CheckpointsMixin._resume(t) is True
        return t, torch.get_rng_state()

    torch.manual_seed(dropout_seed(7, 4, 0))
    seeded = torch.get_rng_state()
    assert not torch.equal(seeded, saved_rng["torch"])
    t, state = resume(world=2, saved_world=2, tokens_seen=999)
    assert torch.equal(state, saved_rng["torch"]) and (t.step, t.tokens_seen) == (4, 999)
    for world, saved_world in ((1, 2), (2, 1)):
        t, state = resume(world=world, saved_world=saved_world)
        assert torch.equal(state, seeded), (world, saved_world)
        assert t.tokens_seen == 4 * 8 * 32  # written before the counter: steps x its global batch x its seq_len


def test_the_logged_deepspeed_changes_name_each_setting_by_its_whole_path():
    """resume_settings_changed names a changed DeepSpeed setting by its path from the config's top
    (_flat; a mutation trial's survivor kept only the last two levels: "offload_optimizer.device" for
    "zero_optimization.offload_optimizer.device"). Hand-written oracle."""
    from relora_ds.resume import _flat

    ds = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
          "bf16": {"enabled": False}, "gradient_clipping": 1.0}
    assert _flat(ds) == {"zero_optimization.stage": 2, "zero_optimization.offload_optimizer.device": "cpu",
                         "zero_optimization.offload_optimizer.pin_memory": True, "bf16.enabled": False,
                         "gradient_clipping": 1.0}


def test_the_resume_record_names_what_changed_and_not_what_an_older_checkpoint_recorded_as_the_default():
    """_apply_optimizer_settings without an engine (a torch AdamW stands in): the resume_settings_changed record
    names each recipe setting that changed, the world size and a DeepSpeed entry by its path, and leaves out the
    resume flags and the model of an hf_model run whose older checkpoint recorded the default preset ("tiny"
    where this run has none: a mutation trial's survivor logged "tiny -> None"). Hand-written oracle."""
    from types import SimpleNamespace

    from torch.optim.lr_scheduler import LambdaLR

    from relora_ds.resume import CheckpointsMixin
    from relora_ds.train_config import TrainConfig

    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(3))]}], lr=1e-3)
    cfg = TrainConfig(cycle_length=4, restart_warmup_steps=2, total_steps=12, hf_model="/a/hf/dir", resume=True)
    events = []
    t = SimpleNamespace(cfg=cfg, engine=SimpleNamespace(lr_scheduler=LambdaLR(opt, lambda step: 1.0),
                                                        optimizer=SimpleNamespace()),
                        engine_phase="lowrank", _phase_lr=lambda phase: cfg.lr, world=1, step=6, _event=events.append,
                        _group_kinds=lambda: ["lora"], ds={"zero_optimization": {"stage": 2, "offload_optimizer": {
                            "device": "none"}}})
    saved = {"train": {**cfg.to_dict(), "model": "tiny", "total_steps": 8, "resume": False},
             "world_size": 2, "deepspeed": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}}
    CheckpointsMixin._apply_optimizer_settings(t, saved)
    assert events == [{"event": "resume_settings_changed", "step": 6, "total_steps": "8 -> 12", "world_size": "2 -> 1",
                       "deepspeed.zero_optimization.offload_optimizer.device": "cpu -> none"}]


def test_a_lora_checkpoint_resumed_as_relora_resets_where_a_cycle_has_passed(tmp_path, small_data_dir):
    """Found by a review: a mode-lora checkpoint at step 6 (switch at 2) resumed as ReLoRA with cycles of 4
    dropped the lr to 0 and ramped at step 7 with no merge or prune behind it. The LoRA run's last reset is the
    switch: a whole cycle later the first reset is overdue, done right after the load (resets at 6, 10). Oracle:
    the same change resumed at step 5, where the reset at 6 comes in its turn: steps 7-10 bit for bit."""
    train1(tmp_path, small_data_dir, mode="lora", total_steps=10, save_every=1, keep_last=10)
    rewind_to(tmp_path / "run", "step_6")
    proc = train1(tmp_path, small_data_dir, "--resume", total_steps=10, save_every=2, keep_last=10)
    assert ("mode lora -> relora: the checkpoint trained plain LoRA for 4 steps since the switch at step 2, a whole "
            "cycle_length (4) or more, so the first reset is overdue: it is done now, at step 6, and cycles count "
            "from here; the next reset is at step 10") in proc.stdout + proc.stderr
    overdue, recs = read_losses(tmp_path / "run")
    assert [(r["step"], r.get("overdue", False)) for r in recs if r.get("event") == "reset"] == [(6, True),
                                                                                                 (10, False)]
    lrs = [r["lr"] for r in recs if "loss" in r]
    assert lrs[0] == 0.0  # step 7: right after the reset
    rewind_to(tmp_path / "run", "step_5")
    proc = train1(tmp_path, small_data_dir, "--resume", total_steps=10, save_every=2, keep_last=10)
    assert "mode lora -> relora" not in proc.stdout + proc.stderr
    in_turn, recs = read_losses(tmp_path / "run")
    assert [(r["step"], r.get("overdue", False)) for r in recs if r.get("event") == "reset"] == [(6, False),
                                                                                                 (10, False)]
    assert [in_turn[s] for s in range(7, 11)] == [overdue[s] for s in range(7, 11)]
    assert [r["lr"] for r in recs if "loss" in r and r["step"] > 6] == lrs
