"""Fused ReLoRA linear: ``y = x @ W.T (+ b) + s * dropout(x) @ A.T @ B.T`` with W frozen.

Forward (two launches; LoRAFusion, arXiv 2510.00206):
    S = drop(X) @ A.T                    (M, r)   X read once more, but only against r columns
    Y = [X | S] @ [W | s·B].T (+ b)      (M, out) one GEMM over the concatenated K = in + r
Saved for backward: X, S (and the dropout keep-mask as uint8). Backward (W frozen: no dW unless asked):
    dS = s·dY @ B, dB = s·dY.T @ S       read dY once (fused kernel below, fp32 atomics for dB), or in
                                         deterministic mode two GEMMs with a fixed-order split reduction
    dA = dS.T @ drop(X)                  split over tokens (atomics, or fixed-order partials)
    dX = [dY | dS] @ [W ; A]             one GEMM over K = out + r; under dropout the r-part is masked
                                         and scaled by 1/(1-p) in the epilogue

Bytes that decide the dB design (bf16, M tokens, BM rows per program): the fused kernel adds its partial
dB (out x r fp32) once per row-tile, (M/BM)·out·r·4 B of atomics; the unfused dB re-reads dY, M·out·2 B.
At BM=128 and r=128 the atomics move 2x the bytes of a dY re-read (r/64 in general) -- the fused path wins
only if L2 absorbs them. Both paths are kept and benchmarked (``launch/bench_kernels.py``: providers ``fused``
and ``fused_splitdb``, which differ only in :data:`FUSE_DS_DB`); the default is the fused one (the H100 and
H200 measurements, FUSE_DS_DB below, show no gain beyond the runs' spread). Deterministic mode always takes
the split path (no atomics).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _runtime
from .matmul import MASK_A1, MASK_B1, MASK_OUT2, concat_matmul
from .reference import check_dropout_p, check_scale, differentiable_backward, dropout_keep_mask, lora_linear_reference
from .torch_linear import lora_linear_torch

# Non-deterministic backward: dS and dB from one read of dY (fp32 atomics for dB) when True; two GEMMs
# (dB split over tokens, partials summed with atomics) when False. Measured fwd+bwd at M=16384, r=128: split
# 2.126 against 2.447 ms at d=4096 on the H100, 2.123 against 2.130 on the H200 (BENCHMARKS.md): kept fused
# until a repeated run shows a gain beyond the spread.
FUSE_DS_DB = True

# True: the rank-r products (S = X·Aᵀ, dS = s·dY·B, dB = s·dYᵀ·S, dA = dSᵀ·X) go to cuBLAS (torch.mm),
# and only the two big concatenated-K products stay on Triton. The H100 run of 2026-11-22 put the fused
# layer's rank-r work at ~0.2–0.45 ms where its bytes need ~0.05 ms; cuBLAS runs skinny GEMMs near the
# memory floor. Used without dropout and outside deterministic mode (there the masked / fixed-order Triton
# kernels run). Off: on the H200 (2026-12-04, ``fused_blas_lr``) it was 1-3% faster (fwd+bwd 1.297 against
# 1.341 ms at d=2048, 2.114 against 2.130 at d=4096), within that run's spread; with TMA the best variant there.
LOWRANK_BLAS = False


@triton.jit
def _ds_db_kernel(dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, M, N, R,
                  stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
                  stride_dsm, stride_dsr, stride_dbn, stride_dbr, scale,
                  UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program per (row-tile, r-tile): dS[rows] = s·dY[rows] @ B over all of N in registers, and the
    row-tile's share of dB = s·dY[rows].T @ S[rows] added per N-tile with fp32 atomics.

    Each program walks the N-tiles starting at tile pid_m mod num_n, so programs in flight together add into
    different BLOCK_N x BLOCK_R blocks of dB (at most ceil(programs / num_n) per block; before, all of them:
    128 at M=16384 on the H200 of 2026-12-04, walking N in lockstep). dB: the same partials, added in another
    order (atomics never fixed it). dS: still one fixed order per program (deterministic run to run), but it
    depends on the row tile, so identical rows in different tiles may differ in the last fp32 bits."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    # Rows past M load as zeros in both dY and S, so they add nothing to dB.
    s_tile = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_R)
    if UPCAST:
        s_tile = s_tile.to(tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    first = pid_m % tl.maximum(num_n, 1)  # max(., 1): no % 0 when N = 0 (no tile to walk, dS stays 0)
    for i in range(0, num_n):
        tile_n = first + i
        tile_n = tl.where(tile_n >= num_n, tile_n - num_n, tile_n)  # (first + i) mod num_n, first < num_n
        offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_R)
        if UPCAST:
            dy = dy.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(dy, b, acc, input_precision=DOT_PRECISION)
        part = tl.dot(tl.trans(dy), s_tile, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_R)
        tl.atomic_add(db_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr, part * scale,
                      mask=n_ok[:, None] & r_ok[None, :], sem="relaxed")  # a sum: no ordering needed
    tl.store(ds_ptr + offs_m[:, None] * stride_dsm + offs_r[None, :] * stride_dsr,
             (acc * scale).to(ds_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# Launchers (no autograd)
# ----------------------------------------------------------------------------------------------------
def fused_ds_db(dy, lora_B, s, scale, db_dtype=None, config=None):
    """dS = scale·dy @ B (M, r) in dy's dtype and dB = scale·dy.T @ s (out, r), reading dy once.
    ``config``: explicit BLOCK_M/BLOCK_N/BLOCK_R/num_warps/num_stages (launch/tune_kernels.py)."""
    M, N = dy.shape
    R = lora_B.shape[1]
    ds = _runtime.new_empty((M, R), dy.dtype, dy.device)
    db32 = torch.zeros((N, R), dtype=torch.float32, device=dy.device)  # atomics need a zeroed fp32 target
    if M > 0 and R > 0:
        br = min(128, max(16, _runtime.next_power_of_2(R)))
        if config is not None:
            cfg = dict(config)
        elif _runtime.interpreting():
            cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_R=min(br, 32), num_warps=4)
        else:  # untuned lead: 128 rows halves the atomic bytes of 64 rows; 8 warps for the two dots
            # fp32 with BLOCK_R=128 and 3 stages needs 256 KB of shared memory, over the H100's 227 KB
            # (OutOfResources, seen 2026-11-22): 2 stages fit (compiled: 224 KiB on Triton 3.6, 160 KiB on
            # 3.9; tests/test_kernels_compile.py). A device with less shared memory
            # than Hopper's: launch_fixed drops stages until it fits.
            stages = 2 if dy.element_size() >= 4 and br >= 128 else 3
            cfg = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_R=br, num_warps=8, num_stages=stages)
        grid = (_runtime.cdiv(M, cfg["BLOCK_M"]), _runtime.cdiv(R, cfg["BLOCK_R"]))
        kernel = _runtime.for_current_mode(_ds_db_kernel)
        args = (dy, lora_B, s, ds, db32, M, N, R,
                dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0), s.stride(1),
                ds.stride(0), ds.stride(1), db32.stride(0), db32.stride(1), float(scale))
        flags = dict(UPCAST=_runtime.upcast_for_interpreter(dy.dtype), DOT_PRECISION=_runtime.dot_precision(dy.dtype))
        if config is None and not _runtime.interpreting():
            _runtime.launch_fixed(kernel, grid, args, flags, cfg, dy.dtype, dy.device)
        else:
            kernel[grid](*args, **flags, **cfg)
    db_dtype = db_dtype or lora_B.dtype
    return ds, (db32 if db_dtype == torch.float32 else db32.to(db_dtype))


def lora_forward(x, weight, lora_A, lora_B, scale, bias=None, keep=None, dropout_p=0.0, weight_scale=None,
                 deterministic=False):
    """x (M, in) -> (y (M, out), s (M, r)). ``keep``: (M, in) keep-mask, or None for no dropout.
    ``weight_scale`` (out,): ``weight`` is int8 and dequantized inside the GEMM (kernels/int8.py).
    ``deterministic``: the fixed launch configs, not autotuned ones (which may differ between processes)."""
    inv_keep = 1.0 / (1.0 - dropout_p) if keep is not None else 1.0
    if LOWRANK_BLAS and keep is None and not deterministic:
        s = torch.mm(x, lora_A.t())
    else:
        s = concat_matmul(x, lora_A.t(), alpha=inv_keep, mask=keep, mask_mode=MASK_A1, deterministic=deterministic)
    y = concat_matmul(x, weight.t(), s, lora_B.t(), beta=scale, bias=bias, b1_scale=weight_scale,
                      b1_scale_mode=0 if weight_scale is None else 1, deterministic=deterministic)
    return y, s


def lora_backward(dy, x, s, weight, lora_A, lora_B, scale, keep=None, dropout_p=0.0, deterministic=False,
                  need_dx=True, need_lora=True, weight_scale=None):
    """dy (M, out) -> (dx (M, in) or None, dA (r, in) or None, dB (out, r) or None).
    ``weight_scale`` (out,): ``weight`` is int8, dequantized inside the dX GEMM."""
    inv_keep = 1.0 / (1.0 - dropout_p) if keep is not None else 1.0
    if LOWRANK_BLAS and keep is None and not deterministic:
        ds = torch.mm(dy, lora_B).mul_(scale)
        da = torch.mm(ds.t(), x) if need_lora else None
        db = torch.mm(dy.t(), s).mul_(scale) if need_lora else None
        dx = (concat_matmul(dy, weight, ds, lora_A, b1_scale=weight_scale,
                            b1_scale_mode=0 if weight_scale is None else 2) if need_dx else None)
        return dx, da, db
    if deterministic or not need_lora or not FUSE_DS_DB:
        ds = concat_matmul(dy, lora_B, alpha=scale, deterministic=deterministic)
        db = (concat_matmul(dy.t(), s, alpha=scale, reduce_k=True, deterministic=deterministic,
                            out_dtype=lora_B.dtype) if need_lora else None)
    else:
        ds, db = fused_ds_db(dy, lora_B, s, scale)
    da = (concat_matmul(ds.t(), x, alpha=inv_keep, mask=keep, mask_mode=MASK_B1, reduce_k=True,
                        deterministic=deterministic, out_dtype=lora_A.dtype) if need_lora else None)
    dx = (concat_matmul(dy, weight, ds, lora_A, beta=inv_keep, mask=keep, mask_mode=MASK_OUT2, b1_scale=weight_scale,
                        b1_scale_mode=0 if weight_scale is None else 2, deterministic=deterministic)
          if need_dx else None)
    return dx, da, db


# ----------------------------------------------------------------------------------------------------
# The layer's launches, as plain calls and as registered torch ops
# ----------------------------------------------------------------------------------------------------
def layer_forward(x2, weight, lora_A, lora_B, bias, weight_scale, keep2, scale, dropout_p, deterministic, in_gemm):
    """One forward's launches: (y2 (M, out), s (M, r)). ``weight_scale`` given: ``weight`` is int8,
    dequantized inside the GEMM tiles (``in_gemm``) or to a scratch buffer freed on return."""
    if weight_scale is not None and not in_gemm:
        from .int8 import dequant_launch  # kernels/int8.py imports this module
        weight, weight_scale = dequant_launch(weight, weight_scale, x2.dtype), None
    return lora_forward(x2, weight, lora_A, lora_B, scale, bias, keep2, dropout_p, weight_scale=weight_scale,
                        deterministic=deterministic)


def layer_backward(dy2, x2, s, weight, weight_scale, lora_A, lora_B, keep2, scale, dropout_p, deterministic, in_gemm,
                   need_dx, need_lora):
    """One backward's launches: (dx2 or None, dA or None, dB or None); ``weight_scale`` as in layer_forward."""
    if not (need_dx or need_lora):  # only a bias (or a trainable W) wants a gradient: nothing to launch
        return None, None, None
    if weight_scale is not None and not in_gemm:
        from .int8 import dequant_launch
        weight, weight_scale = (dequant_launch(weight, weight_scale, dy2.dtype) if need_dx else None), None
    return lora_backward(dy2, x2, s, weight, lora_A, lora_B, scale, keep2, dropout_p, deterministic, need_dx=need_dx,
                         need_lora=need_lora, weight_scale=weight_scale)


