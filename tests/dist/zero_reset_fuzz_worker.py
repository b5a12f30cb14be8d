"""Worker for tests/test_zero_reset_fuzz_cases.py: ReLoRA's prune under ZeRO fuzzed on seeded random models.

A case is a seed. It draws a model of linear layers with odd sizes (so ZeRO's flat partitions cut LoRA tensors at
arbitrary offsets, padding the last), LoRA ranks, param groups (weight decay or none, parameters in a random
order) and a DeepSpeed config (ZeRO stage 1/2/3, fp32 or bf16 with its fp32 masters, the BF16 optimizer, CPU
offload, contiguous gradients, small bucket sizes, ZeRO-3 sub-groups and persistence threshold), trains 3 steps,
then prunes several times from the same state (method, ratio 0 / near 1 / 1 / drawn, joint or not, seed; moments
as trained, rounded to powers of two with zeros (ties), or with an inf and a NaN), and ends with a ReLoRA reset
through reset_hook.after_step.

The oracle reads no fragment view: every rank's raw flat buffers (the fp32 master partition and each optimizer
state tensor) are all-gathered and laid out by hand (ZeRO-1/2 and the BF16 optimizer: a group's parameters back
to back in one flat buffer cut into equal partitions, rank after rank; ZeRO-3: each parameter's partition at its
grad_position in its sub-group, rank after rank, the last padded). The whole moments are pruned by
relora_ds.prune_optimizer_state on a plain torch AdamW (one process) and by masks written from the documented
rule (a stable sort of |m|, NaN last; torch.randperm seeded seed + 1000003·i). After the engine's prune each rank's
flat buffers must equal, bit for bit, their snapshot with the LoRA entries replaced by the oracle's: masters,
the other parameters' moments, padding and Adam's step untouched.
"""
import argparse
import json
import math
import os
import random
import warnings
from types import SimpleNamespace

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

import relora_ds
from relora_ds.distributed import init_distributed, run_and_exit
from relora_ds.reset_hook import after_step
from relora_ds.zero_reset import offloaded

MOMENTS = ("exp_avg", "exp_avg_sq")


class Net(torch.nn.Module):
    """Linear layers of the drawn widths, a LayerNorm after the first; loss: the mean square of the output."""

    def __init__(self, widths, biases):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(i, o, bias=b) for i, o, b in zip(widths, widths[1:], biases))
        self.norm = torch.nn.LayerNorm(widths[1])

    def forward(self, x):
        for j, layer in enumerate(self.layers):
            x = torch.tanh(layer(x))
            if j == 0:
                x = self.norm(x)
        return x.float().pow(2).mean()


def draw_case(seed: int) -> dict:
    rng = random.Random(seed)
    n = rng.randint(2, 4)
    widths = [rng.choice([1, 2, 3, 5, 7, 9, 11, 13, 17, 23, 29, 31, 37, 41]) for _ in range(n + 1)]
    wrapped = sorted(rng.sample(range(n), rng.randint(1, n)))
    rank = rng.randint(1, min(min(widths[j], widths[j + 1]) for j in wrapped))
    stage = rng.choice([1, 2, 3])
    bf16 = rng.random() < 0.5
    offload = rng.random() < 0.3
    case = {"seed": seed, "widths": widths, "biases": [rng.random() < 0.5 for _ in range(n)], "wrapped": wrapped,
            "rank": rank, "stage": stage, "bf16": bf16, "offload": offload, "groups": rng.randint(1, 3),
            "bf16_optimizer": stage == 1 and bf16 and not offload and rng.random() < 0.5,
            "contiguous_gradients": rng.random() < 0.5, "overlap_comm": rng.random() < 0.5,
            "reduce_bucket_size": rng.choice([37, 101, 500_000_000]),
            "allgather_bucket_size": rng.choice([30, 500_000_000]),
            "persist0": rng.random() < 0.5, "sub_group_size": rng.choice([53, 1_000_000_000]),
            "reload": rng.random() < 0.25}
    # ZeRO-3's partial optimizer offload: the sub-groups kept on the accelerator step on DeepSpeed's backup AdamW
    case["partial_offload"] = rng.choice([None, 0.0, 0.5]) if stage == 3 and offload else None
    if case["partial_offload"] is not None:  # DeepSpeed's checkpoints leave out the backup optimizer's moments
        case.update(reload=False, sub_group_size=11)  # sub-groups of a few tensors: some on each optimizer
    return case


