"""2-rank worker for tests/test_nvme_offload.py: ZeRO-3 with the optimizer and the parameters swapped to
NVMe files (ZeRO-Infinity) against the same run with both in host memory, through a ReLoRA reset.

Each mode trains the same model from the same seed: 3 steps, a reset (prune 90% of the LoRA moments, merge
and re-initialize), 2 more steps, and records per rank the losses and digests of what each rank gathers:
the fp32 masters, the LoRA moments and the frozen base weights. Modes:
- "cpu": optimizer and parameters in host memory (the oracle);
- "nvme": optimizer and parameters on NVMe, with relora_ds.patch_deepspeed_nvme();
- "params": the parameters on NVMe, the optimizer in host memory.
Each then saves a checkpoint, takes 2 more steps, and takes the same 2 steps from a new engine that loads it:
what the trainer's resume relies on (the new engine's parameters have other ds_ids, the names of the
optimizer's swap files, as in a resume whose ReLoRA engine was not built after a warm start's). "nvme" also
loads it converted to DeepSpeed's universal checkpoint (as a resume on another number of ranks does; without
relora_ds's fix DeepSpeed copied into the swapped sub-groups' empty placeholders: "start (0) + length
(16500) exceeds dimension size (0)").
Two layers: the last layer's parameters, used at the end of the forward and the start of the backward, are
the ones DeepSpeed's NVMe prefetch queued twice. Sizes: DeepSpeed swaps only tensors of >= 1 MiB a rank (MIN_AIO_BYTES): hidden 1000, vocabulary 1048 and LoRA
rank 33. The norms' 1000 / 2 ranks = 500 elements put the lm_head's gradient (524,000 a rank, swapped) at an
offset that is not a multiple of DeepSpeed's I/O alignment (256 fp32), the case DeepSpeed reads wrong.
"""
import argparse
import hashlib
import json
import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.swap_tensor.partitioned_param_swapper import AsyncPartitionedParameterSwapper
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

import relora_ds
from relora_ds import LlamaConfig, LlamaForCausalLM
from relora_ds.universal import make_universal
from relora_ds.distributed import init_distributed, run_and_exit
from relora_ds.zero_reset import offloaded


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


PREFETCH = "_PartitionedParameterCoordinator__prefetch_nvme_param_partitions"  # name-mangled private method
DEEPSPEEDS_PREFETCH = getattr(PartitionedParameterCoordinator, PREFETCH)  # taken before any patch


def count_prefetch_duplicates() -> dict:
    """Wrap the fixed NVMe prefetch to count, at each call, the parameters DeepSpeed's own prefetch would have
    asked the swapper for twice there (run first with the swapper's swap_in recording instead of reading):
    each is the 'already assigned swap buffer' assertion the fix avoids."""
    fixed, seen = getattr(PartitionedParameterCoordinator, PREFETCH), {"calls": 0, "duplicates": 0}

    def counting(self):
        asked, swap_in = [], AsyncPartitionedParameterSwapper.swap_in
        AsyncPartitionedParameterSwapper.swap_in = lambda swapper, params, **kw: asked.extend(p.ds_id for p in params)
        try:
            DEEPSPEEDS_PREFETCH(self)
        finally:
            AsyncPartitionedParameterSwapper.swap_in = swap_in
        seen["calls"] += 1
        seen["duplicates"] += len(asked) - len(set(asked))
        return fixed(self)

    setattr(PartitionedParameterCoordinator, PREFETCH, counting)
    return seen


def gathered(module) -> dict:
    out = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            out[name] = param.detach().float().clone()
    return out


def build(mode: str, swap_dir: str, load_universal: bool = False):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1048, hidden_size=1000, intermediate_size=2751, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64)
    model = relora_ds.wrap(LlamaForCausalLM(cfg), rank=33, seed=11)
    nvme = {"device": "nvme", "nvme_path": swap_dir}
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "sub_group_size": 2 ** 18,  # several subgroups
            "offload_optimizer": dict(nvme) if mode == "nvme" else {"device": "cpu"},
            "offload_param": dict(nvme, buffer_size=2 ** 21, buffer_count=8) if mode in ("nvme", "params")
            else {"device": "cpu"}}
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": zero,
          "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
          "checkpoint": {"load_universal": load_universal}}
    lora = relora_ds.lora_parameters(model)
    others = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[{"params": lora}, {"params": others}], config=ds)
    return engine, lora


