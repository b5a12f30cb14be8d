"""What a run writes, on stubs, no engine and no launcher: the metrics log on resume, the files
--overwrite clears, W&B and TensorBoard records, run_info.jsonl. (tokens_per_s against a fake clock:
test_throughput_metric.py; runs through DeepSpeed: tests/test_trainer.py.)"""
import json
import re
import time

import pytest


def test_resume_moves_metrics_of_steps_it_trains_again_aside(tmp_path):
    """A run that died after its last checkpoint (step 5) had logged steps 6-8 and half a line: the resumed
    run trains 6-8 again, so metrics.jsonl keeps each step once (records up to 5, step-less records) and the
    dropped records, the cut line too (no JSON reader could read past it), are kept in metrics.rewound.jsonl;
    a resume without a checkpoint starts from 0."""
    from relora_ds.metrics import MetricsLogger

    lines = [json.dumps({"step": s, "loss": 10.0 - s}) for s in range(1, 9)] + [json.dumps({"event": "start"})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "lo')
    m = MetricsLogger(tmp_path, enabled=True, resume_step=5)
    m.log({"step": 6, "loss": 3.5})
    m.close()
    kept = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert kept == lines[:5] + [lines[8], json.dumps({"step": 6, "loss": 3.5})]
    moved = (tmp_path / "metrics.rewound.jsonl").read_text().splitlines()
    assert m.rewound == 4 and moved == lines[5:8] + ['{"step": 9, "lo']
    assert MetricsLogger(tmp_path, enabled=True, resume_step=0).rewound == 6  # steps 1-5 and the new 6
    assert MetricsLogger(tmp_path / "fresh", enabled=True, resume_step=3).rewound == 0


def test_a_record_cut_before_its_newline_and_a_rewind_cut_short_lose_nothing(tmp_path, monkeypatch):
    """Found by a review: a whole last record without its newline (a short write at a full disk, a power loss)
    was kept as it was, so the resumed run's first record was glued to it and a later rewind moved both out of
    metrics.jsonl (step 4's loss lost for good); and a start that moved records to metrics.rewound.jsonl, then
    died before rewriting metrics.jsonl, made its retry move them there twice."""
    from relora_ds import metrics
    from relora_ds.metrics import MetricsLogger

    lines = [json.dumps({"step": s, "loss": 10.0 - s}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))  # no newline after step 3's record
    m = MetricsLogger(tmp_path, enabled=True, resume_step=3)
    m.log({"step": 4, "loss": 5.6})
    m.close()
    assert MetricsLogger(tmp_path, enabled=True, resume_step=4).rewound == 0
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    real = metrics.replace_durably

    def dies(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(metrics, "replace_durably", dies)
    with pytest.raises(OSError):
        MetricsLogger(tmp_path, enabled=True, resume_step=2)
    monkeypatch.setattr(metrics, "replace_durably", real)
    assert MetricsLogger(tmp_path, enabled=True, resume_step=2).rewound == 2
    moved = [json.loads(l)["step"] for l in (tmp_path / "metrics.rewound.jsonl").read_text().splitlines()]
    assert moved == [3, 4] and [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
                                ] == [1, 2]


def test_overwrite_clears_every_output_of_the_previous_run(tmp_path, monkeypatch):
    """--overwrite: checkpoints, TensorBoard logs, export, metrics (the rewound ones too) and the plot go;
    anything else in output_dir stays."""
    from types import SimpleNamespace

    from relora_ds import output_dir
    from relora_ds import trainer as trainer_mod
    monkeypatch.setattr(trainer_mod, "on_rank_zero", lambda fn: fn())  # one process: rank 0 alone
    for d in ("checkpoints/step_4", "tensorboard", "hf", "wandb/run-1"):  # wandb/: W&B's local run files
        (tmp_path / d).mkdir(parents=True)
    for f in ("metrics.jsonl", "metrics.rewound.jsonl", "wandb_run_id", "run_info.jsonl", "curves.png", "notes.txt"):
        (tmp_path / f).write_text("x")
    trainer_mod.Trainer._clear_output_dir(SimpleNamespace(rank=0, out=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    # Found by a review: what rmtree could not delete was ignored. A symlinked checkpoints folder (rmtree refuses
    # links: nothing went, and the next --resume loaded the old run's latest) is emptied, the link kept; a file
    # that cannot be deleted stops the run, named (the old step_6 was resumed as the new run's).
    scratch = tmp_path.parent / f"{tmp_path.name}_scratch"
    (scratch / "step_8").mkdir(parents=True)
    (scratch / "latest").write_text("step_8")
    (tmp_path / "checkpoints").symlink_to(scratch)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_text("x")
    trainer_mod.Trainer._clear_output_dir(SimpleNamespace(rank=0, out=tmp_path))
    assert (tmp_path / "checkpoints").is_symlink() and not any(scratch.iterdir()) and not (tmp_path / "hf").exists()
    (tmp_path / "checkpoints" / "step_6").mkdir()
    (tmp_path / "checkpoints" / "step_6" / "config.json").write_text("{}")
    real_unlink = output_dir.os.unlink

    def refused(path, *args, **kwargs):  # what a read-only folder (or chattr +i) does for a user who is not root
        if str(path).endswith("config.json"):
            raise PermissionError(1, "Operation not permitted", str(path))
        return real_unlink(path, *args, **kwargs)
    monkeypatch.setattr(output_dir.os, "unlink", refused)
    with pytest.raises(ValueError, match=r"--overwrite: 2 path\(s\) of the previous run in .* could not be deleted, "
                                         r"e.g. \[.*step_6/config.json \(\[Errno 1\] Operation not permitted.*\]; "
                                         r"delete them"):
        trainer_mod.Trainer._clear_output_dir(SimpleNamespace(rank=0, out=tmp_path))


def test_wandb_gets_every_metric_and_a_requeued_job_continues_its_run(tmp_path, monkeypatch):
    """wandb_project: each record's numbers go to W&B (events' under their name) against our step; the run id
    is kept in output_dir, so the next start (a resume, a requeue) continues the same run. (A stand-in wandb
    module: the package is not a dependency.)"""
    import sys
    import types

    from relora_ds.metrics import MetricsLogger
    from relora_ds.train_config import TrainConfig

    calls = []

    class Run:
        def define_metric(self, name, step_metric=None):
            calls.append(("define_metric", name, step_metric))

        def log(self, data):
            calls.append(("log", data))

        def mark_preempting(self):
            calls.append(("mark_preempting",))

        def finish(self, exit_code=0):
            calls.append(("finish", exit_code))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    m = MetricsLogger(tmp_path, enabled=True, wandb_project="relora", run_config={"train": {"lr": 1e-3}})
    m.log({"step": 1, "loss": 5.0, "lr": 1e-3, "phase": "full", "grad_norm": None})
    m.log({"event": "reset", "step": 2, "pruned_fraction": 0.99, "reset": True})
    m.log({"event": "switch_to_relora", "step": 3})  # no numbers: no empty W&B row (there was, a user trial)
    m.preempting()
    m.close()
    init = calls[0][1]
    assert init["project"] == "relora" and init["resume"] == "allow" and init["config"] == {"train": {"lr": 1e-3}}
    assert (tmp_path / "wandb_run_id").read_text() == init["id"]
    assert ("define_metric", "*", "step") in calls
    assert [c[1] for c in calls if c[0] == "log"] == [{"loss": 5.0, "lr": 1e-3, "step": 1},
                                                      {"reset/pruned_fraction": 0.99, "step": 2}]
    assert calls[-2:] == [("mark_preempting",), ("finish", 0)]  # a stop to be resumed, not a finished run
    calls.clear()
    MetricsLogger(tmp_path, enabled=True, resume_step=2, wandb_project="relora").close(exit_code=3)
    assert calls[0][1]["id"] == init["id"]  # the same W&B run
    assert calls[-1] == ("finish", 3)  # a NaN stop (launch/train.py's status 3): the W&B run is marked failed
    calls.clear()
    # An id file a crash left empty (a review: it was written in place, unflushed, and "" passed to wandb.init):
    # a new id, written through a flushed temporary file.
    (tmp_path / "wandb_run_id").write_text("")
    MetricsLogger(tmp_path, enabled=True, resume_step=2, wandb_project="relora").close()
    assert re.fullmatch(r"[0-9a-f]{12}", calls[0][1]["id"]) and calls[0][1]["id"] != init["id"]
    assert (tmp_path / "wandb_run_id").read_text() == calls[0][1]["id"]
    calls.clear()
    MetricsLogger(tmp_path, enabled=False, wandb_project="relora").close()  # ranks other than 0: no run
    assert calls == []
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else object())
    with pytest.raises(ValueError, match="wandb_project='relora' needs the wandb package, which is not installed"):
        TrainConfig(cycle_length=4, total_steps=8, wandb_project="relora")


def test_run_info_records_what_the_run_ran_on(tmp_path):
    """run_info.environment against independent sources: this checkout's git HEAD, the installed versions,
    the command line; append() adds one line per start."""
    import subprocess
    import sys

    import torch

    from launch_utils import ROOT
    from relora_ds import run_info

    env = run_info.environment(world_size=2)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI clones one)
        assert env["git"]["commit"] == head.stdout.strip() and isinstance(env["git"]["dirty"], bool)
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or \
        env["versions"]["torch"] == torch.__version__
    import deepspeed
    assert env["versions"]["deepspeed"] == deepspeed.__version__
    assert env["argv"] == sys.argv and env["world_size"] == 2 and env["host"]
    run_info.append(tmp_path, {**env, "resume_step": None})
    run_info.append(tmp_path, {**env, "resume_step": 8})
    lines = [json.loads(l) for l in (tmp_path / "run_info.jsonl").read_text().splitlines()]
    assert [r["resume_step"] for r in lines] == [None, 8] and lines[0]["versions"] == env["versions"]


def test_run_info_git_names_the_commit_and_dirtiness_of_a_checkouts_top_only(tmp_path):
    """run_info._git on a fresh `git init` repository: its HEAD (git's own rev-parse) and dirty False when
    clean, untracked files not counted; dirty True once a tracked file is modified; None for a subdirectory
    that is not the repository's top level (relora_ds installed inside another repository) and outside git
    (a mutation trial found dirty and the top-level check untested)."""
    import subprocess

    from relora_ds import run_info

    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)

    def git(*a):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *a],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (repo / "sub" / "f.txt").write_text("one\n")
    git("add", "sub/f.txt")
    git("commit", "-q", "-m", "first")
    (repo / "untracked.txt").write_text("x\n")
    assert run_info._git(repo) == {"commit": git("rev-parse", "HEAD"), "dirty": False}
    (repo / "sub" / "f.txt").write_text("two\n")
    assert run_info._git(repo) == {"commit": git("rev-parse", "HEAD"), "dirty": True}
    assert run_info._git(repo / "sub") is None
    (tmp_path / "plain").mkdir()
    assert run_info._git(tmp_path / "plain") is None