def build(case):
    torch.manual_seed(case["seed"])
    model = Net(case["widths"], case["biases"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layers left unwrapped are named in a warning
        relora_ds.wrap(model, rank=case["rank"], seed=case["seed"],
                       target_modules=[f"layers.{j}" for j in case["wrapped"]])
    rng = random.Random(case["seed"] + 1)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rng.shuffle(named)
    groups = [{"params": [], "weight_decay": rng.choice([0.0, 0.1])} for _ in range(case["groups"])]
    for j, (_, p) in enumerate(named):  # the first ones fill every group
        groups[j if j < len(groups) else rng.randrange(len(groups))]["params"].append(p)
    zero = {"stage": case["stage"], "contiguous_gradients": case["contiguous_gradients"],
            "overlap_comm": case["overlap_comm"], "reduce_bucket_size": case["reduce_bucket_size"],
            "allgather_bucket_size": case["allgather_bucket_size"]}
    optimizer = {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}
    if case["offload"]:  # DeepSpeedCPUAdam, a compiled op
        zero["offload_optimizer"] = {"device": "cpu"}
        optimizer = {"type": "AdamW", "params": {"lr": 1e-2}}
    if case["stage"] == 3:
        zero["sub_group_size"] = case["sub_group_size"]
        if case["persist0"]:
            zero["stage3_param_persistence_threshold"] = 0
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
          "zero_optimization": zero, "bf16": {"enabled": case["bf16"]}, "optimizer": optimizer}
    if case["bf16_optimizer"]:
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if case["partial_offload"] is not None:
        zero["offload_optimizer"]["ratio"] = case["partial_offload"]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    if case["partial_offload"] is not None:
        # On a GPU the first (1 - ratio) of the sub-groups get the accelerator's name and step on the backup
        # optimizer (any name but "cpu"); on this CPU accelerator the name is "cpu". torch.device("cpu") is not
        # == "cpu": the same branch, on host tensors.
        to_device = engine.optimizer.subgroup_to_device
        for i in range(int((1 - case["partial_offload"]) * len(to_device))):
            to_device[i] = torch.device("cpu")
    return engine


def flat_buffers(engine):
    """This rank's [(fp32 flat partition, its optimizer state, [(name, local start, count, start in the param)])]
    and the padding-free numel of every trainable parameter, laid out from DeepSpeed's own group lists."""
    opt, rank, world = engine.optimizer, dist.get_rank(), dist.get_world_size()
    names = {id(p): n for n, p in engine.module.named_parameters()}
    out, numel = [], {}
    if engine.zero_optimization_stage() == 3:
        for sg, params in enumerate(opt.fp16_groups):
            flat = opt.fp32_partitioned_groups_flat[sg]
            entries = []
            for p in params:
                g, off, count = opt.grad_position[opt.get_param_id(p)]
                assert g == sg
                numel[names[id(p)]] = p.ds_numel
                valid = max(0, min(count, p.ds_numel - rank * count))  # the last partitions are padding
                if valid:
                    entries.append((names[id(p)], off, valid, rank * count))
            backup = getattr(opt, "backup_optimizer", None)  # wherever the sub-group's moments are
            out.append((flat, opt.optimizer.state.get(flat) or backup.state[flat], entries))
        return out, numel
    bf16_opt = type(opt).__name__ == "BF16_Optimizer"
    groups = opt.bf16_groups if bf16_opt else opt.bit16_groups
    partitions = opt.fp32_groups_flat_partition if bf16_opt else opt.single_partition_of_fp32_groups
    for params, flat in zip(groups, partitions):
        start, end, offset, entries = rank * flat.numel(), (rank + 1) * flat.numel(), 0, []
        for p in params:
            numel[names[id(p)]] = p.numel()
            lo, hi = max(offset, start), min(offset + p.numel(), end)
            if lo < hi:
                entries.append((names[id(p)], lo - start, hi - lo, lo - offset))
            offset += p.numel()
        assert offset <= flat.numel() * world
        out.append((flat, opt.optimizer.state[flat], entries))
    return out, numel


def snapshot(buffers):
    return [{"master": flat.detach().clone(), **{k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}}
            for flat, st, _ in buffers]


def restore(buffers, snap):
    for (flat, st, _), s in zip(buffers, snap):
        flat.data.copy_(s["master"])
        for k, v in s.items():
            if k == "master":
                continue
            if torch.is_tensor(v):
                st[k].copy_(v)
            else:
                st[k] = v


def gather_whole(buffers, numel):
    """{name: {key: whole fp32 tensor}} from every rank's raw partitions, whether each element was found exactly
    once, and {name: how many ranks hold a piece}."""
    local = [(s, entries) for s, (_, _, entries) in zip(snapshot(buffers), buffers)]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    whole = {n: {k: torch.zeros(c) for k in ("master", *MOMENTS)} for n, c in numel.items()}
    seen = {n: torch.zeros(c, dtype=torch.int64) for n, c in numel.items()}
    holders = dict.fromkeys(numel, 0)
    for rank_buffers in everyone:
        for name in {e[0] for _, entries in rank_buffers for e in entries}:
            holders[name] += 1
        for s, entries in rank_buffers:
            for name, start, count, at in entries:
                seen[name][at:at + count] += 1
                for k in whole[name]:
                    whole[name][k][at:at + count] = s[k][start:start + count]
    return whole, all(bool((c == 1).all()) for c in seen.values()), holders


def spec_masks(moments, method, ratio, seed, joint):
    """The documented rule, written out: magnitude: the round(ratio·n) smallest |m| by a stable sort (NaN last);
    random: the first round(ratio·n) of torch.randperm(n) from a CPU generator seeded ``seed`` (one mask for both
    moments); joint: exp_avg's mask for both; otherwise exp_avg also zeroed where exp_avg_sq is."""
    n = moments["exp_avg"].numel()
    k = int(round(ratio * n))

    def mask_of(t, s):
        m = torch.zeros(n, dtype=torch.bool)
        if method == "reset":
            m[:] = True
        elif method == "random":
            m[torch.randperm(n, generator=torch.Generator().manual_seed(s))[:k]] = True
        else:
            m[torch.sort(t.reshape(-1).abs(), stable=True).indices[:k]] = True
        return m.view(t.shape)

    avg = mask_of(moments["exp_avg"], seed)
    if joint or method == "random":
        return {"exp_avg": avg, "exp_avg_sq": avg}
    sq = mask_of(moments["exp_avg_sq"], seed + 1)
    return {"exp_avg": avg | sq, "exp_avg_sq": sq}


def single_process_prune(whole, names, method, ratio, seed, joint):
    params = [torch.nn.Parameter(whole[n]["master"].clone()) for n in names]
    opt = torch.optim.AdamW(params)
    for q, n in zip(params, names):
        opt.state[q] = {"step": torch.tensor(3.0), **{k: whole[n][k].clone() for k in MOMENTS}}
    stats = relora_ds.prune_optimizer_state(opt, params, method, ratio, seed, joint)
    return {n: {k: opt.state[q][k] for k in MOMENTS} for q, n in zip(params, names)}, stats


def bits_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a.view(torch.int32) == b.view(torch.int32)).all())


