"""What a merge adds to the weights, for its record: ‖s·B·A‖_F and ‖W‖_F per layer (ReLoRALinear._merge_into
computes them before each merge), and their summary over the layers (merge_and_reinit's record)."""
from __future__ import annotations

import torch

from . import sharded


@torch.no_grad()
def update_norms(layer, base: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[float, float]:
    """(‖s·B·A‖_F, ‖W‖_F) of a merge about to happen: the first from the two r×r Gram matrices
    (‖BA‖² = Σ (BᵀB) ⊙ (AAᵀ), no out×in product) in float64, the second 1024 rows at a time in float32 (an
    int8 base dequantized so), summed in float64 (float32 on a device without it)."""
    acc = torch.float32 if base.device.type == "mps" else torch.float64
    A, B = A.detach().to(base.device, acc), B.detach().to(base.device, acc)
    delta = layer.scale * ((B.T @ B) * (A @ A.T)).sum().clamp_min(0).sqrt()
    scale = sharded.whole(layer.weight_scale).to(base.device, torch.float32)[:, None] if layer.quantize else None
    squares = torch.zeros((), dtype=acc, device=base.device)
    for start in range(0, base.shape[0], 1024):
        rows = base[start:start + 1024].float()
        squares += (rows if scale is None else rows * scale[start:start + 1024]).square().sum(dtype=acc)
    return delta.item(), squares.sqrt().item()


def update_stats(norms: list[tuple[float, float]]) -> dict:
    """A merge's record of what it added over its layers: the mean ‖s·B·A‖_F, and the mean and largest
    ‖s·B·A‖_F / ‖W‖_F ({} without layers)."""
    if not norms:
        return {}
    ratios = [delta / weight if weight > 0 else float("inf") for delta, weight in norms]
    return {"update_norm_mean": sum(d for d, _ in norms) / len(norms), "update_rel_mean": sum(ratios) / len(ratios),
            "update_rel_max": max(ratios)}
