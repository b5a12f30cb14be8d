"""Per-rank device bytes of the frozen ReLoRA base under ZeRO-3: bf16 base vs int8 base.

    deepspeed --num_gpus 2 launch/bench_frozen_zero3.py --presets tiny 60m 130m      # CPU: DS_ACCELERATOR=cpu

Builds each preset (bf16, vocab 32000), wraps it (--rank; default 128, 32 for tiny and debug), starts a
ZeRO-3 engine from ds_configs/zero3.json and sums what each rank holds of the frozen projection weights: its
shard of every base weight (bf16 ``weight`` or int8 ``weight_q``), plus the int8 scales (buffers, on every
rank).
"""
import argparse
import json

import deepspeed
import torch
import torch.distributed as dist

import relora_ds
from relora_ds.distributed import init_distributed, run_and_exit
from relora_ds.ds_config import complete_ds_config, load_ds_config
from relora_ds.train_config import TrainConfig
from bench_memory_ds import check_preset_rank  # launch/, the script's directory
from cli_types import DefaultsHelpFormatter, positive_int


def frozen_bytes(engine, quantize) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the whole frozen base)."""
    held = full = 0
    for _, layer in relora_ds.relora_layers(engine.module):
        base = layer.weight_q if quantize else layer.weight
        shard = base.ds_tensor if hasattr(base, "ds_tensor") else base
        held += shard.numel() * shard.element_size()
        full += getattr(base, "ds_numel", base.numel()) * base.element_size()
        if quantize:
            scale = layer.weight_scale.numel() * layer.weight_scale.element_size()
            held, full = held + scale, full + scale
    return held, full


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "60m"])
    ap.add_argument("--deepspeed", default="ds_configs/zero3.json")
    ap.add_argument("--rank", type=positive_int, default=None, help="LoRA rank (default 128; 32 for tiny and debug)")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    ranks = {p: args.rank or (32 if p in ("tiny", "debug") else 128) for p in args.presets}
    for preset, rank in ranks.items():  # wrap's own error, before any rank starts DeepSpeed
        try:
            check_preset_rank(preset, rank)
        except ValueError as exc:
            ap.error(str(exc))
    init_distributed()
    rows = []
    for preset in args.presets:
        for quantize in (None, "int8"):
            torch.manual_seed(0)
            model = relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset(preset, vocab_size=32000))
            relora_ds.wrap(model.to(torch.bfloat16), rank=ranks[preset], quantize=quantize)
            cfg = TrainConfig(cycle_length=10, restart_warmup_steps=2, total_steps=10, micro_batch_size=1,
                              global_batch_size=dist.get_world_size())  # batch arithmetic only: no schedule runs
            ds = complete_ds_config(load_ds_config(args.deepspeed), cfg, dist.get_world_size())
            engine, *_ = deepspeed.initialize(model=model, config=ds,
                                              model_parameters=[p for p in model.parameters() if p.requires_grad])
            held, full = frozen_bytes(engine, quantize)
            rows.append({"preset": preset, "base": quantize or "bf16", "ranks": dist.get_world_size(),
                         "rank": ranks[preset], "per_rank_mib": round(held / 2**20, 3),
                         "whole_mib": round(full / 2**20, 3)})
            engine.destroy()
    if dist.get_rank() == 0:
        print(json.dumps(rows, indent=1))
    dist.barrier()


if __name__ == "__main__":
    run_and_exit(main)  # no interpreter teardown: there gloo's threads can abort a finished rank (-6)
