"""int8 frozen base weights: error bounds, drift-free merges, kernels vs twins (the layer, the model, export and
bad input: tests/test_int8_layer.py).

Kernels run under Triton's interpreter on CPU (``kernels_on`` fixture, as in tests/test_kernels.py) and
compiled on CUDA when a GPU is present (the "cuda" params; the only skips here).
"""
from __future__ import annotations

import math

import pytest
import torch

import relora_ds
import relora_kernels as rk
from relora_ds import quant

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA GPU: the int8 kernels then run compiled"))]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------------------------ quantizer
@pytest.mark.parametrize("shape", [(37, 70), (1, 5), (256, 688)])
def test_quantize_error_bounds(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.02
    w[0, 0] = 0.5  # an outlier row
    q, s, r = rk.int8_quantize_reference(w, residual=True)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and r.dtype == torch.int8
    assert q.abs().max() <= 127 and r.abs().max() <= 127
    err = (rk.int8_dequantize_reference(q, s) - w).abs()
    # Half a step: the bf16 scale is absmax/127 rounded to 8 significant bits (within 2^-8 relative), so
    # the largest element's code may sit up to ~0.5 step from it; the bound is what rounding guarantees.
    assert (err <= s.float()[:, None] * 0.5 * (1 + 1e-6)).all()
    err16 = (rk.int8_dequantize_reference(q, s, residual=r) - w).abs()
    assert (err16 <= s.float()[:, None] * (0.501 / 254)).all()  # + fp32 rounding of the sum
    if shape[1] > 64:  # Gaussian rows: absmax int8 error ~0.3% of the weight norm (1/(sqrt(12)*~35))
        assert rel(rk.int8_dequantize_reference(q, s)[1:], w[1:]) < 0.012


def test_zero_rows_and_fp64_input():
    w = torch.zeros(3, 8, dtype=torch.float64)
    w[1] = torch.linspace(-1, 1, 8, dtype=torch.float64)
    q, s, _ = rk.int8_quantize_reference(w)
    assert s[0] == 1 and (q[0] == 0).all() and q[1].abs().max() == 127
    assert torch.equal(rk.int8_dequantize_reference(q, s)[0], torch.zeros(8))


def test_an_int8_base_refuses_a_non_finite_weight():
    """A NaN or Inf in a weight loaded into an int8 base made its row's scale NaN and its int8 values
    meaningless (a user trial, 2026-12-05): refused, counted, the layer's storage left as it was; by load_base_
    and by a state-dict load of the base model's weights (a review found that path unchecked)."""
    layer = relora_ds.ReLoRALinear(8, 4, 2, quantize="int8", name="q_proj")
    before = layer.weight_q.clone()
    w = torch.randn(4, 8)
    w[1, 2], w[3, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="int8 base of layer q_proj got a weight with 2 non-finite values"):
        layer.load_base_(w)
    with pytest.raises(ValueError, match="int8 base of layer q_proj got a weight with 2 non-finite values"):
        layer.load_state_dict({"weight": w}, strict=False)  # the base model's checkpoint into a wrapped model
    assert torch.equal(layer.weight_q, before)
    layer.load_base_(w.nan_to_num(posinf=1.0))  # finite: loads
    assert not torch.equal(layer.weight_q, before)


# ------------------------------------------------------------------------------------------ drift
def test_merges_do_not_drift():
    W0, ups = quant.realistic_updates(256, 256, 8, 20, seed=1)
    err = quant.merge_drift(W0, ups, mechanisms=("naive", "residual", "host_fp32"))
    ratio = [e / o for e, o in zip(err["residual"], err["one_shot"])]
    assert max(ratio) <= 1.1, ratio  # the target at every k = 1..20
    assert max(ratio) <= 1.01, ratio  # what the mechanism actually does (1.000-1.001 measured)
    assert err["naive"][-1] / err["one_shot"][-1] > 3.0  # the drift this prevents (4.6x measured)
    assert max(e / o for e, o in zip(err["host_fp32"], err["one_shot"])) < 1.0 + 1e-6


def test_layer_merge_matches_fp32_accumulation():
    torch.manual_seed(0)
    layer = relora_ds.ReLoRALinear(96, 40, 4, quantize="int8")
    # The exact start is the 16-bit value (q + residual/254)·scale: the residual holds W0 − q(W0).
    exact = rk.int8_dequantize_reference(layer.weight_q, layer.weight_scale, torch.float64, layer.weight_residual)
    for k in range(10):
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.05)
        exact += layer.delta_weight().double()
        layer.merge_()
        q1, s1, _ = rk.int8_quantize_reference(exact.float())
        one_shot = rel(rk.int8_dequantize_reference(q1, s1), exact)
        assert rel(layer.base_weight(), exact) <= 1.05 * one_shot


