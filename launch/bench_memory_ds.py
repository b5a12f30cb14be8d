"""Peak device memory and step time under a DeepSpeed engine: full-rank training vs ReLoRA with a bf16 base
vs ReLoRA with an int8 base (the paper's claim: ReLoRA takes less memory per GPU and steps faster than
full-rank training of the same model).

One process (world size 1) per base, each in a fresh interpreter so the allocator's peak is its own: build
the preset, for ``bf16``/``int8`` wrap it (``quantize=None`` or ``"int8"``; ``full`` trains every weight),
``deepspeed.initialize`` with the given JSON completed by the trainer's own code (relora_ds.ds_config) and
the trainer's param groups (relora_ds.engines.optimizer_groups), then warm-up steps, for ReLoRA a reset
(merge + 99% prune), and timed steps on random tokens. Reports the trainable parameters, the model's device
bytes after initialize, the peak over the training steps after it (warm-up, the reset, the timed steps; not
the model build) beside launch/preflight.py's estimate of it (``estimated_peak_gib``), and the median step
time.

    python launch/bench_memory_ds.py --preset 1b --deepspeed ds_configs/zero2.json    # on a GPU
    python launch/bench_memory_ds.py --device cpu --preset debug --rank 8 --steps 2    # smoke run (CPU)
    python launch/bench_memory_ds.py --bases full bf16   # full-rank vs ReLoRA only
    python launch/bench_memory_ds.py --deepspeed ds_configs/zero3.json --bases bf16 --compile   # --compile's

On the GPU image (no DeepSpeed there) carry the wheels of scripts/gpu_wheels.sh; launch/gpu_check.sh's
``ds`` stage installs them and runs this script.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
from cli_types import DefaultsHelpFormatter, positive_int  # noqa: E402


def check_preset_rank(preset: str, rank: int) -> None:
    """Raises wrap's ValueError for a rank the preset's layers cannot take (or an unknown preset): the model
    built on the meta device, no memory."""
    import torch

    import relora_ds
    with torch.device("meta"):
        model = relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset(preset))
    relora_ds.wrap(model, rank=rank)


BASES = ("full", "bf16", "int8")  # full-rank training; ReLoRA on a bf16 base; ReLoRA on an int8 base


def estimated_peak_gib(model_cfg, cfg, ds: dict) -> float | None:
    """launch/preflight.py's estimate of the peak per GPU (relora_ds/memory.py: states + activations of the
    run's one phase, world size 1), for the row beside the measured peak; None where it is not estimated
    (fp32)."""
    from relora_ds import memory

    phases = memory.run_phases(model_cfg, cfg, ds, 1)
    if isinstance(phases, str):
        return None
    (phase,) = phases  # no warm start here: mode full, or ReLoRA from the start
    return (phase["states"] + phase["activations"]) / 2**30


def one(preset: str, base: str, ds_path: str, micro_batch: int, seq_len: int, rank: int, steps: int,
        device: str, compile_: bool = False) -> dict:
    import deepspeed
    import torch

    import relora_ds
    from relora_ds.distributed import init_distributed
    from relora_ds.ds_config import complete_ds_config, load_ds_config
    from relora_ds.engines import compile_for_engine, optimizer_groups
    from relora_ds.train_config import TrainConfig

    cuda, lowrank, quantize = device == "cuda", base != "full", "int8" if base == "int8" else None
    cfg = TrainConfig(model=preset, mode="relora" if lowrank else "full", rank=rank,
                      cycle_length=1000 if lowrank else None, micro_batch_size=micro_batch,
                      global_batch_size=micro_batch, seq_len=seq_len, total_steps=steps + 4, quantize=quantize,
                      compile=compile_)
    ds = complete_ds_config(load_ds_config(ds_path), cfg, world_size=1, source=ds_path)
    init_distributed(dist_backend="nccl" if cuda else "gloo")
    torch.manual_seed(0)
    model_cfg = relora_ds.LlamaConfig.preset(preset, max_position_embeddings=seq_len + 1)
    with torch.device(device):
        model = relora_ds.LlamaForCausalLM(model_cfg)
    if lowrank:
        relora_ds.wrap(model, rank=rank, quantize=quantize)
    lora = relora_ds.lora_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if compile_:  # as the trainer's --compile (compiled in the warm-up steps)
        compile_for_engine(model, ds)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=optimizer_groups(model, cfg), config=ds)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    after_init = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    batch = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len + 1), device=engine.device)
    times = []
    for i in range(steps + 3):
        sync()
        t0 = time.perf_counter()
        loss = engine(batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t0)
        if i == 1 and lowrank:  # a reset inside the measured window: merge (gathers, int8 requantize), prune
            relora_ds.merge_and_reinit(engine)
            relora_ds.prune_optimizer_state(engine, lora, "magnitude", 0.99)
    compiled = {}
    if compile_:
        from relora_ds.compiling import cache_entries, compile_stats
        compiled = {k: v for k, v in compile_stats().items() if k != "break_reasons"}  # a limit hit: eager
        compiled["cache_entries"] = cache_entries(engine.module)
    return {"preset": preset, "base": base, "compile": compile_, **compiled, "trainable_params": trainable,
            "deepspeed": ds_path,
            "zero_stage": ds.get("zero_optimization", {}).get("stage", 0), "micro_batch": micro_batch,
            "seq_len": seq_len, "rank": rank, "after_init_gib": after_init,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
            "estimated_peak_gib": estimated_peak_gib(model_cfg, cfg, ds),
            "step_ms": 1000 * statistics.median(times), "loss": loss.item(),
            "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "deepspeed_version": deepspeed.__version__, "triton": __import__("triton").__version__,
            "date": __import__("datetime").date.today().isoformat()}


def main() -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--deepspeed", default=str(ROOT / "ds_configs" / "zero2.json"))
    ap.add_argument("--bases", nargs="+", default=list(BASES), choices=BASES,
                    help="full: full-rank training; bf16/int8: ReLoRA on that base (default: all three)")
    ap.add_argument("--micro-batch", type=positive_int, default=8, help="default: 8")
    ap.add_argument("--seq-len", type=positive_int, default=512, help="default: 512")
    ap.add_argument("--rank", type=positive_int, default=128, help="default: 128")
    ap.add_argument("--steps", type=positive_int, default=5, help="timed steps, after 3 warm-up steps (default: 5)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_memory_ds.json")
    ap.add_argument("--compile", action="store_true", help="the trainer's --compile: each decoder layer compiled "
                    "(under ZeRO-3 each gathered whole around its graph), in the warm-up steps")
    ap.add_argument("--one", choices=BASES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.preset, args.one, args.deepspeed, args.micro_batch, args.seq_len, args.rank,
                             args.steps, args.device, args.compile)))
        return 0
    try:  # the preset/rank errors wrap would raise in each child, as one parse error, up front
        check_preset_rank(args.preset, args.rank)
    except ValueError as exc:
        ap.error(str(exc))
    rows, failed = [], []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("[]")  # no stale rows of an earlier run pass for this one's
    for base in args.bases:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        if args.device == "cpu":
            env.setdefault("DS_ACCELERATOR", "cpu")
        cmd = [sys.executable, __file__, "--one", base, "--preset", args.preset, "--deepspeed", args.deepspeed,
               "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len), "--rank", str(args.rank),
               "--steps", str(args.steps), "--device", args.device, *(["--compile"] if args.compile else [])]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)  # stderr streams through
        if proc.returncode:
            print(proc.stdout[-2000:], file=sys.stderr)
            failed.append(base)
            continue  # the other base's row is still measured and kept
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['preset']} {row['base']:>5} ZeRO-{row['zero_stage']}{' compiled' if args.compile else ''}: "
              f"{row['trainable_params'] / 1e6:.1f}M trained, "
              f"after initialize {row['after_init_gib']:.2f} GiB, peak {row['peak_gib']:.2f} GiB (estimated "
              f"{row['estimated_peak_gib'] or float('nan'):.2f}), step "
              f"{row['step_ms']:.1f} ms, loss {row['loss']:.3f}", flush=True)
        args.out.write_text(json.dumps(rows, indent=1))  # after each base: a call cut at its limit keeps it
    if failed:
        print(f"bench_memory_ds.py: the {' and '.join(failed)} base run(s) failed (errors above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from relora_ds.distributed import run_and_exit

    run_and_exit(main)  # no interpreter teardown: there gloo's threads can abort a finished rank (-6)
