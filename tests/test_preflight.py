"""launch/preflight.py: a run's settings checked before any rank starts, as the trainer would check them at
this world size (batch arithmetic, memory per GPU, what the trainer refuses at start-up, a resume, the data)."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import warnings

import pytest

from launch_utils import ROOT
from launch_utils import clean_env as _clean_env
from launch_utils import run_tool as _run
from relora_ds.train_config import ConfigWarning

sys.path.insert(0, str(ROOT / "launch"))


def _preflight(*argv, env=None) -> subprocess.CompletedProcess:
    """``python launch/preflight.py *argv`` run as its main() in this process, with ``env`` (default
    _clean_env()) as os.environ and restored after: a subprocess paid ~4 s of imports per check. The command
    line itself (stdout carrying the output dir alone) runs as a subprocess in the first test below."""
    import preflight

    saved, env = dict(os.environ), env or _clean_env()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.clear()
        os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(ROOT):
            try:
                code = preflight.main(list(map(str, argv)))
            except SystemExit as e:
                code = e.code
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["preflight.py", *argv], code, out.getvalue(), err.getvalue())


def test_preflight_checks_batch_arithmetic_for_the_world_size(tmp_path):
    args = ["--config", "launch/configs/tiny.yaml", "--deepspeed", "ds_configs/zero2.json", "--micro-batch-size",
            "4", "--global-batch-size", "24", "--output-dir", str(tmp_path / "run")]
    proc = _run(sys.executable, "launch/preflight.py", "--world-size", "3", *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{tmp_path / 'run'}\n"  # the resolved output_dir, for the sbatch scripts
    assert "data the built-in demo corpus" in proc.stderr and "800 steps" in proc.stderr
    assert "3 rank(s) x micro_batch_size 4 x 2 accumulation step(s) = global_batch_size 24" in proc.stderr
    proc = _preflight("--world-size", "4", *args)
    assert proc.returncode == 2
    assert "global_batch_size=24 is not divisible by micro_batch_size=4 x world_size=4 = 16" in proc.stderr
    proc = _preflight("--world-size", "2", *args[:2], "--deepspeed", "nope.json",
                "--output-dir", tmp_path / "other")
    assert proc.returncode == 2 and "--deepspeed nope.json: no such file" in proc.stderr
    # What would otherwise fail every rank after start-up: preset, data dir, target_modules, rank, HF directory.
    for extra, msg in ((["--model", "13b"], "model='13b' is not a preset; valid presets: debug"),
                       (["--data-dir", "/nonexistent"], "'/nonexistent' is not a prepared data dir"),
                       (["--target-modules", "q_proj", "v_prj"], "target_modules ['v_prj'] matched no linear layer"),
                       (["--rank", "512"], "rank=512 must be in [1, min(in_features=256, out_features=256)]"),
                       (["--hf-model", str(ROOT / "launch")], "no config.json")):
        proc = _preflight("--world-size", "3", *args, *extra)
        assert proc.returncode == 2 and msg in proc.stderr, (extra, proc.stderr[-500:])
    # ... the schedule, the kernels setting, and another run in output_dir (without --resume/--overwrite).
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    for extra, env, msg in ((["--total-steps", "50", "--overwrite"], {}, "warm_start_steps=100 leaves no low-rank"),
                            (["--warmup-steps", "150", "--overwrite"], {}, "at least warmup_steps=150: the first"),
                            (["--overwrite"], {"RELORA_KERNELS": "tritn"}, "RELORA_KERNELS='tritn'"),
                            ([], {}, "holds a run (metrics.jsonl): pass --resume to continue it, --overwrite"),
                            (["--overwrite", "--warm-start-from", str(tmp_path / "run" / "hf"), "--warm-start-steps",
                              "0"], {}, "lies inside output_dir"),
                            # a review's find: the run trained to its end, then its export failed (exit 1)
                            (["--resume", "--hf-model", str(tmp_path / "run" / "hf"), "--warm-start-steps", "0"], {},
                             f"hf_model={tmp_path / 'run' / 'hf'} is this run's export directory")):
        proc = _preflight("--world-size", "3", *args, *extra, env=_clean_env(**env))
        assert proc.returncode == 2 and msg in proc.stderr, (extra, proc.stderr[-500:])
    for ok in (["--resume"], ["--overwrite"]):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert _preflight("--world-size", "3", *args, *ok).returncode == 0
        # --resume of a run without a checkpoint starts over: said here, as the trainer says it (a mistyped
        # --output-dir passed preflight without a word)
        said = [str(w.message) for w in seen if issubclass(w.category, ConfigWarning)]
        assert any(m.startswith(f"--resume: no checkpoint in {tmp_path / 'run' / 'checkpoints'}; starting from "
                                "step 0") for m in said) == (ok == ["--resume"]), said


def test_preflight_estimates_memory_per_gpu_and_refuses_a_micro_batch_over_gpu_memory_gb(tmp_path, monkeypatch):
    """The paper's 1b recipe on 8 ranks (ZeRO-2): the estimate line for both phases; with --gpu-memory-gb too
    small for its micro-batch, exit 2 naming the largest micro_batch_size that fits, which then passes while
    the next larger divisor of the per-rank batch does not (the oracle: relora_ds.memory's own fits); fp32 is
    not estimated, and --gpu-memory-gb then says it was not checked."""
    from relora_ds import memory as mt

    args = ["--config", "launch/configs/paper_1b.yaml", "--deepspeed", "ds_configs/zero2.json", "--output-dir",
            tmp_path / "run"]
    proc = _preflight("--world-size", "8", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"estimated peak memory per GPU at micro_batch_size 24: warm start [\d.]+ GB \(states "
                     r"[\d.]+ GB \+ activations [\d.]+ GB\), ReLoRA [\d.]+ GB", proc.stderr), proc.stderr[-2000:]
    proc = _preflight("--world-size", "8", *args, "--gpu-memory-gb", "40")
    fit = re.search(r"the largest micro_batch_size that fits is (\d+) \(a divisor of global_batch_size 1152 / 8 "
                    r"ranks", proc.stderr)
    assert proc.returncode == 2 and fit, proc.stderr
    assert "phases exceed --gpu-memory-gb 40 (33.9 GB usable" in proc.stderr, proc.stderr
    fit = int(fit.group(1))
    assert 1 <= fit < 24 and 144 % fit == 0
    ok = _preflight("--world-size", "8", *args, "--gpu-memory-gb", "40", "--micro-batch-size", fit)
    assert ok.returncode == 0 and "fits --gpu-memory-gb 40 (33.9 GB usable)" in ok.stderr, ok.stderr[-2000:]
    bigger = min(d for d in range(fit + 1, 145) if 144 % d == 0)
    assert _preflight("--world-size", "8", *args, "--gpu-memory-gb", "40", "--micro-batch-size", bigger).returncode == 2
    assert mt.usable_bytes(40) == pytest.approx(33.9e9, rel=2e-3)
    fp32 = tmp_path / "fp32.json"
    fp32.write_text('{"zero_optimization": {"stage": 2}, "bf16": {"enabled": false}}')
    proc = _preflight("--world-size", "8", *args[:2], "--deepspeed", fp32, *args[4:], "--gpu-memory-gb", "40")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "memory per GPU not estimated: fp32 training" in proc.stderr
    assert "--gpu-memory-gb is not checked" in proc.stderr
    assert _preflight("--world-size", "8", *args, "--gpu-memory-gb", "0").returncode == 2
    import preflight  # without --gpu-memory-gb, a GPU on the launching node is compared with: a warning only
    monkeypatch.setattr(preflight, "_local_gpu_gb", lambda: 40.0)
    proc = _preflight("--world-size", "8", *args)
    assert proc.returncode == 0 and "warning: estimated peak memory" in proc.stderr
    assert "phases exceed this node's GPU of 40 (33.9 GB usable" in proc.stderr, proc.stderr[-2000:]


def test_preflight_suggests_a_micro_batch_dividing_the_per_rank_batch(tmp_path):
    """The suggested largest micro_batch_size that fits divides global_batch_size / world_size, the trainer's
    batch arithmetic, not the global batch: the 1b recipe (global batch 1152) on 3 ranks has 384 samples per
    rank, whose divisors (2^7 x 3) miss 1152's 9 and 18. Oracle: the suggestion divides 384 by hand, preflight
    passes it, and refuses the next larger divisor of 384 (the recipe's 24) over --gpu-memory-gb 40 (a mutation
    trial found the per-rank division untested: on 8 ranks 144's divisors below 24 are all of 1152's too)."""
    args = ["--config", "launch/configs/paper_1b.yaml", "--deepspeed", "ds_configs/zero2.json", "--output-dir",
            tmp_path / "run", "--gpu-memory-gb", "40"]
    proc = _preflight("--world-size", "3", *args)
    fit = re.search(r"the largest micro_batch_size that fits is (\d+) \(a divisor of global_batch_size 1152 / 3 "
                    r"ranks", proc.stderr)
    assert proc.returncode == 2 and fit, proc.stderr[-2000:]
    fit = int(fit.group(1))
    assert 384 % fit == 0 and fit < 24, fit
    ok = _preflight("--world-size", "3", *args, "--micro-batch-size", fit)
    assert ok.returncode == 0 and "fits --gpu-memory-gb 40" in ok.stderr, ok.stderr[-2000:]
    bigger = min(d for d in range(fit + 1, 385) if 384 % d == 0)
    assert _preflight("--world-size", "3", *args, "--micro-batch-size", bigger).returncode == 2


def test_preflight_reads_this_nodes_gpu_memory_from_nvidia_smi_and_refuses_world_size_0(tmp_path, monkeypatch):
    """_local_gpu_gb: a fake nvidia-smi on PATH printing 81559 (MiB, an H100's memory.total) gives 81559 x 2^20
    bytes = 85.52 GB (hand-computed); with DS_ACCELERATOR=cpu the ranks use no GPU and nvidia-smi is not asked
    (None); without nvidia-smi, None. --world-size 0 is exit 2 with preflight's own message (a mutation trial
    found these untested)."""
    import preflight

    bindir = tmp_path / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'asked'}\necho 81559\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert preflight._local_gpu_gb() is None and not (tmp_path / "asked").exists()
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert preflight._local_gpu_gb() == pytest.approx(85.52, abs=0.005)
    assert (tmp_path / "asked").read_text().split() == ["--query-gpu=memory.total", "--format=csv,noheader,nounits",
                                                        "--id=0"]
    monkeypatch.delenv("DS_ACCELERATOR")
    assert preflight._local_gpu_gb() == pytest.approx(85.52, abs=0.005)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert preflight._local_gpu_gb() is None
    monkeypatch.undo()
    proc = _preflight("--world-size", "0", "--config", "launch/configs/tiny.yaml", "--output-dir", tmp_path / "run")
    assert proc.returncode == 2 and "error: --world-size must be >= 1, got 0" in proc.stderr, proc.stderr[-800:]


def test_preflight_refuses_what_the_trainer_would_refuse_at_start_up(tmp_path, monkeypatch):
    """--resume of a checkpoint the run cannot load, and (with DS_ACCELERATOR naming the ranks' accelerator)
    kernels=triton without CUDA and fp16 on DeepSpeed's CPU accelerator: the trainer refuses each on every
    rank; preflight gates the SLURM jobs, so it must refuse them first (the messages are the trainer's)."""
    import json
    args = ["--config", "launch/configs/tiny.yaml", "--output-dir", str(tmp_path / "run")]
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "step_8").mkdir(parents=True)
    (ckpt / "latest").write_text("step_8")
    (ckpt / "step_8" / "config.json").write_text(json.dumps(
        {"model": {}, "world_size": 2, "deepspeed": {"zero_optimization": {"stage": 2}}, "tokenizer_sha256": None,
         "train": {"mode": "relora", "rank": 16}, "optimizer_groups": ["lora", "matrices", "vectors"],
         "progress": {"step": 8, "tokens_seen": 8 * 64 * 256}}))
    # (tiny.yaml trains rank 32)
    proc = _preflight("--world-size", "2", *args, "--resume")
    assert proc.returncode == 2 and "settings a resume cannot change, field (now, checkpoint): {'rank': (32, 16)}" \
        in proc.stderr, proc.stderr[-800:]
    fp16 = tmp_path / "fp16.json"
    fp16.write_text(json.dumps({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}))
    other = ["--config", "launch/configs/tiny.yaml", "--output-dir", str(tmp_path / "new")]
    # DeepSpeed's CPU accelerator reports fp16 on CPUs with AVX512-FP16/AMX: pin the answer to "none", the
    # case under test, as the trainer's fp16 test pins it to "supported".
    from deepspeed.accelerator import get_accelerator
    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    for extra, msg in ((["--kernels", "triton"], "kernels=triton (recipe, --kernels or RELORA_KERNELS) needs CUDA"),
                       (["--deepspeed", fp16], "is not supported by DeepSpeed's cpu accelerator, which this run uses")):
        proc = _preflight("--world-size", "2", *other, *extra, env=_clean_env(DS_ACCELERATOR="cpu"))
        assert proc.returncode == 2 and msg in proc.stderr, (extra, proc.stderr[-800:])
        # Without DS_ACCELERATOR the launching node may not be a compute node: left to the ranks.
        env = {k: v for k, v in _clean_env().items() if k != "DS_ACCELERATOR"}
        assert _preflight("--world-size", "2", *other, *extra, env=env).returncode == 0


def test_preflight_counts_a_resumed_token_budget_runs_steps_from_the_checkpoints_tokens(tmp_path):
    """A resumed token_budget run trains what is left of the budget at this run's global batch, counted from
    the tokens the checkpoint has seen (the trainer's schedule.total_steps_for with its progress); preflight's
    summary names that step count. The fake checkpoint of the test above, with this run's model so the resume
    plan passes: step 8 at global batch 32 (8 x 32 x 128 = 32,768 tokens seen); budget 43,008 tokens at tiny's
    global batch 16 x seq_len 128 = 2,048 tokens per step: by hand 8 + (43,008 - 32,768) / 2,048 = 13 steps
    (a fresh count would be 43,008 / 2,048 = 21; a mutation trial found the progress passed in untested)."""
    import json

    from relora_ds.startup import model_config_for
    from relora_ds.train_config import TrainConfig

    model = model_config_for(TrainConfig(model="tiny", seq_len=128, total_steps=10, cycle_length=4,
                                         restart_warmup_steps=1), 2048).to_dict()
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "step_8").mkdir(parents=True)
    (ckpt / "latest").write_text("step_8")
    (ckpt / "step_8" / "config.json").write_text(json.dumps(
        {"model": model, "world_size": 2, "deepspeed": {"zero_optimization": {"stage": 2}}, "tokenizer_sha256": None,
         "train": {"mode": "relora", "rank": 32}, "optimizer_groups": ["lora", "matrices", "vectors"],
         "progress": {"step": 8, "tokens_seen": 8 * 32 * 128}}))
    args = ["--config", "launch/configs/tiny.yaml", "--output-dir", str(tmp_path / "run"), "--total-steps", "none",
            "--token-budget", "43008", "--warm-start-steps", "2", "--warmup-steps", "1", "--cycle-length", "4",
            "--restart-warmup-steps", "1", "--save-every", "4"]
    proc = _preflight("--world-size", "2", *args, "--resume")
    assert proc.returncode == 0, proc.stderr[-800:]
    assert ", 13 steps, data" in proc.stderr, proc.stderr[-800:]
    fresh = _preflight("--world-size", "2", *args[:2], "--output-dir", str(tmp_path / "fresh"), *args[4:])
    assert fresh.returncode == 0 and ", 21 steps, data" in fresh.stderr, fresh.stderr[-800:]


def test_preflight_checks_the_training_data_size_and_a_resume_on_other_data(tmp_path):
    """With a prepared --data-dir, preflight refuses what the trainer refuses before any engine: fewer training
    windows than one global batch at this world size (124 windows of 32 in 4,000 tokens), and with --resume a
    checkpoint that recorded other training data; the trainer's own messages. A checkpoint that recorded this
    data (startup.train_data_record, as the trainer writes it) passes."""
    import json

    from relora_ds.data import load_manifest
    from relora_ds.startup import model_config_for, train_data_record
    from relora_ds.train_config import TrainConfig
    from trainer_utils import packed_data_dir

    data = packed_data_dir(tmp_path / "data", 4_000, 3_000)
    settings = dict(model="debug", rank=4, seq_len=32, cycle_length=4, restart_warmup_steps=2, warmup_steps=2,
                    warm_start_steps=0, total_steps=8, micro_batch_size=8, eval_every=0)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()] + ["--data-dir", data, "--output-dir",
                                                                              tmp_path / "run"]
    (tmp_path / "bf16.json").write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}))
    preflight = ["--world-size", "2", *args, "--deepspeed", tmp_path / "bf16.json"]
    proc = _preflight(*preflight, "--global-batch-size", "64")
    assert proc.returncode == 0, proc.stderr[-800:]
    # a vocab_size the data's tokenizer overrides: the trainer's warning (preflight said nothing, a user trial)
    from relora_ds.train_config import ConfigWarning
    with pytest.warns(ConfigWarning, match=f"vocab_size=4096 is not used: the tokenizer of data_dir {data} has 512 "
                                           "pieces, which the model takes"):
        assert _preflight(*preflight, "--global-batch-size", "64", "--vocab-size", "4096").returncode == 0
    with warnings.catch_warnings():  # the data's own vocabulary given: nothing to warn about
        warnings.filterwarnings("error", "vocab_size", ConfigWarning)
        assert _preflight(*preflight, "--global-batch-size", "64", "--vocab-size", "512").returncode == 0
    proc = _preflight(*preflight, "--global-batch-size", "128")
    assert proc.returncode == 2
    assert (f"error: the training split of {data} holds 124 windows of --seq-len 32 (4,000 tokens), fewer than one "
            "optimizer step's --global-batch-size 128: use a --global-batch-size of at most 112 (a multiple of "
            "--micro-batch-size 8 x 2 rank(s))") in proc.stderr, proc.stderr[-800:]
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "step_4").mkdir(parents=True)
    (ckpt / "latest").write_text("step_4")
    model = model_config_for(TrainConfig(**settings), 512).to_dict()
    record = train_data_record(load_manifest(data), 32)

    def saved(data_record):
        (ckpt / "step_4" / "config.json").write_text(json.dumps(
            {"model": model, "world_size": 2, "deepspeed": {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}},
             "tokenizer_sha256": load_manifest(data)["tokenizer_sha256"], "data": data_record,
             "train": {"mode": "relora", "rank": 4, "seq_len": 32}, "optimizer_groups": ["lora", "matrices", "vectors"],
             "progress": {"step": 4, "tokens_seen": 4 * 64 * 32}}))
    saved({"fingerprint": "0" * 64, "train_tokens": 3_000, "train_windows": 93})
    proc = _preflight(*preflight, "--global-batch-size", "64", "--resume")
    assert proc.returncode == 2
    assert (f"error: checkpoint {ckpt / 'step_4'} was trained on other data than {data} holds now: its training split "
            "had 3,000 tokens, 93 windows of seq_len 32, now 4,000 tokens, 124 windows") in proc.stderr, proc.stderr[-800:]
    saved(record)
    proc = _preflight(*preflight, "--global-batch-size", "64", "--resume")
    assert proc.returncode == 0, proc.stderr[-800:]
    # the memory estimate covers the phases left: a resume at step 4 is past a 2-step warm start
    fresh = _preflight(*preflight, "--global-batch-size", "64", "--warm-start-steps", "2", "--output-dir",
                       tmp_path / "fresh")
    resumed = _preflight(*preflight, "--global-batch-size", "64", "--warm-start-steps", "2", "--resume")
    assert fresh.returncode == resumed.returncode == 0, fresh.stderr[-800:] + resumed.stderr[-800:]
    assert re.search(r"micro_batch_size 8: warm start [^,]*, ReLoRA ", fresh.stderr), fresh.stderr[-800:]
    assert re.search(r"micro_batch_size 8: ReLoRA ", resumed.stderr), resumed.stderr[-800:]
    # resumed from the warm start's last checkpoint (step_4 of a 4-step one): its full-rank states come first
    boundary = _preflight(*preflight, "--global-batch-size", "64", "--warm-start-steps", "4", "--resume")
    assert boundary.returncode == 0, boundary.stderr[-800:]
    assert re.search(r"micro_batch_size 8: warm start \(loaded, no step\) [^,]* \(states [^,]*\+ activations "
                     r"0\.0 MB\), ReLoRA ", boundary.stderr), boundary.stderr[-800:]