def check_buffers(buffers, before, want, lora_names):
    """Every raw buffer of this rank bit for bit: the snapshot ``before``, with the LoRA parameters' moment
    entries replaced by ``want`` ({name: {key: whole}}; None: nothing replaced). Returns the mismatches."""
    bad = []
    for j, ((flat, st, entries), s) in enumerate(zip(buffers, before)):
        if not bits_equal(flat.detach(), s["master"]):
            bad.append(f"buffer {j}: fp32 master changed")
        for k, v in s.items():
            if k == "master":
                continue
            if not torch.is_tensor(v):
                if st[k] != v:
                    bad.append(f"buffer {j}: {k} {v} -> {st[k]}")
                continue
            expected = v.clone()
            if k in MOMENTS and want is not None:
                for name, start, count, at in entries:
                    if name in lora_names:
                        expected[start:start + count] = want[name][k].reshape(-1)[at:at + count]
            if not bits_equal(st[k], expected):
                diff = (st[k].view(torch.int32) != expected.view(torch.int32)).nonzero().reshape(-1)
                where = [e[0] for e in entries if e[1] <= int(diff[0]) < e[1] + e[2]] or ["padding"]
                bad.append(f"buffer {j}: {k}: {diff.numel()} entries differ, first at {int(diff[0])} ({where[0]}): "
                           f"{float(st[k][diff[0]])} != {float(expected[diff[0]])}")
    return bad


