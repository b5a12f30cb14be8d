"""relora_kernels' arguments on every path: what each kernel would misuse is refused by name, tensors past 32-bit
offsets never reach a kernel, one-element tensor scales. Dispatch itself: tests/test_kernel_dispatch.py."""
from __future__ import annotations

import pytest
import torch

import relora_kernels as rk
from relora_kernels import _runtime
from kernel_utils import interpreter_3_7, make_inputs


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
    # The int8 Triton path checks the LoRA operands the same way (it used to run on mixed dtypes).
    q, s, _ = rk.int8_quantize_reference(w)
    with pytest.raises(ValueError, match="lora_A has dtype torch.float16 but x has torch.float32"):
        rk.int8_lora_linear(x, q, s, a.half(), b, 1.0)



@pytest.mark.parametrize("mode", ["triton", "torch", "reference"])
def test_merge_and_layer_arguments_the_kernels_would_misuse(monkeypatch, mode):
    """Found by a review under the interpreter: int8_merge_ read and wrote a scale or residual shorter than q
    past its end (heap corruption on CPU), rounded lora_B to lora_A's dtype, and merged into expand()ed
    storage (each program writing the same memory); lora_merge_ too; out_features 0 failed in backward. Each
    is now a ValueError naming it, on every path (the twins failed differently or not at all)."""
    monkeypatch.setenv("RELORA_KERNELS", mode)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w, a, b, bias, _ = make_inputs((4,), 8, 6, 2, True, torch.float32, "cpu", seed=0)
    q, s, res = rk.int8_quantize_reference(w, residual=True)
    q0, s0, res0 = q.clone(), s.clone(), res.clone()
    for args, match in (((q, s[:3], res), r"int8_merge_: scale must have shape \(6,\), one per row of q; got \(3,\)"),
                        ((q, s, res[:3]), r"residual must be int8 of q's shape \(6, 8\); got torch.int8 \(3, 8\)"),
                        ((q.float(), s, res), r"q must be a 2-D int8 tensor"),
                        ((q[:1].expand(6, 8), s, res), r"q has elements that share memory")):
        with pytest.raises(ValueError, match=match):
            rk.int8_merge_(*args, a, b, 0.5)
    with pytest.raises(ValueError, match=r"lora_A \(torch.bfloat16\) and lora_B \(torch.float32\) must share"):
        rk.int8_merge_(q, s, res, a.bfloat16(), b, 0.5)
    with pytest.raises(ValueError, match=r"int8_dequantize: scale must have shape \(6,\)"):
        rk.int8_dequantize(q, s[:3], torch.float32)
    # A scale off q's device failed inside the interpreter (or at the GPU launch); on every path now.
    for op, call in (("int8_dequantize", lambda: rk.int8_dequantize(q, s.to("meta"))),
                     ("int8_merge_", lambda: rk.int8_merge_(q, s.to("meta"), res, a, b, 0.5))):
        with pytest.raises(ValueError, match=f"{op}: scale is on meta but q is on cpu"):
            call()
    # lora_merge_ checked these on the Triton path only: a merge that ran on CPU failed on a GPU.
    w0 = w.clone()
    for args, match in (((w, a.bfloat16(), b), r"lora_A \(torch.bfloat16\) and lora_B \(torch.float32\) must share"),
                        ((w.long(), a, b), "weight and the LoRA factors must be floating point"),
                        ((w, a.to("meta"), b), "lora_A is on meta but weight is on cpu")):
        with pytest.raises(ValueError, match=match):
            rk.lora_merge_(*args, 0.5)
    assert torch.equal(w, w0)
    with pytest.raises(ValueError, match=r"expected a 2-D floating-point weight \(out, in\); got torch.int64"):
        rk.int8_quantize_reference(w.long())
    # The kernels take the LoRA scale as a constant: a scale that requires grad got none there (the twin's did).
    for fn, base in ((rk.lora_linear, w), (rk.int8_lora_linear, None)):
        weights = (base,) if base is not None else (q, s)
        with pytest.raises(ValueError, match="scale is a tensor that requires grad"):
            fn(x, *weights, a, b, torch.tensor(0.5, requires_grad=True))
        fn(x, *weights, a, b, torch.tensor(0.5))  # a constant tensor is fine
    assert torch.equal(q, q0) and torch.equal(s, s0) and torch.equal(res, res0)  # nothing written
    base = torch.randn(1, 8)
    with pytest.raises(ValueError, match="lora_merge_: weight has elements that share memory"):
        rk.lora_merge_(base.expand(6, 8), a, b, 0.5)
    with pytest.raises(ValueError, match="need in_features >= 1, out_features >= 1 and r >= 1"):
        rk.lora_linear(x, w[:0], a, b[:0], 1.0)



