"""The in-run warm start's switch to ReLoRA at ZeRO-1 and ZeRO-3 on 2 ranks, with a warm-start lr of its own,
against tests/test_trainer_oracle.py's one-process loop written in plain PyTorch (its LoRA layer, torch AdamW
built afresh at the switch, the jagged cosine by hand). That file checks ZeRO-2; here ZeRO-1 and ZeRO-3, a ZeRO-3
resume at the switch and one step after it (also on 1 rank), and a mid-cycle export (B not zero) carried into a
run at another rank (launch/update_rank.py measures ranks; a run changes its rank through an export and
--warm-start-from, a resume with another rank being refused). Measured (2026-12-07): all passed, no defect."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from launch_utils import ROOT, launch_env, run_python, run_ranks
from test_trainer_oracle import relative_errors, replay
from trainer_utils import FP32_ZERO2, RECIPE as BASE, read_losses, train1, write

from relora_ds import checkpoint

RECIPE_RANK, RECIPE_ALPHA = BASE["rank"], BASE["alpha"]
RECIPE = dict(total_steps=8, warm_start_lr=1e-3, keep_warm_start=True, save_every=0)


def _train(tmp_path, data_dir, stage, *extra, nprocs=2, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe, ds = write(tmp_path, data_dir, **{**RECIPE, **overrides})
    ds.write_text(json.dumps({**FP32_ZERO2, "zero_optimization": {"stage": stage}}))
    return run_ranks(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", ds, *extra, nprocs=nprocs)


def _is_the_one_process_loop(run, data_dir):
    losses, recs = read_losses(run)
    steps, mine = replay(run, data_dir)
    lrs = {r["step"]: r["lr"] for r in recs if "lr" in r}
    for step, (loss, lr) in enumerate(steps, start=1):
        assert lrs[step] == pytest.approx(lr, rel=1e-12, abs=1e-15), step
        assert losses[step] == pytest.approx(loss, rel=2e-6), step
    theirs = checkpoint.full_state_dict(run / "checkpoints", "step_8")
    errors = relative_errors(mine, theirs)
    assert max(errors.values()) < 1e-5, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def test_the_switch_at_zero_1_is_the_one_process_loop(tmp_path, small_data_dir):
    _train(tmp_path, small_data_dir, 1)
    _is_the_one_process_loop(tmp_path / "run", small_data_dir)


def test_the_switch_at_zero_3_is_the_one_process_loop(zero3_run, small_data_dir):
    """(The run the resumes below start from: its saves change nothing it computes.)"""
    _is_the_one_process_loop(zero3_run, small_data_dir)


def _state(run, tag="step_8"):
    return checkpoint.full_state_dict(run / "checkpoints", tag)


def _largest_difference(a: dict, b: dict) -> float:
    """The largest relative difference of the float tensors; the merge counters equal."""
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a if not a[n].is_floating_point())
    return max(((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)).item() for n in a if a[n].is_floating_point())


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, small_data_dir):
    """A 2-rank ZeRO-3 run checkpointed at the switch (step 2, the kept warm start) and every 3 steps."""
    tmp = tmp_path_factory.mktemp("zero3")
    _train(tmp, small_data_dir, 3, save_every=3, keep_last=10)
    return tmp / "run"


@pytest.mark.parametrize("tag,nprocs", [("step_2", 2), ("step_3", 1)])
def test_a_zero3_resume_at_the_switch_and_one_step_after_is_the_uninterrupted_run(tmp_path, small_data_dir,
                                                                                     zero3_run, tag, nprocs):
    """Resumed at the kept warm-start checkpoint (the switch comes first), and one step into ReLoRA on 1 rank
    (through the universal checkpoint; step_2 on 1 rank and step_3 on 2 passed too): the same losses and final
    weights as the run that went on, and as the one-process loop."""
    resumed = tmp_path / "run"
    shutil.copytree(zero3_run, resumed)
    (resumed / "checkpoints" / "latest").write_text(tag)  # as if the job had died right after saving ``tag``
    (resumed / "metrics.jsonl").unlink()
    _train(tmp_path, small_data_dir, 3, "--resume", nprocs=nprocs, save_every=3, keep_last=10)
    step = int(tag[5:])
    before, _ = read_losses(zero3_run)
    after, _ = read_losses(resumed)
    assert sorted(after) == list(range(step + 1, 9))
    rel = 0 if nprocs == 2 else 1e-6  # another world size sums the gradients in another order
    for s in after:
        assert after[s] == pytest.approx(before[s], rel=rel, abs=0), s
    assert _largest_difference(_state(resumed), _state(zero3_run)) <= (0 if nprocs == 2 else 1e-5)
    _, mine = replay(resumed, small_data_dir)
    errors = relative_errors(mine, _state(resumed))
    assert max(errors.values()) < 1e-5, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


@pytest.mark.parametrize("rank", [2])  # (8, above the run's 4, passed too)
def test_a_mid_cycle_export_carries_its_live_update_into_a_run_at_another_rank(tmp_path, small_data_dir, zero3_run,
                                                                               rank):
    """Step 8 is two steps after a reset, its B not zero (a merge pending). launch/export.py writes
    W + (alpha/r)·B·A (by hand from the checkpoint's own tensors), and a run from the export at a lower
    rank (B = 0 again) starts from exactly that model: its first step's loss is the export's on the
    same batches, computed by transformers."""
    import transformers
    from safetensors.torch import load_file

    from relora_ds.data import ShardedBatches, open_split

    state = _state(zero3_run)
    assert any(state[n].abs().max() > 0 for n in state if n.endswith("lora_B")), "no merge pending at step 8"
    out = tmp_path / "hf"
    run_python(ROOT / "launch/export.py", zero3_run / "checkpoints", "--tag", "step_8", "--out", out,
               env=launch_env(), check=True)
    exported = load_file(str(out / "model.safetensors"))
    scale = RECIPE_ALPHA / RECIPE_RANK
    for name in (n.removesuffix(".lora_A") for n in state if n.endswith(".lora_A")):
        by_hand = state[f"{name}.weight"] + scale * state[f"{name}.lora_B"] @ state[f"{name}.lora_A"]
        torch.testing.assert_close(exported[f"{name}.weight"], by_hand, rtol=1e-6, atol=1e-7)
    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    c = json.loads((zero3_run / "checkpoints" / "step_8" / "config.json").read_text())["train"]
    gas = c["global_batch_size"] // c["micro_batch_size"]
    batches = ShardedBatches(open_split(small_data_dir, "train", seq_len=c["seq_len"], access="random",
                                        seed=c["seed"]), c["micro_batch_size"], rank=0, world_size=1, seed=c["seed"],
                             accumulation_steps=gas)
    with torch.no_grad():
        expected = sum(model(x, labels=x).loss.item() for x in (next(batches) for _ in range(gas))) / gas
    train1(tmp_path, small_data_dir, warm_start_from=str(out), warm_start_data="restart", warm_start_steps=0,
           rank=rank, alpha=2 * rank, total_steps=3, eval_every=0, keep_warm_start=False)
    losses, _ = read_losses(tmp_path / "run")
    assert losses[1] == pytest.approx(expected, rel=1e-5)
