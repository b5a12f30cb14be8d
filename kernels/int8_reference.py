"""Pure-torch twins of the int8 base-weight kernels: the specification, and the path of dequantization and
merges wherever Triton does not run (the int8 layer itself under ``RELORA_KERNELS=reference``; ``auto`` and
``torch`` run it on the BLAS path of torch_linear.py).

Storage of a frozen weight W (out, in):

- ``q`` int8 (out, in) in [-127, 127] and ``scale`` bf16 (out,): ``W ≈ q · scale[:, None]`` (per output
  channel, absmax: ``scale = max(bf16(max|W_row| / 127), 2^-126)``; an all-zero row's scale is 1). A bf16
  scale costs 2 bytes per row instead of 4, which keeps the frozen bytes ≤ 0.52× bf16 even at in_features =
  64 (debug preset); the quantizer divides by the *stored* scale, so its rounding changes the step by ≤ 2^-8
  (relative) and the error bound stays ``scale / 2``.
- ``residual`` int8 (out, in), optional, kept in host memory: the next 8 bits, ``W ≈ (q + residual/254) ·
  scale``. It is the error-feedback term of a merge: a merge requantizes the 16-bit-accurate value, so the
  int8 weight stays one rounding away from the exact fp32-accumulated weight (see relora_ds/quant.py).

Rounding is ``floor(v + 0.5)`` (half up) in both the twin and the Triton kernels, and the bf16 scale
rounding is round-to-nearest-even in both, and the kernels divide as IEEE does (``tl.div_rn``; a plain `/`
compiles to an approximate division on a GPU), so kernel and twin differ only where the fp32 products do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import lora_dropout

QMAX = 127
# The smallest normal bf16 (and fp32), 2^-126: the floor of a nonzero row's scale. Below it a bf16 scale is
# subnormal, with fewer significant bits (2^-133 holds one): its rounding broke the half-step error bound
# (codes saturated at 127, up to ~50 steps from the weight) and a GPU flushing subnormals would zero it.
MIN_SCALE = 2.0 ** -126
RES_STEPS = 254  # residual units per int8 step: residual ∈ [-127, 127] covers the ±0.5-step rounding error


def round_half_up(v: torch.Tensor) -> torch.Tensor:
    return torch.floor(v + 0.5)


def int8_scale(w32: torch.Tensor) -> torch.Tensor:
    """Per-row absmax scale of an fp32 (out, in) tensor, stored in bf16, at least MIN_SCALE (rows of absmax
    below 127·2^-126 ≈ 1.5e-36 get codes below 127); all-zero rows get scale 1."""
    absmax = w32.abs().amax(dim=1)
    s = (absmax / QMAX).to(torch.bfloat16).clamp_min(MIN_SCALE)
    return torch.where(absmax == 0, torch.ones_like(s), s)


def int8_quantize_reference(w: torch.Tensor, residual: bool = False):
    """W (out, in) float -> (q int8, scale bf16 (out,), residual int8 or None)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"int8_quantize_reference: expected a 2-D floating-point weight (out, in); got {w.dtype} "
                         f"{tuple(w.shape)}")
    w32 = w.detach().to(torch.float32)
    scale = int8_scale(w32)
    v = w32 / scale.float()[:, None]
    q = round_half_up(v).clamp_(-QMAX, QMAX)
    res = round_half_up((v - q) * RES_STEPS).clamp_(-QMAX, QMAX).to(torch.int8) if residual else None
    return q.to(torch.int8), scale, res


def int8_dequantize_reference(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                              residual: torch.Tensor | None = None) -> torch.Tensor:
    """``q · scale`` (or ``(q + residual/254) · scale``) as ``dtype``; computed in fp32 (exact for q·scale)."""
    v = q.to(torch.float32)
    if residual is not None:
        v = v + residual.to(device=q.device, dtype=torch.float32) / RES_STEPS
    return (v * scale.to(torch.float32)[:, None]).to(dtype)


@torch.no_grad()
def int8_merge_reference_(q, scale, residual, lora_A, lora_B, s):
    """In place ``(q, scale, residual) ← quantize(dequantize(q, scale, residual) + s·B·A)`` in fp32.

    ``residual`` None is the naive requantization (drifts, see relora_ds/quant.py); otherwise it is updated
    in place wherever it lives (host memory). Returns ``(q, scale, residual)``.
    """
    w = int8_dequantize_reference(q, scale, torch.float32, residual)
    w.add_(lora_B.to(device=q.device, dtype=torch.float32) @ lora_A.to(device=q.device, dtype=torch.float32),
           alpha=float(s))
    nq, nscale, nres = int8_quantize_reference(w, residual=residual is not None)
    q.copy_(nq)
    scale.copy_(nscale)
    if residual is not None:
        residual.copy_(nres)
    return q, scale, residual


class FrozenInt8Linear(torch.autograd.Function):
    """``x @ dequantize(q, scale).T (+ b)`` saving only the int8 weight for backward (dX only: W frozen)."""

    @staticmethod
    def forward(ctx, x, q, scale, bias):
        ctx.save_for_backward(q, scale)
        ctx.has_bias = bias is not None
        return F.linear(x, int8_dequantize_reference(q, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        q, scale = ctx.saved_tensors
        dx = dy @ int8_dequantize_reference(q, scale, dy.dtype) if ctx.needs_input_grad[0] else None
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dx, None, None, dbias


def int8_lora_linear_reference(x, q, w_scale, lora_A, lora_B, scale, bias=None, dropout_p=0.0, training=True,
                               generator=None):
    """``x @ (q·w_scale).T (+ b) + scale · dropout(x) @ A.T @ B.T``; the dequantized W is not kept."""
    xd = lora_dropout(x, dropout_p, training, generator)
    return FrozenInt8Linear.apply(x, q, w_scale, bias) + scale * F.linear(F.linear(xd, lora_A), lora_B)