def test_tensorboard_keeps_each_step_once_after_a_resume(tmp_path):
    """A run logged steps 1-8 and died after its step-5 checkpoint; the resumed run logs 6-8 anew. Read back
    with TensorBoard's own reader: every step once, 1-5 from the first run (5 included), 6-8 the new values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from relora_ds.metrics import MetricsLogger

    first = MetricsLogger(tmp_path, enabled=True)
    for s in range(1, 9):
        first.log({"step": s, "loss": float(s)})
    first.close()
    # A resumed run is a later process: its event file's name (seconds, host, pid, then a per-process counter)
    # sorts after the first run's. In one process within one second, the counter decides, as text ("10" < "9").
    time.sleep(1.1)
    resumed = MetricsLogger(tmp_path, enabled=True, resume_step=5)
    for s in range(6, 9):
        resumed.log({"step": s, "loss": 100.0 + s})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    got = {e.step: e.value for e in events.Scalars("loss")}
    assert got == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0, 6: 106.0, 7: 107.0, 8: 108.0}


def test_an_events_numbers_reach_tensorboard_under_its_name(tmp_path):
    """A reset's pruned fractions are 'reset/exp_avg', as in W&B, not an 'exp_avg' chart that reads like an
    Adam statistic (found by a review); a training record's own keys stay as they are."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from relora_ds.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, enabled=True)
    logger.log({"step": 4, "loss": 2.5, "lr": 1e-3})
    logger.log({"event": "reset", "step": 4, "exp_avg": 0.99, "exp_avg_sq": 0.98, "merged": True})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "lr", "reset/exp_avg", "reset/exp_avg_sq"]
    assert events.Scalars("reset/exp_avg")[0].value == pytest.approx(0.99)


