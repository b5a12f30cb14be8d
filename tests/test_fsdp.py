"""ReLoRA on a model sharded by torch's FSDP2 (`fully_shard`) through the Python API (2 CPU ranks, gloo), and FSDP1 refused."""
import pytest
import torch
from launch_utils import ROOT, run_ranks


def test_fsdp2_sharded_meta_model_materializes_fresh_factors():
    """A model built and wrapped on meta, sharded with FSDP2 before to_empty: the factors are DTensors, and the
    re-init first failed on them (mixed torch.Tensor and DTensor, a review found it); 2 ranks, each its shard
    of the fresh wrap's A, B = 0 (oracle: the wrap of the same model on real weights)."""
    proc = run_ranks(ROOT / "tests/dist/fsdp2_worker.py", "meta", timeout=300)
    assert proc.stdout.count("fsdp2 meta ok") == 2, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_fsdp2_reset_is_the_one_process_reset_of_the_gathered_state():
    """merge_and_reinit and prune_optimizer_state on DTensor weights and moments against one process holding
    the same whole state: bit-identical weights, buffers and moments, the same next loss. Before: magnitude
    masks were computed per shard (other entries zeroed than one process zeroes, a different count per
    rank), random pruning, an int8 base's merge and a merge residual failed (mixed torch.Tensor and
    DTensor); unwrap of a sharded model is refused naming the gather to do first, and its merged state dict
    (export, the HF Trainer's save_model) is gathered a tensor at a time: rank 0's is the one process's."""
    proc = run_ranks(ROOT / "tests/dist/fsdp2_worker.py", "reset", timeout=300)
    assert proc.stdout.count("fsdp2 relora ok") == 2, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_fsdp2_layers_under_the_selective_checkpointing_policy():
    """relora_ds.checkpointing.hf_checkpointing_kwargs on a transformers model sharded per layer by FSDP2 (2
    ranks; its all-gathers inside the checkpointed region, LoRA dropout on): the same loss and gathered
    gradients as the same sharded model without checkpointing."""
    proc = run_ranks(ROOT / "tests/dist/fsdp2_worker.py", "selective", timeout=300)
    assert proc.stdout.count("fsdp2 selective ok") == 2, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_fsdp1_is_refused_at_the_merge_before_any_change():
    """FSDP1's layers hold views into flat shards outside its forward (empty tensors with use_orig_params=False,
    1-D slices with True), not the matrices a merge reads: refused before any change, naming FSDP2. FSDP1
    cannot be built without an accelerator ("FSDP needs a non-CPU accelerator device"), so a bare instance of
    its class wraps the model here."""
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel
    from transformers import LlamaConfig, LlamaForCausalLM

    import relora_ds

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    model = relora_ds.wrap(LlamaForCausalLM(cfg), rank=4)
    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(wrapper)
    wrapper._modules["_fsdp_wrapped_module"] = model  # (add_module would ask its __getattr__, which forwards there)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"wrapped in FSDP1 \(FullyShardedDataParallel\).*fully_shard"):
        relora_ds.merge_and_reinit(wrapper)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (launch/gpu_tests.sh)")
def test_fsdp2_on_cuda_keeps_the_merge_residuals_on_the_host():
    """fully_shard moves buffers with .data = (past ReLoRALinear._apply), so an int8 base's and merge_residual's
    residuals went to the GPU whole on every rank (a review found it reading FSDP2's code): the first forward
    puts them back, and the merge (Triton on CUDA) matches the unsharded model merged on the CPU."""
    proc = run_ranks(ROOT / "tests/dist/fsdp2_worker.py", "cuda", nprocs=1, timeout=300)
    assert "fsdp2 cuda host buffers ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (launch/gpu_tests.sh)")
def test_fsdp2_on_cuda_moves_the_residuals_back_inside_compiled_layers():
    """compile_layers (--compile's) with FSDP2: the move back to the host runs eagerly from the compiled layer
    (a .data assignment across devices fails to trace: seen on CPU with a meta stand-in), and the logits are the
    uncompiled sharded model's."""
    proc = run_ranks(ROOT / "tests/dist/fsdp2_worker.py", "cuda_compiled", nprocs=1, timeout=300)
    assert "fsdp2 cuda compiled host buffers ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
