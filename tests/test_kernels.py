"""relora_kernels: Triton kernels vs their float64 torch twins, on every output and every gradient.

On CPU the kernels run under Triton's interpreter: each test sets TRITON_INTERPRET=1 only for itself
(monkeypatch). That is enough because relora_kernels re-wraps each kernel for the mode in force at launch
(``_runtime.for_current_mode``), so it does not matter which test file imported triton first; a subprocess
test below checks exactly that ordering. With CUDA, the same tests also run un-interpreted ("cuda" params,
the only skip here: they need a GPU) and add larger shapes.

Tolerances: relative Frobenius error against the float64 reference on the same inputs (and the same
dropout mask). Under the interpreter, bf16 dots are upcast to fp32 (its bf16 ``tl.dot`` is broken, Triton
#11584) and its fp32->bf16 cast truncates instead of rounding, so bf16 errors there are ~2x a GPU's.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import relora_kernels as rk
from relora_kernels import _runtime

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA GPU: the kernels then run compiled (bf16/fp16/fp32)"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {("cpu", torch.float32): 1e-5, ("cuda", torch.float32): 3e-4,  # fp32 dots are 3xTF32 on GPU
       torch.float16: 1e-2, torch.bfloat16: 1e-2}

# (leading dims of x, d_in, d_out, r, bias): none is a multiple of a block size; r=1 and r > BLOCK_R.
SHAPES = [((70,), 96, 40, 16, True), ((2, 17), 50, 96, 1, False), ((33,), 40, 70, 40, True),
          ((1,), 17, 19, 3, False)]
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


def _shape_id(s):
    return "x".join(map(str, s[0])) + f"-{s[1]}-{s[2]}-r{s[3]}" + ("-bias" if s[4] else "")


DEVICE_SHAPES = [pytest.param("cpu", s, id=f"cpu-{_shape_id(s)}") for s in SHAPES] + [
    pytest.param("cuda", s, id=f"cuda-{_shape_id(s)}", marks=DEVICES[1].marks) for s in SHAPES + GPU_SHAPES]


@pytest.mark.parametrize("mode", ["fused", "splitdb", "det", "tma", "blas_lr"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,shape", DEVICE_SHAPES)
def test_lora_linear_matches_reference(kernels_on, device, dtype, shape, mode, monkeypatch):
    """fused: dS+dB in one read of dY (atomics); splitdb: dB its own GEMM (atomics); det: no atomics;
    tma: fused, with the big products on the TMA-descriptor kernel where TMA can read them; blas_lr: the
    rank-r products on torch.mm, the concat-K products on Triton."""
    import relora_kernels.linear as linear_mod
    import relora_kernels.matmul as matmul_mod
    monkeypatch.setattr(linear_mod, "FUSE_DS_DB", mode in ("fused", "tma"))
    monkeypatch.setattr(matmul_mod, "TMA_GEMM", mode == "tma")
    monkeypatch.setattr(linear_mod, "LOWRANK_BLAS", mode == "blas_lr")
    deterministic = mode == "det"
    lead, d_in, d_out, r, has_bias = shape
    x, w, a, b, bias, dy = make_inputs(lead, d_in, d_out, r, has_bias, dtype, device, seed=7 * d_in + d_out + r)
    got, want = run_both(x, w, a, b, bias, dy, scale=0.7, deterministic=deterministic)
    assert got[0].shape == (*lead, d_out) and got[0].dtype == dtype and got[1].shape == x.shape
    errs = {n: rel_err(g, t) for n, g, t in zip(NAMES, got, want)}
    assert all(e <= tol(device, dtype) for e in errs.values()), errs


@pytest.mark.parametrize("device", DEVICES)
def test_tma_gemm_runs_where_eligible_and_falls_back_elsewhere(kernels_on, device, monkeypatch):
    """TMA_GEMM on: the forward and dX products of an aligned layer go through the TMA kernel (poisoned
    outputs fully written, values match); unaligned widths, a dropout mask or an int8 weight fall back."""
    import relora_kernels.matmul as matmul_mod
    from relora_kernels import matmul_tma
    monkeypatch.setattr(matmul_mod, "TMA_GEMM", True)
    calls = []
    real = matmul_tma.launch
    monkeypatch.setattr(matmul_tma, "launch", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x, w, a, b, bias, dy = make_inputs((2, 35), 96, 48, 16, True, torch.float32, device, seed=1)
    got, want = run_both(x, w, a, b, bias, dy, scale=0.7)
    assert all(rel_err(g, t) <= tol(device, torch.float32) for g, t in zip(got, want))
    assert calls == [(70, 96), (70, 96), (70, 48)]  # S = X·Aᵀ, Y = [X|S]·[W|s·B]ᵀ, dX = [dY|dS]·[W;A]
    calls.clear()
    x, w, a, b, bias, dy = make_inputs((33,), 40, 70, 8, True, torch.float32, device, seed=2)  # 70·4 B % 16 ≠ 0
    got, want = run_both(x, w, a, b, bias, dy, scale=0.7)
    assert all(rel_err(g, t) <= tol(device, torch.float32) for g, t in zip(got, want))
    assert calls == [(33, 40)]  # only S = X·Aᵀ; Y (33 x 70) and dX (dY is 33 x 70) take the pointer kernel
    out = torch.empty(8, 16, device=device)
    a1, b1 = torch.randn(8, 32, device=device), torch.randn(16, 32, device=device).t()
    assert matmul_tma.eligible(a1, b1, None, None, out, None, None, False)
    assert not matmul_tma.eligible(a1, b1, None, None, out, torch.ones(8, 32, dtype=torch.uint8), None, False)
    assert not matmul_tma.eligible(a1, b1.to(torch.int8), None, None, out, None, torch.ones(16), False)
    assert not matmul_tma.eligible(a1[:, 1:], b1[1:], None, None, out, None, None, False)  # misaligned view


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_dropout_mask_consistent_with_reference(kernels_on, device, dtype):
    """Same generator seed -> same mask on both paths: S = drop(X)A^T, dA = dS^T drop(X), dX masked."""
    x, w, a, b, bias, dy = make_inputs((3, 23), 40, 50, 8, True, dtype, device, seed=7)
    for deterministic in (False, True):
        got, want = run_both(x, w, a, b, bias, dy, 2.0, dropout_seed=5, dropout_p=0.3, deterministic=deterministic)
        errs = {n: rel_err(g, t) for n, g, t in zip(NAMES, got, want)}
        assert all(e <= tol(device, dtype) for e in errs.values()), errs
    # The mask does something, and eval mode (training=False) turns it off.
    no_drop = rk.lora_linear(x, w, a, b, 2.0, bias)
    dropped = rk.lora_linear(x, w, a, b, 2.0, bias, dropout_p=0.3)
    assert rel_err(dropped, no_drop) > 10 * tol(device, dtype)
    evaluated = rk.lora_linear(x, w, a, b, 2.0, bias, dropout_p=0.3, training=False)
    assert torch.equal(evaluated, no_drop)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_mode_is_bitwise_reproducible(kernels_on, device, monkeypatch):
    x, w, a, b, bias, dy = make_inputs((2, 45), 64, 48, 12, True, torch.float16, device, seed=3)
    monkeypatch.setenv("RELORA_DETERMINISTIC", "1")
    runs = []
    for _ in range(2):
        y = rk.lora_linear(x, w, a, b, 0.5, bias)
        runs.append([y, *torch.autograd.grad(y, [x, a, b, bias], dy)])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("device", DEVICES)
def test_partial_gradients(kernels_on, device):
    """Only the grads autograd asks for: x alone (frozen LoRA), LoRA alone (x a leaf without grad), and a
    trainable W (its dW comes from plain torch; ReLoRA keeps W frozen)."""
    x, w, a, b, bias, dy = make_inputs((29,), 36, 44, 6, True, torch.float32, device, seed=5)
    t = tol(device, torch.float32)
    _, want = run_both(x, w, a, b, bias, dy, 0.9)
    y = rk.lora_linear(x, w, a.detach(), b.detach(), 0.9, bias.detach())
    (dx,) = torch.autograd.grad(y, [x], dy)
    assert rel_err(dx, want[1]) <= t
    y = rk.lora_linear(x.detach(), w, a, b, 0.9)
    da, db = torch.autograd.grad(y, [a, b], dy)
    assert rel_err(da, want[2]) <= t and rel_err(db, want[3]) <= t
    w_train = w.clone().requires_grad_()
    (dw,) = torch.autograd.grad(rk.lora_linear(x, w_train, a, b, 0.9, bias), [w_train], dy)
    assert rel_err(dw, dy.double().t() @ x.double()) <= t


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_computes_in_autocast_dtype(kernels_on, device):
    """Under autocast, fp32 inputs/params run the kernels in the autocast dtype, like F.linear does."""
    x, w, a, b, bias, dy = make_inputs((21,), 40, 24, 4, True, torch.float32, device, seed=9)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = rk.lora_linear(x, w, a, b, 0.5, bias)
    assert y.dtype == torch.bfloat16
    got = [y, *torch.autograd.grad(y, [x, a, b, bias], dy.bfloat16())]
    assert all(g.dtype == torch.float32 for g in got[1:])
    _, want = run_both(x, w, a, b, bias, dy, 0.5)
    errs = {n: rel_err(g, t) for n, g, t in zip(NAMES, got, want)}
    assert all(e <= tol(device, torch.bfloat16) for e in errs.values()), errs


@pytest.mark.parametrize("lora_dtype", ["same", "fp32"])
@pytest.mark.parametrize("wdtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(70, 45, 5), (33, 96, 1), (64, 64, 16)], ids=lambda s: "x".join(map(str, s)))
def test_lora_merge_matches_reference(kernels_on, device, wdtype, lora_dtype, shape):
    d_out, d_in, r = shape
    g = torch.Generator().manual_seed(d_out * r)
    ldtype = wdtype if lora_dtype == "same" else torch.float32
    w = torch.randn(d_out, d_in, generator=g).to(device, wdtype)
    a = torch.randn(r, d_in, generator=g).to(device, ldtype)
    b = torch.randn(d_out, r, generator=g).to(device, ldtype)
    scale = 2.0 / r ** 0.5  # delta ~ 2x W: the error metric below then sees the merge, not W's rounding
    w0 = w.clone()
    ptr = w.data_ptr()
    assert rk.lora_merge_(w, a, b, scale) is w and w.data_ptr() == ptr
    exact_delta = scale * (b.double() @ a.double())
    assert rel_err(w.double() - w0.double(), exact_delta) <= tol(device, wdtype)
    w_ref = rk.lora_merge_reference_(w0.clone(), a, b, scale)
    assert rel_err(w_ref.double() - w0.double(), exact_delta) <= tol(device, wdtype)


@pytest.mark.parametrize("device", DEVICES)
def test_lora_merge_strided_weight(kernels_on, device):
    base = torch.randn(48, 70, device=device)
    w = base.t()  # (70, 48), not contiguous
    a, b = torch.randn(4, 48, device=device), torch.randn(70, 4, device=device)
    want = w.double() + 0.5 * (b.double() @ a.double())
    rk.lora_merge_(w, a, b, 0.5)
    assert rel_err(base.t(), want) <= tol(device, torch.float32)


class TinyLoRAMLP(torch.nn.Module):
    """Two lora_linear layers (frozen W, trainable A/B/bias) on random data: a self-contained stack."""

    def __init__(self, d_in=32, hidden=48, d_out=10, r=4, device="cpu", seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        p = lambda *s, std: torch.nn.Parameter((torch.randn(*s, generator=g) * std).to(device))  # noqa: E731
        self.w1 = p(hidden, d_in, std=d_in ** -0.5).requires_grad_(False)
        self.w2 = p(d_out, hidden, std=hidden ** -0.5).requires_grad_(False)
        self.a1, self.b1 = p(r, d_in, std=d_in ** -0.5), p(hidden, r, std=0.1)
        self.a2, self.b2 = p(r, hidden, std=hidden ** -0.5), p(d_out, r, std=0.1)
        self.bias1, self.bias2 = p(hidden, std=0.1), p(d_out, std=0.1)
        self.scale = 2.0

    def forward(self, x, generator):
        h = F.gelu(rk.lora_linear(x, self.w1, self.a1, self.b1, self.scale, self.bias1, dropout_p=0.1,
                                  generator=generator))
        return rk.lora_linear(h, self.w2, self.a2, self.b2, self.scale, self.bias2, dropout_p=0.1,
                              generator=generator)

    @torch.no_grad()
    def merge_and_reinit(self, generator):
        """A ReLoRA restart: fold B·A into W, then fresh A and B (B random here, not zero)."""
        for w, a, b in ((self.w1, self.a1, self.b1), (self.w2, self.a2, self.b2)):
            rk.lora_merge_(w, a, b, self.scale)
            a.copy_(torch.randn(a.shape, generator=generator).to(a.device) * a.shape[1] ** -0.5)
            b.copy_(torch.randn(b.shape, generator=generator).to(b.device) * 0.1)


def train_curve(device, steps=6, merge_at=3):
    model = TinyLoRAMLP(device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g_data = torch.Generator().manual_seed(1)
    g_drop = torch.Generator(device=device).manual_seed(2)
    g_init = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 32, generator=g_data).to(device)
    labels = torch.randint(0, 10, (2, 16), generator=g_data).to(device)
    losses = []
    for step in range(steps):
        if step == merge_at:
            model.merge_and_reinit(g_init)
        loss = F.cross_entropy(model(x, g_drop).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_training_run_kernels_match_reference(kernels_on, device, monkeypatch):
    kernel_losses = train_curve(device)
    monkeypatch.setenv("RELORA_KERNELS", "reference")
    ref_losses = train_curve(device)
    assert kernel_losses[-1] < kernel_losses[0]
    for k, r in zip(kernel_losses, ref_losses):
        assert abs(k - r) <= tol(device, torch.float32) * abs(r), (kernel_losses, ref_losses)


# ----------------------------------------------------------------------------------------------------
# Dispatch, modes and errors
# ----------------------------------------------------------------------------------------------------
def test_use_triton_modes(monkeypatch):
    cpu = torch.zeros(2)
    monkeypatch.delenv("RELORA_KERNELS", raising=False)
    assert rk.use_triton(cpu) is False  # auto: torch on CPU
    monkeypatch.setenv("RELORA_KERNELS", "reference")
    assert rk.use_triton(cpu) is False
    monkeypatch.setenv("RELORA_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert rk.use_triton(cpu) is True
    with pytest.raises(ValueError, match="float64"):
        rk.use_triton(cpu.double())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rk.use_triton(cpu)
    monkeypatch.setenv("RELORA_KERNELS", "fast")
    with pytest.raises(ValueError, match="RELORA_KERNELS"):
        rk.use_triton(cpu)
    if HAS_CUDA:
        monkeypatch.setenv("RELORA_KERNELS", "auto")
        assert rk.use_triton(cpu.cuda()) is True and rk.use_triton(cpu.cuda().double()) is False
        # auto keeps the measured-slower fused linear on the torch path; triton forces it
        assert rk.use_triton(cpu.cuda(), op="linear") is False
        monkeypatch.setenv("RELORA_KERNELS", "triton")
        assert rk.use_triton(cpu.cuda(), op="linear") is True


def test_reference_mode_is_the_twin_bitwise(monkeypatch):
    monkeypatch.setenv("RELORA_KERNELS", "reference")
    x, w, a, b, bias, _ = make_inputs((5, 3), 12, 7, 2, True, torch.float32, "cpu", seed=0)
    want = rk.lora_linear_reference(x, w, a, b, 0.3, bias, dropout_p=0.2, generator=torch.Generator().manual_seed(0))
    got = rk.lora_linear(x, w, a, b, 0.3, bias, dropout_p=0.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, want)
    direct = F.linear(x, w, bias) + 0.3 * F.linear(F.linear(x, a), b)
    assert torch.equal(rk.lora_linear_reference(x, w, a, b, 0.3, bias), direct)


def test_auto_mode_on_cpu_takes_the_blas_chain(monkeypatch):
    monkeypatch.delenv("RELORA_KERNELS", raising=False)
    cpu = torch.zeros(2)
    assert _runtime.linear_path(cpu) == "torch"
    monkeypatch.setenv("RELORA_KERNELS", "torch")
    assert _runtime.linear_path(cpu) == "torch" and rk.use_triton(cpu) is False
    monkeypatch.setenv("RELORA_KERNELS", "reference")
    assert _runtime.linear_path(cpu) == "reference"
    if HAS_CUDA:  # not yet timed on a GPU: the twin there (AUTO_LINEAR_TORCH_PATH)
        monkeypatch.delenv("RELORA_KERNELS", raising=False)
        assert _runtime.linear_path(cpu.cuda()) == "reference"


# ----------------------------------------------------------------------------------------------------
# The BLAS-chain path (kernels/torch_linear.py): same values and gradients as the twin, less saved
# ----------------------------------------------------------------------------------------------------
TORCH_PATH_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("merged", ["0", "1"], ids=["epilogue", "merged"])
@pytest.mark.parametrize("dtype", list(TORCH_PATH_TOL), ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=_shape_id)
def test_torch_path_matches_reference(monkeypatch, dtype, dropout_p, shape, merged):
    """Every output and gradient (x, W when trainable, A, B, bias) against the float64 twin, same mask.
    merged: W_eff = W + s·B·A GEMMs (without dropout; with dropout the epilogue chain runs)."""
    monkeypatch.setenv("RELORA_KERNELS", "torch")
    monkeypatch.setenv("RELORA_MERGED_WEIGHT", merged)
    x, w, a, b, bias, dy = make_inputs(*shape, dtype, "cpu", seed=11)
    w.requires_grad_()
    leaves = [t for t in (x, w, a, b, bias) if t is not None]
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    y = rk.lora_linear(x, w, a, b, 0.7, bias, dropout_p=dropout_p, generator=gen())
    got = [y, *torch.autograd.grad(y, leaves, dy)]
    ref = [t.detach().double().requires_grad_() for t in leaves]
    yr = rk.lora_linear_reference(ref[0], ref[1], ref[2], ref[3], 0.7, ref[4] if bias is not None else None,
                                  dropout_p=dropout_p, generator=gen())
    want = [yr, *torch.autograd.grad(yr, ref, dy.double())]
    for name, g_, w_ in zip(["y", "dx", "dW", "dA", "dB", "dbias"], got, want):
        assert g_.dtype == dtype and g_.shape == w_.shape, name
        assert rel_err(g_, w_) < TORCH_PATH_TOL[dtype], name


def test_merged_weight_dispatch_and_bf16_accuracy(monkeypatch):
    """Which variant runs (env, device default, dropout), and the merged variant's bf16 error: W_eff is
    rounded once to bf16, like a merged bf16 model, so y stays within bf16 rounding of the fp64 result."""
    from relora_kernels import torch_linear
    cpu = torch.zeros(1)
    monkeypatch.delenv("RELORA_MERGED_WEIGHT", raising=False)
    assert torch_linear.merged_weight_default(cpu.device) is True  # measured on CPU (BENCHMARKS.md)
    monkeypatch.setenv("RELORA_MERGED_WEIGHT", "0")
    assert torch_linear.merged_weight_default(cpu.device) is False
    monkeypatch.setenv("RELORA_MERGED_WEIGHT", "maybe")
    with pytest.raises(ValueError, match="RELORA_MERGED_WEIGHT"):
        torch_linear.merged_weight_default(cpu.device)
    monkeypatch.delenv("RELORA_MERGED_WEIGHT")
    seen = []
    for cls in (torch_linear.MergedLoRALinearFunction, torch_linear.TorchLoRALinearFunction):
        monkeypatch.setattr(cls, "apply", (lambda real, name: lambda *a: seen.append(name) or real(*a))(
            cls.apply, cls.__name__))
    x, w, a, b, bias, dy = make_inputs((64,), 256, 128, 8, True, torch.bfloat16, "cpu", seed=5)
    y = torch_linear.lora_linear_torch(x, w, a, b, 0.5, bias)
    torch_linear.lora_linear_torch(x, w, a, b, 0.5, bias, dropout_p=0.1)
    torch_linear.lora_linear_torch(x, w, a, b, 0.5, bias, dropout_p=0.1, training=False)
    assert seen == ["MergedLoRALinearFunction", "TorchLoRALinearFunction", "MergedLoRALinearFunction"]
    yr = rk.lora_linear_reference(x.double(), w.double(), a.double(), b.double(), 0.5, bias.double())
    assert rel_err(y, yr) < 6e-3


def test_torch_path_saves_less_than_reference():
    """Saved for backward under dropout: X, S and a 1-byte mask, not the twin's dropout(X) and X A^T copies."""
    from relora_kernels.torch_linear import lora_linear_torch
    x, w, a, b, bias, _ = make_inputs((64,), 48, 40, 4, True, torch.float32, "cpu", seed=0)

    def saved_bytes(fn):
        seen = {}
        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, w, a, b, 0.5, bias, 0.1, True, torch.Generator().manual_seed(0))
        return sum(seen.values())
    ours, twin = saved_bytes(lora_linear_torch), saved_bytes(rk.lora_linear_reference)
    x_bytes, mask_bytes = 64 * 48 * 4, 64 * 48
    assert ours <= twin - x_bytes + mask_bytes, (ours, twin)


