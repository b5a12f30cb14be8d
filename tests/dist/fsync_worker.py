"""One process (tests/test_checkpoint.py): checkpoint.save with a real DeepSpeed engine at ZeRO stages 1 and 3
flushes every file of the checkpoint before ``latest`` names it. os.fsync is recorded (by the path each file
descriptor names); prints one line per stage: the files this rank flushed itself before the ranks' agreement
that precedes config.json, and any file of the folder flushed by nobody or only after config.json or latest moved."""
import os
import sys
from pathlib import Path

import torch

from relora_ds import checkpoint
from relora_ds.distributed import init_distributed, run_and_exit
from tiny_engine import tiny_engine, tiny_llama  # tests/dist, this script's folder


def main():
    init_distributed()
    out = Path(sys.argv[1])
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    checkpoint.os.fsync = lambda fd: (real_fsync(fd), events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))))
    checkpoint.os.replace = lambda a, b: (real_replace(a, b), events.append(("replace", str(b))))
    real_failed_ranks = checkpoint.failed_ranks  # the save's agreements recorded (each waits for every rank)
    checkpoint.failed_ranks = lambda failed: (real_failed_ranks(failed), events.append(("agree", None)))[0]
    for stage in (1, 3):
        engine = tiny_engine(tiny_llama(), stage)
        x = torch.randint(0, 128, (1, 9))
        engine.backward(engine(x, labels=x).loss)
        engine.step()
        events.clear()
        ckpt_dir = out / f"stage{stage}"
        tag = checkpoint.save(engine, ckpt_dir, 1, {}, {"stage": stage}, keep_last=0)
        kinds = [kind for kind, _ in events]
        written = [i for i, k in enumerate(kinds) if k == "agree"][1]  # every rank's files written
        config_at = events.index(("replace", str(tag / "config.json")))
        latest_at = events.index(("replace", str(ckpt_dir / "latest")))
        own = sorted(Path(p).name for k, p in events[:written] if k == "fsync")
        in_time = {p for k, p in events[:config_at] if k == "fsync"}
        late = sorted(p.name for p in tag.rglob("*") if str(p.resolve()) not in in_time and p.name != "config.json")
        renamed = [Path(p).name for k, p in events[config_at - 1:config_at] + events[latest_at - 1:latest_at]]
        after = [Path(p).name for k, p in events[config_at + 1:config_at + 2] + events[latest_at + 1:] if k == "fsync"]
        print(f"stage {stage}: own {own}; late {late}; flushed before renames {renamed}; after {after}", flush=True)
        engine.destroy()
    return 0


if __name__ == "__main__":
    run_and_exit(main)