def test_a_float64_merge_accumulates_in_float64():
    """The twin (the CPU path) sent a float64 W through float32: 1.7e-7 error, and W changed at scale 0."""
    g = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(*sh, generator=g, dtype=torch.float64) for sh in ((16, 16), (4, 16), (16, 4)))
    w0 = w.clone()
    rk.lora_merge_(w, a, b, 0.0)
    assert torch.equal(w, w0)
    rk.lora_merge_(w, a, b, 0.5)
    assert (w - (w0 + 0.5 * b @ a)).abs().max().item() < 1e-14



@interpreter_3_7
def test_tensors_past_32_bit_offsets_never_reach_the_kernels(monkeypatch):
    """The kernels index with 32-bit offsets (Triton types integer arguments below 2**31 as i32), which would
    wrap silently past 2**31 elements. With the limit lowered to 100 elements: RELORA_KERNELS=triton refuses
    the call naming the tensor; auto (Triton claimed, as on CUDA) warns and takes the torch path, whose
    result is the torch path's exactly; a 12-row x with a 6x8 weight still fits and runs the kernel."""
    x, w, a, b, bias, _ = make_inputs((13,), 8, 6, 2, True, torch.float32, "cpu", seed=0)  # x spans 104
    q, s, res = rk.int8_quantize_reference(w, residual=True)
    monkeypatch.setattr(_runtime, "INT32_MAX", 100)
    monkeypatch.setenv("RELORA_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=r"lora_linear: x spans 104 elements, dx spans 104 elements, past the "
                                         r"Triton kernels' 32-bit offsets \(at most 100\); use a smaller micro-batch"):
        rk.lora_linear(x, w, a, b, 1.0, bias)
    with pytest.raises(ValueError, match="int8_lora_linear: x spans 104"):
        rk.int8_lora_linear(x, q, s, a, b, 1.0, bias)
    big = torch.randn(13, 8)
    with pytest.raises(ValueError, match="lora_merge_: weight spans 104"):
        rk.lora_merge_(big, a.detach(), torch.randn(13, 2), 1.0)
    with pytest.raises(ValueError, match="int8_merge_: q spans 104"):
        rk.int8_merge_(*rk.int8_quantize_reference(big, residual=True), a.detach(), torch.randn(13, 2), 1.0)
    with pytest.raises(ValueError, match="int8_dequantize: q spans 104"):  # it launched (a user trial, 2026-12-05)
        rk.int8_dequantize(*rk.int8_quantize_reference(big)[:2])
    assert torch.allclose(rk.lora_linear(x[:12], w, a, b, 1.0, bias),  # 96 elements: the kernel runs
                          rk.lora_linear_reference(x[:12], w, a, b, 1.0, bias), rtol=1e-5, atol=1e-5)

    monkeypatch.setenv("RELORA_KERNELS", "auto")
    monkeypatch.setattr(_runtime, "use_triton", lambda t, op=None: True)  # as auto says on CUDA
    with pytest.warns(RuntimeWarning, match="lora_linear: x spans 104 .* this call takes the torch path"):
        got = rk.lora_linear(x, w, a, b, 1.0, bias)
    assert torch.equal(got, rk.lora_linear_torch(x, w, a, b, 1.0, bias))
    with pytest.warns(RuntimeWarning, match="lora_merge_: weight spans 104"):
        merged = rk.lora_merge_(big.clone(), a.detach(), b2 := torch.randn(13, 2), 1.0)
    assert torch.equal(merged, rk.lora_merge_reference_(big.clone(), a.detach(), b2, 1.0))
    # A transposed view spans what its strides reach, not its numel.
    assert _runtime.span(torch.empty(10, 20).t()) == 200 and _runtime.span(torch.empty(10, 20)[::2]) == 180



