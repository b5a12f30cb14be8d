"""2-rank worker for tests/test_precision_review.py: ReLoRA's reset under each precision layout DeepSpeed runs on
CPU, on a step DeepSpeed skipped for an infinite gradient, against single-process oracles.

Each layout trains 3 steps, then step 4 (a reset step: cycle_length 4) gets an inf gradient (the loss stays
finite), which DeepSpeed skips (fp16: dynamic loss scaling; bf16 and fp32: its non-finite norm check), then
reset_hook.after_step resets. Oracles: the merge W0 + s·B·A in float64 from the masters read before the skipped
step, rounded once to W's dtype; the new A the seeded draw rounded to each copy's dtype; the prune the
sort-based mask of the moments read before the skipped step. A checkpoint written after the reset is loaded by
a fresh engine, whose next step must equal the saved engine's own (loss scale, skipped steps, lr included).
fp16 runs with DeepSpeed's CPU fp16 flag forced on (as tests/test_trainer_steps.py does: the CPU accelerator
reports none, and the trainer refuses fp16 there). Also: gradient clipping over the LoRA and full-rank groups
against torch's clip_grad_norm_ on one process (fp32), and whether a checkpoint load keeps the Adam moments of
bf16 master weights (ds_config.py refuses the layout that loses them).
"""
import argparse
import copy
import hashlib
import json
import os
from types import SimpleNamespace

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from torch.optim.lr_scheduler import LambdaLR

import relora_ds
from relora_ds import LlamaConfig, LlamaForCausalLM
from relora_ds.distributed import init_distributed, run_and_exit
from relora_ds.relora import kaiming_uniform_A, reinit_seed
from relora_ds.reset_hook import after_step
from relora_ds.zero_reset import relink_optimizer_fragments

MOMENTS = ("exp_avg", "exp_avg_sq")
BF16 = {"enabled": True}
BF16_MASTERS = {"enabled": True, "bf16_master_weights_and_grads": True}
FP16 = {"enabled": True, "initial_scale_power": 8}
OFFLOAD = {"device": "cpu"}
# name -> the config's precision and ZeRO sections. bf16_z2 accumulates gradients in bf16, bf16acc32_z2 in fp32;
# bf16opt_z1 is DeepSpeed's BF16_Optimizer; bf16mw*: bf16 master weights (and bf16 moments, or an offloaded
# DeepSpeedCPUAdam keeping its moments in bf16 or fp32).
LAYOUTS = {
    "fp32_z2": {"zero_optimization": {"stage": 2}},
    "bf16_z2": {"zero_optimization": {"stage": 2}, "bf16": BF16},
    "bf16acc32_z2": {"zero_optimization": {"stage": 2}, "bf16": BF16, "data_types": {"grad_accum_dtype": "fp32"}},
    "bf16opt_z1": {"zero_optimization": {"stage": 1}, "bf16": BF16, "data_types": {"grad_accum_dtype": "fp32"}},
    "bf16_z3": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "bf16": BF16},
    "bf16mw_z2": {"zero_optimization": {"stage": 2}, "bf16": {**BF16_MASTERS, "bf16_optimizer_states": True}},
    "bf16mwoff_z2": {"zero_optimization": {"stage": 2, "offload_optimizer": OFFLOAD},
                     "bf16": {**BF16_MASTERS, "bf16_optimizer_states": True}},
    "bf16mwoff16_z2": {"zero_optimization": {"stage": 2, "offload_optimizer": OFFLOAD}, "bf16": BF16_MASTERS,
                       "optimizer_params": {"fp32_optimizer_states": False}},
    "bf16mwoff32_z2": {"zero_optimization": {"stage": 2, "offload_optimizer": OFFLOAD}, "bf16": BF16_MASTERS},
    "fp16_z2": {"zero_optimization": {"stage": 2}, "fp16": FP16},
    "fp16_z3": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "fp16": FP16},
}


def lr_lambda(step):
    return 1.0 / (1 + step)