def test_preflight_checks_a_mixtures_members(tmp_path):
    """On a mixture dir (prepare_data.py --mix), preflight refuses what the trainer refuses: validation splits
    all too short for one window at --seq-len, and a member prepared again since the mixture was made; the mixture as
    made passes. The trainer's own messages."""
    from relora_ds.data import make_mixture
    from trainer_utils import packed_data_dir

    a = packed_data_dir(tmp_path / "a", 20_000, 1_000, corpus="corpus-a")  # 19 training windows at 1024
    b = packed_data_dir(tmp_path / "b", 2_000, 1_000, corpus="corpus-b")
    mix = make_mixture([(a, 2), (b, 1)], tmp_path / "mix")
    settings = dict(model="debug", rank=4, cycle_length=4, restart_warmup_steps=2, warmup_steps=2,
                    warm_start_steps=0, total_steps=8, micro_batch_size=4, global_batch_size=8, eval_every=4)
    args = ["--world-size", "2", *[f"--{k.replace('_', '-')}={v}" for k, v in settings.items()],
            "--data-dir", mix, "--output-dir", tmp_path / "run"]
    assert _preflight(*args, "--seq-len", "32").returncode == 0
    proc = _preflight(*args, "--seq-len", "1024")
    assert proc.returncode == 2 and (f"error: mixture {mix}: the validation split of every member holds fewer tokens "
                                     "than one window of --seq-len 1024 needs (seq_len + 1 = 1,025): ../a (1,000 "
                                     "tokens), ../b (1,000 tokens)") in proc.stderr, proc.stderr[-800:]
    packed_data_dir(b, 2_100, 1_000, corpus="corpus-b2")
    proc = _preflight(*args, "--seq-len", "32")
    assert proc.returncode == 2 and f"its member {b} was prepared again since the mixture was made" in proc.stderr, \
        proc.stderr[-800:]


