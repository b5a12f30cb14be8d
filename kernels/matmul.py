"""One tiled GEMM over a concatenated K dimension: every product of the fused LoRA forward and backward.

    C = alpha * (A1 @ B1 + beta * mask ⊙ (A2 @ B2)) (+ bias)        A1 (M, K1), B1 (K1, N), A2 (M, K2), B2 (K2, N)

Operands are given as (pointer, strides) of their *logical* shape, so a transposed operand (``W.T``,
``dY.T``) costs nothing. Uses (LoRAFusion, arXiv 2510.00206):

- forward       Y  = [X | S] @ [W | s·B].T + b         A1=X,  B1=W.T, A2=S,  B2=B.T, beta=s
- backward      dX = [dY | dS] @ [W ; A]                A1=dY, B1=W,   A2=dS, B2=A   (dropout: mask, beta=1/(1-p))
- low-rank      S = drop(X) @ A.T,  dS = s·dY @ B,  dA = dS.T @ drop(X),  dB = s·dY.T @ S  (no second term)

The two K loops share one fp32 accumulator, so the low-rank term adds r/BK iterations to the tile and no
extra pass over C.

int8 B1 (a frozen base weight stored as ``q`` int8 with a per-output-channel scale, kernels/int8.py): the
int8 tile is converted to the compute dtype in registers (exact: |q| ≤ 127) and the scale applied where it
is cheapest. ``B1_SCALE=1`` (forward, ``B1 = q.T``: one scale per output column n): the first loop's
accumulator is multiplied by ``scale[n]`` once, before the r-loop adds the low-rank term. ``B1_SCALE=2``
(dX, ``B1 = q``: one scale per K row): each weight tile row is multiplied by ``scale[k]`` in fp32 and
rounded to the compute dtype, which is what a dequantized bf16 weight holds. Without an output mask, beta is folded into the B2 tile (that is the ``[W | s·B]`` of the
paper); with one (dX under dropout), the second loop gets its own accumulator, and so it does for fp16 operands
with |beta| > 1 (:func:`beta_on_acc`): s·B rounded to fp16 overflows past 65504 (|B| = 10 at s = 1e4: Y all
NaN), where the twin's S·Bᵀ, scaled afterwards, stays finite.

A split over K1 (``split > 1``) serves the reductions over tokens (dA, dB): each split writes an fp32 partial
that :func:`sum_splits` adds in a fixed order (deterministic), or adds its partial into a zeroed fp32
output with ``tl.atomic_add`` (``atomic=True``: faster, not bitwise reproducible).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime

MASK_NONE, MASK_A1, MASK_B1, MASK_OUT2 = 0, 1, 2, 3  # which operand the uint8 keep-mask multiplies

# True: products that TMA can read (kernels/matmul_tma.py: eligible) take the persistent TMA-descriptor
# kernel instead of the pointer kernel below. Off: on the H200 (2026-12-04, provider ``fused_tma``) faster at
# d=4096 and slower at d=2048 (kernels/matmul_tma.py); tests run both.
TMA_GEMM = False


@triton.jit
def _concat_k_matmul_kernel(
        a1_ptr, b1_ptr, a2_ptr, b2_ptr, mask_ptr, bias_ptr, b1s_ptr, c_ptr,
        M, N, K1, K2, k1_per_split,
        stride_a1m, stride_a1k, stride_b1k, stride_b1n,
        stride_a2m, stride_a2k, stride_b2k, stride_b2n,
        stride_mask0, stride_mask1, stride_cs, stride_cm, stride_cn,
        alpha, beta,
        HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_MODE: tl.constexpr, ATOMIC: tl.constexpr,
        B1_SCALE: tl.constexpr, BETA_ON_ACC: tl.constexpr,
        EVEN_K1: tl.constexpr, EVEN_K2: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped tile order: GROUP_M row-tiles share each B column-tile while it is hot in L2.
    # Kernels here call only core builtins, no triton.language.standard @jit helpers (tl.cdiv, tl.zeros,
    # tl.zeros_like): those are decorated once, when triton is imported, so they would break the
    # interpreter whenever TRITON_INTERPRET is set after `import triton` (see _runtime.for_current_mode).
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped row/column indices: loads need no M/N mask (the store masks them). No max_contiguous /
    # multiple_of hints: a wrapped last tile is not contiguous, and a hint would let vector loads read past
    # the row end; the compiler still vectorizes by itself when N is a multiple of 16.
    rm = offs_m % M
    rn = offs_n % N
    rk = tl.arange(0, BLOCK_K)

    k_start = pid_k * k1_per_split
    k_end = min(K1, k_start + k1_per_split)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + rk
        a_ptrs = a1_ptr + rm[:, None] * stride_a1m + kk[None, :] * stride_a1k
        b_ptrs = b1_ptr + kk[:, None] * stride_b1k + rn[None, :] * stride_b1n
        if EVEN_K1:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=kk[None, :] < k_end, other=0.0)
            b = tl.load(b_ptrs, mask=kk[:, None] < k_end, other=0.0)
        if MASK_MODE == 1:  # dropout on A1 = X (M, K1): S = drop(X) @ A.T
            keep = tl.load(mask_ptr + rm[:, None] * stride_mask0 + kk[None, :] * stride_mask1,
                           mask=kk[None, :] < k_end, other=0)
            a = tl.where(keep != 0, a, 0.0)
        if MASK_MODE == 2:  # dropout on B1 = X (K1 = tokens, N): dA = dS.T @ drop(X)
            keep = tl.load(mask_ptr + kk[:, None] * stride_mask0 + rn[None, :] * stride_mask1,
                           mask=kk[:, None] < k_end, other=0)
            b = tl.where(keep != 0, b, 0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if B1_SCALE == 2:  # int8 weight rows (K) times their scale: the dequantized tile, in registers
            ks = tl.load(b1s_ptr + kk, mask=kk < k_end, other=0.0).to(tl.float32)
            b = (b.to(tl.float32) * ks[:, None]).to(a.dtype)
        elif B1_SCALE == 1:
            b = b.to(a.dtype)  # int8 -> 16-bit/fp32 is exact; the scale waits for the epilogue
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if B1_SCALE == 1:  # per-output-column scale of the int8 weight, before the low-rank term joins
        acc = acc * tl.load(b1s_ptr + rn).to(tl.float32)[None, :]

    if HAS_SECOND:  # the short r-loop of the concatenated K: [A1 | A2] @ [B1 ; B2]
        if BETA_ON_ACC:  # an output mask (MASK_MODE 3), or a beta that fp16's beta·B2 tile could not hold
            acc2 = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K2, BLOCK_K):
            kk = k0 + rk
            a_ptrs = a2_ptr + rm[:, None] * stride_a2m + kk[None, :] * stride_a2k
            b_ptrs = b2_ptr + kk[:, None] * stride_b2k + rn[None, :] * stride_b2n
            if EVEN_K2:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=kk[None, :] < K2, other=0.0)
                b = tl.load(b_ptrs, mask=kk[:, None] < K2, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if BETA_ON_ACC:
                acc2 = tl.dot(a, b, acc2, input_precision=DOT_PRECISION)
            else:  # [W | beta·B]: scale the small B2 tile, not the big accumulator
                b = (b.to(tl.float32) * beta).to(a.dtype)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if MASK_MODE == 3:  # dX = dY @ W + keep ⊙ (dS @ A) / (1 - p)
            keep = tl.load(mask_ptr + rm[:, None] * stride_mask0 + rn[None, :] * stride_mask1)
            acc += tl.where(keep != 0, acc2 * beta, 0.0)
        elif BETA_ON_ACC:
            acc += acc2 * beta

    acc = acc * alpha
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    c_ptrs = c_ptr + pid_k.to(tl.int64) * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if ATOMIC:
        tl.atomic_add(c_ptrs, acc, mask=c_mask, sem="relaxed")  # a sum: no ordering needed
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _sum_splits_kernel(p_ptr, out_ptr, numel, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """out = p[0] + p[1] + ... in that order: the deterministic end of a split-K reduction."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < numel
    acc = tl.load(p_ptr + offs, mask=valid, other=0.0)
    for i in tl.static_range(1, SPLIT):
        acc += tl.load(p_ptr + i * numel + offs, mask=valid, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------
# Interpreter: one config (multi-config autotune calls the GPU benchmarker). 32x32x16 keeps the CPU tests
# fast while awkward test shapes still span several tiles and a ragged last K block.
_INTERP_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1)
# GPU: BLOCK_K is 64 in every config so the launcher knows EVEN_K before tuning. Hopper leads (the GPU
# machine's notes, not yet measured here): 128x128x64 tiles, 8 warps, 3-4 stages of software pipelining.
_GPU_BLOCK_K = 64
_GPU_CONFIGS = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3), (256, 128, 8, 3),
                (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4)]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)


