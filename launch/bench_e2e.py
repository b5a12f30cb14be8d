"""Tokens/s of one ReLoRA training step (forward, backward, AdamW step) on one GPU, kernels vs reference.

    python launch/bench_e2e.py --presets 350m 1b --micro-batch 8 --seq-len 512 --out results.json

Each (preset, path) runs in its own process with the path's environment (--paths, PATH_ENV below: reference |
torch (BLAS chain with fused epilogues) | torch_merged (merged-weight GEMMs, kernels/torch_linear.py) |
triton | triton_tma_blas_lr (TMA GEMMs, cuBLAS rank-r products) | auto), or with --interleave all paths
alternate step by step in one process; bf16 weights and activations, r=128, fused torch AdamW over the
trainable parameters; median over timed steps after warm-up.
No DeepSpeed: this isolates the layer kernels' effect on a whole model.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from cli_types import DefaultsHelpFormatter, positive_int


# What each --paths name sets in the environment (read by relora_kernels at call time); a variable another
# path sets and this one does not is unset for it (interleaved, `auto` after `torch_merged` would otherwise
# run merged).
PATH_ENV = {"reference": {"RELORA_KERNELS": "reference"},
            "torch": {"RELORA_KERNELS": "torch", "RELORA_MERGED_WEIGHT": "0"},
            "torch_merged": {"RELORA_KERNELS": "torch", "RELORA_MERGED_WEIGHT": "1"},
            "triton": {"RELORA_KERNELS": "triton"},
            "triton_tma_blas_lr": {"RELORA_KERNELS": "triton"},
            "auto": {"RELORA_KERNELS": "auto"}}
# Module switches of the Triton path (bench_kernels.py's providers): the TMA-descriptor GEMMs with the rank-r
# products on cuBLAS, the best fused variant at d=4096 on the H200 (BENCHMARKS.md). Off for every other path.
PATH_SWITCHES = {"triton_tma_blas_lr": {("matmul", "TMA_GEMM"): True, ("linear", "LOWRANK_BLAS"): True}}


def use_path(path: str) -> None:
    """Set ``path``'s environment and Triton module switches for the next calls (see PATH_ENV)."""
    import importlib

    for key in {k for env in PATH_ENV.values() for k in env}:
        os.environ.pop(key, None)
    os.environ.update(PATH_ENV[path])
    for module, name in {k for switches in PATH_SWITCHES.values() for k in switches}:
        mod = importlib.import_module(f"relora_kernels.{module}")
        setattr(mod, name, PATH_SWITCHES.get(path, {}).get((module, name), False))


