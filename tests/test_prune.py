"""Optimizer-state pruning against a sort-based oracle."""
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


def test_prune_optimizer_state_magnitude_only_given_params():
    opt, a, b, other = _adam_state()
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in (a, b, other)}
    stats = relora_ds.prune_optimizer_state(opt, [a, b], method="magnitude", ratio=0.9)
    for p in (a, b):
        for key in ("exp_avg", "exp_avg_sq"):
            expect = before[id(p)][key].masked_fill(_oracle_mask(before[id(p)][key], 0.9), 0.0)
            assert torch.equal(opt.state[p][key], expect)
        assert torch.equal(opt.state[p]["step"], before[id(p)]["step"])  # step untouched
    for key, v in opt.state[other].items():
        assert torch.equal(v, before[id(other)][key])
    n = a.numel() + b.numel()
    assert stats["exp_avg"] == pytest.approx((round(0.9 * a.numel()) + round(0.9 * b.numel())) / n)


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_joint_prune_one_mask_from_exp_avg(method):
    """joint=True: exp_avg_sq is zeroed exactly where exp_avg is (the exp_avg mask), never elsewhere."""
    opt, a, b, _ = _adam_state(seed=1)
    indep, _, _, _ = _adam_state(seed=1)
    # Noisy-gradient moments: |exp_avg| and exp_avg_sq order the entries differently (a few steps of one
    # smooth loss would give v ∝ m², the same order, and hide the difference between the two modes).
    g = torch.Generator().manual_seed(9)
    for p, q in zip((a, b), indep.param_groups[0]["params"][:2]):
        m, v = torch.randn(p.shape, generator=g), torch.rand(p.shape, generator=g) + 0.01
        opt.state[p]["exp_avg"].copy_(m), opt.state[p]["exp_avg_sq"].copy_(v)
        indep.state[q]["exp_avg"].copy_(m), indep.state[q]["exp_avg_sq"].copy_(v)
    before = {id(p): {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for p in (a, b)}
    relora_ds.prune_optimizer_state(indep, indep.param_groups[0]["params"][:2], method=method, ratio=0.9, seed=5)
    stats = relora_ds.prune_optimizer_state(opt, [a, b], method=method, ratio=0.9, seed=5, joint=True)
    for i, p in enumerate((a, b)):
        m0, v0 = before[id(p)]["exp_avg"], before[id(p)]["exp_avg_sq"]
        mask = (_oracle_mask(m0, 0.9) if method == "magnitude" else
                random_prune_mask(m0.shape, 0.9, seed=5 + 1000003 * i))
        assert torch.equal(opt.state[p]["exp_avg"], m0.masked_fill(mask, 0.0))
        assert torch.equal(opt.state[p]["exp_avg_sq"], v0.masked_fill(mask, 0.0))
        # No entry keeps momentum without its second moment (every exp_avg_sq was > 0 before).
        assert not ((opt.state[p]["exp_avg"] != 0) & (opt.state[p]["exp_avg_sq"] == 0)).any()
    assert stats["exp_avg"] == stats["exp_avg_sq"]
    # The default (the paper) prunes exp_avg with the same mask but exp_avg_sq by its own values.
    ib = indep.param_groups[0]["params"][1]
    assert torch.equal(indep.state[ib]["exp_avg"], opt.state[b]["exp_avg"])
    assert not torch.equal(indep.state[ib]["exp_avg_sq"], opt.state[b]["exp_avg_sq"])
    if method == "magnitude":
        assert torch.equal(indep.state[ib]["exp_avg_sq"], before[id(b)]["exp_avg_sq"].masked_fill(
            _oracle_mask(before[id(b)]["exp_avg_sq"], 0.9), 0.0))


def test_random_and_reset_modes():
    opt, a, b, _ = _adam_state()
    relora_ds.prune_optimizer_state(opt, [a], method="random", ratio=0.75, seed=3)
    for key in ("exp_avg", "exp_avg_sq"):
        assert int((opt.state[a][key] == 0).sum()) == round(0.75 * a.numel())
    m1, m2 = random_prune_mask((100,), 0.3, seed=1), random_prune_mask((100,), 0.3, seed=1)
    assert torch.equal(m1, m2) and int(m1.sum()) == 30
    assert not torch.equal(m1, random_prune_mask((100,), 0.3, seed=2))
    stats = relora_ds.prune_optimizer_state(opt, [b], method="reset")
    assert stats == {"exp_avg": 1.0, "exp_avg_sq": 1.0}
    assert torch.count_nonzero(opt.state[b]["exp_avg"]) == 0


def test_bad_arguments():
    opt, a, _, _ = _adam_state()
    with pytest.raises(ValueError, match=r"ratio=1.5 must be in \[0, 1\]"):
        relora_ds.prune_optimizer_state(opt, [a], ratio=1.5)
    with pytest.raises(ValueError, match="valid methods"):
        relora_ds.prune_optimizer_state(opt, [a], method="l1")
    fresh = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="after the first optimizer step"):
        relora_ds.prune_optimizer_state(torch.optim.AdamW([fresh]), [fresh])
