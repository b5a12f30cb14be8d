"""2-rank worker for tests/test_trainer.py: each rank runs in its own directory (argv: --base B), as ranks on
different nodes do, and the recipe's data_dir "data" is relative, so each rank reads its own copy (what a
node-local cache or per-node copy gives); the output_dir is B/run (shared), or with --local-output "run", each
rank's own (a node-local disk). Each rank writes the trainer's error to B/rank{N}.txt."""
import argparse
import os
from pathlib import Path

from relora_ds.distributed import run_and_exit
from relora_ds.output_dir import check_shared_output_dir
from relora_ds.train_config import TrainConfig
from relora_ds.trainer import Trainer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int)
    parser.add_argument("--base", required=True)
    parser.add_argument("--local-output", action="store_true")
    args = parser.parse_args()
    base = Path(args.base).resolve()
    rank = int(os.environ["RANK"])
    os.chdir(base / f"rank{rank}")
    check_shared_output_dir.__defaults__ = (3, 0.2)  # tries, pause: not the 32 s a real file system gets
    cfg = TrainConfig(model="debug", mode="lora", rank=8, total_steps=2, micro_batch_size=2, global_batch_size=4,
                      seq_len=32, eval_every=0, save_every=0, export=False,
                      output_dir="run" if args.local_output else str(base / "run"), data_dir="data")
    try:
        Trainer(cfg).close()
        message = "no error"
    except ValueError as e:
        message = f"ValueError: {e}"
    (base / f"rank{rank}.txt").write_text(message)


run_and_exit(main)
