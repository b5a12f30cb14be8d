"""int8 frozen base weights: the fused LoRA linear on an int8 weight, and the one-kernel drift-free merge.

Storage and rounding: see :mod:`relora_kernels.int8_reference` (the twins). Two ways to run the linear,
chosen by :data:`IN_GEMM_DEQUANT` (benchmark providers ``int8_scratch`` and ``int8_gemm`` in
launch/bench_int8.py):

- scratch (default): ``_dequant_kernel`` writes ``W = q · scale`` into a bf16/fp16/fp32 buffer, then the
  fused bf16 LoRA kernels (kernels/linear.py) run unchanged. The scratch (out × in × 2 B) lives only inside
  one layer's forward or backward: autograd saves the int8 weight, and backward dequantizes again. Cost:
  one read of int8 + one write and read of bf16 W, ≈2–4% of the GEMM at M ≥ 8k tokens.
- in-GEMM: the concatenated-K GEMM loads int8 weight tiles and converts them in registers
  (kernels/matmul.py ``B1_SCALE``): the forward applies the per-output-channel scale in the epilogue (before
  the low-rank term joins the accumulator), dX multiplies each weight-tile row by its scale. No scratch
  buffer and half the weight bytes per tile; the conversion sits in the GEMM's inner loop instead (public
  Hopper numbers for Triton int8×bf16 GEMMs: 40–65% of bf16).

Measured (H100, bf16, M=16384, r=128, launch/bench_int8.py, scratch): fused fwd+bwd speed vs the bf16 base
0.967–0.974 at 4096², 0.989 at 2048×5461, 0.76–0.94 at 2048² (1.3 ms calls, noisy between runs); dequant
22 µs at 4096². The in-GEMM path is tested against the twins (interpreter, and compiled on a GPU); timed on
an H200 (2026-12-04, BENCHMARKS.md "int8 base weights") it ran at 0.95× / 0.79× / 0.70× the bf16 base at
2048² / 2048×5461 / 4096², against 1.07× / 0.99× / 1.03× for scratch, so the scratch path stays the default.

- ``_int8_merge_kernel``: ``(q, scale, residual) ← quantize(dequantize(q, scale, residual) + s·B·A)``. The
  new absmax scale needs the whole new row, so each program owns BLOCK_N full rows and walks K twice:
  pass 1 computes the new row maxima, pass 2 recomputes each tile and writes q and residual in place
  (programs own disjoint rows, and a row is read completely before it is written). W is read twice and
  written once; the rank-r product is computed twice (cheap next to the memory traffic for r ≪ in).
  No atomics and a fixed order, so every rank computes the same bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from . import _runtime
from .int8_reference import MIN_SCALE, QMAX, RES_STEPS, int8_dequantize_reference, int8_lora_linear_reference, \
    int8_merge_reference_
from .linear import _check_args, _check_triton_args, _fits_int32, differentiable_backward, run_backward, run_forward
from .reference import check_dropout_p, check_scale, dropout_keep_mask
from .torch_linear import int8_lora_linear_torch

# False: dequantize to a scratch buffer, then the bf16 kernels; True: dequantize inside the GEMM tiles.
# Measured on an H200 (2026-12-04, bf16, M=16384, r=128, fwd+bwd against the bf16-base fused path): scratch
# 1.07x / 0.99x / 1.03x at 2048² / 2048x5461 / 4096², in-GEMM 0.95x / 0.79x / 0.70x (BENCHMARKS.md "H200").
IN_GEMM_DEQUANT = False

_QMAX = tl.constexpr(QMAX)  # kernels may read only constexpr globals
_RES_STEPS = tl.constexpr(RES_STEPS)
_MIN_SCALE = tl.constexpr(MIN_SCALE)


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, out_ptr, N, K, stride_qn, stride_qk, stride_on, stride_ok,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    q = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk, mask=mask, other=0)
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    w = q.to(tl.float32) * s[:, None]
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :] * stride_ok,
             w.to(out_ptr.dtype.element_ty), mask=mask)


def _max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


# tl.reduce's combine function is a global the kernel calls, which the compiler accepts only as a compiled-mode
# JITFunction: built as one whatever TRITON_INTERPRET said when this module was imported (``@triton.jit``
# would make it an InterpretedFunction then, and every later compiled int8 merge would fail with "Unsupported
# function referenced"); the interpreter runs either kind. (_runtime.for_current_mode re-wraps kernels only.)
_max_combine = JITFunction(_max)


@triton.jit
def _int8_merge_kernel(q_ptr, r_ptr, s_ptr, a_ptr, b_ptr, N, K, R,
                       stride_qn, stride_qk, stride_rn, stride_rk, stride_ar, stride_ak, stride_bn, stride_br,
                       scale, HAS_RES: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    s_old = tl.load(s_ptr + offs_n, mask=n_ok, other=1.0).to(tl.float32)
    rr = tl.arange(0, BLOCK_R)
    rowmax = tl.full((BLOCK_N,), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):  # pass 1: new row absmax
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = n_ok[:, None] & (offs_k[None, :] < K)
        v = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk, mask=mask,
                    other=0).to(tl.float32)
        if HAS_RES:
            v += tl.div_rn(tl.load(r_ptr + offs_n[:, None] * stride_rn + offs_k[None, :] * stride_rk, mask=mask,
                                   other=0).to(tl.float32), _RES_STEPS)
        acc = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r_ok = (r0 + rr) < R
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + (r0 + rr)[None, :] * stride_br,
                        mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            a = tl.load(a_ptr + (r0 + rr)[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                        mask=r_ok[:, None] & (offs_k[None, :] < K), other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(b, a, acc, input_precision=DOT_PRECISION)
        w = v * s_old[:, None] + scale * acc
        # tl.reduce with our combine, not tl.max: the interpreter runs a reduce's combine_fn as Python
        # whatever mode triton was imported in, while tl.max is a standard-library @jit (see _runtime).
        # NaN wins (PropagateNan.ALL, here, in _max and at the floor below), as in the twin's amax: tl.maximum's
        # default drops a NaN, and a merge of a NaN update stored scale 1 (an all-NaN row) or a finite scale,
        # with codes of ±127, where the twin's scale is NaN (every later forward NaN, as a float base's).
        rowmax = tl.maximum(rowmax, tl.reduce(tl.where(mask, tl.abs(w), 0.0), 1, _max_combine),
                            propagate_nan=tl.PropagateNan.ALL)
    # bf16 round-to-nearest-even of rowmax/127 by bit arithmetic: identical compiled and interpreted (the
    # interpreter's fp32->bf16 cast truncates) and identical to torch's .to(torch.bfloat16).
    # tl.div_rn, here and below: IEEE division, as the twin's. A plain `/` compiles to div.full.f32 (up to
    # 2 ulp off), so the scale at ties, q at .5 and the residual (x254) could differ from the twin on a GPU.
    bits = tl.div_rn(rowmax, _QMAX).to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    s_new = bits.to(tl.float32, bitcast=True)
    # the twin's floor: never subnormal
    s_new = tl.where(rowmax == 0.0, 1.0, tl.maximum(s_new, _MIN_SCALE, propagate_nan=tl.PropagateNan.ALL))
    for k0 in range(0, K, BLOCK_K):  # pass 2: recompute the tile, requantize, write in place
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = n_ok[:, None] & (offs_k[None, :] < K)
        q_ptrs = q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk
        r_ptrs = r_ptr + offs_n[:, None] * stride_rn + offs_k[None, :] * stride_rk
        v = tl.load(q_ptrs, mask=mask, other=0).to(tl.float32)
        if HAS_RES:
            v += tl.div_rn(tl.load(r_ptrs, mask=mask, other=0).to(tl.float32), _RES_STEPS)
        acc = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r_ok = (r0 + rr) < R
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + (r0 + rr)[None, :] * stride_br,
                        mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            a = tl.load(a_ptr + (r0 + rr)[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                        mask=r_ok[:, None] & (offs_k[None, :] < K), other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(b, a, acc, input_precision=DOT_PRECISION)
        vn = tl.div_rn(v * s_old[:, None] + scale * acc, s_new[:, None])
        qn = tl.minimum(tl.maximum(tl.floor(vn + 0.5), -_QMAX), _QMAX)
        tl.store(q_ptrs, qn.to(tl.int8), mask=mask)
        if HAS_RES:
            rn = tl.minimum(tl.maximum(tl.floor((vn - qn) * _RES_STEPS + 0.5), -_QMAX), _QMAX)
            tl.store(r_ptrs, rn.to(tl.int8), mask=mask)
    tl.store(s_ptr + offs_n, s_new.to(s_ptr.dtype.element_ty), mask=n_ok)


# ----------------------------------------------------------------------------------------------------
# Launchers (no autograd)
# ----------------------------------------------------------------------------------------------------
def dequant_launch(q, scale, dtype):
    """``q · scale[:, None]`` as a new (out, in) tensor of ``dtype`` on q's device."""
    N, K = q.shape
    out = _runtime.new_empty((N, K), dtype, q.device)
    if N and K:
        cfg = dict(BLOCK_N=32, BLOCK_K=32) if _runtime.interpreting() else dict(BLOCK_N=64, BLOCK_K=128)
        grid = (_runtime.cdiv(N, cfg["BLOCK_N"]), _runtime.cdiv(K, cfg["BLOCK_K"]))
        scale = scale.contiguous()  # the kernel reads it at offsets 0..N-1
        _runtime.for_current_mode(_dequant_kernel)[grid](q, scale, out, N, K, q.stride(0), q.stride(1),
                                                         out.stride(0), out.stride(1), **cfg)
    return out


