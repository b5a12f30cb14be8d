"""Fidelity to the ReLoRA reference implementation (github.com/Guitaricet/relora), number by number on tiny inputs.

The oracles are the reference's own functions, transcribed (commit d8ff7ee4 of peft_pretraining/relora.py and
peft_pretraining/training_utils.py, torchrun_main.py of the same tree): its jagged schedule
(`_get_cosine_schedule_with_multiple_warmups_lambda`), its merge (`ReLoRaLinear.merge_and_reinit`), its
optimizer-state pruning (`magnitude_pruning_`, `random_pruning_`, `optimizer_reset`), its choice of layers
(`ReLoRaModel.__init__` with torchrun_main's `target_modules=["attn", "attention", "mlp"]`) and of pruned
parameters (torchrun_main's `lora_params`). Where ours differs on purpose (README, "Where this differs from the
reference implementation"), the test pins the difference with its numbers.
"""
from __future__ import annotations

import math

import pytest
import torch
import transformers
from torch import nn

import relora_ds
from relora_ds import LlamaConfig, LlamaForCausalLM, ReLoRALinear
from relora_ds.prune import magnitude_prune_mask
from relora_ds.schedule import build_scheduler, cosine_with_warmup, jagged_cosine
from relora_ds.train_config import TrainConfig


# ---- the reference's functions, transcribed -------------------------------------------------------------------

