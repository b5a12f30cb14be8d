"""One of two ranks (tests/test_checkpoint_agree.py): checkpoint.save with a real DeepSpeed engine (ZeRO-1) saves
step_1, then step_2 with one rank's part of it failing (argv: the checkpoints folder, the failure, the process
group's timeout in seconds). Each rank prints how long its step_2 save took and how it ended, and exits with
its error (status 1) once every rank's save has ended."""
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from relora_ds import checkpoint
from relora_ds.distributed import init_distributed, run_and_exit
from relora_ds.durable import replace_durably
from tiny_engine import tiny_engine, tiny_llama  # tests/dist, this script's folder


def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


def read_only(path, *args, **kwargs):
    raise PermissionError(13, "Permission denied", str(path))


def failing_on(name: str, real):
    """``real`` (a writer taking the path second), failing for a file of that name."""
    return lambda obj, path, *args, **kwargs: (no_space() if Path(path).name == name else
                                               real(obj, path, *args, **kwargs))


def host_out_of_memory(*args, **kwargs):  # torch's own words for a CPU allocation that failed
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried "
                       "to allocate 1073741824 bytes.")


def arm(failure: str, rank: int, ckpt_dir: Path, engine) -> None:
    """Where the failure strikes (the rank it fails on, in order of the save's parts)."""
    if failure == "stale" and rank == 0:  # before any rank writes: a crashed save's step_2, which cannot go
        (ckpt_dir / "step_2").mkdir()
        (ckpt_dir / "step_2" / "zero_pp_rank_3_mp_rank_00_optim_states.pt").write_bytes(b"stale, of 4 ranks")
        checkpoint.shutil.rmtree = read_only  # (chmod keeps no folder from root, which the tests may run as)
    elif failure == "shard" and rank == 1:  # inside DeepSpeed's save_checkpoint, before its closing barrier
        torch.save = failing_on("zero_pp_rank_1_mp_rank_00_optim_states.pt", torch.save)
    elif failure == "optimizer" and rank == 1:  # DeepSpeed's optimizer.state_dict(), out of host memory
        engine.optimizer.state_dict = host_out_of_memory
    elif failure == "nvme" and rank == 1:  # the copy of an NVMe-offloaded optimizer's swap files (a stand-in
        # swapper: DeepSpeed's save copies its folder with shutil.copytree, which fills the disk)
        swap = ckpt_dir.parent / "swap1"
        swap.mkdir()
        (swap / "moments.tensor.swp").write_bytes(bytes(64))
        engine.zero_nvme_offload_optimizer = lambda: True
        engine.optimizer.optimizer_swapper = SimpleNamespace(swap_folder=str(swap))
        shutil.copytree = no_space
    elif failure == "scripts" and rank == 0:  # DeepSpeed's copy of its recovery scripts (shutil, not its writer)
        import deepspeed.runtime.engine
        deepspeed.runtime.engine.copyfile = no_space  # (engine.py's own name for shutil.copyfile)
    elif failure == "rng" and rank == 1:  # after DeepSpeed's save
        torch.save = failing_on("rng_rank1.pt", torch.save)
    elif failure == "config" and rank == 0:  # after every rank's files
        checkpoint.replace_durably = lambda text, path: (no_space() if path.name == "config.json" else
                                                         replace_durably(text, path))


def main():
    ckpt_dir, failure, timeout = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    init_distributed(timeout=timedelta(seconds=timeout))
    rank = dist.get_rank()
    engine = tiny_engine(tiny_llama(), stage=1)
    x = torch.randint(0, 128, (1, 9))
    engine.backward(engine(x, labels=x).loss)
    engine.step()
    checkpoint.save(engine, ckpt_dir, 1, {}, {"step": 1}, keep_last=0)
    arm(failure, rank, ckpt_dir, engine)
    start = time.monotonic()
    try:
        checkpoint.save(engine, ckpt_dir, 2, {}, {"step": 2}, keep_last=0)
    except Exception as e:
        print(f"rank {rank} stopped after {time.monotonic() - start:.1f} s: {type(e).__name__}: {e}", flush=True)
        raise
    finally:
        live_until_every_rank_ended(ckpt_dir.parent, rank, dist.get_world_size(), timeout + 15)
    print(f"rank {rank} saved step_2 in {time.monotonic() - start:.1f} s", flush=True)
    return 0


def live_until_every_rank_ended(folder: Path, rank: int, world: int, limit: float) -> None:
    """Each rank's process lives on until every rank's save has ended (told by files, not a collective): under
    gloo a rank's exit closes its connections and the others' pending collective fails at once ("Connection
    closed by peer"), which NCCL does not do: a GPU rank waits in it until the process group's timeout."""
    (folder / f"rank{rank}.ended").touch()
    deadline = time.monotonic() + limit
    while not all((folder / f"rank{r}.ended").exists() for r in range(world)) and time.monotonic() < deadline:
        time.sleep(0.1)


if __name__ == "__main__":
    run_and_exit(main)
