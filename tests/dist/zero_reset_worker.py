"""2-rank worker for tests/test_zero_reset.py: prune and merge under ZeRO-1/2/3 in fp32 and bf16.

Run by the deepspeed launcher; every check's outcome goes to a JSON file per rank for pytest to assert.
The oracle for pruning is a sort-based mask on the gathered pre-reset moments (one process's view).
A case is "STAGE[VARIANT]:DTYPE": VARIANT "off" offloads the optimizer to the CPU (ZeRO-3: the parameters
too, every one split across the ranks); "t0" (ZeRO-3) sets
stage3_param_persistence_threshold 0, so that every parameter is really split across the ranks (the default
threshold, 1e5, is above every tensor of this model, which then stays whole on each rank); "rnd" (ZeRO-1/2)
puts the LoRA tensors in the second param group and first prunes them `random`ly without any relink by the
test (see random_prune_without_relink), then runs the same checks as every case; "ld" (ZeRO-1/2) saves a
checkpoint after the steps and continues on a fresh engine that loaded it, pruning first with nothing
stepped or relinked since the load (see prune_right_after_load).
"""
import argparse
import hashlib
import json
import os

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

import relora_ds
from relora_ds import LlamaConfig, LlamaForCausalLM
from relora_ds.distributed import init_distributed, run_and_exit
from relora_ds.relora import kaiming_uniform_A, reinit_seed
from relora_ds.zero_reset import offloaded, optimizer_state_ready, relink_optimizer_fragments

MOMENTS = ("exp_avg", "exp_avg_sq")
EXPORT_CASES = ("3t0:fp32", "2:bf16")  # export_hf(engine): ZeRO-3 partitions; ZeRO-2 bf16 (masters, not copies)


def sort_mask(t, ratio):
    flat = t.reshape(-1).abs()
    k = int(round(ratio * flat.numel()))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.sort(flat, stable=True).indices[:k]] = True
    return mask.view(t.shape)


def build(stage, bf16, offload=False, persist0=False, lora_second=False):
    torch.manual_seed(0)
    # intermediate 175 and rank 3: gate/up lora_B (175, 3) has an odd numel, not divisible by 2 ranks.
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=175, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64)
    model = relora_ds.wrap(LlamaForCausalLM(cfg), rank=3, seed=11)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    if offload:  # ZeRO-Offload: fp32 masters and moments on the host, DeepSpeedCPUAdam (a compiled op)
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-2}}
        if stage == 3:  # ZeRO-Infinity style: the parameter partitions live on the host too, every one split
            ds["zero_optimization"]["offload_param"] = {"device": "cpu"}
            persist0 = True
    if persist0:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    # LoRA tensors in a group of their own (as the trainer does): its flat partition boundary falls inside
    # one LoRA tensor, which then straddles the two ranks.
    lora = relora_ds.lora_parameters(model)
    others = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    groups = [{"params": lora}, {"params": others}]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups[::-1] if lora_second else groups,
                                      config=ds)
    return engine


