"""Every Triton launch of a training step compiles for a Hopper GPU (sm_90), checked without a GPU.

The CPU interpreter (tests/test_kernels.py) runs the kernels' arithmetic but not the compiler: a config whose
pipeline overflows shared memory, or code the GPU backend rejects, shows up only on a GPU, at the first
launch. launch/compile_kernels.py drives the real launchers with Triton's driver replaced by a stand-in for
an H100/H200 and compiles each launch (Triton's own argument specialization; nothing runs). The oracle is
the compiler: it must accept every launch, and the shared memory it allocates must fit the device. Once with
the installed Triton, once with the GPU machine image's (3.6).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
import compile_kernels as ck  # noqa: E402

pytest.importorskip("triton.backends.nvidia", reason="this Triton build has no NVIDIA backend to compile for")


@pytest.mark.filterwarnings("error::relora_kernels._runtime.AutotuneKeyWarning")  # our autotune key = Triton's
def test_every_launch_of_a_training_step_compiles_and_fits():
    """bf16 (training's dtype): the default fused layer, the TMA and in-GEMM int8 candidates, the int8 base
    through scratch, the merges; fp32 through the TMA kernel (every one of its configs overflowed once).
    Each autotuned launch compiles the config with the largest pipeline its prune keeps (CI time: all of them
    took 4x longer; `launch/compile_kernels.py` compiles all): every launch's code is compiled for its own
    argument specialization, and test_config_prune_agrees_with_the_compiler compiles every GEMM config.
    Through triton's real autotuner: concat_matmul's copy of its cache key must find each config it chose
    (an AutotuneKeyWarning, an error here, says the installed Triton builds the key differently)."""
    # The default layer on every shape (aligned, the 1b MLP's 5461, small rank); the candidates on the aligned one.
    rows = ck.compile_all(modes=("fused", "merge"), dtypes=(torch.bfloat16,), configs="largest")
    rows += ck.compile_all(modes=("tma", "int8_gemm", "int8_scratch"), dtypes=(torch.bfloat16,), shapes=ck.SHAPES[:1],
                           configs="largest")
    rows += ck.compile_all(modes=("tma",), dtypes=(torch.float32,), shapes=ck.SHAPES[:1], configs="largest")
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_concat_k_matmul_kernel", "_concat_k_matmul_tma_kernel", "_ds_db_kernel", "_dequant_kernel",
                       "_lora_merge_kernel", "_int8_merge_kernel"}, kernels  # _sum_splits: deterministic mode only
    over = [(r["mode"], r["dtype"], r["kernel"], r["config"], r["shared"]) for r in rows if not r["fits"]]
    assert not over, over
    assert any(r["dtype"] == "float32" and r["kernel"] == "_concat_k_matmul_tma_kernel" for r in rows)


GPU_IMAGE_TRITON = "3.6.0"  # the lent GPU machine's image (../shared/FACTS.md); CI installs the newest


def _gpu_image_triton() -> Path:
    """The GPU image's Triton installed once beside this environment (pip --target: its wheel, ptxas
    included; pip takes it from this machine's disk), to be put first on PYTHONPATH."""
    dest = Path(sys.prefix) / f"triton-{GPU_IMAGE_TRITON}"
    if not (dest / ".complete").is_file():
        import shutil
        import subprocess

        shutil.rmtree(dest, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(dest),
                        f"triton=={GPU_IMAGE_TRITON}"], check=True, capture_output=True, timeout=900)
        (dest / ".complete").touch()
    return dest