def build(layout, clip=0.0):
    torch.manual_seed(0)
    # intermediate 175, rank 3: LoRA tensors with odd numels, cut across the two ranks' partitions
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=175, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64)
    model = relora_ds.wrap(LlamaForCausalLM(cfg), rank=3, seed=11)
    ds = copy.deepcopy(LAYOUTS[layout])
    offload = "offload_optimizer" in ds["zero_optimization"]
    params = {"lr": 1e-2, **ds.pop("optimizer_params", {}), **({} if offload else {"torch_adam": True})}
    ds.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, steps_per_print=10**9,
              gradient_clipping=clip, optimizer={"type": "AdamW", "params": params})
    lora = relora_ds.lora_parameters(model)
    others = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[{"params": lora}, {"params": others}],
                                      config=ds, lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda))
    return engine


def whole(p):
    with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
        return p.detach().cpu().clone()


def sort_mask(t, ratio):
    flat = t.reshape(-1).abs().float()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.sort(flat, stable=True).indices[:int(round(ratio * flat.numel()))]] = True
    return mask.view(t.shape)


def masters(engine):
    relink_optimizer_fragments(engine)
    return {n: safe_get_full_fp32_param(p).cpu().clone() for n, p in engine.module.named_parameters()
            if p.requires_grad}


def moments(engine):
    relink_optimizer_fragments(engine)
    return {n: {k: safe_get_full_optimizer_state(p, k).cpu().clone() for k in MOMENTS}
            for n, p in engine.module.named_parameters() if p.requires_grad}


def train_step(engine, x, inf_grad=False):
    hook = None
    if inf_grad:  # on the head's output inside the forward (ZeRO-3 hands back another tensor than the loss used)
        hook = engine.module.lm_head.register_forward_hook(
            lambda m, i, out: out.register_hook(lambda g: g * float("inf")) and None)
    loss = engine(x, labels=x).loss
    if hook is not None:
        hook.remove()
    engine.backward(loss)
    engine.step()


def engine_state(engine):
    return {"loss_scale": float(getattr(engine.optimizer, "cur_scale", 1.0)), "skipped_steps": engine.skipped_steps,
            "global_steps": engine.global_steps, "lr": engine.get_lr()[0]}