def random_prune_without_relink(engine, lora, seed=123, ratio=0.5):
    """`random` pruning of LoRA tensors that sit in the second param group, called with nothing relinked before:
    DeepSpeed 0.19 links optimizer-state fragments once, after the first group's first step, so the second
    group's fragments are empty here and the prune must relink them itself.

    Oracle: the documented per-tensor draw written out by hand: tensor i (in the order given)
    zeroes, in both moments, the first round(ratio * n) entries of torch.randperm(n) from a CPU generator
    seeded seed + 1000003 * i (one mask for both moments); applied to the
    gathered pre-prune moments. Also the single-process path: relora_ds.prune_optimizer_state on a plain torch
    AdamW holding the same moments. The pre-prune moments are read through the test's own relink afterwards,
    by putting back a snapshot of the flat optimizer state (ZeRO-1/2: state of the flat fp32 partitions)."""
    mapped = [p for p in lora if p._hp_mapping is not None]  # the LoRA tensors (partly) on this rank
    res = {"lora_unlinked_before_prune": len(mapped) > 0 and all(
        "exp_avg" not in (p._hp_mapping.optim_fragment or {}) for p in mapped)}
    flat_states = [st for st in engine.optimizer.optimizer.state.values() if "exp_avg" in st]
    snapshot = [{k: st[k].clone() for k in MOMENTS} for st in flat_states]
    try:
        relora_ds.prune_optimizer_state(engine, lora, "random", ratio, seed=seed)
        res["random_prune_error"] = None
    except Exception as e:  # shown in the launcher's output: a rank that fails here may desync the collectives
        res["random_prune_error"] = f"{type(e).__name__}: {e}"
        print(f"rank {dist.get_rank()}: random prune of the second param group failed: {e!r}", flush=True)
    pruned = [{k: st[k].clone() for k in MOMENTS} for st in flat_states]
    relink_optimizer_fragments(engine)
    after = [{k: safe_get_full_optimizer_state(p, k).clone() for k in MOMENTS} for p in lora]
    for st, snap in zip(flat_states, snapshot):
        for k in MOMENTS:
            st[k].copy_(snap[k])
    before = [{k: safe_get_full_optimizer_state(p, k).clone() for k in MOMENTS} for p in lora]
    for st, pr in zip(flat_states, pruned):
        for k in MOMENTS:
            st[k].copy_(pr[k])
    exact = True
    for i, (a, b) in enumerate(zip(after, before)):
        n = b["exp_avg"].numel()
        g = torch.Generator(device="cpu").manual_seed(seed + 1000003 * i)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=g)[:int(round(ratio * n))]] = True
        mask = mask.view(b["exp_avg"].shape)
        exact &= all(torch.equal(a[k].cpu(), b[k].cpu().masked_fill(mask, 0.0)) for k in MOMENTS)
    res["random_prune_exact"] = bool(exact)
    # The single-process path on the same moments (what the trainer does without DeepSpeed).
    params = [torch.nn.Parameter(torch.zeros(b["exp_avg"].shape)) for b in before]
    opt = torch.optim.AdamW(params)
    for q, b in zip(params, before):
        opt.state[q] = {"step": torch.tensor(3.0), **{k: b[k].cpu().clone() for k in MOMENTS}}
    relora_ds.prune_optimizer_state(opt, params, "random", ratio, seed=seed)
    res["random_prune_single_process"] = all(torch.equal(a[k].cpu(), opt.state[q][k])
                                             for a, q in zip(after, params) for k in MOMENTS)
    # Not vacuous: the moments were non-zero where the masks keep them, and about half were zeroed.
    res["random_pruned_fraction"] = sum(int((a["exp_avg_sq"] == 0).sum()) for a in after) / \
        sum(a["exp_avg_sq"].numel() for a in after)
    res["random_kept_nonzero"] = sum(int((b["exp_avg_sq"] != 0).sum()) for b in before) / \
        sum(b["exp_avg_sq"].numel() for b in before)
    return res