@interpreter_3_7
def test_a_strided_gradient_past_32_bit_offsets_is_made_contiguous(monkeypatch):
    """The forward checks dY's size (rows x out); the gradient can arrive as a narrowed view whose strides
    reach further (torch.cat's backward). With the limit lowered to 100: a (10, 6) gradient inside a (10, 12)
    buffer spans 114 elements; the kernels get a contiguous copy and the gradients equal the twin's."""
    x, w, a, b, bias, _ = make_inputs((10,), 8, 6, 2, True, torch.float32, "cpu", seed=1)
    monkeypatch.setattr(_runtime, "INT32_MAX", 100)
    monkeypatch.setenv("RELORA_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    wide = torch.randn(10, 12)
    dy = wide[:, :6]
    assert _runtime.span(dy) == 114 and _runtime.within_int32(dy).is_contiguous()
    assert _runtime.within_int32(wide[:5, :6]) is not None and _runtime.span(wide[:5, :6]) == 54
    assert _runtime.within_int32(wide[:5, :6]).data_ptr() == wide.data_ptr()  # within the limit: no copy
    from relora_kernels import linear  # imported here: the package loads its kernel modules on first use
    seen = []
    real = linear.lora_backward
    monkeypatch.setattr(linear, "lora_backward", lambda dy2, *args, **kw: seen.append(dy2) or real(dy2, *args, **kw))
    got = torch.autograd.grad(rk.lora_linear(x, w, a, b, 0.5, bias), (x, a, b, bias), dy)
    want = torch.autograd.grad(rk.lora_linear_reference(x, w, a, b, 0.5, bias), (x, a, b, bias), dy)
    assert seen and seen[0].is_contiguous() and _runtime.span(seen[0]) == 60
    for g, r in zip(got, want):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-5)



def test_a_tensor_spanning_exactly_the_32_bit_limit_fits():
    """A tensor spanning n elements has offsets 0..n-1: n = INT32_MAX fits ("at most 2,147,483,647" in the error),
    one more does not."""
    assert _runtime.fits_int32("op", x=_runtime.INT32_MAX, w=1)
    with pytest.warns(RuntimeWarning, match="x spans 2,147,483,648 elements"):
        assert not _runtime.fits_int32("op", x=_runtime.INT32_MAX + 1, w=1)



def test_the_layers_output_and_weight_are_checked_for_32_bit_offsets_too(monkeypatch):
    """Besides x and dX, a layer's launches address Y and dY (rows x out) and W. With the limit lowered to 100,
    under RELORA_KERNELS=triton (refused before any launch): 12 rows widened from 8 to 9 features (x 96 elements,
    y 108), a 13 x 8 weight (104) under 2 rows, S (rows x r) of 10 x 11 and a 13 x 8 lora_A (r above out, which
    lora_linear allows); float and int8 base. The merges: the factors and a strided residual."""
    monkeypatch.setattr(_runtime, "INT32_MAX", 100)
    monkeypatch.setenv("RELORA_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for lead, d_out, r, what in (((12,), 9, 2, "y spans 108 elements"), ((2,), 13, 2, "weight spans 104 elements"),
                                 ((10,), 6, 11, "s spans 110 elements"), ((2,), 6, 13, "lora_A spans 104 elements")):
        x, w, a, b, _, _ = make_inputs(lead, 8, d_out, r, False, torch.float32, "cpu", seed=0)
        q, s, _ = rk.int8_quantize_reference(w)
        with pytest.raises(ValueError, match=f"relora_kernels.lora_linear: {what}, past the Triton kernels' 32-bit"):
            rk.lora_linear(x, w, a, b, 1.0)
        with pytest.raises(ValueError, match=f"relora_kernels.int8_lora_linear: {what}, past"):
            rk.int8_lora_linear(x, q, s, a, b, 1.0)
    w, a, b = torch.randn(6, 8), torch.randn(13, 8), torch.randn(6, 13)
    with pytest.raises(ValueError, match="relora_kernels.lora_merge_: lora_A spans 104 elements, past"):
        rk.lora_merge_(w, a, b, 1.0)
    q, s, _ = rk.int8_quantize_reference(w)
    residual = torch.zeros(6, 20, dtype=torch.int8)[:, :8]  # 48 elements spanning 5 * 20 + 8
    with pytest.raises(ValueError, match="relora_kernels.int8_merge_: residual spans 108 elements, past"):
        rk.int8_merge_(q, s, residual, a[:2], b[:, :2], 1.0)



