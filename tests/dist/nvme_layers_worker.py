"""One rank, ZeRO-3 with the parameters on NVMe, a ReLoRA model as wide as 130m (hidden 768, MLP 2048: each of
a layer's 7 projection weights is >= 1 MiB on one rank in bf16, so DeepSpeed swaps all 7; a vocabulary of
1024, so the embedding and the head swap too) with 2 layers, 3 steps. The DeepSpeed config is ds_configs/zero3_nvme.json completed by the trainer's complete_ds_config; each
mode (tests/test_nvme_offload.py::test_nvme_swap_buffers_last_a_relora_step) prints one line, ``swap ok`` with
the losses, or ``swap failed`` with DeepSpeed's assertion:

- ``eager``: as the trainer runs it (stage3_max_reuse_distance 0, set by complete_ds_config);
- ``eager_retain``: DeepSpeed's default reuse distance (1e9) put back;
- ``compiled BUFFERS``: --compile's leaf layers (relora_ds.engines.compile_for_engine) with buffer_count BUFFERS,
  bypassing relora_ds.ds_machine.check_nvme_swap_buffers, which the line also reports;
- ``compiled_checkpointed BUFFERS``: the same with full activation checkpointing (the recompute gathers each
  layer again in backward);
- ``persistent``: eager with stage3_param_persistence_threshold 1e6, which makes weights that swap persistent
  too (relora_ds.ds_machine.check_nvme_swap_buffers refuses it).
The swap files go under SWAP_DIR.
"""
import argparse
import copy
import json
import os

import deepspeed
import torch

import relora_ds
from relora_ds.distributed import init_distributed, run_and_exit
from relora_ds.ds_config import complete_ds_config
from relora_ds.ds_patches import patch_deepspeed_nvme
from relora_ds.engines import compile_for_engine, optimizer_groups
from relora_ds.ds_machine import check_nvme_swap_buffers
from relora_ds.train_config import TrainConfig
from relora_ds.zero_init import building

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("swap_dir")
    ap.add_argument("mode", choices=("eager", "eager_retain", "compiled", "compiled_checkpointed",
                                         "persistent"))
    ap.add_argument("buffers", type=int, nargs="?", default=5)
    args = ap.parse_args()
    compiled = args.mode.startswith("compiled")
    with open(os.path.join(ROOT, "ds_configs", "zero3_nvme.json")) as f:
        shipped = json.load(f)
    shipped["zero_optimization"]["offload_param"].update(nvme_path=args.swap_dir, buffer_count=args.buffers)
    shipped["zero_optimization"]["offload_optimizer"]["pin_memory"] = False
    cfg = TrainConfig(model="130m", rank=8, cycle_length=100, restart_warmup_steps=2, micro_batch_size=2,
                      global_batch_size=2, seq_len=32, total_steps=10, compile=compiled)
    ds = complete_ds_config(copy.deepcopy(shipped), cfg, world_size=1)
    if args.mode == "persistent":
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 10**6
    if args.mode == "eager_retain":
        ds["zero_optimization"]["stage3_max_reuse_distance"] = 10**9  # DeepSpeed's default
    model_config = relora_ds.LlamaConfig.preset("130m", vocab_size=1024, num_hidden_layers=2,
                                                max_position_embeddings=64)
    refused = None
    try:
        check_nvme_swap_buffers(cfg, ds, model_config, 1)
    except ValueError as e:
        refused = str(e)
    init_distributed(dist_backend="gloo")
    patch_deepspeed_nvme()
    torch.manual_seed(0)
    with building(ds):
        model = relora_ds.LlamaForCausalLM(model_config)
    relora_ds.wrap(model, rank=8)
    if args.mode == "compiled_checkpointed":
        model.gradient_checkpointing_enable()
    if compiled:  # AOTAutograd's graphs without inductor's code: the gathers are the hooks' either way
        compile_for_engine(model, ds, backend="aot_eager")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=optimizer_groups(model, cfg), config=ds)
    batch = torch.randint(0, 1024, (2, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    try:
        for _ in range(3):
            loss = engine(batch, labels=batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(round(loss.item(), 4))
    except AssertionError as e:
        print(f"swap failed: {e} | refused: {refused}", flush=True)
        return 0
    print(f"swap ok {losses} | refused: {refused}", flush=True)
    return 0


if __name__ == "__main__":
    run_and_exit(main)
