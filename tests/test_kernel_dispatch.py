"""relora_kernels dispatch: RELORA_KERNELS modes, the BLAS-only ``torch`` path (kernels/torch_linear.py) against
the twin, argument errors, and import/interpreter ordering (subprocesses)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import relora_kernels as rk
from relora_kernels import _runtime
from kernel_utils import HAS_CUDA, SHAPES, _shape_id, make_inputs, rel_err


def _triton_version() -> tuple[int, ...]:
    from importlib.metadata import version
    return tuple(int(p) for p in version("triton").split(".")[:2])


# The GPU image's Triton 3.6: its interpreter cannot take tensor-valued range() bounds (tensor.__index__
# without squeeze; BENCHMARKS.md), which the kernels use. CI's newest Triton runs these.
interpreter_3_7 = pytest.mark.skipif(_triton_version() < (3, 7), reason="Triton 3.6's interpreter cannot take "
                                     "tensor-valued range() bounds, which the kernels use")


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


def test_auto_on_cuda_keeps_the_linear_on_the_twin_and_the_merge_on_triton(monkeypatch):
    """What README/BENCHMARKS state from the H100 measurements, checked without a GPU (a CUDA stand-in): under
    auto the LoRA linear takes the twin (cuBLAS; the fused kernel measured slower per training step), the
    merge and the other ops Triton; bf16/fp16/fp32 only."""
    from types import SimpleNamespace

    monkeypatch.delenv("RELORA_KERNELS", raising=False)
    monkeypatch.setattr(_runtime, "_triton_installed", lambda: True)
    cuda = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda"))
    assert _runtime.use_triton(cuda, op="linear") is False and _runtime.linear_path(cuda) == "reference"
    assert _runtime.use_triton(cuda) is True  # lora_merge_, int8_merge_, dequantization
    assert _runtime.use_triton(SimpleNamespace(is_cuda=True, dtype=torch.float64, device=torch.device("cuda"))) is False


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


@pytest.mark.parametrize("mode", ["reference", "torch"])
def test_dropout_zeroes_p_and_rescales_the_rest_by_one_over_one_minus_p(monkeypatch, mode):
    """Dropout p=0.1 on 2e5 inputs, for the twin's ``lora_dropout`` and for a ReLoRALinear layer on each CPU
    path (its global RNG, no generator). Oracles: the documented mask written out by hand (``torch.rand`` in
    fp32 from the same generator state, kept where ``>= p``: True with probability 1 - p), the zeroed
    fraction (0.1 +- 0.01; its std here is 7e-4) and the survivors' scale 1/(1 - p). With p=0.5 (the other
    dropout tests) a mask kept with probability p instead of 1 - p looks just as right. The layer has W = 0,
    A = B = I and scale 1, so its output is exactly dropout(x)."""
    from relora_ds import ReLoRALinear
    from relora_kernels.reference import lora_dropout

    monkeypatch.setenv("RELORA_KERNELS", mode)
    p, d = 0.1, 8
    x = torch.rand(25_000, d, generator=torch.Generator().manual_seed(1)) + 0.5  # no zeros of its own
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float32) >= p
    assert abs((~keep).float().mean().item() - p) < 0.01  # the oracle mask itself: ~10% dropped

    xd = lora_dropout(x, p, True, torch.Generator().manual_seed(3))
    assert abs((xd == 0).float().mean().item() - p) < 0.01
    assert torch.equal(xd != 0, keep)
    torch.testing.assert_close(xd[keep], x[keep] / (1 - p), rtol=1e-6, atol=0)

    layer = ReLoRALinear(d, d, rank=d, alpha=d, dropout=p, name="l")  # scale = alpha / rank = 1
    with torch.no_grad():
        layer.weight.zero_(), layer.lora_A.copy_(torch.eye(d)), layer.lora_B.copy_(torch.eye(d))
    layer.train()
    torch.manual_seed(3)  # the default generator, seeded like the oracle's
    with torch.no_grad():
        y = layer(x)
    assert abs((y == 0).float().mean().item() - p) < 0.01
    assert torch.equal(y != 0, keep)
    torch.testing.assert_close(y[keep], x[keep] / (1 - p), rtol=1e-6, atol=0)
    layer.eval()  # no dropout outside training
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x, rtol=1e-6, atol=0)


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


def test_deterministic_mode_sources(monkeypatch):
    monkeypatch.delenv("RELORA_DETERMINISTIC", raising=False)
    assert rk.deterministic_mode() is False and rk.deterministic_mode(True) is True
    monkeypatch.setenv("RELORA_DETERMINISTIC", "1")
    assert rk.deterministic_mode() is True and rk.deterministic_mode(False) is False
    monkeypatch.setenv("RELORA_DETERMINISTIC", "enable")  # neither on nor off: an error, not silently off
    with pytest.raises(ValueError, match=r"RELORA_DETERMINISTIC='enable' is not valid; use one of 1, true"):
        rk.deterministic_mode()


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


def test_int8_layer_dispatches_like_the_linear(monkeypatch):
    """`auto` sends int8 layers where it sends bf16 ones (AUTO_TORCH_OPS), not to the fused Triton linear
    it keeps plain layers off: the path is chosen by _runtime.linear_path for both."""
    x, w, a, b, bias, _ = make_inputs((4,), 8, 6, 2, True, torch.float32, "cpu", seed=0)
    q, s, _ = rk.int8_quantize_reference(w)
    chosen = []
    monkeypatch.setattr(_runtime, "linear_path", lambda t: chosen.append(t) or "reference")
    monkeypatch.setattr(_runtime, "use_triton", lambda t, op=None: True)  # as auto would say on CUDA for op=None
    got = rk.int8_lora_linear(x, q, s, a, b, 0.5, bias)
    assert len(chosen) == 1 and torch.equal(got, rk.int8_lora_linear_reference(x, q, s, a, b, 0.5, bias))


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



def test_autotune_prunes_configs_that_overflow_shared_memory(monkeypatch):
    """Oracle: the shared memory Triton 3.6 allocated when these configs were compiled for sm_90 (ptxas,
    2026-11-30): TMA kernel fp32 321-449 KB except 128x128x32 (160 KB), bf16 161-225 KB; pointer kernel
    fp32 128x128/s4, 128x256/s3 and 256x128/s3 over 227 KB, every bf16 config under it."""
    import triton
    from relora_kernels import matmul, matmul_tma
    monkeypatch.setattr(_runtime, "shared_memory_limit", lambda: _runtime.HOPPER_SHARED_MEMORY)

    def tma_configs():
        return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
                for bm, bn, bk, w, s in matmul_tma._GPU_CONFIGS]

    def kept(prune, configs, dtype, **extra):
        t = torch.empty(1, dtype=dtype)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages)
                for c in prune(configs, dict(a1_ptr=t, c_ptr=t, **extra))]

    assert kept(matmul_tma._prune, tma_configs(), torch.float32) == [(128, 128, 32, 3)]
    assert len(kept(matmul_tma._prune, tma_configs(), torch.bfloat16)) == len(matmul_tma._GPU_CONFIGS)
    ptr = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=matmul._GPU_BLOCK_K, GROUP_M=8), num_warps=w,
                         num_stages=s) for bm, bn, w, s in matmul._GPU_CONFIGS]
    fp32 = kept(matmul._prune, ptr, torch.float32, N=4096)
    assert {(128, 128, 64, 4), (128, 256, 64, 3), (256, 128, 64, 3)}.isdisjoint(fp32)
    assert len(fp32) == len(ptr) - 3
    assert len(kept(matmul._prune, ptr, torch.bfloat16, N=4096)) == len(ptr)
    # With a GPU whose limit fits none, the smallest config is still tried (Triton reports it if it fails).
    monkeypatch.setattr(_runtime, "shared_memory_limit", lambda: 1024)
    assert kept(matmul._prune, ptr, torch.float32, N=4096) == [(64, 64, 64, 4)]


@interpreter_3_7
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


def test_lora_dropout_keeps_one_minus_p_and_rescales():
    """Inverted dropout keeps each element with probability 1 - p and scales kept ones by 1/(1 - p) (F.dropout's
    definition). 200k draws: the kept fraction is within 5 sigma of 0.7 (the kernel tests compare the Triton
    path with this mask, and p = 0.5 elsewhere cannot tell p from 1 - p)."""
    from relora_kernels.reference import lora_dropout
    x = torch.ones(200_000)
    y = lora_dropout(x, 0.3, True, torch.Generator().manual_seed(0))
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.7) < 5 * (0.7 * 0.3 / x.numel()) ** 0.5
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.7))
    ref = torch.nn.functional.dropout(x, 0.3, training=True)  # torch's own, as a second oracle
    assert abs(kept - (ref != 0).float().mean().item()) < 0.01


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