@pytest.mark.parametrize("mode", ["triton", "torch", "reference"])
def test_a_one_element_tensor_scale_acts_as_its_float(monkeypatch, mode):
    """A scale given as a one-element tensor (accepted on every path) gives what the float gives: the same
    dtype, shape and values, with gradients (the twin kept the tensor: fp16 inputs came out fp32 or fp64 by
    type promotion, and a 1-D x's output took the scale's (1, 1) shape)."""
    monkeypatch.setenv("RELORA_KERNELS", mode)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for lead in ((2, 3), ()):
        x, w, a, b, bias, dy = make_inputs(lead, 8, 6, 2, True, torch.float16, "cpu", seed=1)
        q, s, _ = rk.int8_quantize_reference(w.float())
        for layer, weights in ((rk.lora_linear, (w,)), (rk.int8_lora_linear, (q, s.half()))):
            want = layer(x, *weights, a, b, 0.5, bias)
            want_grads = torch.autograd.grad(want, (x, a, b, bias), dy)
            for scale in (torch.tensor([0.5], dtype=torch.float64), torch.tensor([[0.5]]), torch.tensor(0.5)):
                y = layer(x, *weights, a, b, scale, bias)
                assert (y.dtype, y.shape) == (torch.float16, (*lead, 6)), (layer.__name__, lead, scale)
                assert torch.equal(y, want)
                for g, g_want in zip(torch.autograd.grad(y, (x, a, b, bias), dy), want_grads):
                    assert torch.equal(g, g_want)