def prune_right_after_load(engine, stage, bf16, ckpt_dir, ratio=0.9):
    """Save the stepped engine, load the checkpoint into a fresh one and prune there before anything steps
    or relinks it (a reset right after a resume: DeepSpeed loads the moments but links no fragments until the
    next step). Oracle: the sort-based mask on the moments the saved engine held, read before the save.
    Returns the loaded engine, stepped once more so that the case's usual checks find live moments."""
    lora = relora_ds.lora_parameters(engine.module)
    relink_optimizer_fragments(engine)
    saved = [{k: safe_get_full_optimizer_state(p, k).clone() for k in MOMENTS} for p in lora]
    engine.save_checkpoint(ckpt_dir, tag="t")
    engine.destroy()
    engine = build(stage, bf16)
    engine.load_checkpoint(ckpt_dir, tag="t")
    lora = relora_ds.lora_parameters(engine.module)
    res = {"ready_after_load": optimizer_state_ready(engine)}
    try:
        stats = relora_ds.prune_optimizer_state(engine, lora, "magnitude", ratio)
        res["loaded_prune_error"] = None
    except Exception as e:  # both ranks raise before any collective: the run goes on to report it
        res["loaded_prune_error"] = f"{type(e).__name__}: {e}"
        return engine, res
    masks = [{"exp_avg_sq": sort_mask(b["exp_avg_sq"], ratio)} for b in saved]
    for m, b in zip(masks, saved):
        m["exp_avg"] = sort_mask(b["exp_avg"], ratio) | m["exp_avg_sq"]
    res["loaded_prune_exact"] = all(
        torch.equal(safe_get_full_optimizer_state(p, k), b[k].masked_fill(m[k], 0.0))
        for p, b, m in zip(lora, saved, masks) for k in MOMENTS)
    res["loaded_prune_stats_exact"] = all(
        abs(stats[k] - sum(int(m[k].sum()) for m in masks) / sum(b[k].numel() for b in saved)) < 1e-12
        for k in MOMENTS)
    res["saved_moments_live"] = sum(int((b["exp_avg_sq"] != 0).sum()) for b in saved) / \
        sum(b["exp_avg_sq"].numel() for b in saved)
    return engine, res


def non_adam_refusal():
    """ZeRO-2 with an SGD client optimizer (momentum, no exp_avg/exp_avg_sq): the prune must refuse on every
    rank before its first collective; a moment found missing inside the gather raised only on the ranks holding
    a piece of the tensor while the others waited in the all-reduce (a review found it)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=175, num_hidden_layers=1,
                      num_attention_heads=4, max_position_embeddings=64)
    model = relora_ds.wrap(LlamaForCausalLM(cfg), rank=3, seed=11)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2, momentum=0.9)
    engine, *_ = deepspeed.initialize(model=model, optimizer=sgd, config={
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True})
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(5))
    engine.backward(engine(x, labels=x).loss)
    engine.step()
    try:
        relora_ds.prune_optimizer_state(engine, relora_ds.lora_parameters(engine.module), "magnitude", 0.9)
        error = None
    except ValueError as e:
        error = str(e)
    engine.destroy()
    return {"non_adam_error": error}


def check_export(engine, export_dir):
    """export_hf(engine) on every rank (rank 0 writes) against the weights DeepSpeed itself reports: each ReLoRA
    layer's base (gathered) + scale * B_master @ A_master, the other parameters' fp32 masters. The module alone
    (ZeRO-3: empty placeholders; a bf16 engine: bf16 copies, not the masters) is refused under ZeRO-3. The
    export's merge record (launch/update_rank.py) names the engine's base dtype, not the fp32 copy's."""
    from safetensors.torch import load_file

    model = engine.module
    res = {}
    try:
        relora_ds.export_hf(model, export_dir + "_module")
        # not ZeRO-3 (no partitioned parameter): the module holds whole weights and is written, not refused
        res["module_export_refused"] = not any(hasattr(p, "ds_id") for p in model.parameters())
    except ValueError as e:
        res["module_export_refused"] = "pass the engine itself" in str(e)
    relora_ds.export_hf(engine, export_dir, token_ids={"bos_token_id": 1, "eos_token_id": 2}, progress={"step": 3})
    with open(os.path.join(export_dir, "relora_ds_progress.json")) as f:  # rank 0's file, read by every rank
        record = json.load(f)["relora"]
    res["export_record"] = {k: record[k] for k in ("base_dtype", "merges", "rank")}
    want = {}
    for name, layer in relora_ds.relora_layers(model):
        with deepspeed.zero.GatheredParameters([layer.weight], enabled=hasattr(layer.weight, "ds_id")):
            base = layer.weight.detach().float().cpu().clone()
        A, B = (safe_get_full_fp32_param(t).float().cpu() for t in (layer.lora_A, layer.lora_B))
        want[f"{name}.weight"] = base + (B @ A) * layer.scale
    lora_names = {f"{n}.weight" for n, _ in relora_ds.relora_layers(model)}
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" not in name:
            want[name] = safe_get_full_fp32_param(p).float().cpu()
    got = load_file(os.path.join(export_dir, "model.safetensors"))
    res["export_exact"] = set(want) <= set(got) and all(torch.equal(got[k], v) for k, v in want.items())
    res["export_delta_nonzero"] = all(bool((got[k] != 0).any()) for k in lora_names)
    return res


