"""The ReLoRA linear as a chain of BLAS calls with the additions folded into GEMM epilogues (no Triton).

Same maths as :func:`relora_kernels.lora_linear_reference` (the twin), fewer passes over the big
activations. With M tokens, the reference (PEFT-style autograd) moves these M x out / M x in tensors:

    forward   Y0 = X W^T, L = S B^T, s·L, Y0 + s·L                      4 writes, 3 reads
    backward  s·dY, dX0 = dY W, dXl = dS A, dX0 + dXl                   3 writes, 3 reads (+ dY reads)

This path computes ``C = b + s·S B^T`` and then ``C += X W^T`` in place (BLAS beta=1: C is read once in
the GEMM epilogue), and ``dX = dS A``, then ``dX += dY W`` in place; the scale lands on the rank-r tensors
(dS, dB), never on an M x out one:

    forward   C, then C += X W^T                                         2 writes, 1 read
    backward  T = dS A, then T += dY W                                   2 writes, 1 read

Under a Python dispatch mode (selective activation checkpointing keeps product outputs, which must not be
written afterwards) or while torch.compile traces, the forward runs out of place instead (_side_then_base).

Saved for backward: X, S (M x r) and the dropout keep-mask (1 B per element) instead of the reference's
X, dropout(X) and X A^T. Used by ``RELORA_KERNELS=auto`` wherever Triton is not (see ``_runtime``).

Merged-weight variant (``merged_weight=True``, no dropout): ``Y = X·W_effᵀ + b`` and ``dX = dY·W_eff`` with
``W_eff = W + s·B·A`` built per call (out × in, one read of W and one write, rounded once to W's dtype;
rebuilt in backward, never saved). The two big products are then plain GEMMs with no M x out / M x in
side pass at all; S = X·Aᵀ is still computed (dB needs it). The low-rank term reaches Y through W_eff's
rounding (in bf16: up to 2^-8 of |W| per element, the same as a merged bf16 model), not through an fp32
accumulator as in the other paths.

Which variant is cheaper depends on the token count M, so by default (:func:`use_merged_weight`) the merged one
runs only where it does fewer multiply-adds. Both compute S = X·Aᵀ, and in training dS = dY·B, dA and dB;
beyond those, the epilogue chain does the side products S·Bᵀ (M·out·r) and, in training, dS·A (M·in·r),
and the merged variant builds W_eff (in·out·r) in forward and again in backward. So merged is cheaper when
M·(in + out) >= 2·in·out in training (M at least the harmonic mean of in and out) and M >= in in a forward
without autograd. Measured on CPU, layer alone, fwd+bwd (BENCHMARKS.md "Which variant, by token count";
launch/bench_torch_linear.py): in fp32, native bf16 and fallback bf16 the crossover lies between 1 and 2
times that M; at a quarter of it the merged variant took 1.04-1.87x the epilogue chain's time.
"""
from __future__ import annotations

import torch

from ._runtime import autocast_inputs, layer_output, merged_weight_env, traced
from .int8_reference import int8_dequantize_reference, int8_lora_linear_reference
from .reference import check_dropout_p, differentiable_backward, dropout_keep_mask, lora_linear_reference


# Device types on which lora_linear_torch may take the merged-weight variant (where it does fewer
# multiply-adds: use_merged_weight), a measured choice (BENCHMARKS.md "The torch paths on CPU"). Not CUDA:
# on the H200 (2026-12-04, whole steps, interleaved) it was 2.7% faster than the epilogue chain at 1b and
# 1.1% slower at 350m, and in bf16 it rounds the low-rank term into W_eff's bf16 grid (BENCHMARKS.md "H200").
# RELORA_MERGED_WEIGHT=0/1 overrides it: never / always.
MERGED_WEIGHT = {"cpu": True}


def merged_weight_default(device: torch.device) -> bool | None:
    """``RELORA_MERGED_WEIGHT`` when set (True: always merged, False: never); else None where the device type
    may take the merged variant (the choice is then made per call by its cost), False where it may not."""
    env = merged_weight_env()
    if env is not None:
        return env
    return None if MERGED_WEIGHT.get(device.type, False) else False


