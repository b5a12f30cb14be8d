"""tests/test_relora_api.py: a model built and wrapped on meta, sharded with FSDP2 (fully_shard: DTensor
parameters), then materialized with to_empty: every rank's LoRA factors are its shard of the fresh wrap's."""
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import relora_ds


def main():
    dist.init_process_group("gloo")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with torch.device("meta"):
        model = relora_ds.wrap(LlamaForCausalLM(cfg), rank=4, seed=3)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    want = dict(relora_ds.relora_layers(relora_ds.wrap(LlamaForCausalLM(cfg), rank=4, seed=3)))
    for name, layer in relora_ds.relora_layers(model):
        assert type(layer.lora_A).__name__ == "DTensor"
        assert torch.equal(layer.lora_A.full_tensor(), want[name].lora_A), name
        assert layer.lora_B.full_tensor().abs().sum() == 0 and int(layer.merge_count) == 0, name
    print(f"rank {dist.get_rank()}: fsdp2 meta ok", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