def test_every_launch_compiles_under_the_gpu_images_triton(tmp_path):
    """The launches of every mode switch, bf16 and fp32, compiled by the Triton of the GPU machine's image (3.6)
    rather than CI's: a version's compiler allocates other shared memory (_ds_db_kernel in fp32: 160 KiB on 3.9,
    224 KiB on 3.6, 3 KiB under the limit), accepts other code and keys its autotuner's cache its own way (an
    AutotuneKeyWarning is an error here too). Oracle: that compiler; every launch must fit. On the aligned shape
    (the shared memory is the config's and the dtype's; the other shapes' specializations, 115 kernels in all,
    took 110 s instead of 49 s: `launch/compile_kernels.py --all-modes` compiles them; CI's Triton compiles the
    default layer's on each shape)."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_gpu_image_triton()), os.environ.get("PYTHONPATH", "")]),
           "TRITON_CACHE_DIR": str(tmp_path / "triton_cache")}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-W", "error::relora_kernels._runtime.AutotuneKeyWarning",
                           str(Path(ck.__file__)), "--configs", "largest", "--all-modes", "--dtypes", "bf16", "fp32",
                           "--shapes", "0"],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.startswith(f"Triton {GPU_IMAGE_TRITON}, target cuda:90"), proc.stdout[:300]
    assert "kernels compiled, 0 over the shared-memory limit" in proc.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_config_prune_agrees_with_the_compiler(dtype, monkeypatch):
    """Each autotune config of the two GEMM kernels, compiled on its own: the prune's shared-memory estimate
    (``_runtime.pipeline_fits``) keeps exactly the ones the compiler fits in 227 KB. This also shows the
    check can fail: in fp32 most TMA configs overflow. Each compile stops at LLVM IR, where the shared
    memory is fixed (test_every_launch_of_a_training_step_compiles_and_fits compiles to cubins)."""
    from relora_kernels import _runtime, matmul, matmul_tma
    a1, b1, out = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype), torch.empty(512, 512, dtype=dtype)
    size = a1.element_size()
    verdicts = []
    for bm, bn, bk, w, s in matmul_tma._GPU_CONFIGS:
        records = []
        with ck.compile_only_for_hopper(records, through="llir"):
            matmul_tma.launch(a1, b1, a1, b1, out, config=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                                                               num_warps=w, num_stages=s))
        fits = records[-1]["shared"] <= ck.HOPPER_SHARED_MEMORY
        verdicts.append(("tma", bm, bn, bk, s, fits))
    for bm, bn, w, s in matmul._GPU_CONFIGS:
        records = []
        with ck.compile_only_for_hopper(records, through="llir"):
            matmul.concat_matmul(a1, b1, a1, b1, out=out, config=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=matmul._GPU_BLOCK_K,
                                                                      GROUP_M=8, num_warps=w, num_stages=s))
        verdicts.append(("ptr", bm, bn, matmul._GPU_BLOCK_K, s, records[-1]["shared"] <= ck.HOPPER_SHARED_MEMORY))
    monkeypatch.setattr(_runtime, "shared_memory_limit", lambda: ck.HOPPER_SHARED_MEMORY)
    predicted = [(k, bm, bn, bk, s, _runtime.pipeline_fits(bm, bn, bk, s, size, size if k == "tma" else 0))
                 for k, bm, bn, bk, s, _ in verdicts]
    assert predicted == verdicts
    if dtype == torch.float32:
        assert sum(not v[-1] for v in verdicts) >= 4  # the overflows the compiler reports


def test_the_stand_in_is_gone_afterwards_even_after_an_error(monkeypatch):
    """Inside a test session that runs the interpreter (TRITON_INTERPRET=1), a compile check must leave the
    environment, Triton's driver and our runtime as it found them, also when a launch fails."""
    from triton.runtime.jit import JITFunction

    from relora_kernels import _runtime
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RELORA_KERNELS", "reference")
    from triton import knobs

    before = (JITFunction.run, _runtime.interpreting, _runtime.check_device, knobs.runtime.add_stages_inspection_hook)
    with pytest.raises(RuntimeError, match="a launch failed"):
        with ck.compile_only_for_hopper([], through="llir"):
            assert os.environ["RELORA_KERNELS"] == "triton" and "TRITON_INTERPRET" not in os.environ
            assert knobs.runtime.add_stages_inspection_hook is ck._through_llir
            raise RuntimeError("a launch failed")
    assert os.environ["TRITON_INTERPRET"] == "1" and os.environ["RELORA_KERNELS"] == "reference"
    assert (JITFunction.run, _runtime.interpreting, _runtime.check_device,
            knobs.runtime.add_stages_inspection_hook) == before


