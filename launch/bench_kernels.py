"""Throughput of the fused ReLoRA kernels against the torch baselines they must beat.

Providers for the linear layer (bf16, y = x W^T + s x A^T B^T):
  full     (a) full-rank trainable nn.Linear (dX and dW)      -- what ReLoRA replaces
  frozen   (b) frozen-W linear alone (dX only)                -- the floor the LoRA branch adds to
  peft     (c) PEFT-style unfused LoRA in plain torch autograd
  torch_fused  the BLAS chain with the additions folded into GEMM epilogues (kernels/torch_linear.py: what
           RELORA_KERNELS=torch runs, and auto on CPU)
  fused    (d) relora_kernels.lora_linear (dS+dB from one read of dY, fp32 atomics for dB and dA)
  fused_splitdb  the same with dB as its own GEMM over tokens (relora_kernels.linear.FUSE_DS_DB = False)
  fused_det    deterministic mode (split dB, fixed-order partial sums, one fixed config, no autotune)
  fused_tma    fused, with the products TMA can read on the persistent TMA-descriptor GEMM
           (relora_kernels.matmul.TMA_GEMM = True, kernels/matmul_tma.py)
  fused_blas_lr  fused concat-K GEMMs on Triton, the rank-r products on cuBLAS (linear.LOWRANK_BLAS)
  fused_tma_blas_lr  both of the above
Merge: ``merge`` (relora_kernels.lora_merge_, factors in W's dtype), ``merge_fp32ab`` (the same with fp32
factors, as training merges DeepSpeed's fp32 masters: 3xTF32 products into a 16-bit W) vs ``torch``
(W.add_(s * B @ A)) vs ``copy`` (W2.copy_(W), the HBM ceiling). Merges run before the layer rows, so a run
cut at its time limit still has them. Timings: median of triton.testing.do_bench (CUDA events), p20/p80 kept in the rows.

    python launch/bench_kernels.py                       # full grid on CUDA (M x shapes x ranks)
    python launch/bench_kernels.py --quick               # M=16384, d=2048/4096, r=128: the target points
    python launch/bench_kernels.py --quick --repeat 2    # the same, timed twice: the table shows the spread
    python launch/bench_kernels.py --device cpu --quick  # interpreter smoke run: proves the script runs,
                                                         # its timings are NOT performance numbers
Rows are appended to --out (CSV, or JSON if the name ends in .json), keyed by (op, provider, mode, shape,
dtype, device, torch/triton versions, date). Targets (H100, bf16, M=16384, r=128): fused/full <= 0.75 at
d=4096 and <= 0.83 at d=2048; fused >= 1.3x faster than peft; merge >= 80% of copy bandwidth.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
from pathlib import Path

from bench_common import (RowSink, bench, host_ms, load_relora_kernels, peak_mib, shape_arg,
                          spin_up)
from cli_types import DefaultsHelpFormatter, positive_int

ROOT = Path(__file__).resolve().parents[1]
FULL_M = (4096, 8192, 16384)
FULL_SHAPES = ((2048, 2048), (4096, 4096), (2048, 5461), (5461, 2048))
FULL_R = (64, 128, 256)
QUICK = dict(M=(16384,), shapes=((2048, 2048), (4096, 4096)), ranks=(128,))
CPU_SMOKE = dict(M=(64,), shapes=((48, 40),), ranks=(8,))
LINEAR_PROVIDERS = ("full", "frozen", "peft", "torch_fused", "fused", "fused_splitdb", "fused_det", "fused_tma",
                    "fused_blas_lr", "fused_tma_blas_lr")
MODES = ("fwd", "bwd", "fwd+bwd")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cuda: real timings; cpu: Triton-interpreter smoke run with tiny shapes")
    ap.add_argument("--quick", action="store_true", help="only the target points (or tiny shapes on cpu)")
    ap.add_argument("--M", type=positive_int, nargs="+", help="token counts (default: 4096 8192 16384)")
    ap.add_argument("--shapes", nargs="+", type=shape_arg, help="d_in x d_out pairs, e.g. 4096x4096 2048x5461")
    ap.add_argument("--ranks", type=positive_int, nargs="+", help="LoRA ranks (default: 64 128 256)")
    ap.add_argument("--providers", nargs="+", default=list(LINEAR_PROVIDERS), choices=LINEAR_PROVIDERS)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--ops", nargs="+", default=["linear", "merge"], choices=("linear", "merge"))
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                    help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_kernels.csv",
                    help="rows are appended here (.csv) or written as a list (.json)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time the whole grid this many times, one pass after the other (rows carry `repeat`); "
                         "the table shows the median over passes and their spread: a difference between "
                         "providers smaller than that spread is noise")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1 (passes over the grid); got {args.repeat}")
    return args


def grid(args):
    base = (CPU_SMOKE if args.device == "cpu" else QUICK) if args.quick else \
        dict(M=FULL_M, shapes=FULL_SHAPES, ranks=FULL_R)
    if args.device == "cpu" and not args.quick:
        base = CPU_SMOKE  # the interpreter cannot time real sizes in any useful time
    shapes = base["shapes"] if not args.shapes else tuple(args.shapes)
    return list(args.M or base["M"]), list(shapes), list(args.ranks or base["ranks"])


# ---------------------------------------------------------------------------------------------------
# Setups: each returns {mode: callable}
# ---------------------------------------------------------------------------------------------------
def linear_setup(provider, M, d_in, d_out, r, dtype, device):
    import torch
    import torch.nn.functional as F

    import relora_kernels as rk
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s, std=1.0: torch.randn(*s, generator=g, device=device, dtype=dtype) * std  # noqa: E731
    x = rnd(M, d_in).requires_grad_()
    w = rnd(d_out, d_in, std=d_in ** -0.5).requires_grad_(provider == "full")
    a = rnd(r, d_in, std=d_in ** -0.5).requires_grad_()
    b = rnd(d_out, r, std=r ** -0.5).requires_grad_()  # random, not the zero init: never time zeros
    dy = rnd(M, d_out)
    scale = 2.0

    variant = lambda: None  # noqa: E731
    if provider in ("full", "frozen"):
        fwd, inputs = (lambda: F.linear(x, w)), ([x, w] if provider == "full" else [x])
    elif provider == "peft":
        fwd, inputs = (lambda: F.linear(x, w) + scale * F.linear(F.linear(x, a), b)), [x, a, b]
    elif provider == "torch_fused":
        from relora_kernels.torch_linear import lora_linear_torch
        fwd, inputs = (lambda: lora_linear_torch(x, w, a, b, scale)), [x, a, b]
    else:
        import relora_kernels.linear as linear_mod
        import relora_kernels.matmul as matmul_mod
        det = provider == "fused_det"

        def variant():  # the switches are read at call time: set them before every timed call
            linear_mod.FUSE_DS_DB = provider != "fused_splitdb"
            matmul_mod.TMA_GEMM = "tma" in provider
            linear_mod.LOWRANK_BLAS = "blas_lr" in provider

        fwd, inputs = (lambda: rk.lora_linear(x, w, a, b, scale, deterministic=det)), [x, a, b]
    state = {}

    def run_fwd():
        variant()
        return fwd()

    def bwd():
        variant()
        return torch.autograd.grad(state["y"], inputs, dy, retain_graph=True)

    def fwd_bwd():
        variant()
        return torch.autograd.grad(fwd(), inputs, dy)

    def prepare_bwd():
        state["y"] = run_fwd()
    return dict(fwd=run_fwd, bwd=bwd, **{"fwd+bwd": fwd_bwd}), prepare_bwd, (x, w, a, b, dy, scale, run_fwd)


def run_linear(provider, M, d_in, d_out, r, dtype, device, elem, modes, emit):
    """Time one linear provider in each mode and emit its rows (after checking the fused paths' values)."""
    fns, prepare_bwd, tensors = linear_setup(provider, M, d_in, d_out, r, dtype, device)
    err = check_fused(tensors) if "fused" in provider else float("nan")
    for mode in modes:
        if mode == "bwd":
            prepare_bwd()
        ms, p20, p80 = bench(fns[mode], device)
        flops, nbytes = linear_work(provider, mode, M, d_in, d_out, r, elem)
        emit(op="linear", provider=provider, mode=mode, M=M, d_in=d_in, d_out=d_out, r=r, ms=ms, ms_p20=p20,
             ms_p80=p80, tflops=flops / ms / 1e9, gbps=nbytes / ms / 1e6, host_ms=host_ms(fns[mode], device),
             peak_mib=peak_mib(fns[mode], device),
             max_rel_err=err)


def linear_work(provider, mode, M, K, N, r, elem):
    """(flops, bytes): useful flops, and the fewest bytes each pass must move (inputs once, outputs once)."""
    lora = provider not in ("full", "frozen")
    fwd_f = 2 * M * N * K + (2 * M * r * (K + N) if lora else 0)
    fwd_b = elem * (M * K + N * K + M * N) + (elem * (r * (K + N) + M * r) if lora else 0)
    if provider == "full":
        bwd_f, bwd_b = 4 * M * N * K, elem * (M * N + 2 * M * K + 2 * N * K)  # dY, X, W in; dX, dW out
    elif provider == "frozen":
        bwd_f, bwd_b = 2 * M * N * K, elem * (M * N + N * K + M * K)
    else:  # dX = [dY|dS][W;A], dS, dB, dA
        bwd_f = 2 * M * N * K + 4 * M * r * K + 4 * M * N * r
        bwd_b = elem * (M * N + N * K + 2 * M * K + M * r + 2 * r * (K + N))
    return {"fwd": (fwd_f, fwd_b), "bwd": (bwd_f, bwd_b), "fwd+bwd": (fwd_f + bwd_f, fwd_b + bwd_b)}[mode]


def check_fused(tensors):
    """Relative Frobenius error of the fused y, dX, dA, dB against the fp32 torch reference."""
    import torch

    import relora_kernels as rk
    x, w, a, b, dy, scale, run_fwd = tensors
    y = run_fwd()
    got = [y] + list(torch.autograd.grad(y, [x, a, b], dy))
    ref_leaves = [t.detach().float().requires_grad_() for t in (x, a, b)]
    yr = rk.lora_linear_reference(ref_leaves[0], w.detach().float(), ref_leaves[1], ref_leaves[2], scale)
    want = [yr] + list(torch.autograd.grad(yr, ref_leaves, dy.float()))
    errs = [((g.float() - t).norm() / t.norm()).item() for g, t in zip(got, want)]
    return math.nan if any(math.isnan(e) for e in errs) else max(errs)  # max() drops a NaN after the first


def merge_setups(N, K, r, dtype, device):
    import torch

    import relora_kernels as rk
    g = torch.Generator(device=device).manual_seed(1)
    w = torch.randn(N, K, generator=g, device=device, dtype=dtype)
    w2 = torch.empty_like(w)
    a = torch.randn(r, K, generator=g, device=device, dtype=dtype)
    b = torch.randn(N, r, generator=g, device=device, dtype=dtype)
    a32, b32 = a.float(), b.float()
    s = 1e-6  # repeated in-place merges must not drift W into overflow while timing
    return {"merge": lambda: rk.lora_merge_(w, a, b, s), "merge_fp32ab": lambda: rk.lora_merge_(w, a32, b32, s),
            "torch": lambda: w.add_(s * b @ a), "copy": lambda: w2.copy_(w)}


# ---------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    os.environ["RELORA_KERNELS"] = "triton"  # "fused" must mean the kernels, whatever the caller's env says
    if args.device == "cpu":
        # Before any relora_kernels launch: Triton's interpreter runs the kernels on CPU tensors.
        os.environ["TRITON_INTERPRET"] = "1"
        print("CPU smoke mode (Triton interpreter): timings below show the script runs; they are NOT "
              "performance numbers.")
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (none found). For a smoke run of the script on CPU use "
              "`--device cpu --quick`.", file=sys.stderr)
        return 2
    load_relora_kernels()
    import triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    elem = torch.finfo(dtype).bits // 8
    device = args.device
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (triton interpreter)"
    meta = dict(dtype=str(dtype).replace("torch.", ""), device=dev_name, torch=torch.__version__,
                triton=triton.__version__, date=datetime.date.today().isoformat())
    Ms, shapes, ranks = grid(args)
    rows, failures = RowSink(args.out, meta), []

    spin_up(device, 1.0)
    for repeat in range(1, args.repeat + 1):
        run_grid(args, Ms, shapes, ranks, dtype, device, elem,
                 lambda **row: rows.append({**row, "repeat": repeat}), failures)
    print_table(rows)
    print(f"\n{len(rows)} rows -> {args.out}")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


