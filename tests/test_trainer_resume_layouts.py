"""The trainer's resume onto another engine layout, through DeepSpeed's universal checkpoint or its own load, on 2
CPU ranks (gloo): fewer and more ranks, an offloaded optimizer, bf16, ZeRO-3 with int8, with selective
checkpointing and with offload (CPU, NVMe), DeepSpeed's bf16 optimizer, a run without ZeRO resumed under ZeRO.
The resume's own logic (crashes, signals, new settings, rewinds): tests/test_trainer_resume.py."""
import json
import re

import pytest

from launch_utils import ROOT, run_ranks
from trainer_utils import FP32_ZERO2, export_equals_the_trainers, read_losses, rewind_to, train1, train2, write


def test_a_zero2_checkpoint_resumes_on_fewer_ranks_offloaded_or_in_bf16(tmp_path, small_data_dir, uninterrupted):
    """A 2-rank ZeRO-2 checkpoint (step 7: inside the restart warmup after the reset at 6), resumed:
    - on one rank: through DeepSpeed's universal checkpoint it continues the 2-rank run's losses (the sampler
      re-shards the same global batches; optimizer state, frozen base weights and merge counts carry over);
    - on the same 2 ranks with the optimizer offloaded (DeepSpeedCPUAdam), or in bf16: DeepSpeed's own loader
      crashed at the first step (KeyError 'bias_correction': torch AdamW's param groups) or named a missing
      file (bf16 files are named bf16_zero_pp_rank_*). Such a change goes through the universal checkpoint,
      is logged, and the run continues the uninterrupted one's losses: in fp32 to DeepSpeedCPUAdam's last
      bits (test_zero3_offload_resumes_to_cpu_adams_last_bits), in bf16 to its rounding.
    One run to checkpoint for all three (they shared its set-up as two tests, for CI time)."""
    reference, _ = uninterrupted
    train2(tmp_path, small_data_dir, save_every=7)
    rewind_to(tmp_path / "run", "step_7")
    proc = train1(tmp_path, small_data_dir, "--resume", save_every=7)
    assert "loading it as a DeepSpeed universal checkpoint" in proc.stdout + proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "step_7" / "universal" / "zero").is_dir()
    # latest_universal, which DeepSpeed's load_checkpoint(load_universal=True) reads without a tag, names it (the
    # converter wrote the temporary folder's name there: a review)
    assert (tmp_path / "run" / "checkpoints" / "latest_universal").read_text() == "step_7/universal"
    resumed, recs = read_losses(tmp_path / "run")
    assert sorted(resumed) == list(range(8, 13))
    for step, loss in resumed.items():  # only the reduction order differs (fp32; seen: equal)
        assert loss == pytest.approx(reference[step], rel=1e-6, abs=0), step
    assert [r["step"] for r in recs if r.get("event") == "reset"] == [10]

    offload = tmp_path / "offload.json"
    offload.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                                   "optimizer": {"type": "AdamW", "params": {}}}))  # DeepSpeedCPUAdam
    bf16 = tmp_path / "bf16.json"
    bf16.write_text(json.dumps({**FP32_ZERO2, "bf16": {"enabled": True}}))
    recipe, _ = write(tmp_path, small_data_dir, save_every=7)
    for ds, what, tol in ((offload, "optimizer DeepSpeedCPUAdam offloaded to cpu", 3e-6), (bf16, "bf16", 1e-3)):  # seen: 2.6e-4 bf16
        rewind_to(tmp_path / "run", "step_7")
        proc = run_ranks(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", ds, "--resume")
        out = proc.stdout + proc.stderr
        assert re.search(rf"written with 2 rank\(s\), ZeRO stage 2, fp32, optimizer AdamW on the device, this run has 2 "
                         rf"rank\(s\), ZeRO stage 2, .*{what}.*: loading it as a DeepSpeed universal checkpoint", out)
        resumed, recs = read_losses(tmp_path / "run")
        assert sorted(resumed) == list(range(8, 13))
        for step, loss in resumed.items():
            assert loss == pytest.approx(reference[step], rel=0, abs=tol), (what, step)
        changed = next(r for r in recs if r.get("event") == "resume_settings_changed")
        assert any(k.startswith("deepspeed.") for k in changed), changed
        assert [r["step"] for r in recs if r.get("event") == "reset"] == [10]


def test_resume_on_more_ranks_zero3_int8(tmp_path, small_data_dir):
    """The other direction and the other partitioning: 1-rank ZeRO-3 with an int8 base (buffers and error
    residuals, which DeepSpeed's converter leaves out under ZeRO-3) resumed on 2 ranks. Also catches
    DeepSpeed's ZeRO-3 universal load sharing one Adam step counter between our param groups."""
    ds = tmp_path / "zero3.json"  # every parameter partitioned, the int8 weights included
    ds.write_text(json.dumps({**FP32_ZERO2, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    train1(tmp_path, small_data_dir, ds=ds, save_every=7, quantize="int8")
    reference, _ = read_losses(tmp_path / "run")
    rewind_to(tmp_path / "run", "step_7")
    recipe, _ = write(tmp_path, small_data_dir, save_every=7, quantize="int8")
    run_ranks(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", ds, "--resume")
    resumed, _ = read_losses(tmp_path / "run")
    assert sorted(resumed) == list(range(8, 13))
    for step, loss in resumed.items():  # fp32, another reduction order (seen: equal)
        assert loss == pytest.approx(reference[step], rel=1e-6, abs=0), step
    # Moving between ZeRO-3 and ZeRO-1/2 is what DeepSpeed's universal load cannot do: a clean error first.
    proc = train1(tmp_path, small_data_dir, "--resume", check=False, save_every=7, quantize="int8")
    assert proc.returncode == 2 and "cannot move a checkpoint between ZeRO-3 and ZeRO-1/2" in proc.stderr, \
        proc.stderr[-3000:]


def test_zero3_with_selective_checkpointing_resumes_exactly(tmp_path, small_data_dir):
    """ZeRO-3 (fp32) with selective activation checkpointing, rewound to its low-rank checkpoint at step 7 and
    resumed on the same 2 ranks, continues its own losses bit for bit (a trial: the first backward after the
    load failed, "aten.slice.Tensor invocation index 17 encountered during backward but not found in storage":
    DeepSpeed's load left the trainable parameters gathered, so the forward gathered fewer than the recompute)."""
    recipe, _ = write(tmp_path, small_data_dir, save_every=7, activation_checkpointing=True,
                      activation_checkpointing_policy="selective")
    ds = tmp_path / "zero3_fp32.json"
    ds.write_text(json.dumps({**json.loads((ROOT / "ds_configs/zero3.json").read_text()), "bf16": {"enabled": False}}))
    run_ranks(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", ds)
    reference, _ = read_losses(tmp_path / "run")
    rewind_to(tmp_path / "run", "step_7")
    run_ranks(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", ds, "--resume")
    resumed, recs = read_losses(tmp_path / "run")
    assert resumed == {step: reference[step] for step in range(8, 13)}
    assert [r["step"] for r in recs if r.get("event") == "reset"] == [10]


@pytest.mark.parametrize("optimizer_on", ["cpu", "nvme"])
def test_zero3_offload_resumes_to_cpu_adams_last_bits(tmp_path, small_data_dir, optimizer_on):
    """ZeRO-3 with the optimizer and the parameters in host memory (the shipped zero3_offload.json, in fp32,
    DeepSpeedCPUAdam), and with the optimizer on NVMe: rewound to its checkpoint at step 7 (inside the restart
    warmup after the reset at 6, pruned moments included) and resumed on 2 ranks and on 1, the run continues
    its own losses. Not bit for bit: after a load DeepSpeedCPUAdam computes beta^t with pow where the running
    optimizer multiplied step by step (deepspeed/ops/csrc/includes/cpu_adam.h, IncrementStep), so updates
    differ in their last bits (seen: <= 1e-6 in fp32, the same for zero2_offload; bf16 rounding carries that
    to 7e-5). A lost or unpruned moment, or a step count off by one, moves the losses by orders of magnitude
    more (without the optimizer state: 4e-3). On NVMe (the tiny preset, whose embeddings and norms make a
    sub-group above DeepSpeed's 1 MiB swap threshold; the LoRA factors' stays in memory) DeepSpeed's own
    loader restored neither: the resumed run's first loss differed (relora_ds/ds_patches.py item 6)."""
    model = "tiny" if optimizer_on == "nvme" else "debug"
    recipe, _ = write(tmp_path, small_data_dir, save_every=7, model=model)
    shipped = json.loads((ROOT / "ds_configs/zero3_offload.json").read_text())
    if optimizer_on == "nvme":
        shipped["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": str(tmp_path / "swap")}
        (tmp_path / "swap").mkdir()
    ds = tmp_path / "zero3_offload_fp32.json"
    ds.write_text(json.dumps({**shipped, "bf16": {"enabled": False}}))
    run_ranks(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", ds)
    reference, _ = read_losses(tmp_path / "run")
    assert not list((tmp_path / "run").glob("checkpoints/*/offloaded_tensors"))  # the ZeRO files hold it all
    if optimizer_on == "nvme":  # a sub-group's master and moments really lived in files
        swapped = {p.name for p in (tmp_path / "swap").glob("zero_stage_3/optimizer/rank*/*.tensor.swp")}
        assert any(n.startswith("exp_avg_sq-") for n in swapped), swapped
    # On 2 ranks again, then on 1 (DeepSpeed's universal checkpoint re-partitions the offloaded states). With
    # the optimizer on NVMe only on 1 rank, for CI time: tests/test_nvme_offload.py resumes it on the same 2.
    resumes = [lambda: run_ranks(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", ds, "--resume"),
               lambda: train1(tmp_path, small_data_dir, "--resume", ds=ds, save_every=7, model=model)]
    for resume in resumes[1:] if optimizer_on == "nvme" else resumes:
        rewind_to(tmp_path / "run", "step_7")
        resume()
        resumed, recs = read_losses(tmp_path / "run")
        assert sorted(resumed) == list(range(8, 13))
        assert resumed[8] == reference[8]  # the restored weights, before any update
        for step, loss in resumed.items():
            assert loss == pytest.approx(reference[step], rel=0, abs=3e-6), step
        assert [r["step"] for r in recs if r.get("event") == "reset"] == [10]


def test_bf16_optimizer_checkpoint_exports_and_resumes_on_fewer_ranks(tmp_path, small_data_dir):
    """ZeRO-1 with bf16 weights and fp32 gradient accumulation runs DeepSpeed's bf16 optimizer, whose
    checkpoint files DeepSpeed's zero_to_fp32 cannot read: export.py gives the trainer's own export, and a
    resume on one rank (through ds_to_universal) continues the two-rank run's losses."""
    ds = tmp_path / "bf16opt.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True},
                              "data_types": {"grad_accum_dtype": "fp32"},
                              "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    recipe, _ = write(tmp_path, small_data_dir, micro_batch_size=2, save_every=7, export=True)
    run_ranks(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", ds)
    run = tmp_path / "run"
    assert list((run / "checkpoints" / "step_12").glob("bf16_zero_pp_rank_*_optim_states.pt"))
    export_equals_the_trainers(run, tmp_path)
    two_ranks, _ = read_losses(run)
    rewind_to(run, "step_7")
    proc = train1(tmp_path, small_data_dir, "--resume", ds=ds, micro_batch_size=2, save_every=7)
    assert "loading it as a DeepSpeed universal checkpoint" in proc.stdout + proc.stderr
    resumed, recs = read_losses(run)
    assert sorted(resumed) == list(range(8, 13))
    for step, loss in resumed.items():  # bf16 weights, another reduction order: close, not equal (seen: 8.6e-5;
        assert loss == pytest.approx(two_ranks[step], abs=5e-4), step  # the optimizer state lost: 4e-3)
    assert [r["step"] for r in recs if r.get("event") == "reset"] == [10]


def test_a_checkpoint_without_zero_resumes_under_zero2(tmp_path, small_data_dir, uninterrupted):
    """One rank without ZeRO (stage 0, fp32, torch's AdamW: the whole optimizer state in the module states
    file, which DeepSpeed's ZeRO loaders and ds_to_universal cannot read), resumed at ZeRO-2: relora_ds writes
    the checkpoint in the universal layout, and the run continues the uninterrupted 2-rank ZeRO-2 run's
    losses. From step 6 (ReLoRA, right after the reset at 6: merged bases, pruned moments, the LoRA and
    full-rank param groups) on 2 ranks, and from step 2 (the warm start's full-rank engine, one group) on one.
    Only the reduction order differs (seen: 1.6e-7 relative at most, one step in five or ten; the same into
    ZeRO-1 and ZeRO-3); a lost moment or step count moves them by 1e-3 and more."""
    reference, _ = uninterrupted
    stage0 = tmp_path / "stage0.json"
    stage0.write_text(json.dumps({"zero_optimization": {"stage": 0},
                                  "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    overrides = dict(save_every=2, keep_last=6)  # step_2 stays for the second resume
    train1(tmp_path, small_data_dir, ds=stage0, **overrides)
    for tag, ranks, resume in (("step_6", 2, train2), ("step_2", 1, train1)):
        rewind_to(tmp_path / "run", tag)
        proc = resume(tmp_path, small_data_dir, "--resume", **overrides)
        assert (f"was written with 1 rank(s), ZeRO stage 0, fp32, optimizer AdamW on the device, this run has {ranks} "
                "rank(s), ZeRO stage 2, fp32, optimizer AdamW on the device: loading it as a DeepSpeed universal "
                "checkpoint") in proc.stdout + proc.stderr
        assert (tmp_path / "run" / "checkpoints" / tag / "universal" / "zero").is_dir()
        resumed, recs = read_losses(tmp_path / "run")
        start = int(tag.split("_")[1])
        assert sorted(resumed) == list(range(start + 1, 13))
        for step, loss in resumed.items():
            assert loss == pytest.approx(reference[step], rel=5e-6, abs=0), (tag, step)  # seen: 1.6e-7
        changed = next(r for r in recs if r.get("event") == "resume_settings_changed")
        assert changed["deepspeed.zero_optimization.stage"] == "0 -> 2", changed
        assert changed.get("world_size") == ("1 -> 2" if ranks == 2 else None), changed
        assert [r["step"] for r in recs if r.get("event") == "reset"] == [s for s in (6, 10) if s > start]
