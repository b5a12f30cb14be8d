"""Where the fused LoRA linear spends its time, and which launch configs make each piece faster.

The H100 run of 2026-11-22 (BENCHMARKS.md) left the fused layer at 0.86x (d=4096, deterministic variant) and
1.60x (d=2048, default fused) of a full-rank linear, the H200 run of 2026-12-04 the default fused at 0.815x and
2.26x; the fwd+bwd totals do not say which launch is slow. This script times each launch alone:

  breakdown  every launch of the fused forward and backward, next to the cuBLAS product computing the
             same values (``torch``) and the op's memory floor (its bytes at the measured copy bandwidth):
               S     = X @ A.T                 dS    = s·dY @ B
               Y     = [X|S] @ [W|s·B].T       dB    = s·dY.T @ S       (split over tokens: atomic / det)
               dSdB  = fused dS and dB         dA    = dS.T @ X         (split over tokens: atomic / det)
               dX    = [dY|dS] @ [W;A]         merge = W += s·B @ A    (merge32: fp32 factors)
               Y_tma, dX_tma: Y and dX on the persistent TMA-descriptor kernel (kernels/matmul_tma.py)
  sweep      candidate launch configs for the low-rank ops and the merge (their launchers take
             ``config=``); every candidate is checked against the torch result before it is timed, and
             configs that fail to compile (shared memory) are recorded as such.

    python launch/tune_kernels.py                             # CUDA: M=16384, d=2048 and 4096, r=128
    python launch/tune_kernels.py --sections breakdown --shapes 2048x2048
    python launch/tune_kernels.py --device cpu                # interpreter (implies --smoke): the script runs

Rows go to --out (.json or .csv, via bench_common.RowSink, each as it is measured); the best config per (op, shape) is printed.
A winner becomes the launcher's built-in config only after it beats the current one in bench_kernels.py.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
from bench_common import RowSink, bench, load_relora_kernels, shape_arg, spin_up  # noqa: E402
from cli_types import DefaultsHelpFormatter, positive_int  # noqa: E402

LOW_RANK_OPS = ("S", "dS", "dB", "dA", "dSdB", "merge", "merge32", "Y_tma")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes and two candidates per op (implied by --device cpu: the interpreter would take "
                         "hours over the GPU sizes)")
    ap.add_argument("--sections", nargs="+", default=["breakdown", "sweep"], choices=("breakdown", "sweep"))
    ap.add_argument("--ops", nargs="+", default=list(LOW_RANK_OPS), choices=LOW_RANK_OPS, help="ops to sweep")
    ap.add_argument("--M", type=positive_int, default=None, help="tokens (16384; --smoke: 96)")
    ap.add_argument("--shapes", nargs="+", type=shape_arg, default=None,
                    help="d_in x d_out of the breakdown (2048x2048 4096x4096; --smoke: 48x40)")
    ap.add_argument("--sweep-shapes", nargs="+", type=shape_arg, default=None,
                    help="the shapes the sweep runs at (~110 compiled candidates per shape; 2048x2048; --smoke: 48x40)")
    ap.add_argument("--rank", type=positive_int, default=None, help="LoRA rank (128; --smoke: 8)")
    ap.add_argument("--rep", type=positive_int, default=60,
                    help="do_bench milliseconds of repeats per timing (default: 60; CPU: 3 runs, --rep unused)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "tune_kernels.json")
    args = ap.parse_args(argv)
    # --smoke changes the defaults only: sizes given explicitly are honoured. On CPU (the interpreter) always.
    args.smoke = small = args.smoke or args.device == "cpu"
    args.M = args.M if args.M is not None else (96 if small else 16384)
    args.rank = args.rank if args.rank is not None else (8 if small else 128)
    args.shapes = args.shapes or ([(48, 40)] if small else [(2048, 2048), (4096, 4096)])
    args.sweep_shapes = args.sweep_shapes or ([(48, 40)] if small else [(2048, 2048)])
    for d_in, d_out in {*args.shapes, *args.sweep_shapes}:
        if args.rank > min(d_in, d_out):
            ap.error(f"--rank {args.rank} exceeds the layer {d_in}x{d_out}: a LoRA rank must be <= min(d_in, d_out)")
    return args


# ---------------------------------------------------------------------------------------------------
# Candidate configs (each a launcher ``config=`` dict)
# ---------------------------------------------------------------------------------------------------
def gemm_candidates(r, smoke):
    """S = X @ A.T and dS = dY @ B: M x r outputs, a long K loop; bandwidth-bound on X / dY."""
    if smoke:
        return [dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1),
                dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)]
    bn = min(256, max(16, 1 << (r - 1).bit_length()))
    out = []
    for bm, bk, w, st in itertools.product((64, 128), (64, 128), (4, 8), (3, 4)):
        out.append(dict(BLOCK_M=bm, BLOCK_N=min(bn, 128), BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=st))
    if bn > 128:  # all of r in one tile: X is read once instead of r/128 times
        out += [dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)]
    return out


def reduce_candidates(smoke):
    """dB = dY.T @ S and dA = dS.T @ X: small outputs, K = tokens split over programs."""
    if smoke:
        return [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1, split=2),
                dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=1, split=3)]
    out = []
    for (bm, bn), bk, split, st in itertools.product(((128, 128), (64, 128), (128, 64)), (64, 128), (8, 16, 32),
                                                     (3,)):
        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=8 if bm * bn >= 16384 else 4,
                        num_stages=st, split=split))
    return out


def ds_db_candidates(r, smoke):
    if smoke:
        return [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_R=16, num_warps=4, num_stages=1),
                dict(BLOCK_M=16, BLOCK_N=16, BLOCK_R=32, num_warps=4, num_stages=1)]
    br = min(128, max(16, 1 << (r - 1).bit_length()))
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, num_warps=w, num_stages=st)
            for bm, bn, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))]


def tma_candidates(smoke):
    if smoke:
        return [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1)]
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=8, num_stages=st)
            for (bm, bn), bk, st in itertools.product(((128, 256), (256, 128), (128, 128)), (64,), (3, 4))]


def merge_candidates(r, smoke, fp32_factors=False):
    """W tiles from 32x128 to 128x256: a bigger tile re-reads B and A (from L2) less per byte of W, at
    (BN + BK)·r / (2·BN·BK) bytes of factors per byte of W moved (1.5 for 64x128 at r=128, 0.75 for
    128x256). fp32 factors (training's merge into a 16-bit W): fewer tiles, each with the 3xTF32 products
    the launcher picks and with exact fp32 ones."""
    if smoke:
        out = [dict(BLOCK_N=32, BLOCK_K=32, BLOCK_R=16, num_warps=4, num_stages=1),
               dict(BLOCK_N=16, BLOCK_K=64, BLOCK_R=32, num_warps=4, num_stages=1)]
    elif fp32_factors:  # the launcher's default (64x128, BLOCK_R 64 at r >= 64, 8 warps, 2 stages) among them
        br = min(64, max(16, 1 << (r - 1).bit_length()))
        out = [dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, num_warps=8, num_stages=st)
               for (bn, bk), st in itertools.product(((64, 128), (128, 128), (128, 256)), (1, 2))]
    else:
        br = min(128, max(16, 1 << (r - 1).bit_length()))
        out = [dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, num_warps=w, num_stages=st)
               for bn, bk, w, st in itertools.product((32, 64, 128), (128, 256), (4, 8), (1, 2))]
    if fp32_factors:
        out = [dict(c, DOT_PRECISION=p) for p in ("tf32x3", "ieee") for c in out]
    return out


def gemm_fits(op, cfg, dtype) -> bool:
    """The GEMM candidates (pointer kernel: S, dS, dB, dA; TMA kernel with its store buffer: Y_tma) whose
    pipeline fits in shared memory, by _runtime.pipeline_fits (checked against the compiler in
    tests/test_kernels_compile.py); each sure overflow would otherwise cost a full compile (0.7-4 s)."""
    from relora_kernels import _runtime
    if op not in ("S", "dS", "dB", "dA", "Y_tma"):
        return True
    e = dtype.itemsize
    return _runtime.pipeline_fits(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_stages"], e,
                                  e if op == "Y_tma" else 0)


# ---------------------------------------------------------------------------------------------------
def make_ops(M, d_in, d_out, r, dtype, device):
    """{op: (kernel(config) -> tensor(s), torch() -> same values, bytes moved at least once)}."""
    import torch

    import relora_kernels.linear as lin
    from relora_kernels import matmul_tma
    from relora_kernels.matmul import concat_matmul
    from relora_kernels.merge import merge_launch
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s, std=1.0: torch.randn(*s, generator=g, device=device, dtype=dtype) * std  # noqa: E731
    x, dy = rnd(M, d_in), rnd(M, d_out)
    w = rnd(d_out, d_in, std=d_in ** -0.5)
    a, b = rnd(r, d_in, std=d_in ** -0.5), rnd(d_out, r, std=r ** -0.5)
    s_ = x @ a.t()
    ds = dy @ b
    scale = 2.0
    e = x.element_size()
    w_merge = w.clone()
    a32, b32 = a.float(), b.float()

    # Checked from a fresh W; timed without the reset (a copy of W would double the bytes timed), at a scale
    # far below W's ulp, so W keeps its values while every byte is still read and written (as bench_kernels).
    def merge_kernel(cfg, timed=False, fa=a, fb=b):
        if timed:
            return merge_launch(w_merge, fa, fb, 1e-6, config=cfg)
        w_merge.copy_(w)
        return merge_launch(w_merge, fa, fb, scale, config=cfg)

    def merge_torch(timed=False, fa=a, fb=b):  # fp32 factors: the product in fp32, one rounding into W
        if timed:
            return w_merge.add_(1e-6 * fb @ fa)
        w_merge.copy_(w)
        return w_merge.copy_(w_merge.float() + scale * (fb @ fa))

    # bytes: every operand read once and every output written once (the fewest any kernel moves)
    y_bytes = e * (M * d_in + d_out * d_in + M * r + d_out * r + M * d_out)  # x, W, S, B in; Y out
    dx_bytes = e * (M * d_out + d_out * d_in + M * r + r * d_in + M * d_in)  # dY, W, dS, A in; dX out
    return {
        "S": (lambda cfg: concat_matmul(x, a.t(), config=cfg), lambda: x @ a.t(), e * (M * d_in + r * d_in + M * r)),
        "dS": (lambda cfg: concat_matmul(dy, b, alpha=scale, config=cfg), lambda: scale * (dy @ b),
               e * (M * d_out + d_out * r + M * r)),
        "dB": (lambda cfg, det=False: concat_matmul(dy.t(), s_, alpha=scale, reduce_k=True, deterministic=det,
                                                    out_dtype=dtype, config=cfg),
               lambda: scale * (dy.t() @ s_), e * (M * d_out + M * r + d_out * r)),
        "dA": (lambda cfg, det=False: concat_matmul(ds.t(), x, reduce_k=True, deterministic=det, out_dtype=dtype,
                                                    config=cfg),
               lambda: ds.t() @ x, e * (M * d_in + M * r + r * d_in)),
        "dSdB": (lambda cfg: lin.fused_ds_db(dy, b, s_, scale, db_dtype=dtype, config=cfg),
                 lambda: (scale * (dy @ b), scale * (dy.t() @ s_)), e * (M * d_out + 2 * M * r + 2 * d_out * r)),
        "Y": (lambda cfg: concat_matmul(x, w.t(), s_, b.t(), beta=scale, config=cfg),
              lambda: x @ w.t() + scale * (s_ @ b.t()), y_bytes),
        "dX": (lambda cfg: concat_matmul(dy, w, ds, a, config=cfg), lambda: dy @ w + ds @ a,
               dx_bytes),
        "Y_tma": (lambda cfg: matmul_tma.launch(x, w.t(), s_, b.t(), torch.empty_like(dy), beta=scale, config=cfg),
                  lambda: x @ w.t() + scale * (s_ @ b.t()), y_bytes),
        "dX_tma": (lambda cfg: matmul_tma.launch(dy, w, ds, a, torch.empty_like(x), config=cfg),
                   lambda: dy @ w + ds @ a, dx_bytes),
        "merge": (merge_kernel, merge_torch, 2 * e * d_out * d_in + e * r * (d_in + d_out)),
        "merge32": (lambda cfg, timed=False: merge_kernel(cfg, timed, a32, b32),
                    lambda timed=False: merge_torch(timed, a32, b32), 2 * e * d_out * d_in + 4 * r * (d_in + d_out)),
        "_cublas_Y": (None, lambda: x @ w.t(), 0),   # the big GEMMs without the low-rank term: cuBLAS floor
        "_cublas_dX": (None, lambda: dy @ w, 0),
        "_copy": (None, lambda: w_merge.copy_(w), 2 * e * d_out * d_in),
    }


def max_rel_err(got, want_fn):
    """Error of ``got`` against ``want_fn()``; ``got`` is copied first (the merge ops share one buffer)."""
    got = tuple(t.clone() for t in (got if isinstance(got, tuple) else (got,)))
    want = want_fn()
    want = want if isinstance(want, tuple) else (want,)
    errs = [((g.float() - t.float()).norm() / t.float().norm()).item() for g, t in zip(got, want)]
    return math.nan if any(math.isnan(e) for e in errs) else max(errs)  # max() drops a NaN after the first


def main(argv=None):
    args = parse_args(argv)
    os.environ["RELORA_KERNELS"] = "triton"
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        print("CPU smoke mode (Triton interpreter): timings are NOT performance numbers.")
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("tune_kernels.py needs a CUDA GPU; use `--device cpu --smoke` for a smoke run.", file=sys.stderr)
        return 2
    load_relora_kernels()
    import triton
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    M, r = args.M, args.rank
    shapes = list(dict.fromkeys([*args.shapes, *args.sweep_shapes]))  # each shape's tensors built once
    meta = dict(dtype=str(dtype).replace("torch.", ""), torch=torch.__version__, triton=triton.__version__,
                device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu (triton interpreter)",
                date=datetime.date.today().isoformat(), M=M, r=r)
    rows = RowSink(args.out)
    spin_up(args.device, 1.0)  # clocks up before the first timing (no-op on cpu)

    for d_in, d_out in shapes:
        ops = make_ops(M, d_in, d_out, r, dtype, args.device)
        copy_ms = bench(ops["_copy"][1], args.device, args.rep)[0]
        copy_gbps = ops["_copy"][2] / copy_ms / 1e6

        def time_row(section, op, provider, fn, nbytes, cfg=None, want=None, timed=None):
            """Checks ``fn()`` against ``want()``, then times ``timed`` (default ``fn``)."""
            row = dict(section=section, op=op, provider=provider, d_in=d_in, d_out=d_out,
                       config="" if cfg is None else " ".join(f"{k}={v}" for k, v in cfg.items()), **meta)
            try:
                err = max_rel_err(fn(), want) if want is not None else float("nan")
                if want is not None and not err <= tol:  # NaN too: unwritten or overflowed outputs
                    row.update(status=f"wrong (rel err {err:.1e})", ms=float("nan"), err=err)
                    return rows.append(row)
                ms = bench(timed or fn, args.device, args.rep)[0]
            except Exception as exc:  # noqa: BLE001  a config over the shared-memory limit etc.
                row.update(status=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}",
                           ms=float("nan"), err=float("nan"))
                return rows.append(row)
            floor = nbytes / copy_gbps / 1e6 if nbytes else float("nan")
            row.update(status="ok", ms=ms, err=err, gbps=nbytes / ms / 1e6 if nbytes else float("nan"),
                       floor_ms=floor, copy_gbps=copy_gbps)
            rows.append(row)

        if "breakdown" in args.sections and (d_in, d_out) in args.shapes:
            for op in ("S", "Y", "Y_tma", "dSdB", "dS", "dB", "dA", "dX", "dX_tma", "merge", "merge32"):
                kernel, ref, nbytes = ops[op]
                if op in ("dB", "dA"):
                    time_row("breakdown", op, "atomic", lambda k=kernel: k(None), nbytes, want=ref)
                    time_row("breakdown", op, "det", lambda k=kernel: k(None, det=True), nbytes, want=ref)
                elif op in ("merge", "merge32"):
                    time_row("breakdown", op, "kernel", lambda k=kernel: k(None), nbytes, want=ref,
                             timed=lambda k=kernel: k(None, timed=True))
                else:
                    time_row("breakdown", op, "kernel", lambda k=kernel: k(None), nbytes, want=ref)
                time_row("breakdown", op, "torch", ref, nbytes,
                         timed=(lambda f=ref: f(timed=True)) if op in ("merge", "merge32") else None)
            for op in ("_cublas_Y", "_cublas_dX"):
                time_row("breakdown", op, "torch", ops[op][1], 0)

        if "sweep" in args.sections and (d_in, d_out) in args.sweep_shapes:
            cands = {"S": gemm_candidates(r, args.smoke), "dS": gemm_candidates(r, args.smoke),
                     "dB": reduce_candidates(args.smoke), "dA": reduce_candidates(args.smoke),
                     "dSdB": ds_db_candidates(r, args.smoke), "merge": merge_candidates(r, args.smoke),
                     "merge32": merge_candidates(r, args.smoke, fp32_factors=True),
                     "Y_tma": tma_candidates(args.smoke)}
            for op in args.ops:
                kernel, ref, nbytes = ops[op]
                for cfg in cands[op]:
                    if args.device == "cuda" and not gemm_fits(op, cfg, dtype):  # no compile for a sure overflow
                        rows.append(dict(section="sweep", op=op, provider="kernel", d_in=d_in, d_out=d_out,
                                         config=" ".join(f"{k}={v}" for k, v in cfg.items()), **meta,
                                         status="skipped: over shared memory (predicted)", ms=float("nan"),
                                         err=float("nan")))
                        continue
                    time_row("sweep", op, "kernel", lambda k=kernel, c=cfg: k(c), nbytes, cfg=cfg, want=ref,
                             timed=(lambda k=kernel, c=cfg: k(c, timed=True)) if op in ("merge", "merge32") else None)

    print_summary(rows)
    print(f"\n{len(rows)} rows -> {args.out}")
    return 0


def print_summary(rows):
    for (d_in, d_out) in sorted({(r["d_in"], r["d_out"]) for r in rows}):
        shape_rows = [r for r in rows if (r["d_in"], r["d_out"]) == (d_in, d_out)]
        print(f"\n== {d_in} x {d_out}, M={shape_rows[0]['M']}, r={shape_rows[0]['r']}: breakdown (ms; floor = bytes "
              f"at copy bandwidth)")
        for r in (r for r in shape_rows if r["section"] == "breakdown"):
            extra = r["status"] if r["status"] != "ok" else \
                f"{r['ms']:.4f} ms  floor {r['floor_ms']:.4f}  err {r['err']:.1e}"
            print(f"  {r['op']:10} {r['provider']:7} {extra}")
        ok = [r for r in shape_rows if r["section"] == "sweep" and r["status"] == "ok"]
        for op in sorted({r["op"] for r in shape_rows if r["section"] == "sweep"}):
            cand = sorted((r for r in ok if r["op"] == op), key=lambda r: r["ms"])
            bad = sum(1 for r in shape_rows if r["section"] == "sweep" and r["op"] == op and r["status"] != "ok")
            if cand:
                print(f"  sweep {op:6} best {cand[0]['ms']:.4f} ms [{cand[0]['config']}] of {len(cand)} ok, "
                      f"{bad} failed/wrong; worst {cand[-1]['ms']:.4f} ms")
            else:
                print(f"  sweep {op:6} no candidate ran ({bad} failed/wrong)")


if __name__ == "__main__":
    sys.exit(main())