def run_grid(args, Ms, shapes, ranks, dtype, device, elem, emit, failures):
    """One pass over the grid: the merges first (a run cut at its limit still has them), then the layers."""
    if "merge" in args.ops:
        for d_in, d_out in shapes:
            for r in ranks:
                for provider, fn in merge_setups(d_out, d_in, r, dtype, device).items():
                    try:
                        ms, p20, p80 = bench(fn, device)
                    except Exception as exc:  # noqa: BLE001  as for the layers: the layer rows still come
                        _failed(failures, provider, 0, d_in, d_out, r, exc)
                        continue
                    # W read once and written once (copy: src + dst), and the factors read once (fp32 for
                    # merge_fp32ab; rows before 2026-12-07 counted W alone: 3% fewer bytes at 4096^2 r=128 bf16)
                    factor_elem = {"copy": 0, "merge_fp32ab": 4}.get(provider, elem)
                    nbytes = 2 * d_out * d_in * elem + r * (d_in + d_out) * factor_elem
                    emit(op="merge", provider=provider, mode="inplace", M=0, d_in=d_in, d_out=d_out, r=r,
                         ms=ms, ms_p20=p20, ms_p80=p80,  # the copy row computes nothing
                         tflops=float("nan") if provider == "copy" else 2 * d_out * d_in * r / ms / 1e9,
                         gbps=nbytes / ms / 1e6, peak_mib=float("nan"), max_rel_err=float("nan"))
    if "linear" in args.ops:
        for M in Ms:
            for d_in, d_out in shapes:
                for r in ranks:
                    for provider in args.providers:
                        try:  # one provider failing (a config over the shared-memory limit...) must not end
                            run_linear(provider, M, d_in, d_out, r, dtype, device, elem, args.modes, emit)
                        except Exception as exc:  # noqa: BLE001  the scarce GPU call goes on
                            _failed(failures, provider, M, d_in, d_out, r, exc)


