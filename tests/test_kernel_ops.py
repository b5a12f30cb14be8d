"""The Triton layer path's two registered torch ops (relora_kernels.linear.FORWARD_OP / BACKWARD_OP), which it
launches through when traced (torch.compile, a Python dispatch mode: _runtime.traced). The opcheck and backward
cases run compiled on a GPU too (launch/gpu_tests.sh).

Oracles: torch.library.opcheck (the schema, the fake implementations' shapes, dtypes and strides against the
real outputs, no aliasing, AOTAutograd with dynamic shapes), the plain calls the backward op wraps, the twin's
matmuls for FlopCounterMode's count, and what runs: no launch under FakeTensorMode, no op dispatch on the plain
eager path. Under Triton's interpreter here
(tests/conftest.py's kernels_on); compiled and selectively checkpointed models: tests/test_compile.py and
tests/test_checkpointing.py.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import relora_kernels as rk
from relora_kernels import linear
from kernel_utils import DEVICES, count_layer_launches, make_inputs


class _Ops(TorchDispatchMode):
    """Records the op of every dispatch (and makes _runtime.traced() true)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _op_args(device, base, bias, dropout, in_gemm=False, deterministic=True, seed=0):
    """(forward args, backward args but the two need flags): the layer's launch arguments, M=37 rows."""
    from relora_kernels.int8_reference import int8_quantize_reference
    x, w, a, b, bias_t, dy = (t.detach() if t is not None else None
                              for t in make_inputs((37,), 48, 40, 5, bias, torch.float32, device, seed))
    w_scale = None
    if base == "int8":
        w, w_scale = int8_quantize_reference(w)[:2]
        w_scale = w_scale.float()
    keep = ((torch.rand(x.shape, generator=torch.Generator().manual_seed(seed + 1)) >= 0.25).view(torch.uint8)
            .to(device) if dropout else None)
    p = 0.25 if dropout else 0.0
    fwd = (x, w, a, b, bias_t, w_scale, keep, 1.5, p, deterministic, in_gemm)
    s = linear.layer_forward(*fwd)[1]
    bwd = (dy, x, s, w, w_scale, a, b, keep, 1.5, p, deterministic, in_gemm)
    return fwd, bwd


# (base, bias, dropout mask, in-GEMM dequantization, deterministic, LOWRANK_BLAS): each backward branch of
# linear.lora_backward (fixed-order split, fused dS/dB with atomics, cuBLAS rank-r products) and both int8 ones.
CASES = [("float", True, True, False, True, False), ("float", False, False, False, False, False),
         ("float", True, False, False, False, True), ("int8", True, False, False, True, False),
         ("int8", False, True, True, False, False)]
NEEDS = ((True, True), (True, False), (False, True), (False, False))


