"""ReLoRA training under FSDP2 (fully_shard) on CPU ranks (gloo) against one process training the same model on
the same data: merges, resets, uneven shards, mixed precision, an int8 base, tied embeddings, a resume through
torch.distributed.checkpoint (tests/dist/fsdp2_review_worker.py)."""
from launch_utils import ROOT, run_ranks

WORKER = ROOT / "tests/dist/fsdp2_review_worker.py"


def test_fsdp2_training_with_merges_and_resets_is_the_one_process_run_bit_for_bit(tmp_path):
    """2 ranks, fp32: after 6 steps (merges every 2, a reset at 4, an evaluation forward before each) every weight,
    buffer and Adam moment equals one process's bit for bit, for each layout of fully_shard (each decoder layer,
    the root alone, two submodules, not resharding after forward), bf16 parameters with fp32 reduction, tied
    embeddings, an int8 base and a resume from a DCP checkpoint. merge_and_reinit(model.model) of a model sharded
    at its root alone lost every merge after an evaluation forward (it merged into whole copies FSDP2 then
    dropped, and counted the merge: no error); a submodule of a sharded model is refused by wrap (it was wrapped
    after a forward, each rank then training its own factors; before it, its DTensor weights were called
    "already quantized by another library")."""
    proc = run_ranks(WORKER, "two", tmp_path, timeout=300)
    out = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("wrap after fully_shard refused") == 2, out
    assert proc.stdout.count("fsdp2 review two ok") == 2, out


def test_fsdp2_training_on_three_ranks_with_an_empty_shard_is_the_one_process_run(tmp_path):
    """3 ranks, fp64 (gloo's 3-way gradient sum is in no order one process reproduces: within 1e-12, seen 6e-16):
    a lora_A of 4 rows shards 2, 2 and 0, the MLP's 47 rows 16, 16, 15; each decoder layer sharded, and an int8 base
    merged through the submodule of a model sharded at its root."""
    proc = run_ranks(WORKER, "three", tmp_path, nprocs=3, timeout=300)
    assert proc.stdout.count("fsdp2 review three ok") == 3, proc.stdout[-4000:] + proc.stderr[-4000:]