# The same launches as torch ops (torch.library.custom_op), for tracers that must see one op, not the launchers'
# Python (_runtime.traced): torch.compile puts each in its graph as an opaque call (no graph break, the layer
# stays one graph); selective activation checkpointing keeps the forward's outputs (relora_ds/checkpointing.py);
# FakeTensorMode gets the shapes below without launching; FlopCounterMode counts them (below). Outputs never
# alias inputs; a gradient not asked for is an empty tensor (an op returns no None).
FORWARD_OP = torch.library.custom_op(
    "relora_kernels::lora_linear_forward", layer_forward, mutates_args=(),
    schema="(Tensor x2, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor? bias, Tensor? weight_scale, "
           "Tensor? keep2, float scale, float dropout_p, bool deterministic, bool in_gemm) -> (Tensor, Tensor)")


def _backward_op(dy2, x2, s, weight, weight_scale, lora_A, lora_B, keep2, scale, dropout_p, deterministic, in_gemm,
                 need_dx, need_lora):
    grads = layer_backward(dy2, x2, s, weight, weight_scale, lora_A, lora_B, keep2, scale, dropout_p, deterministic,
                           in_gemm, need_dx, need_lora)
    return tuple(g if g is not None else dy2.new_empty(0) for g in grads)


BACKWARD_OP = torch.library.custom_op(
    "relora_kernels::lora_linear_backward", _backward_op, mutates_args=(),
    schema="(Tensor dy2, Tensor x2, Tensor s, Tensor weight, Tensor? weight_scale, Tensor lora_A, Tensor lora_B, "
           "Tensor? keep2, float scale, float dropout_p, bool deterministic, bool in_gemm, bool need_dx, "
           "bool need_lora) -> (Tensor, Tensor, Tensor)")


