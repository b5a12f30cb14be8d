"""Process-group start-up: ``deepspeed.init_distributed`` plus the clean-up DeepSpeed leaves undone.

On the CPU accelerator, when every rank is on one node, DeepSpeed (0.19.8) builds its shared-memory
allreduce at init: rank i creates ``/dev/shm/deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{i}``
(about 66 MB) and maps every other rank's segment. Nothing ever unlinks them (``shared_close`` is never
called), so each run leaves world_size segments behind in RAM; 318 of them filled 21 GB of a 24 GB machine.

Once every rank has mapped every segment (a barrier after init), the names are no longer needed: each rank
unlinks its own. The mappings stay valid, the kernel frees the memory when the last rank exits, and nothing
is left behind even after a crash or ``kill -9``.
"""
from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"  # SHM_BUFFER_NAME in deepspeed/ops/csrc/cpu/comm/shm.cpp


def shm_segment_path(rank: int) -> Path:
    """The segment DeepSpeed's ``shm_initialize`` creates for ``rank`` (same format string as shm.cpp)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_segment() -> Path | None:
    """Unlink this rank's DeepSpeed shared-memory allreduce segment; return its path if there was one.

    Collective: every rank must call it (the barrier makes sure all ranks have mapped all segments before
    any name disappears; a rank still in ``shm_initialize`` would otherwise wait forever for it)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    if dist.get_world_size() > 1:
        dist.barrier()
    # A single process too: started by the deepspeed launcher (--num_gpus 1) it creates its segment as well.
    path = shm_segment_path(dist.get_rank())
    try:
        path.unlink()
    except FileNotFoundError:
        return None  # GPU accelerator, ranks on several nodes, or a DeepSpeed without the shm op
    return path


# Set by torchrun/deepspeed (RANK...), mpirun (OMPI_/PMI_/PMIX_/MV2_) or the user (MASTER_PORT).
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK",
                  "MV2_COMM_WORLD_SIZE")


def pick_port_for_a_single_process() -> int | None:
    """Plain ``python launch/train.py``, no launcher: set MASTER_PORT to a free port (and return it), so a
    second single-process run on the machine does not fail on DeepSpeed's default 29500 (EADDRINUSE)."""
    if any(k in os.environ for k in _LAUNCHER_VARS):
        return None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["MASTER_PORT"] = str(port)
    return port


def init_distributed(**kwargs) -> None:
    """``deepspeed.init_distributed(**kwargs)``, then release the shared-memory segment it leaks on CPU."""
    import deepspeed

    deepspeed.init_distributed(**kwargs)
    release_shm_segment()