def _failed(failures, provider, M, d_in, d_out, r, exc):
    """Name a failed timing on stderr at once and keep it for the summary (M=0: a merge)."""
    msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    print(f"provider {provider} failed at M={M} {d_in}x{d_out} r={r}: {msg}", file=sys.stderr)
    failures.append(dict(provider=provider, M=M, d_in=d_in, d_out=d_out, r=r, error=msg))


def summarize(rows):
    """{(op, mode, M, d_in, d_out, r): {provider: row}}, each row the median over the passes of ``--repeat``
    (ms, TFLOP/s, GB/s) with ``spread`` = (slowest - fastest) / median ms (0 for one pass)."""
    by_key = {}
    for r in rows:
        key = (r["op"], r["mode"], r["M"], r["d_in"], r["d_out"], r["r"])
        by_key.setdefault(key, {}).setdefault(r["provider"], []).append(r)
    out = {}
    for key, group in by_key.items():
        out[key] = {}
        for prov, reps in group.items():
            ms = [x["ms"] for x in reps]
            med = statistics.median(ms)
            out[key][prov] = {**reps[0], "ms": med, "tflops": statistics.median(x["tflops"] for x in reps),
                              "gbps": statistics.median(x["gbps"] for x in reps),
                              "host_ms": statistics.median(x.get("host_ms", float("nan")) for x in reps),
                              "spread": (max(ms) - min(ms)) / med if med > 0 else 0.0, "passes": len(reps)}
    return out


