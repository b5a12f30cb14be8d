"""Optimizer-state pruning at a ReLoRA reset (paper §3: prune ~99% of the LoRA parameters' Adam moments).

The masks are pure functions of a tensor (and a seed for `random`), so the ZeRO path (`zero_reset.py`)
can compute them on a gathered tensor and apply each rank's slice: pruning is then exactly what a single
process holding the whole tensor would do.
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable

import torch

from . import sharded
from .relora import is_deepspeed_engine

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
METHODS = ("magnitude", "random", "reset")


def check_prune_args(method: str, ratio: float) -> None:
    if method not in METHODS:
        raise ValueError(f"prune method {method!r} is not valid; valid methods: {list(METHODS)}")
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"prune ratio={ratio!r} must be a number in [0, 1]")


def num_pruned(numel: int, ratio: float) -> int:
    return int(round(ratio * numel))


def magnitude_prune_mask(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask (same shape as t) of exactly round(ratio·numel) entries with the smallest |t|.

    Ties at the threshold are broken by flat index (lowest indices pruned first), so the mask is a
    well-defined function of the values; NaN ranks above every value (+inf too), as in ``torch.sort``.
    The threshold is the exact k-th smallest |t| from ``torch.kthvalue`` (``torch.quantile`` refuses
    inputs above ~16.7M elements).
    """
    flat = t.detach().reshape(-1).abs()
    if flat.dtype != torch.float64:  # 16-bit ranks in fp32; fp64 keeps the differences fp32 would round away
        flat = flat.float()
    n = flat.numel()
    k = num_pruned(n, ratio)
    if k == 0:
        return torch.zeros_like(flat, dtype=torch.bool).view(t.shape)
    if k >= n:
        return torch.ones_like(flat, dtype=torch.bool).view(t.shape)
    if flat.isnan().any():
        # NaN ranks above every value, as torch.sort orders it (kthvalue's threshold would be NaN, nothing below
        # it: the prune zeroed no entry); a stable sort, on this rare path only, keeps the ties' flat order.
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.sort(flat, stable=True).indices[:k]] = True
        return mask.view(t.shape)
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
    parameter's. Either way no entry keeps its momentum without its second moment:

    - independent (``joint=False``, the paper), 'magnitude': each moment is pruned by its own values, then
      exp_avg is also zeroed wherever exp_avg_sq is. exp_avg_sq's mask is the paper's; exp_avg's is its own
      mask united with exp_avg_sq's, so more than ``ratio`` of exp_avg is zeroed (the two kept sets overlap
      little: exp_avg keeps 0.11-0.26% instead of 1% at ratio 0.99 at the demo's resets, BENCHMARKS.md).
    - 'random': one mask (the first moment's seed) for both, ``joint`` or not. Values play no part, so two
      draws differ only in the guard's cost: uniting two independent masks would keep (1 - ratio)^2 of
      exp_avg (0.01% at 0.99) instead of 1 - ratio. Each moment keeps exactly 1 - ratio, as in the paper.
    - ``joint``: one mask, from exp_avg, for both.

    Why the guard: right after a reset B = 0, so lora_A's gradient is exactly 0 and a zeroed exp_avg_sq
    stays 0; an entry keeping exp_avg then moves by ~lr·m/eps per step. Measured without the guard
    (BENCHMARKS.md "Optimizer-state pruning"): one step at lr 2e-4 after a reset moved max|A| 0.125 -> 21.3
    and the next gradient norm 1.29 -> 15.2 (debug preset, one process: tests/test_prune.py); on 2 ZeRO-2
    ranks with a 2-step restart warmup the global norm went 2.1 -> 35.7 (clipping then shrank every other
    parameter's step ~17x). The restart warmup does not prevent it.
    """
    masks = {}
    for j, key in enumerate(MOMENT_KEYS):
        if (joint or method == "random") and j > 0:
            masks[key] = masks[MOMENT_KEYS[0]]
        else:
            masks[key] = prune_mask(moments[key], method, ratio, seed=seed + j)
    if not joint and method != "random":
        masks["exp_avg"] = masks["exp_avg"] | masks["exp_avg_sq"]
    return masks


class PruneTally:
    """What a prune zeroed over its tensors: per moment the share of entries and the share of its L1 mass
    (Σ|m| zeroed / Σ|m|; magnitude pruning zeroes 99% of the entries but less of the mass)."""

    def __init__(self):
        self.total = 0
        self.zeroed = dict.fromkeys(MOMENT_KEYS, 0)
        self.mass = {key: [0.0, 0.0] for key in MOMENT_KEYS}  # (zeroed, all)

    @torch.no_grad()
    def add(self, moments: dict, masks: dict, numel: int) -> None:
        """Before the masks are applied: `moments` and `masks` whole tensors."""
        self.total += numel
        for key in MOMENT_KEYS:
            size = moments[key].abs()
            self.zeroed[key] += int(masks[key].sum())
            self.mass[key][0] += float((size * masks[key]).sum(dtype=torch.float64))
            self.mass[key][1] += float(size.sum(dtype=torch.float64))

    def stats(self) -> dict:
        return {**{key: self.zeroed[key] / max(1, self.total) for key in MOMENT_KEYS},
                **{f"{key}_mass": zeroed / mass if mass > 0 else 0.0 for key, (zeroed, mass) in self.mass.items()}}


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
    state is untouched. Adam's ``step`` is deliberately left alone, as the reference implementation leaves
    it (DeepSpeed keeps one per flat param group; the trainer's LoRA factors have a group of their own, so it
    could be reset there, but then the run would differ from the reference's): for a steady gradient, a pruned
    lora_B entry's first move, at the step after the reset's lr-0 step (which seeds both moments), is then
    ~4.2·lr once the step count is in the thousands ((1-β1²)/√(1-β2²) at the default betas; lora_A's, a step
    later, ~3.2·lr: its gradient is 0 until B moves); README, "The step at lr 0 after a reset".

    ``joint=False`` (the paper): each moment is pruned by its own magnitudes, and exp_avg is also zeroed
    wherever exp_avg_sq is (``moment_masks``): an entry keeping exp_avg without exp_avg_sq would move lora_A
    by ~lr·m/eps per step after the reset (B = 0 makes lora_A's gradient exactly zero, so exp_avg_sq does
    not refill), and the restart warmup does not keep that small (measured in ``moment_masks``).
    'random' draws one mask for both moments (two draws and the guard would zero all but (1 - ratio)^2 of
    exp_avg). ``joint=True`` uses one mask, from exp_avg, for both moments.

    ``seed`` draws the 'random' masks: pass a new one at each reset (the trainer passes seed + step), or
    every reset zeroes the same entries.

    Accepts torch Adam/AdamW (also with FSDP2's sharded DTensor state) or a DeepSpeed engine
    (ZeRO-partitioned state, see zero_reset.py); all use ``moment_masks`` on whole tensors, so the results
    are identical.
    Returns ``{key: fraction of entries zeroed}`` over all given params (independent mode: exp_avg's
    fraction is at least exp_avg_sq's, since it includes exp_avg_sq's mask; each tensor prunes
    round(ratio·numel) entries, so a fraction may sit just below ``ratio`` on small tensors), and
    ``{key}_mass``: the share of each moment's L1 mass zeroed (``PruneTally``); for an engine also ``prune_seconds`` and
    ``prune_comm_bytes`` (the bytes its gathers moved, 0 on one rank).
    """
    check_prune_args(method, ratio)
    if isinstance(optimizer, torch.nn.Module) and not is_deepspeed_engine(optimizer):
        raise ValueError(f"prune_optimizer_state: the first argument is the model ({type(optimizer).__name__}); pass "
                         "the optimizer (or the DeepSpeed engine), then the LoRA parameters: "
                         "prune_optimizer_state(opt, relora_ds.lora_parameters(model))")
    if isinstance(params, torch.nn.Module):
        raise ValueError(f"prune_optimizer_state: params is a module ({type(params).__name__}); pass its LoRA "
                         "parameters, relora_ds.lora_parameters(model) (the other parameters' moments are kept)")
    params = list(params)
    if is_deepspeed_engine(optimizer):
        from .zero_reset import prune_engine_optimizer_state  # the one path that touches DeepSpeed internals

        return prune_engine_optimizer_state(optimizer, params, method, ratio, seed, joint)
    if params:
        from .merge import check_not_engine_managed
        check_not_engine_managed(params[0], "prune_optimizer_state")
    if type(optimizer).__module__.startswith("deepspeed.runtime"):  # ZeRO / bf16 / fp16 optimizer wrappers
        raise ValueError(f"prune_optimizer_state: got DeepSpeed's {type(optimizer).__name__}; pass the engine "
                         "itself (relora_ds.prune_optimizer_state(engine, ...)), whose moments ZeRO partitions")
    tally = PruneTally()
    held = {id(q) for g in optimizer.param_groups for q in g["params"]}
    started = any(len(st) for st in optimizer.state.values())
    pruned = []
    for i, p in enumerate(params):  # every parameter checked before any moment is zeroed
        state = optimizer.state.get(p, {})
        if not state and started and id(p) in held:
            continue  # never had a gradient (a layer no forward used, an expert no token reached): nothing to prune
        if not all(k in state for k in MOMENT_KEYS):
            raise ValueError(_no_moments(optimizer, i, p, state))
        pruned.append((i, p, state))
    for i, p, state in pruned:
        # FSDP2's moments are DTensors: the masks of the whole tensors (gathered), each rank zeroing its shard
        whole = {k: sharded.whole(state[k]) for k in MOMENT_KEYS}
        masks = moment_masks(whole, method, ratio, seed + 1000003 * i, joint)
        tally.add(whole, masks, p.numel())
        for key in MOMENT_KEYS:
            state[key].masked_fill_(sharded.shard_of(state[key], masks[key]), 0.0)
        if "max_exp_avg_sq" in state:  # amsgrad: its running max would otherwise keep the pruned entries
            state["max_exp_avg_sq"].masked_fill_(sharded.shard_of(state["max_exp_avg_sq"], masks["exp_avg_sq"]), 0.0)
    return tally.stats()


def _no_moments(optimizer, i: int, p: torch.Tensor, state: dict) -> str:
    """Why parameter ``i`` has no Adam moments, for the error."""
    where = f"prune_optimizer_state: parameter {i} (shape {tuple(p.shape)})"
    name = type(optimizer).__name__
    if state:
        return (f"{where} has optimizer state {sorted(state)}, not the Adam moments {list(MOMENT_KEYS)}: ReLoRA "
                f"prunes Adam/AdamW moments, and {name} keeps none")
    if not p.requires_grad:
        return (f"{where} is frozen (requires_grad=False: a ReLoRA layer's base weight?) and has no Adam moments; "
                "pass the LoRA parameters, relora_ds.lora_parameters(model)")
    if "betas" not in getattr(optimizer, "defaults", {"betas": None}):
        return f"{where} has no optimizer state: ReLoRA prunes Adam/AdamW moments, and {name} keeps none"
    if not sharded.is_sharded(p) and any(sharded.is_sharded(q) for g in optimizer.param_groups for q in g["params"]):
        return (f"{where} is a whole tensor, but the optimizer holds FSDP2's shards (DTensors): the model's FSDP2 "
                "modules are unsharded (after a forward with reshard_after_forward=False, or at the root); take "
                "the parameters after relora_ds.merge_and_reinit(model), which reshards, or after model.reshard()")
    if any(len(st) for st in optimizer.state.values()):
        return (f"{where} is not in this optimizer's param groups, which hold other parameters' moments (an "
                "optimizer built before relora_ds.wrap holds the replaced layers' old weights, not the LoRA "
                "factors: build it after wrap)")
    return f"{where} has no Adam moments yet: prune after the first optimizer step"
