"""Compile every Triton kernel launch of a ReLoRA training step for a Hopper GPU (sm_90), without a GPU.

    python launch/compile_kernels.py                  # bf16, the default switches; a table of launches
    python launch/compile_kernels.py --dtypes bf16 fp32 --all-modes --out runs/compile.json

Triton's CPU interpreter (what the kernel tests run in CI) cannot show what only the compiler sees: a launch
config whose pipeline overflows shared memory (``OutOfResources`` at the first launch on a GPU), code the
GPU backend rejects, a construct the installed Triton compiles differently. This script drives the real
launchers (relora_kernels' public functions: forward and backward, float and int8 bases, the merges, every
mode switch) on CPU tensors, with Triton's active driver replaced by a stand-in for an H100/H200 (target
``cuda:90``, no device). Each launch is compiled through Triton's own argument specialization (``warmup``:
compiled, never run); an autotuned launch compiles every config its prune keeps (``--configs largest``: only
the one with the largest pipeline, which checks each launch's code in a fraction of the time; the tests
compile every GEMM config on its own). Reported per compiled
kernel: the launch site, its config and the shared memory it needs against the limit (227 KiB).

What it does not check: numbers (the tests do, interpreted here and compiled on a GPU), speed, registers
and spills (known only when a driver loads the kernel).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
from cli_types import DefaultsHelpFormatter  # noqa: E402

HOPPER_SHARED_MEMORY = 232448  # bytes per block, opt-in, H100/H200 (= relora_kernels._runtime's)
SM_COUNT = 132
MODES = ("fused", "splitdb", "det", "tma", "blas_lr", "dropout", "int8_scratch", "int8_gemm", "merge")
DEFAULT_MODES = ("fused", "int8_scratch", "merge")
# (M, d_in, d_out, r): an aligned layer, the 1b preset's MLP width (5461: rows only 2-byte aligned in bf16)
# and a small rank with narrow outputs (the fixed-config branches).
SHAPES = ((1024, 2048, 2048, 128), (1024, 2048, 5461, 128), (200, 96, 40, 8))


class _HopperStandIn:
    """The part of Triton's driver interface that compiling a launch needs (no device behind it)."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_benchmarker(self):  # the autotuner "times" a config by compiling it; all tie
        def bench(fn, quantiles=None, **kwargs):
            fn()
            return [1.0] * len(quantiles) if quantiles else 1.0
        return bench

    def is_active(self):
        return True


def _pipeline_size(config) -> tuple:
    """How much shared memory a GEMM config's pipeline asks for, relatively (stages x the A and B tiles)."""
    kw = config.kwargs
    return config.num_stages * (kw.get("BLOCK_M", 0) + kw.get("BLOCK_N", 0)) * kw.get("BLOCK_K", 0), config.num_warps


def _through_llir(*args):
    """Triton's ``add_stages_inspection_hook``: the pipeline ends at LLVM IR, where ``make_llir`` has set the
    kernel's shared memory; the PTX and cubin stages (35 of the 63 s that compiling every fp32 GEMM config
    took on 2 cores) do not change it. Called without arguments for its part of the cache key, which keeps
    these stand-ins apart from real compiles in Triton's caches."""
    import re

    if not args:
        return "relora-through-llir", "relora_through_llir"
    stages = args[1]

    def no_ptx(src, metadata):
        metadata["name"] = re.search(r"define [^@]*@([A-Za-z_][A-Za-z0-9_]*)\(", str(src)).group(1)
        return ""
    stages["ptx"] = no_ptx
    stages["cubin"] = lambda src, metadata: b""


@contextlib.contextmanager
def _pipeline_through(through: str):
    if through not in ("cubin", "llir"):
        raise ValueError(f"through={through!r}: use 'cubin' (a whole compile) or 'llir' (up to the shared-memory "
                         "allocation)")
    from triton import knobs

    if through == "cubin":
        yield
        return
    if not hasattr(knobs.runtime, "add_stages_inspection_hook"):
        yield  # an older Triton: whole compiles, the same shared memory
        return
    previous, knobs.runtime.add_stages_inspection_hook = knobs.runtime.add_stages_inspection_hook, _through_llir
    try:
        yield
    finally:
        knobs.runtime.add_stages_inspection_hook = previous