def _fixed_gpu_config(M: int, N: int) -> dict:
    """One shape-derived config: used when autotuning must not run (deterministic mode, split/atomic
    outputs that benchmarking would corrupt) and for the small rank-r products."""
    bm = 128 if M >= 128 else 64
    bn = 128 if N > 64 else max(16, _runtime.next_power_of_2(N))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=_GPU_BLOCK_K, GROUP_M=8,
                num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=3)


def _prune(configs, named_args, **kwargs):
    """No BLOCK_N much wider than N; none whose pipeline overflows shared memory (fp32: three of them)."""
    n, in_bytes = named_args["N"], named_args["a1_ptr"].element_size()
    keep = [c for c in configs if c.kwargs["BLOCK_N"] <= max(64, _runtime.next_power_of_2(n))
            and _runtime.pipeline_fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                       c.num_stages, in_bytes)]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]


_AUTOTUNED = {}  # "k": the autotuned kernel; ("chosen", ...autotune key): the config it chose for that key


def _autotuned_kernel():
    """The GEMM kernel wrapped in ``triton.autotune`` (built on first GPU use, never at import)."""
    if "k" not in _AUTOTUNED:
        configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=_GPU_BLOCK_K, GROUP_M=8),
                                 num_warps=w, num_stages=s) for bm, bn, w, s in _GPU_CONFIGS]
        # The strides and flags are in the key: on a square layer Y = X·Wᵀ and dX = dY·W have the same
        # M, N, K but read W transposed from each other, and each deserves its own tuned config.
        _AUTOTUNED["k"] = triton.autotune(configs=configs, key=["M", "N", "K1", "K2", "stride_b1k", "stride_b2k",
                                                                "HAS_SECOND", "MASK_MODE", "B1_SCALE"],
                                          prune_configs_by={"early_config_prune": _prune},
                                          )(_runtime.for_current_mode(_concat_k_matmul_kernel))
    return _AUTOTUNED["k"]