def test_preflight_refuses_document_masking_on_data_whose_eos_ends_no_document(tmp_path, monkeypatch):
    """--document-masking on data whose tokenizer uses one id for BOS and EOS: the trainer refuses it at start-up,
    preflight accepted it (a fuzzer's find: a multi-node job then died at its start); both refuse it alike
    (startup.check_document_masking). Oracle: the Trainer's own refusal."""
    from relora_ds.train_args import build_launch_parser, config_from_args
    from trainer_utils import in_process_trainer, packed_data_dir

    data = packed_data_dir(tmp_path / "data", 4000, 600)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["bos_id"] = manifest["eos_id"]  # an OPT-style tokenizer: BOS and EOS share an id
    (data / "manifest.json").write_text(json.dumps(manifest))
    args = ["--config", "launch/configs/tiny.yaml", "--data-dir", str(data), "--seq-len", "32", "--total-steps", "3",
            "--warm-start-steps", "0", "--warmup-steps", "0", "--cycle-length", "1", "--restart-warmup-steps", "0",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--eval-every", "0",
            "--output-dir", str(tmp_path / "run"), "--document-masking"]
    trainer_mod = in_process_trainer(monkeypatch)
    with pytest.raises(ValueError, match="document_masking: the data's tokenizer uses one id") as refused:
        trainer_mod.Trainer(config_from_args(build_launch_parser().parse_args(args)), None)  # the oracle
    proc = _preflight("--world-size", "1", *args)
    assert proc.returncode == 2 and f"error: {refused.value}" in proc.stderr, proc.stderr[-800:]
    assert _preflight("--world-size", "1", *args[:-1]).returncode == 0  # without masking the data is fine


def test_the_smallest_builtin_vocab_preflight_accepts_is_the_smallest_the_corpus_tokenizes(tmp_path):
    """vocab_size for the built-in corpus: TrainConfig (and so preflight) took 259 to 337, which SentencePiece's
    training then refused on every rank (a fuzzer's find: byte fallback plus the corpus's characters need 338).
    Oracle: data preparation itself, at the bound and one below."""
    from relora_ds.data import prepare_data
    from relora_ds.train_config import _MIN_BUILTIN_VOCAB

    with pytest.raises(ValueError, match=rf"too small for this corpus: .* need at least {_MIN_BUILTIN_VOCAB} pieces"):
        prepare_data(None, tmp_path / "below", vocab_size=_MIN_BUILTIN_VOCAB - 1, seq_len=32)
    prepare_data(None, tmp_path / "at", vocab_size=_MIN_BUILTIN_VOCAB, seq_len=32)
    proc = _preflight("--world-size", "1", "--config", "launch/configs/tiny.yaml", "--vocab-size",
                      str(_MIN_BUILTIN_VOCAB - 1), "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 2 and f"vocab_size={_MIN_BUILTIN_VOCAB - 1} is too small" in proc.stderr, proc.stderr

