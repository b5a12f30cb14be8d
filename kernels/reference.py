"""Pure-torch twins of the kernels: the specification, and the path of a merge wherever Triton does not run
(the layer's forward and backward take it under ``RELORA_KERNELS=reference``; ``auto`` and ``torch`` run the
layer on the BLAS path of torch_linear.py).

``lora_linear_reference(x, W, A, B, s, b)`` is exactly
``F.linear(x, W, b) + s * F.linear(F.linear(dropout(x), A), B)``, autograd included.
``lora_merge_reference_(W, A, B, s)`` is ``W <- round(fp32(W) + s * fp32(B) @ fp32(A))``.

The dropout mask comes from :func:`dropout_keep_mask`, shared with the Triton path, so that the same
``generator`` state gives the same mask on both paths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_dropout_p(dropout_p: float) -> float:
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p={dropout_p!r} must be in [0, 1)")
    return p


def check_scale(scale, op: str) -> float:
    """The LoRA scale is a constant of the layer: the Triton and BLAS paths take it as a float, so a tensor
    that requires grad would get no gradient there (the twin would give it one); refused on every path.
    Returns it as a float, which every path then takes: a one-element tensor kept as such would promote a
    bf16 output to its own dtype and broadcast a 1-D x's output to its own dimensions on the twin."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"{op}: scale must be a number or a one-element tensor; got shape {tuple(scale.shape)}")
        if scale.requires_grad:
            raise ValueError(f"{op}: scale is a tensor that requires grad, but the kernels take it as a constant "
                             "(no gradient reaches it on the Triton and BLAS paths); pass a float or scale.detach()")
    return float(scale)


def dropout_keep_mask(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean keep-mask shaped like ``x``: True with probability ``1 - p``.

    Drawn in fp32 whatever ``x``'s dtype, so an fp64 reference sees the same mask as a bf16 run.
    """
    return torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32) >= p


def lora_dropout(x: torch.Tensor, p: float, training: bool, generator: torch.Generator | None = None,
                 ) -> torch.Tensor:
    """Inverted dropout, like ``F.dropout``, but with the mask from :func:`dropout_keep_mask`."""
    p = check_dropout_p(p)
    if not training or p == 0.0:
        return x
    keep = dropout_keep_mask(x, p, generator)
    return x * keep.to(x.dtype) / (1.0 - p)


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                          scale: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0,
                          training: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x @ W.T (+ b) + scale * dropout(x) @ A.T @ B.T`` with x (..., in), W (out, in), A (r, in), B (out, r)."""
    xd = lora_dropout(x, dropout_p, training, generator)
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(xd, lora_A), lora_B)


def differentiable_backward(dy, x, weight, lora_A, lora_B, scale, keep=None, keep_scale=1.0):
    """(dx, dA, dB) of ``y = x·Wᵀ + s·((x⊙keep)·keep_scale)·Aᵀ·Bᵀ`` for x, dy (M, ·), in torch ops: what the
    custom autograd Functions return under ``create_graph=True`` (a gradient penalty, Hessian-vector
    products), where their launches and in-place BLAS epilogues would carry no graph and every second-order
    term through them would silently be zero. ``x`` must be the Function's own input (or a view of it), not
    a copy made in forward; S is recomputed. ``weight``: the float weight (an int8 base dequantized)."""
    xm = x if keep is None else x * keep.to(x.dtype) * keep_scale
    s = xm @ lora_A.t()
    ds = (dy @ lora_B) * scale
    dxm = ds @ lora_A
    if keep is not None:
        dxm = dxm * keep.to(dxm.dtype) * keep_scale
    return dy @ weight + dxm, ds.t() @ xm, (dy.t() @ s) * scale


@torch.no_grad()
def lora_merge_reference_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """In place ``W += scale * B @ A``, accumulated in fp32 (float64 for a float64 W) and rounded once to W's
    dtype."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    delta = lora_B.to(acc) @ lora_A.to(acc)  # (out, in)
    weight.copy_(weight.to(acc).add_(delta, alpha=float(scale)))
    return weight
