"""Host (CPU) time of one LoRA linear fwd+bwd: what a launch-bound step pays, GPU work aside.

Small layers (350m: d=1024, 4,096 tokens per micro-batch) finish their GPU work in tens of microseconds,
so the Python, autograd and launch code around the kernels decides the step time. The fused Triton path
ran whole 350m steps at 0.57x the twin's tokens/s on the H200 (BENCHMARKS.md). Paths timed:

  fused       relora_kernels.lora_linear on the Triton path
  torch       the BLAS chain (kernels/torch_linear.py)
  peft        PEFT-style unfused LoRA in torch autograd

``--device cpu`` (default; any machine): tiny tensors, and every Triton launch of ``fused`` replaced by a
counting no-op (no kernel runs, no interpreter): our wrappers, checks, allocations and autograd, without
Triton's own launch cost. ``torch`` and ``peft`` make their real (tiny) CPU BLAS calls.

``--through-triton`` (with ``--device cpu``; ``fused`` only, at M=256, d=256, r=128, where S, Y and dX take
the autotuned launch): every launch also goes through Triton's own host-side path (autotuner, argument
binding and specialization, cache lookup, launch metadata), the kernels compiled for a Hopper stand-in as
launch/compile_kernels.py does (up to LLVM IR, the autotuner keeping one config), and only the final driver
call replaced by a counting no-op: everything but the C launcher, cuLaunchKernel and the driver's device and
stream queries (constants in the stand-in).

``--device cuda``: the real launches at a layer of ``--M`` x ``--d`` (default 350m's 4096 x 1024, r=128).
Each path's host time per call is measured while a sleep kernel holds the GPU (no launch waits for it),
beside its event-timed GPU time (``gpu_us``): host_us >= gpu_us means the layer is launch-bound. Then a
cProfile of the fused path's calls (GPU held the same way) prints where its host time goes, per function.

Numbers: best of --repeats batches of --calls calls, in microseconds per fwd+bwd.

    python launch/bench_host_overhead.py                    # CPU, launches stubbed
    python launch/bench_host_overhead.py --through-triton   # CPU, Triton's launch path, the driver call stubbed
    python launch/bench_host_overhead.py --device cuda      # GPU: host vs GPU time, and the profile
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import io
import os
import pstats
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
from bench_common import hold_gpu, host_ms  # noqa: E402
from cli_types import DefaultsHelpFormatter, positive_int  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--calls", type=positive_int, default=None,
                    help="fwd+bwd calls per timed batch (cpu 500; cuda 30: their launches must fit CUDA's queue)")
    ap.add_argument("--repeats", type=positive_int, default=9, help="batches; the best one is reported")
    ap.add_argument("--M", type=positive_int, default=4096, help="tokens (cuda only; cpu uses 64)")
    ap.add_argument("--d", type=positive_int, default=1024, help="d_in = d_out (cuda only; cpu uses 64)")
    ap.add_argument("--rank", type=positive_int, default=128, help="LoRA rank (cuda only; cpu uses 16)")
    ap.add_argument("--through-triton", action="store_true",
                    help="cpu: run Triton's host-side launch path too (kernels compiled for a Hopper stand-in)")
    ap.add_argument("--out", type=Path, default=None, help="append the rows here (.csv or .json)")
    args = ap.parse_args(argv)
    if args.through_triton and args.device != "cpu":
        ap.error("--through-triton is a CPU mode: on --device cuda every launch goes through Triton anyway")
    args.calls = args.calls or (30 if args.device == "cuda" else 500)
    if args.device == "cpu":  # --through-triton: big enough that S, Y and dX take the autotuned launch
        args.M, args.d, args.rank = (256, 256, 128) if args.through_triton else (64, 64, 16)
    return args


class _Launches:
    """Stands in for a Triton kernel object: ``kernel[grid](*args, **meta)`` counts the launch, runs nothing."""

    def __init__(self):
        self.count = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.count += 1
        return launch


def stub_launches():
    """Replace every Triton launch of the fused path by a counting no-op; returns the counter."""
    from relora_kernels import _runtime, matmul
    launches = _Launches()
    _runtime.for_current_mode = lambda kernel: launches
    matmul._autotuned_kernel = lambda: launches
    return launches


@contextlib.contextmanager
def triton_launch_path_on_cpu(launches):
    """Inside: relora_kernels' launches run Triton's whole host-side path for kernels compiled for sm_90 (the
    Hopper stand-in of launch/compile_kernels.py, compiles stopped at LLVM IR, one config per autotuned
    launch), and the compiled kernel's driver call only counts. Restores everything on exit."""
    from compile_kernels import SM_COUNT, HOPPER_SHARED_MEMORY, _HopperStandIn, _pipeline_size, _pipeline_through
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from relora_kernels import _runtime, matmul, matmul_tma
    if _runtime.interpreting():  # the kernels would run interpreted, and no launch would reach the driver
        raise RuntimeError("unset TRITON_INTERPRET for the Triton launch path")

    def count(*args, **kwargs):
        launches.count += 1
    compiled, real_run = set(), JITFunction.run

    def run(self, *args, **kwargs):  # remembers each kernel whose caches get stand-in compiles
        compiled.add(self)
        return real_run(self, *args, **kwargs)
    keep_all = Autotuner.prune_configs
    patches = [(CompiledKernel, "run", property(lambda self: count)),
               (CompiledKernel, "_init_handles", lambda self: None),  # no binary to load, no device to ask
               (JITFunction, "run", run),
               (Autotuner, "prune_configs", lambda self, kw: [max(keep_all(self, kw), key=_pipeline_size)]),
               (_runtime, "check_device", lambda tensor: None),  # CPU tensors, compiled kernels
               (_runtime, "target_programs", lambda device: 2 * SM_COUNT),
               (_runtime, "shared_memory_limit", lambda: HOPPER_SHARED_MEMORY)]
    saved = [(obj, name, obj.__dict__[name]) for obj, name, _ in patches]
    previous_driver = getattr(driver, "_active", None)
    try:
        driver.set_active(_HopperStandIn())
        for obj, name, value in patches:
            setattr(obj, name, value)
        with _pipeline_through("llir"):
            yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        driver.set_active(previous_driver)
        # The stand-in's compiles (no binary: they stop at LLVM IR) must never serve a real launch later.
        for fn in compiled:
            getattr(fn, "device_caches", {}).clear()
        matmul._AUTOTUNED.clear()
        matmul_tma._AUTOTUNED.clear()