def ref_multiple_warmups(current_step, *, num_training_steps, first_warmup_steps, restart_warmup_steps,
                         restart_every, min_lr_ratio, adjust_step=0):
    """training_utils.py `_get_cosine_schedule_with_multiple_warmups_lambda` (scheduler 'cosine_restarts')."""
    assert 0 < min_lr_ratio <= 1.0
    assert adjust_step + first_warmup_steps <= restart_every
    if current_step < first_warmup_steps:
        return float(current_step) / float(max(1, first_warmup_steps))
    _current_step = current_step + adjust_step
    restart_step = _current_step % restart_every
    restart_number = _current_step // restart_every
    if restart_step < restart_warmup_steps and current_step >= restart_every:
        end_of_warmup_progress = (float(restart_number * restart_every + restart_warmup_steps - first_warmup_steps)
                                  / float(max(1, num_training_steps - first_warmup_steps)))
        _cosine_decay = 0.5 * (1.0 + math.cos(math.pi * end_of_warmup_progress))
        warmup_lr_multiplier = min_lr_ratio + (1.0 - min_lr_ratio) * _cosine_decay
        return float(restart_step) / float(max(1, restart_warmup_steps)) * warmup_lr_multiplier
    progress = float(_current_step - first_warmup_steps) / float(max(1, num_training_steps - first_warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ref_cyclical_cosine(current_step, *, num_warmup_steps, cycle_length, min_lr_ratio):
    """training_utils.py `_get_cyclical_cosine_schedule_with_min_lr_lambda` (scheduler 'cosine'): a cosine that
    starts over in every cycle. Not the paper's jagged schedule; here only to show ours is not this one."""
    cycle_step = current_step % cycle_length
    if cycle_step < num_warmup_steps:
        if current_step != cycle_step and cycle_step < 2:
            return 1e-7
        return float(cycle_step) / float(max(1, num_warmup_steps))
    progress = float(cycle_step - num_warmup_steps) / float(max(1, cycle_length - num_warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def ref_magnitude_pruning_(tensor, prune_ratio):
    """training_utils.py `magnitude_pruning_`: zero |t| <= the `prune_ratio` quantile, in place."""
    tensor_magnitude = torch.abs(tensor)
    threshold = torch.quantile(tensor_magnitude.flatten().to(dtype=torch.float32), prune_ratio).to(dtype=tensor.dtype)
    tensor.mul_((tensor_magnitude > threshold).to(dtype=tensor.dtype))


@torch.no_grad()
def ref_merge_(weight, lora_A, lora_B, lora_alpha, r):
    """relora.py `ReLoRaLinear.merge_and_reinit` (no quantization, no trainable scaling): W += B @ A * alpha / r,
    A <- kaiming_uniform_(a=sqrt(5)), B <- 0."""
    weight += lora_B @ lora_A * (lora_alpha / r)
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    nn.init.zeros_(lora_B)


def ref_targets(model, target_modules=("attn", "attention", "mlp")):
    """relora.py `ReLoRaModel.__init__`: every nn.Linear whose name contains a target key (a substring)."""
    return {name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(key in name for key in target_modules)}


# ---- the jagged schedule ------------------------------------------------------------------------------------------

SCHEDULES = [  # (total, first warmup, cycle, restart warmup, min_lr_ratio); total % cycle == 0, as the reference needs
    (60, 5, 20, 4, 0.1),
    (90, 0, 30, 0, 0.1),    # no warmup at all: plain cosine, the lr jumps back at each reset
    (45, 15, 15, 15, 0.3),  # first warmup a whole cycle; re-warmup a whole cycle
    (100, 10, 25, 1, 1.0),  # constant lr but for the warmup and one step at 0 per reset
    (120, 7, 40, 13, 0.05),
]


@pytest.mark.parametrize("total,warmup,cycle,rewarm,floor", SCHEDULES)
def test_jagged_cosine_is_the_references_cosine_restarts_at_every_step(total, warmup, cycle, rewarm, floor):
    kw = dict(total_steps=total, warmup_steps=warmup, cycle_length=cycle, restart_warmup_steps=rewarm,
              min_lr_ratio=floor)
    ours = [jagged_cosine(s, **kw) for s in range(total)]
    ref = [ref_multiple_warmups(s, num_training_steps=total, first_warmup_steps=warmup, restart_every=cycle,
                                restart_warmup_steps=rewarm, min_lr_ratio=floor) for s in range(total)]
    assert ours == pytest.approx(ref, abs=1e-15)
    # through LambdaLR as the trainer steps it (the reference's LambdaLR too): lr of step s is base·f(s)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2e-3)
    sched = build_scheduler(opt, **kw)
    applied = []
    for _ in range(total):
        applied.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert applied == pytest.approx([2e-3 * f for f in ref], abs=1e-18)


def test_at_a_restart_the_lr_drops_to_zero_and_ramps_back_onto_the_one_cosine():
    """total 60, warmup 5, cycle 20, re-warmup 4, floor 0.1: the values the reference gives, by hand."""
    kw = dict(total_steps=60, warmup_steps=5, cycle_length=20, restart_warmup_steps=4, min_lr_ratio=0.1)
    cos = [cosine_with_warmup(s, total_steps=60, warmup_steps=5, min_lr_ratio=0.1) for s in range(60)]
    assert [jagged_cosine(s, **kw) for s in (0, 1, 4, 5)] == pytest.approx([0.0, 0.2, 0.8, 1.0])
    for reset in (20, 40):
        assert jagged_cosine(reset, **kw) == 0.0
        # the ramp ends on the global cosine where its phase stands 4 steps after the reset (not restarted)
        for i in range(1, 4):
            assert jagged_cosine(reset + i, **kw) == pytest.approx(i / 4 * cos[reset + 4], abs=1e-15)
        assert jagged_cosine(reset + 4, **kw) == pytest.approx(cos[reset + 4], abs=1e-15)
    # step 30: the one cosine at progress 25/55, 0.1 + 0.45·(1 + cos(25π/55)) = 0.6140; the reference's other
    # scheduler ('cosine', per-cycle) would restart its cosine in each cycle: 0.7750 there
    assert jagged_cosine(30, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 25 / 55)), abs=1e-15)
    assert jagged_cosine(30, **kw) == pytest.approx(0.6140, abs=1e-4)
    assert ref_cyclical_cosine(30, num_warmup_steps=5, cycle_length=20, min_lr_ratio=0.1) == pytest.approx(0.775)


# ---- the merge -----------------------------------------------------------------------------------------------------

def test_merge_is_the_references_w_plus_scaled_b_a_and_b_restarts_at_zero():
    torch.manual_seed(0)
    layer = ReLoRALinear(7, 5, 3, alpha=32.0, name="l")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(3, 7, generator=g))
        layer.lora_B.copy_(torch.randn(5, 3, generator=g))
    W, A, B = (t.detach().double().clone() for t in (layer.weight, layer.lora_A, layer.lora_B))
    x = torch.randn(4, 7, generator=g)
    before = layer(x)
    ref_W = W.clone()
    ref_merge_(ref_W, A.clone(), B.clone(), lora_alpha=32, r=3)  # scale 32/3
    model = nn.Sequential(layer)
    relora_ds.merge_and_reinit(model)
    assert torch.allclose(layer.weight.double(), ref_W, rtol=0, atol=1e-5)
    assert (layer.weight.double() - W).abs().max() > 1.0  # a real update, not a no-op
    assert torch.count_nonzero(layer.lora_B) == 0
    assert not torch.equal(layer.lora_A.double(), A)  # A redrawn
    assert torch.allclose(layer(x), before, atol=1e-5)  # B = 0: the merged layer computes what it did


def test_reinit_draws_a_from_the_references_kaiming_uniform():
    """kaiming_uniform_(a=√5) on A (rank, in): U(-1/√in, 1/√in), as nn.Linear's default. 65,536 draws of ours
    against 65,536 of torch's own init (the reference's call): same bound, quantiles within 2% of the bound."""
    rank, fan_in = 64, 1024
    layer = ReLoRALinear(fan_in, 64, rank, name="q")
    relora_ds.merge_and_reinit(nn.Sequential(layer))
    ours = layer.lora_A.detach().flatten()
    ref = torch.empty(rank, fan_in)
    torch.manual_seed(0)
    nn.init.kaiming_uniform_(ref, a=math.sqrt(5))
    bound = 1 / math.sqrt(fan_in)
    assert ours.abs().max() <= bound and ref.abs().max() <= bound
    assert ours.abs().max() > 0.999 * bound
    q = torch.linspace(0.01, 0.99, 99)
    assert torch.allclose(torch.quantile(ours, q), torch.quantile(ref.flatten(), q), atol=0.02 * bound)
    assert ours.var().item() == pytest.approx(bound ** 2 / 3, rel=0.02)


def test_default_scale_is_the_references_alpha_over_rank():
    """The reference's defaults: lora_r 128, lora_alpha 32 (torchrun_main.py), scaling = lora_alpha / r."""
    assert ReLoRALinear(256, 256, 128).scale == 32 / 128
    assert TrainConfig.alpha == 32 and TrainConfig.dropout == 0.0  # README: the reference's 0.1 is the recipes'


# ---- which layers, which parameters ---------------------------------------------------------------------------------

def _hf_llama():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("make", [_hf_llama, lambda: LlamaForCausalLM(LlamaConfig.preset("debug"))],
                         ids=["hf", "ours"])
def test_wrap_converts_the_references_layers_and_trains_the_same_parameters(make):
    torch.manual_seed(0)
    model = make()
    want = ref_targets(model)
    assert len(want) == 7 * 2  # q, k, v, o, gate, up, down in each of 2 layers; never lm_head
    # the reference trains every parameter but the targeted linears' weights (embeddings, norms, lm_head: full rank)
    want_trainable = {n for n, p in model.named_parameters() if p.requires_grad} - {f"{t}.weight" for t in want}
    relora_ds.wrap(model, rank=4)
    assert {name for name, _ in relora_ds.relora_layers(model)} == want
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "lora_" not in n} == want_trainable
    # the reference prunes torchrun_main's lora_params: trainable parameters named "lora_"
    assert {id(p) for p in relora_ds.lora_parameters(model)} == \
        {id(p) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


# ---- the optimizer-state prune --------------------------------------------------------------------------------------

def _adam_with_moments(*moments):
    """AdamW over one parameter per (exp_avg, exp_avg_sq) pair, its state set to those moments."""
    params = [nn.Parameter(torch.zeros_like(m)) for m, _ in moments]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    for p, (m, v) in zip(params, moments):
        opt.state[p]["exp_avg"].copy_(m)
        opt.state[p]["exp_avg_sq"].copy_(v)
    return opt, params


def test_magnitude_prune_is_the_references_per_tensor_quantile_on_each_moment():
    """Two tensors 6 orders of magnitude apart (per tensor, not global: each keeps 1%), n = 100 and 300 where the
    reference's quantile count floor(0.99·(n-1)) + 1 equals our round(0.99·n). exp_avg_sq: the reference's mask
    exactly; exp_avg: the reference's own mask, and also every entry exp_avg_sq lost (README: no momentum without
    its second moment)."""
    g = torch.Generator().manual_seed(0)
    moments = [(torch.randn(100, generator=g) * 1e-3, torch.rand(100, generator=g) * 1e-6),
               (torch.randn(10, 30, generator=g) * 1e3, torch.rand(10, 30, generator=g) * 1e6)]
    refs = [(m.clone(), v.clone()) for m, v in moments]
    for m, v in refs:
        ref_magnitude_pruning_(m, 0.99)
        ref_magnitude_pruning_(v, 0.99)
    opt, params = _adam_with_moments(*moments)
    stats = relora_ds.prune_optimizer_state(opt, params, method="magnitude", ratio=0.99)
    for p, (m, v), (ref_m, ref_v) in zip(params, moments, refs):
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref_v)
        assert int((ref_v != 0).sum()) == p.numel() // 100  # 1% kept, in each tensor
        want_m = ref_m * (ref_v != 0)
        assert torch.equal(opt.state[p]["exp_avg"], want_m)
    assert stats["exp_avg_sq"] == pytest.approx(0.99)


