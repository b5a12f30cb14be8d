"""End-to-end trainer runs on 2 CPU ranks (gloo): resets, the golden curve, 1-rank equivalence, every ZeRO
stage and offload, export, launchers, TFLOP/s. Resuming is in tests/test_trainer_resume*.py; skipped steps and
the logged gradient norm in tests/test_trainer_steps.py."""
import json
import os
import subprocess
import sys

import pytest

from launch_utils import ROOT, free_port, launch_env, run_group, run_python, run_ranks
from trainer_utils import FP32_ZERO2, RECIPE, export_equals_the_trainers, read_losses, train1, write

def test_two_rank_run_leaves_no_shared_memory_behind(uninterrupted_run):
    assert uninterrupted_run["shm_left"] == []


def test_the_recipes_warnings_are_said_once_not_per_rank(uninterrupted_run):
    """RECIPE warms up at ReLoRA's lr without a warm_start_lr: one warning for the run, from rank 0 (found by a
    test-drive: each rank printed each recipe warning)."""
    assert uninterrupted_run["stderr"].count("warm start runs at ReLoRA's lr") == 1, uninterrupted_run["stderr"][-3000:]


def test_two_rank_run_has_resets_eval_and_checkpoint(uninterrupted):
    losses, recs = uninterrupted
    assert sorted(losses) == list(range(1, 13))
    resets = [r for r in recs if r.get("event") == "reset"]
    assert [r["step"] for r in resets] == [6, 10]
    # exp_avg_sq: the 99% of each tensor; exp_avg also where exp_avg_sq went (no momentum without it)
    assert all(r["exp_avg_sq"] == pytest.approx(0.99, abs=2e-3) and r["exp_avg"] >= r["exp_avg_sq"] for r in resets)
    assert all(r["prune_comm_bytes"] > 0 and r["merge_comm_bytes"] > 0 for r in resets)
    assert any(r.get("event") == "switch_to_relora" and r["step"] == 2 for r in recs)
    assert [r["step"] for r in recs if "val_loss" in r] == [6, 12]
    # The logged lr is the one step s trained with: the schedule at 0-based optimizer step s - 1 (0 right
    # after the switch at 2 and the resets at 6 and 10).
    from relora_ds.schedule import jagged_cosine

    logged = [r["lr"] for r in recs if "loss" in r]
    want = [3e-3 * jagged_cosine(s - 1, total_steps=12, warmup_steps=2, cycle_length=4, restart_warmup_steps=2,
                                 start_step=2) for s in range(1, 13)]
    assert logged == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert [s for s, lr in zip(range(1, 13), logged) if lr == 0] == [1, 3, 7, 11]


GOLDEN = ROOT / "tests" / "golden" / "trainer_debug_zero2_fp32.json"