@contextlib.contextmanager
def compile_only_for_hopper(records: list, configs: str = "all", through: str = "cubin", ptx: bool = False):
    """Inside: relora_kernels launches compile for sm_90 and append (kernel, config, shared bytes) to
    ``records`` instead of running. ``configs="largest"``: an autotuned launch compiles only the config its
    prune keeps with the largest pipeline. ``through="llir"``: each compile stops once its shared memory is
    known (no PTX, no cubin: it then says nothing of ptxas). ``ptx``: each record also holds the kernel's PTX
    (``through="cubin"``). Not thread-safe; restores everything on exit, errors included."""
    with _pipeline_through(through):
        with _compile_only_for_hopper(records, configs, ptx) as triton:
            yield triton


@contextlib.contextmanager
def _compile_only_for_hopper(records: list, configs: str, ptx: bool = False):
    import triton
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from relora_kernels import _runtime, matmul, matmul_tma
    # TRITON_INTERPRET off: triton.jit decides compiled vs interpreted from it when our launchers re-wrap a
    # kernel (_runtime.for_current_mode).
    env_keys = ("TRITON_INTERPRET", "RELORA_KERNELS", "RELORA_KERNELS_POISON", "RELORA_DETERMINISTIC")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    patches = [(_runtime, "interpreting", lambda: False), (_runtime, "check_device", lambda tensor: None),
               (_runtime, "target_programs", lambda device: 2 * SM_COUNT),
               (_runtime, "shared_memory_limit", lambda: HOPPER_SHARED_MEMORY)]
    if configs not in ("all", "largest"):
        raise ValueError(f"configs={configs!r}: use 'all' or 'largest'")
    if configs == "largest":
        keep_all = Autotuner.prune_configs
        patches.append((Autotuner, "prune_configs",
                        lambda self, kwargs: [max(keep_all(self, kwargs), key=_pipeline_size)]))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    previous_driver = getattr(driver, "_active", None)  # None: Triton creates its default when next asked
    real_run = JITFunction.run
    compiled = []

    def run(self, *args, grid, warmup, **kwargs):
        compiled.append(self)
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        config = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
        records.append(dict(kernel=self.fn.__name__, config=config, shared=kernel.metadata.shared,
                            **({"ptx": kernel.asm.get("ptx", "")} if ptx else {})))
        return kernel

    try:
        for k in env_keys:
            os.environ.pop(k, None)
        os.environ["RELORA_KERNELS"] = "triton"
        driver.set_active(_HopperStandIn())
        JITFunction.run = run
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield triton
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        JITFunction.run = real_run
        driver.set_active(previous_driver)
        # Nothing compiled for the stand-in may serve a real launch later in this process: the per-device
        # binders hold its target, and the autotuners' choices came from ties, not timings.
        for fn in compiled:
            getattr(fn, "device_caches", {}).clear()
        matmul._AUTOTUNED.clear()
        matmul_tma._AUTOTUNED.clear()
        for k, v in saved_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def training_step_launches(mode: str, dtype: torch.dtype, shape: tuple[int, int, int, int]) -> None:
    """One forward and backward of the LoRA layer (or the merges) as training runs them, in ``mode``."""
    import relora_kernels as rk
    import relora_kernels.linear as linear_mod
    import relora_kernels.matmul as matmul_mod
    M, d_in, d_out, r = shape
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    x, w, dy = rnd(M, d_in).requires_grad_(), rnd(d_out, d_in), rnd(M, d_out)
    a, b, bias = rnd(r, d_in).requires_grad_(), rnd(d_out, r).requires_grad_(), rnd(d_out).requires_grad_()
    switches = dict(FUSE_DS_DB=mode != "splitdb", LOWRANK_BLAS=mode == "blas_lr")
    saved = {k: getattr(linear_mod, k) for k in switches} | {"TMA_GEMM": matmul_mod.TMA_GEMM}
    for k, v in switches.items():
        setattr(linear_mod, k, v)
    matmul_mod.TMA_GEMM = mode == "tma"
    try:
        if mode == "merge":
            rk.lora_merge_(w, a.detach().float(), b.detach().float(), 0.5)  # ZeRO merges the fp32 masters
            q, s, res = rk.int8_quantize_reference(w, residual=True)
            rk.int8_dequantize(q, s, dtype)
            rk.int8_merge_(q, s, res, a.detach().float(), b.detach().float(), 0.5)
            return
        if mode.startswith("int8"):
            q, s, _ = rk.int8_quantize_reference(w)
            y = rk.int8_lora_linear(x, q, s, a, b, 0.5, bias, in_gemm=mode == "int8_gemm")
        else:
            y = rk.lora_linear(x, w, a, b, 0.5, bias, dropout_p=0.1 if mode == "dropout" else 0.0,
                               deterministic=mode == "det")
        torch.autograd.grad(y, [x, a, b, bias], dy)
    finally:
        for k, v in saved.items():
            setattr(matmul_mod if k == "TMA_GEMM" else linear_mod, k, v)


