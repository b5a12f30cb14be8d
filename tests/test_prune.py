"""Optimizer-state pruning against a sort-based oracle."""
import math

import pytest
import torch

import relora_ds
from relora_ds.prune import magnitude_prune_mask, random_prune_mask


def _oracle_mask(t, ratio):
    """Sort-based: zero the k = round(ratio·n) smallest |t|, ties by lower flat index (stable sort)."""
    flat = t.reshape(-1).abs()
    k = int(round(ratio * flat.numel()))
    order = torch.sort(flat, stable=True).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(t.shape)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_magnitude_mask_equals_sort_oracle(ratio):
    t = torch.randn(37, 53)
    assert torch.equal(magnitude_prune_mask(t, ratio), _oracle_mask(t, ratio))


def test_magnitude_mask_with_ties_prunes_exactly_k():
    t = torch.tensor([3.0, -1.0, 1.0, 2.0, 1.0, -1.0, 0.5, 4.0])
    mask = magnitude_prune_mask(t, 0.5)  # k = 4: 0.5 and the first three of the four |1.0|
    assert torch.equal(mask, torch.tensor([False, True, True, False, True, False, True, False]))
    assert torch.equal(mask, _oracle_mask(t, 0.5))


def test_magnitude_mask_ranks_fp64_moments_in_fp64():
    """fp64 moments that differ below fp32's resolution are ranked by their fp64 values (not made ties)."""
    t = torch.tensor([1.0 + 1e-12, 1.0, 5.0, 6.0], dtype=torch.float64)
    assert torch.equal(magnitude_prune_mask(t, 0.25), torch.tensor([False, True, False, False]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_magnitude_mask_of_each_dtype_equals_the_sort_oracle(dtype):
    u = torch.randn(41, 29, dtype=torch.float64).to(dtype)
    assert torch.equal(magnitude_prune_mask(u, 0.9), _oracle_mask(u.double(), 0.9))


def test_magnitude_mask_with_nan_moments_prunes_exactly_k_as_the_sort_oracle():
    """NaN moments (a diverged step an optimizer took) made kthvalue's threshold NaN and the prune zero no entry
    of the tensor at all; NaN ranks above every value, +inf too, as torch.sort orders it."""
    t = torch.randn(23, 31)
    t.view(-1)[torch.randperm(t.numel(), generator=torch.Generator().manual_seed(0))[:300]] = float("nan")
    t.view(-1)[:5] = float("inf")
    for ratio in (0.5, 0.99):  # the cut among the finite values, and among the infs and NaNs
        mask = magnitude_prune_mask(t, ratio)
        assert int(mask.sum()) == round(ratio * t.numel())
        assert torch.equal(mask, _oracle_mask(t, ratio))


def test_large_tensor_beyond_quantile_limit():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(17_000_000, generator=g)
    mask = magnitude_prune_mask(t, 0.99)
    assert int(mask.sum()) == round(0.99 * t.numel())
    assert t[~mask].abs().min() >= t[mask].abs().max()


def _adam_state(seed=0):
    torch.manual_seed(seed)
    a, b, other = (torch.nn.Parameter(torch.randn(*s)) for s in [(16, 24), (24, 16), (10,)])
    opt = torch.optim.AdamW([a, b, other], lr=1e-3)
    for _ in range(2):
        (a.sum() * 2 + (b ** 2).sum() + other.pow(3).sum()).backward()
        opt.step()
    return opt, a, b, other


def _noisy_moments(opt, params, seed=9):
    """Overwrite the moments with noisy-gradient-like values: |exp_avg| and exp_avg_sq then order the
    entries differently (a few steps of one smooth loss give v ∝ m², the same order, and would hide the
    difference between the modes). Returns the moments written."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in params:
        m, v = torch.randn(p.shape, generator=g), torch.rand(p.shape, generator=g) + 0.01
        opt.state[p]["exp_avg"].copy_(m), opt.state[p]["exp_avg_sq"].copy_(v)
        out.append({"exp_avg": m, "exp_avg_sq": v})
    return out


def _randperm_mask(shape, ratio, seed):
    """The documented random mask, written out: the first round(ratio·n) of a CPU randperm seeded with ``seed``
    (the 2-rank oracle in tests/dist/zero_reset_worker.py is the same)."""
    n = math.prod(shape)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=torch.Generator(device="cpu").manual_seed(seed))[:int(round(ratio * n))]] = True
    return mask.view(shape)


def _own_masks(moments, method, ratio, seed, i):
    """Each moment's own mask, as the paper computes it by magnitude; random: the one mask both moments share,
    seeded as prune_optimizer_state derives it for the i-th tensor."""
    if method == "magnitude":
        return [_oracle_mask(moments[k], ratio) for k in ("exp_avg", "exp_avg_sq")]
    return [_randperm_mask(moments["exp_avg"].shape, ratio, seed=seed + 1000003 * i)] * 2


def test_prune_optimizer_state_magnitude_only_given_params():
    opt, a, b, other = _adam_state()
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in (a, b, other)}
    stats = relora_ds.prune_optimizer_state(opt, [a, b], method="magnitude", ratio=0.9)
    zeroed_m = 0
    for p in (a, b):
        m_mask, v_mask = _own_masks(before[id(p)], "magnitude", 0.9, 0, 0)
        assert torch.equal(opt.state[p]["exp_avg"], before[id(p)]["exp_avg"].masked_fill(m_mask | v_mask, 0.0))
        assert torch.equal(opt.state[p]["exp_avg_sq"], before[id(p)]["exp_avg_sq"].masked_fill(v_mask, 0.0))
        assert torch.equal(opt.state[p]["step"], before[id(p)]["step"])  # step untouched
        zeroed_m += int((m_mask | v_mask).sum())
    for key, v in opt.state[other].items():
        assert torch.equal(v, before[id(other)][key])
    n = a.numel() + b.numel()
    assert stats["exp_avg_sq"] == pytest.approx((round(0.9 * a.numel()) + round(0.9 * b.numel())) / n)
    assert stats["exp_avg"] == pytest.approx(zeroed_m / n)
    # The share of each moment's L1 mass zeroed: what the pruned entries held, from the state before and after.
    for key in ("exp_avg", "exp_avg_sq"):
        held = sum(before[id(p)][key].abs().sum().item() for p in (a, b))
        kept = sum(opt.state[p][key].abs().sum().item() for p in (a, b))
        assert stats[f"{key}_mass"] == pytest.approx((held - kept) / held, rel=1e-5)
    # magnitude pruning: 90% of the entries are the smallest, so less than 90% of the mass
    assert 0 < stats["exp_avg_sq_mass"] < stats["exp_avg_sq"]


def test_independent_prune_leaves_no_momentum_without_second_moment():
    """joint=False, magnitude: exp_avg_sq is pruned by its own mask exactly as the paper does; exp_avg by its
    own mask united with exp_avg_sq's, so no entry keeps exp_avg while its exp_avg_sq is zeroed."""
    opt, a, b, _ = _adam_state(seed=2)
    before = _noisy_moments(opt, (a, b))
    stats = relora_ds.prune_optimizer_state(opt, [a, b], method="magnitude", ratio=0.9, seed=5)
    zeroed = {"exp_avg": 0, "exp_avg_sq": 0}
    for i, (p, b0) in enumerate(zip((a, b), before)):
        m_mask, v_mask = _own_masks(b0, "magnitude", 0.9, 5, i)
        assert (m_mask & ~v_mask).any() and (v_mask & ~m_mask).any()  # the masks really differ here
        assert torch.equal(opt.state[p]["exp_avg_sq"], b0["exp_avg_sq"].masked_fill(v_mask, 0.0))
        assert torch.equal(opt.state[p]["exp_avg"], b0["exp_avg"].masked_fill(m_mask | v_mask, 0.0))
        assert not ((opt.state[p]["exp_avg"] != 0) & (opt.state[p]["exp_avg_sq"] == 0)).any()
        zeroed["exp_avg"] += int((m_mask | v_mask).sum())
        zeroed["exp_avg_sq"] += int(v_mask.sum())
    n = a.numel() + b.numel()
    assert {k: stats[k] for k in zeroed} == {k: pytest.approx(zeroed[k] / n) for k in zeroed}  # truly zeroed
    assert stats["exp_avg_sq"] == pytest.approx((round(0.9 * a.numel()) + round(0.9 * b.numel())) / n)
    assert stats["exp_avg"] > stats["exp_avg_sq"]


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_joint_prune_one_mask_from_exp_avg(method):
    """joint=True: exp_avg_sq is zeroed exactly where exp_avg is (the exp_avg mask), never elsewhere."""
    opt, a, b, _ = _adam_state(seed=1)
    before = _noisy_moments(opt, (a, b))
    stats = relora_ds.prune_optimizer_state(opt, [a, b], method=method, ratio=0.9, seed=5, joint=True)
    for i, (p, b0) in enumerate(zip((a, b), before)):
        mask, v_own = _own_masks(b0, method, 0.9, 5, i)
        assert torch.equal(opt.state[p]["exp_avg"], b0["exp_avg"].masked_fill(mask, 0.0))
        assert torch.equal(opt.state[p]["exp_avg_sq"], b0["exp_avg_sq"].masked_fill(mask, 0.0))
        assert not ((opt.state[p]["exp_avg"] != 0) & (opt.state[p]["exp_avg_sq"] == 0)).any()
        if method == "magnitude":
            assert not torch.equal(mask, v_own)  # unlike the default, exp_avg_sq's own values play no part
    assert stats["exp_avg"] == stats["exp_avg_sq"]


def test_random_and_reset_modes():
    opt, a, b, _ = _adam_state()
    before = {k: opt.state[a][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    stats = relora_ds.prune_optimizer_state(opt, [a], method="random", ratio=0.75, seed=3)
    # One mask for both moments (two draws and the exp_avg guard would keep only 0.25² of exp_avg): each
    # moment keeps exactly round(0.25·n) entries, at the same places.
    mask = _randperm_mask(a.shape, 0.75, seed=3)
    assert torch.equal(random_prune_mask(a.shape, 0.75, seed=3), mask) and int(mask.sum()) == round(0.75 * a.numel())
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[a][key], before[key].masked_fill(mask, 0.0))
    assert stats["exp_avg"] == stats["exp_avg_sq"] == pytest.approx(round(0.75 * a.numel()) / a.numel())
    m1, m2 = random_prune_mask((100,), 0.3, seed=1), random_prune_mask((100,), 0.3, seed=1)
    assert torch.equal(m1, m2) and int(m1.sum()) == 30
    assert not torch.equal(m1, random_prune_mask((100,), 0.3, seed=2))
    stats = relora_ds.prune_optimizer_state(opt, [b], method="reset")
    assert stats == {"exp_avg": 1.0, "exp_avg_sq": 1.0, "exp_avg_mass": 1.0, "exp_avg_sq_mass": 1.0}
    assert torch.count_nonzero(opt.state[b]["exp_avg"]) == 0


def _reset_then_step(prune):
    """Debug-preset ReLoRA model, AdamW lr 1e-3 for 5 steps, merge_and_reinit, ``prune(opt, lora)``, one
    step at lr 2e-4 (a restart warmup's first step), then one more backward. Returns (max|lora_A| after
    the re-init, the most any entry of lora_A moved in the step, the global grad norm before the reset, at
    the backward after the step)."""
    torch.manual_seed(0)
    model = relora_ds.wrap(relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("debug")), rank=4, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 512, (4, 33), generator=g) for _ in range(7)]

    def backward(x):
        opt.zero_grad(set_to_none=True)
        model(x, labels=x).loss.backward()
        return float(torch.nn.utils.clip_grad_norm_(params, float("inf")))

    for x in batches[:5]:
        norm_before = backward(x)
        opt.step()
    relora_ds.merge_and_reinit(model)
    lora_A = [layer.lora_A for _, layer in relora_ds.relora_layers(model)]
    max_A_init = max(float(a.detach().abs().max()) for a in lora_A)
    at_init = [a.detach().clone() for a in lora_A]
    prune(opt, relora_ds.lora_parameters(model))
    for group in opt.param_groups:
        group["lr"] = 2e-4
    backward(batches[5])
    opt.step()
    moved = max(float((a.detach() - a0).abs().max()) for a, a0 in zip(lora_A, at_init))
    return max_A_init, moved, norm_before, backward(batches[6])


@torch.no_grad()
def _prune_unguarded(opt, params):
    """The paper's masks alone (each moment by its own magnitudes), without exp_avg ⊇ exp_avg_sq's mask."""
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            opt.state[p][key].masked_fill_(magnitude_prune_mask(opt.state[p][key], 0.99), 0.0)


def test_first_step_after_reset_keeps_lora_A_small():
    """Right after a reset B = 0, so lora_A's gradient is exactly 0 and a zeroed exp_avg_sq stays 0: an
    entry that kept exp_avg would move by ~lr·m/eps. With the paper's masks alone (``_prune_unguarded``)
    78 entries do, and one step at lr 2e-4 takes max|lora_A| from 0.125 to ~21 and the next grad norm from
    ~1.3 to ~15 (measured); prune_optimizer_state zeroes exp_avg there too and A stays at its re-init: an
    entry keeping both moments moves by an Adam step, about lr (|m̂|/√v̂ ≤ 1 for a steady gradient; 1.6e-4
    measured), bounded here by 2·lr."""
    def guarded(opt, lora):
        relora_ds.prune_optimizer_state(opt, lora, "magnitude", 0.99)

    max_A_init, moved, norm_before, norm_after = _reset_then_step(guarded)
    assert moved <= 2 * 2e-4, (max_A_init, moved)
    assert norm_after <= 1.1 * norm_before, (norm_before, norm_after)  # 1.29 -> 1.33 measured
    max_A_init, moved, norm_before, norm_after = _reset_then_step(_prune_unguarded)
    assert moved > 20 * max_A_init and norm_after > 5 * norm_before, "the hazard the guard exists for"


def test_bad_arguments():
    opt, a, _, _ = _adam_state()
    with pytest.raises(ValueError, match=r"ratio=1.5 must be a number in \[0, 1\]"):
        relora_ds.prune_optimizer_state(opt, [a], ratio=1.5)
    with pytest.raises(ValueError, match=r"ratio='0.5' must be a number in \[0, 1\]"):  # was: a TypeError in round
        relora_ds.prune_optimizer_state(opt, [a], ratio="0.5")
    with pytest.raises(ValueError, match=r"ratio=True must be a number in \[0, 1\]"):  # not 1.0: every moment zeroed
        relora_ds.prune_optimizer_state(opt, [a], ratio=True)
    with pytest.raises(ValueError, match="valid methods"):
        relora_ds.prune_optimizer_state(opt, [a], method="l1")
    fresh = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="after the first optimizer step"):
        relora_ds.prune_optimizer_state(torch.optim.AdamW([fresh]), [fresh])