@pytest.mark.parametrize("base,bias,dropout,in_gemm,deterministic,lowrank_blas", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_the_ops_pass_opcheck(kernels_on, monkeypatch, device, base, bias, dropout, in_gemm, deterministic,
                              lowrank_blas):
    """torch.library.opcheck on both ops: float and int8 bases (scratch and in-GEMM dequantization), with and
    without bias and dropout mask, each backward branch; the backward with every need-flag pair (a gradient not
    asked for is an empty tensor, in the fake too)."""
    monkeypatch.setattr(linear, "LOWRANK_BLAS", lowrank_blas)
    fwd, bwd = _op_args(device, base, bias, dropout, in_gemm, deterministic)
    torch.library.opcheck(linear.FORWARD_OP, fwd)
    for need_dx, need_lora in NEEDS:
        torch.library.opcheck(linear.BACKWARD_OP, (*bwd, need_dx, need_lora))


@pytest.mark.parametrize("base,bias,dropout,in_gemm,deterministic,lowrank_blas", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_the_backward_op_computes_what_the_plain_call_does(kernels_on, monkeypatch, device, base, bias, dropout,
                                                           in_gemm, deterministic, lowrank_blas):
    """run_backward under a dispatch mode (through the op) against the plain launches: None exactly where a
    gradient was not asked for, the rest bitwise in deterministic mode (atomics elsewhere: to fp32 rounding)."""
    monkeypatch.setattr(linear, "LOWRANK_BLAS", lowrank_blas)
    fwd, bwd = _op_args(device, base, bias, dropout, in_gemm, deterministic)
    dy, x, s, w, w_scale, a, b, keep, scale, p, det, in_gemm = bwd
    for need_dx, need_lora in NEEDS:
        with _Ops() as ops:
            got = linear.run_backward(dy, x, s, w, a, b, weight_scale=w_scale, keep2=keep, scale=scale, dropout_p=p,
                                      deterministic=det, in_gemm=in_gemm, need_dx=need_dx, need_lora=need_lora)
        assert "relora_kernels::lora_linear_backward" in ops.names
        want = linear.layer_backward(*bwd, need_dx, need_lora)
        assert [g is None for g in got] == [not need_dx, not need_lora, not need_lora]
        for g, w_ in zip(got, want):
            assert (g is None) == (w_ is None)
            if g is not None and deterministic:
                assert torch.equal(g, w_)
            elif g is not None:
                torch.testing.assert_close(g, w_, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", ["float", "int8"])
def test_a_layer_under_fake_tensors_launches_nothing(kernels_on, monkeypatch, base):
    """lora_linear / int8_lora_linear on FakeTensorMode inputs (as a memory estimate or an export traces): the
    fake implementations give the output's and every gradient's shape and dtype, and no kernel is launched."""
    from relora_kernels.int8_reference import int8_quantize_reference
    x, w, a, b, bias, dy = make_inputs((2, 9), 48, 40, 5, True, torch.float32, "cpu", 0)
    calls = count_layer_launches(monkeypatch)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x, a, b, bias = (t.detach().clone().requires_grad_() for t in (x, a, b, bias))
        if base == "int8":
            q, scale = int8_quantize_reference(w)[:2]
            y = rk.int8_lora_linear(x, q, scale.float(), a, b, 1.5, bias, dropout_p=0.1)
        else:
            y = rk.lora_linear(x, w, a, b, 1.5, bias, dropout_p=0.1)
        grads = torch.autograd.grad(y, (x, a, b, bias), torch.ones_like(y))
        assert y.shape == (2, 9, 40) and y.dtype == torch.float32
        assert [g.shape for g in grads] == [x.shape, a.shape, b.shape, bias.shape]
    assert not calls


def test_the_plain_eager_path_dispatches_no_op(kernels_on):
    """Outside a trace the layer calls its launchers directly (an op's dispatch costs ~40 µs per layer per step,
    kernels/_runtime.py traced): torch's profiler, which adds no dispatch mode, sees no relora_kernels op; a
    dispatch mode sees the forward op, then the backward op."""
    x, w, a, b, bias, dy = make_inputs((2, 9), 48, 40, 5, True, torch.float32, "cpu", 0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        rk.lora_linear(x, w, a, b, 1.5, bias).backward(dy)
    assert not [e.name for e in prof.events() if e.name.startswith("relora_kernels")]
    with _Ops() as ops:
        y = rk.lora_linear(x, w, a, b, 1.5, bias)
        y.backward(dy)
    mine = [n for n in ops.names if n.startswith("relora_kernels")]
    assert mine == ["relora_kernels::lora_linear_forward", "relora_kernels::lora_linear_backward"]


@pytest.mark.parametrize("base", ["float", "int8"])
def test_flop_counter_counts_the_ops_as_the_twins_matmuls(kernels_on, base):
    """torch.utils.flop_counter.FlopCounterMode (a dispatch mode: the layer runs through its ops) counts the
    registered formulas: forward, forward+backward, and forward+backward without dX equal the count of the
    twin's matmuls, which torch counts op by op (x of 2×9 tokens, bias and dropout on)."""
    from torch.utils.flop_counter import FlopCounterMode

    from relora_kernels.int8_reference import int8_quantize_reference
    x, w, a, b, bias, dy = make_inputs((2, 9), 48, 40, 5, True, torch.float32, "cpu", 0)
    q, w_scale = int8_quantize_reference(w)[:2]
    w_scale = w_scale.float()

    def flops(fn):
        counts = []
        for backward, inputs in ((False, x), (True, x), (True, x.detach())):  # the last: no dX (a frozen input)
            with FlopCounterMode(display=False) as counter:
                y = fn(inputs, a, b, bias)
                if backward:
                    y.backward(dy)
            counts.append(counter.get_total_flops())
        return counts

    if base == "int8":
        got = flops(lambda *t: rk.int8_lora_linear(t[0], q, w_scale, *t[1:3], 1.5, t[3], dropout_p=0.1))
        want = flops(lambda *t: rk.int8_lora_linear_reference(t[0], q, w_scale, *t[1:3], 1.5, t[3], dropout_p=0.1))
    else:
        got = flops(lambda *t: rk.lora_linear(t[0], w, *t[1:3], 1.5, t[3], dropout_p=0.1))
        want = flops(lambda *t: rk.lora_linear_reference(t[0], w, *t[1:3], 1.5, t[3], dropout_p=0.1))
    m, k, n, r = 18, 48, 40, 5
    assert want[0] == 2 * m * (k * n + k * r + r * n)  # the hand count of the forward's three products
    assert got == want and want[1] > want[2] > want[0], (got, want)
