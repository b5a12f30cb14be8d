"""The reference's two runs: a full-rank run exported, then a ReLoRA run from the export (--warm-start-from). The
ReLoRA run reads on in the data after the windows the warm start trained on (--warm-start-data continue), as the
steps after an in-run warm start do; it re-read them from the start before. Oracle: the sampler itself, drawn
for the steps of both runs in one process."""
import json
import shutil

import pytest
from launch_utils import ROOT, launch_env, run_python
from trainer_utils import RECIPE, read_losses, train1

from relora_ds import checkpoint
from relora_ds.data import PackedTokens, ShardedBatches
from relora_ds.hf import PROGRESS_FILE

MICRO, GLOBAL = RECIPE["micro_batch_size"], RECIPE["global_batch_size"]


def _sampler_after(data_dir, steps, seed=0, seq_len=RECIPE["seq_len"]):
    """The state of the training sampler of one rank after `steps` optimizer steps from the data's start."""
    batches = ShardedBatches(PackedTokens(data_dir, "train", seq_len=seq_len, access="random"), MICRO,
                             rank=0, world_size=1, seed=seed, accumulation_steps=GLOBAL // MICRO)
    for _ in range(steps * GLOBAL // MICRO):
        next(batches)
    return batches.state_dict()


def _final_sampler(run_dir):
    tag = checkpoint.latest_tag(run_dir / "checkpoints")
    return checkpoint.load_config(run_dir / "checkpoints", tag)["progress"]["sampler"]


@pytest.fixture(scope="module")
def warm_start(tmp_path_factory, small_data_dir):
    """A 3-step full-rank run, exported at its end."""
    tmp = tmp_path_factory.mktemp("warm")
    train1(tmp, small_data_dir, mode="full", warm_start_steps=0, cycle_length=None, total_steps=3, export=True,
           eval_every=0)
    return tmp / "run"


def test_the_relora_run_reads_on_after_the_warm_starts_data(tmp_path, small_data_dir, warm_start):
    """The export records the warm start's sampler; the ReLoRA run from it ends where one sampler drawn for
    both runs' 3 + 4 steps ends (not where 4 steps from the start end), and logs where it began. An export
    of the checkpoint by launch/export.py records the same."""
    hf = warm_start / "hf"
    progress = json.loads((hf / PROGRESS_FILE).read_text())
    assert progress["sampler"] == _sampler_after(small_data_dir, 3) and progress["step"] == 3
    proc = train1(tmp_path, small_data_dir, warm_start_from=str(hf), warm_start_steps=0, total_steps=4,
                  eval_every=0)
    assert "this run reads on after them" in proc.stdout, proc.stdout[-2000:]
    assert _final_sampler(tmp_path / "run") == _sampler_after(small_data_dir, 3 + 4)
    assert _final_sampler(tmp_path / "run") != _sampler_after(small_data_dir, 4)
    _, recs = read_losses(tmp_path / "run")
    event = next(r for r in recs if r.get("event") == "warm_start_data")
    assert event["samples_consumed"] == 3 * GLOBAL and event["warm_start_step"] == 3
    out = tmp_path / "export"
    run_python(ROOT / "launch/export.py", warm_start / "checkpoints", "--out", out, env=launch_env(), check=True)
    assert json.loads((out / PROGRESS_FILE).read_text()) == progress


@pytest.mark.parametrize("case", ["restart", "other_seed", "other_seq_len", "no_progress_file"])
def test_where_it_cannot_or_should_not_read_on_it_starts_at_the_beginning(tmp_path, small_data_dir, warm_start,
                                                                         case):
    """--warm-start-data restart starts at the data's beginning silently; another
    seed (another order: the warm start's windows come again) and an export without the progress file (where
    the warm start stopped is unknown) do too, with a warning that says so and what to do."""
    hf = tmp_path / "hf"
    shutil.copytree(warm_start / "hf", hf)
    overrides = dict(warm_start_from=str(hf), warm_start_steps=0, total_steps=3, warmup_steps=1, cycle_length=2,
                     restart_warmup_steps=1, eval_every=0)
    if case == "restart":
        overrides["warm_start_data"] = "restart"
    elif case == "other_seed":
        overrides["seed"] = 5
    elif case == "other_seq_len":
        overrides["seq_len"] = 16
    else:
        (hf / PROGRESS_FILE).unlink()
    proc = train1(tmp_path, small_data_dir, **overrides)
    assert _final_sampler(tmp_path / "run") == _sampler_after(small_data_dir, 3, seed=overrides.get("seed", 0),
                                                              seq_len=overrides.get("seq_len", RECIPE["seq_len"]))
    warning = {"restart": None, "other_seed": "in the order of seed 0, and this run's seed 5 orders it anew",
               "other_seq_len": "trained on this data in windows of another seq_len",
               "no_progress_file": f"has no {PROGRESS_FILE}"}[case]
    if warning is None:
        assert "warm_start_data" not in proc.stderr and "reads on" not in proc.stdout
    else:
        assert warning in proc.stderr, proc.stderr[-2000:]


def test_the_in_run_warm_starts_last_step_is_checkpointed_and_kept(tmp_path, small_data_dir):
    """--keep-warm-start (the default): step warm_start_steps is checkpointed although save_every does not land
    on it, and keep_last=1 spares it (before, keep_last deleted it, and paper_60m never saved it at all). It
    holds the full-rank model (no LoRA factors) and the sampler after 2 steps; launch/export.py of it gives a
    --warm-start-from directory whose data position is that step's. --no-keep-warm-start saves only the
    save_every and final steps."""
    train1(tmp_path, small_data_dir, save_every=5, keep_last=1, total_steps=12, keep_warm_start=True)  # warm start 2
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_12", "step_2"]
    assert not any(".lora_A" in k for k in checkpoint.full_state_dict(ckpts, "step_2"))
    assert any(".lora_A" in k for k in checkpoint.full_state_dict(ckpts, "step_12"))
    saved = checkpoint.load_config(ckpts, "step_2")["progress"]
    assert saved["step"] == 2 and saved["sampler"] == _sampler_after(small_data_dir, 2)
    other = tmp_path / "other"
    other.mkdir()
    train1(other, small_data_dir, "--no-keep-warm-start", save_every=5, keep_last=1, total_steps=12,
           keep_warm_start=True)  # the flag overrides the recipe
    assert sorted(p.name for p in (other / "run" / "checkpoints").glob("step_*")) == ["step_12"]


def test_an_export_replaces_or_removes_an_earlier_exports_progress_file(tmp_path):
    """export_hf writes the progress it is given with the weights (staged, moved in together), and without one
    removes an earlier export's file, which described other weights (a review found it left beside them: a
    run from the directory would have skipped windows by it)."""
    import torch

    from relora_ds import LlamaConfig, LlamaForCausalLM, export_hf

    out = tmp_path / "hf"
    model = LlamaForCausalLM(LlamaConfig.preset("debug", vocab_size=64))
    export_hf(model, out, token_ids={"bos_token_id": 1, "eos_token_id": 2}, progress={"step": 7})
    assert json.loads((out / PROGRESS_FILE).read_text()) == {"step": 7}
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    export_hf(model, out, token_ids={"bos_token_id": 1, "eos_token_id": 2})
    assert not (out / PROGRESS_FILE).exists() and (out / "model.safetensors").is_file()


def test_a_resume_before_the_first_checkpoint_logs_the_data_position_once(tmp_path, small_data_dir, warm_start):
    """A job requeued before its first save (--resume, no checkpoint: it starts again at step 0) reads on from
    the export again, and its metrics keep one warm_start_data record (a review found two)."""
    kw = dict(warm_start_from=str(warm_start / "hf"), warm_start_steps=0, total_steps=3, warmup_steps=1,
              cycle_length=2, restart_warmup_steps=1, eval_every=0)
    train1(tmp_path, small_data_dir, **kw)
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if killed before its first checkpoint
    train1(tmp_path, small_data_dir, "--resume", **kw)
    _, recs = read_losses(tmp_path / "run")
    assert [r["event"] for r in recs if r.get("event") == "warm_start_data"] == ["warm_start_data"]
    assert _final_sampler(tmp_path / "run") == _sampler_after(small_data_dir, 3 + 3)
