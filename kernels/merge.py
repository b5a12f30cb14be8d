"""ReLoRA merge: ``W += s * B @ A`` in place, fp32 accumulation, one read and one write of W.

Memory-bound: W (out x in) moves twice, A and B (rank r) are re-read per tile from L2. Each program owns
a (BLOCK_N x BLOCK_K) tile of W, issues its load first, computes the rank-r product for the tile in
BLOCK_R chunks, and writes ``round(fp32(W) + s * acc)``: the same single rounding as the reference.
No atomics and a fixed reduction order, so every data-parallel rank gets bit-identical weights (DeepSpeed
never re-broadcasts frozen weights: they are in no optimizer group).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime
from .reference import lora_merge_reference_


@triton.jit
def _lora_merge_kernel(w_ptr, a_ptr, b_ptr, N, K, R,
                       stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, scale,
                       UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    w_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    w = tl.load(w_ptrs, mask=w_mask, other=0.0)  # issued before the rank-r loop so it is in flight
    acc = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
    rr = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + rr) < R
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + (r0 + rr)[None, :] * stride_br,
                    mask=(offs_n[:, None] < N) & r_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_R)
        a = tl.load(a_ptr + (r0 + rr)[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=r_ok[:, None] & (offs_k[None, :] < K), other=0.0)  # (BLOCK_R, BLOCK_K)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(b, a, acc, input_precision=DOT_PRECISION)
    w_new = w.to(tl.float32) + scale * acc
    tl.store(w_ptrs, w_new.to(w_ptr.dtype.element_ty), mask=w_mask)


def merge_launch(weight, lora_A, lora_B, scale, config=None):
    """Launcher: ``weight += scale * lora_B @ lora_A`` in place. weight (out, in), A (r, in), B (out, r).
    ``config``: explicit BLOCK_N/BLOCK_K/BLOCK_R/num_warps/num_stages and optionally DOT_PRECISION
    (launch/tune_kernels.py)."""
    N, K = weight.shape
    R = lora_A.shape[0]
    if N == 0 or K == 0 or R == 0:
        return weight
    br = max(16, min(64, _runtime.next_power_of_2(R)))
    if config is not None:
        cfg = dict(config)
    elif _runtime.interpreting():
        cfg = dict(BLOCK_N=32, BLOCK_K=32, BLOCK_R=min(br, 16), num_warps=4)
    else:  # untuned lead for a copy-bound tile: 16 KB of bf16 W per program, W load issued first
        cfg = dict(BLOCK_N=64, BLOCK_K=128, BLOCK_R=br, num_warps=8, num_stages=2)
    precision = cfg.pop("DOT_PRECISION", None) or merge_dot_precision(weight.dtype, lora_A.dtype)
    grid = (_runtime.cdiv(N, cfg["BLOCK_N"]), _runtime.cdiv(K, cfg["BLOCK_K"]))
    _runtime.for_current_mode(_lora_merge_kernel)[grid](
        weight, lora_A, lora_B, N, K, R,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), float(scale),
        UPCAST=_runtime.upcast_for_interpreter(lora_A.dtype), DOT_PRECISION=precision, **cfg)
    return weight


def merge_dot_precision(weight_dtype: torch.dtype, lora_dtype: torch.dtype) -> str:
    """``tl.dot`` precision of the merge's B·A products.

    16-bit factors: tensor cores as they are ("tf32" is ignored for them). fp32 factors into an fp32 W:
    "ieee", exact fp32 products. fp32 factors into a bf16/fp16 W (training's merge: DeepSpeed's fp32
    masters into the 16-bit model): "tf32x3", three TF32 tensor-core products per product (hi·hi + hi·lo +
    lo·hi; relative error a few 2**-22, a few fp32 ulps, against the 2**-8 / 2**-11 ulp that W is rounded to
    afterwards). "ieee" compiles to fp32 FMAs (sm_90 PTX: 2,080 fma.rn.f32 and no wgmma, against 40 tf32
    wgmma with tf32x3): on the H200 (2026-12-04) that merge took 0.128 ms at 4096² and r=128, 17% of copy
    bandwidth, against 0.039 ms with bf16 factors: compute-bound, not memory-bound.
    """
    if lora_dtype != torch.float32:
        return "tf32"
    return "ieee" if weight_dtype == torch.float32 else "tf32x3"


@torch.no_grad()
def lora_merge_(weight, lora_A, lora_B, scale):
    """In place ``weight += scale * lora_B @ lora_A`` (fp32 accumulation, one rounding). Returns weight.

    weight (out, in) fp32/bf16/fp16; lora_A (r, in) and lora_B (out, r) of one dtype. Triton on CUDA under
    ``RELORA_KERNELS`` auto or triton (and on CPU under triton with TRITON_INTERPRET=1), else
    :func:`lora_merge_reference_`.
    """
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"lora_merge_: weight (out, in), lora_A (r, in) and lora_B (out, r) must be 2-D; got "
                         f"{tuple(weight.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    if lora_A.shape[1] != weight.shape[1] or lora_B.shape != (weight.shape[0], lora_A.shape[0]):
        raise ValueError(f"lora_merge_: expected lora_A (r, {weight.shape[1]}) and lora_B ({weight.shape[0]}, r); "
                         f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    # Checked on every path, so that a call that runs on the CPU's twin runs on a GPU's kernel too.
    _runtime.check_owns_elements("lora_merge_", "weight", weight)  # torch's copy_ refuses it too
    _runtime.check_disjoint("lora_merge_", "weight", weight, lora_A=lora_A, lora_B=lora_B)
    _runtime.check_writable("lora_merge_", "weight", weight)
    if not (weight.is_floating_point() and lora_A.is_floating_point()):
        raise ValueError(f"lora_merge_: weight and the LoRA factors must be floating point; got weight "
                         f"{weight.dtype}, lora_A {lora_A.dtype}")
    if lora_A.dtype != lora_B.dtype:  # the kernel would round B to A's dtype
        raise ValueError(f"lora_merge_: lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must share a dtype")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.device != weight.device:
            raise ValueError(f"lora_merge_: {name} is on {t.device} but weight is on {weight.device}; move it to "
                             "weight's device")
    if lora_A.dtype not in _runtime.SUPPORTED_DTYPES and _runtime.kernel_mode() == "triton":
        raise ValueError(f"lora_merge_: lora dtype {lora_A.dtype} is not supported by the kernel; use one of "
                         f"{_runtime.SUPPORTED_DTYPES} (float64 factors: RELORA_KERNELS=auto or reference)")
    if not (_runtime.use_triton(weight) and lora_A.dtype in _runtime.SUPPORTED_DTYPES
            and _runtime.fits_int32("lora_merge_", weight=_runtime.span(weight), lora_A=_runtime.span(lora_A),
                                    lora_B=_runtime.span(lora_B))):
        return lora_merge_reference_(weight, lora_A, lora_B, scale)
    _runtime.check_device(weight)
    merge_launch(weight, lora_A, lora_B, scale)
    # The kernel wrote W behind autograd's back: bump its version, so that a backward still holding the old W
    # (a merge between micro-steps, in a hook) raises autograd's in-place error as the torch path does.
    if not weight.is_inference():  # inference tensors keep no version
        torch.autograd.graph.increment_version(weight)
    return weight
