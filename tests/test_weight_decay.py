"""Weight decay per param group: the LoRA factors and the matrices trained full-rank decay, the norms do not
(unless decay_norms_and_biases), in every optimizer DeepSpeed builds for the trainer (2 CPU ranks, one step
with zero gradients: p * (1 - lr * wd) where it decays, p where it does not). The trainer's groups themselves
are checked in tests/test_trainer_logic.py (what deepspeed.initialize receives) and the resume's re-applied
settings there too."""
import re

from launch_utils import ROOT, run_ranks

CASES = (("stage0", False), ("zero1_bf16", False), ("zero2", False), ("zero3", False), ("zero2_offload", False),
         ("zero3", True))  # (the worker's case, decay_norms_and_biases)


def test_every_deepspeed_optimizer_keeps_each_groups_weight_decay():
    proc = run_ranks(ROOT / "tests/dist/weight_decay_worker.py", timeout=900)
    lines = [line for line in proc.stdout.splitlines() if re.match(r"\w+ decay_vectors=", line)]
    # The debug preset: 2 layers, 7 LoRA-wrapped linears each (lora_A decays; lora_B starts at 0), the embedding
    # and the head trained full-rank, 2 norms per layer and the final one.
    want = [f"{case} decay_vectors={dv} {kind}: ok ({n})" for case, dv in CASES
            for kind, n in (("lora", 14), ("matrix", 2), ("norm", 5))]
    assert lines == want, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_a_zero3_partitioned_parameter_is_grouped_by_its_full_shape():
    """Under ZeRO-3 built partitioned (zero_init), each parameter the trainer groups is DeepSpeed's empty
    placeholder (shape (0,)), its full shape in ds_shape: the groups, and so the weight decay, are those of the
    same model whole (a mutation trial's survivor read p.shape, and every matrix went undecayed: the worker
    above builds its models whole, so it never saw a placeholder). In-process, placeholders made by hand."""
    import copy

    import torch

    import relora_ds
    from relora_ds.engines import optimizer_groups, param_groups
    from relora_ds.train_config import TrainConfig

    cfg = TrainConfig(cycle_length=4, restart_warmup_steps=2, total_steps=8, weight_decay=0.1)
    whole = relora_ds.wrap(relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("debug", vocab_size=64)), rank=4)
    flat = copy.deepcopy(whole)
    for p in flat.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)

    def names(model):
        return [(kind, [name for name, _ in group]) for kind, group in param_groups(model)]
    assert names(flat) == names(whole) and [kind for kind, _ in names(whole)] == ["lora", "matrices", "vectors"]
    assert [g["weight_decay"] for g in optimizer_groups(flat, cfg)] == [0.1, 0.1, 0.0]