# ------------------------------------------------------------------------------------------ kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_kernel_matches_twin(kernels_on, device, dtype):
    w = torch.randn(37, 70, device=device)
    q, s, _ = rk.int8_quantize_reference(w)
    got = rk.int8_dequantize(q, s, dtype)
    want = rk.int8_dequantize_reference(q, s, torch.float32)
    assert got.dtype == dtype
    assert rel(got, want) < (1e-7 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("shape", [(37, 70, 5), (16, 33, 20), (3, 129, 1)])
def test_merge_kernel_matches_twin(kernels_on, device, with_residual, shape):
    N, K, R = shape
    g = torch.Generator().manual_seed(N * K + R)
    w = torch.randn(N, K, generator=g) * 0.02
    A, B = torch.randn(R, K, generator=g) * 0.2, torch.randn(N, R, generator=g) * 0.02
    q, s, r = rk.int8_quantize_reference(w, residual=True)
    r = r if with_residual else None
    ref = [t.clone() if t is not None else None for t in (q, s, r)]
    rk.int8_merge_reference_(*ref, A, B, 0.7)
    got = [t.to(device) for t in (q, s)] + [r.clone() if r is not None else None]  # residual stays on host
    rk.int8_merge_(*got, A.to(device), B.to(device), 0.7)
    assert got[0].dtype == torch.int8 and got[1].dtype == torch.bfloat16
    # Same bf16 rounding of rowmax/127 in kernel and twin (bit arithmetic); rowmax itself may differ in its
    # last fp32 bits (on a GPU the division is approximate and products fuse into FMAs), which moves the
    # bf16 scale by one unit only when it lies on a rounding boundary: at most 1 ulp, on rare rows.
    ulps = (got[1].cpu().view(torch.int16).int() - ref[1].view(torch.int16).int()).abs()
    assert ulps.max() <= 1 and (ulps > 0).sum() <= (0 if device == "cpu" else 1)
    # q/residual may differ where the fp32 products round differently: by one unit, on rare elements (of
    # the rows with the same scale; a row whose scale moved is requantized throughout, and is checked by
    # its dequantized values below).
    same = ulps == 0
    assert (got[0].cpu()[same].int() - ref[0][same].int()).abs().max() <= 1
    assert (got[0].cpu()[same] != ref[0][same]).float().mean() < 0.01
    full = lambda t: rk.int8_dequantize_reference(t[0].cpu(), t[1].cpu(), residual=t[2])  # noqa: E731
    exact = w.double() + 0.7 * (B.double() @ A.double())
    tol = (0.5 / 254 if with_residual else 0.5) * s.float().max().item() * 4
    assert (full(got).double() - full(ref).double()).abs().max() <= tol
    assert rel(full(got), exact) < (2e-4 if with_residual else 1.2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_kernel_rounds_a_scale_on_a_tie_to_even(kernels_on, device):
    """The merged rows' rowmax/127 lands exactly half-way between two bf16 values: 1.00390625 (between 1 and
    1.0078125) rounds down to the even 1.0, 1.01171875 up to the even 1.015625, as torch's cast rounds (a
    mutation rounding half up went unseen: random weights never hit a tie)."""
    q, s = torch.zeros(2, 4, dtype=torch.int8), torch.ones(2, dtype=torch.bfloat16)
    A = torch.tensor([[127 * 1.00390625, 0, 0, 0], [0, 127 * 1.01171875, 0, 0]])
    B = torch.eye(2)
    want = (torch.tensor([127 * 1.00390625, 127 * 1.01171875]) / 127).to(torch.bfloat16)
    assert want.tolist() == [1.0, 1.015625]
    got = [q.clone().to(device), s.clone().to(device)]
    rk.int8_merge_(*got, None, A.to(device), B.to(device), 1.0)
    assert torch.equal(got[1].cpu(), want)
    ref = [q.clone(), s.clone()]
    rk.int8_merge_reference_(*ref, None, A, B, 1.0)
    assert torch.equal(ref[1], want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_gemm", [False, True], ids=["scratch", "in_gemm"])
@pytest.mark.parametrize("shape", [(33, 40, 70, 8, 0.0), (50, 97, 19, 3, 0.25)], ids=["plain", "dropout"])
def test_int8_linear_kernel_matches_twin(kernels_on, device, dtype, in_gemm, shape):
    """Both dequantization paths (scratch buffer, in-GEMM tiles) against the twin, every output and grad."""
    g = torch.Generator().manual_seed(3)
    M, K, N, R, p = shape
    w = torch.randn(N, K, generator=g) * 0.1
    w[1] *= 20  # rows of different scale: a scale applied to the wrong axis shows
    q, s, _ = rk.int8_quantize_reference(w)
    q, s = q.to(device), s.to(device)
    x = torch.randn(M, K, generator=g).to(device, dtype).requires_grad_()
    A = (torch.randn(R, K, generator=g) * 0.1).to(device, dtype).requires_grad_()
    B = (torch.randn(N, R, generator=g) * 0.1).to(device, dtype).requires_grad_()
    bias = torch.randn(N, generator=g).to(device, dtype).requires_grad_()
    dy = torch.randn(M, N, generator=g).to(device, dtype)
    gen = lambda: torch.Generator(device=device).manual_seed(7)  # noqa: E731  same dropout mask on both
    y = rk.int8_lora_linear(x, q, s, A, B, 0.5, bias, dropout_p=p, generator=gen(), in_gemm=in_gemm)
    grads = torch.autograd.grad(y, (x, A, B, bias), dy)
    xd, Ad, Bd, bd = (t.detach().double().requires_grad_() for t in (x, A, B, bias))
    yr = rk.int8_lora_linear_reference(xd, q, s, Ad, Bd, 0.5, bd, dropout_p=p, generator=gen())
    grads_r = torch.autograd.grad(yr, (xd, Ad, Bd, bd), dy.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(y, yr) < tol
    for gk, gr in zip(grads, grads_r):
        assert rel(gk, gr) < tol


def test_reference_linear_saves_only_int8():
    q, s, _ = rk.int8_quantize_reference(torch.randn(64, 48))
    x = torch.randn(5, 48, requires_grad=True)
    A, B = torch.randn(4, 48, requires_grad=True), torch.zeros(64, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = rk.int8_lora_linear_reference(x, q, s, A, B, 2.0)
    assert not any(t.shape == (64, 48) and t.is_floating_point() for t in saved)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones(5, 64) @ rk.int8_dequantize_reference(q, s))


@pytest.mark.parametrize("merged", [None, "0", "1"], ids=["auto", "epilogue", "merged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_torch_path_matches_twin(monkeypatch, dtype, merged):
    """RELORA_KERNELS=torch (and auto on CPU): GEMMs on the dequantized q·scale, with s·B·A added into it
    (merged) or as side products (epilogue), every output and gradient against the fp64 twin; unforced, the
    merged variant (here M = 111 tokens >= 2·48·40 / (48 + 40) = 43.6); under dropout the twin itself runs
    (bitwise)."""
    from relora_kernels import torch_linear
    monkeypatch.setenv("RELORA_KERNELS", "torch")
    if merged is None:
        monkeypatch.delenv("RELORA_MERGED_WEIGHT", raising=False)
    else:
        monkeypatch.setenv("RELORA_MERGED_WEIGHT", merged)
    g = torch.Generator().manual_seed(4)
    M, K, N, R = 37, 48, 40, 4
    w = torch.randn(N, K, generator=g) * 0.1
    w[2] *= 3  # rows of different scale (not so large that the low-rank term vanishes next to them)
    q, s, _ = rk.int8_quantize_reference(w)
    x = torch.randn(3, M, K, generator=g).to(dtype).requires_grad_()
    A = (torch.randn(R, K, generator=g) * 0.3).to(dtype).requires_grad_()
    B = (torch.randn(N, R, generator=g) * 0.3).to(dtype).requires_grad_()
    bias = torch.randn(N, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(3, M, N, generator=g).to(dtype)
    calls = []
    real = torch_linear.MergedInt8LoRALinearFunction.apply
    monkeypatch.setattr(torch_linear.MergedInt8LoRALinearFunction, "apply",
                        lambda *a: calls.append(a[-1]) or real(*a))  # its last argument: merged
    y = rk.int8_lora_linear(x, q, s, A, B, 0.5, bias)
    grads = torch.autograd.grad(y, (x, A, B, bias), dy)
    assert calls == [merged != "0"]
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B, bias)]
    yr = rk.int8_lora_linear_reference(leaves[0], q, s, leaves[1], leaves[2], 0.5, leaves[3])
    grads_r = torch.autograd.grad(yr, leaves, dy.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(y, yr) < tol and all(rel(a, b) < tol for a, b in zip(grads, grads_r))
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    y_drop = rk.int8_lora_linear(x, q, s, A, B, 0.5, bias, dropout_p=0.2, generator=gen())
    assert len(calls) == 1 and torch.equal(y_drop, rk.int8_lora_linear_reference(x, q, s, A, B, 0.5, bias, 0.2,
                                                                              True, gen()))


def test_quantizer_rounds_ties_half_up_like_the_kernels():
    # absmax 127/128 makes the bf16 scale exactly 2^-7, so these are exact ties in units of the step
    w = torch.tensor([[127.0, 0.5, 2.5, -0.5, -1.5, -2.5]]) / 128
    q, s, _ = rk.int8_quantize_reference(w)
    assert s.item() == 2.0 ** -7
    assert q.tolist() == [[127, 1, 3, 0, -1, -2]]


def test_a_row_too_small_for_a_normal_bf16_scale_keeps_the_half_step_bound():
    """A row of absmax 177.8·2^-133 (≈1.6e-38): absmax/127 = 1.4·2^-133 is a bf16 subnormal (spacing 2^-133),
    which rounded the scale to 2^-133 and put the row's largest element 177.8 steps out, its code saturated at
    127 (50 steps off). The scale is floored at the smallest normal 2^-126: codes 177.8/128 -> 1 and
    -88.9/128 -> -1, residuals 0.389·254 -> 99 and 0.305·254 -> 78 (hand-computed), and rows from 1e-45 up
    to past the floor (127·2^-126 ≈ 1.49e-36) keep the half-step bound; an all-zero row keeps scale 1."""
    step = 2.0 ** -133
    w = torch.tensor([[1.4 * 127 * step, -0.7 * 127 * step, 0.0], [0.0, 0.0, 0.0]])
    q, s, r = rk.int8_quantize_reference(w, residual=True)
    assert s.float().tolist() == [2.0 ** -126, 1.0]
    assert q.tolist() == [[1, -1, 0], [0, 0, 0]] and r.tolist() == [[99, 78, 0], [0, 0, 0]]
    absmax = torch.tensor([1e-45, 1e-40, 1.6e-38, 1e-37, 1.4e-36, 1.5e-36, 1.6e-36, 1e-30])
    w = absmax[:, None] * torch.linspace(-1, 1, 9)[None, :] * torch.tensor([1.0, -0.3, 0.77, 0.1, 1, 0.5, -1, 0.9, 1])
    q, s, r = rk.int8_quantize_reference(w, residual=True)
    assert (s.float() >= 2.0 ** -126).all() and q.abs().max() <= 127
    err = (rk.int8_dequantize_reference(q, s).double() - w.double()).abs()
    assert (err <= s.double()[:, None] * 0.5).all()
    err16 = (rk.int8_dequantize_reference(q, s, residual=r).double() - w.double()).abs()
    assert (err16 <= s.double()[:, None] * (0.501 / 254)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_merge_kernel_floors_a_tiny_rows_scale_as_the_twin(kernels_on, device):
    """A merge whose rows come out at 1e-45..1.6e-36 (and one exactly zero): the kernel's scale is the twin's
    (floored at 2^-126, 1 for the zero row), its codes and residuals equal. Before the floor the kernel stored
    subnormal scales (and a GPU flushing subnormals would store 0, then 1)."""
    absmax = torch.tensor([1e-45, 1e-40, 1.6e-38, 1e-37, 1.5e-36, 0.0])
    A = absmax[:, None] * torch.tensor([[1.0, -0.4, 0.77, -1.0, 0.3]])  # (r=6, in=5); B = I: rows = A's
    B = torch.eye(6)
    q, s, res = torch.zeros(6, 5, dtype=torch.int8), torch.ones(6, dtype=torch.bfloat16), torch.zeros(6, 5,
                                                                                                     dtype=torch.int8)
    ref = [q.clone(), s.clone(), res.clone()]
    rk.int8_merge_reference_(*ref, A, B, 1.0)
    assert ref[1].float().tolist() == [2.0 ** -126] * 4 + [ref[1].float()[4].item(), 1.0]
    got = [q.to(device), s.to(device), res.clone()]
    rk.int8_merge_(*got, A.to(device), B.to(device), 1.0)
    assert torch.equal(got[1].cpu(), ref[1]) and torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[2], ref[2])


def test_dequantize_to_fp16_is_the_fp32_product_rounded_once():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 64, generator=g) * torch.tensor([[1e-1], [1e-3], [1e-4], [3e-5]])  # tiny rows too
    q, s, _ = rk.int8_quantize_reference(w)
    want = (q.double() * s.double()[:, None]).to(torch.float16)  # exact product, one rounding
    assert torch.equal(rk.int8_dequantize_reference(q, s, torch.float16), want)
    assert torch.equal(rk.int8_dequantize_reference(q, s, torch.bfloat16), (q.double() * s.double()[:, None]).bfloat16())


def test_realistic_updates_have_the_documented_size():
    W0, ups = quant.realistic_updates(64, 96, 8, 3, rel_norm=0.02, w_std=0.02, alpha=32.0, seed=3)
    assert W0.shape == (64, 96) and W0.std().item() == pytest.approx(0.02, rel=0.05)
    for A, B, s in ups:
        assert s == 32.0 / 8 and A.shape == (8, 96) and B.shape == (64, 8)
        assert A.abs().max() <= 1 / math.sqrt(96)  # Kaiming-uniform bound, as our lora_A
        assert ((s * (B.double() @ A.double())).norm() / W0.double().norm()).item() == pytest.approx(0.02, rel=1e-4)


def test_stochastic_rounding_is_unbiased_and_grows_like_sqrt_k():
    """Unbiased SR has E[err²] = f(1-f) per element, 1/6 step² on average, against 1/12 for round-to-nearest; the
    errors are independent, so after k merges (on top of W0's own rounding, 1/12) the error is √((1/12 + k/6) /
    (1/12)) = √(1 + 2k) × the one-shot error (measured 0.99-1.01 of that for seeds 0-2)."""
    W0, ups = quant.realistic_updates(128, 128, 8, 16, seed=1)
    err = quant.merge_drift(W0, ups, mechanisms=("stochastic",), seed=0)
    r = [e / o for e, o in zip(err["stochastic"], err["one_shot"])]
    assert r == pytest.approx([math.sqrt(1 + 2 * k) for k in range(1, 17)], rel=0.05)