def test_torch_path_autocast_and_partial_grads(monkeypatch):
    monkeypatch.setenv("RELORA_KERNELS", "torch")
    x, w, a, b, bias, dy = make_inputs((6, 5), 16, 12, 4, True, torch.float32, "cpu", seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rk.lora_linear(x, w, a, b, 0.5, bias)
    assert y.dtype == torch.bfloat16
    da, = torch.autograd.grad(y.float(), (a,), dy)  # only A: the other gradients are not computed
    assert da.dtype == torch.float32
    ar = a.detach().double().requires_grad_()
    yr = rk.lora_linear_reference(x.double(), w.double(), ar, b.double(), 0.5, bias.double())
    dar, = torch.autograd.grad(yr, (ar,), dy.double())
    assert rel_err(da, dar) < 2e-2
    # Mixed dtypes outside autocast: the twin's behaviour (torch's own F.linear dtype error), as before.
    with pytest.raises(RuntimeError, match="dtype"):
        rk.lora_linear(x.double(), w, a, b, 0.5, bias)


def test_deterministic_mode_sources(monkeypatch):
    monkeypatch.delenv("RELORA_DETERMINISTIC", raising=False)
    assert rk.deterministic_mode() is False and rk.deterministic_mode(True) is True
    monkeypatch.setenv("RELORA_DETERMINISTIC", "1")
    assert rk.deterministic_mode() is True and rk.deterministic_mode(False) is False


def test_argument_errors(monkeypatch):
    x, w, a, b, bias, _ = make_inputs((4,), 8, 6, 2, True, torch.float32, "cpu", seed=0)
    with pytest.raises(ValueError, match="in_features"):
        rk.lora_linear(x[:, :5], w, a, b, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        rk.lora_linear(x, w, a, b[:, :1], 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        rk.lora_linear(x, w, a, b, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="lora_A"):
        rk.lora_merge_(w.clone(), a[:, :3], b, 1.0)
    monkeypatch.setenv("RELORA_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="dtype"):
        rk.lora_linear(x, w.half(), a, b, 1.0)


def test_kernel_rewrapped_for_mode_at_call_time(monkeypatch):
    from relora_kernels.matmul import _sum_splits_kernel
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert type(_runtime.for_current_mode(_sum_splits_kernel)).__name__ == "InterpretedFunction"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert type(_runtime.for_current_mode(_sum_splits_kernel)).__name__ == "JITFunction"


def _run(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_package_imports_without_triton_or_gpu():
    """Importing the package loads neither triton nor a driver; the kernel modules load on first use."""
    code = ("import sys, relora_kernels as rk; assert 'triton' not in sys.modules, 'triton imported'; "
            "assert callable(rk.lora_linear) and callable(rk.lora_merge_); print('ok')")
    proc = _run(code, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_interpreter_enabled_after_kernels_were_imported():
    """The ordering other test files can cause: triton and our kernels imported with the interpreter off,
    TRITON_INTERPRET=1 set afterwards. The launch must still run interpreted."""
    code = ("import os, torch, triton, relora_kernels as rk\n"
            "import relora_kernels.linear as m, relora_kernels.merge, relora_kernels.matmul\n"
            "assert type(m._ds_db_kernel).__name__ == 'JITFunction'\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "x = torch.randn(5, 8, requires_grad=True); w = torch.randn(6, 8)\n"
            "a = torch.randn(2, 8, requires_grad=True); b = torch.randn(6, 2, requires_grad=True)\n"
            "y = rk.lora_linear(x, w, a, b, 0.5); y.sum().backward()\n"
            "ref = rk.lora_linear_reference(x, w, a, b, 0.5)\n"
            "assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5); print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**env, "RELORA_KERNELS": "triton", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_bench_script_smoke(tmp_path):
    """launch/bench_kernels.py runs end to end (CPU interpreter, tiny shapes) and writes keyed rows."""
    out = tmp_path / "bench.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "bench_kernels.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "NOT performance numbers" in proc.stdout
    import csv
    rows = list(csv.DictReader(out.open()))
    assert {(r["op"], r["provider"]) for r in rows} >= {("linear", p) for p in
                                                       ("full", "frozen", "peft", "torch_fused", "fused",
                                                                            "fused_splitdb", "fused_det",
                                                                            "fused_tma", "fused_blas_lr",
                                                                            "fused_tma_blas_lr")}
    assert {r["provider"] for r in rows if r["op"] == "merge"} == {"merge", "torch", "copy"}
    assert {"op", "provider", "mode", "M", "d_in", "d_out", "r", "dtype", "device", "torch", "triton", "date",
            "ms"} <= set(rows[0])
    assert all(float(r["max_rel_err"]) < 1e-4 for r in rows if "fused" in r["provider"])
    if not HAS_CUDA:
        proc = subprocess.run([sys.executable, str(ROOT / "launch" / "bench_kernels.py"), "--out",
                               str(tmp_path / "x.csv")], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr


def test_tune_script_smoke(tmp_path):
    """launch/tune_kernels.py: every launch of the breakdown and every sweep candidate runs and matches torch
    (its own check, recorded per row); a candidate that computes wrong values is reported, never timed."""
    out = tmp_path / "tune.json"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "tune_kernels.py"), "--device", "cpu", "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    import json
    rows = json.loads(out.read_text())
    kernel_rows = [r for r in rows if r["provider"] != "torch"]
    assert {r["op"] for r in kernel_rows if r["section"] == "breakdown"} == {"S", "Y", "Y_tma", "dSdB", "dS", "dB",
                                                                             "dA", "dX", "dX_tma", "merge"}
    assert {r["op"] for r in kernel_rows if r["section"] == "sweep"} == {"S", "dS", "dB", "dA", "dSdB", "merge",
                                                                         "Y_tma"}
    assert all(r["status"] == "ok" and r["err"] < 1e-4 for r in kernel_rows), [r for r in kernel_rows
                                                                               if r["status"] != "ok"]
    assert "sweep merge  best" in proc.stdout
    # The correctness gate works: a candidate whose values are wrong is flagged, not timed.
    sys.path.insert(0, str(ROOT / "launch"))
    import tune_kernels
    assert tune_kernels.max_rel_err(torch.ones(3), lambda: torch.ones(3)) == 0.0
    assert tune_kernels.max_rel_err(torch.zeros(3), lambda: torch.ones(3)) == 1.0


def test_gpu_check_script_parses_and_names_its_stages(tmp_path):
    """launch/gpu_check.sh is run only on a lent GPU: here, at least, it must parse, and a wrong stage name
    must fail at once with the valid ones (a typo must not burn a device call)."""
    script = ROOT / "launch" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(["bash", str(script), "benhc"], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path)}, timeout=60)
    assert proc.returncode == 2 and "valid: env tests tune bench int8 e2e ds" in proc.stderr


def test_bench_goes_on_when_a_provider_fails(tmp_path, monkeypatch, capsys):
    """One provider failing (e.g. a kernel over the GPU's shared memory) is reported, the others still run."""
    monkeypatch.setenv("RELORA_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(ROOT / "launch"))
    import bench_kernels
    real = bench_kernels.linear_setup

    def setup(provider, *a, **k):
        if provider == "fused_tma":
            raise RuntimeError("OutOfResources: shared memory, Required: 262144, Hardware limit: 232448")
        return real(provider, *a, **k)
    monkeypatch.setattr(bench_kernels, "linear_setup", setup)
    out = tmp_path / "b.csv"
    rc = bench_kernels.main(["--device", "cpu", "--quick", "--providers", "fused_tma", "full", "--ops", "linear",
                             "--modes", "fwd", "--out", str(out)])
    assert rc == 1 and "provider fused_tma failed" in capsys.readouterr().err
    import csv
    assert [r["provider"] for r in csv.DictReader(out.open())] == ["full"]