@pytest.mark.parametrize("mode", ["triton", "torch", "reference"])
def test_bad_arguments_are_named_on_every_path(monkeypatch, mode):
    """Each argument check of the layers and the merges, on every path (the twins run most of these shapes without
    an error, or fail with an unrelated one: a rank-0 layer was a silent no-op, int32 scales were truncated by the
    int8 merge, float64 factors under RELORA_KERNELS=triton quietly merged on the twin): a ValueError naming the
    argument and what is valid, and nothing written."""
    monkeypatch.setenv("RELORA_KERNELS", mode)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w, a, b, bias, _ = make_inputs((4,), 8, 6, 2, True, torch.float32, "cpu", seed=0)
    q, s, res = rk.int8_quantize_reference(w, residual=True)
    layer_cases = [
        ((x, w, a[:0], b[:, :0], 1.0), r"lora_A \(r, in\) \(0, 8\) need in_features >= 1, out_features >= 1 and r >= 1"),
        ((x[:, :0], w[:, :0], a[:, :0], b, 1.0), r"weight \(out, in\) \(6, 0\) and lora_A \(r, in\) \(2, 0\) need"),
        ((x[0, 0], w, a, b, 1.0), r"x's last dimension must be weight's in_features=8; got x of shape \(\)"),
        ((x, w, torch.randn(2, 9), b, 1.0), r"expected lora_A \(r, 8\) and lora_B \(6, r\) with the same r; got lora_A "
                                            r"\(2, 9\), lora_B \(6, 2\)"),
        ((x, w, a, b, 1.0, bias[:5]), r"bias must have shape \(6,\); got \(5,\)"),
        ((x, w, a, b, 1.0, None, -0.1), r"dropout_p=-0.1 must be in \[0, 1\)"),
        ((x, w, a, b, torch.tensor([0.5, 0.5])), r"scale must be a number or a one-element tensor; got shape \(2,\)"),
    ]
    for args, match in layer_cases:
        with pytest.raises(ValueError, match=match):
            rk.lora_linear(*args)
        x_, w_, *rest = args  # the int8 layer: the same checks on q (out, in)
        with pytest.raises(ValueError, match=match):
            rk.int8_lora_linear(x_, torch.zeros(w_.shape, dtype=torch.int8), torch.ones(w_.shape[0]), *rest)
    for args in ((x, q.float(), s, a, b, 1.0), (x, q, s[:3], a, b, 1.0)):
        with pytest.raises(ValueError, match=r"int8_lora_linear: expected int8 q \(out, in\) and scale \(out,\)"):
            rk.int8_lora_linear(*args)
    if mode == "triton":  # the Triton path reads every tensor beside x; the twins fail as torch does
        with pytest.raises(ValueError, match="lora_linear: lora_A is on meta but x is on cpu"):
            rk.lora_linear(x, w, a.to("meta"), b, 1.0)
        with pytest.raises(ValueError, match="int8_lora_linear: w_scale is on meta but x is on cpu"):
            rk.int8_lora_linear(x, q, s.to("meta"), a, b, 1.0)
        for fn, weights in ((rk.lora_linear, (w,)), (rk.int8_lora_linear, (q, s))):  # the kernels take one dtype
            with pytest.raises(ValueError, match=r"\(Triton path\): bias has dtype torch.float16 but x has torch.float32"):
                fn(x, *weights, a, b, 1.0, bias.half())

    a, b = a.detach(), b.detach()
    w0, q0, s0, res0 = w.clone(), q.clone(), s.clone(), res.clone()
    merge_cases = [((w[0], a, b), r"lora_merge_: weight \(out, in\), lora_A \(r, in\) and lora_B \(out, r\) must be "
                                  r"2-D; got \(8,\), \(2, 8\), \(6, 2\)"),
                   ((w, a[0], b), r"must be 2-D; got \(6, 8\), \(8,\), \(6, 2\)"),
                   ((w, a.long(), b.long()), r"weight and the LoRA factors must be floating point; got weight "
                                             r"torch.float32, lora_A torch.int64"),
                   ((w, a, b.to("meta")), "lora_B is on meta but weight is on cpu; move it to weight's device")]
    # Found by a fuzzing review: a factor inside W's memory (the kernel read B from tiles it had written: 9.3 off
    # the twin), and an inference tensor outside inference_mode (the kernels wrote it, the twins' copy_ refused)
    big = torch.randn(14, 8)
    merge_cases += [((big[:6], a, big[:6, :2]), "lora_merge_: lora_B shares memory with weight, which the op "
                                                r"writes; pass a copy \(lora_B.clone\(\)\)"),
                    ((big[:6], big[5:7], b), "lora_merge_: lora_A shares memory with weight"),
                    ((big[:6], big[6:8], big[8:14, :2]), None)]  # disjoint rows of one buffer: merged
    with torch.inference_mode():
        frozen = torch.randn(6, 8)
    merge_cases.append(((frozen, a, b), "lora_merge_: weight is an inference tensor .* only inside inference_mode"))
    if mode == "triton":
        merge_cases.append(((w, a.double(), b.double()), r"lora dtype torch.float64 is not supported by the kernel; "
                                                         r"use one of .* \(float64 factors: RELORA_KERNELS=auto"))
    for args, match in merge_cases:
        if match is None:
            want = args[0] + 0.5 * args[2].double().mm(args[1].double()).float()
            assert torch.allclose(rk.lora_merge_(*args, 0.5), want, rtol=1e-5, atol=1e-5)
            continue
        with pytest.raises(ValueError, match=match):
            rk.lora_merge_(*args, 0.5)
    with torch.inference_mode():
        q_inf, s_inf, res_inf = (t.clone() for t in (q, s, res))
    int8_cases = [((q, s.to(torch.int32), res, a, b), r"int8_merge_: scale must be bf16 \(as int8_quantize_reference "
                                                      r"makes it\) or float32; got torch.int32"),
                  ((q, s.half(), res, a, b), r"scale must be bf16 .* or float32; got torch.float16"),
                  ((q_inf, s_inf, res_inf, a, b), "int8_merge_: q is an inference tensor"),
                  ((q, s, res.to(torch.int16), a, b), r"residual must be int8 of q's shape \(6, 8\); got torch.int16 "
                                                      r"\(6, 8\)"),
                  ((q, s[:1].expand(6), res, a, b), "int8_merge_: scale has elements that share memory"),
                  ((q, s, res[:1].expand(6, 8), a, b), "int8_merge_: residual has elements that share memory"),
                  ((q, s, res, a[:, :3], b), r"int8_merge_: expected lora_A \(r, 8\) and lora_B \(6, r\); got \(2, 3\) "
                                             r"and \(6, 2\)"),
                  ((q, s, res, a, b[:3]), r"expected lora_A \(r, 8\) and lora_B \(6, r\); got \(2, 8\) and \(3, 2\)"),
                  ((q, s, res, a[0], b), r"expected lora_A \(r, 8\) and lora_B \(6, r\); got \(8,\) and \(6, 2\)")]
    for args, match in int8_cases:
        with pytest.raises(ValueError, match=match):
            rk.int8_merge_(*args, 0.5)
    with pytest.raises(ValueError, match="int8_dequantize: scale must be bf16"):
        rk.int8_dequantize(q, s.to(torch.int32))
    assert torch.equal(w, w0) and torch.equal(q, q0) and torch.equal(s, s0) and torch.equal(res, res0)

