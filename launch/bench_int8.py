"""int8 frozen base weights: kernel speed vs the bf16 base, merge drift, quantizer error, memory tables.

Sections (``--sections``, default all that the device supports):
  kernels  CUDA: fused LoRA linear fwd / fwd+bwd with a bf16 base (``bf16``, relora_kernels.lora_linear) vs an
           int8 base dequantized to a bf16 scratch buffer (``int8_scratch``, relora_kernels.int8_lora_linear),
           vs an int8 base dequantized inside the GEMM tiles (``int8_gemm``, in_gemm=True), the dequant kernel
           alone (``dequant``), and the merges (``merge_bf16`` vs ``merge_int8``).
           Target (H100, bf16, M=16384, r=128): int8 fwd+bwd >= 0.96x the speed of bf16. The faster of
           int8_scratch / int8_gemm should be kernels/int8.py's IN_GEMM_DEQUANT default.
  drift    ||W_k - W_exact|| / ||W_exact|| for k = 1..20 merges: naive requantization, error feedback with a
           host residual (ours), stochastic rounding, an fp32 host master; and quantizing W_exact once.
  error    quantizer choice: absmax with fp32 vs bf16 scales vs MSE-optimal clipping, on Gaussian (LLaMA init)
           and heavy-tailed (Student-t, 4 dof) rows.
  train_memory  CUDA: peak memory and step time of plain-torch ReLoRA training of --train-preset (1b),
           bf16 vs int8 base.
  memory   frozen-weight bytes per preset (int8 + bf16 scales vs bf16), and the host residual.

    python launch/bench_int8.py                   # on a GPU: everything
    python launch/bench_int8.py --device cpu      # drift, error, memory (kernel timings need CUDA)
Rows are appended to --out (CSV or .json) as they are made, through bench_common.RowSink.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
from bench_common import RowSink, bench, peak_mib, shape_arg, spin_up  # noqa: E402
from cli_types import DefaultsHelpFormatter  # noqa: E402

import relora_kernels as rk  # noqa: E402
from relora_ds import PRESETS, LlamaConfig, LlamaForCausalLM, quant, relora_layers, wrap  # noqa: E402


def kernel_rows(M, shapes, r, device, rows):
    for d_in, d_out in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        mk = lambda *s, std=1.0: (torch.randn(*s, device=device, generator=g) * std).to(torch.bfloat16)  # noqa
        x, dy = mk(M, d_in).requires_grad_(), mk(M, d_out)
        W = mk(d_out, d_in, std=0.02)
        A, B = mk(r, d_in, std=0.02).requires_grad_(), mk(d_out, r, std=0.02).requires_grad_()
        q, s, res = rk.int8_quantize_reference(W, residual=True)
        res = res.cpu()
        fwd = {"bf16": lambda: rk.lora_linear(x, W, A, B, 0.25),
               "int8_scratch": lambda: rk.int8_lora_linear(x, q, s, A, B, 0.25, in_gemm=False),
               "int8_gemm": lambda: rk.int8_lora_linear(x, q, s, A, B, 0.25, in_gemm=True)}
        for name, f in fwd.items():
            def fb(f=f):
                torch.autograd.grad(f(), (x, A, B), dy)
            for mode, fn in (("fwd", f), ("fwd+bwd", fb)):
                try:  # one failing provider (e.g. a kernel over the shared-memory limit) must not end the run
                    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                        med, p20, p80 = bench(fn, device)
                except Exception as exc:  # noqa: BLE001
                    print(f"{name} {mode} {d_in}x{d_out} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                    continue
                rows.append(dict(op="linear", provider=name, mode=mode, M=M, d_in=d_in, d_out=d_out, r=r,
                                 dtype="bfloat16", ms=med, p20=p20, p80=p80, peak_mib=peak_mib(fn, device)))
        Af, Bf = A.detach().float(), B.detach().float()
        Wm, qm, sm = W.clone(), q.clone(), s.clone()
        for name, fn in (("dequant", lambda: rk.int8_dequantize(q, s, torch.bfloat16)),
                         ("merge_bf16", lambda: rk.lora_merge_(Wm, Af, Bf, 0.0)),
                         ("merge_int8", lambda: rk.int8_merge_(qm, sm, res, Af, Bf, 0.0))):
            try:  # as above: a failing merge must not end the run's other shapes
                med, p20, p80 = bench(fn, device)
            except Exception as exc:  # noqa: BLE001
                print(f"{name} {d_in}x{d_out} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            rows.append(dict(op=name, provider=name, mode="-", M=0, d_in=d_in, d_out=d_out, r=r, ms=med,
                             dtype="bfloat16" if name == "dequant" else "float32 factors", p20=p20, p80=p80,
                             peak_mib=float("nan")))
    return rows


def print_kernel_summary(rows):
    for d_in, d_out in sorted({(r["d_in"], r["d_out"]) for r in rows}):
        get = {(r["provider"], r["mode"]): r["ms"] for r in rows if (r["d_in"], r["d_out"]) == (d_in, d_out)}
        for mode in ("fwd", "fwd+bwd"):
            b = get.get(("bf16", mode))
            for prov in ("int8_scratch", "int8_gemm"):
                i = get.get((prov, mode))
                if b and i:
                    print(f"{d_in}x{d_out} {mode}: bf16 {b:.3f} ms, {prov} {i:.3f} ms, speed ratio {b / i:.3f}")
        ms = {op: (f"{get[(op, '-')]:.3f} ms" if (op, "-") in get else "failed")  # kernel_rows went on
              for op in ("dequant", "merge_bf16", "merge_int8")}
        print(f"{d_in}x{d_out} dequant {ms['dequant']}, merge bf16 {ms['merge_bf16']}, "
              f"merge int8 (+host residual round trip) {ms['merge_int8']}")


def drift_rows(n=512, rank=32, merges=20, rel_norm=0.02):
    W0, ups = quant.realistic_updates(n, n, rank, merges, rel_norm=rel_norm)
    err = quant.merge_drift(W0, ups)
    print(f"\nmerge drift ({n}x{n}, rank {rank}, ||dW|| = {rel_norm} ||W0|| per merge): error / one-shot error")
    print("| k | one-shot rel. error | " + " | ".join(quant.MECHANISMS) + " |")
    print("|---|---|" + "---|" * len(quant.MECHANISMS))
    rows = []
    for k in range(merges):
        o = err["one_shot"][k]
        print(f"| {k + 1} | {o:.5f} | " + " | ".join(f"{err[m][k] / o:.3f}" for m in quant.MECHANISMS) + " |")
        rows.append(dict(op="drift", k=k + 1, one_shot=o, **{m: err[m][k] / o for m in quant.MECHANISMS}))
    return rows


def _mse_clip_error(w, steps=40):
    """Per-row search over clip ratios c·absmax (c in [0.5, 1]) minimizing the squared error."""
    best = None
    for c in torch.linspace(0.5, 1.0, steps):
        s = (w.abs().amax(1, keepdim=True) * c / 127)
        e = ((torch.clamp(torch.floor(w / s + 0.5), -127, 127) * s - w) ** 2).sum(1)
        best = e if best is None else torch.minimum(best, e)
    return (best.sum() / (w ** 2).sum()).sqrt().item()


def error_rows(n=1024):
    g = torch.Generator().manual_seed(0)
    rows = []
    print("\nquantizer: relative Frobenius error of one quantization")
    with torch.random.fork_rng(devices=[]):  # StudentT samples from the global generator: seeded here
        torch.manual_seed(0)
        heavy = torch.distributions.StudentT(4.0).sample((n, n)) * 0.02
    for dist, w in (("gaussian", torch.randn(n, n, generator=g) * 0.02), ("student_t4", heavy)):
        s32 = w.abs().amax(1, keepdim=True) / 127
        e32 = ((torch.floor(w / s32 + 0.5) * s32 - w).norm() / w.norm()).item()
        q, s, _ = rk.int8_quantize_reference(w)
        e16 = ((rk.int8_dequantize_reference(q, s) - w).norm() / w.norm()).item()
        emse = _mse_clip_error(w)
        print(f"{dist}: absmax fp32 scale {e32:.5f}, absmax bf16 scale (ours) {e16:.5f}, MSE-optimal clip {emse:.5f}")
        rows.append(dict(op="quant_error", dist=dist, absmax_fp32=e32, absmax_bf16=e16, mse_clip=emse))
    return rows


def memory_rows(rank=128):
    rows = []
    print("\nfrozen-weight bytes of the ReLoRA layers (device), per preset")
    print("| preset | frozen params | bf16 | int8 + bf16 scales | ratio | host residual |")
    print("|---|---|---|---|---|---|")
    for name in PRESETS:
        with torch.device("meta"):
            model = wrap(LlamaForCausalLM(LlamaConfig.preset(name)), rank=min(rank, 8))
        shapes = [(l.out_features, l.in_features) for _, l in relora_layers(model)]
        n = sum(o * i for o, i in shapes)
        b16 = sum(quant.device_bytes(o, i, None) for o, i in shapes)
        i8 = sum(quant.device_bytes(o, i, "int8") for o, i in shapes)
        print(f"| {name} | {n / 1e6:.1f} M | {b16 / 2**20:.1f} MiB | {i8 / 2**20:.1f} MiB | {i8 / b16:.4f} | "
              f"{n / 2**20:.1f} MiB |")
        rows.append(dict(op="frozen_bytes", preset=name, params=n, bf16=b16, int8=i8, ratio=i8 / b16))
    return rows


def train_memory_rows(preset, batch, seq, rank, device):
    """Peak GPU memory of ReLoRA training steps (bf16 model, fp32 AdamW over trainable params, plain torch:
    no DeepSpeed on the GPU image), bf16 base vs int8 base. Each in a fresh model; peak over 8 steps."""
    rows = []
    for q in (None, "int8"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig.preset(preset)).to(torch.bfloat16)
        wrap(model, rank=rank, quantize=q)
        torch.cuda.empty_cache()
        static = torch.cuda.memory_allocated()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        x = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
        torch.cuda.reset_peak_memory_stats()
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        for i in range(8):  # 3 warm-up steps (autotuning, allocator growth), 5 timed
            if i == 3:
                t0.record()
            model(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        t1.record()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        step_ms = t0.elapsed_time(t1) / 5
        print(f"train {preset} base={q or 'bf16'}: model+buffers {static / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB,"
              f" step {step_ms:.0f} ms (batch {batch}x{seq}, r={rank})")
        rows.append(dict(op="train_memory", preset=preset, base=q or "bf16", static_gib=static / 2**30,
                         peak_gib=peak / 2**30, step_ms=step_ms, batch=batch, seq=seq, r=rank))
        del model, opt
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    sections = ("kernels", "train_memory", "drift", "error", "memory")
    ap.add_argument("--sections", nargs="+", default=None, choices=sections,
                    help="default: all the device supports (kernels and train_memory need CUDA)")
    ap.add_argument("--M", type=int, default=16384)
    ap.add_argument("--shapes", nargs="+", type=shape_arg, default=[(2048, 2048), (4096, 4096), (2048, 5461)])
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--train-preset", default="1b")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-seq", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_int8.json")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_int8.py --device cuda needs a CUDA GPU (none found); on CPU use --device cpu (sections drift, "
              "error, memory)", file=sys.stderr)
        return 2
    cuda_only = [s for s in args.sections or () if s in ("kernels", "train_memory")]
    if args.device != "cuda" and cuda_only:
        print(f"bench_int8.py: section(s) {', '.join(cuda_only)} need --device cuda (a GPU); on CPU use drift, "
              "error, memory", file=sys.stderr)
        return 2
    if args.sections is None:
        args.sections = list(sections) if args.device == "cuda" else ["drift", "error", "memory"]
    if args.device == "cuda":  # the rows time the Triton kernels: under "auto" the int8 layer takes the torch path
        os.environ["RELORA_KERNELS"] = "triton"
    import triton

    stamp = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch=torch.__version__,
                 triton=triton.__version__, date=datetime.date.today().isoformat())
    rows = RowSink(args.out, stamp)
    if "kernels" in args.sections:
        spin_up("cuda", 1.0)  # clocks up before the first timing
        kernel_rows(args.M, list(args.shapes), args.rank, "cuda", rows)
        print_kernel_summary(rows)
    if "train_memory" in args.sections:
        rows += train_memory_rows(args.train_preset, args.train_batch, args.train_seq, args.rank, "cuda")
    if "drift" in args.sections:
        rows += drift_rows()
    if "error" in args.sections:
        rows += error_rows()
    if "memory" in args.sections:
        rows += memory_rows()


if __name__ == "__main__":
    main()