def one(preset: str, micro_batch: int, seq_len: int, steps: int, rank: int, device: str = "cuda",
        interleave: list[str] | None = None, dtype: str | None = None, quantize: str | None = None,
        loss_chunk_size: int = 0, activation_checkpointing: bool | str = False,
        path: str | None = None, compile_layers: bool = False, compile_backend: str = "inductor") -> dict | list[dict]:
    """Time ``steps`` training steps after 3 warm-up steps on ``path`` (None: the environment as it is).
    ``interleave``: alternate these paths step by step on one model and batch (cancels a shared machine's
    drift); returns one row per path. ``activation_checkpointing``: False, True or "full" (every layer recomputed
    whole), "selective" (the policy of relora_ds/checkpointing.py)."""
    import torch

    import relora_ds
    one_path = path
    if path is not None:
        use_path(path)

    torch.manual_seed(0)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = relora_ds.LlamaConfig.preset(preset, max_position_embeddings=seq_len + 1)
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype or ("bf16" if cuda else "fp32")]
    model = relora_ds.LlamaForCausalLM(cfg).to(device, dt)
    relora_ds.wrap(model, rank=rank, quantize=quantize)
    if loss_chunk_size:
        model.chunked_loss_enable(loss_chunk_size)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(policy="full" if activation_checkpointing is True else activation_checkpointing)
    if compile_layers:
        model.compile_layers(backend=compile_backend)  # compiled in the warm-up steps
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    batch = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), device=device)
    paths = interleave or [None]
    times = {p: [] for p in paths}
    losses = {}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 3):
        for path in paths:
            if path is not None:
                use_path(path)
            sync()
            t0 = time.perf_counter()
            loss = model(batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if i >= 3:  # warm-up: Triton compilation, allocator growth
                times[path].append(time.perf_counter() - t0)
            losses[path] = loss.detach()  # each path's own last loss (read after the timing)
    from relora_ds.flops import flops_per_token, peak_tflops

    per_token = flops_per_token(model, seq_len)
    peak = peak_tflops(torch.cuda.get_device_name()) if cuda and dt == torch.bfloat16 else None
    rows = []
    for path, ts in times.items():
        t = statistics.median(ts)
        tflops = micro_batch * seq_len * per_token / t / 1e12
        rows.append({"preset": preset, "path": path or one_path or os.environ.get("RELORA_KERNELS", "auto"),
                     "interleaved": interleave is not None, "dtype": str(dt).replace("torch.", ""),
                     "base": quantize or "float", "loss_chunk_size": loss_chunk_size,
                     "activation_checkpointing": activation_checkpointing, "compile": compile_layers,
                     "compile_backend": compile_backend if compile_layers else None,
                     "micro_batch": micro_batch, "seq_len": seq_len,
                     "rank": rank, "step_ms": 1000 * t, "tokens_per_s": micro_batch * seq_len / t,
                     "model_tflops": tflops, "mfu": tflops / peak if peak else float("nan"),
                     "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30
                                      if cuda and interleave is None else float("nan")),
                     "loss": losses[path].item(),
                     "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
                     "torch": torch.__version__, "triton": __import__("triton").__version__,
                     "date": __import__("datetime").date.today().isoformat()})
    return rows if interleave else rows[0]


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["350m", "1b"])
    ap.add_argument("--micro-batch", type=positive_int, default=8)
    ap.add_argument("--seq-len", type=positive_int, default=512)
    ap.add_argument("--rank", type=positive_int, default=128)
    ap.add_argument("--steps", type=positive_int, default=10)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: fp32 weights, plain AdamW, the thread count of OMP_NUM_THREADS")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), help="weights and activations (default: bf16 on "
                    "cuda, fp32 on cpu)")
    ap.add_argument("--quantize", choices=("int8",), help="int8 frozen base (relora_ds.wrap(quantize='int8'))")
    ap.add_argument("--loss-chunk-size", type=int, nargs="+", default=[0],
                    help="model.chunked_loss_enable(N); 0: full logits; several: one run each")
    ap.add_argument("--activation-checkpointing", action="store_true", help="model.gradient_checkpointing_enable()")
    ap.add_argument("--activation-checkpointing-policy", choices=("full", "selective"), default="full",
                    help="with --activation-checkpointing: gradient_checkpointing_enable(policy=...)")
    ap.add_argument("--compile", action="store_true", help="model.compile_layers() (torch.compile of each decoder "
                    "layer, the trainer's --compile), compiled during the warm-up steps")
    ap.add_argument("--compile-backend", default="inductor", help="with --compile: torch.compile's backend (the "
                    "trainer's --compile-backend)")
    ap.add_argument("--paths", nargs="+", default=None, choices=tuple(PATH_ENV),
                    help="default: reference torch torch_merged triton (on cpu without triton, which runs there "
                    "only under TRITON_INTERPRET=1)")
    ap.add_argument("--interleave", action="store_true",
                    help="one process per preset, paths alternating step by step (no per-path peak memory)")
    ap.add_argument("--out", default="bench_e2e.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.activation_checkpointing_policy != "full" and not args.activation_checkpointing:
        ap.error("--activation-checkpointing-policy needs --activation-checkpointing")
    if args.compile_backend != "inductor" and not args.compile:
        ap.error("--compile-backend needs --compile")
    if args.one:
        print(json.dumps(one(args.one, args.micro_batch, args.seq_len, args.steps, args.rank, args.device,
                             args.paths if args.interleave else None, args.dtype, args.quantize,
                             args.loss_chunk_size[0],
                             args.activation_checkpointing and args.activation_checkpointing_policy,
                             None if args.interleave or not args.paths else args.paths[0], args.compile,
                             args.compile_backend)))
        return
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_e2e.py: no CUDA GPU here; `--device cpu` times the CPU paths (fp32).", file=sys.stderr)
        raise SystemExit(2)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if args.paths is None:
        args.paths = ["reference", "torch", "torch_merged"] + (["triton"] if args.device == "cuda" or interpreted
                                                                else [])
    elif args.device == "cpu" and {"triton", "triton_tma_blas_lr"} & set(args.paths) and not interpreted:
        ap.error("--paths triton/triton_tma_blas_lr on --device cpu needs TRITON_INTERPRET=1 (Triton's "
                 "interpreter; not a speed number); valid CPU paths: reference torch torch_merged auto")
    rows, failed = [], []
    with open(args.out, "w") as f:  # no stale rows of an earlier run survive a run that fails
        json.dump(rows, f)
    for preset, chunk in ((p, c) for p in args.presets for c in args.loss_chunk_size):
        runs = [(args.paths, dict(os.environ))] if args.interleave else \
            [([p], {**os.environ, **PATH_ENV[p]}) for p in args.paths]
        for paths, env in runs:
            cmd = [sys.executable, __file__, "--one", preset, "--micro-batch", str(args.micro_batch), "--seq-len",
                   str(args.seq_len), "--steps", str(args.steps), "--rank", str(args.rank), "--device", args.device,
                   "--paths", *paths] + (["--interleave"] if args.interleave else []) + \
                (["--dtype", args.dtype] if args.dtype else []) + (["--quantize", args.quantize] if args.quantize else []) + \
                ["--loss-chunk-size", str(chunk)] + \
                (["--activation-checkpointing", "--activation-checkpointing-policy",
                  args.activation_checkpointing_policy] if args.activation_checkpointing else []) + \
                (["--compile", "--compile-backend", args.compile_backend] if args.compile else [])
            # stdout is the row; stderr streams through, so a run killed at a time limit still shows its progress
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
            if proc.returncode:
                failed.append(f"{preset} {' '.join(paths)}" + (f" loss chunk {chunk}" if chunk else ""))
                continue
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            for r in (got if isinstance(got, list) else [got]):
                r["path"] = paths[0] if not args.interleave else r["path"]
                rows.append(r)
                print(f"{preset:>5} {r['path']:>12}: {r['step_ms']:8.1f} ms/step {r['tokens_per_s']:10.0f} tok/s "
                      f"{r['model_tflops']:7.3g} TFLOP/s (MFU {r['mfu']:.1%}) peak {r['peak_mem_gib']:.1f} GiB "
                      f"loss {r['loss']:.3f}" + (f" loss chunk {chunk}" if chunk else "") +
                      (" compiled" if args.compile else ""), flush=True)
            with open(args.out, "w") as f:  # after every run: a run cut at a time limit keeps the rows before it
                json.dump(rows, f, indent=1)
    if failed:
        print(f"bench_e2e.py: {len(failed)} run(s) failed (errors above): {'; '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