def perturb(buffers, how, rng):
    """Edit every rank's raw moments the same way: 'ties' rounds |m| down to a power of two and zeroes every
    7th entry (many equal magnitudes, straddling partitions); 'special' puts inf and NaN into LoRA entries."""
    for flat, st, entries in buffers:
        for k in MOMENTS:
            t = st[k]
            if how == "ties":
                power = torch.sign(t) * torch.exp2(torch.floor(torch.log2(t.abs())))
                p2 = torch.where(t == 0, torch.zeros_like(t), power)
                p2[::7] = 0.0
                t.copy_(p2)
            elif how == "special":
                for name, start, count, _ in entries:
                    if ".lora_" in name and count > 1:
                        t[start + rng.randrange(count)] = float("inf") if k == "exp_avg" else float("nan")


def prune_configs(rng, count):
    """``count`` prunes: the first ones each method at a drawn ratio and at the edges (0, 0.999: every entry of a
    tensor under 500, 1), the rest drawn; moments as trained, tied ('ties') or with inf and NaN ('special')."""
    first = [("random", rng.random()), ("magnitude", rng.random()), ("magnitude", 0.999), ("random", 0.5),
             ("magnitude", 0.0), ("reset", rng.random()), ("magnitude", 1.0), ("random", 1 - 1e-9)]
    out = []
    for j in range(count):
        method, ratio = first[j] if j < len(first) else (rng.choice(["magnitude", "random", "reset"]), rng.random())
        perturb = ("none", "ties", "special", "ties", "none")[j % 5]  # the magnitudes at a drawn ratio tied
        out.append({"method": method, "ratio": ratio, "joint": rng.random() < 0.4, "seed": rng.randrange(1 << 30),
                    "perturb": perturb})
    return out


