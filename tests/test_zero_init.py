"""ZeRO-3 models built partitioned (relora_ds/zero_init.py: deepspeed.zero.Init, ReLoRA layers swapped in
partitioned, whole models partitioned one parameter at a time), against the whole-model build."""
from launch_utils import ROOT, run_ranks
from trainer_utils import read_losses, rewind_to, write


def test_models_built_partitioned_equal_the_whole_build():
    """tests/dist/zero_init_worker.py: every parameter partitioned, values bit for bit the whole build's."""
    proc = run_ranks(ROOT / "tests/dist/zero_init_worker.py")
    assert proc.stdout.count("zero_init checks passed") == 2, proc.stdout[-2000:]


def test_zero3_run_built_partitioned_trains_and_resumes_as_the_whole_build(tmp_path, small_data_dir):
    """The tiny recipe under ZeRO-3 (bf16): built partitioned (the default) and built whole (zero_init:
    false) give the same losses bit for bit, through the warm-start switch (a gathered model partitioned
    again), resets, and a resume inside the ReLoRA phase (a fresh model built partitioned, then wrapped)."""
    zero3 = ROOT / "ds_configs/zero3.json"
    runs = {}
    for built in ("partitioned", "whole"):
        (tmp_path / built).mkdir()
        recipe, _ = write(tmp_path / built, small_data_dir, save_every=4, zero_init=built == "partitioned")
        proc = run_ranks(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", zero3)
        assert ("ZeRO stage 3, offload: none, zero.Init," in proc.stdout) == (built == "partitioned"), proc.stdout
        runs[built] = read_losses(tmp_path / built / "run")[0]
    assert sorted(runs["whole"]) == list(range(1, 13))
    assert runs["partitioned"] == runs["whole"]
    rewind_to(tmp_path / "partitioned" / "run", "step_8")
    run_ranks(ROOT / "launch/train.py", "--config", tmp_path / "partitioned" / "recipe.yaml", "--deepspeed", zero3,
              "--resume")
    resumed = read_losses(tmp_path / "partitioned" / "run")[0]
    assert resumed == {step: runs["whole"][step] for step in range(9, 13)}