@FORWARD_OP.register_fake
def _forward_fake(x2, weight, lora_A, lora_B, bias, weight_scale, keep2, scale, dropout_p, deterministic, in_gemm):
    return x2.new_empty(x2.shape[0], weight.shape[0]), x2.new_empty(x2.shape[0], lora_A.shape[0])


@BACKWARD_OP.register_fake
def _backward_fake(dy2, x2, s, weight, weight_scale, lora_A, lora_B, keep2, scale, dropout_p, deterministic, in_gemm,
                   need_dx, need_lora):
    dx = dy2.new_empty(x2.shape) if need_dx else dy2.new_empty(0)
    if not need_lora:
        return dx, dy2.new_empty(0), dy2.new_empty(0)
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


# FlopCounterMode counts these ops by the formulas below (the GEMMs' 2·m·n·k, as torch counts aten.mm), the same
# count as the twin's matmuls (tests/test_kernel_ops.py). Registered with the ops, when this module is first imported
# (the first Triton-path call): a FlopCounterMode made before that copies torch's registry without them.
def _forward_flops(x2, weight, lora_A, *args, **kwargs):
    (m, k), n, r = x2, weight[0], lora_A[0]
    return 2 * m * k * n + 2 * m * k * r + 2 * m * r * n  # X·Wᵀ, S = X·Aᵀ, S·Bᵀ


