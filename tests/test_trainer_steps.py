"""The trainer's optimizer steps on 1 CPU rank: steps DeepSpeed skips (fp16 overflow, a non-finite gradient,
also without ZeRO) keep the lr schedule on the step, and the logged gradient norm and per-record loss (with
and without ZeRO, and across a resume). The 2-rank runs: tests/test_trainer.py."""
import json
import math
import subprocess
import sys

import pytest

from launch_utils import ROOT, free_port, launch_env
from trainer_utils import read_losses, rewind_to, train1, write


def _train1_patched(tmp_path, patch: str, recipe, ds):
    """One rank, plain python, with ``patch`` (Python source) run before launch/train.py in the same process."""
    wrapper = patch + "\nimport sys, runpy\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    env = {**launch_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", wrapper, str(ROOT / "launch/train.py"), "--config", str(recipe),
                           "--deepspeed", str(ds)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("scale_power", [20, 40])
def test_fp16_skipped_steps_keep_the_lr_schedule_on_the_step(tmp_path, small_data_dir, scale_power):
    """An fp16 overflow makes DeepSpeed skip the update and not advance its scheduler; the trainer still
    counts the step (resets come from its counter), so it must advance the schedule itself: else the lr
    is no longer 0 at the resets. A loss scale of 2^20 overflows the first steps for real (DeepSpeed's own
    overflow path; this CPU's fp16 support flag is forced on, as DeepSpeed's CPU accelerator reports none);
    2^40 overflows every step, so the resets find no Adam moments to prune."""
    ds = {"zero_optimization": {"stage": 2}, "fp16": {"enabled": True, "initial_scale_power": scale_power,
                                                      "hysteresis": 1},
          "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}
    (tmp_path / "fp16.json").write_text(json.dumps(ds))
    recipe, _ = write(tmp_path, small_data_dir, eval_every=0, global_batch_size=4)
    _train1_patched(tmp_path, "from deepspeed.accelerator import get_accelerator\n"
                    "type(get_accelerator()).is_fp16_supported = lambda self: True", recipe, tmp_path / "fp16.json")
    _, recs = read_losses(tmp_path / "run")
    skipped = [r["step"] for r in recs if r.get("event") == "step_skipped"]
    assert len(skipped) >= 2 and skipped == sorted(skipped), skipped  # 2^20 -> fits after a few halvings, per engine
    from relora_ds.schedule import jagged_cosine

    logged = [r["lr"] for r in recs if "loss" in r]
    want = [3e-3 * jagged_cosine(s - 1, total_steps=12, warmup_steps=2, cycle_length=4, restart_warmup_steps=2,
                                 start_step=2) for s in range(1, 13)]
    assert logged == pytest.approx(want, rel=1e-6, abs=1e-12)  # 0 at the switch (3) and the resets (7, 11)
    resets = [r for r in recs if r.get("event") == "reset"]
    assert [r["step"] for r in resets] == [6, 10]
    assert all(("prune_skipped" in r) == (scale_power == 40) for r in resets), resets


def test_a_non_finite_gradient_skips_the_update_without_zero_too(tmp_path, small_data_dir):
    """Stage 0 (plain `python launch/train.py`, fp32): DeepSpeed applies any update there, so an inf gradient
    (injected into step 2's backward; the loss stays finite) wrote NaN into every weight, a NaN checkpoint
    and, at the last step, exit 0 (found by a review). Now the step is skipped as ZeRO skips it: weights
    after step 2 equal those after step 1, the schedule stays on the step, training goes on. Injected again at
    step 4, in the low-rank engine that trains on: the skip is undone after its step (a skip left in place
    skipped every later update), steps 5 and 6 update the weights."""
    import torch
    stage0 = tmp_path / "stage0.json"
    stage0.write_text(json.dumps({"zero_optimization": {"stage": 0},
                                  "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    recipe, _ = write(tmp_path, small_data_dir, total_steps=6, eval_every=0, global_batch_size=4, save_every=1,
                      keep_last=6)
    _train1_patched(tmp_path, "import torch\nfrom relora_ds import model as M\ncalls = [0]\n"
                    "orig = M.LlamaModel.forward\n"
                    "def forward(self, *a, **kw):\n"
                    "    h = orig(self, *a, **kw)\n"
                    "    if torch.is_grad_enabled() and self.training:\n"
                    "        calls[0] += 1\n"
                    "        if calls[0] in (2, 4):\n"
                    "            h.register_hook(lambda g: g * float('inf'))\n"
                    "    return h\n"
                    "M.LlamaModel.forward = forward", recipe, stage0)
    losses, recs = read_losses(tmp_path / "run")
    assert [(r["step"], r["reason"]) for r in recs if r.get("event") == "step_skipped"] == \
        [(2, "non-finite gradient norm"), (4, "non-finite gradient norm")]
    assert [r["grad_norm"] is None for r in recs if "loss" in r] == [False, True, False, True, False, False]
    from relora_ds.schedule import jagged_cosine
    want = [3e-3 * jagged_cosine(s - 1, total_steps=6, warmup_steps=2, cycle_length=4, restart_warmup_steps=2,
                                 start_step=2) for s in range(1, 7)]
    assert [r["lr"] for r in recs if "loss" in r] == pytest.approx(want, rel=1e-6, abs=1e-12)

    def weights(tag):
        states = torch.load(tmp_path / "run/checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
        return states["module"]
    w = {s: weights(f"step_{s}") for s in range(1, 7)}  # step 3: lr 0 after the switch
    assert all(torch.equal(w[1][k], w[2][k]) for k in w[1])  # the skipped updates
    assert all(torch.equal(w[3][k], w[4][k]) for k in w[3])
    assert all(torch.isfinite(v).all() for v in w[6].values())
    for a, b in ((4, 5), (5, 6)):  # training went on (step 3 trained at lr 0)
        assert not torch.equal(w[a]["model.embed_tokens.weight"], w[b]["model.embed_tokens.weight"]), (a, b)
    assert all(math.isfinite(v) for v in losses.values())


def test_grad_norm_is_logged_without_zero_too_and_a_record_covers_its_steps(tmp_path, small_data_dir):
    """Stage 0 (plain `python launch/train.py`) logs the same gradient norm as ZeRO-2 records (fp32, 1 rank,
    two micro-batches a step: the norm of the accumulated gradient, after the last);
    with log_every > 1 a record's loss is its steps' mean (found by a review: it was the last step's), and a
    run resumed from a checkpoint logs the records the uninterrupted run logged (a review found the steps
    between the last record and the checkpoint in no record of the resumed run)."""
    stage0 = tmp_path / "stage0.json"
    stage0.write_text(json.dumps({"zero_optimization": {"stage": 0},
                                  "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    norms = {}
    for name, ds in (("zero0", stage0), ("zero2", None)):
        (tmp_path / name).mkdir()
        train1(tmp_path / name, small_data_dir, ds=ds, total_steps=6, eval_every=0, global_batch_size=8)
        _, recs = read_losses(tmp_path / name / "run")
        norms[name] = [r["grad_norm"] for r in recs if "loss" in r]
    assert all(n is not None and n > 0 for n in norms["zero0"]), norms
    assert norms["zero0"] == pytest.approx(norms["zero2"], rel=1e-4)
    # log_every=3: a record holds the mean loss of its steps and its last step's grad_norm and lr; the window
    # also ends at the warm-start switch (after step 2) and at the checkpoint of step 4: records at 2 (steps
    # 1-2), 3, 4 and 6 (steps 5-6, the last).
    each, each_recs = read_losses(tmp_path / "zero2" / "run")
    (tmp_path / "every3").mkdir()
    kw = dict(total_steps=6, eval_every=0, global_batch_size=8, log_every=3, save_every=4)
    train1(tmp_path / "every3", small_data_dir, **kw)
    grouped, recs = read_losses(tmp_path / "every3" / "run")
    assert grouped == {2: (each[1] + each[2]) / 2, 3: each[3], 4: each[4], 6: (each[5] + each[6]) / 2}
    by_step = {r["step"]: r for r in each_recs if "loss" in r}
    assert [(r["grad_norm"], r["lr"], r["phase"]) for r in recs if "loss" in r] == \
        [(by_step[s]["grad_norm"], by_step[s]["lr"], by_step[s]["phase"]) for s in (2, 3, 4, 6)]
    rewind_to(tmp_path / "every3" / "run", "step_4")
    train1(tmp_path / "every3", small_data_dir, "--resume", **kw)
    assert read_losses(tmp_path / "every3" / "run")[0] == {6: grouped[6]}
    # A new run in that output_dir is refused (it would mix the runs); --overwrite starts over there.
    proc = train1(tmp_path / "zero2", small_data_dir, check=False, total_steps=3, eval_every=0, global_batch_size=4)
    assert proc.returncode == 2 and "holds a run (latest, metrics.jsonl): pass --resume" in proc.stderr, proc.stderr
    # --overwrite deletes only once every check passed: a refused run leaves the old one alone.
    proc = train1(tmp_path / "zero2", small_data_dir, "--overwrite", check=False, total_steps=2, eval_every=0,
                   global_batch_size=4)
    assert proc.returncode == 2 and "warm_start_steps=2 leaves no low-rank steps" in proc.stderr, proc.stderr
    assert (tmp_path / "zero2/run/checkpoints/latest").read_text() == "step_6"
    train1(tmp_path / "zero2", small_data_dir, "--overwrite", total_steps=3, eval_every=0, global_batch_size=4)
    losses, _ = read_losses(tmp_path / "zero2" / "run")
    assert sorted(losses) == [1, 2, 3] and (tmp_path / "zero2/run/checkpoints/latest").read_text() == "step_3"
    assert sorted(p.name for p in (tmp_path / "zero2/run/checkpoints").glob("step_*")) == ["step_3"]


def test_each_rank_draws_its_own_lora_dropout_masks(tmp_path, small_data_dir):
    """From a user trial: every data-parallel rank drew the same LoRA dropout masks (one seed on every rank),
    so W ranks regularized as one mask applied W times, while a resume on another number of ranks seeded
    per rank. Each rank's stream now starts from a hash of (seed, step 0, rank): its first mask is that
    generator's, and the ranks' masks differ."""
    from launch_utils import run_ranks

    proc = run_ranks(ROOT / "tests/dist/dropout_worker.py", tmp_path / "run", small_data_dir, timeout=600)
    lines = sorted(line.split() for line in proc.stdout.splitlines() if line.startswith("RANK "))
    assert [line[:4] for line in lines] == [["RANK", "0", "AS_SEEDED", "True"], ["RANK", "1", "AS_SEEDED", "True"]], \
        proc.stdout[-3000:] + proc.stderr[-3000:]
    assert lines[0][5] != lines[1][5] and lines[0][6:] == lines[1][6:], lines  # other masks, same shape


def _stub_train_step(monkeypatch, grads, losses, world=1, ckpt_dir=None):
    """StepsMixin._train_step on a stub stage-0 engine (no DeepSpeed, no process group): ``len(losses)``
    micro-batches, the i-th backward leaving ``grads[i]`` in the one parameter; the all-reduce sums over
    ``world`` ranks that all hold this rank's values. Returns (the step's loss, optimizer steps applied,
    scheduler steps, events)."""
    import torch
    from types import SimpleNamespace

    from relora_ds import steps

    monkeypatch.setattr(steps.dist, "all_reduce", lambda t: t.mul_(world))
    param = torch.nn.Parameter(torch.zeros(2))
    calls = {"opt": 0, "sched": 0}

    class Optimizer:
        def step(self):
            calls["opt"] += 1

    class Engine:
        device, module, optimizer = "cpu", torch.nn.Sequential(), Optimizer()
        lr_scheduler = SimpleNamespace(step=lambda: calls.__setitem__("sched", calls["sched"] + 1))

        def __init__(self):
            self.module.p, self.micro, self.applied = param, 0, True

        def get_lr(self):
            return [1e-3]

        def gradient_accumulation_steps(self):
            return len(losses)

        def __call__(self, batch, labels):
            return SimpleNamespace(loss=torch.tensor(losses[self.micro]))

        def backward(self, loss):
            param.grad = torch.tensor(grads[self.micro])
            self.micro += 1

        def step(self):  # DeepSpeed's stage 0: at the accumulation boundary the optimizer's step, skipped on
            if self.micro < len(losses):  # its overflow flag; nothing before the boundary
                return
            self.applied = not getattr(self.optimizer, "overflow", False)
            if self.applied:
                self.optimizer.step()
                self.lr_scheduler.step()

        def was_step_applied(self):
            return self.applied

    class Trainer(steps.StepsMixin):
        pass

    events = []
    t = Trainer()
    t.__dict__.update(engine=Engine(), batches=iter([torch.zeros(1, 4, dtype=torch.long)] * len(losses)),
                      own_grad_norm=True, grad_norm=None, _stop_signal=0, world=world, step=0, fp16=False,
                      _event=events.append, ckpt_dir=ckpt_dir)
    return t._train_step(), calls["opt"], calls["sched"], events, t.grad_norm


def test_a_step_logs_the_mean_loss_of_its_micro_batches_over_the_ranks(monkeypatch):
    """The step's loss is the mean over its micro-batches (not the last one's) and over the ranks (the
    all-reduce's sum divided by the world size): micro losses 1 and 3 on each of 2 ranks give 2."""
    loss, applied, sched, events, norm = _stub_train_step(monkeypatch, [[3.0, 0.0], [3.0, 4.0]], [1.0, 3.0], world=2)
    assert loss == 2.0 and (applied, sched, events) == (1, 1, [])
    assert norm == 5.0  # the norm of the gradient after the last micro-batch


def test_an_infinite_gradient_norm_skips_the_update_like_a_nan_one(monkeypatch):
    """Stage 0 skips an update whose gradient norm is not finite: +inf (an overflowing gradient with no NaN
    in it) as well as NaN. The schedule still advances and a step_skipped event is logged."""
    import math
    for bad in (float("inf"), float("nan")):
        loss, applied, sched, events, norm = _stub_train_step(monkeypatch, [[1.0, bad]], [2.0])
        assert loss == 2.0 and not math.isfinite(norm)
        assert (applied, sched) == (0, 1), bad
        assert [(e["event"], e["step"], e["reason"]) for e in events] == \
            [("step_skipped", 1, "non-finite gradient norm")]


def test_a_non_finite_step_loss_stops_the_run_naming_the_last_checkpoint(monkeypatch, tmp_path):
    """A NaN loss (finite gradients) raises FloatingPointError naming the step and the checkpoint to resume
    from, instead of training on."""
    (tmp_path / "step_4").mkdir()
    (tmp_path / "latest").write_text("step_4")
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at step 1; .*step_4"):
        _stub_train_step(monkeypatch, [[1.0, 0.0]], [float("nan")], ckpt_dir=tmp_path)
