"""2-rank worker for tests/test_int8_zero.py: int8 base weights under ZeRO-2/3 (bf16; ZeRO-3 also with
host offload) through resets.

Per case: train, merge (twice), check the int8 tensors' dtypes and placement (under ZeRO-3 the int8 weight is
partitioned: every parameter, persistence threshold 0), hash them (pytest compares ranks), compare each
merge with the single-process reference on the same inputs, then save a checkpoint, load it into a fresh
engine and compare every int8 tensor (residuals included) bit for bit. Under ZeRO-3 the partitioned weights
are read inside GatheredParameters.
"""
import argparse
import hashlib
import json
import os

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param

import relora_ds
import relora_kernels as rk
from relora_ds import LlamaConfig, LlamaForCausalLM
from relora_ds.distributed import init_distributed, run_and_exit
from relora_ds.zero_reset import offloaded

BUFFERS = ("weight_q", "weight_scale", "weight_residual")


def build(stage):
    """``stage`` 2, 3 or "3off" (ZeRO-3 with the optimizer and the parameters offloaded to the host)."""
    stage, offload = int(str(stage)[0]), str(stage).endswith("off")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=175, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64)
    model = relora_ds.wrap(LlamaForCausalLM(cfg), rank=3, seed=11, quantize="int8")
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_optimization": zero, "bf16": {"enabled": True},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    if offload:  # DeepSpeedCPUAdam (a compiled op) steps the host masters
        zero.update(offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-2}}
    lora = relora_ds.lora_parameters(model)
    others = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[{"params": lora}, {"params": others}],
                                      config=ds)
    return engine


def buffers(engine):
    return [(n, b) for n, l in relora_ds.relora_layers(engine.module) for b in (getattr(l, k) for k in BUFFERS)]


def gathered(engine):
    """The full int8 weights inside this context (ZeRO-3 partitions them; a no-op otherwise)."""
    qs = [l.weight_q for _, l in relora_ds.relora_layers(engine.module)]
    return deepspeed.zero.GatheredParameters(qs, enabled=hasattr(qs[0], "ds_id"))


def digest(engine):
    h = hashlib.sha256()
    with gathered(engine):
        for _, b in buffers(engine):
            h.update(b.detach().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train(engine, x, steps):
    for _ in range(steps):
        loss = engine(x, labels=x).loss
        engine.backward(loss)
        engine.step()


def run_case(stage, rank, ckpt_dir):
    engine = build(stage)
    model = engine.module
    layers = list(relora_ds.relora_layers(model))
    res = {"offloaded": offloaded(engine),
           "dtypes": sorted({str(getattr(l, k).dtype) for _, l in layers for k in BUFFERS}),
           "residual_on_host": all(l.weight_residual.device.type == "cpu" for _, l in layers),
           "no_weight_param": all(l.weight is None for _, l in layers),
           "int8_in_optimizer": any(p.dtype == torch.int8 for g in engine.optimizer.param_groups for p in g["params"]),
           "lora_dtype": str(layers[0][1].lora_A.dtype),
           "partitioned": [q.ds_tensor.numel() for q in (l.weight_q for _, l in layers) if hasattr(q, "ds_id")],
           "q_numel": [l.weight_q.ds_numel if hasattr(l.weight_q, "ds_id") else l.weight_q.numel() for _, l in layers]}
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randint(0, 256, (2, 17), generator=g).to(engine.device)
    merges_match = True
    for cycle in range(2):
        train(engine, x, 3)
        # Single-process oracle: the reference merge on clones, from the same gathered fp32 masters.
        expected = []
        for _, l in layers:
            A, B = safe_get_full_fp32_param(l.lora_A), safe_get_full_fp32_param(l.lora_B)
            with gathered(engine):
                q, s, r = (getattr(l, k).clone() for k in BUFFERS)
            rk.int8_merge_reference_(q, s, r, A.cpu(), B.cpu(), l.scale)
            expected.append((q, s, r))
        relora_ds.merge_and_reinit(engine)
        with gathered(engine):
            for (_, l), e in zip(layers, expected):
                merges_match &= all(torch.equal(getattr(l, k).cpu(), t.cpu()) for k, t in zip(BUFFERS, e))
        res[f"hash_after_merge_{cycle + 1}"] = digest(engine)
    res["merges_match_reference"] = bool(merges_match)
    res["merge_count"] = int(layers[0][1].merge_count)
    train(engine, x, 1)
    engine.save_checkpoint(ckpt_dir, tag="t")
    with gathered(engine):
        saved = [b.detach().cpu().clone() for _, b in buffers(engine)]
    saved_counts = [int(l.merge_count) for _, l in layers]
    engine.destroy()

    fresh = build(stage)
    with gathered(fresh):
        res["fresh_differs"] = any(not torch.equal(a, b.cpu()) for a, (_, b) in zip(saved, buffers(fresh)))
    fresh.load_checkpoint(ckpt_dir, tag="t")
    with gathered(fresh):
        res["resume_exact"] = all(torch.equal(a, b.cpu()) and a.dtype == b.dtype
                                  for a, (_, b) in zip(saved, buffers(fresh)))
    res["resume_counts"] = [int(l.merge_count) for _, l in relora_ds.relora_layers(fresh.module)] == saved_counts
    res["resume_residual_on_host"] = all(l.weight_residual.device.type == "cpu"
                                         for _, l in relora_ds.relora_layers(fresh.module))
    relora_ds.merge_and_reinit(fresh)  # merges after a resume stay identical across ranks
    res["hash_after_resume_merge"] = digest(fresh)
    fresh.destroy()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", default="2")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    init_distributed()
    rank = int(os.environ.get("RANK", 0))
    results = {}
    for stage in args.stages.split(","):
        results[f"zero{stage}"] = run_case(stage, rank, os.path.join(args.out, f"ckpt_zero{stage}"))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    torch.distributed.barrier()


if __name__ == "__main__":
    run_and_exit(main)  # no interpreter teardown: there gloo's threads can abort a finished rank (-6)