def run_case(stage, bf16, rank, offload=False, persist0=False, random_lora_second=False, export_dir=None,
             reload_dir=None):
    engine = build(stage, bf16, offload, persist0, lora_second=random_lora_second)
    res = {"offloaded": offloaded(engine)}
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randint(0, 256, (2, 17), generator=g).to(engine.device)
    try:
        relora_ds.prune_optimizer_state(engine, relora_ds.lora_parameters(engine.module), "magnitude", 0.9)
        res["refuses_before_first_step"] = False
    except ValueError as e:
        res["refuses_before_first_step"] = "first optimizer step" in str(e)
    for _ in range(3):
        loss = engine(x, labels=x).loss
        engine.backward(loss)
        engine.step()
    if reload_dir is not None:
        engine, loaded = prune_right_after_load(engine, stage, bf16, reload_dir)
        res.update(loaded)
        engine.backward(engine(x, labels=x).loss)
        engine.step()
    model = engine.module
    lora = relora_ds.lora_parameters(model)
    others = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    # A tensor that straddles the partition boundary (ZeRO-1/2): this rank holds part, not all, of it.
    res["straddles"] = sum(1 for p in lora if getattr(p, "_hp_mapping", None) is not None
                           and 0 < p._hp_mapping.lp_fragment_address.numel < p.numel())
    # ZeRO-3: parameters not kept whole on every rank (ds_persist False): only these are really partitioned.
    res["split_params"] = sum(1 for p in model.parameters() if hasattr(p, "ds_id") and not p.ds_persist)
    res["odd_numel"] = sum(1 for p in lora if (p.ds_numel if hasattr(p, "ds_id") else p.numel()) % 2)
    if random_lora_second:  # before anything here relinks the fragments
        res.update(random_prune_without_relink(engine, lora))
    relink_optimizer_fragments(engine)  # lets the test read the second group's state (DeepSpeed linking bug)
    before = [{k: safe_get_full_optimizer_state(p, k).clone() for k in ("exp_avg", "exp_avg_sq")} for p in lora]
    others_before = [safe_get_full_optimizer_state(p, "exp_avg").clone() for p in others]
    stats = relora_ds.prune_optimizer_state(engine, lora, "magnitude", 0.9)
    # Independent pruning (the default): exp_avg_sq by its own mask (the paper), exp_avg by its own mask
    # united with exp_avg_sq's (no entry keeps momentum without its second moment).
    masks = [{"exp_avg_sq": sort_mask(b["exp_avg_sq"], 0.9)} for b in before]
    for m, b in zip(masks, before):
        m["exp_avg"] = sort_mask(b["exp_avg"], 0.9) | m["exp_avg_sq"]
    after = [{k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")} for p in lora]
    res["momentum_without_second_moment"] = sum(int(((a["exp_avg"] != 0) & (a["exp_avg_sq"] == 0)).sum())
                                                for a in after)
    res["prune_exact"] = all(torch.equal(a[k], b[k].masked_fill(m[k], 0.0))
                             for a, b, m in zip(after, before, masks) for k in b)
    numel = sum(b["exp_avg"].numel() for b in before)
    res["expected_stats"] = {k: sum(int(m[k].sum()) for m in masks) / numel for k in ("exp_avg", "exp_avg_sq")}
    for k in ("exp_avg", "exp_avg_sq"):  # the share of each moment's L1 mass the masks zero
        res["expected_stats"][f"{k}_mass"] = sum(float((b[k].abs() * m[k]).sum(dtype=torch.float64))
                                                 for b, m in zip(before, masks)) / \
            sum(float(b[k].abs().sum(dtype=torch.float64)) for b in before)
    res["others_untouched"] = all(torch.equal(safe_get_full_optimizer_state(p, "exp_avg"), o)
                                  for p, o in zip(others, others_before))
    res["stats"] = {k: v for k, v in stats.items() if k.startswith("exp")}
    res["prune_comm_bytes"] = stats["prune_comm_bytes"]
    # What the prune's gathers move: both fp32 moments of every LoRA tensor, whole (this model's sizes).
    res["expected_prune_comm_bytes"] = 2 * 4 * sum(b["exp_avg"].numel() for b in before)
    # joint=True: one mask from |exp_avg| (the sort oracle's) zeroes both moments.
    before = [{k: safe_get_full_optimizer_state(p, k).clone() for k in ("exp_avg", "exp_avg_sq")} for p in lora]
    relora_ds.prune_optimizer_state(engine, lora, "magnitude", 0.95, joint=True)
    masks = [sort_mask(b["exp_avg"], 0.95) for b in before]
    res["joint_prune_exact"] = all(torch.equal(safe_get_full_optimizer_state(p, k), b[k].masked_fill(m, 0.0))
                                   for p, b, m in zip(lora, before, masks) for k in b)

    if export_dir is not None:
        res.update(check_export(engine, export_dir))

    engine.eval()
    with torch.no_grad():
        logits_before = engine(x).logits.float()
    old_A = [safe_get_full_fp32_param(l.lora_A).clone() for _, l in relora_ds.relora_layers(model)]
    # The merge's oracle: W0 + scale * B_master @ A_master in fp32, rounded once to W's dtype (the bf16 module
    # copies of A and B would give another W, and outputs closer to the pre-merge bf16 forward).
    want_W, deltas, rel = [], [], []
    # The merge's gathers: the fp32 masters of A and B (ZeRO-1/2/3), and under ZeRO-3 each base too (its dtype).
    res["expected_merge_comm_bytes"] = 0
    for _, l in relora_ds.relora_layers(model):
        with deepspeed.zero.GatheredParameters([l.weight], enabled=hasattr(l.weight, "ds_id")):
            W0 = l.weight.detach().cpu().clone()
        A_m, B_m = (safe_get_full_fp32_param(t).float().cpu() for t in (l.lora_A, l.lora_B))
        want_W.append((W0.float() + (B_m @ A_m) * l.scale).to(W0.dtype))
        res["expected_merge_comm_bytes"] += 4 * (A_m.numel() + B_m.numel()) + (
            W0.numel() * W0.element_size() if hasattr(l.weight, "ds_id") else 0)
        deltas.append(float(((B_m.double() @ A_m.double()) * l.scale).norm()))  # ‖s·B·A‖_F, as a product
        rel.append(deltas[-1] / float(W0.double().norm()))
    merge_stats = relora_ds.merge_and_reinit(engine)
    res["merge_comm_bytes"] = merge_stats["merge_comm_bytes"]
    # The merge's record: update norms of every layer, on the ranks that merged every layer (ZeRO-3: rank 0)
    res["merge_update_stats"] = {k: merge_stats[k] for k in ("update_norm_mean", "update_rel_mean", "update_rel_max")
                                 if k in merge_stats}
    res["expected_update_stats"] = {"update_norm_mean": sum(deltas) / len(deltas),
                                    "update_rel_mean": sum(rel) / len(rel), "update_rel_max": max(rel)}
    merged_ok = True
    for (_, l), want in zip(relora_ds.relora_layers(model), want_W):
        with deepspeed.zero.GatheredParameters([l.weight], enabled=hasattr(l.weight, "ds_id")):
            merged_ok &= torch.equal(l.weight.detach().cpu(), want)
    res["merge_exact"] = bool(merged_ok)
    with torch.no_grad():
        logits_after = engine(x).logits.float()
    res["merge_max_logit_diff"] = (logits_after - logits_before).abs().max().item()
    layers = list(relora_ds.relora_layers(model))
    expected_A = [kaiming_uniform_A(tuple(l.lora_A.ds_shape if hasattr(l.lora_A, "ds_id") else l.lora_A.shape),
                                    reinit_seed(11, n, 1)) for n, l in layers]
    res["masters_A_new_init"] = all(torch.equal(safe_get_full_fp32_param(l.lora_A).cpu(), a)
                                    for (_, l), a in zip(layers, expected_A))
    res["masters_B_zero"] = all(int(torch.count_nonzero(safe_get_full_fp32_param(l.lora_B))) == 0 for _, l in layers)
    # The model's own copies, which the next forward and backward use, right after the merge (before any step
    # copies the masters over them: a merge writing the masters alone would train a step with the old A)
    lp_ok = True
    for (_, l), a in zip(layers, expected_A):
        with deepspeed.zero.GatheredParameters([l.lora_A, l.lora_B], enabled=hasattr(l.lora_A, "ds_id")):
            lp_ok &= torch.equal(l.lora_A.detach().cpu(), a.to(l.lora_A.dtype))
            lp_ok &= int(torch.count_nonzero(l.lora_B)) == 0
    res["module_copies_new_init"] = bool(lp_ok)
    h = hashlib.sha256()
    for _, l in layers:
        with deepspeed.zero.GatheredParameters([l.weight], enabled=hasattr(l.weight, "ds_id")):
            h.update(l.weight.detach().float().cpu().numpy().tobytes())
    res["base_hash"] = h.hexdigest()
    # DeepSpeed #2424: an edit of param.data alone is undone by the next step(), which copies the fp32
    # master back into the model. Step with lr 0 (Adam then changes nothing) and check that the model's
    # copy of A is still the new init, i.e. the master was written too.
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    engine.train()
    loss = engine(x, labels=x).loss
    engine.backward(loss)
    engine.step()
    ok = True
    for (_, l), a, o in zip(layers, expected_A, old_A):
        with deepspeed.zero.GatheredParameters([l.lora_A, l.lora_B], enabled=hasattr(l.lora_A, "ds_id")):
            lp_A, lp_B = l.lora_A.detach().cpu().clone(), l.lora_B.detach().cpu().clone()
        ok &= torch.equal(lp_A, a.to(lp_A.dtype)) and int(torch.count_nonzero(lp_B)) == 0
        ok &= torch.equal(safe_get_full_fp32_param(l.lora_A).cpu(), a)
    res["no_resurrection"] = bool(ok)
    engine.destroy()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--cases", required=True)
    args = ap.parse_args()
    init_distributed()
    rank = dist.get_rank()
    out = {}
    for case in args.cases.split(","):
        stage, dtype = case.split(":")
        assert stage[1:] in ("", "off", "t0", "rnd", "ld"), case
        out[case] = run_case(int(stage[0]), dtype == "bf16", rank, offload=stage.endswith("off"),
                             persist0=stage.endswith("t0"), random_lora_second=stage.endswith("rnd"),
                             export_dir=os.path.join(args.out, f"export_{stage}_{dtype}")
                             if case in EXPORT_CASES else None,
                             reload_dir=os.path.join(args.out, f"ckpt_{stage}_{dtype}") if stage.endswith("ld") else None)
    out["non_adam"] = non_adam_refusal()
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(out, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    run_and_exit(main)  # no interpreter teardown: there gloo's threads can abort a finished rank (-6)