@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.99])
def test_magnitude_count_differs_from_the_references_quantile_by_at_most_one_entry(ratio):
    """The reference zeroes |t| <= quantile(ratio) (linear interpolation): floor(ratio·(n-1)) + 1 entries of
    distinct values; ours exactly round(ratio·n). Both zero the smallest entries, so one mask holds the other,
    and they differ by at most one entry (e.g. ratio 0.99 on a 512x128 factor: ours 64,881, the reference 64,880)."""
    differ = 0
    for n in list(range(1, 301)) + [65536]:
        t = torch.rand(n, generator=torch.Generator().manual_seed(n)) + 0.1
        ref = t.clone()
        ref_magnitude_pruning_(ref, ratio)
        ref_mask, mask = ref == 0, magnitude_prune_mask(t, ratio)
        assert int(ref_mask.sum()) == math.floor(ratio * (n - 1) + 1e-9) + 1, n
        assert int(mask.sum()) == round(ratio * n), n
        assert torch.equal(mask & ref_mask, mask) or torch.equal(mask & ref_mask, ref_mask), n
        assert abs(int(mask.sum()) - int(ref_mask.sum())) <= 1, n
        differ += int(mask.sum()) != int(ref_mask.sum())
    assert 0 < differ < 301


def test_random_prune_keeps_the_references_expected_share_in_each_moment_with_one_mask():
    """The reference's `random_pruning_` keeps each entry with probability 1 - ratio, a fresh draw per moment;
    ours keeps exactly n - round(ratio·n) entries, one mask for both moments (README)."""
    n = 4000
    g = torch.Generator().manual_seed(0)
    m, v = torch.randn(n, generator=g), torch.rand(n, generator=g) + 0.1
    opt, (p,) = _adam_with_moments((m, v))
    relora_ds.prune_optimizer_state(opt, [p], method="random", ratio=0.9, seed=3)
    kept_m, kept_v = opt.state[p]["exp_avg"] != 0, opt.state[p]["exp_avg_sq"] != 0
    assert torch.equal(kept_m, kept_v)
    assert int(kept_v.sum()) == n - round(0.9 * n) == 400
    torch.manual_seed(0)
    ref_kept = [int((torch.rand(n) > 0.9).sum()) for _ in range(200)]  # the reference's mask, drawn 200 times
    assert sum(ref_kept) / len(ref_kept) == pytest.approx(400, rel=0.02)


