"""The concatenated-K GEMM of kernels/matmul.py with TMA tensor descriptors and persistent programs.

    C = alpha * ([A1 | A2] @ [B1 ; beta·B2]) (+ bias)

Why a second kernel: the pointer-based layer's forward ran at ~65% of cuBLAS's speed on an H100 at d=2048
(0.277 against 0.180 ms, S = X·Aᵀ included; BENCHMARKS.md),
and the two big products of the fused LoRA layer (the forward's ``[X|S]·[W|s·B]ᵀ`` and dX's
``[dY|dS]·[W;A]``) are most of its time. On Hopper, Triton GEMMs reach cuBLAS speed with TMA loads
(``tl.make_tensor_descriptor``: bulk async copies, out-of-bounds tiles zero-filled, stores clipped, so no
masks) and persistent programs (one per SM, walking the tiles in grouped order). On the H200 (2026-12-04,
``launch/bench_kernels.py`` provider ``fused_tma``) it was the faster at d=4096 (fwd+bwd 2.026 against 2.130
ms) and the slower at d=2048 (1.711 against 1.341 ms); this kernel is used only when
:data:`relora_kernels.matmul.TMA_GEMM` is on.

Scope: row-major A1/A2, B1/B2 either row-major (K, N) or "K-major" (stored (N, K): W in the forward),
no dropout mask and no int8 weight (those stay on the pointer kernel), every stride except the last
16-byte aligned (TMA's rule). :func:`eligible` checks all of it; the caller falls back otherwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime

if not hasattr(tl, "make_tensor_descriptor"):  # setup.py's floor is Triton 3.3: this opt-in kernel needs more
    raise ImportError(f"TMA_GEMM needs Triton >= 3.4 (tl.make_tensor_descriptor); this is Triton "
                      f"{triton.__version__}: leave relora_kernels.matmul.TMA_GEMM False, or upgrade Triton")


@triton.jit
def _concat_k_matmul_tma_kernel(
        a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, c_ptr, M, N, K1, K2, alpha, beta,
        B1_KMAJOR: tl.constexpr, B2_KMAJOR: tl.constexpr, HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    a1_d = tl.make_tensor_descriptor(a1_ptr, shape=[M, K1], strides=[K1, 1], block_shape=[BLOCK_M, BLOCK_K])
    if B1_KMAJOR:  # stored (N, K1): W in the forward
        b1_d = tl.make_tensor_descriptor(b1_ptr, shape=[N, K1], strides=[K1, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:  # stored (K1, N)
        b1_d = tl.make_tensor_descriptor(b1_ptr, shape=[K1, N], strides=[N, 1], block_shape=[BLOCK_K, BLOCK_N])
    c_d = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    if HAS_SECOND:
        a2_d = tl.make_tensor_descriptor(a2_ptr, shape=[M, K2], strides=[K2, 1], block_shape=[BLOCK_M, BLOCK_K])
        if B2_KMAJOR:
            b2_d = tl.make_tensor_descriptor(b2_ptr, shape=[N, K2], strides=[K2, 1],
                                             block_shape=[BLOCK_N, BLOCK_K])
        else:
            b2_d = tl.make_tensor_descriptor(b2_ptr, shape=[K2, N], strides=[N, 1],
                                             block_shape=[BLOCK_K, BLOCK_N])

    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    for tile in range(tl.program_id(0), num_tiles, NUM_PROGRAMS):
        first_pid_m = (tile // num_pid_in_group) * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
        pid_n = (tile % num_pid_in_group) // group_size_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K1, BLOCK_K):
            a = a1_d.load([off_m, k0])
            if B1_KMAJOR:
                b = tl.trans(b1_d.load([off_n, k0]))
            else:
                b = b1_d.load([k0, off_n])
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if HAS_SECOND:  # the short r-loop of the concatenated K; beta folded into the small B2 tile
            for k0 in range(0, K2, BLOCK_K):
                a = a2_d.load([off_m, k0])
                if B2_KMAJOR:
                    b = tl.trans(b2_d.load([off_n, k0]))
                else:
                    b = b2_d.load([k0, off_n])
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                b = (b.to(tl.float32) * beta).to(a.dtype)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        acc = acc * alpha
        if HAS_BIAS:
            offs_n = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        c_d.store([off_m, off_n], acc.to(c_ptr.dtype.element_ty))


_INTERP_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1)
# Hopper leads (the persistent-matmul tutorial's choices; to be confirmed by launch/tune_kernels.py).
# (128, 128, 32, 8, 3) is the one that fits fp32 in shared memory (compiled for sm_90 with Triton 3.6: 160 KB;
# the others need 321-449 KB in fp32, 161-225 KB in bf16). _prune drops what cannot fit before compiling.
_GPU_CONFIGS = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3),
                (128, 128, 32, 8, 3)]


def _row_major(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) == t.shape[1] or t.shape[0] <= 1)


def _layout(b: torch.Tensor):
    """(storage tensor, k_major) for a logical (K, N) operand, or None when TMA cannot read it."""
    if _row_major(b):
        return b, False
    if _row_major(b.t()):
        return b.t(), True
    return None


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and (t.shape[1] * t.element_size()) % 16 == 0


def eligible(a1, b1, a2, b2, out, mask, b1_scale, reduce_k) -> bool:
    """Whether :func:`launch` can compute this product (see the module docstring for the rules)."""
    if mask is not None or b1_scale is not None or reduce_k or not _row_major(out) or not _row_major(a1):
        return False
    if a1.shape[1] == 0:  # no descriptor of a zero-length dimension: the pointer kernel takes an empty first term
        return False
    pairs = [(a1, b1)] + ([(a2, b2)] if a2 is not None else [])
    for a, b in pairs:
        lay = _layout(b)
        if not _row_major(a) or lay is None or not _aligned(a) or not _aligned(lay[0]):
            return False
        if b.dtype != a1.dtype or a.dtype != a1.dtype:
            return False
    return _aligned(out)


def _alloc(size: int, alignment: int, stream):
    device = "cuda" if torch.cuda.is_available() and not _runtime.interpreting() else "cpu"
    return torch.empty(size, dtype=torch.int8, device=device)


def _ensure_allocator():
    """Device-side tensor descriptors need global scratch from an allocator (``triton.set_allocator``).

    Set on every launch: Triton keeps it in a ContextVar, i.e. per thread, and autograd runs CUDA
    backward passes on its own worker threads (set once in the forward, the backward's launch would find
    no allocator). Setting it is one ``ContextVar.set``.
    """
    triton.set_allocator(_alloc)


def _prune(configs, named_args, **kwargs):
    """Only configs whose pipeline and TMA store buffer fit in shared memory (in fp32 only the last)."""
    in_bytes, out_bytes = named_args["a1_ptr"].element_size(), named_args["c_ptr"].element_size()
    keep = [c for c in configs if _runtime.pipeline_fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                                         c.num_stages, in_bytes, out_bytes)]
    return keep or configs[-1:]


_AUTOTUNED = {}  # "k": the autotuned kernel; ("chosen", ...): the config it chose for that key, M bucketed


def _autotuned_kernel():
    if "k" not in _AUTOTUNED:
        configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
                   for bm, bn, bk, w, s in _GPU_CONFIGS]
        # Layout flags in the key: on a square layer the forward (W K-major) and dX (W row-major) have
        # the same M, N, K and deserve their own configs.
        _AUTOTUNED["k"] = triton.autotune(configs=configs, key=["M", "N", "K1", "K2", "B1_KMAJOR", "B2_KMAJOR",
                                                                "HAS_SECOND"],
                                          prune_configs_by={"early_config_prune": _prune})(
            _runtime.for_current_mode(_concat_k_matmul_tma_kernel))
    return _AUTOTUNED["k"]


def launch(a1, b1, a2, b2, out, *, alpha=1.0, beta=1.0, bias=None, config=None):
    """``out = alpha * (a1 @ b1 + beta * a2 @ b2) (+ bias)``; the caller has checked :func:`eligible`."""
    _ensure_allocator()
    bias = bias.contiguous() if bias is not None else None  # read at offsets 0..N-1
    M, K1 = a1.shape
    N = b1.shape[1]
    has_second = a2 is not None
    K2 = a2.shape[1] if has_second else 0
    b1s, b1_kmajor = _layout(b1)
    b2s, b2_kmajor = _layout(b2) if has_second else (b1s, False)
    device = a1.device
    nprog = _runtime.target_programs(device) // 2 if device.type == "cuda" else 4  # one per SM
    args = (a1, b1s, a2 if has_second else a1, b2s, bias if bias is not None else out, out, M, N, K1, K2,
            float(alpha), float(beta))
    flags = dict(B1_KMAJOR=b1_kmajor, B2_KMAJOR=b2_kmajor, HAS_SECOND=has_second, HAS_BIAS=bias is not None,
                 UPCAST=_runtime.upcast_for_interpreter(a1.dtype), DOT_PRECISION=_runtime.dot_precision(a1.dtype),
                 NUM_PROGRAMS=nprog)
    cfg = config or (dict(_INTERP_CONFIG) if _runtime.interpreting() else None)
    if cfg is None:
        # Tuned once per bucket of M (_runtime.autotune_bucket), as concat_matmul's pointer kernel is.
        key = ("chosen", _runtime.autotune_bucket(M), N, K1, K2, b1_kmajor, b2_kmajor, has_second,
               *(t.dtype for t in args[:6]))
        cfg = _AUTOTUNED.get(key)
        if cfg is None:
            grid = lambda meta: (min(nprog, _runtime.cdiv(M, meta["BLOCK_M"])  # noqa: E731
                                     * _runtime.cdiv(N, meta["BLOCK_N"])),)
            tuner = _autotuned_kernel()
            tuner[grid](*args, **flags)
            triton_key = (M, *key[2:8], *(str(dt) for dt in key[8:]))
            _AUTOTUNED[key] = _runtime.chosen_config(tuner, triton_key).all_kwargs()
            return out
    grid = (min(nprog, _runtime.cdiv(M, cfg["BLOCK_M"]) * _runtime.cdiv(N, cfg["BLOCK_N"])),)
    _runtime.for_current_mode(_concat_k_matmul_tma_kernel)[grid](*args, **flags, **cfg)
    return out