def _opt():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 5))
    opt = torch.optim.AdamW([a], lr=1e-3)
    (a ** 2).sum().backward()
    opt.step()
    return opt, a


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_ratio_one_zeroes_everything_and_ratio_zero_nothing(method):
    opt, a = _opt()
    before = {k: opt.state[a][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    assert relora_ds.prune_optimizer_state(opt, [a], method, ratio=0.0) == \
        {"exp_avg": 0.0, "exp_avg_sq": 0.0, "exp_avg_mass": 0.0, "exp_avg_sq_mass": 0.0}
    assert all(torch.equal(opt.state[a][k], before[k]) for k in before)
    assert relora_ds.prune_optimizer_state(opt, [a], method, ratio=1.0) == \
        {"exp_avg": 1.0, "exp_avg_sq": 1.0, "exp_avg_mass": 1.0, "exp_avg_sq_mass": 1.0}
    assert all(torch.count_nonzero(opt.state[a][k]) == 0 for k in before)


def _one_step(opt, params):
    loss = sum((p ** 2).sum() for p in params)
    loss.backward()
    opt.step()


def test_errors_say_why_a_parameter_has_no_adam_moments():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(2)]
    sgd = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    _one_step(sgd, ps)
    with pytest.raises(ValueError, match=r"has optimizer state \['momentum_buffer'\], not the Adam moments"):
        relora_ds.prune_optimizer_state(sgd, ps)
    plain = torch.optim.SGD(ps, lr=0.1)
    _one_step(plain, ps)
    with pytest.raises(ValueError, match=r"has no optimizer state: ReLoRA prunes Adam/AdamW moments, and SGD keeps"):
        relora_ds.prune_optimizer_state(plain, ps)
    adam = torch.optim.AdamW(ps[:1])
    with pytest.raises(ValueError, match="after the first optimizer step"):
        relora_ds.prune_optimizer_state(adam, ps[:1])
    _one_step(adam, ps[:1])
    with pytest.raises(ValueError, match=r"parameter 1 .* is not in this optimizer's param groups, which hold other"):
        relora_ds.prune_optimizer_state(adam, ps)


def test_all_of_a_models_parameters_are_refused_before_any_moment_is_zeroed():
    """prune_optimizer_state(opt, model.parameters()) instead of the LoRA parameters: the embedding's moments
    were pruned, then the first frozen base weight raised "not in this optimizer's param groups ... built before
    wrap" (a review): the state changed and the error named another cause. Every parameter is now checked first,
    and a frozen one is named as such. Oracle: the optimizer state before the call, bit for bit."""
    torch.manual_seed(0)
    model = relora_ds.wrap(relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("debug")), rank=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = torch.randint(0, 512, (2, 17))
    model(batch, labels=batch).loss.backward()
    opt.step()
    before = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    with pytest.raises(ValueError, match=r"parameter \d+ \(shape .*\) is frozen \(requires_grad=False: a ReLoRA "
                                         r"layer's base weight\?\).*relora_ds.lora_parameters\(model\)"):
        relora_ds.prune_optimizer_state(opt, model.parameters())
    for p, st in opt.state.items():
        assert all(torch.equal(v, before[id(p)][k]) for k, v in st.items())


def test_a_parameter_that_never_had_a_gradient_has_nothing_to_prune():
    """A LoRA factor in the optimizer that no step gave a gradient (a layer no forward used, an expert no token
    reached) has no moments: the reset prunes the others exactly and leaves it (it raised, ending the run at its
    first reset; a review)."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(2)]
    adam = torch.optim.AdamW(ps)
    _one_step(adam, ps[:1])
    assert ps[1] not in adam.state
    want = {k: adam.state[ps[0]][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    stats = relora_ds.prune_optimizer_state(adam, ps, ratio=0.5)
    assert ps[1] not in adam.state and stats["exp_avg_sq"] == 0.5
    mask = _oracle_mask(want["exp_avg_sq"], 0.5)
    assert torch.equal(adam.state[ps[0]]["exp_avg_sq"], want["exp_avg_sq"].masked_fill(mask, 0.0))


def test_amsgrad_running_max_is_pruned_with_exp_avg_sq():
    """With amsgrad Adam divides by max(max_exp_avg_sq, exp_avg_sq): pruning exp_avg_sq alone would do
    nothing, so the running max is zeroed where exp_avg_sq is, not where exp_avg is. Gradients of mixed
    sign (a random direction each step) rank the two moments differently, so the two masks differ (with
    gradients of one sign they coincide, and a mutation pruning the max with exp_avg's mask survived)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(40, 10))
    opt = torch.optim.AdamW([p], amsgrad=True)
    for _ in range(3):
        opt.zero_grad()
        (p * torch.randn(40, 10)).sum().backward()
        opt.step()
    state = opt.state[p]
    sq = state["exp_avg_sq"].clone()
    relora_ds.prune_optimizer_state(opt, [p], method="magnitude", ratio=0.9)
    pruned = state["exp_avg_sq"] == 0
    assert int(pruned.sum()) == 360 and torch.equal(pruned, sq <= sq.flatten().kthvalue(360).values)
    assert not torch.equal(state["exp_avg"] == 0, pruned)  # the masks differ: the test can tell them apart
    assert torch.equal(state["max_exp_avg_sq"] == 0, pruned)


def test_mass_share_of_moments_that_hold_no_mass_is_zero():
    """A prune of moments that are already all zero (a second 'reset' with no step between) zeroes every
    entry but no L1 mass: {key}_mass is 0/0, reported as 0.0 (nothing held was lost), not 1.0 or NaN."""
    opt, a = _opt()
    relora_ds.prune_optimizer_state(opt, [a], "reset")
    assert relora_ds.prune_optimizer_state(opt, [a], "reset") == \
        {"exp_avg": 1.0, "exp_avg_sq": 1.0, "exp_avg_mass": 0.0, "exp_avg_sq_mass": 0.0}
