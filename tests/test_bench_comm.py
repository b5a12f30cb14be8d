"""launch/bench_comm.py: what DeepSpeed's ZeRO-2 all-reduces per step with gradient accumulation (the README's
sizing notes rest on it). Oracle: the trainable parameters of the tiny preset's ReLoRA phase, counted on the
model, in fp32 bytes: each micro-batch all-reduces them once at ZeRO-2, where ZeRO-1 does once a step."""
import ast
import re

import pytest

from launch_utils import ROOT, run_ranks


def _per_step(tmp_path, stage, micro_batches):
    proc = run_ranks(ROOT / "launch/bench_comm.py", "--stage", stage, "--micro-batches", micro_batches, "--steps", 2,
                     "--out", tmp_path / f"zero{stage}", timeout=600)
    line = next(line for line in proc.stdout.splitlines() if line.startswith(f"ZeRO-{stage}, 2 ranks"))
    return ast.literal_eval(re.search(r"\{.*\}", line).group(0))


def test_zero2_all_reduces_every_micro_batch_and_zero1_once_a_step(tmp_path):
    import relora_ds

    model = relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("tiny"))
    relora_ds.wrap(model, rank=32)  # tiny.yaml's rank
    trainable_mb = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    assert _per_step(tmp_path, 2, 2)["all_reduce MB"] == pytest.approx(2 * trainable_mb, rel=1e-3)
    assert _per_step(tmp_path, 1, 2)["all_reduce MB"] == pytest.approx(trainable_mb, rel=1e-3)


def test_a_trainer_error_fails_the_script_without_counts(tmp_path):
    """A run the trainer refuses (here an extra trainer flag, --lr -1) exits non-zero and prints no counts (it
    printed an empty dict and exited 0); a bad count of its own is an argparse error."""
    import subprocess
    import sys

    from launch_utils import clean_env

    script = str(ROOT / "launch/bench_comm.py")
    for argv, error in ((["--lr", "-1"], "error: lr=-1.0 must be positive"),
                        (["--micro-batches", "0"], "argument --micro-batches: must be a positive whole number, got 0")):
        proc = subprocess.run([sys.executable, script, "--stage", "1", "--steps", "1", "--out", str(tmp_path), *argv],
                              capture_output=True, text=True, env=clean_env(), timeout=300)
        assert proc.returncode == 2 and error in proc.stderr and "ZeRO-1" not in proc.stdout, proc.stderr[-500:]
