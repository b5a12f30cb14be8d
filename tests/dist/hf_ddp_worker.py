"""2-rank worker for tests/test_hf_trainer.py: a Hugging Face Trainer without DeepSpeed (accelerate's DDP, gloo)
under enable_relora, its model wrapped with an int8 base. argv: the output folder and the init: "same" (every rank
the same model) or "apart" (rank 1's weights moved before wrap, as by a script that seeds by rank and counts on
DDP's broadcast of rank 0's weights). Each rank saves its final state dict as <init>_rank<r>.pt there."""
import os
import sys
from pathlib import Path

import torch
from transformers import TrainingArguments

import hf_trainer_worker as w  # tests/dist, this script's folder
import relora_ds
from relora_ds.hf_trainer import enable_relora

def main():
    out, init = [Path(a) if i == 0 else a for i, a in
                 enumerate(a for a in sys.argv[1:] if not a.startswith("--local_rank"))]
    rank = int(os.environ["RANK"])
    base = w.plain()
    if init == "apart" and rank == 1:
        with torch.no_grad():
            g = torch.Generator().manual_seed(123)
            for p in base.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    model = relora_ds.wrap(base, rank=4, seed=3, quantize="int8")
    args = TrainingArguments(**{**w.arguments(out / init, 2), "ddp_backend": "gloo"})
    trainer = w.InOrder(model=model, args=args, train_dataset=w.Windows())
    enable_relora(trainer, **w.RELORA)
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel), type(trainer.model_wrapped)
    torch.save(model.state_dict(), out / f"{init}_rank{rank}.pt")


if __name__ == "__main__":
    from relora_ds.distributed import run_and_exit

    run_and_exit(main)  # no interpreter teardown, as every other worker (relora_ds.distributed.exit_process)
