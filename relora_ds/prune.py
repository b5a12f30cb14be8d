"""Optimizer-state pruning at a ReLoRA reset (paper §3: prune ~99% of the LoRA parameters' Adam moments).

The masks are pure functions of a tensor (and a seed for `random`), so the ZeRO path (`zero_reset.py`)
can compute them on a gathered tensor and apply each rank's slice: pruning is then exactly what a single
process holding the whole tensor would do.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
METHODS = ("magnitude", "random", "reset")


def check_prune_args(method: str, ratio: float) -> None:
    if method not in METHODS:
        raise ValueError(f"prune method {method!r} is not valid; valid methods: {list(METHODS)}")
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"prune ratio={ratio} must be in [0, 1]")


def num_pruned(numel: int, ratio: float) -> int:
    return int(round(ratio * numel))


def magnitude_prune_mask(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask (same shape as t) of exactly round(ratio·numel) entries with the smallest |t|.

    Ties at the threshold are broken by flat index (lowest indices pruned first), so the mask is a
    well-defined function of the values. The threshold is the exact k-th smallest |t| from
    ``torch.kthvalue`` (``torch.quantile`` refuses inputs above ~16.7M elements).
    """
    flat = t.detach().reshape(-1).abs().float()
    n = flat.numel()
    k = num_pruned(n, ratio)
    if k == 0:
        return torch.zeros_like(flat, dtype=torch.bool).view(t.shape)
    if k >= n:
        return torch.ones_like(flat, dtype=torch.bool).view(t.shape)
    threshold = flat.kthvalue(k).values
    mask = flat < threshold
    need = k - int(mask.sum())
    if need > 0:
        ties = flat == threshold
        mask |= ties & (torch.cumsum(ties, 0) <= need)
    return mask.view(t.shape)


def random_prune_mask(shape: torch.Size, ratio: float, seed: int) -> torch.Tensor:
    """Mask of exactly round(ratio·numel) uniformly chosen entries, drawn on the CPU from ``seed``."""
    n = int(torch.Size(shape).numel())
    g = torch.Generator(device="cpu").manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[: num_pruned(n, ratio)]] = True
    return mask.view(shape)


def moment_masks(moments: dict, method: str, ratio: float, seed: int, joint: bool) -> dict:
    """{key: mask} for one parameter's Adam moments (``moments``: {key: whole tensor}); ``seed`` is the
    parameter's. Independent (the paper): each moment by its own values. ``joint``: one mask, from
    ``exp_avg``, for both, so no entry keeps its momentum while losing its second moment."""
    masks = {}
    for j, key in enumerate(MOMENT_KEYS):
        if joint and j > 0:
            masks[key] = masks[MOMENT_KEYS[0]]
        else:
            masks[key] = prune_mask(moments[key], method, ratio, seed=seed + j)
    return masks


def prune_mask(t: torch.Tensor, method: str, ratio: float, seed: int = 0) -> torch.Tensor:
    if method == "magnitude":
        return magnitude_prune_mask(t, ratio)
    if method == "random":
        return random_prune_mask(t.shape, ratio, seed).to(t.device)
    return torch.ones_like(t, dtype=torch.bool)  # reset


@torch.no_grad()
def prune_optimizer_state(optimizer, params: Iterable[torch.nn.Parameter], method: str = "magnitude",
                          ratio: float = 0.99, seed: int = 0, joint: bool = False) -> dict:
    """Zero, in place, the chosen fraction of each Adam moment of each given parameter.

    ``method``: 'magnitude' (smallest |value| per tensor), 'random', or 'reset' (all). Other parameters'
    state is untouched. Adam's ``step`` is deliberately left alone: DeepSpeed keeps it per flat param
    group, so it cannot be reset for the LoRA parameters alone, and the reference implementation does not
    reset it either; keeping it makes single-process and ZeRO runs identical. The restart warmup is what
    keeps the first updates after a reset small.

    ``joint=False`` (the paper): each moment is pruned by its own magnitudes, so an entry can keep exp_avg
    while losing exp_avg_sq (seen in tests/dist/zero_reset_worker.py). Right after a reset B = 0, so
    lora_A's gradient is exactly zero and such an entry's Adam update is ~lr·m/eps until v refills; only
    the restart warmup (LR from 0) keeps it small. ``joint=True`` zeroes exp_avg_sq exactly where exp_avg
    is zeroed (one mask, from exp_avg), which rules that case out.

    Accepts torch Adam/AdamW or a DeepSpeed engine (ZeRO-partitioned state, see zero_reset.py).
    Returns ``{key: fraction of entries zeroed}`` over all given params.
    """
    check_prune_args(method, ratio)
    params = list(params)
    if hasattr(optimizer, "zero_optimization_stage"):
        from .zero_reset import prune_engine_optimizer_state  # the one path that touches DeepSpeed internals

        return prune_engine_optimizer_state(optimizer, params, method, ratio, seed, joint)
    zeroed = dict.fromkeys(MOMENT_KEYS, 0)
    total = 0
    for i, p in enumerate(params):
        state = optimizer.state.get(p, {})
        if not all(k in state for k in MOMENT_KEYS):
            raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) has no Adam moments yet: prune after "
                             "the first optimizer step (optimizer state keys: "
                             f"{sorted(state)})")
        total += p.numel()
        masks = moment_masks({k: state[k] for k in MOMENT_KEYS}, method, ratio, seed + 1000003 * i, joint)
        for key in MOMENT_KEYS:
            state[key].masked_fill_(masks[key], 0.0)
            zeroed[key] += int(masks[key].sum())
    return {key: zeroed[key] / max(1, total) for key in MOMENT_KEYS}
