"""Peak memory of the trainer's start-up and warm-start switch: under ZeRO-3 the model built partitioned
(``zero_init``, the default) against built whole on every rank (``--no-zero-init``), or any other stage.

Takes launch/train.py's arguments and runs, on every rank, what the trainer runs before its first step:
the start-up checks, the model built (and for the ReLoRA phase wrapped), the DeepSpeed engine created
(``Trainer.start``); then, when the recipe has a warm start, the switch to the ReLoRA engine. Rank 0
prints and appends to ``--out`` one JSON row: each rank's peak RSS (host) and, on CUDA, peak device memory,
once the model is built (before ``deepspeed.initialize``: "built", "switch_built") and once its engine
exists ("start", "switch"); no training step runs.

    deepspeed --num_gpus 8 launch/bench_build_memory.py --model 7b --warm-start-steps 1 --cycle-length 100 \\
        --total-steps 2 --warmup-steps 1 --restart-warmup-steps 1 --deepspeed ds_configs/zero3.json \\
        --output-dir /tmp/bench_build [--no-zero-init]

On this repository's CPU machine (DS_ACCELERATOR=cpu, gloo) the device is the host: RSS is the number.
"""
import datetime
import json
import resource
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from relora_ds.distributed import run_and_exit
from relora_ds.ds_config import zero_stage
from relora_ds.train_args import build_launch_parser, config_from_args
from relora_ds.trainer import Trainer


def _peaks() -> dict:
    peak = {"rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["device_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return peak


def main(argv=None) -> int:
    parser = build_launch_parser(__doc__)
    parser.add_argument("--out", default="runs/bench_build_memory.jsonl", help="JSON lines file rank 0 appends to")
    args = parser.parse_args(argv)
    out = Path(args.out)
    del args.out
    try:  # what launch/train.py reports as one error line (exit 2) is one here too
        cfg = config_from_args(args)
        cfg.overwrite = True  # a benchmark's output_dir is scratch
        trainer = Trainer(cfg, args.deepspeed)
    except ValueError as exc:
        parser.error(str(exc))
    rows = {}
    initialize = deepspeed.initialize

    def built_then_initialize(*a, **kw):  # the peak of building the model, before DeepSpeed's engine
        rows["built" if "start" not in rows else "switch_built"] = _peaks()
        return initialize(*a, **kw)

    deepspeed.initialize = built_then_initialize
    try:
        try:
            trainer.start()
        except ValueError as exc:
            print(f"bench_build_memory.py: error: {exc}", file=sys.stderr)
            return 2
        rows["start"] = _peaks()
        if trainer.engine_phase == "full" and cfg.mode != "full":
            trainer._switch_to_lowrank()
            rows["switch"] = _peaks()
        gathered = [None] * trainer.world
        dist.all_gather_object(gathered, rows)
        if trainer.rank == 0:
            row = {"model": cfg.model, "world": trainer.world, "zero_stage": zero_stage(trainer.ds),
                   "zero_init": cfg.zero_init, "quantize": cfg.quantize, "warm_start_steps": cfg.warm_start_steps,
                   "ranks": gathered, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                   "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   "command": " ".join(sys.argv)}
            print(json.dumps(row), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    finally:
        trainer.metrics.close(exit_code=0)
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    run_and_exit(main)
