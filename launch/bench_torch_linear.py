"""Where the `torch` path's merged-weight variant beats its epilogue chain (kernels/torch_linear.py): one layer,
forward+backward, at token counts M given as multiples of the harmonic mean of its in and out widths (the
crossover the multiply-add count predicts: `torch_linear.merged_is_cheaper`).

    OMP_NUM_THREADS=1 python launch/bench_torch_linear.py --dtype fp32 --out crossover.json

The two variants alternate call by call on the same tensors (cancels a shared machine's drift); each row is
the median of --reps calls of each. x and the LoRA factors are trainable, W frozen (what training runs).
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path


def harmonic_mean(d_in: int, d_out: int) -> float:
    return 2 * d_in * d_out / (d_in + d_out)


def time_point(m: int, d_in: int, d_out: int, rank: int, dtype, reps: int, device: str = "cpu") -> dict:
    import torch

    from relora_kernels.torch_linear import lora_linear_torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, d_in, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(d_out, d_in, generator=g) * d_in ** -0.5).to(device, dtype)
    a = (torch.randn(rank, d_in, generator=g) * d_in ** -0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(d_out, rank, generator=g) * 0.01).to(device, dtype).requires_grad_()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call(merged: bool) -> float:
        sync()
        t0 = time.perf_counter()
        lora_linear_torch(x, w, a, b, 2.0, merged_weight=merged).sum().backward()
        sync()
        return time.perf_counter() - t0

    call(False), call(True)  # warm-up (allocator, BLAS primitives)
    times = {False: [], True: []}
    for _ in range(reps):
        for merged in (False, True):
            times[merged].append(call(merged))
    epi, mrg = (statistics.median(times[k]) * 1e3 for k in (False, True))
    return {"m": m, "d_in": d_in, "d_out": d_out, "rank": rank, "epilogue_ms": round(epi, 4),
            "merged_ms": round(mrg, 4), "merged_over_epilogue": round(mrg / epi, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["512x512x128", "256x688x32", "512x1376x128", "1000x2751x33"],
                    help="layers as IN x OUT x RANK, e.g. 512x1376x128")
    ap.add_argument("--multiples", nargs="+", type=float, default=[0.25, 0.5, 1, 2, 4],
                    help="token counts as multiples of the layer's harmonic mean 2·in·out/(in+out)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    import torch

    shapes = []
    for spec in args.shapes:
        parts = spec.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            ap.error(f"--shapes: {spec!r} is not IN x OUT x RANK with positive whole numbers, e.g. 512x1376x128")
        d_in, d_out, rank = map(int, parts)
        if rank > min(d_in, d_out):
            ap.error(f"--shapes: {spec!r} has rank {rank} > min(IN, OUT) = {min(d_in, d_out)}, which no ReLoRA "
                     f"layer takes")
        shapes.append((d_in, d_out, rank))
    if args.reps < 1 or any(f <= 0 for f in args.multiples):
        ap.error("--reps must be >= 1 and every --multiples value > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU here (torch.cuda.is_available() is False); use --device cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    meta = {"dtype": args.dtype, "device": args.device, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or
            platform.machine(), "date": time.strftime("%Y-%m-%d")}
    rows = []
    print(f"{'layer':>16} {'M':>6} {'x hm':>5} {'epilogue ms':>12} {'merged ms':>10} {'merged/epi':>10}")
    for d_in, d_out, rank in shapes:
        hm = harmonic_mean(d_in, d_out)
        for f in args.multiples:
            m = max(1, round(f * hm))
            row = {**meta, **time_point(m, d_in, d_out, rank, dtype, args.reps, args.device), "multiple_of_hm": f}
            rows.append(row)
            print(f"{f'{d_in}x{d_out} r={rank}':>16} {m:6d} {f:5.2f} {row['epilogue_ms']:12.3f} "
                  f"{row['merged_ms']:10.3f} {row['merged_over_epilogue']:10.2f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
