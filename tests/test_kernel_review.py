"""Adversarial review of the Triton kernels under the interpreter (CPU) against float64 torch: what the earlier
kernel tests (tests/test_kernels.py, tests/test_kernel_args.py) did not reach."""
from __future__ import annotations

import pytest
import torch

import relora_kernels as rk


def _fp16_layer_inputs():
    """fp16 inputs whose LoRA term s·(x·Aᵀ)·Bᵀ is finite (|y| up to ~7e3) while s·B is not (|B| ~ 10, s = 1e4: up to
    ~4e5, past fp16's 65504). Widths are multiples of 8: TMA-eligible in fp16."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 48, generator=g)
    w = torch.randn(32, 48, generator=g) * 0.2
    a = torch.randn(8, 48, generator=g) * 1e-3
    b = torch.randn(32, 8, generator=g) * 10
    dy = torch.randn(20, 32, generator=g) * 1e-3  # small: the gradients stay finite in fp16 too
    return x, w, a, b, dy


@pytest.mark.parametrize("base", ["float", "int8_scratch", "int8_in_gemm", "float_tma"])
def test_an_fp16_lora_scale_past_fp16_range_stays_finite_as_the_twin(kernels_on, monkeypatch, base):
    """The forward GEMM folded the scale into the fp16 B tile ([W | s·B]): s·B past 65504 became inf, and y was
    NaN (0·inf) or inf wherever the twin, which scales S·Bᵀ afterwards, is finite. Oracle: the float64 formula
    y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ and its gradients, by torch autograd on the same (fp16-rounded) values."""
    import relora_kernels.matmul as matmul_mod
    monkeypatch.setattr(matmul_mod, "TMA_GEMM", base == "float_tma")
    scale = 1e4
    x, w, a, b, dy = _fp16_layer_inputs()
    q, w_scale, _ = rk.int8_quantize_reference(w)
    if base != "float" and base != "float_tma":
        w = rk.int8_dequantize_reference(q, w_scale, torch.float32)  # the int8 layer's weight, for the oracle
    x16, a16, b16 = (t.half().requires_grad_() for t in (x, a, b))
    if base.startswith("float"):
        y = rk.lora_linear(x16, w.half(), a16, b16, scale)
    else:
        y = rk.int8_lora_linear(x16, q, w_scale, a16, b16, scale, in_gemm=base == "int8_in_gemm")
    got = [y, *torch.autograd.grad(y, (x16, a16, b16), dy.half())]
    leaves = [t.half().double().requires_grad_() for t in (x, a, b)]
    want_y = leaves[0] @ w.half().double().t() + scale * (leaves[0] @ leaves[1].t()) @ leaves[2].t()
    want = [want_y, *torch.autograd.grad(want_y, leaves, dy.half().double())]
    assert torch.isfinite(rk.lora_linear_reference(x.half(), w.half(), a.half(), b.half(), scale)).all()
    assert want_y.abs().max() < 6e4 and (scale * b.half().double()).abs().max() > 65504  # the case at hand
    for name, g, t in zip(("y", "dx", "dA", "dB"), got, want):
        assert torch.isfinite(g).all(), name
        assert ((g.double() - t).norm() / t.norm()).item() <= 1e-2, name


def test_the_int8_layers_device_error_names_the_int8_layer(kernels_on):
    """A bias or factor off x's device on the int8 Triton path was reported as ``relora_kernels.lora_linear``, a
    function the caller never called."""
    x, w, a, b, _ = _fp16_layer_inputs()
    q, w_scale, _ = rk.int8_quantize_reference(w)
    with pytest.raises(ValueError, match=r"^relora_kernels\.int8_lora_linear: bias is on meta but x is on cpu; "
                                         r"move it to x's device$"):
        rk.int8_lora_linear(x, q, w_scale, a, b, 0.5, torch.zeros(32, device="meta"))
    with pytest.raises(ValueError, match=r"^relora_kernels\.lora_linear: lora_B is on meta but x is on cpu; move"):
        rk.lora_linear(x, w, a, b.to("meta"), 0.5)