def _backward_flops(dy2, x2, s, weight, weight_scale, lora_A, lora_B, keep2, scale, dropout_p, deterministic, in_gemm,
                    need_dx, need_lora, **kwargs):
    (m, n), k, r = dy2, x2[1], lora_A[0]
    if not (need_dx or need_lora):
        return 0
    return (2 * m * n * r  # dS = s·dY·B
            + (2 * m * n * k + 2 * m * r * k if need_dx else 0)  # dX = dY·W + dS·A
            + (2 * m * n * r + 2 * m * r * k if need_lora else 0))  # dB = s·dYᵀ·S, dA = dSᵀ·X


def _register_flop_formulas():
    from torch.utils.flop_counter import flop_registry, register_flop_formula
    for op, formula in ((torch.ops.relora_kernels.lora_linear_forward, _forward_flops),
                        (torch.ops.relora_kernels.lora_linear_backward, _backward_flops)):
        if op not in flop_registry:  # this file imported again under another package name (kernels/__init__.py)
            register_flop_formula(op)(formula)


_register_flop_formulas()


def run_forward(x2, weight, lora_A, lora_B, *, bias, weight_scale, keep2, scale, dropout_p, deterministic, in_gemm):
    """layer_forward, through its op when traced (_runtime.traced)."""
    return (FORWARD_OP if _runtime.traced() else layer_forward)(x2, weight, lora_A, lora_B, bias, weight_scale, keep2,
                                                               scale, dropout_p, deterministic, in_gemm)


