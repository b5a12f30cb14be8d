"""A review of enable_relora's resume (relora_ds/hf_trainer.py): a Trainer run stopped at a checkpoint-N and resumed
does what the uninterrupted run does, with the Trainer's features that could collide with the merges and resets
(gradient accumulation, evaluation, epochs and a warmup fraction, gradient checkpointing, load_best_model_at_end
with save_total_limit, DeepSpeed). Oracles: the uninterrupted run (its log_history and weights, bit for bit on
CPU), the jagged cosine written out by hand, and a run without DeepSpeed."""
import json
import math
import sys
import warnings

import pytest
import torch

import relora_ds
from launch_utils import ROOT, run_ranks

sys.path.insert(0, str(ROOT / "tests" / "dist"))
import hf_trainer_worker as w  # noqa: E402


def history(trainer_or_log) -> list[tuple]:
    """(step, loss, lr, eval_loss) of every log record but the closing summary."""
    log = getattr(getattr(trainer_or_log, "state", None), "log_history", trainer_or_log)
    return [(h["step"], h.get("loss"), h.get("learning_rate"), h.get("eval_loss")) for h in log
            if "train_runtime" not in h]


def events(callback) -> list[tuple]:
    return [(e["step"], e["event"], e.get("overdue", False)) for e in callback.events]


def assert_equal_states(got: dict, want: dict):
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, differ[:4]


def test_a_resume_before_at_and_after_a_reset_or_a_merge_is_the_uninterrupted_run(tmp_path):
    """Cycles of 4 with a merge every 2 (merges at 2 and 6, resets at 4 and 8), two micro-batches a step, an
    evaluation every 2 steps: resumed from the checkpoint one step before the reset at 4, at it, one after, and
    at the merge at 6, every log record (loss, lr, eval loss), the events after the checkpoint and every weight
    are the uninterrupted run's, bit for bit."""
    common = dict(batch=2, gradient_accumulation_steps=2, max_steps=9, eval_strategy="steps", eval_steps=2,
                  eval_dataset=w.Held(), relora_kw=dict(cycle_length=4, merge_every=2, restart_warmup_steps=2))
    whole, callback = w.run(tmp_path / "whole", save_strategy="steps", save_steps=1, **common)
    done = [(2, "merge", False), (4, "reset", False), (6, "merge", False), (8, "reset", False)]
    assert events(callback) == done
    want = history(whole)
    assert [h[0] for h in want if h[3] is not None] == [2, 4, 6, 8, 9]  # the evaluations ran (and at the end)
    for n in (3, 4, 5, 6):
        resumed, callback = w.run(tmp_path / f"from{n}", resume=str(tmp_path / "whole" / f"checkpoint-{n}"), **common)
        assert events(callback) == [e for e in done if e[0] > n], n
        assert history(resumed) == want, n
        assert_equal_states(resumed.model.state_dict(), whole.model.state_dict())


def test_epochs_a_warmup_fraction_and_a_short_last_step_resume_exactly(tmp_path):
    """num_train_epochs=2 (no max_steps), 16 micro-batches an epoch at 3 a step: 6 steps an epoch, the last of one
    micro-batch; warmup_steps=0.2, a fraction: ceil(0.2 x 12) = 3 steps. The lr of every step is the jagged
    cosine over those settings written out by hand (resets after 4, 8 and 12, the last step's), and a resume at
    the epoch's end (6) and one step into the next (7) is the uninterrupted run, bit for bit."""
    common = dict(batch=4, gradient_accumulation_steps=3, max_steps=-1, num_train_epochs=2, warmup_steps=0.2,
                  relora_kw=dict(cycle_length=4))
    whole, callback = w.run(tmp_path / "whole", save_strategy="steps", save_steps=1, **common)
    assert [(e["step"], e["event"]) for e in callback.events] == [(4, "reset"), (8, "reset"), (12, "reset")]

    def multiplier(i):  # LambdaLR's step i trains global step i + 1
        cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * (i - 3) / 9))
        return i / 3 if i < 3 else 0.0 if i in (4, 8) else cosine
    lrs = [h[2] for h in history(whole)]
    assert lrs == pytest.approx([w.HP["learning_rate"] * multiplier(i) for i in range(12)], rel=1e-9, abs=1e-15)
    for n in (6, 7):
        resumed, callback = w.run(tmp_path / f"from{n}", resume=str(tmp_path / "whole" / f"checkpoint-{n}"), **common)
        assert [(e["step"], e["event"]) for e in callback.events] == [(8, "reset"), (12, "reset")]
        assert history(resumed) == history(whole)
        assert_equal_states(resumed.model.state_dict(), whole.model.state_dict())