@pytest.mark.parametrize("t0,want_b,want_a", [(100, 1.317, 0.985), (1000, 3.380, 2.516), (5000, 4.235, 3.152)])
def test_a_pruned_entrys_first_move_after_a_reset_follows_our_order_of_lr_0_step_and_prune(t0, want_b, want_a):
    """Ours prunes before the reset's lr-0 step (README, "The step at lr 0 after a reset"); that step seeds a
    pruned lora_B entry's m and v with one gradient, so its first move (the next step) is
    (1-β1²)/√(1-β2²)·√(1-β2ᵗ)/(1-β1ᵗ) times that step's lr for a steady gradient: 4.235 at t = 5000, not the
    reference order's (1-β1)/√(1-β2)·... = 3.152 (it prunes after its lr-0 step). A lora_A entry gets gradient 0
    until B has moved, so its first move has the reference's factor. `t0`: Adam's step count at the reset (never
    reset, as in the reference)."""
    kw = dict(total_steps=3 * t0, warmup_steps=10, cycle_length=t0, restart_warmup_steps=4, min_lr_ratio=0.1)
    b1, b2 = 0.9, 0.999
    moves = {}
    for name, grads in (("B", [1.0, 1.0]), ("A", [0.0, 0.0, 1.0])):
        p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = torch.optim.AdamW([p], lr=1.0, betas=(b1, b2), eps=1e-12, weight_decay=0.0)
        p.grad = torch.ones_like(p)
        opt.step()  # moments from before the reset, and Adam's step count, set to t0 below
        opt.state[p]["step"].fill_(t0 - 1)
        relora_ds.prune_optimizer_state(opt, [p], method="reset")  # after step t0 - 1 of the trainer's count
        for i, g in enumerate(grads):
            lr = jagged_cosine(t0 + i, **kw)
            opt.param_groups[0]["lr"] = lr
            before = p.detach().clone()
            p.grad = torch.full_like(p, g)
            opt.step()
            moved = float((p.detach() - before).abs())
            assert (moved == 0.0) == (i < len(grads) - 1), (name, i)
        moves[name] = moved / lr
        t = t0 + len(grads) - 1  # Adam's count at that step
        bias = math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        if name == "B":  # seeded once at lr 0: m = (1-β1²)·g, v = (1-β2²)·g² after two steps
            assert moves[name] == pytest.approx((1 - b1 ** 2) / math.sqrt(1 - b2 ** 2) * bias, rel=1e-9)
        else:
            assert moves[name] == pytest.approx((1 - b1) / math.sqrt(1 - b2) * bias, rel=1e-9)
    assert jagged_cosine(t0, **kw) == 0.0
    assert (moves["B"], moves["A"]) == pytest.approx((want_b, want_a), abs=1e-3)
