"""Bytes each rank's collectives move per optimizer step, by ZeRO stage: what gradient accumulation costs.

DeepSpeed's ZeRO-2 reduces the gradients after every micro-batch's backward (its partitioned gradients keep
no whole copy to accumulate into), ZeRO-1 once per step at the accumulation boundary; so with A micro-batches
a step ZeRO-2 all-reduces A times what ZeRO-1 does. This counts the tensors handed to ``deepspeed.comm``'s
collectives during ``--steps`` ReLoRA-phase steps of the tiny recipe (fp32, ``ds_configs/zero2_fp32.json`` at
``--stage``), and prints MB and calls per step for each collective (rank 0's; every rank moves the same).
One stage per launch (the trainer's process group is not started twice in one process):

    for s in 1 2; do deepspeed --num_gpus 2 launch/bench_comm.py --stage $s --micro-batches 2; done

Extra arguments go to the trainer (e.g. ``--config launch/configs/paper_350m.yaml``).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
from cli_types import DefaultsHelpFormatter, positive_int  # noqa: E402
COLLECTIVES = ("all_reduce", "reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_reduce_coalesced")


def count_collectives(stats: collections.Counter, counting: list) -> None:
    import deepspeed.comm as comm
    import torch

    for name in COLLECTIVES:
        real = getattr(comm, name, None)
        if real is None:
            continue

        def counted(*args, _real=real, _name=name, **kwargs):
            if counting[0]:
                tensor = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
                stats[f"{_name} calls"] += 1
                if tensor is not None:
                    stats[f"{_name} MB"] += tensor.numel() * tensor.element_size() / 1e6
            return _real(*args, **kwargs)

        setattr(comm, name, counted)


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--micro-batches", type=positive_int, default=2, help="micro-batches per rank per step")
    parser.add_argument("--steps", type=positive_int, default=4, help="ReLoRA-phase steps counted")
    # (ZeRO-3's gathers go through deepspeed.comm's internal helpers, which this count does not see)
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_comm"),
                        help="runs and configs go here (one folder every rank sees)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args, extra = parser.parse_known_args()
    import train
    from relora_ds import steps as steps_module

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    stats, counting, warm = collections.Counter(), [False], 4
    count_collectives(stats, counting)
    real_step = steps_module.StepsMixin._train_step

    def step(self):
        counting[0] = self.step >= warm + 1  # after the switch and its first (lr 0) step
        try:
            return real_step(self)
        finally:
            counting[0] = False

    steps_module.StepsMixin._train_step = step
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = json.loads((ROOT / "ds_configs/zero2_fp32.json").read_text())
    ds["zero_optimization"]["stage"] = args.stage
    (out / f"zero{args.stage}.json").write_text(json.dumps(ds))
    micro = 4
    rc = train.main([
        "--config", str(ROOT / "launch/configs/tiny.yaml"), "--deepspeed", f"{out}/zero{args.stage}.json",
        "--micro-batch-size", str(micro), "--global-batch-size", str(micro * args.micro_batches * world),
        "--total-steps", str(warm + 1 + args.steps), "--warm-start-steps", str(warm), "--warmup-steps", "2",
        "--cycle-length", "1000", "--eval-every", "0", "--save-every", "0", "--no-export",
        "--output-dir", f"{out}/run{args.stage}", "--overwrite", *extra])
    if rc:  # the trainer said why; no counts of a run that did not happen
        return rc
    if rank == 0:
        per_step = {k: round(v / args.steps, 3) for k, v in sorted(stats.items())}
        print(f"ZeRO-{args.stage}, {world} ranks x {args.micro_batches} micro-batches, per optimizer step "
              f"(rank 0's collectives): {per_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