def _split_count(M: int, N: int, K1: int, cfg: dict, device: torch.device) -> int:
    tiles = _runtime.cdiv(M, cfg["BLOCK_M"]) * _runtime.cdiv(N, cfg["BLOCK_N"])
    k_blocks = _runtime.cdiv(K1, cfg["BLOCK_K"])
    # Leave each split >= 4 K-blocks of work (GPU) so the pipeline has something to overlap.
    min_blocks = 1 if device.type == "cpu" else 4
    return max(1, min(_runtime.target_programs(device) // tiles, k_blocks // min_blocks, 32))


# ----------------------------------------------------------------------------------------------------
# Launchers (no autograd): importable by tests and benchmarks
# ----------------------------------------------------------------------------------------------------
def concat_matmul(a1, b1, a2=None, b2=None, *, alpha=1.0, beta=1.0, bias=None, mask=None, mask_mode=MASK_NONE,
                  out_dtype=None, reduce_k=False, deterministic=False, out=None, b1_scale=None, b1_scale_mode=0,
                  config=None):
    """C = alpha * (a1 @ b1 + beta * mask ⊙ (a2 @ b2)) (+ bias), fp32 accumulation.

    a1 (M, K1), b1 (K1, N), a2 (M, K2), b2 (K2, N): any strides (pass ``W.t()`` etc.). ``mask``: bool or
    uint8 keep-mask shaped like the operand named by ``mask_mode``. ``reduce_k``: K1 is a long reduction
    with few output tiles (dA, dB over tokens): split it over programs, combining the fp32 partials in a
    fixed order when ``deterministic`` or with atomics otherwise. Returns C (M, N) of ``out_dtype``
    (default a1's dtype), written into ``out`` when given. ``b1`` int8 with ``b1_scale``: B1 is
    ``b1 · b1_scale`` per column (``b1_scale_mode=1``, shape (N,)) or per row (``b1_scale_mode=2``, (K1,)).
    ``config``: an explicit launch config (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages and,
    with ``reduce_k``, optionally ``split``) instead of the built-in choice; for launch/tune_kernels.py.
    """
    M, K1 = a1.shape
    N = b1.shape[1]
    assert b1.shape[0] == K1, (a1.shape, b1.shape)
    has_second = a2 is not None
    K2 = a2.shape[1] if has_second else 0
    if has_second:
        assert a2.shape[0] == M and b2.shape == (K2, N), (a2.shape, b2.shape)
    assert not (reduce_k and has_second)
    assert not (reduce_k and bias is not None), "every K split would add the bias: add it after the reduction"
    if b1.dtype == torch.int8:
        want = {1: (N,), 2: (K1,)}.get(b1_scale_mode)
        assert want is not None and b1_scale is not None and b1_scale.shape == want and not reduce_k, \
            (b1_scale_mode, None if b1_scale is None else b1_scale.shape)
    else:
        assert b1_scale is None and b1_scale_mode == 0
    # The kernels read the bias and the scales at offsets 0..n-1: a strided view (bias[::2]) or an expanded one
    # would be read wrong.
    bias = bias.contiguous() if bias is not None else None
    b1_scale = b1_scale.contiguous() if b1_scale is not None else None
    device = a1.device
    out_dtype = out_dtype or a1.dtype
    if out is None:
        out = _runtime.new_empty((M, N), out_dtype, device)
    if M == 0 or N == 0:
        return out
    if K1 == 0 and K2 == 0:
        out.zero_() if bias is None else out.copy_(bias.expand(M, N))
        return out

    mask_t = mask.view(torch.uint8) if mask is not None and mask.dtype == torch.bool else mask
    mask_mode = mask_mode if mask_t is not None else MASK_NONE
    on_acc = has_second and (mask_mode == MASK_OUT2 or beta_on_acc(a2.dtype, beta))
    if TMA_GEMM and config is None and not deterministic and not on_acc:  # the TMA kernel autotunes; it folds beta
        from . import matmul_tma
        if matmul_tma.eligible(a1, b1, a2, b2, out, mask_t, b1_scale, reduce_k):
            return matmul_tma.launch(a1, b1, a2, b2, out, alpha=alpha, beta=beta, bias=bias)

    interp = _runtime.interpreting()
    deterministic = bool(deterministic)
    forced_split = None
    if config is not None:
        cfg = dict(config)
        forced_split = cfg.pop("split", None)
    elif interp:
        cfg = dict(_INTERP_CONFIG)
    elif reduce_k or deterministic or N <= 64 or M <= 64:
        cfg = _fixed_gpu_config(M, N)
    else:
        cfg = None  # autotune
    split = (forced_split or _split_count(M, N, K1, cfg, device)) if reduce_k else 1
    block_k = cfg["BLOCK_K"] if cfg else _GPU_BLOCK_K
    # (K1 = 0 beside a second term: one split whose first loop runs no iteration)
    k1_per_split = max(block_k, _runtime.cdiv(_runtime.cdiv(K1, split), block_k) * block_k)
    split = max(1, _runtime.cdiv(K1, k1_per_split))

    atomic = split > 1 and not deterministic
    if split == 1:
        target, stride_cs = out, 0
    elif atomic:
        target = out if (out_dtype == torch.float32 and out.is_contiguous()) else None
        target = torch.zeros((M, N), dtype=torch.float32, device=device) if target is None else target.zero_()
        stride_cs = 0
    else:
        target = _runtime.new_empty((split, M, N), torch.float32, device)
        stride_cs = target.stride(0)
    c2d = target if target.dim() == 2 else target[0]

    dummy = c2d  # never dereferenced when the matching constexpr flag is off
    ms = mask_t.stride() if mask_t is not None else (0, 0)
    args = [a1, b1, a2 if has_second else dummy, b2 if has_second else dummy,
            mask_t if mask_t is not None else dummy, bias if bias is not None else dummy,
            b1_scale if b1_scale is not None else dummy, c2d,
            M, N, K1, K2, k1_per_split,
            a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1),
            a2.stride(0) if has_second else 0, a2.stride(1) if has_second else 0,
            b2.stride(0) if has_second else 0, b2.stride(1) if has_second else 0,
            ms[0], ms[1], stride_cs, c2d.stride(0), c2d.stride(1),
            float(alpha), float(beta)]
    flags = dict(HAS_SECOND=has_second, HAS_BIAS=bias is not None, MASK_MODE=mask_mode, ATOMIC=atomic,
                 B1_SCALE=b1_scale_mode, BETA_ON_ACC=on_acc,
                 EVEN_K1=(K1 % k1_per_split == 0 and k1_per_split % block_k == 0),
                 EVEN_K2=(K2 % block_k == 0), UPCAST=_runtime.upcast_for_interpreter(a1.dtype),
                 DOT_PRECISION=_runtime.dot_precision(a1.dtype))
    if cfg is None:
        # triton's Autotuner.run rebuilds its key from all 37 arguments on every launch (a filter quadratic in
        # their number: ~15-20 us per launch on this repository's CPU with Triton 3.9; 3.6 runs the same
        # code). Ours is built from the few values that key reads, with M (the tokens) bucketed: once the
        # autotuner has tuned a bucket, a launch goes straight to the kernel with the config it chose there.
        key = ("chosen", _runtime.autotune_bucket(M), N, K1, K2, b1.stride(0), b2.stride(0) if has_second else 0,
               has_second, flags["MASK_MODE"], b1_scale_mode, *(t.dtype for t in args[:8]))
        chosen = _AUTOTUNED.get(key)
        if chosen is None:
            tuner = _autotuned_kernel()
            grid = lambda meta: (_runtime.cdiv(M, meta["BLOCK_M"]) * _runtime.cdiv(N, meta["BLOCK_N"]),  # noqa: E731
                                 1)
            tuner[grid](*args, **flags)
            triton_key = (M, *key[2:10], *(str(dt) for dt in key[10:]))
            _AUTOTUNED[key] = _runtime.chosen_config(tuner, triton_key).all_kwargs()
        else:
            grid = (_runtime.cdiv(M, chosen["BLOCK_M"]) * _runtime.cdiv(N, chosen["BLOCK_N"]), 1)
            _runtime.for_current_mode(_concat_k_matmul_kernel)[grid](*args, **flags, **chosen)
    else:
        kernel = _runtime.for_current_mode(_concat_k_matmul_kernel)
        grid = (_runtime.cdiv(M, cfg["BLOCK_M"]) * _runtime.cdiv(N, cfg["BLOCK_N"]), split)
        if config is None and not interp:
            _runtime.launch_fixed(kernel, grid, args, flags, cfg, a1.dtype, device)
        else:
            kernel[grid](*args, **flags, **cfg)

    if split > 1:
        if atomic:
            if target is not out:
                out.copy_(target)
        else:
            sum_splits(target, out)
    return out


def beta_on_acc(dtype: torch.dtype, beta: float) -> bool:
    """Whether beta must scale the second product's own fp32 accumulator rather than be folded into the B2 tile
    in the operands' dtype: fp16 (finite to 65504) with |beta| > 1, where beta·B2 can overflow. bf16 and fp32
    have fp32's range, and |beta| <= 1 keeps any finite B2 finite."""
    return dtype == torch.float16 and not abs(float(beta)) <= 1.0  # not <=: a NaN beta too


def sum_splits(partials: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = partials[0] + partials[1] + ... (fixed order), cast to ``out``'s dtype. partials: (S, M, N) fp32."""
    split = partials.shape[0]
    numel = out.numel()
    assert partials.is_contiguous() and out.is_contiguous() and partials[0].numel() == numel
    block = 1024
    kernel = _runtime.for_current_mode(_sum_splits_kernel)
    kernel[(_runtime.cdiv(numel, block),)](partials, out, numel, SPLIT=split, BLOCK=block, num_warps=4)
    return out