def best_us(fn, calls, repeats, device):
    """Best of ``repeats`` batches of ``calls`` calls (bench_common.host_ms: the GPU held meanwhile), in µs."""
    for _ in range(5):
        fn()
    return min(host_ms(fn, device, calls) for _ in range(repeats)) * 1e3


def gpu_us(fn, device):
    if device != "cuda":
        return float("nan")
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3


def main(argv=None):
    args = parse_args(argv)
    os.environ["RELORA_KERNELS"] = "triton"
    if args.device == "cpu" and not args.through_triton:
        os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors may take the Triton path; the stubs run nothing
    else:
        os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels (the launch path to time)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda needs a CUDA GPU (none found)", file=sys.stderr)
        return 2
    from bench_common import load_relora_kernels
    load_relora_kernels()
    with contextlib.ExitStack() as stack:
        launches = None
        if args.device == "cpu":
            torch.set_num_threads(1)
            if args.through_triton:
                launches = _Launches()
                stack.enter_context(triton_launch_path_on_cpu(launches))
            else:
                launches = stub_launches()
        return measure(args, make_paths(args), launches)


def path_dtype(args):
    """bf16 on a GPU and through Triton's launch path; fp32 where the launches are stubbed on CPU."""
    import torch
    return torch.bfloat16 if args.device == "cuda" or args.through_triton else torch.float32


def make_paths(args):
    """{path: one fwd+bwd} on a layer of args.M x args.d, rank args.rank."""
    import torch
    import torch.nn.functional as F

    import relora_kernels as rk
    from relora_kernels.torch_linear import lora_linear_torch
    M, d, r, scale, dev = args.M, args.d, args.rank, 2.0, args.device
    dtype = path_dtype(args)
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, std=1.0: torch.randn(*s, generator=g, device=dev, dtype=dtype) * std  # noqa: E731
    x = rnd(M, d).requires_grad_()
    w = rnd(d, d, std=d ** -0.5)
    a = rnd(r, d, std=d ** -0.5).requires_grad_()
    b = rnd(d, r, std=r ** -0.5).requires_grad_()
    dy = rnd(M, d)
    paths = {
        "fused": lambda: torch.autograd.grad(rk.lora_linear(x, w, a, b, scale), [x, a, b], dy),
        "torch": lambda: torch.autograd.grad(lora_linear_torch(x, w, a, b, scale), [x, a, b], dy),
        "peft": lambda: torch.autograd.grad(F.linear(x, w) + scale * F.linear(F.linear(x, a), b), [x, a, b], dy),
    }
    if args.through_triton:  # the others would time real bf16 CPU products at this size, not host overhead
        return {"fused": paths["fused"]}
    return paths


def measure(args, paths, launches):
    import torch
    import triton

    from bench_common import RowSink
    dev, M, d, r = args.device, args.M, args.d, args.rank
    per_call = None
    if launches is not None:  # the first call also compiles (--through-triton)
        paths["fused"]()
        launches.count = 0
        paths["fused"]()
        per_call = launches.count
    cpu_mode = "Triton's launch path, driver call stubbed" if args.through_triton else "launches stubbed"
    meta = dict(device=torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({cpu_mode})",
                torch=torch.__version__, triton=triton.__version__, python=sys.version.split()[0], M=M, d=d, r=r,
                dtype=str(path_dtype(args)).removeprefix("torch."), date=datetime.date.today().isoformat())
    rows = RowSink(args.out, meta) if args.out else []
    print(f"host time per LoRA linear fwd+bwd on {meta['device']} (best of {args.repeats} x {args.calls} calls, "
          f"M={M} d={d} r={r}):")
    for name, fn in paths.items():
        host = best_us(fn, args.calls, args.repeats, dev)
        gpu = gpu_us(fn, dev)
        extra = f", {per_call} Triton launches" if per_call is not None and name == "fused" else ""
        gpu_text = f"  gpu {gpu:8.1f} us{'  LAUNCH-BOUND' if host >= gpu else ''}" if gpu == gpu else ""
        print(f"  {name:6} host {host:8.1f} us{gpu_text}{extra}")
        rows.append(dict(op="host_overhead", provider=name, us=host, gpu_us=gpu,
                         triton_launches=per_call if per_call is not None and name == "fused" else ""))
    if dev == "cuda":  # where the fused path's host time goes
        fn = paths["fused"]
        profiler = cProfile.Profile()
        hold_gpu(dev, 400_000_000)
        profiler.enable()
        for _ in range(args.calls):
            fn()
        profiler.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        print(f"\ncProfile of {args.calls} fused fwd+bwd calls (tottime first):\n{text.getvalue()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
