"""2-rank worker for tests/test_int8_layer.py: torch's DDP around a wrapped model whose ReLoRA layers keep host
residuals (an int8 base's, a bf16 base's merge_residual), two training steps and a merge, twice. Each rank builds
its model from the seed of argv's init ("same": 0 on every rank; "apart": its rank, as a script that seeds by rank
and counts on DDP's broadcast of rank 0's weights) and saves its state dict to argv's output directory as
<init>_<kind>_rank<r>.pt."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import relora_ds
from relora_ds import LlamaConfig, LlamaForCausalLM


def main():
    out = Path(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for init in ("same", "apart"):
        for kind, kw in (("int8", {"quantize": "int8"}), ("residual", {"merge_residual": True})):
            torch.manual_seed(0 if init == "same" else rank)
            model = LlamaForCausalLM(LlamaConfig.preset("debug"))
            if kind == "residual":
                model.to(torch.bfloat16)
            relora_ds.wrap(model, rank=4, seed=1, **kw)
            ddp = DistributedDataParallel(model)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches, as DDP trains
            for merge in range(2):
                for _ in range(2):
                    batch = torch.randint(0, 512, (2, 17), generator=data)
                    ddp(batch, labels=batch).loss.float().backward()
                    opt.step()
                    opt.zero_grad()
                relora_ds.merge_and_reinit(ddp)
            torch.save(model.state_dict(), out / f"{init}_{kind}_rank{rank}.pt")


if __name__ == "__main__":
    from relora_ds.distributed import run_and_exit

    # No interpreter teardown, where gloo's threads can abort a finished rank (relora_ds.distributed.exit_process),
    # as every other worker; a fresh-clone CI run once timed out on this worker (300 s; where it hung: not known).
    run_and_exit(main)