def test_losses_match_the_golden_curve(uninterrupted):
    """The 2-rank fp32 run (warm-start switch, resets at 6 and 10) against its recorded curve: a change that
    should not move numbers (a refactor) must keep them; one that does (init, data order, reset, pruning,
    schedule) fails here and the curve is re-recorded on purpose with RELORA_UPDATE_GOLDEN=1. The tolerance
    (1e-5) leaves room for another CPU's BLAS, not for a changed step: prune ratio 0.98, alpha 9 or a
    3-step restart warmup move the curve by 3e-3, 1e-3 and 2e-2 (measured; the same run repeats exactly)."""
    losses, recs = uninterrupted
    got = {"train_loss": {str(k): v for k, v in sorted(losses.items())},
           "val_loss": {str(r["step"]): r["val_loss"] for r in recs if "val_loss" in r}}
    if os.environ.get("RELORA_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert got.keys() == want.keys() and all(got[k].keys() == want[k].keys() for k in want)
    for kind in want:
        for step, loss in want[kind].items():
            assert got[kind][step] == pytest.approx(loss, rel=1e-5), (kind, step)


def _model_flops_per_token(lowrank: bool, quantize=None) -> float:
    """RECIPE's model (debug preset, the 512-piece test tokenizer, 32 tokens), built plainly on CPU (not
    partitioned by any engine): relora_ds.flops, which tests/test_flops.py checks against torch's FLOP
    counter."""
    from relora_ds import LlamaConfig, LlamaForCausalLM, wrap
    from relora_ds.flops import flops_per_token

    model = LlamaForCausalLM(LlamaConfig.preset("debug", vocab_size=512))
    if lowrank:
        wrap(model, rank=RECIPE["rank"], quantize=quantize)
    return flops_per_token(model, RECIPE["seq_len"])


def _check_tflops(recs, world, peak=None):
    """Each step's model TFLOP/s per rank follows from its tokens/s and its phase's FLOPs per token; mfu
    only with a peak to divide by."""
    per_phase = {"full": _model_flops_per_token(False), "lowrank": _model_flops_per_token(True)}
    steps = [r for r in recs if "loss" in r]
    assert {r["phase"] for r in steps} == {"full", "lowrank"}
    for r in steps:
        assert r["tflops_per_gpu"] == pytest.approx(r["tokens_per_s"] * per_phase[r["phase"]] / world / 1e12,
                                                    rel=1e-9)
        assert r.get("mfu") == (None if peak is None else pytest.approx(r["tflops_per_gpu"] / peak, rel=1e-9))


def test_two_ranks_match_one_rank_with_same_global_batch(tmp_path, small_data_dir, uninterrupted):
    train1(tmp_path, small_data_dir, micro_batch_size=2, peak_tflops=0.5)  # 1 rank x 2 x 4 accumulation steps
    one, one_recs = read_losses(tmp_path / "run")
    two, two_recs = uninterrupted
    _check_tflops(one_recs, world=1, peak=0.5)
    _check_tflops(two_recs, world=2)  # on CPU without peak_tflops: no mfu
    for step in two:  # same samples per step; only the reduction order differs (fp32)
        assert one[step] == pytest.approx(two[step], rel=2e-5, abs=2e-5), step
    # The gradient of the global batch's mean loss, whatever the accumulation: a loss divided by the steps
    # twice (1/4 of the gradient on one rank) moved the losses by only ~2e-4 within 12 steps.
    norms = [{r["step"]: r["grad_norm"] for r in recs if r.get("grad_norm") is not None} for recs in (one_recs, two_recs)]
    assert norms[0] and norms[0].keys() == norms[1].keys()
    for step in norms[1]:
        assert norms[0][step] == pytest.approx(norms[1][step], rel=1e-4), step
    # Validation covers the same 16 windows whatever the number of ranks and micro-batch size.
    val = [[(r["step"], r["val_loss"], r["val_tokens"]) for r in recs if "val_loss" in r] for recs in (one_recs, two_recs)]
    assert [v[2] for v in val[0]] == [v[2] for v in val[1]] == [16 * 32] * 2
    assert [v[1] for v in val[0]] == pytest.approx([v[1] for v in val[1]], rel=2e-5)
    # What each merge added (from the gathered fp32 factors on 2 ranks), and the share of each moment's L1
    # mass its prune zeroed (below the 99% of the entries: the largest stay): the one rank's numbers.
    keys = ("update_norm_mean", "update_rel_mean", "update_rel_max", "exp_avg_mass", "exp_avg_sq_mass")
    stats = [[[r[k] for k in keys] for r in recs if r.get("event") == "reset"] for recs in (one_recs, two_recs)]
    assert len(stats[1]) == 2 and all(0 < mean <= top < 1 for _, mean, top, _, _ in stats[1])
    assert all(0 < m_mass < 1 and 0 < v_mass < 0.99 for *_, m_mass, v_mass in stats[1])
    assert stats[0] == [pytest.approx(row, rel=1e-3) for row in stats[1]]


def test_the_logged_validation_loss_is_the_checkpoints_on_the_validation_split(uninterrupted_run, small_data_dir):
    """Oracle: the model rebuilt from the step-12 checkpoint's DeepSpeed files, its mean loss over the 16
    windows (eval_windows) spread evenly over the validation split, equals the step-12 val_loss logged (the merge at 12 keeps
    the function to fp32 rounding); the training split's windows give another number. A mutation evaluating
    on the training split was caught only by the golden curve, which is re-recorded from the code itself."""
    import torch

    from relora_ds import LlamaConfig, LlamaForCausalLM, checkpoint, wrap
    from relora_ds.data import PackedTokens

    run = uninterrupted_run["run_dir"]
    _, recs = uninterrupted_run["losses"]
    saved = checkpoint.load_config(run / "checkpoints", "step_12")
    model = LlamaForCausalLM(LlamaConfig(**saved["model"]))
    wrap(model, rank=saved["train"]["rank"], alpha=saved["train"]["alpha"])
    model.load_state_dict(checkpoint.full_state_dict(run / "checkpoints", "step_12"))
    logged = next(r["val_loss"] for r in recs if r.get("step") == 12 and "val_loss" in r)

    def mean_loss(split):
        data = PackedTokens(small_data_dir, split, seq_len=32)
        # eval_windows=16 windows spread evenly over the split (j * len // 16); equal windows: the token-weighted
        # mean is this mean
        batch = torch.stack([data[j * len(data) // 16] for j in range(16)])
        with torch.no_grad():
            return model.eval()(batch, labels=batch).loss.item()
    assert mean_loss("validation") == pytest.approx(logged, rel=1e-5)
    assert abs(mean_loss("train") - logged) > 1e-3


def test_chunked_loss_under_zero3_matches_the_logits_run(tmp_path, small_data_dir, uninterrupted):
    """loss_chunk_size computes the loss inside lm_head's forward, where ZeRO-3 has gathered the weight;
    fp32 ZeRO-3 with 7-token chunks (straddling sequences) against the plain ZeRO-2 run: same losses,
    through the warm-start switch and both resets, up to reduction order. Its evaluation covers 10 windows:
    rank 1's second micro-batch is empty and must still run a (weightless) forward for ZeRO-3's gathers."""
    recipe, _ = write(tmp_path, small_data_dir, loss_chunk_size=7, eval_windows=10)
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({**FP32_ZERO2, "zero_optimization": {"stage": 3}}))
    run_ranks(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", ds)
    chunked, recs = read_losses(tmp_path / "run")
    plain, _ = uninterrupted
    assert sorted(chunked) == sorted(plain)
    for step in plain:
        assert chunked[step] == pytest.approx(plain[step], rel=1e-4, abs=1e-4), step
    assert [r["step"] for r in recs if r.get("event") == "reset"] == [6, 10]
    vals = [r for r in recs if "val_loss" in r]
    assert [r["val_tokens"] for r in vals] == [10 * 32] * 2 and all(3 < r["val_loss"] < 7 for r in vals)


@pytest.mark.parametrize("stage", ["1", "3", "3_offload", "3_nvme"])
def test_other_zero_stages_train_through_switch_and_resets_then_export(tmp_path, small_data_dir, stage):
    """ZeRO-1, ZeRO-3, ZeRO-3 with optimizer and parameters offloaded to the host, and with the parameters on
    NVMe (bf16, the shipped configs; zero3_nvme.json with its nvme_path set to a folder here; this model's
    tensors are below DeepSpeed's 1 MiB swap threshold: tests/test_nvme_offload.py swaps real ones):
    warm-start switch (gathering full-rank weights from
    the partitions), two resets, and an export that loads in transformers. The ZeRO-3 runs also recompute
    activations (activation_checkpointing: ZeRO-3 must re-gather each layer's weights for the recompute; the
    plain ZeRO-3 run under the selective policy, whose recompute replays the gathers among the ops it does not
    keep) and keep bf16 merge residuals (every rank merges the gathered weight, for its own residual buffer)."""
    import transformers

    zero3 = stage.startswith("3")
    recipe, _ = write(tmp_path, small_data_dir, export=True, activation_checkpointing=zero3, merge_residual=zero3,
                      activation_checkpointing_policy="selective" if stage == "3" else "full")
    ds = ROOT / f"ds_configs/zero{stage}.json"
    if stage == "3_nvme":
        shipped = json.loads(ds.read_text())
        shipped["zero_optimization"]["offload_param"]["nvme_path"] = str(tmp_path)
        ds = tmp_path / "zero3_nvme.json"
        ds.write_text(json.dumps(shipped))
    proc = run_ranks(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", ds)
    # The engine's own flags: the offload config really moved the optimizer and the parameters to the host.
    offload = "optimizer+parameters" if stage.endswith(("offload", "nvme")) else "none"
    assert f"ZeRO stage {stage[0]}, offload: {offload}," in proc.stdout + proc.stderr
    # ZeRO-3's backward hooks find the model output's tensors (a dataclass output was "unknown" to them).
    assert "unknown inputs or outputs type" not in proc.stdout + proc.stderr
    losses, recs = read_losses(tmp_path / "run")
    assert [r["step"] for r in recs if r.get("event") == "reset"] == [6, 10]
    assert all(abs(r["exp_avg_sq"] - 0.99) < 2e-3 and r["exp_avg"] >= r["exp_avg_sq"]
               for r in recs if r.get("event") == "reset")
    # ZeRO-3 merges on the ranks that modify the gathered weight: rank 0, which logs, records what it added.
    assert all(0 < r["update_rel_mean"] <= r["update_rel_max"] < 1 for r in recs if r.get("event") == "reset")
    if zero3:  # every rank's merge residual followed (each rank saves its own buffers; rank 0's alone merged
        # the weight: a mutation merging there only went unseen), and the merges left something in them
        import torch
        states = [torch.load(tmp_path / f"run/checkpoints/step_12/zero_pp_rank_{r}_mp_rank_00_model_states.pt",
                             map_location="cpu", weights_only=False)["module"] for r in range(2)]
        residuals = [k for k in states[0] if k.endswith(".merge_residual")]
        assert len(residuals) == 14 and all(states[0][k].abs().max() > 0 for k in residuals)
        assert all(torch.equal(states[0][k], states[1][k]) for k in residuals)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    from relora_ds.data import PackedTokens

    val = PackedTokens(small_data_dir, "validation", seq_len=32)
    batch = __import__("torch").stack([val[i] for i in range(8)])  # held-out text, not random tokens
    val_loss = [r["val_loss"] for r in recs if "val_loss" in r][-1]
    assert hf(batch, labels=batch).loss.item() < losses[1] - 0.15  # the trained weights, not the init
    assert abs(hf(batch, labels=batch).loss.item() - val_loss) < 0.3
    # launch/export.py rebuilds the same weights from the checkpoint alone (under ZeRO-1 DeepSpeed saves the
    # frozen base only in the module states; under ZeRO-3 only as per-rank fragments).
    export_equals_the_trainers(tmp_path / "run", tmp_path)
    _check_tflops(recs, world=2)  # ZeRO-3 empties its partitioned parameters: counted whole all the same


def test_stage0_checkpoint_exports(tmp_path, small_data_dir):
    """Without ZeRO (plain `python launch/train.py`) the module states are the whole model: export.py reads
    them (DeepSpeed's zero_to_fp32, which it used for every checkpoint, finds no ZeRO files and crashed)."""
    stage0 = tmp_path / "stage0.json"
    stage0.write_text(json.dumps({"zero_optimization": {"stage": 0},
                                  "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    train1(tmp_path, small_data_dir, ds=stage0, total_steps=4, eval_every=0, global_batch_size=4, export=True)
    assert not list((tmp_path / "run" / "checkpoints" / "step_4").glob("*optim_states.pt"))  # no ZeRO files
    export_equals_the_trainers(tmp_path / "run", tmp_path)


@pytest.mark.parametrize("ds", ["zero3", "zero2"])
def test_the_full_rank_engine_is_freed_before_the_relora_engine_is_built(tmp_path, small_data_dir, ds):
    """At the warm-start switch the full-rank engine (its weights, fp32 masters, Adam moments, gradient
    buffers) must be gone before DeepSpeed builds the ReLoRA engine, or both sit in device memory at once:
    engine.destroy() frees no tensor, DeepSpeed's engine holds reference cycles, and under ZeRO-3 two
    module-level references of DeepSpeed keep it alive (relora_ds/ds_patches.py, item 4). Checked with weak
    references at the second deepspeed.initialize (one process). And the parameters trained full-rank on both
    sides (embeddings, norms, head) keep their fp32 masters bit for bit: deepspeed.initialize built the new
    masters from the bf16 copies, rounding away e.g. norm updates below 2e-3 (a review's find)."""
    proc = run_python(ROOT / "tests/dist/switch_worker.py", tmp_path / "run", small_data_dir,
                      ROOT / f"ds_configs/{ds}.json", env=launch_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("ALIVE_AT_BUILD"))
    # first build: nothing before it; second (the switch): the full-rank engine and its optimizer, both gone
    assert line == "ALIVE_AT_BUILD [[], [False, False]]", line
    # kept, where rounding to bf16 would have changed them
    assert "MASTERS_KEPT True ROUNDED_DIFFERS True" in proc.stdout, proc.stdout[-2000:]
    # and the run's first masters are its fp32 source's (hf_model), not their bf16 rounding (a review's find)
    assert "SOURCE_MASTERS True SOURCE_ROUNDED_DIFFERS True" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("rank1_data", ["another recipe", "missing", "same, output_dir not shared"])
def test_ranks_that_see_different_or_no_data_all_stop(tmp_path, small_data_dir, rank1_data):
    """Ranks on different nodes read their own view of the data directory. Where rank 1's copy holds data of
    another recipe (a node-local cache from another run), training would silently feed the ranks different
    data; where it is missing, rank 1 alone would stop and rank 0 wait at its next collective. Each rank runs
    in its own directory with a relative data_dir: every rank must stop with the same reason. So with an
    output_dir on node-local disks (relative here): rank 1 found no checkpoint and started from step 0 while
    rank 0 resumed, then failed in a mismatched collective naming nothing (a user trial, 2026-12-05)."""
    import shutil

    for r in (0, 1):
        (tmp_path / f"rank{r}").mkdir()
    shutil.copytree(small_data_dir, tmp_path / "rank0" / "data")
    if rank1_data.startswith("same"):
        shutil.copytree(small_data_dir, tmp_path / "rank1" / "data")
        run_ranks(ROOT / "tests/dist/data_agreement_worker.py", "--base", str(tmp_path), "--local-output", timeout=300)
        r0, r1 = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
        tail = ("; waited 0.4 s; every rank stops): each rank writes its checkpoint shards there and a resume reads "
                "them all back. Put --output-dir on a file system every node mounts (NFS, Lustre, ...) at the same "
                "path")
        assert r0 == ("ValueError: output_dir run is not one directory shared by every rank (another rank cannot "
                      "see rank 0's .lock there, or reads another" + tail), r0
        assert r1.startswith("ValueError: output_dir run is not one directory shared by every rank (rank 1 on ") \
            and r1.endswith("cannot see rank 0's .lock there" + tail), r1
        return
    if rank1_data == "another recipe":
        shutil.copytree(small_data_dir, tmp_path / "rank1" / "data")
        manifest = tmp_path / "rank1" / "data" / "manifest.json"
        m = json.loads(manifest.read_text())
        m["recipe"]["max_docs"] = 1499
        manifest.write_text(json.dumps(m))
    run_ranks(ROOT / "tests/dist/data_agreement_worker.py", "--base", str(tmp_path), timeout=300)
    r0, r1 = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    if rank1_data == "missing":
        assert r0 == "ValueError: another rank cannot see data_dir data (every rank stops): put it on a " \
                     "filesystem every node mounts, or give every node the same copy", r0
        assert r1.startswith("ValueError: rank 1 on ") and "cannot see data_dir data (every rank stops)" in r1, r1
    else:
        assert r0 == r1 == ("ValueError: the ranks read different prepared data as data_dir data (its manifest, "
                            "tokenizer or token counts differ between nodes; every rank stops): put it on a "
                            "filesystem every node mounts, or give every node the same copy"), (r0, r1)


def test_torchrun_launcher(tmp_path, small_data_dir):
    recipe, ds = write(tmp_path, small_data_dir, total_steps=4, warm_start_steps=0, cycle_length=2,
                        restart_warmup_steps=1, warmup_steps=1, eval_every=0)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = run_group([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()),
                      str(ROOT / "launch/train.py"), "--config", str(recipe), "--deepspeed", str(ds)], 600,
                     cwd=ROOT, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout + proc.stderr
    losses, recs = read_losses(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3, 4] and [r["step"] for r in recs if r.get("event") == "reset"] == [2, 4]


@pytest.mark.parametrize("bad, message", [
    (["--target-modules", "q_proj", "v_prj"], "target_modules ['v_prj'] matched no linear layer (nn.Linear or "
                                               "transformers' Conv1D), the other entries did; linear layer names in "
                                               "this model end in: ['down_proj', "),
    (["--rank", "100"], "layer model.layers.0.self_attn.q_proj: rank=100 must be in [1, min(in_features=64"),
], ids=["target_modules", "rank"])
def test_bad_lora_setting_fails_before_the_warm_start(tmp_path, small_data_dir, bad, message):
    """A typo in target_modules or a rank above a layer's size is a clean error (exit 2) at start-up, not a
    traceback at the switch after the warm start."""
    env = {**launch_env(), "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1"}
    proc = run_python(ROOT / "launch/train.py", "--model", "debug", "--data-dir", small_data_dir, "--cycle-length", "4",
                      "--warm-start-steps", "2", "--total-steps", "8", "--warmup-steps", "2", *bad, "--output-dir",
                      tmp_path / "run", env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or '"loss"' not in metrics.read_text()  # no training step ran


def test_a_second_run_in_a_busy_output_dir_is_refused(tmp_path, small_data_dir):
    """Rank 0 holds an exclusive lock on output_dir while it runs: a second run there (a --resume while the
    first still trains, e.g. after SIGTERM reached only the `deepspeed` runner) is refused before it writes
    anything, naming the holder; the lock goes with its process, so a run after it starts normally."""
    from relora_ds.output_dir import lock_output_dir

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from relora_ds.output_dir import lock_output_dir\n"
                               f"f = lock_output_dir(Path({str(run)!r}))\nprint('locked', flush=True)\n"
                               "sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=launch_env())
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(ValueError, match=rf"output_dir {run} is in use by a run still going \(host .*, pid "
                                             rf"{holder.pid}, since .*\): two runs would interleave.* If that "
                                             rf"process is gone \(its node crashed, on NFS\), delete .*\.lock"):
            lock_output_dir(run)
        proc = train1(tmp_path, small_data_dir, "--resume", check=False, total_steps=4)
        assert proc.returncode == 2 and "is in use by a run still going" in proc.stderr, proc.stderr[-2000:]
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written: no logs, no run_info
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    proc = train1(tmp_path, small_data_dir, "--resume", total_steps=4)  # the holder is gone: the lock with it
    assert (run / "metrics.jsonl").exists()
    assert (run / ".lock").read_text() == ""  # the run ended: its pid is not left there (it was, a user trial)
    assert f"warning: --resume: no checkpoint in {run / 'checkpoints'}; starting from step 0" in proc.stderr
    # In one process (a notebook: a second Trainer on the same directory) the lock is this process's own,
    # and Trainer.close() / unlock_output_dir lets another process take it.
    from relora_ds.output_dir import unlock_output_dir
    mine = lock_output_dir(run)
    assert lock_output_dir(run) is mine
    unlock_output_dir(run)
    other = subprocess.run([sys.executable, "-c", "from pathlib import Path\nfrom relora_ds.output_dir import "
                            f"lock_output_dir\nlock_output_dir(Path({str(run)!r}))"], env=launch_env(),
                           capture_output=True, text=True, timeout=120)
    assert other.returncode == 0, other.stderr


def test_a_wrong_deepspeed_path_fails_before_the_process_group(tmp_path):
    """A mistyped --deepspeed is named at once (exit 2), before DeepSpeed's init and the output_dir lock
    (which would have created the output directory)."""
    env = {**launch_env(), "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1"}
    proc = run_python(ROOT / "launch/train.py", "--model", "debug", "--cycle-length", "4", "--restart-warmup-steps",
                      "2", "--total-steps", "8", "--warmup-steps", "2", "--output-dir", tmp_path / "run",
                      "--deepspeed", tmp_path / "zero2.jsn", env=env, timeout=300)
    assert proc.returncode == 2
    assert f"error: --deepspeed {tmp_path / 'zero2.jsn'}: no such file (configs ship in ds_configs/)" in proc.stderr
    assert not (tmp_path / "run").exists()