def run(mode: str, swap_dir: str, rank: int) -> dict:
    if mode in ("nvme", "params"):
        relora_ds.patch_deepspeed_nvme()
    if mode == "nvme":
        prefetch = count_prefetch_duplicates()
    engine, lora = build(mode, swap_dir)
    model = engine.module
    x = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(100 + rank))
    res = {"offloaded": offloaded(engine), "losses": []}

    def steps(n):
        for _ in range(n):
            loss = engine(x, labels=x).loss
            engine.backward(loss)
            engine.step()
            res["losses"].append(loss.item())

    steps(3)
    if mode == "nvme":
        res["prefetch"] = prefetch
    opt = engine.optimizer
    res["swapped_subgroups"] = sum(bool(opt._swappable_optimizer_subgroup(i)) for i in range(len(opt.fp16_groups)))
    root = os.path.join(swap_dir, "zero_stage_3")
    if os.path.isdir(root):  # not vacuous: optimizer subgroups and parameters really live in files
        res["swap_bytes"] = {d: sum(os.path.getsize(os.path.join(root, d, f"rank{rank}", f))
                                    for f in os.listdir(os.path.join(root, d, f"rank{rank}")))
                             for d in sorted(os.listdir(root))}
    stats = relora_ds.prune_optimizer_state(engine, lora, "magnitude", 0.9)
    res["pruned"] = {k: v for k, v in stats.items() if k.startswith("exp")}
    relora_ds.merge_and_reinit(engine)
    steps(2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    res["masters"] = digest(safe_get_full_fp32_param(p) for p in trainable)
    res["moments"] = digest(safe_get_full_optimizer_state(p, k) for p in lora for k in ("exp_avg", "exp_avg_sq"))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    with deepspeed.zero.GatheredParameters(frozen):
        res["base"] = digest(frozen)
    # a checkpoint, 2 steps on, and the same 2 steps from an engine that loads it
    before = gathered(engine.module)
    ckpt = os.path.join(swap_dir, "ckpt")
    engine.save_checkpoint(ckpt, tag="t")
    saved = optimizer_digests(engine.module)
    steps(1)
    continued_masters = [safe_get_full_fp32_param(p).clone() for p in trainable]
    steps(1)
    engine.destroy()
    engine, lora = build(mode, os.path.join(swap_dir, "again"))
    engine.load_checkpoint(ckpt, tag="t")
    after = gathered(engine.module)
    res["changed_by_load"] = sorted(n for n in before if not torch.equal(before[n], after[n]))
    res["swapped_frozen"] = sorted(n for n, p in engine.module.named_parameters()
                                   if not p.requires_grad and p.nvme_swapper is not None
                                   and p.nvme_swapper.swappable_tensor(numel=p.ds_tensor.ds_numel))
    continued, res["losses"] = res["losses"][-2:], res["losses"][:-2]
    steps(1)
    # The first update after the load, in fp32 (the bf16 loss after it amplifies its last-bit differences).
    resumed_masters = [safe_get_full_fp32_param(p) for p in engine.module.parameters() if p.requires_grad]
    res["master_rel_err"] = max(((a - b).norm() / b.norm()).item()
                                for a, b in zip(resumed_masters, continued_masters) if b.norm() > 0)
    steps(1)
    res["continued"], res["resumed"] = continued, res["losses"][-2:]
    res["losses"] = res["losses"][:-2]
    if mode == "nvme":  # the same checkpoint as DeepSpeed's universal one (what a resume on other ranks loads)
        tag = make_universal(Path(ckpt), "t")
        engine.destroy()
        engine, _ = build(mode, os.path.join(swap_dir, "universal"), load_universal=True)
        engine.load_checkpoint(ckpt, tag=tag)
        res["universal_restores_optimizer"] = optimizer_digests(engine.module) == saved
    engine.destroy()
    return res


def optimizer_digests(module) -> list[str]:
    """Per trainable parameter: digests of its fp32 master and its two moments, gathered whole."""
    return [digest([safe_get_full_fp32_param(p), safe_get_full_optimizer_state(p, "exp_avg"),
                    safe_get_full_optimizer_state(p, "exp_avg_sq")]) for p in module.parameters() if p.requires_grad]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    init_distributed()
    rank = dist.get_rank()
    out = {mode: run(mode, os.path.join(args.out, f"swap_{mode}"), rank)
           for mode in ("cpu", "nvme", "params")}
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(out, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    run_and_exit(main)  # no interpreter teardown: there gloo's threads can abort a finished rank (-6)
