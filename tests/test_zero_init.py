"""ZeRO-3 models built partitioned (relora_ds/zero_init.py: deepspeed.zero.Init, ReLoRA layers swapped in
partitioned, whole models partitioned one parameter at a time), against the whole-model build."""
import pytest

from launch_utils import ROOT, run_ranks
from trainer_utils import read_losses, rewind_to, write


def test_models_built_partitioned_equal_the_whole_build():
    """tests/dist/zero_init_worker.py: every parameter partitioned, values bit for bit the whole build's."""
    proc = run_ranks(ROOT / "tests/dist/zero_init_worker.py")
    assert proc.stdout.count("zero_init checks passed") == 2, proc.stdout[-2000:]


def test_zero3_run_built_partitioned_trains_and_resumes_as_the_whole_build(tmp_path, small_data_dir):
    """The tiny recipe under ZeRO-3 (bf16) with an int8 base and LoRA dropout: built partitioned (the
    default) and built whole (zero_init: false) give the same losses bit for bit, through the warm-start
    switch (the ReLoRA model built partitioned takes the fp32 masters a parameter at a time: the int8 base
    quantized from them, the dropout's random stream untouched by the build), resets, and a resume inside
    the ReLoRA phase (a fresh model built partitioned, then wrapped). A bf16 base's switch under ZeRO-3 runs
    in tests/test_trainer.py (stage 3)."""
    zero3 = ROOT / "ds_configs/zero3.json"
    runs = {}
    for built in ("partitioned", "whole"):
        (tmp_path / built).mkdir()
        recipe_path, _ = write(tmp_path / built, small_data_dir, save_every=4, zero_init=built == "partitioned",
                               quantize="int8", dropout=0.1)
        proc = run_ranks(ROOT / "launch/train.py", "--config", recipe_path, "--deepspeed", zero3)
        assert ("ZeRO stage 3, offload: none, zero.Init," in proc.stdout) == (built == "partitioned"), proc.stdout
        runs[built] = read_losses(tmp_path / built / "run")[0]
    assert sorted(runs["whole"]) == list(range(1, 13))
    assert runs["partitioned"] == runs["whole"]
    rewind_to(tmp_path / "partitioned" / "run", "step_8")
    run_ranks(ROOT / "launch/train.py", "--config", tmp_path / "partitioned" / "recipe.yaml", "--deepspeed", zero3,
              "--resume")
    resumed = read_losses(tmp_path / "partitioned" / "run")[0]
    assert resumed == {step: runs["whole"][step] for step in range(9, 13)}


@pytest.mark.parametrize("start", ["hf_model", "random"])
def test_zero3_relora_model_at_once_built_partitioned_equals_the_whole_build(tmp_path, small_data_dir, start):
    """Straight into ReLoRA (no warm start) under ZeRO-3 with an int8 base and LoRA dropout, built partitioned
    and built whole train the same losses bit for bit. hf_model: the model built partitioned, wrapped, and
    filled from the safetensors one tensor at a time (the int8 base quantized from the fp32 file, the
    attention and MLP biases into their ReLoRA layers). random: built partitioned in fp32, wrapped (the int8
    base quantized from the fp32 init, as the whole build's), then cast. Both seed the dropout's stream (a
    review found hf_model runs unseeded: each run drew other masks)."""
    from test_model_families import _hf_dir

    source = {"hf_model": _hf_dir(tmp_path, "llama-bias-head_dim-linear")} if start == "hf_model" else {}
    runs = {}
    for built in ("partitioned", "whole"):
        (tmp_path / built).mkdir()
        recipe, _ = write(tmp_path / built, small_data_dir, **source, warm_start_steps=0, quantize="int8",
                          dropout=0.1, total_steps=6, eval_every=0, zero_init=built == "partitioned")
        run_ranks(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", ROOT / "ds_configs/zero3.json")
        runs[built] = read_losses(tmp_path / built / "run")[0]
    assert sorted(runs["whole"]) == list(range(1, 7))
    assert runs["partitioned"] == runs["whole"]


def test_bench_build_memory_reports_each_ranks_peaks(tmp_path, small_data_dir):
    """launch/bench_build_memory.py (BENCHMARKS.md) on the debug model: one row with every rank's peaks at
    the build, the engine, and the switch, for the build it was asked for."""
    import json

    out = tmp_path / "rows.jsonl"
    proc = run_ranks(ROOT / "launch/bench_build_memory.py", "--model", "debug", "--rank", "4", "--data-dir",
                     small_data_dir, "--warm-start-steps", "1", "--cycle-length", "10", "--total-steps", "4",
                     "--warmup-steps", "1", "--restart-warmup-steps", "1", "--global-batch-size", "16",
                     "--seq-len", "32", "--deepspeed", ROOT / "ds_configs/zero3.json", "--output-dir",
                     tmp_path / "run", "--out", out, "--no-zero-init")
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["world"], row["zero_stage"], row["zero_init"]) == (2, 3, False), proc.stdout[-2000:]
    for peaks in row["ranks"]:
        assert list(peaks) == ["built", "start", "switch_built", "switch"]
        rss = [p["rss_gib"] for p in peaks.values()]
        assert 0.1 < rss[0] <= rss[1] <= rss[2] <= rss[3] < 8, rss  # a high-water mark, in GiB