def test_int8_merge_compiles_after_an_interpreted_import():
    """A process that first imports relora_kernels.int8 under the interpreter (a test selection starting with
    an interpreted case) must still compile the int8 merge, whose tl.reduce calls a global combine function:
    built with @triton.jit at import it was an InterpretedFunction, which the compiler rejects ("Unsupported
    function referenced"). A fresh process, so that this module is imported exactly then."""
    import subprocess
    import textwrap

    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(Path(ck.__file__).parent)!r})
        import triton, triton.language  # as in a test session: triton first, then a fixture sets the mode
        os.environ["TRITON_INTERPRET"] = "1"
        import relora_kernels as rk
        import relora_kernels.int8  # decorated under the interpreter
        from compile_kernels import compile_only_for_hopper
        q, s, res = rk.int8_quantize_reference(torch.randn(64, 256), residual=True)
        rk.int8_merge_(q, s, res, torch.randn(8, 256), torch.randn(64, 8), 0.5)  # interpreted: runs
        records = []
        with compile_only_for_hopper(records):
            rk.int8_merge_(q, s, res, torch.randn(8, 256), torch.randn(64, 8), 0.5)
        print(sorted({{r["kernel"] for r in records}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "['_int8_merge_kernel']"


def test_int8_merge_divides_as_the_twin_does():
    """The int8 merge's divisions (scale = rowmax/127, value/scale, residual/254) must be IEEE (div.rn.f32) as the
    twin's torch divisions are: a plain `/` compiles to div.full.f32, up to 2 ulp off, so on a GPU the scale at
    ties, q at .5 and the residual could differ from the twin where the CPU interpreter never shows it. The
    oracle is the compiled PTX."""
    import relora_kernels as rk

    q, s, res = rk.int8_quantize_reference(torch.randn(64, 256), residual=True)
    records = []
    with ck.compile_only_for_hopper(records, ptx=True):
        rk.int8_merge_(q, s, res, torch.randn(8, 256), torch.randn(64, 8), 0.5)
    (ptx,) = [r["ptx"] for r in records if r["kernel"] == "_int8_merge_kernel"]
    assert "div.rn.f32" in ptx and "div.full.f32" not in ptx and "div.approx.f32" not in ptx


def test_autotuned_gemms_tune_once_per_power_of_two_of_tokens():
    """The autotuned GEMMs (pointer and TMA kernels) benchmark their configs once per bucket of M, the token
    count rounded up to a power of two (_runtime.autotune_bucket), not for every new M: ~1 s per GEMM on
    Triton 3.6 for each last partial batch, evaluation batch or padded length, with a cache growing without
    bound. The oracle is Triton's own autotuner cache: which M it was asked to tune."""
    from relora_kernels import matmul, matmul_tma

    tuned = {}
    with ck.compile_only_for_hopper([], configs="largest", through="llir"):
        b1 = torch.randn(128, 128, dtype=torch.bfloat16)
        for m in (256, 255, 200, 129, 300, 512):
            a1 = torch.randn(m, 128, dtype=torch.bfloat16)
            matmul.concat_matmul(a1, b1)
            matmul_tma.launch(a1, b1, None, None, torch.empty(m, 128, dtype=torch.bfloat16))
        for name, mod in (("pointer", matmul), ("tma", matmul_tma)):
            tuned[name] = sorted(key[0] for key in mod._AUTOTUNED["k"].cache)
    assert tuned == {"pointer": [256, 300], "tma": [256, 300]}, tuned
