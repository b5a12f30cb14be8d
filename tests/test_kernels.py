"""relora_kernels: Triton kernels vs their float64 torch twins, on every output and every gradient.

On CPU the kernels run under Triton's interpreter: each test sets TRITON_INTERPRET=1 only for itself
(monkeypatch). That is enough because relora_kernels re-wraps each kernel for the mode in force at launch
(``_runtime.for_current_mode``), so it does not matter which test file imported triton first;
tests/test_kernel_dispatch.py checks exactly that ordering in a subprocess. With CUDA, the same tests also
run un-interpreted ("cuda" params, the only skip here: they need a GPU) and add larger shapes.
Tolerances and shapes: tests/kernel_utils.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import relora_kernels as rk
from kernel_utils import (DEVICE_SHAPES, DEVICES, DTYPES, NAMES, make_inputs, record_launches, rel_err, run_both,
                          tol)


def kernel_variant(monkeypatch, mode: str) -> bool:
    """Sets the layer's launch variant (test_lora_linear_matches_reference names them); True for ``det``, the
    ``deterministic`` argument the layer then takes."""
    import relora_kernels.linear as linear_mod
    import relora_kernels.matmul as matmul_mod
    monkeypatch.setattr(linear_mod, "FUSE_DS_DB", mode in ("fused", "tma"))
    monkeypatch.setattr(matmul_mod, "TMA_GEMM", mode == "tma")
    monkeypatch.setattr(linear_mod, "LOWRANK_BLAS", mode == "blas_lr")
    return mode == "det"


@pytest.mark.parametrize("mode", ["fused", "splitdb", "det", "tma", "blas_lr"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,shape", DEVICE_SHAPES)
def test_lora_linear_matches_reference(kernels_on, device, dtype, shape, mode, monkeypatch):
    """fused: dS+dB in one read of dY (atomics); splitdb: dB its own GEMM (atomics); det: no atomics;
    tma: fused, with the big products on the TMA-descriptor kernel where TMA can read them; blas_lr: the
    rank-r products on torch.mm, the concat-K products on Triton."""
    deterministic = kernel_variant(monkeypatch, mode)
    lead, d_in, d_out, r, has_bias = shape
    x, w, a, b, bias, dy = make_inputs(lead, d_in, d_out, r, has_bias, dtype, device, seed=7 * d_in + d_out + r)
    got, want = run_both(x, w, a, b, bias, dy, scale=0.7, deterministic=deterministic)
    assert got[0].shape == (*lead, d_out) and got[0].dtype == dtype and got[1].shape == x.shape
    errs = {n: rel_err(g, t) for n, g, t in zip(NAMES, got, want)}
    assert all(e <= tol(device, dtype) for e in errs.values()), errs


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("mode", ["fused", "det"])
@pytest.mark.parametrize("lead", [(), (0,), (3, 0)], ids=lambda lead: "x".join(map(str, lead)) or "1d")
@pytest.mark.parametrize("device", DEVICES)
def test_x_of_any_leading_shape(kernels_on, device, lead, mode, dropout, monkeypatch):
    """x of shape (d_in,): y of shape (d_out,), every output and gradient against the float64 twin (same
    dropout mask). x with zero tokens ((0, d_in), (3, 0, d_in)): y and dx of their empty shapes, and dA, dB
    and dbias exactly zero, a sum over no token (the launchers' M == 0 and K == 0 branches; new buffers are
    NaN-poisoned, so one left unwritten shows)."""
    deterministic = kernel_variant(monkeypatch, mode)
    x, w, a, b, bias, dy = make_inputs(lead, 40, 24, 6, True, torch.float32, device, seed=6)
    kw = dict(dropout_p=dropout, deterministic=deterministic)
    if lead == ():
        got, want = run_both(x, w, a, b, bias, dy, 0.7, dropout_seed=2, **kw)
        assert got[0].shape == (24,) and got[1].shape == (40,)
        errs = {n: rel_err(g, t) for n, g, t in zip(NAMES, got, want)}
        assert all(e <= tol(device, torch.float32) for e in errs.values()), errs
        return
    y = rk.lora_linear(x, w, a, b, 0.7, bias, **kw)
    dx, da, db, dbias = torch.autograd.grad(y, [x, a, b, bias], dy)
    assert y.shape == (*lead, 24) and dx.shape == x.shape
    for grad, param in ((da, a), (db, b), (dbias, bias)):
        assert grad.shape == param.shape and torch.equal(grad, torch.zeros_like(param)), grad


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


@pytest.mark.parametrize("device", DEVICES)
def test_tma_launch_computes_alpha_beta_and_bias(kernels_on, device):
    """``out = alpha·(a1·b1 + beta·a2·b2) + bias``, every term (the training path sends alpha = the LoRA scale
    through it for dS when only dX is needed; a mutation dropping alpha went unseen). Oracle: float64 torch."""
    from relora_kernels import matmul_tma
    g = torch.Generator().manual_seed(4)
    a1, b1, a2, b2 = (torch.randn(*s, generator=g).to(device) for s in ((48, 32), (32, 16), (48, 8), (8, 16)))
    bias = torch.randn(16, generator=g).to(device)
    out = matmul_tma.launch(a1, b1, a2, b2, torch.full((48, 16), float("nan"), device=device), alpha=0.5,
                            beta=0.3, bias=bias)
    d = [t.double() for t in (a1, b1, a2, b2, bias)]
    assert rel_err(out, 0.5 * (d[0] @ d[1] + 0.3 * d[2] @ d[3]) + d[4]) <= tol(device, torch.float32)


def test_poisoned_kernel_outputs_start_as_nan(kernels_on):
    """RELORA_KERNELS_POISON=1 (every kernel test's kernels_on) fills each new kernel output with NaN, so an
    element no program writes shows as NaN (a mutation switching it off went unseen)."""
    from relora_kernels import _runtime
    assert _runtime.new_empty((3, 5), torch.float32, torch.device("cpu")).isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_tma_launch_sets_its_allocator_in_every_thread(kernels_on, device):
    """Triton keeps the allocator of device-side descriptors per thread (a ContextVar) and autograd runs
    CUDA backward passes on worker threads: a launch from a thread other than the first launcher's must
    find the allocator (set once per process, the backward's dX launch failed with Triton's "no allocator
    was set"). Oracle: the allocator Triton will use in that thread, read right after the launch."""
    import threading
    from triton.runtime import _allocation
    from relora_kernels import matmul_tma
    a1, b1 = torch.randn(32, 32, device=device), torch.randn(32, 16, device=device)
    want = a1 @ b1
    matmul_tma.launch(a1, b1, None, None, torch.empty(32, 16, device=device))  # the first launcher's thread
    seen = []

    def worker():
        out = matmul_tma.launch(a1, b1, None, None, torch.empty(32, 16, device=device))
        seen.append((_allocation._allocator.get(), rel_err(out, want)))
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen and seen[0][0] is not _allocation._NULL_ALLOCATOR and seen[0][1] <= tol(device, torch.float32)


@pytest.mark.parametrize("r", [8, 40], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_dropout_mask_consistent_with_reference(kernels_on, device, dtype, r):
    """Same generator seed -> same mask on both paths: S = drop(X)A^T, dA = dS^T drop(X), dX masked; r=40 is
    more than one r-block of the interpreted dS+dB kernel (BLOCK_R 32), bf16 the interpreter's upcast dots."""
    x, w, a, b, bias, dy = make_inputs((3, 23), 40, 50, r, True, dtype, device, seed=7)
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


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("device", DEVICES)
def test_triton_layer_saves_x_s_and_the_mask_only(kernels_on, device, dropout):
    """What the Triton layer's autograd Function saves for backward (seen by saved_tensors_hooks): x, W, A and B
    themselves (no copies), S = drop(X)·Aᵀ (M, r) and, under dropout, the keep-mask as uint8 (M, d_in); nothing
    else, so never Y (M, d_out). The BLAS path's counterpart: tests/test_kernel_torch_path.py
    ::test_torch_path_saves_less_than_reference."""
    lead, d_in, d_out, r = (2, 9), 40, 24, 6
    x, w, a, b, bias, _ = make_inputs(lead, d_in, d_out, r, True, torch.float32, device, seed=8)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rk.lora_linear(x, w, a, b, 0.5, bias, dropout_p=dropout)

    def name(t):  # an input by its storage and shape, anything else by its shape and dtype
        for n, p in (("x", x), ("W", w), ("A", a), ("B", b)):
            if t.data_ptr() == p.data_ptr() and t.shape == p.shape:
                return n
        return (tuple(t.shape), t.dtype)
    M = 2 * 9
    assert not any(t.numel() == M * d_out and t.shape[-1] == d_out for t in saved)  # no Y
    want = ["x", "W", "A", "B", ((M, r), torch.float32)] + ([((M, d_in), torch.uint8)] if dropout else [])
    assert sorted(map(str, map(name, saved))) == sorted(map(str, want))


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_mode_is_bitwise_reproducible(kernels_on, device, monkeypatch):
    """Bitwise repeatability is a real check on a GPU only: the interpreter runs programs one at a time, so
    even the atomic path repeats there. So the launches are checked too: in deterministic mode no GEMM launch
    adds with atomics (ATOMIC=False) and the atomic dS+dB kernel never runs, while the default mode does
    both on the same layer; ``torch.use_deterministic_algorithms(True)`` alone switches the kernels to
    deterministic mode (the same bits as RELORA_DETERMINISTIC=1). On both devices, the deterministic path
    (partial sums reduced in a fixed order) must also be correct against the float64 twin."""
    import relora_kernels.linear as linear_mod
    import relora_kernels.matmul as matmul_mod
    monkeypatch.setattr(linear_mod, "FUSE_DS_DB", True)  # the default mode's atomic dS+dB kernel
    # Enough tokens on a GPU that dB and dA split their token reduction (>= 4 K-blocks of 64 per split).
    x, w, a, b, bias, dy = make_inputs((4, 160) if device == "cuda" else (2, 45), 64, 48, 12, True, torch.float16,
                                       device, seed=3)
    sums = []  # the fixed-order reduction of split partials, instead of atomics
    real_sum = matmul_mod.sum_splits
    monkeypatch.setattr(matmul_mod, "sum_splits", lambda p, out: sums.append(p.shape[0]) or real_sum(p, out))
    launches = record_launches(monkeypatch)

    def fwd_bwd():
        y = rk.lora_linear(x, w, a, b, 0.5, bias)
        return [y, *torch.autograd.grad(y, [x, a, b, bias], dy)]

    def atomics():  # (launches of the atomic dS+dB kernel, GEMM launches with ATOMIC=True), then forgotten
        found = (sum(name == "_ds_db_kernel" for name, _ in launches),
                 sum(bool(kw.get("ATOMIC")) for name, kw in launches if name == "_concat_k_matmul_kernel"))
        launches.clear()
        return found

    fwd_bwd()
    default_atomics = atomics()
    assert default_atomics[0] == 1 and default_atomics[1] >= 1, default_atomics  # dS+dB, and dA's split
    monkeypatch.setenv("RELORA_DETERMINISTIC", "1")
    runs = [fwd_bwd(), fwd_bwd()]
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    assert atomics() == (0, 0)
    assert sums and min(sums) > 1, sums  # the split path ran, and reduced without atomics
    monkeypatch.delenv("RELORA_DETERMINISTIC")
    sums.clear()
    was_on = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: cuBLAS needs no workspace setting
    try:
        by_torch_switch = fwd_bwd()
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=warn_only)
    assert atomics() == (0, 0) and sums
    assert all(torch.equal(g, t) for g, t in zip(by_torch_switch, runs[0]))
    monkeypatch.setenv("RELORA_DETERMINISTIC", "1")
    got, want = run_both(x, w, a, b, bias, dy, 0.5)
    errs = {n: rel_err(g, t) for n, g, t in zip(NAMES, got, want)}
    assert all(e <= tol(device, torch.float16) for e in errs.values()), errs


@pytest.mark.parametrize("lowrank_blas,tma", [(False, False), (True, True)])
def test_deterministic_mode_never_autotunes(kernels_on, monkeypatch, lowrank_blas, tma):
    """Autotuning picks a config by timing, so two processes can pick different ones (different bits): in
    deterministic mode every GEMM launch of the forward and backward, float and int8 base, asks for the
    fixed config, the rank-r products stay off cuBLAS, and the (autotuned) TMA kernel is not used."""
    import relora_kernels.linear as linear_mod
    import relora_kernels.matmul as matmul_mod
    from relora_kernels import matmul_tma
    calls = []
    real = linear_mod.concat_matmul
    monkeypatch.setattr(linear_mod, "concat_matmul", lambda *a, **k: calls.append(k.get("deterministic")) or real(*a, **k))
    monkeypatch.setattr(linear_mod, "LOWRANK_BLAS", lowrank_blas)
    monkeypatch.setattr(matmul_mod, "TMA_GEMM", tma)
    monkeypatch.setattr(matmul_tma, "launch", None)  # would fail if called
    monkeypatch.setattr(torch, "mm", None)  # the cuBLAS rank-r products would fail here
    monkeypatch.setenv("RELORA_DETERMINISTIC", "1")
    x, w, a, b, bias, dy = make_inputs((2, 9), 32, 24, 4, True, torch.float32, "cpu", seed=4)
    q, s, _ = rk.int8_quantize_reference(w)
    for y in (rk.lora_linear(x, w, a, b, 0.5, bias),
              rk.int8_lora_linear(x, q, s, a, b, 0.5, bias, in_gemm=False),
              rk.int8_lora_linear(x, q, s, a, b, 0.5, bias, in_gemm=True)):
        torch.autograd.grad(y, [x, a, b], dy)
    assert len(calls) == 3 * 6 and all(calls), calls  # S, Y; dS, dB, dA, dX


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
    # B alone (A frozen, x a leaf without grad), on the float and the int8 base: dB needs S = X·Aᵀ though
    # A needs no gradient (a mutation computing the LoRA grads only for A left B without one)
    q, q_scale, _ = rk.int8_quantize_reference(w)
    for y in (rk.lora_linear(x.detach(), w, a.detach(), b, 0.9),
              rk.int8_lora_linear(x.detach(), q, q_scale, a.detach(), b, 0.9)):
        (db,) = torch.autograd.grad(y, [b], dy)
        assert rel_err(db, want[3]) <= t
    w_train = w.clone().requires_grad_()
    (dw,) = torch.autograd.grad(rk.lora_linear(x, w_train, a, b, 0.9, bias), [w_train], dy)
    assert rel_err(dw, dy.double().t() @ x.double()) <= t


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_matches_reference(kernels_on, device, dropout, int8):
    """A gradient penalty (create_graph=True, then the gradient of loss + |dL/dx|^2 + |dL/dA|^2 + |dL/dB|^2):
    the backward's Triton launches carry no graph, so every second-order term was silently zero (found by a
    review: |dA| 6.15 against the reference's 8.13); such a backward now runs in torch ops, on the saved input
    x itself (a later review: a reshape of x made in forward cut every term through x). Oracle: the float64
    twin."""
    x, w, a, b, bias, dy = make_inputs((3, 7), 24, 20, 4, True, torch.float32, device, seed=11)
    q, w_scale, _ = rk.int8_quantize_reference(w)

    def penalized(x, a, b, bias, dtype, generator):
        leaves = [x, a, b, bias]
        if int8:
            y = (rk.int8_lora_linear if dtype == torch.float32 else rk.int8_lora_linear_reference)(
                x, q, w_scale, a, b, 0.7, bias, dropout_p=dropout, generator=generator)
        else:
            fn = rk.lora_linear if dtype == torch.float32 else rk.lora_linear_reference
            y = fn(x, w.to(dtype), a, b, 0.7, bias, dropout_p=dropout, generator=generator)
        loss = (y * dy.to(dtype)).sum()
        firsts = torch.autograd.grad(loss, [x, a, b], create_graph=True)
        return torch.autograd.grad(loss + 0.1 * sum((g ** 2).sum() for g in firsts), leaves)

    got = penalized(x, a, b, bias, torch.float32, torch.Generator(device=device).manual_seed(3))
    ref = [t.detach().double().requires_grad_() for t in (x, a, b, bias)]
    want = penalized(*ref, torch.float64, torch.Generator(device=device).manual_seed(3))
    errs = {n: rel_err(g, t) for n, g, t in zip(("dx", "dA", "dB", "dbias"), got, want)}
    assert all(e <= tol(device, torch.float32) for e in errs.values()), errs


@pytest.mark.parametrize("device", DEVICES)
def test_strided_bias_and_scales_are_read_by_their_strides(kernels_on, device):
    """A bias or an int8 scale that is a strided view (bias[::2]) was read as if contiguous (found by a
    review: y off by 4.0); against the float64 twin, and the int8 merge writes such a scale through its view."""
    x, w, a, b, bias, dy = make_inputs((9,), 24, 20, 4, False, torch.float32, device, seed=13)
    wide = torch.randn(40, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
    got, want = run_both(x, w, a, b, wide[::2], dy, 0.7)
    assert all(rel_err(g, t) <= tol(device, torch.float32) for g, t in zip(got, want))
    q, scale, res = rk.int8_quantize_reference(w, residual=True)
    strided = torch.stack([scale, torch.full_like(scale, 7.0)], 1)[:, 0]  # (20,), stride 2
    assert rel_err(rk.int8_dequantize(q, strided, torch.float32),
                   rk.int8_dequantize_reference(q, scale, torch.float32)) == 0
    y = rk.int8_lora_linear(x, q, strided, a, b, 0.7)
    assert rel_err(y, rk.int8_lora_linear_reference(x, q, scale, a, b, 0.7)) <= tol(device, torch.float32)
    # The merge: against the same kernel on a contiguous scale (bit for bit; the kernel and its twin may
    # differ by a unit on rare elements on a GPU, tests/test_int8_quant.py), and that one against the twin.
    q2, res2, scale2 = q.clone(), res.clone(), scale.clone()
    q3, res3, scale3 = q.clone(), res.clone(), scale.clone()
    rk.int8_merge_(q, strided, res, a.detach(), b.detach(), 0.7)
    rk.int8_merge_(q2, scale2, res2, a.detach(), b.detach(), 0.7)
    assert torch.equal(q, q2) and torch.equal(strided, scale2) and torch.equal(res, res2)
    assert not torch.equal(scale2, scale)  # the merge did write the scale
    rk.int8_merge_reference_(q3, scale3, res3, a.detach(), b.detach(), 0.7)
    assert (q2.int() - q3.int()).abs().max() <= 1 and rel_err(scale2, scale3) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_a_merge_while_a_backward_holds_the_weight_is_autograds_inplace_error(kernels_on, device):
    """The Triton merges write behind autograd's back: without a version bump a backward after the merge
    silently used the merged weight (found by a review); the torch path raises, and so must this one."""
    x, w, a, b, bias, dy = make_inputs((9,), 24, 20, 4, False, torch.float32, device, seed=14)
    y = rk.lora_linear(x, w, a, b, 0.7)
    rk.lora_merge_(w, a.detach(), b.detach(), 0.7)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)
    q, scale, res = rk.int8_quantize_reference(w, residual=True)
    y = rk.int8_lora_linear(x, q, scale, a, b, 0.7)
    rk.int8_merge_(q, scale, res, a.detach(), b.detach(), 0.7)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)


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
# r=40: more than one block of r interpreted (BLOCK_R 16); r=256 and r=129 (one past a multiple): more than one
# on a GPU too (BLOCK_R 64).
@pytest.mark.parametrize("shape", [(70, 45, 5), (33, 96, 1), (64, 64, 16), (40, 50, 40), (48, 80, 256), (37, 50, 129)],
                         ids=lambda s: "x".join(map(str, s)))
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
    # Elementwise, kernel vs twin: both round one fp32 sum once, so they differ by the fp32 dot product's
    # own error (r·eps·s·|B|·|A|) plus at most 2 units in the last place of W's dtype (the interpreter
    # truncates where the GPU rounds). Rounding s·B·A to W's dtype before adding breaks this in bf16/fp16
    # for all three shapes (checked).
    dot_err = r * torch.finfo(torch.float32).eps * scale * (b.double().abs() @ a.double().abs())
    bound = 2 * torch.finfo(wdtype).eps * w_ref.double().abs() + dot_err + torch.finfo(wdtype).tiny
    assert ((w.double() - w_ref.double()).abs() <= bound).all()


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


@pytest.mark.parametrize("device", DEVICES)
def test_concat_matmul_computes_its_documented_formula(kernels_on, device):
    """The exported launcher's contract, C = alpha·(A1·B1 + beta·mask ⊙ (A2·B2)) + bias, with every term at once on
    the pointer kernel (the layer never sends alpha != 1 together with a bias: a mutation scaling the bias by alpha
    went unseen), ragged shapes; and a product over K = 0 is the bias alone, zeros without one (NaN-poisoned
    buffers). Oracle: float64 torch."""
    from relora_kernels.matmul import MASK_OUT2
    g = torch.Generator().manual_seed(5)
    a1, b1, a2, b2 = (torch.randn(*s, generator=g).to(device) for s in ((37, 50), (50, 45), (37, 7), (7, 45)))
    bias = torch.randn(45, generator=g).to(device)
    keep = torch.rand(37, 45, generator=g).to(device) > 0.3
    d1, e1, d2, e2, db = (t.double() for t in (a1, b1, a2, b2, bias))
    out = rk.concat_matmul(a1, b1, a2, b2, alpha=0.5, beta=0.3, bias=bias)
    assert rel_err(out, 0.5 * (d1 @ e1 + 0.3 * d2 @ e2) + db) <= tol(device, torch.float32)
    out = rk.concat_matmul(a1, b1, a2, b2, alpha=0.5, beta=0.3, bias=bias, mask=keep, mask_mode=MASK_OUT2)
    assert rel_err(out, 0.5 * (d1 @ e1 + 0.3 * keep.double() * (d2 @ e2)) + db) <= tol(device, torch.float32)
    empty_a, empty_b = torch.empty(37, 0, device=device), torch.empty(0, 45, device=device)
    assert torch.equal(rk.concat_matmul(empty_a, empty_b, alpha=0.5, bias=bias), bias.expand(37, 45))
    assert torch.equal(rk.concat_matmul(empty_a, empty_b), torch.zeros(37, 45, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_lora_merge_writes_nothing_outside_the_weight(kernels_on, device):
    """W a view into a larger buffer (rows padded by 9 columns, 8 more rows below): the merge writes W's elements
    and nothing else. The rest of the buffer holds -0.0, which any write of a merged value turns into +0.0, even a
    write of the value just read (-0.0 + s·0 = +0.0): a tile mask letting the column past W's last through went
    unseen (on a GPU that write can put a neighbouring row's element back stale). Oracle: float64 for W."""
    g = torch.Generator().manual_seed(6)
    buf = torch.full((48, 54), -0.0, device=device)
    w = buf[:40, :45]  # K = 45: a ragged last column tile under the interpreter (BLOCK_K 32) and on a GPU (128)
    w.copy_(torch.randn(40, 45, generator=g).to(device))
    a, b = torch.randn(5, 45, generator=g).to(device), torch.randn(40, 5, generator=g).to(device)
    want = w.double() + 0.5 * (b.double() @ a.double())
    rk.lora_merge_(w, a, b, 0.5)
    assert rel_err(w, want) <= tol(device, torch.float32)
    outside = torch.ones(buf.shape, dtype=torch.bool, device=device)
    outside[:40, :45] = False
    assert (buf[outside] == 0).all() and buf[outside].signbit().all()