def run_backward(dy2, x2, s, weight, lora_A, lora_B, *, weight_scale, keep2, scale, dropout_p, deterministic, in_gemm,
                 need_dx, need_lora):
    """layer_backward, through its op when traced; None for a gradient not asked for either way."""
    args = (dy2, x2, s, weight, weight_scale, lora_A, lora_B, keep2, scale, dropout_p, deterministic, in_gemm, need_dx,
            need_lora)
    if not _runtime.traced():
        return layer_backward(*args)
    dx, da, db = BACKWARD_OP(*args)
    return (dx if need_dx else None), (da if need_lora else None), (db if need_lora else None)


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------
class LoRALinearFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scale, keep, dropout_p, deterministic):
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in)  # (M, in), M = prod(leading dims)
        keep2 = keep.reshape(-1, d_in).view(torch.uint8) if keep is not None else None
        y2, s = run_forward(x2, weight, lora_A, lora_B, bias=bias, weight_scale=None, keep2=keep2, scale=scale,
                            dropout_p=dropout_p, deterministic=deterministic, in_gemm=False)
        ctx.save_for_backward(x, s, weight, lora_A, lora_B, keep2)  # x itself: see differentiable_backward
        ctx.scale, ctx.dropout_p, ctx.deterministic = scale, dropout_p, deterministic
        ctx.x_shape, ctx.bias_dtype = x.shape, (bias.dtype if bias is not None else None)
        return _runtime.layer_output(y2, x.shape, weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, s, weight, lora_A, lora_B, keep2 = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        dy2 = _runtime.within_int32(dy.reshape(-1, dy.shape[-1]))  # (M, out); 32-bit offsets: see forward
        if torch.is_grad_enabled():  # create_graph=True: gradients autograd can differentiate again
            dx2, da, db = differentiable_backward(dy2, x2, weight, lora_A, lora_B, ctx.scale, keep2,
                                                  1.0 / (1.0 - ctx.dropout_p))
        else:
            dx2, da, db = run_backward(dy2, x2, s, weight, lora_A, lora_B, weight_scale=None, keep2=keep2,
                                       scale=ctx.scale, dropout_p=ctx.dropout_p, deterministic=ctx.deterministic,
                                       in_gemm=False, need_dx=need_x, need_lora=need_a or need_b)
        dx = dx2.reshape(ctx.x_shape) if dx2 is not None else None
        # ReLoRA keeps W frozen; a trainable W still gets its gradient, through plain torch.
        dw = (dy2.t() @ x2) if need_w else None
        dbias = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if need_bias else None
        return dx, dw, (da if need_a else None), (db if need_b else None), dbias, None, None, None, None


def _check_args(x, weight, lora_A, lora_B, bias):
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"weight, lora_A, lora_B must be 2-D; got {tuple(weight.shape)}, {tuple(lora_A.shape)}, "
                         f"{tuple(lora_B.shape)}")
    d_out, d_in = weight.shape
    r = lora_A.shape[0]
    if d_in == 0 or r == 0 or d_out == 0:
        raise ValueError(f"weight (out, in) {tuple(weight.shape)} and lora_A (r, in) {tuple(lora_A.shape)} need "
                         "in_features >= 1, out_features >= 1 and r >= 1")
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x's last dimension must be weight's in_features={d_in}; got x of shape {tuple(x.shape)}")
    if lora_A.shape != (r, d_in) or lora_B.shape != (d_out, r):
        raise ValueError(f"expected lora_A (r, {d_in}) and lora_B ({d_out}, r) with the same r; got lora_A "
                         f"{tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}")
    if bias is not None and bias.shape != (d_out,):
        raise ValueError(f"bias must have shape ({d_out},); got {tuple(bias.shape)}")


