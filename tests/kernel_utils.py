"""Shared helpers of the kernel tests: shapes, tolerances, inputs, and the kernel-vs-twin runner.

Tolerances: relative Frobenius error against the float64 reference on the same inputs (and the same
dropout mask). Under the interpreter, bf16 dots are upcast to fp32 (its bf16 ``tl.dot`` is broken, Triton
#11584) and its fp32->bf16 cast truncates instead of rounding, so bf16 errors there are ~2x a GPU's.
"""
from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

import relora_kernels as rk

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


def _triton_version() -> tuple[int, ...]:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return tuple(int(p) for p in version("triton").split(".")[:2])
    except PackageNotFoundError:
        return (0, 0)


# The GPU image's Triton 3.6: its interpreter cannot take tensor-valued range() bounds (tensor.__index__
# without squeeze; BENCHMARKS.md), which the kernels use. CI's newest Triton runs these.
interpreter_3_7 = pytest.mark.skipif(_triton_version() < (3, 7), reason="Triton 3.6's interpreter cannot take "
                                     "tensor-valued range() bounds, which the kernels use")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA GPU: the kernels then run compiled (bf16/fp16/fp32)"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {("cpu", torch.float32): 1e-5, ("cuda", torch.float32): 3e-4,  # fp32 dots are 3xTF32 on GPU
       torch.float16: 1e-2, torch.bfloat16: 1e-2}

# (leading dims of x, d_in, d_out, r, bias). Block sizes under the interpreter: BLOCK_M/N 32, BLOCK_K 16 (the
# GEMM's; the merge's 32), BLOCK_R 16 (merge) / 32 (dS+dB). ((70,), 96, 40, 16) is the aligned case: d_in=96
# and r=16 are multiples of BLOCK_K, so its forward takes the unmasked EVEN_K1/EVEN_K2 loads; the others have
# d_in off every block size (ragged last K blocks), and r off them too but for r=256. r=1, r > BLOCK_R, and the large ranks: r=256 (several r-blocks of every
# kernel on a GPU too: BLOCK_R 64-128, BLOCK_K 64; 3-D x of 10 tokens) and r=129 (one past a multiple of
# every block size).
SHAPES = [((70,), 96, 40, 16, True), ((2, 17), 50, 96, 1, False), ((33,), 40, 70, 40, True),
          ((1,), 17, 19, 3, False), ((2, 5), 50, 40, 256, True), ((37,), 40, 33, 129, False)]
GPU_SHAPES = [((4, 300), 1000, 1500, 128, True), ((1024,), 1024, 2048, 64, False), ((777,), 2048, 640, 256, True)]


def tol(device, dtype):
    return TOL.get((device, dtype), TOL.get(dtype))


def rel_err(got, want):
    assert torch.isfinite(got).all(), "non-finite values (an unwritten, NaN-poisoned element?)"
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def make_inputs(lead, d_in, d_out, r, has_bias, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(device=device, dtype=dtype)  # noqa: E731
    x = rnd(*lead, d_in).requires_grad_()
    w = rnd(d_out, d_in, std=d_in ** -0.5)
    a = rnd(r, d_in, std=d_in ** -0.5).requires_grad_()
    b = rnd(d_out, r, std=r ** -0.5).requires_grad_()  # random, never the zero init: zeros hide bugs
    bias = rnd(d_out).requires_grad_() if has_bias else None
    dy = rnd(*lead, d_out)
    return x, w, a, b, bias, dy


def run_both(x, w, a, b, bias, dy, scale, dropout_seed=None, **kw):
    """(kernel outputs, float64 reference outputs on the same device): [y, dx, dA, dB(, dbias)].

    With ``dropout_seed``, both paths draw their mask from identically seeded generators on x's device.
    """
    def gen():
        return None if dropout_seed is None else torch.Generator(device=x.device).manual_seed(dropout_seed)
    leaves = [t for t in (x, a, b, bias) if t is not None]
    y = rk.lora_linear(x, w, a, b, scale, bias, generator=gen(), **kw)
    got = [y, *torch.autograd.grad(y, leaves, dy)]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    biasr = ref_leaves[3] if bias is not None else None
    yr = rk.lora_linear_reference(ref_leaves[0], w.double(), ref_leaves[1], ref_leaves[2], scale, biasr,
                                  generator=gen(), **{k: v for k, v in kw.items() if k != "deterministic"})
    want = [yr, *torch.autograd.grad(yr, ref_leaves, dy.double())]
    return got, want


NAMES = ["y", "dx", "dA", "dB", "dbias"]


def count_layer_launches(monkeypatch) -> collections.Counter:
    """Counts, from now on, the Triton layer path's forward and backward launches (relora_kernels.linear's
    ``lora_forward`` / ``lora_backward``, whichever calls them: the plain call or a registered op's body)."""
    from relora_kernels import linear
    calls = collections.Counter()
    for name in ("lora_forward", "lora_backward"):
        def counted(*args, _real=getattr(linear, name), _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(linear, name, counted)
    return calls


def record_launches(monkeypatch, launch: bool = True) -> list:
    """Records, from now on, every Triton launch the kernels make (all go through
    ``_runtime.for_current_mode(kernel)[grid](...)``) as (kernel name, its keyword arguments: the constexpr
    flags and the launch config). ``launch=False``: record only, run nothing (outputs stay unwritten)."""
    from relora_kernels import _runtime, matmul
    launches = []
    real = _runtime.for_current_mode
    # The autotuned GEMM is built once around for_current_mode's result and cached: built afresh while
    # recording (its launches recorded), and dropped after (no recording wrapper outlives the test).
    monkeypatch.setattr(matmul, "_AUTOTUNED", {})

    class Recorded:
        def __init__(self, kernel):
            self.kernel, self.fn = kernel, kernel.fn  # _runtime.launch_fixed keys its cache on .fn

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches.append((self.fn.__name__, kwargs))
                if launch:
                    real(self.kernel)[grid](*args, **kwargs)
            return run
    monkeypatch.setattr(_runtime, "for_current_mode", Recorded)
    return launches


def _shape_id(s):
    return "x".join(map(str, s[0])) + f"-{s[1]}-{s[2]}-r{s[3]}" + ("-bias" if s[4] else "")


DEVICE_SHAPES = [pytest.param("cpu", s, id=f"cpu-{_shape_id(s)}") for s in SHAPES] + [
    pytest.param("cuda", s, id=f"cuda-{_shape_id(s)}", marks=DEVICES[1].marks) for s in SHAPES + GPU_SHAPES]
