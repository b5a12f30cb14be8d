"""Review of the resume through DeepSpeed's universal checkpoint (relora_ds/universal.py, relora_ds/resume_plan.py):
a change of ZeRO-3's optimizer sub-group size, which DeepSpeed's own load cannot take, and a resume on more ranks
and another ZeRO stage right after a reset, checked against the uninterrupted run's own checkpoint."""
import json
import shutil

import torch

from launch_utils import ROOT, run_ranks
from trainer_utils import FP32_ZERO2, read_losses, rewind_to, train1, write

ZERO3 = {**FP32_ZERO2, "zero_optimization": {"stage": 3}}


def test_plan_resume_loads_another_zero3_sub_group_size_as_universal(tmp_path):
    """ZeRO-3 keeps its fp32 masters and Adam moments in sub-groups of sub_group_size elements: the same ranks,
    stage and precision with another sub_group_size go through the universal checkpoint (DeepSpeed's own load
    fails in torch's optimizer load_state_dict); the same size (DeepSpeed's default written out or not) and
    stages below 3, which have no sub-groups, load directly."""
    from test_resume_plan import TRAIN, _fake_checkpoint

    from relora_ds import resume_plan

    kw = dict(model={"hidden_size": 64}, train=TRAIN, world=2, data_dir=tmp_path / "data", total_steps=12,
              tokenizer_sha256="a" * 64)
    for stage, zero_now, universal in ((3, {"sub_group_size": 3000}, True),
                                       (3, {"sub_group_size": int(1e9)}, False),  # DeepSpeed's default
                                       (3, {}, False),
                                       (2, {"sub_group_size": 3000}, False)):
        shutil.rmtree(tmp_path / "ckpt", ignore_errors=True)
        _fake_checkpoint(tmp_path / "ckpt", world=2, stage=stage, sharded=True)
        plan = resume_plan.plan_resume(tmp_path / "ckpt", ds={"zero_optimization": {"stage": stage, **zero_now}}, **kw)
        assert plan["universal"] is universal, (stage, zero_now)


def test_a_zero3_checkpoint_resumes_with_another_sub_group_size_to_the_same_weights(tmp_path, small_data_dir):
    """A ZeRO-3 run resumed (same rank count) with another zero_optimization.sub_group_size failed at the load
    with torch's "loaded state dict contains a parameter group that doesn't match the size of optimizer's
    group". Now it loads through the universal checkpoint and continues the uninterrupted run: oracle, that
    run's own checkpoint 4 steps later (through the reset at step 6), every tensor by full_state_dict, and its
    losses; the weights after four Adam steps hold the restored masters, moments, step count and lr schedule."""
    from relora_ds.checkpoint import full_state_dict

    steps = dict(save_every=4, total_steps=8)
    (tmp_path / "zero3.json").write_text(json.dumps(ZERO3))
    (tmp_path / "zero3_sub.json").write_text(json.dumps({**ZERO3, "zero_optimization": {"stage": 3,
                                                                                         "sub_group_size": 3000}}))
    train1(tmp_path, small_data_dir, ds=tmp_path / "zero3.json", **steps)
    reference, _ = read_losses(tmp_path / "run")
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step_8", tmp_path / "reference_step_8")
    rewind_to(tmp_path / "run", "step_4")
    proc = train1(tmp_path, small_data_dir, "--resume", ds=tmp_path / "zero3_sub.json", check=False, **steps)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(ZeRO-3 sub_group_size 1000000000 -> 3000): loading it as a DeepSpeed universal checkpoint" in \
        proc.stdout + proc.stderr
    resumed, _ = read_losses(tmp_path / "run")
    assert resumed == {step: reference[step] for step in range(5, 9)}  # fp32, one rank: bit for bit (seen)
    want = full_state_dict(tmp_path, "reference_step_8")
    got = full_state_dict(tmp_path / "run" / "checkpoints", "step_8")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])]


def test_a_zero1_int8_checkpoint_resumes_on_three_ranks_at_zero2_right_after_a_reset(tmp_path, small_data_dir):
    """2 ranks at ZeRO-1 with an int8 base, resumed from the checkpoint of the reset at step 6 on 3 ranks at
    ZeRO-2 (same global batch of 12 windows), through the universal checkpoint. Oracle: the uninterrupted run's
    own step-9 checkpoint. The int8 base, its scales, residuals and merge counts (no merge until step 10) are
    bit for bit; the trainable weights (through Adam's moments, step counts and the lr schedule) to the
    reduction order of 3 ranks (seen: 1.2e-7); the lr and the data position: the same (the sampler re-shards the
    same global batches: 9 steps of 12 windows read, none twice, none skipped)."""
    from relora_ds.checkpoint import full_state_dict, load_config

    run = dict(save_every=3, total_steps=9, quantize="int8", global_batch_size=12, micro_batch_size=2)
    zero1 = {**FP32_ZERO2, "zero_optimization": {"stage": 1}}
    (tmp_path / "zero1.json").write_text(json.dumps(zero1))
    recipe, zero2 = write(tmp_path, small_data_dir, **run)  # (its ds.json: trainer_utils.FP32_ZERO2)
    run_ranks(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", tmp_path / "zero1.json")
    reference, reference_recs = read_losses(tmp_path / "run")
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step_9", tmp_path / "reference_step_9")
    rewind_to(tmp_path / "run", "step_6")
    proc = run_ranks(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", zero2, "--resume", nprocs=3)
    said = proc.stdout + proc.stderr
    assert "this run has 3 rank(s), ZeRO stage 2" in said and "loading it as a DeepSpeed universal checkpoint" in said
    resumed, recs = read_losses(tmp_path / "run")
    assert sorted(resumed) == [7, 8, 9]
    for step, loss in resumed.items():
        assert abs(loss - reference[step]) <= 1e-6 * abs(reference[step]), step
    lrs = lambda records: {r["step"]: r["lr"] for r in records if "loss" in r}  # noqa: E731
    assert lrs(recs) == {s: lr for s, lr in lrs(reference_recs).items() if s > 6}
    want = full_state_dict(tmp_path, "reference_step_9")
    got = full_state_dict(tmp_path / "run" / "checkpoints", "step_9")
    assert want.keys() == got.keys()
    base = [k for k in want if k.endswith(("weight_q", "weight_scale", "weight_residual", "merge_count"))]
    assert len(base) == 56 and [k for k in base if not torch.equal(want[k], got[k])] == []
    worst = max((want[k].double() - got[k].double()).abs().max().item() for k in want if k not in base)
    assert worst < 1e-6
    sampler = load_config(tmp_path / "run" / "checkpoints", "step_9")["progress"]["sampler"]
    assert sampler["samples_consumed"] == 9 * 12
    assert {k: sampler[k] for k in ("epoch", "position", "samples_consumed")} == \
        {k: load_config(tmp_path, "reference_step_9")["progress"]["sampler"][k]
         for k in ("epoch", "position", "samples_consumed")}