def _check_triton_args(x, weight, lora_A, lora_B, bias, op="lora_linear"):
    tensors = {"weight": weight, "lora_A": lora_A, "lora_B": lora_B, "bias": bias}
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise ValueError(f"relora_kernels (Triton path): {name} has dtype {t.dtype} but x has "
                             f"{x.dtype}; cast them to one dtype (or use RELORA_KERNELS=reference)")
        if t.device != x.device:
            raise ValueError(f"relora_kernels.{op}: {name} is on {t.device} but x is on {x.device}; move it to x's "
                             "device")


def _fits_int32(op, x, weight, lora_A, lora_B):
    """x, dX (the same shape), Y, dY (rows × out), S, dS (rows × r), the weight and the factors (and their
    gradients, as large) within the kernels' 32-bit offsets."""
    rows = math.prod(x.shape[:-1])
    span = _runtime.span
    return _runtime.fits_int32(op, x=span(x), weight=span(weight), y=rows * weight.shape[0], dx=rows * x.shape[-1],
                               s=rows * lora_A.shape[0], lora_A=max(span(lora_A), lora_A.numel()),
                               lora_B=max(span(lora_B), lora_B.numel()))


def lora_linear(x, weight, lora_A, lora_B, scale, bias=None, dropout_p=0.0, training=True, generator=None, *,
                deterministic=None):
    """``x @ weight.T (+ bias) + scale * dropout(x) @ lora_A.T @ lora_B.T``, autograd-aware.

    x (..., in); weight (out, in), frozen; lora_A (r, in); lora_B (out, r); bias (out,) or None.
    Dispatches itself (``_runtime.linear_path``): the Triton kernels, the BLAS chain of
    kernels/torch_linear.py or the torch reference, per ``RELORA_KERNELS`` and the device. ``dropout_p`` applies to the LoRA branch's input only, when ``training``; ``generator``
    draws its mask (same generator state, same mask, on either path). ``deterministic``: None reads
    ``RELORA_DETERMINISTIC`` / ``torch.are_deterministic_algorithms_enabled()``.
    """
    _check_args(x, weight, lora_A, lora_B, bias)
    scale = check_scale(scale, "lora_linear")
    p = check_dropout_p(dropout_p)
    path = _runtime.linear_path(x)
    if path == "triton" and not _fits_int32("lora_linear", x, weight, lora_A, lora_B):
        path = "torch"
    if path == "reference":
        return lora_linear_reference(x, weight, lora_A, lora_B, scale, bias, p, training, generator)
    if path == "torch":
        return lora_linear_torch(x, weight, lora_A, lora_B, scale, bias, p, training, generator)
    return _lora_linear_triton(x, weight, lora_A, lora_B, scale, bias, p, training, generator, deterministic)


# Traced by torch.compile (--compile, LlamaForCausalLM.compile_layers) down to the two registered ops: no graph
# break, and the launchers inside them run as they do eagerly.
def _lora_linear_triton(x, weight, lora_A, lora_B, scale, bias, p, training, generator, deterministic):
    # What F.linear does under autocast: compute in the autocast dtype (the casts are differentiable,
    # so fp32 masters still get fp32 grads). The kernels themselves never see autocast.
    x, weight, lora_A, lora_B, bias = _runtime.autocast_inputs(x.device.type, x, weight, lora_A, lora_B, bias)
    _check_triton_args(x, weight, lora_A, lora_B, bias)
    _runtime.check_device(x)
    keep = dropout_keep_mask(x, p, generator) if (training and p > 0.0) else None
    return LoRALinearFunction.apply(x, weight, lora_A, lora_B, bias, float(scale), keep,
                                    p if keep is not None else 0.0, _runtime.deterministic_mode(deterministic))
