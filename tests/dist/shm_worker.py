"""2-rank check of relora_ds.shm_comm.release_shm_segment against DeepSpeed's own shared-memory allreduce.

Records whether the segment names we predict exist right after ``deepspeed.init_distributed`` (so a change of
DeepSpeed's naming scheme fails the test instead of silently leaking again), releases them, and then runs
DeepSpeed's shm allreduce kernel to show the mappings still work with the names gone.
"""
import argparse
import json
import os

import deepspeed
import torch
import torch.distributed as dist

from relora_ds.distributed import run_and_exit
from relora_ds.shm_comm import release_shm_segment, shm_segment_path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    res = {"paths": [str(shm_segment_path(r)) for r in range(world)]}
    res["exist_after_init"] = [shm_segment_path(r).exists() for r in range(world)]
    dist.barrier()  # every rank has looked before any rank unlinks
    res["released"] = str(release_shm_segment())
    dist.barrier()
    res["exist_after_release"] = [shm_segment_path(r).exists() for r in range(world)]
    # DeepSpeed's shm kernel (not gloo) through the unlinked segments: a small and a chunked (> 32 MB) tensor.
    # (Only where DeepSpeed built the shm allreduce: a plain single process has none, and its kernel crashes.)
    res["shm_kernel"] = all(res["exist_after_init"]) and hasattr(torch.ops, "deepspeed") and \
        hasattr(torch.ops.deepspeed, "inference_all_reduce_")
    res["allreduce_ok"] = []
    for n in (1000, 9_000_001):
        x = (torch.arange(n) % 997).float() * (rank + 1)
        want = (torch.arange(n) % 997).float() * sum(r + 1 for r in range(world))
        got = torch.ops.deepspeed.inference_all_reduce_(x) if res["shm_kernel"] else dist.all_reduce(x) or x
        res["allreduce_ok"].append(bool(torch.equal(got, want)))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()


if __name__ == "__main__":
    run_and_exit(main)  # no interpreter teardown: there gloo's threads can abort a finished rank (-6)