def test_run_info_records_the_slurm_jobs_variables(monkeypatch):
    """The scheduler's job in run_info: the SLURM variables of SLURM_VARS that are set, none other (a mutation
    trial found the record untested)."""
    from relora_ds import run_info

    for k in run_info.SLURM_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "16")
    assert run_info.environment(world_size=1)["slurm"] == {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "2"}


def test_a_resume_without_a_checkpoint_moves_the_dead_runs_records_aside_and_close_unlocks(tmp_path, monkeypatch):
    """--resume where the previous run died before its first checkpoint: this run starts at step 0 and trains
    steps 1, 2... again, so the records that run logged move to metrics.rewound.jsonl (resume step 0, as
    run_info.jsonl says), not kept beside the new ones; and close() releases the output_dir lock the Trainer
    took. (A mutation trial's survivors: the resume step None there, which rewinds nothing; close() keeping
    the lock.) In process, on stubs (trainer_utils.in_process_trainer)."""
    from relora_ds.output_dir import holds_output_dir_lock
    from relora_ds.train_config import TrainConfig
    from trainer_utils import in_process_trainer, packed_data_dir

    trainer_mod = in_process_trainer(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    dead = [{"step": 1, "loss": 6.0}, {"step": 2, "loss": 5.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dead))
    cfg = TrainConfig(model="debug", seq_len=32, data_dir=str(packed_data_dir(tmp_path / "data", 4_000, 400)),
                      output_dir=str(run), rank=4, cycle_length=4, restart_warmup_steps=2, warmup_steps=2,
                      total_steps=12, micro_batch_size=4, global_batch_size=8, eval_every=0, export=False, resume=True)
    t = trainer_mod.Trainer(cfg)
    assert holds_output_dir_lock(run)
    # A second Trainer on that dir in the same process (a notebook) takes the held lock; its close() leaves it to
    # the first, still live (a review: it released the first's lock, letting a run elsewhere in)
    second = trainer_mod.Trainer(cfg)
    second.metrics.close()
    second.close()
    assert holds_output_dir_lock(run)
    t.metrics.close()
    t.close()
    assert not holds_output_dir_lock(run)
    assert (run / "metrics.jsonl").read_text() == ""
    assert [json.loads(l) for l in (run / "metrics.rewound.jsonl").read_text().splitlines()] == dead
    assert json.loads((run / "run_info.jsonl").read_text().splitlines()[-1])["resume_step"] == 0
