"""The Triton layer path's two registered torch ops (relora_kernels.linear.FORWARD_OP / BACKWARD_OP), which it
launches through when traced (torch.compile, a Python dispatch mode: _runtime.traced). The opcheck and bitwise
cases run compiled on a GPU too (launch/gpu_tests.sh).

Oracles: torch.library.opcheck (the schema, the fake implementations' shapes, dtypes and strides against the
real outputs, no aliasing, AOTAutograd with dynamic shapes), the plain calls the ops wrap (bitwise), and what
runs: no launch under FakeTensorMode, no op dispatch on the plain eager path. Under Triton's interpreter here
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


def _op_args(device, base, bias, dropout, in_gemm=False, seed=0):
    """(forward args, backward args but the two need flags): the layer's launch arguments, M=37 rows."""
    from relora_kernels.int8_reference import int8_quantize_reference
    x, w, a, b, bias_t, dy = (t.detach() if t is not None else None
                              for t in make_inputs((37,), 48, 40, 5, bias, torch.float32, device, seed))
    w_scale = None
    if base == "int8":
        w, w_scale = int8_quantize_reference(w)[:2]
        w_scale = w_scale.float()
        if bias_t is not None:
            bias_t = bias_t.float()
    keep = ((torch.rand(x.shape, generator=torch.Generator().manual_seed(seed + 1)) >= 0.25).view(torch.uint8)
            .to(device) if dropout else None)
    p = 0.25 if dropout else 0.0
    fwd = (x, w, a, b, bias_t, w_scale, keep, 1.5, p, True, in_gemm)
    s = linear.layer_forward(*fwd)[1]
    bwd = (dy, x, s, w, w_scale, a, b, keep, 1.5, p, True, in_gemm)
    return fwd, bwd


CASES = [("float", True, True, False), ("float", False, False, False), ("int8", True, False, False),
         ("int8", False, True, True)]


@pytest.mark.parametrize("base,bias,dropout,in_gemm", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_the_ops_pass_opcheck(kernels_on, device, base, bias, dropout, in_gemm):
    """torch.library.opcheck on both ops: float and int8 bases (scratch and in-GEMM dequantization), with and
    without bias and dropout mask; the backward with every gradient, with dX only and with dA, dB only (the
    gradient not asked for is an empty tensor, in the fake too)."""
    fwd, bwd = _op_args(device, base, bias, dropout, in_gemm)
    torch.library.opcheck(linear.FORWARD_OP, fwd)
    for need_dx, need_lora in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(linear.BACKWARD_OP, (*bwd, need_dx, need_lora))


@pytest.mark.parametrize("base,bias,dropout,in_gemm", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_the_ops_compute_what_the_plain_calls_do(kernels_on, device, base, bias, dropout, in_gemm):
    """Bitwise the plain launches' outputs (deterministic mode), and None where a gradient was not asked for."""
    fwd, bwd = _op_args(device, base, bias, dropout, in_gemm)
    for got, want in zip(linear.FORWARD_OP(*fwd), linear.layer_forward(*fwd)):
        assert torch.equal(got, want)
    for need_dx, need_lora in ((True, True), (True, False), (False, True)):
        with _Ops():
            got = linear.run_backward(*bwd, need_dx=need_dx, need_lora=need_lora)
        want = linear.layer_backward(*bwd, need_dx, need_lora)
        for g, w in zip(got, want):
            assert (g is None) == (w is None) and (w is None or torch.equal(g, w))
        assert (got[0] is None) != need_dx and (got[1] is None) != need_lora


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