def print_table(rows):
    by_key = summarize(rows)
    hdr = (f"{'op':6} {'mode':8} {'M':>6} {'d_in':>5} {'d_out':>5} {'r':>4} {'provider':13} {'ms':>9} "
           f"{'spread':>7} {'host ms':>8} {'TFLOP/s':>8} {'GB/s':>8}  ratios")
    print(hdr)
    print("-" * len(hdr))
    for k, group in by_key.items():
        for prov, r in group.items():
            ratios = ""
            if r["op"] == "linear" and "fused" in prov:
                ratios = "  ".join(f"/{base}={r['ms'] / group[base]['ms']:.3f}" for base in ("full", "peft", "frozen")
                                   if base in group)
                if r["max_rel_err"] == r["max_rel_err"]:
                    ratios += f"  err={r['max_rel_err']:.1e}"
            if r["op"] == "merge" and prov != "copy" and "copy" in group:
                ratios = f"{100 * r['gbps'] / group['copy']['gbps']:.0f}% of copy GB/s"
            print(f"{r['op']:6} {r['mode']:8} {r['M']:>6} {r['d_in']:>5} {r['d_out']:>5} {r['r']:>4} {prov:13} "
                  f"{r['ms']:>9.4f} {100 * r['spread']:>6.1f}% {r.get('host_ms', float('nan')):>8.4f} "
                  f"{r['tflops']:>8.1f} {r['gbps']:>8.1f}  {ratios}")


if __name__ == "__main__":
    sys.exit(main())