def int8_merge_launch(q, scale, residual, lora_A, lora_B, s):
    """In place on (q, scale, residual-or-None), all on q's device; A (r, in), B (out, r) fp32/bf16."""
    N, K = q.shape
    R = lora_A.shape[0]
    if N == 0 or K == 0:
        return q
    br = max(16, min(64, _runtime.next_power_of_2(max(R, 1))))
    if _runtime.interpreting():
        cfg = dict(BLOCK_N=16, BLOCK_K=32, BLOCK_R=16, num_warps=4)
    else:  # untuned lead; 32 rows per program (4096 rows: 128 programs, about one wave on an H100)
        cfg = dict(BLOCK_N=32, BLOCK_K=128, BLOCK_R=br, num_warps=8, num_stages=2)
    res = residual if residual is not None else q  # dummy pointer when HAS_RES is False
    _runtime.for_current_mode(_int8_merge_kernel)[(_runtime.cdiv(N, cfg["BLOCK_N"]),)](
        q, res, scale, lora_A, lora_B, N, K, R, q.stride(0), q.stride(1), res.stride(0), res.stride(1),
        lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1), float(s),
        HAS_RES=residual is not None, UPCAST=_runtime.upcast_for_interpreter(lora_A.dtype),
        DOT_PRECISION="ieee" if lora_A.dtype == torch.float32 else "tf32", **cfg)
    return q