def compile_all(modes=DEFAULT_MODES, dtypes=(torch.bfloat16,), shapes=SHAPES, configs="all") -> list[dict]:
    """Compile every launch of ``modes`` × ``dtypes`` × ``shapes``; one row per distinct compiled kernel.
    ``configs``: as in :func:`compile_only_for_hopper`."""
    rows, seen = [], set()
    for dtype in dtypes:
        for mode in modes:
            for shape in shapes if mode != "merge" else shapes[:2]:
                records: list[dict] = []
                with compile_only_for_hopper(records, configs):
                    training_step_launches(mode, dtype, shape)
                for rec in records:
                    key = (dtype, rec["kernel"], json.dumps(rec["config"], sort_keys=True, default=str), rec["shared"])
                    if key in seen:
                        continue
                    seen.add(key)
                    rows.append(dict(mode=mode, dtype=str(dtype).replace("torch.", ""), shape=shape, **rec,
                                     fits=rec["shared"] <= HOPPER_SHARED_MEMORY))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", choices=("bf16", "fp16", "fp32"), default=["bf16"])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES))
    ap.add_argument("--all-modes", action="store_true", help="every mode switch (slower: more kernels)")
    ap.add_argument("--shapes", nargs="+", type=int, choices=range(len(SHAPES)), default=list(range(len(SHAPES))),
                    metavar="I", help=f"which of the (M, d_in, d_out, r) shapes, by index: {list(SHAPES)}")
    ap.add_argument("--configs", choices=("all", "largest"), default="all",
                    help="of an autotuned launch: every config its prune keeps, or the largest pipeline only")
    ap.add_argument("--out", type=Path, help="rows as JSON")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "launch"))
    from bench_common import load_relora_kernels
    load_relora_kernels()  # also from a checkout that is not pip-installed (kernels/ as relora_kernels)
    dtypes = tuple({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[d] for d in args.dtypes)
    rows = compile_all(MODES if args.all_modes else tuple(args.modes), dtypes, configs=args.configs,
                       shapes=tuple(SHAPES[i] for i in dict.fromkeys(args.shapes)))
    import triton
    print(f"Triton {triton.__version__}, target cuda:90, shared-memory limit {HOPPER_SHARED_MEMORY} B")
    for r in rows:
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items() if k.startswith(("BLOCK", "num_")))
        print(f"{r['mode']:13} {r['dtype']:9} {'x'.join(map(str, r['shape'])):18} {r['kernel']:28} "
              f"{r['shared'] / 1024:6.1f} KiB {'ok' if r['fits'] else 'OVER THE LIMIT'}  {cfg}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1, default=str))
    over = [r for r in rows if not r["fits"]]
    print(f"{len(rows)} kernels compiled, {len(over)} over the shared-memory limit")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
