"""How the kernels launch, checked without a GPU: the autotuner's shared-memory prune, the host-side grid
arithmetic (no Triton ConstexprFunction calls on the launch path), the config cache in front of triton's
autotuner, and the merge's and the layer's product precision (BENCHMARKS.md "Host overhead of the fused layer")."""
from __future__ import annotations

import pytest
import torch

import relora_kernels as rk
from relora_kernels import _runtime
from kernel_utils import interpreter_3_7, make_inputs, record_launches


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


def test_grid_arithmetic_twins_equal_tritons():
    """Since Triton 3.5 ``triton.cdiv`` / ``triton.next_power_of_2`` are ConstexprFunctions costing ~2 µs per
    host call; one fused fwd+bwd made 26 of them, a quarter of its Python overhead (BENCHMARKS.md, "Host
    overhead of the fused layer"). The launchers use _runtime's integer twins, which must equal Triton's."""
    import triton
    for n in range(0, 4200):
        assert _runtime.next_power_of_2(n) == triton.next_power_of_2(n), n
    for a in range(0, 300):
        for b in (1, 2, 3, 7, 16, 64, 128, 129):
            assert _runtime.cdiv(a, b) == triton.cdiv(a, b), (a, b)


@interpreter_3_7
def test_no_launcher_calls_tritons_host_helpers(monkeypatch):
    """No kernel module's source calls ``triton.cdiv`` / ``triton.next_power_of_2`` (this covers the
    compiled-only branches: autotuned grids, the fixed GPU configs, TMA, int8), and the launches of a fused
    fwd+bwd (default and deterministic) and a merge, run under the interpreter with both replaced by a
    function that raises, complete."""
    import inspect

    import triton
    from relora_kernels import int8, linear, matmul, matmul_tma, merge
    for module in (int8, linear, matmul, matmul_tma, merge, _runtime):
        src = inspect.getsource(module)
        assert "triton.cdiv(" not in src and "triton.next_power_of_2(" not in src, module.__name__

    def refuse(*args, **kwargs):
        raise AssertionError("a launcher called Triton's host-side cdiv / next_power_of_2")
    monkeypatch.setattr(triton, "cdiv", refuse)
    monkeypatch.setattr(triton, "next_power_of_2", refuse)
    monkeypatch.setenv("RELORA_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w, a, b, bias, dy = make_inputs((2, 9), 24, 20, 4, True, torch.float32, "cpu", seed=3)
    for det in (False, True):  # the fused dS+dB kernel, and the split reductions with fixed-order sums
        y = rk.lora_linear(x, w, a, b, 0.5, bias, deterministic=det)
        torch.autograd.grad(y, [x, a, b], dy)
    rk.lora_merge_(w.detach().clone(), a.detach(), b.detach(), 0.5)


def _record_dot_precision(monkeypatch) -> list:
    """Launches recorded, not run, as a GPU would get them (the interpreter ignores DOT_PRECISION): the list fills
    with each launch's DOT_PRECISION."""
    got = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: got.append(kwargs["DOT_PRECISION"])
    monkeypatch.setattr(_runtime, "for_current_mode", lambda kernel: Kernel())
    monkeypatch.setattr(_runtime, "interpreting", lambda: False)
    return got


@pytest.mark.parametrize("wdtype,ldtype,want", [(torch.bfloat16, torch.float32, "tf32x3"),
                                                 (torch.float16, torch.float32, "tf32x3"),
                                                 (torch.float32, torch.float32, "ieee"),
                                                 (torch.bfloat16, torch.bfloat16, "tf32")], ids=str)
def test_merge_products_in_fp32_only_where_the_result_keeps_fp32(monkeypatch, wdtype, ldtype, want):
    """fp32 factors into a 16-bit W (training's merge) take 3xTF32 tensor-core products: 'ieee' ran as fp32
    FMAs at 17% of copy bandwidth on the H200. Into an fp32 W they stay exact fp32. The launch receives the
    choice, and a tuning config's DOT_PRECISION overrides it."""
    from relora_kernels import merge
    got = _record_dot_precision(monkeypatch)
    w, a, b = torch.zeros(40, 24, dtype=wdtype), torch.ones(4, 24, dtype=ldtype), torch.ones(40, 4, dtype=ldtype)
    assert merge.merge_dot_precision(wdtype, ldtype) == want
    merge.merge_launch(w, a, b, 0.5)
    merge.merge_launch(w, a, b, 0.5, config=dict(BLOCK_N=32, BLOCK_K=32, BLOCK_R=16, num_warps=4,
                                                 DOT_PRECISION="ieee"))
    assert got == [want, "ieee"]


@pytest.mark.parametrize("dtype,want", [(torch.float32, "tf32x3"), (torch.bfloat16, "tf32"), (torch.float16, "tf32")],
                         ids=str)
def test_linear_products_in_3xtf32_for_fp32_operands(monkeypatch, dtype, want):
    """The fused layer's products (_runtime.dot_precision): fp32 operands take "tf32x3" (error ~1e-6 against
    plain TF32's ~4e-4: fp32 is the accuracy path), 16-bit ones "tf32" (ignored for them: tensor cores as
    they are). Every GEMM and dS+dB launch of the forward and backward, default and deterministic, receives
    it (recorded, not run, as on a GPU: the interpreter would ignore it)."""
    from relora_kernels import linear, matmul
    monkeypatch.setattr(_runtime, "interpreting", lambda: False)
    monkeypatch.setattr(linear, "FUSE_DS_DB", True)
    monkeypatch.setattr(linear, "LOWRANK_BLAS", False)
    monkeypatch.setattr(matmul, "TMA_GEMM", False)
    launches = record_launches(monkeypatch, launch=False)
    x, w, a, b, bias, dy = (t.detach() for t in make_inputs((40,), 48, 24, 8, True, dtype, "cpu", seed=2))
    assert _runtime.dot_precision(dtype) == want
    for deterministic in (False, True):
        _, s = linear.lora_forward(x, w, a, b, 0.5, bias, deterministic=deterministic)
        linear.lora_backward(dy, x, s, w, a, b, 0.5, deterministic=deterministic)
    got = sorted((name, kw["DOT_PRECISION"]) for name, kw in launches if name != "_sum_splits_kernel")
    # default: S, Y, dA, dX and the fused dS+dB; deterministic: S, Y, dS, dB, dA, dX
    assert got == [("_concat_k_matmul_kernel", want)] * (4 + 6) + [("_ds_db_kernel", want)], got


def test_an_autotuned_key_then_launches_straight_with_the_config_chosen_for_it(monkeypatch):
    """triton's Autotuner.run rebuilds its key from all 37 arguments on every launch (~15-20 µs each on this
    CPU, Triton 3.9); concat_matmul asks it once per key and then launches the kernel itself with the config
    the autotuner holds for that key, as the autotuner would have. The key is Triton's (its `key` names'
    values, then str(dtype) of each of the 8 tensor arguments), written out by hand here; the real
    autotuner's agreement is checked in tests/test_kernels_compile.py."""
    from relora_kernels import matmul
    calls, asked = [], []
    chosen = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, num_warps=4, num_ctas=1, num_stages=3)
    config = type("Config", (), {"all_kwargs": lambda self: dict(chosen)})()

    class Cache(dict):
        def get(self, key, default=None):
            asked.append(key)
            return config

    class Tuner:
        cache = Cache()

        def __getitem__(self, grid):
            def run(*args, **flags):
                calls.append(("tuner", grid(chosen), flags["HAS_SECOND"]))
            return run

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                calls.append(("direct", grid, {k: kwargs[k] for k in chosen}, kwargs["HAS_SECOND"]))
            return run

    monkeypatch.setattr(matmul, "_AUTOTUNED", {})
    monkeypatch.setattr(matmul, "_autotuned_kernel", Tuner)
    monkeypatch.setattr(_runtime, "for_current_mode", lambda kernel: Kernel())
    monkeypatch.setattr(_runtime, "interpreting", lambda: False)
    x, w, sq = torch.randn(200, 96), torch.randn(80, 96), torch.randn(96, 96)
    s, b = torch.randn(200, 8), torch.randn(80, 8)
    grid = (-(-200 // 64) * -(-80 // 32), 1)
    grid_sq = (-(-200 // 64) * -(-96 // 32), 1)
    matmul.concat_matmul(x, w.t())            # Y = X·Wᵀ: tuned
    matmul.concat_matmul(x, w.t())            # the same key: straight to the kernel
    matmul.concat_matmul(x, sq.t())           # a square W read as Wᵀ (Y) ...
    matmul.concat_matmul(x, sq)               # ... and as W (dX): the same M, N, K; only the stride differs
    matmul.concat_matmul(x, w.t(), s, b.t())  # with the low-rank term: its own key
    matmul.concat_matmul(x.bfloat16(), w.t().bfloat16())  # another dtype: its own key
    matmul.concat_matmul(x, sq)
    assert calls == [("tuner", grid, False), ("direct", grid, chosen, False), ("tuner", grid_sq, False),
                     ("tuner", grid_sq, False), ("tuner", grid, True), ("tuner", grid, False),
                     ("direct", grid_sq, chosen, False)]
    f32, b16 = ("torch.float32",) * 8, ("torch.bfloat16",) * 8
    # (M, N, K1, K2, stride_b1k, stride_b2k, HAS_SECOND, MASK_MODE, B1_SCALE, dtype of each tensor argument)
    assert asked == [(200, 80, 96, 0, 1, 0, False, 0, 0, *f32), (200, 96, 96, 0, 1, 0, False, 0, 0, *f32),
                     (200, 96, 96, 0, 96, 0, False, 0, 0, *f32), (200, 80, 96, 8, 1, 1, True, 0, 0, *f32),
                     (200, 80, 96, 0, 1, 0, False, 0, 0, *b16)]


def test_fixed_configs_drop_pipeline_stages_until_the_device_fits_them(monkeypatch):
    """The fixed (untuned) GPU configs are sized for Hopper's 227 KB of shared memory; on a device with less
    (an A100: 163 KB) Triton raises OutOfResources at the first launch, before anything runs. The launchers
    then drop pipeline stages until the compiler fits one, remember it, and re-raise when one stage does
    not fit. Oracle: a stand-in kernel that refuses more than `fits` stages, as Triton's launcher does, and
    records what it was launched with."""
    from triton.runtime.errors import OutOfResources

    from relora_kernels import linear, matmul

    class Device:
        fits = 1

        def __init__(self, name):
            self.name, self.launches = name, []

        def __getitem__(self, grid):
            def launch(*args, num_stages, **kwargs):
                self.launches.append(num_stages)
                if num_stages > Device.fits:
                    raise OutOfResources(num_stages * 80_000, 166_912, "shared memory")
            return launch

    kernels = {}
    monkeypatch.setattr(_runtime, "interpreting", lambda: False)
    monkeypatch.setattr(_runtime, "target_programs", lambda device: 8)
    monkeypatch.setattr(_runtime, "for_current_mode", lambda k: kernels.setdefault(k.fn.__name__, Device(k.fn.__name__)))
    monkeypatch.setattr(_runtime, "_FITTED_STAGES", {})
    x, w, dy, b = (torch.randn(*s) for s in ((256, 96), (96, 128), (256, 128), (128, 128)))
    for _ in range(2):
        matmul.concat_matmul(x, w, deterministic=True)  # the fixed config: 3 stages
        linear.fused_ds_db(dy, b, torch.randn(256, 128), 0.5)  # fp32, BLOCK_R=128: 2 stages
    assert kernels["_concat_k_matmul_kernel"].launches == [3, 2, 1, 1]  # then straight to what fitted
    assert kernels["_ds_db_kernel"].launches == [2, 1, 1]
    Device.fits = 0  # not even one stage: Triton's own error, not a silent skip
    monkeypatch.setattr(_runtime, "_FITTED_STAGES", {})
    with pytest.raises(OutOfResources):
        matmul.concat_matmul(x, w, deterministic=True)


@pytest.mark.parametrize("ldtype,want", [(torch.float32, "ieee"), (torch.bfloat16, "tf32")], ids=str)
def test_int8_merge_products_in_exact_fp32_for_fp32_factors(monkeypatch, ldtype, want):
    """The int8 merge requantizes (q + residual/254)·scale + s·B·A, which its twin computes with fp32 products, and
    kernel and twin are to differ only where fp32 products do (kernels/int8_reference.py): fp32 factors take exact
    fp32 products ("ieee"; a TF32 product's ~2^-11 relative error moves codes and residual units at their rounding
    boundaries), 16-bit factors tensor cores as they are. Recorded, not run (the interpreter ignores it)."""
    from relora_kernels import int8
    got = _record_dot_precision(monkeypatch)
    q, scale = torch.zeros(40, 24, dtype=torch.int8), torch.ones(40, dtype=torch.bfloat16)
    for residual in (None, torch.zeros(40, 24, dtype=torch.int8)):
        int8.int8_merge_launch(q, scale, residual, torch.ones(4, 24, dtype=ldtype), torch.ones(40, 4, dtype=ldtype), 0.5)
    assert got == [want, want]


@pytest.mark.parametrize("mode", ["plain", "deterministic"])
def test_an_empty_first_product_beside_a_second_is_the_second_alone(monkeypatch, mode):
    """concat_matmul's C = alpha·(A1·B1 + beta·A2·B2) with K1 = 0 (an empty sum, a valid input the docstring
    allows) divided by zero sizing its K splits (a review); oracle: torch's alpha·beta·A2·B2. Under the
    interpreter, as on a GPU the same sizing runs."""
    from relora_kernels import matmul
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(0)
    a2, b2 = torch.randn(8, 5, generator=g), torch.randn(5, 16, generator=g)
    got = matmul.concat_matmul(torch.randn(8, 0), torch.randn(0, 16), a2, b2, alpha=2.0, beta=0.5,
                               deterministic=mode == "deterministic")
    torch.testing.assert_close(got, a2 @ b2, rtol=1e-5, atol=1e-5)