def int8_dequantize(q, scale, dtype=torch.float32, residual=None):
    """``q · scale`` (or ``(q + residual/254) · scale``) as ``dtype``, as its twin
    :func:`int8_dequantize_reference`: the Triton kernel on CUDA (without a residual, which lives on the
    host), the twin elsewhere."""
    _check_int8_base("int8_dequantize", q, scale, residual)
    if (residual is None and _runtime.use_triton(torch.empty(0, dtype=dtype, device=q.device))  # the output dtype
            and _runtime.fits_int32("int8_dequantize", q=_runtime.span(q))):
        return dequant_launch(q, scale, dtype)
    return int8_dequantize_reference(q, scale, dtype, residual)


def _check_int8_base(op: str, q, scale, residual=None) -> None:
    """q int8 (out, in), scale (out,), residual int8 like q: the kernels index them by q's shape (a shorter
    scale or residual was read and written past its end), and write each element once (no shared memory)."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"{op}: q must be a 2-D int8 tensor (out, in); got {q.dtype} {tuple(q.shape)}")
    if scale.shape != (q.shape[0],):
        raise ValueError(f"{op}: scale must have shape ({q.shape[0]},), one per row of q; got {tuple(scale.shape)}")
    if residual is not None and (residual.shape != q.shape or residual.dtype != torch.int8):
        raise ValueError(f"{op}: residual must be int8 of q's shape {tuple(q.shape)}; got {residual.dtype} "
                         f"{tuple(residual.shape)}")
    if scale.device != q.device:  # the kernels read it beside q (the residual may live on the host)
        raise ValueError(f"{op}: scale is on {scale.device} but q is on {q.device}; move it to q's device")
    if scale.dtype not in (torch.bfloat16, torch.float32):  # fp16's range: a row under ~8e-3 lost its scale
        raise ValueError(f"{op}: scale must be bf16 (as int8_quantize_reference makes it) or float32; got "
                         f"{scale.dtype}")
    for name, t in (("q", q), ("scale", scale), ("residual", residual)):
        _runtime.check_owns_elements(op, name, t)


@torch.no_grad()
def int8_merge_(q, scale, residual, lora_A, lora_B, s):
    """``(q, scale, residual) ← quantize(dequantize(...) + s·B·A)`` in place; residual may live on the host
    (it is staged through q's device for the kernel) or be None (naive requantization). Returns
    ``(q, scale, residual)``, as its twin :func:`int8_merge_reference_`."""
    _check_int8_base("int8_merge_", q, scale, residual)
    if lora_A.dim() != 2 or lora_A.shape[1] != q.shape[1] or lora_B.shape != (q.shape[0], lora_A.shape[0]):
        raise ValueError(f"int8_merge_: expected lora_A (r, {q.shape[1]}) and lora_B ({q.shape[0]}, r); "
                         f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    if lora_A.dtype != lora_B.dtype:  # as lora_merge_: the kernel would round B to A's dtype
        raise ValueError(f"int8_merge_: lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must share a dtype")
    for name, t in (("q", q), ("scale", scale), ("residual", residual)):
        if t is not None:
            _runtime.check_writable("int8_merge_", name, t)
    if not (_runtime.use_triton(lora_A.to(q.device) if lora_A.device != q.device else lora_A)
            and _runtime.fits_int32("int8_merge_", q=_runtime.span(q), lora_A=_runtime.span(lora_A),
                                    lora_B=_runtime.span(lora_B),
                                    residual=_runtime.span(residual) if residual is not None else 0)):
        return int8_merge_reference_(q, scale, residual, lora_A, lora_B, s)
    A, B = lora_A.to(q.device), lora_B.to(q.device, lora_A.dtype)
    res_dev = residual.to(q.device) if residual is not None else None  # 1 B/param each way per merge
    scale_c = scale.contiguous()  # the kernel reads and writes it at offsets 0..N-1
    int8_merge_launch(q, scale_c, res_dev, A, B, s)
    if scale_c.data_ptr() != scale.data_ptr():
        scale.copy_(scale_c)
    if residual is not None and res_dev.data_ptr() != residual.data_ptr():
        residual.copy_(res_dev)
    for t in (q, scale, residual):  # written by the kernel behind autograd's back (see merge.lora_merge_)
        if t is not None and not t.is_inference():
            torch.autograd.graph.increment_version(t)
    return q, scale, residual


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------
class Int8LoRALinearFunction(torch.autograd.Function):
    """The fused LoRA linear with an int8 base: dequantized to scratch (forward, and again in backward) or
    inside the GEMM tiles (``in_gemm``); either way only the int8 weight is saved for backward."""

    @staticmethod
    def forward(ctx, x, q, w_scale, lora_A, lora_B, bias, scale, keep, dropout_p, deterministic, in_gemm):
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in)  # (M, in)
        keep2 = keep.reshape(-1, d_in).view(torch.uint8) if keep is not None else None
        y2, s = run_forward(x2, q, lora_A, lora_B, bias=bias, weight_scale=w_scale, keep2=keep2, scale=scale,
                            dropout_p=dropout_p, deterministic=deterministic, in_gemm=in_gemm)
        ctx.save_for_backward(x, s, q, w_scale, lora_A, lora_B, keep2)  # x itself: see differentiable_backward
        ctx.scale, ctx.dropout_p, ctx.deterministic, ctx.in_gemm = scale, dropout_p, deterministic, in_gemm
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return _runtime.layer_output(y2, x.shape, q.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, s, q, w_scale, lora_A, lora_B, keep2 = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        need_x, _, _, need_a, need_b, need_bias = ctx.needs_input_grad[:6]
        dy2 = _runtime.within_int32(dy.reshape(-1, dy.shape[-1]))  # (M, out); 32-bit offsets: see forward
        if torch.is_grad_enabled():  # create_graph=True: see reference.differentiable_backward
            w = int8_dequantize_reference(q, w_scale, dy.dtype)
            dx2, da, db = differentiable_backward(dy2, x2, w, lora_A, lora_B, ctx.scale, keep2,
                                                  1.0 / (1.0 - ctx.dropout_p))
        else:
            dx2, da, db = run_backward(dy2, x2, s, q, lora_A, lora_B, weight_scale=w_scale, keep2=keep2,
                                       scale=ctx.scale, dropout_p=ctx.dropout_p, deterministic=ctx.deterministic,
                                       in_gemm=ctx.in_gemm, need_dx=need_x, need_lora=need_a or need_b)
        dx = dx2.reshape(ctx.x_shape) if dx2 is not None else None
        dbias = dy2.sum(0, dtype=torch.float32).to(dy.dtype) if (ctx.has_bias and need_bias) else None
        return (dx, None, None, (da if need_a else None), (db if need_b else None), dbias, None, None, None, None,
                None)


def int8_lora_linear(x, q, w_scale, lora_A, lora_B, scale, bias=None, dropout_p=0.0, training=True,
                     generator=None, *, deterministic=None, in_gemm=None):
    """``x @ (q·w_scale).T (+ bias) + scale · dropout(x) @ A.T @ B.T``; dispatches like ``lora_linear``.

    q int8 (out, in), w_scale (out,) (bf16); the dequantized weight is never saved for backward.
    ``in_gemm``: dequantize inside the GEMM tiles instead of to a scratch buffer (None: :data:`IN_GEMM_DEQUANT`).
    """
    if q.dtype != torch.int8 or w_scale.shape != (q.shape[0],):
        raise ValueError(f"int8_lora_linear: expected int8 q (out, in) and scale (out,); got {q.dtype} "
                         f"{tuple(q.shape)} and {tuple(w_scale.shape)}")
    _check_args(x, q, lora_A, lora_B, bias)
    scale = check_scale(scale, "int8_lora_linear")
    p = check_dropout_p(dropout_p)
    path = _runtime.linear_path(x)  # the same choice as lora_linear, AUTO_TORCH_OPS included
    if path == "triton" and not _fits_int32("int8_lora_linear", x, q, lora_A, lora_B):
        path = "torch"
    if path == "torch":  # RELORA_KERNELS=torch, or auto (CPU and CUDA): BLAS on the dequantized weight
        return int8_lora_linear_torch(x, q, w_scale, lora_A, lora_B, scale, bias, p, training, generator)
    if path == "reference":
        return int8_lora_linear_reference(x, q, w_scale, lora_A, lora_B, scale, bias, p, training, generator)
    return _int8_lora_linear_triton(x, q, w_scale, lora_A, lora_B, scale, bias, p, training, generator, deterministic,
                                    in_gemm)


def _int8_lora_linear_triton(x, q, w_scale, lora_A, lora_B, scale, bias, p, training, generator, deterministic,
                             in_gemm):
    x, lora_A, lora_B, bias = _runtime.autocast_inputs(x.device.type, x, lora_A, lora_B, bias)
    _check_triton_args(x, None, lora_A, lora_B, bias, op="int8_lora_linear")
    for name, t in (("q", q), ("w_scale", w_scale)):
        if t.device != x.device:
            raise ValueError(f"relora_kernels.int8_lora_linear: {name} is on {t.device} but x is on {x.device}")
    _runtime.check_device(x)
    keep = dropout_keep_mask(x, p, generator) if (training and p > 0.0) else None
    return Int8LoRALinearFunction.apply(x, q, w_scale, lora_A, lora_B, bias, float(scale), keep,
                                        p if keep is not None else 0.0, _runtime.deterministic_mode(deterministic),
                                        IN_GEMM_DEQUANT if in_gemm is None else bool(in_gemm))
