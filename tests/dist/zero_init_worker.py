"""2-rank worker for tests/test_zero_init.py: models built partitioned under ZeRO-3 (relora_ds/zero_init.py).

Oracle: the same model built whole in one process from the same seed (wrapped in fp32), cast to bf16 as
DeepSpeed's engine casts it. Checked for a fresh tied model built under zero.Init, then wrapped (bf16 and int8 base), for
a whole wrapped model partitioned by ``partition_``, and (against its own weights before the wrap) for
transformers' LLaMA and GPT-2 (Conv1D layers) built under zero.Init: every parameter is partitioned (no rank keeps the whole
tensor: its local data is empty and its partition 1/world of it), and the gathered values, int8 storage and
buffers are bit for bit the oracle's.
"""
import math

import deepspeed
import torch

import relora_ds
from relora_ds import LlamaConfig, LlamaForCausalLM, zero_init
from relora_ds.distributed import init_distributed, run_and_exit
from relora_ds.engines import param_groups

DS = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
CFG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=175, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, tie_word_embeddings=True)


def whole(seed: int, quantize=None, wrapped=True) -> torch.nn.Module:
    """The oracle, in the trainer's order without ZeRO-3: built whole in fp32, wrapped (an int8 base
    quantized from fp32), then its parameters cast to bf16 as DeepSpeed's engine casts them (not buffers)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(CFG)
    if wrapped:
        relora_ds.wrap(model, rank=3, seed=11, quantize=quantize)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16) if p.is_floating_point() else p.data
    return model


def group_names(model) -> list:
    return [(kind, [n for n, _ in group]) for kind, group in param_groups(model)]


def check_partitioned(model, what: str) -> None:
    world = torch.distributed.get_world_size()
    for name, p in model.named_parameters():
        assert hasattr(p, "ds_id"), f"{what}: {name} is not partitioned"
        assert p.numel() == 0, f"{what}: {name} holds {p.numel()} elements outside a gather"
        assert p.ds_tensor.numel() == math.ceil(p.ds_numel / world), f"{what}: {name} partition size"


def check_equal(model, oracle, what: str) -> None:
    names = [n for n, _ in model.named_parameters()]
    assert names == [n for n, _ in oracle.named_parameters()], what
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, ref in oracle.named_parameters():
            p = params[name]
            assert p.dtype == ref.dtype and torch.equal(p, ref), f"{what}: {name} differs from the whole build"
            assert p.requires_grad == ref.requires_grad, f"{what}: {name} requires_grad"
    ref_buffers = dict(oracle.named_buffers())
    for name, b in model.named_buffers():
        assert b.dtype == ref_buffers[name].dtype and torch.equal(b, ref_buffers[name]), f"{what}: buffer {name}"
    assert ref_buffers.keys() == dict(model.named_buffers()).keys(), what


def main():
    init_distributed()
    torch.manual_seed(0)
    with zero_init.building(DS):
        model = LlamaForCausalLM(CFG)
    check_partitioned(model, "zero.Init build")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    check_equal(model, whole(0, wrapped=False), "zero.Init build")
    # As the trainer builds a ReLoRA model at once: a bf16 base built in bf16; an int8 base built in fp32, so
    # that it is quantized from the fp32 init, then cast (built in bf16 it was quantized from bf16-rounded
    # weights: 9% of its int8 values and 30% of its scales differed from the whole build's).
    for quantize in (None, "int8"):
        torch.manual_seed(0)
        with zero_init.building(DS, fp32=quantize is not None):
            model = LlamaForCausalLM(CFG)
        relora_ds.wrap(model, rank=3, seed=11, quantize=quantize)  # swaps partitioned nn.Linear layers
        zero_init.cast_partitions_(model, DS)
        check_partitioned(model, f"wrap quantize={quantize}")
        # The parameters themselves (empty outside a gather) carry the cast dtype too, as the engine's cast
        # leaves them: DeepSpeed reads a parameter's dtype from it, not from its partition.
        for name, q in model.named_parameters():
            assert q.dtype == (torch.int8 if name.endswith("weight_q") else torch.bfloat16), (name, q.dtype)
        oracle = whole(0, quantize)
        check_equal(model, oracle, f"wrap quantize={quantize}")
        # The engine's param groups (weight decay spares the vectors): a partitioned parameter is flat and
        # empty outside a gather, and its ds_shape must sort it as the whole build's shape does.
        assert group_names(model) == group_names(oracle), (group_names(model), group_names(oracle))
        assert [kind for kind, _ in group_names(model)] == ["lora", "matrices", "vectors"]
    torch.manual_seed(1)
    model = relora_ds.wrap(LlamaForCausalLM(CFG), rank=3, seed=11, quantize="int8")  # quantized from fp32
    oracle = relora_ds.wrap(LlamaForCausalLM(CFG), rank=3, seed=11, quantize="int8")
    oracle.load_state_dict(model.state_dict())
    zero_init.partition_(model, DS)
    check_partitioned(model, "partition_")
    check_equal(model, oracle.to(torch.bfloat16), "partition_")
    check_load_refuses(model)
    check_load_int8(model)
    check_transformers_model("llama")
    check_transformers_model("gpt2")
    print(f"rank {torch.distributed.get_rank()}: zero_init checks passed", flush=True)


def check_load_refuses(model) -> None:
    """zero_init.load_: a tensor of another shape, an unknown name and a missing parameter are errors naming
    them (raised before any gather: every rank raises alike)."""
    for tensors, message in (([("model.norm.weight", torch.ones(3))], "model.norm.weight has shape (3,), the "
                              "model's is (64,)"),
                             ([("model.layers.0.self_attn.q_proj.weight", torch.ones(64, 3))], "has shape (64, 3)"),
                             ([("model.extra.weight", torch.ones(3))], "model.extra.weight is not a parameter"),
                             ([], "lacks")):
        try:
            zero_init.load_(model, tensors, "the source")
        except ValueError as e:
            assert str(e).startswith("the source") and message in str(e), e
        else:
            raise AssertionError(f"load_ accepted {tensors}")


def check_load_int8(model) -> None:
    """zero_init.load_ into a partitioned model with an int8 base takes each base by the name of the linear it
    replaced (….weight; its int8 weight_q is no name of the source) and every other parameter by its own."""
    bases = {f"{n}.weight": layer for n, layer in relora_ds.relora_layers(model)}
    assert all(layer.quantize for layer in bases.values())
    params = dict(model.named_parameters())
    others = {n: torch.full(tuple(p.ds_shape), 0.5) for n, p in params.items()
              if not n.endswith(("lora_A", "lora_B", "weight_q")) and n not in bases}
    tensors = {**others, **{n: torch.ones(layer.out_features, layer.in_features) for n, layer in bases.items()}}
    zero_init.load_(model, tensors.items(), "int8 source")  # before, a complete source was refused as lacking
    with deepspeed.zero.GatheredParameters([params[n] for n in others]):
        for n in others:
            assert torch.equal(params[n].float(), others[n]), f"int8 load: {n}"


def check_transformers_model(kind: str) -> None:
    """transformers' LLaMA, or GPT-2 (Conv1D projections, weight (in, out)), built under zero.Init (as its
    from_pretrained does under ZeRO-3), then wrapped: partitioned throughout, each base the layer's own weight
    (a Conv1D's transposed), every other parameter unchanged."""
    import transformers

    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        cls, targets = transformers.GPT2LMHeadModel, "all-linear"
    else:
        config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        cls, targets = transformers.LlamaForCausalLM, None
    # (cls taken outside zero.Init: its patched constructors break the import)
    with zero_init.building(DS):
        model = cls(config)
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        before = {n: p.detach().clone() for n, p in params.items()}
    relora_ds.wrap(model, rank=3, seed=11, target_modules=targets)
    check_partitioned(model, kind)
    layers = [n for n, _ in relora_ds.relora_layers(model)]
    assert len(layers) == 2 * (4 if kind == "gpt2" else 7), layers
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() | {f"{n}.lora_{k}" for n in layers for k in "AB"}
    transposed = {f"{n}.weight" for n in layers} if kind == "gpt2" else set()
    with deepspeed.zero.GatheredParameters(list(after.values())):
        for name, value in before.items():
            want = value.T if name in transposed else value
            assert torch.equal(after[name], want), f"{kind}: {name} changed in wrap"
    # zero_init.load_ (a checkpoint into the partitioned, wrapped model) takes each base as the replaced layer
    # stores it: a Conv1D's (in, out), transposed into the layer.
    checkpoint = {n: v + 1 for n, v in before.items()}
    zero_init.load_(model, checkpoint.items(), kind)
    with deepspeed.zero.GatheredParameters(list(after.values())):
        for name, value in checkpoint.items():
            want = value.T if name in transposed else value
            assert torch.equal(after[name], want), f"{kind}: {name} loaded wrong by zero_init.load_"


if __name__ == "__main__":
    run_and_exit(main)