def run_case(case, prunes, out_dir):
    engine = build(case)
    rank = dist.get_rank()
    res = {"case": case, "offloaded": offloaded(engine), "optimizer": type(engine.optimizer).__name__,
           "failures": [], "prunes": 0}
    dtype = torch.bfloat16 if case["bf16"] else torch.float32
    g = torch.Generator().manual_seed(case["seed"] * 7 + rank)
    for _ in range(3):
        x = torch.randn(2, case["widths"][0], generator=g).to(dtype)
        engine.backward(engine(x))
        engine.step()
    if case["reload"]:  # prune a fresh engine that loaded the moments (ZeRO-1/2 link no fragments until a step)
        engine.save_checkpoint(os.path.join(out_dir, f"ckpt{case['seed']}"), tag="t")
        engine.destroy()
        engine = build(case)
        engine.load_checkpoint(os.path.join(out_dir, f"ckpt{case['seed']}"), tag="t")
    buffers, numel = flat_buffers(engine)
    res["backup_stepped"] = len(getattr(engine.optimizer, "backup_optimizer", SimpleNamespace(state={})).state)
    lora = relora_ds.lora_parameters(engine.module)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    lora_names = [names[id(p)] for p in lora]
    fails = res["failures"]
    whole, covered, holders = gather_whole(buffers, numel)
    res["split_lora"] = sum(1 for n in lora_names if holders[n] > 1)  # LoRA tensors cut across ranks
    res["odd_lora"] = sum(1 for n in lora_names if numel[n] % dist.get_world_size())
    if not covered:
        fails.append("the hand layout does not cover every parameter element exactly once")
    # The hand layout agrees with DeepSpeed's own gather of the masters (a check of the oracle itself).
    for n, p in engine.module.named_parameters():
        if p.requires_grad and not torch.equal(safe_get_full_fp32_param(p).reshape(-1).float(), whole[n]["master"]):
            fails.append(f"hand layout of {n}'s master differs from safe_get_full_fp32_param")
    base = snapshot(buffers)
    rng = random.Random(case["seed"] + 2)
    for cfg in prunes(rng):
        restore(buffers, base)
        perturb(buffers, cfg["perturb"], rng)
        before = snapshot(buffers)
        whole, *_ = gather_whole(buffers, numel)
        want, want_stats = single_process_prune(whole, lora_names, cfg["method"], cfg["ratio"], cfg["seed"],
                                                cfg["joint"])
        for i, n in enumerate(lora_names):
            masks = spec_masks(whole[n], cfg["method"], cfg["ratio"], cfg["seed"] + 1000003 * i, cfg["joint"])
            for k in MOMENTS:
                if not bits_equal(want[n][k], whole[n][k].masked_fill(masks[k], 0.0)):
                    fails.append(f"{cfg}: single-process prune of {n} {k} differs from the documented rule")
        stats = relora_ds.prune_optimizer_state(engine, lora, cfg["method"], cfg["ratio"], cfg["seed"], cfg["joint"])
        bad = check_buffers(buffers, before, want, set(lora_names))
        fails.extend(f"{cfg}: {b}" for b in bad)
        if any(stats[k] != v and not (math.isnan(stats[k]) and math.isnan(v)) for k, v in want_stats.items()):
            fails.append(f"{cfg}: stats {stats} != single-process {want_stats}")
        res["prunes"] += 1
    # A ReLoRA reset through the hook: merge, then the prune with seed cfg.seed + step.
    restore(buffers, base)
    cfg = SimpleNamespace(mode="relora", cycle_length=2, merge_every=None,
                          prune_method=rng.choice(["magnitude", "random"]),
                          prune_ratio=rng.random(), prune_joint=rng.random() < 0.5, seed=rng.randrange(1000))
    before = snapshot(buffers)
    whole, *_ = gather_whole(buffers, numel)
    want, _ = single_process_prune(whole, lora_names, cfg.prune_method, cfg.prune_ratio, cfg.seed + 5, cfg.prune_joint)
    event = after_step(engine, 5, cfg, 3)
    if not (event and event["event"] == "reset"):
        fails.append(f"after_step at the cycle's end gave {event}")
    bad = check_buffers(buffers, before, want, set(lora_names))
    # the merge rewrote the LoRA masters (A new, B zero): leave those out of the comparison
    lora_master = [b for b in bad if "fp32 master changed" in b]
    fails.extend(f"reset {vars(cfg)}: {b}" for b in bad if b not in lora_master)
    after, *_ = gather_whole(buffers, numel)
    for n in numel:
        if n not in lora_names and not bits_equal(after[n]["master"], whole[n]["master"]):
            fails.append(f"reset: the master of {n} (not LoRA) changed")
        if n.endswith("lora_B") and bool(after[n]["master"].any()):
            fails.append(f"reset: lora_B master {n} not zeroed")
    res["prunes"] += 1
    engine.destroy()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--seeds", required=True, help="comma-separated case seeds, or FIRST-LAST")
    ap.add_argument("--prunes", type=int, default=8, help="prunes per case (before the reset through the hook)")
    args = ap.parse_args()
    init_distributed()
    seeds = (range(int(args.seeds.split("-")[0]), int(args.seeds.split("-")[1]) + 1) if "-" in args.seeds
             else [int(s) for s in args.seeds.split(",")])
    out = []
    for seed in seeds:
        out.append(run_case(draw_case(seed), lambda rng: prune_configs(rng, args.prunes), args.out))
        if dist.get_rank() == 0:
            print(json.dumps({k: out[-1][k] for k in ("prunes", "failures", "optimizer", "backup_stepped")}),
                  flush=True)
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(out, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    run_and_exit(main)