@pytest.mark.parametrize("restart_warmup_steps", [1, 2])
def test_a_resume_with_another_cycle_length_against_the_hand_derived_schedule(tmp_path, restart_warmup_steps):
    """Cycles of 3 over 10 steps, resumed from each checkpoint 1..9 with cycles of 2, 4 and 5 (the docstring's
    promise: the new cycles count from the checkpoint's last reset; where one has already ended, the overdue
    reset is done at the resume step and the cycles count from there). Oracle, written here: the resets that
    rule gives, and every step's lr from the jagged cosine over all the resets (the checkpoint's and the
    resumed run's): 0 after each, a linear ramp over restart_warmup_steps back onto the global cosine."""
    total, rw = 10, restart_warmup_steps

    def cosine(i):  # warmup 1, then from 1 to 0.1
        return i if i < 1 else 0.1 + 0.45 * (1 + math.cos(math.pi * (i - 1) / (total - 1)))

    def lr(i, resets):
        ramp = next((r for r in resets if r <= i < r + rw), None)
        return cosine(i) if ramp is None else (i - ramp) / rw * cosine(ramp + rw)

    common = dict(batch=4, max_steps=total)
    w.run(tmp_path / "whole", save_strategy="steps", save_steps=1, relora_kw=dict(cycle_length=3,
                                                                                   restart_warmup_steps=rw), **common)
    for n in range(1, total):
        for new in (2, 4, 5):
            last = n // 3 * 3  # the checkpoint's last reset (0: the start)
            if n - last >= new:
                want = [(n, True)] + [(s, False) for s in range(n + new, total + 1, new)]
            else:
                want = [(s, False) for s in range(last + new, total + 1, new)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a cycle as long as what is left of the run: said
                resumed, callback = w.run(tmp_path / "resumed", resume=str(tmp_path / "whole" / f"checkpoint-{n}"),
                                          relora_kw=dict(cycle_length=new, restart_warmup_steps=rw), **common)
            assert [(e["step"], e.get("overdue", False)) for e in callback.events] == want, (n, new)
            resets = list(range(3, n + 1, 3)) + [s for s, _ in want]
            got = [h[2] for h in history(resumed)]
            assert got == pytest.approx([w.HP["learning_rate"] * lr(i, resets) for i in range(total)],
                                        rel=1e-9, abs=1e-15), (n, new)


def test_gradient_checkpointing_trains_the_factors_as_without_it(tmp_path):
    """TrainingArguments(gradient_checkpointing=True) recomputes the layers in the backward: the run, its resets and
    every weight are the run without it, bit for bit (a recompute that dropped the factors' gradients, as
    reentrant checkpointing over inputs without grad does, would leave lora_B at 0). 5 steps: the last trains
    B after the reset at 3."""
    plain, _ = w.run(tmp_path / "plain", batch=4, max_steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5: renamed activation_checkpointing
        recomputed, callback = w.run(tmp_path / "recomputed", batch=4, max_steps=5, gradient_checkpointing=True)
        assert recomputed.model.is_gradient_checkpointing
    assert [(e["step"], e["event"]) for e in callback.events] == [(3, "reset")]
    assert history(recomputed) == history(plain)
    assert_equal_states(recomputed.model.state_dict(), plain.model.state_dict())
    assert any(layer.lora_B.any() for _, layer in relora_ds.relora_layers(recomputed.model))


def test_load_best_model_at_end_with_save_total_limit_exports_the_best_checkpoint(tmp_path):
    """An evaluation every step, load_best_model_at_end by eval_loss, save_total_limit=1: the model after train()
    is the best checkpoint's wrapped state (rotation kept it), evaluating it gives the best metric, and
    save_model writes it merged (logits of the loaded plain model = the wrapped model's)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    trainer, callback = w.run(tmp_path, batch=4, save_strategy="steps", save_steps=1, eval_strategy="steps",
                              eval_steps=1, eval_dataset=w.Held(), load_best_model_at_end=True,
                              metric_for_best_model="eval_loss", save_total_limit=1)
    assert [(e["step"], e["event"]) for e in callback.events] == [(3, "reset"), (6, "reset")]
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    best = min(evals, key=evals.get)
    assert best != 7 and trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best}")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [f"checkpoint-{best}"]
    saved = load_file(str(tmp_path / f"checkpoint-{best}" / "model.safetensors"))
    state = trainer.model.state_dict()
    assert_equal_states({k: state[k] for k in saved}, saved)
    assert trainer.evaluate()["eval_loss"] == evals[best]
    trainer.save_model(tmp_path / "final")
    x = torch.stack([w.Windows()[i]["input_ids"] for i in range(3)])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()(input_ids=x).logits
        torch.testing.assert_close(got, trainer.model.eval()(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_enable_relora_after_train_is_refused_naming_train(tmp_path):
    trainer, _ = w.run(tmp_path, batch=4, max_steps=1, relora=False)
    from relora_ds.hf_trainer import enable_relora
    with pytest.raises(ValueError, match=r"already has its lr scheduler \(built by train\(\).*before train\(\)"):
        enable_relora(trainer, cycle_length=3, restart_warmup_steps=1)


def test_a_deepspeed_resume_whose_shorter_cycle_has_ended_resets_the_loaded_engine_at_once(tmp_path):
    """ZeRO-2 on 2 ranks, cycles of 3 saved at step 5 and resumed with cycles of 2: the overdue reset runs at train
    begin on an engine that has only loaded its checkpoint (the prune reads ZeRO's partitioned moments before
    any step of this process), then resets at 7 and 9. Oracle: the same resume without DeepSpeed, in one process
    with the 2 ranks' batch: its events, every step's lr, the losses and the weights."""
    common = ["--stage", 2, "--max-steps", 9]
    run_ranks(ROOT / "tests/dist/hf_trainer_worker.py", "--out", tmp_path / "whole", *common, "--save-steps", 5,
              timeout=600)
    run_ranks(ROOT / "tests/dist/hf_trainer_worker.py", "--out", tmp_path / "resumed", *common, "--resume",
              tmp_path / "whole" / "checkpoint-5", "--cycle-length", 2, timeout=600)
    got = json.loads((tmp_path / "resumed" / "run.json").read_text())
    w.run(tmp_path / "one_whole", batch=4, max_steps=9, save_strategy="steps", save_steps=5)
    one, callback = w.run(tmp_path / "one", batch=4, max_steps=9, resume=str(tmp_path / "one_whole" / "checkpoint-5"),
                          relora_kw={"cycle_length": 2})
    want = [(5, "reset", True), (7, "reset", False), (9, "reset", False)]
    assert events(callback) == want
    assert [(e["step"], e["event"], e.get("overdue", False)) for e in got["events"]] == want
    assert [h[2] for h in history(got["log"])] == [h[2] for h in history(one)]
    assert [h[1] for h in history(got["log"])] == pytest.approx([h[1] for h in history(one)], rel=1e-5)
    trained, oracle = torch.load(tmp_path / "resumed" / "state.pt"), one.model.state_dict()
    assert trained.keys() == oracle.keys()
    for k in oracle:
        err = (trained[k].double() - oracle[k].double()).norm() / max(oracle[k].double().norm(), 1e-12)
        assert err <= 1e-4, (k, float(err))