def reset_on_a_skipped_step(layout, rank, out_dir):
    engine = build(layout)
    model = engine.module
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(100 + rank))
    for _ in range(3):
        train_step(engine, x)
    res = {"optimizer": type(engine.optimizer).__name__}
    layers = list(relora_ds.relora_layers(model))
    lora_names = {n for n, p in model.named_parameters() if "lora_" in n}
    m3, mom3 = masters(engine), moments(engine)
    W0 = [whole(layer.weight) for _, layer in layers]
    lr3 = engine.get_lr()[0]
    train_step(engine, x, inf_grad=True)
    unchanged = all(torch.equal(a, m3[n]) for n, a in masters(engine).items()) and \
        all(torch.equal(a[k], mom3[n][k]) for n, a in moments(engine).items() for k in MOMENTS)
    res.update(skipped=not engine.was_step_applied(), skipped_steps=engine.skipped_steps,
               lr_held=engine.get_lr()[0] == lr3, unchanged_by_skip=unchanged)
    cfg = SimpleNamespace(mode="relora", cycle_length=4, merge_every=None, prune_method="magnitude", prune_ratio=0.9,
                          prune_joint=False, seed=0)
    event = after_step(engine, 4, cfg, 0)
    res["event"] = {k: event.get(k) for k in ("event", "step", "layers", "reset", "prune_skipped")}
    # The merge against float64: its error over eps·(|W0| + s·|B|·|A|) (eps of W's dtype), at most 1/2 for
    # W0 + s·B·A rounded once to a 16-bit W; in fp32 the sum itself rounds at each of its r + 1 terms.
    worst = 0.0
    for (name, layer), w0 in zip(layers, W0):
        A, B = m3[f"{name}.lora_A"].double(), m3[f"{name}.lora_B"].double()
        err = (whole(layer.weight).double() - (w0.double() + (B @ A) * layer.scale)).abs()
        size = w0.double().abs() + (B.abs() @ A.abs()) * abs(layer.scale)
        worst = max(worst, float((err / (torch.finfo(w0.dtype).eps * size)).max()))
    res["merge_rounding"] = worst
    new = {f"{name}.lora_A": kaiming_uniform_A(tuple(m3[f"{name}.lora_A"].shape), reinit_seed(11, name, 1))
           for name, _ in layers}
    after = masters(engine)
    master_dtype = engine.optimizer.single_partition_of_fp32_groups[0].dtype \
        if hasattr(engine.optimizer, "single_partition_of_fp32_groups") else torch.float32
    res["master_dtype"] = str(master_dtype)
    res["masters_reset"] = all(torch.equal(after[n], a.to(master_dtype).float()) for n, a in new.items()) and \
        all(not after[n].any() for n in lora_names if n.endswith("lora_B"))
    copies = {n: whole(p) for n, p in model.named_parameters() if "lora_" in n}
    res["copies_reset"] = all(torch.equal(copies[n], a.to(copies[n].dtype)) for n, a in new.items()) and \
        all(not copies[n].any() for n in lora_names if n.endswith("lora_B"))
    pruned, exact = moments(engine), True
    for n in lora_names:
        sq = sort_mask(mom3[n]["exp_avg_sq"], 0.9)
        exact &= torch.equal(pruned[n]["exp_avg_sq"], mom3[n]["exp_avg_sq"].masked_fill(sq, 0.0))
        avg = sort_mask(mom3[n]["exp_avg"], 0.9) | sq
        exact &= torch.equal(pruned[n]["exp_avg"], mom3[n]["exp_avg"].masked_fill(avg, 0.0))
    res["prune_exact"] = bool(exact)
    digest = hashlib.sha256(b"".join(whole(layer.weight).float().numpy().tobytes() for _, layer in layers)).hexdigest()
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    res["ranks_agree"] = len(set(digests)) == 1
    ckpt = os.path.join(out_dir, f"ckpt_{layout}")
    engine.save_checkpoint(ckpt, tag="reset")
    res["saved_state"] = engine_state(engine)
    train_step(engine, x)
    res["step5_applied"] = engine.was_step_applied()
    m5 = masters(engine)
    res["copies_follow_masters"] = all(torch.equal(whole(p), m5[n].to(p.dtype)) for n, p in model.named_parameters()
                                       if p.requires_grad)
    engine.destroy()
    loaded = build(layout)
    loaded.load_checkpoint(ckpt, tag="reset")
    res["loaded_state"] = engine_state(loaded)
    res["loaded_moments_exact"] = all(torch.equal(a[k], pruned[n][k]) for n, a in moments(loaded).items()
                                      for k in MOMENTS)
    train_step(loaded, x)
    res["resumed_step_exact"] = all(torch.equal(a, m5[n]) for n, a in masters(loaded).items())
    loaded.destroy()
    return res


def clipping_against_torch(clip):
    """fp32 ZeRO-2, each rank its own batch, clipped over both param groups, against one process: the two batches'
    mean loss, torch.nn.utils.clip_grad_norm_ over every trainable parameter, torch's AdamW, the same schedule."""
    xs = [torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(100 + r)) for r in range(2)]
    engine = build("fp32_z2", clip=clip)
    norms = []
    for _ in range(3):
        train_step(engine, xs[dist.get_rank()])
        norms.append(float(engine.get_global_grad_norm()))
    got = masters(engine)
    engine.destroy()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=175, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64)
    model = relora_ds.wrap(LlamaForCausalLM(cfg), rank=3, seed=11)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    schedule = LambdaLR(opt, lr_lambda)
    want_norms = []
    for _ in range(3):
        opt.zero_grad()
        for x in xs:
            (model(x, labels=x).loss / len(xs)).backward()
        want_norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, clip)))
        opt.step()
        schedule.step()
    return {"norms": norms, "want_norms": want_norms,
            "max_diff": max(float((got[n] - p.detach()).abs().max()) for n, p in model.named_parameters()
                            if p.requires_grad)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--layouts", required=True)
    args = ap.parse_args()
    type(get_accelerator()).is_fp16_supported = lambda self: True  # fp16's loss scaling on this CPU
    init_distributed()
    out = {layout: reset_on_a_skipped_step(layout, dist.get_rank(), args.out) for layout in args.layouts.split(",")}
    out["clipping"] = clipping_against_torch(0.05)
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(out, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    run_and_exit(main)