def merged_is_cheaper(m: int, d_in: int, d_out: int, backward: bool) -> bool:
    """Whether building W_eff = W + s·B·A (in·out·r multiply-adds, twice with a backward) costs no more than
    the epilogue chain's side products (M·out·r, and M·in·r in backward); see the module docstring."""
    return m * (d_in + d_out) >= 2 * d_in * d_out if backward else m >= d_in


def use_merged_weight(x, weight_shape, merged_weight, others) -> bool:
    """The variant for one call: ``merged_weight`` if not None, else ``RELORA_MERGED_WEIGHT``, else
    :func:`merged_is_cheaper` on x's token count where :data:`MERGED_WEIGHT` allows it. ``others``: the
    call's other inputs (whether autograd will run a backward)."""
    if merged_weight is not None:
        return bool(merged_weight)
    default = merged_weight_default(x.device)
    if default is not None:
        return default
    d_out, d_in = weight_shape
    backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *others))
    return merged_is_cheaper(x.numel() // max(d_in, 1), d_in, d_out, backward)


def _w_eff(weight, lora_A, lora_B, scale):
    return torch.addmm(weight, lora_B, lora_A, alpha=scale)


def _side_then_base(s, lora_B, x2, weight, bias, scale):
    """``Y = b + s·S Bᵀ + X Wᵀ``: ``C = b + s·S Bᵀ`` (bias broadcast by addmm), then ``C += X Wᵀ`` in place
    (BLAS beta=1: C read once in the GEMM's epilogue). Under selective activation checkpointing, which keeps
    the big product's output as made (a kept tensor must not be written afterwards), out of place instead:
    ``Y = C + X Wᵀ`` into a new buffer, ``C = S Bᵀ`` unscaled and the scale on beta where there is no bias.
    addmm first copies C into Y there: with a bias one more M x out read and write than in place."""
    if traced():
        if bias is not None:
            return torch.addmm(torch.addmm(bias, s, lora_B.t(), alpha=scale), x2, weight.t())
        return torch.addmm(torch.mm(s, lora_B.t()), x2, weight.t(), beta=scale)
    y = torch.addmm(bias, s, lora_B.t(), alpha=scale) if bias is not None else torch.mm(s, lora_B.t()).mul_(scale)
    return y.addmm_(x2, weight.t())


class MergedLoRALinearFunction(torch.autograd.Function):
    """``X·(W + s·B·A)ᵀ + b`` with W frozen (no dropout): two plain GEMMs and rank-r side products."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scale):
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in)
        s = torch.mm(x2, lora_A.t())
        w_eff = _w_eff(weight, lora_A, lora_B, scale)
        y = torch.addmm(bias, x2, w_eff.t()) if bias is not None else torch.mm(x2, w_eff.t())
        ctx.save_for_backward(x, s, weight, lora_A, lora_B)  # x itself: see reference.differentiable_backward
        ctx.scale, ctx.x_shape, ctx.has_bias = scale, x.shape, bias is not None
        return layer_output(y, x.shape, weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, s, weight, lora_A, lora_B = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dw = torch.mm(dy2.t(), x2) if need_w else None
        dbias = dy2.sum(0) if need_bias and ctx.has_bias else None
        if torch.is_grad_enabled():  # create_graph=True: the in-place epilogues below would carry no graph
            dx, da, db = differentiable_backward(dy2, x2, weight, lora_A, lora_B, ctx.scale)
            return dx.reshape(ctx.x_shape), dw, da, db, dbias, None
        dx = da = db = None
        if need_a:
            da = torch.mm(torch.mm(dy2, lora_B).mul_(ctx.scale).t(), x2)
        if need_b:
            db = torch.mm(dy2.t(), s).mul_(ctx.scale)
        if need_x:
            dx = torch.mm(dy2, _w_eff(weight, lora_A, lora_B, ctx.scale)).reshape(ctx.x_shape)
        return dx, dw, da, db, dbias, None


class MergedInt8LoRALinearFunction(torch.autograd.Function):
    """The int8-base layer through BLAS: the dequantized weight ``q·scale`` is one buffer, built in forward
    and again in backward (only the int8 weight is saved). ``merged``: ``s·B·A`` is added into that buffer
    (the merged-weight variant); else the low-rank term rides on the side products ``S·Bᵀ`` and ``dS·A``,
    added in place as the epilogue chain does (the cheaper one per :func:`merged_is_cheaper`)."""

    @staticmethod
    def forward(ctx, x, q, w_scale, lora_A, lora_B, bias, scale, merged=True):
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in)
        s = torch.mm(x2, lora_A.t())
        w = int8_dequantize_reference(q, w_scale, x.dtype)
        if merged:  # w is this call's own dequantized buffer: writing it is safe under selective checkpointing
            w.addmm_(lora_B, lora_A, alpha=scale)
        y = torch.addmm(bias, x2, w.t()) if bias is not None else torch.mm(x2, w.t())
        if not merged:  # Y += s·S Bᵀ; out of place under selective checkpointing, which keeps X Wᵀ (_side_then_base)
            y = torch.addmm(y, s, lora_B.t(), alpha=scale) if traced() else y.addmm_(s, lora_B.t(), alpha=scale)
        ctx.save_for_backward(x, s, q, w_scale, lora_A, lora_B)  # x itself: see reference.differentiable_backward
        ctx.scale, ctx.x_shape, ctx.has_bias, ctx.merged = scale, x.shape, bias is not None, merged
        return layer_output(y, x.shape, q.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, s, q, w_scale, lora_A, lora_B = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        need_x, _, _, need_a, need_b, need_bias = ctx.needs_input_grad[:6]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dbias = dy2.sum(0) if need_bias and ctx.has_bias else None
        if torch.is_grad_enabled():  # create_graph=True: the in-place epilogues below would carry no graph
            w = int8_dequantize_reference(q, w_scale, dy.dtype)
            dx, da, db = differentiable_backward(dy2, x2, w, lora_A, lora_B, ctx.scale)
            return dx.reshape(ctx.x_shape), None, None, da, db, dbias, None, None
        dx = da = db = None
        ds = torch.mm(dy2, lora_B).mul_(ctx.scale) if need_a or (need_x and not ctx.merged) else None
        if need_a:
            da = torch.mm(ds.t(), x2)
        if need_b:
            db = torch.mm(dy2.t(), s).mul_(ctx.scale)
        if need_x:
            w = int8_dequantize_reference(q, w_scale, dy.dtype)
            if ctx.merged:
                dx = torch.mm(dy2, w.addmm_(lora_B, lora_A, alpha=ctx.scale))
            else:
                dx = torch.mm(ds, lora_A).addmm_(dy2, w)
            dx = dx.reshape(ctx.x_shape)
        return dx, None, None, da, db, dbias, None, None


def int8_lora_linear_torch(x, q, w_scale, lora_A, lora_B, scale, bias=None, dropout_p=0.0, training=True,
                           generator=None, merged_weight=None):
    """The int8-base layer through BLAS only (``merged_weight`` as in :func:`lora_linear_torch`); with a
    dropout mask drawn, or mixed dtypes, the twin (``int8_lora_linear_reference``) runs instead."""
    p = check_dropout_p(dropout_p)
    x, lora_A, lora_B, bias = autocast_inputs(x.device.type, x, lora_A, lora_B, bias)
    same = len({t.dtype for t in (x, lora_A, lora_B, bias) if t is not None}) == 1
    if (training and p > 0.0) or not same:
        return int8_lora_linear_reference(x, q, w_scale, lora_A, lora_B, scale, bias, p, training, generator)
    merged = use_merged_weight(x, q.shape, merged_weight, (lora_A, lora_B, bias))
    with torch.autocast(x.device.type, enabled=False):
        return MergedInt8LoRALinearFunction.apply(x, q, w_scale, lora_A, lora_B, bias, float(scale), merged)


class TorchLoRALinearFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scale, keep, inv_keep):
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in)
        keep2 = keep.reshape(-1, d_in) if keep is not None else None
        xd = x2 if keep2 is None else x2 * keep2  # the masked copy lives only inside forward
        s = torch.mm(xd, lora_A.t())
        if keep2 is not None:
            s = s * inv_keep  # M x r, out of place: S may be kept by selective checkpointing (_side_then_base)
        y = _side_then_base(s, lora_B, x2, weight, bias, scale)
        ctx.save_for_backward(x, s, weight, lora_A, lora_B, keep2)  # x itself: see reference.differentiable_backward
        ctx.scale, ctx.inv_keep, ctx.x_shape, ctx.has_bias = scale, inv_keep, x.shape, bias is not None
        return layer_output(y, x.shape, weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, s, weight, lora_A, lora_B, keep2 = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dw = torch.mm(dy2.t(), x2) if need_w else None
        dbias = dy2.sum(0) if need_bias and ctx.has_bias else None
        if torch.is_grad_enabled():  # create_graph=True: the in-place epilogues below would carry no graph
            dx, da, db = differentiable_backward(dy2, x2, weight, lora_A, lora_B, ctx.scale, keep2,
                                                 ctx.inv_keep if keep2 is not None else 1.0)
            return dx.reshape(ctx.x_shape), dw, da, db, dbias, None, None, None
        dx = da = db = None
        ds = torch.mm(dy2, lora_B).mul_(ctx.scale) if (need_x or need_a) else None
        if need_b:
            db = torch.mm(dy2.t(), s).mul_(ctx.scale)
        if need_a:
            xd = x2 if keep2 is None else x2 * keep2
            da = torch.mm(ds.t(), xd)
            if keep2 is not None:
                da.mul_(ctx.inv_keep)
        if need_x:
            dx = torch.mm(ds, lora_A)
            if keep2 is not None:
                dx.mul_(keep2).mul_(ctx.inv_keep)
            dx.addmm_(dy2, weight)
            dx = dx.reshape(ctx.x_shape)
        return dx, dw, da, db, dbias, None, None, None


def lora_linear_torch(x, weight, lora_A, lora_B, scale, bias=None, dropout_p=0.0, training=True, generator=None,
                      merged_weight=None):
    """``x @ W.T (+ b) + scale * dropout(x) @ A.T @ B.T`` through BLAS with fused epilogues; autograd-aware.

    Tensors must share one dtype (under autocast they are cast first as F.linear's would be,
    :func:`autocast_inputs`); mixed dtypes or devices go to the reference twin, so they fail or work exactly as plain F.linear.
    ``merged_weight``: the merged-weight variant, used when no dropout mask is drawn (None: per
    ``RELORA_MERGED_WEIGHT``, else where it is the cheaper one on a device type :data:`MERGED_WEIGHT` allows,
    :func:`use_merged_weight`).
    """
    p = check_dropout_p(dropout_p)
    x, weight, lora_A, lora_B, bias = autocast_inputs(x.device.type, x, weight, lora_A, lora_B, bias)
    tensors = [t for t in (x, weight, lora_A, lora_B, bias) if t is not None]
    if len({t.dtype for t in tensors}) > 1 or len({t.device for t in tensors}) > 1:
        return lora_linear_reference(x, weight, lora_A, lora_B, scale, bias, p, training, generator)
    keep = dropout_keep_mask(x, p, generator) if (training and p > 0.0) else None  # bool: 1 B per element
    inv_keep = 1.0 / (1.0 - p) if keep is not None else 1.0
    with torch.autocast(x.device.type, enabled=False):
        if keep is None and use_merged_weight(x, weight.shape, merged_weight, (weight, lora_A, lora_B, bias)):
            return MergedLoRALinearFunction.apply(x, weight, lora_A, lora_B, bias, float(scale))
        return TorchLoRALinearFunction.apply(x, weight, lora_A, lora_B, bias, float(scale), keep, inv_keep)
