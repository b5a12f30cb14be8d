"""The BLAS-chain path (kernels/torch_linear.py, ``RELORA_KERNELS=torch`` and the CPU default): every output
and gradient against the float64 twin, the merged-weight variant's dispatch, what it saves, autocast, and
second-order gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import relora_kernels as rk
from kernel_utils import SHAPES, _shape_id, make_inputs, rel_err

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
    """Which variant runs: RELORA_MERGED_WEIGHT when set; else, on CPU, the merged one exactly where it does
    fewer multiply-adds (hand-computed crossovers for 256 -> 128: with a backward M·(256 + 128) >= 2·256·128,
    i.e. M >= 171; a forward without autograd M >= 256); the epilogue chain under dropout. And the merged
    variant's bf16 error: W_eff is rounded once to bf16, like a merged bf16 model, so y stays within bf16
    rounding of the fp64 result."""
    from relora_kernels import torch_linear
    cpu = torch.zeros(1)
    monkeypatch.delenv("RELORA_MERGED_WEIGHT", raising=False)
    assert torch_linear.merged_weight_default(cpu.device) is None  # chosen per call on CPU (BENCHMARKS.md)
    monkeypatch.setenv("RELORA_MERGED_WEIGHT", "0")
    assert torch_linear.merged_weight_default(cpu.device) is False
    monkeypatch.setenv("RELORA_MERGED_WEIGHT", "maybe")
    with pytest.raises(ValueError, match="RELORA_MERGED_WEIGHT"):
        torch_linear.merged_weight_default(cpu.device)
    monkeypatch.delenv("RELORA_MERGED_WEIGHT")
    seen = []
    for cls in (torch_linear.MergedLoRALinearFunction, torch_linear.TorchLoRALinearFunction):
        monkeypatch.setattr(cls, "apply", (lambda real, name: lambda *a: seen.append(name[:6]) or real(*a))(
            cls.apply, cls.__name__))

    def variant(m, grad=True, env=None, **kw):
        if env is None:
            monkeypatch.delenv("RELORA_MERGED_WEIGHT", raising=False)
        else:
            monkeypatch.setenv("RELORA_MERGED_WEIGHT", env)
        x, w, a, b, bias, _ = make_inputs((m,), 256, 128, 8, True, torch.float32, "cpu", seed=5)
        with torch.set_grad_enabled(grad):
            torch_linear.lora_linear_torch(x, w, a, b, 0.5, bias, **kw)
        return seen.pop()
    assert [variant(170), variant(171), variant(2, grad=False), variant(255, grad=False),
            variant(256, grad=False)] == ["TorchL", "Merged", "TorchL", "TorchL", "Merged"]
    assert variant(4096, dropout_p=0.1) == "TorchL" and variant(4096, dropout_p=0.1, training=False) == "Merged"
    assert variant(2, env="1") == "Merged" and variant(4096, env="0") == "TorchL"
    assert variant(2, merged_weight=True) == "Merged" and variant(4096, env="1", merged_weight=False) == "TorchL"
    x, w, a, b, bias, dy = make_inputs((64,), 256, 128, 8, True, torch.bfloat16, "cpu", seed=5)
    y = torch_linear.lora_linear_torch(x, w, a, b, 0.5, bias, merged_weight=True)
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
    # x alone on an int8 base through the epilogue chain (not the merged weight): dX needs dS = s·dY·B though
    # A needs no gradient (a mutation computing dS only for dA failed here with a TypeError)
    monkeypatch.setenv("RELORA_MERGED_WEIGHT", "0")
    q, q_scale, _ = rk.int8_quantize_reference(w)
    y = rk.int8_lora_linear(x, q, q_scale, a.detach(), b.detach(), 0.5, bias.detach())
    (dx,) = torch.autograd.grad(y, (x,), dy)
    xr = x.detach().double().requires_grad_()
    yr = rk.int8_lora_linear_reference(xr, q, q_scale, a.double(), b.double(), 0.5, bias.double())
    (dxr,) = torch.autograd.grad(yr, (xr,), dy.double())
    assert rel_err(dx, dxr) < 1e-5
    monkeypatch.delenv("RELORA_MERGED_WEIGHT")
    # Mixed dtypes outside autocast: the twin's behaviour (torch's own F.linear dtype error), as before.
    with pytest.raises(RuntimeError, match="dtype"):
        rk.lora_linear(x.double(), w, a, b, 0.5, bias)


@pytest.mark.parametrize("mode", ["torch", "reference"])
def test_float64_under_autocast_stays_float64_as_in_f_linear(monkeypatch, mode):
    """Autocast leaves float64 tensors alone (F.linear keeps an all-float64 call in float64 and refuses a
    float64/float32 mix); the layer's paths and the chunked loss's GEMMs do the same, not cast to bf16."""
    from relora_ds.loss import linear_cross_entropy
    monkeypatch.setenv("RELORA_KERNELS", mode)
    x, w, a, b, bias, dy = make_inputs((6, 5), 16, 12, 4, True, torch.float64, "cpu", seed=3)
    want = rk.lora_linear_reference(x, w, a, b, 0.5, bias)
    q, sc, _ = rk.int8_quantize_reference(w)
    want8 = rk.int8_lora_linear_reference(x, q, sc, a, b, 0.5, bias)
    h, v = x.reshape(-1, 16), torch.randn(20, 16, dtype=torch.float64)
    t = torch.randint(0, 20, (30,))
    want_loss = F.cross_entropy(F.linear(h, v), t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear(x, w).dtype == torch.float64  # the behaviour matched
        y = rk.lora_linear(x, w, a, b, 0.5, bias)
        y8 = rk.int8_lora_linear(x, q, sc, a, b, 0.5, bias)
        loss = linear_cross_entropy(h, v, t, 7)
        with pytest.raises(RuntimeError, match="dtype"):
            rk.lora_linear(x, w.float(), a.float(), b.float(), 0.5, bias.float())
    assert y.dtype == y8.dtype == torch.float64
    assert rel_err(y, want) < 1e-12 and rel_err(y8, want8) < 1e-12
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)  # the loss sums in fp32; bf16 GEMMs: 1e-3
    # float32 inputs are still cast (the casts' gradients reach the float32 tensors in float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rk.lora_linear(x.float(), w.float(), a.float(), b.float(), 0.5, bias.float()).dtype == torch.bfloat16


@pytest.mark.parametrize("merged", [False, True], ids=["epilogue", "merged"])
@pytest.mark.parametrize("base", ["float", "int8", "float-dropout"])
def test_torch_path_second_order_gradients_match_the_twin(base, merged):
    """A gradient penalty through the `torch` path (the CPU default): first gradients of x, A and B with
    create_graph=True, then the gradient of loss + their squared norms. Its Functions saved a reshape of x
    made in forward and S from forward, and ran in-place epilogues: the terms through x and A came back None
    (found by a review; the oracle's norms 344 and 260). Oracle: the float64 twin; and torch's gradgradcheck."""
    import relora_kernels as rk
    from relora_kernels import torch_linear
    g = torch.Generator().manual_seed(5)
    x, a, b, bias = (torch.randn(*sh, generator=g, dtype=torch.float64) for sh in ((2, 3, 12), (4, 12), (10, 4), (10,)))
    w = torch.randn(10, 12, generator=g, dtype=torch.float64)
    q, w_scale, _ = rk.int8_quantize_reference(w)
    p = 0.3 if base == "float-dropout" else 0.0

    def run(fn_kind, x, a, b, bias):
        gen = torch.Generator().manual_seed(9)
        if base == "int8":
            f = torch_linear.int8_lora_linear_torch if fn_kind == "torch" else rk.int8_lora_linear_reference
            kw = dict(merged_weight=merged) if fn_kind == "torch" else {}
            return f(x, q, w_scale.double(), a, b, 0.7, bias, **kw)
        f = rk.lora_linear_torch if fn_kind == "torch" else rk.lora_linear_reference
        kw = dict(merged_weight=merged) if fn_kind == "torch" else {}
        return f(x, w, a, b, 0.7, bias, dropout_p=p, generator=gen, **kw)

    def penalized(fn_kind):
        leaves = [t.detach().clone().requires_grad_() for t in (x, a, b, bias)]
        loss = (run(fn_kind, *leaves) ** 2).sum()
        firsts = torch.autograd.grad(loss, leaves[:3], create_graph=True)
        return torch.autograd.grad(loss + 0.1 * sum((f ** 2).sum() for f in firsts), leaves)

    for got, want in zip(penalized("torch"), penalized("reference")):
        assert got is not None and torch.allclose(got, want, rtol=1e-9, atol=1e-9)
    if base != "float-dropout":  # gradgradcheck draws no mask; the dropout case is covered above
        torch.autograd.gradgradcheck(lambda x, a, b: run("torch", x, a, b, bias),
                                     [t.detach().clone().requires_grad_() for t in (x, a, b)])


def test_merged_weight_counts_a_backward_through_the_lora_factors_alone(monkeypatch):
    """A backward runs when any input needs a gradient, not only x (a first layer's input is data, its LoRA factors
    train): then the merged variant is the cheaper one from M·(in + out) >= 2·in·out (hand-computed for 256 -> 128:
    M >= 171 tokens, however x is shaped), in a forward alone from M >= in (256)."""
    from relora_kernels import torch_linear
    monkeypatch.delenv("RELORA_MERGED_WEIGHT", raising=False)
    x, w, a, b, bias, _ = make_inputs((171,), 256, 128, 8, True, torch.float32, "cpu", seed=5)
    x = x.detach()
    assert torch_linear.use_merged_weight(x, w.shape, None, (w, a, b, bias)) is True
    assert torch_linear.use_merged_weight(x[:170], w.shape, None, (w, a, b, bias)) is False
    assert torch_linear.use_merged_weight(x.reshape(9, 19, 256), w.shape, None, (w, a, b, bias)) is True  # 171 tokens
    frozen = (w, a.detach(), b.detach(), bias.detach())
    assert torch_linear.use_merged_weight(x, w.shape, None, frozen) is False  # no backward: 171 < 256
    assert torch_linear.use_merged_weight(torch.cat([x, x]), w.shape, None, frozen) is True


@pytest.mark.parametrize("case", ["bias", "no_bias", "int8"])
def test_the_out_of_place_forward_under_a_dispatch_mode_matches_the_twin(case):
    """Under a Python dispatch mode (selective activation checkpointing's; here one that only forwards each op) the
    epilogue chain's forward runs out of place, with the scale moved onto alpha or beta (kernels/torch_linear.py
    _side_then_base); y and every gradient against the float64 twin, with and without a bias, float and int8 base."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from relora_kernels import torch_linear

    class Forward(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
    x, w, a, b, bias, dy = make_inputs((2, 9), 24, 20, 4, case != "no_bias", torch.float32, "cpu", seed=12)
    q, w_scale, _ = rk.int8_quantize_reference(w)
    leaves = [t for t in (x, a, b, bias) if t is not None]

    def run(x, a, b, bias, twin):
        if case == "int8":
            fn = rk.int8_lora_linear_reference if twin else torch_linear.int8_lora_linear_torch
            return fn(x, q, w_scale, a, b, 0.7, bias, **({} if twin else {"merged_weight": False}))
        fn = rk.lora_linear_reference if twin else torch_linear.lora_linear_torch
        return fn(x, w.to(x.dtype), a, b, 0.7, bias, **({} if twin else {"merged_weight": False}))
    with Forward():
        y = run(*leaves, *([None] if bias is None else []), twin=False)
        got = [y, *torch.autograd.grad(y, leaves, dy)]
    ref = [t.detach().double().requires_grad_() for t in leaves]
    yr = run(*ref, *([None] if bias is None else []), twin=True)
    want = [yr, *torch.autograd.grad(yr, ref, dy.double())]
    assert all(rel_err(g, t) < 1e-5 for g, t in zip(got, want)), [rel_err(g, t) for g, t in zip(got, want)]
