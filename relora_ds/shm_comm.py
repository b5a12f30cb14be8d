"""DeepSpeed's shared-memory allreduce op on the CPU accelerator (``deepspeed_shm_comm``): the segments it leaves
behind and the folder it loads from.

On the CPU accelerator, when every rank is on one node, DeepSpeed (0.19.8) builds its shared-memory
allreduce at init: rank i creates ``/dev/shm/deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{i}``
(66 MiB: two 1 MiB and two 32 MiB buffers) and maps every other rank's segment. Nothing ever unlinks them
(``shared_close`` is never called), so each run leaves world_size segments behind in RAM; 318 of them filled
21 GB of a 24 GB machine.

Once every rank has mapped every segment (a barrier after init), the names are no longer needed: each rank
unlinks its own. The mappings stay valid, the kernel frees the memory when the last rank exits, and nothing
is left behind even after a crash or ``kill -9``.
"""
from __future__ import annotations

import os
import time
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


def remove_stale_shm_segments(min_age_s: float = 60.0) -> list[Path]:
    """Unlink this user's DeepSpeed allreduce segments that no process maps and that are older than
    ``min_age_s``; return them. A run killed (SIGKILL: no handler runs) between DeepSpeed's ``shm_initialize``,
    which creates and maps them, and :func:`release_shm_segment`, which unlinks them once every rank has mapped
    them, left 66 MiB of RAM per rank until the node rebooted (a kill fuzz hit it). A live start-up maps its own
    from creation on, and a started run's are unlinked already."""
    now = time.time()
    old = []
    for path in SHM_DIR.glob(f"{SHM_PREFIX}_{os.getuid()}_*"):
        try:
            if now - path.stat().st_mtime > min_age_s:
                old.append(path)
        except FileNotFoundError:  # unlinked meanwhile
            continue
    if not old:
        return []
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # gone meanwhile, or another user's
            continue
        mapped.update(line.split(maxsplit=5)[-1] for line in text.splitlines() if SHM_PREFIX in line)
    gone = [path for path in old if str(path) not in mapped]
    for path in gone:
        path.unlink(missing_ok=True)
    return gone


def check_op_build_dir(accelerator) -> None:
    """Every rank's ``deepspeed.init_distributed`` loads DeepSpeed's shared-memory allreduce op (the CPU
    accelerator's; none on CUDA) from TORCH_EXTENSIONS_DIR (default torch's ~/.cache/torch_extensions), building
    it there the first time, unless DeepSpeed was installed with it prebuilt (DS_BUILD_SHM_COMM=1). torch takes
    a lock file in the op's folder even to load a built op: a folder this user cannot write (a shared read-only
    venv's, where scripts/setup_env.sh points it; a read-only home) failed every rank with a PermissionError
    traceback. A ValueError naming the folder and the ways out (init_distributed, and launch/preflight.py)."""
    import deepspeed.ops
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import get_default_build_root

    if accelerator.device_name() != "cpu":  # (the op is the CPU accelerator's)
        return
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False) \
            or installed_ops.get(builder.name, False):  # DeepSpeed's own test (deepspeed/comm/torch.py)
        return
    env = os.environ.get("TORCH_EXTENSIONS_DIR")  # set but empty: torch builds in the working directory
    root = Path(env) if env is not None else Path(get_default_build_root())
    folder = root / builder.name if env is not None else root  # (the default's ops go one level further down)
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # what the lock or the folder goes in
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return
    source = f"TORCH_EXTENSIONS_DIR={env}" if env is not None else "torch's default, TORCH_EXTENSIONS_DIR being unset"
    raise ValueError(f"DeepSpeed's {builder.NAME} op, which every rank loads at start-up, lives in {folder} ({source}),"
                     f" and {existing} is not writable by this user: torch takes a lock file there even to load an "
                     "op built already. Set TORCH_EXTENSIONS_DIR to a directory of your own (e.g. "
                     "${TMPDIR:-/tmp}/torch_extensions_$USER; the first start builds the op there, 20-70 s), or "
                     "install DeepSpeed with the op prebuilt (DS_BUILD_SHM_COMM=1 pip install deepspeed)")
