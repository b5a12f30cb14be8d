"""Process-group start-up: ``deepspeed.init_distributed`` plus the clean-up DeepSpeed leaves undone (its
CPU shared-memory allreduce segments: relora_ds/shm_comm.py).

``exit_process`` ends a rank without the interpreter's teardown, where gloo's threads can abort it.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import traceback
import warnings
from typing import Callable, NoReturn

from .shm_comm import SHM_DIR, check_op_build_dir, release_shm_segment, remove_stale_shm_segments

# (rank, world size) variables of torchrun/deepspeed, then of mpirun: Open MPI, MPICH/PMIx, MVAPICH.
_RANK_VARS = (("RANK", "WORLD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
              ("PMIX_RANK", "PMIX_SIZE"), ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"))
_LAUNCHER_VARS = tuple(v for pair in _RANK_VARS for v in pair)
_MPI_VARS = _LAUNCHER_VARS[2:]


def single_process_environment() -> int | None:
    """Plain ``python launch/train.py``, no launcher (and not one of several SLURM tasks): the environment of
    a one-rank world (RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR=127.0.0.1), so that DeepSpeed does not
    try MPI discovery (mpi4py is an optional extra: a traceback without it), and a free MASTER_PORT unless one
    is set, so that a second single-process run on the machine does not fail on DeepSpeed's default 29500
    (EADDRINUSE). Returns the port it picked (None: a launcher's process, or the user's port).

    A LOCAL_RANK other than 0 is an error, as ``--local_rank`` is in the same case (train_args.check_local_rank_arg):
    it was replaced by 0 without a word, so ``LOCAL_RANK=3 python launch/train.py`` ran on the first GPU."""
    if launched_ranks() is not None:
        return None
    local = os.environ.get("LOCAL_RANK", "")
    if local not in ("", "0"):
        raise ValueError(f"LOCAL_RANK={local} but no launcher started this process (no RANK/WORLD_SIZE): started by "
                         "hand, one process is rank 0 on the first visible GPU; choose the GPU with "
                         "CUDA_VISIBLE_DEVICES instead, or start the ranks with a launcher (deepspeed, torchrun, srun "
                         "through launch/slurm/rank_env.sh), which sets RANK, WORLD_SIZE and LOCAL_RANK together")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" in os.environ:
        return None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["MASTER_PORT"] = str(port)
    return port


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def launched_ranks() -> int | None:
    """How many processes a launcher started together, None for a process started alone: RANK/WORLD_SIZE
    (torchrun, deepspeed; any size), an MPI launcher's world size when above 1 (Slurm's pmi2/pmix plugins
    give a one-task step PMI variables too), PMIx's rank without a size (the Slurm step's task count, else
    unknown: 0), and a Slurm step of several tasks (``SLURM_STEP_NUM_TASKS``; ``SLURM_NTASKS`` is set in the
    salloc/sbatch shell as well, where plain ``python`` is one process)."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return _int_env("WORLD_SIZE") or 0
    for size in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        if (_int_env(size) or 0) > 1:
            return _int_env(size)
    step = _int_env("SLURM_STEP_NUM_TASKS") or 1
    if "PMIX_RANK" in os.environ and "SLURM_STEP_NUM_TASKS" not in os.environ:
        return 0  # PMIx outside Slurm (prterun): the size is the MPI library's to say
    return step if step > 1 else None


def launch_rank() -> tuple[int, int]:
    """(rank, world size) as the launcher's environment says, before any process group exists: torchrun's and
    deepspeed's RANK/WORLD_SIZE, else Open MPI's, MPICH's/PMIx's, MVAPICH's or SLURM's own (a step's tasks);
    (0, 1) with none. PMIx sets no size: under ``srun --mpi=pmix`` the step's task count is it."""
    for rank, world in (*_RANK_VARS, ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")):
        if os.environ.get(rank, "").isdigit():
            size = next((os.environ[v] for v in (world, "SLURM_STEP_NUM_TASKS") if os.environ.get(v, "").isdigit()),
                        "1")
            return int(os.environ[rank]), int(size)
    return 0, 1


def agree_on_master_port() -> str | None:
    """Under mpirun with no RANK (DeepSpeed's MPI discovery ahead): every rank takes rank 0's MASTER_PORT.
    DeepSpeed broadcasts rank 0's address but each rank passes its own environment's port, and mpirun does
    not forward the environment to other nodes (Open MPI without -x): remote ranks used 29500 while rank 0
    listened on the port set for the job. Returns the port set (None: not an MPI-discovered run)."""
    if "RANK" in os.environ or not any(k in os.environ for k in _MPI_VARS):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None  # init_distributed names the missing mpi4py
    port = MPI.COMM_WORLD.bcast(os.environ.get("MASTER_PORT"), root=0)
    if port is None:
        os.environ.pop("MASTER_PORT", None)
    else:
        os.environ["MASTER_PORT"] = port
    return port


def init_distributed(**kwargs) -> None:
    """``deepspeed.init_distributed(**kwargs)``, then release the shared-memory segment it leaks on CPU. Also
    spares the rank DeepSpeed's import of torch's compiler and its repeated CPU queries (relora_ds/ds_patches.py,
    items 5 and 7), and has fp16 steps raise the loss scale after the update, not before (item 8)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from .ds_patches import import_muon_compiling_on_first_call, memoize_cpu_info, raise_loss_scale_after_step

    import_muon_compiling_on_first_call()
    memoize_cpu_info()
    raise_loss_scale_after_step()
    accelerator = get_accelerator()
    # Before DeepSpeed's init, which passes device_id=cuda:LOCAL_RANK to torch (its own, less helpful error).
    if accelerator.device_name() == "cuda" and "LOCAL_RANK" in os.environ:
        _check_local_rank(int(os.environ["LOCAL_RANK"]), accelerator.device_count())
    launched = launched_ranks()
    _check_launcher_env()
    if kwargs.get("auto_mpi_discovery", True):
        _warn_master_addr_replaced()
    if os.environ.get("LOCAL_RANK", "0") == "0" and SHM_DIR.is_dir():  # one rank a node
        remove_stale_shm_segments()
    import torch.distributed as dist

    check_op_build_dir(accelerator)
    try:
        deepspeed.init_distributed(**kwargs)
    except ModuleNotFoundError as e:  # DeepSpeed's MPI discovery, the only way left to it, needs mpi4py
        if e.name != "mpi4py":
            raise
        raise ValueError("no launcher environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and "
                         "mpi4py is not installed for DeepSpeed's MPI discovery: start the ranks with deepspeed, "
                         "torchrun, srun through launch/slurm/rank_env.sh (or the sbatch scripts), or install "
                         "mpi4py (pip install -e '.[mpi]') for mpirun/srun --mpi") from None
    except dist.DistNetworkError as e:  # rank 0's TCPStore could not listen: a traceback on every such start
        if "EADDRINUSE" not in str(e):
            raise
        import socket

        raise ValueError(f"MASTER_PORT={os.environ.get('MASTER_PORT')} is already in use on this host "
                         f"({socket.gethostname()}), where rank 0 listens for the other ranks: another run on this "
                         "node holds it, or a second process was started as RANK=0. Give this run a free port: "
                         "deepspeed --master_port N, torchrun --master-port N, else MASTER_PORT=N (srun, the sbatch "
                         "scripts, mpirun)") from None
    release_shm_segment()

    world = dist.get_world_size() if dist.is_initialized() else None
    if launched and world is not None and world != launched:
        # srun without launch/slurm/rank_env.sh or an MPI plugin that mpi4py's MPI speaks: each task's MPI
        # discovery found a world of itself, and each would train alone (or clash on MASTER_PORT).
        raise ValueError(f"the launcher started {launched} processes but this one joined a world of {world}: the "
                         "ranks did not find each other. Under srun start them through launch/slurm/rank_env.sh "
                         "(or the sbatch scripts), or give srun the MPI plugin of the MPI mpi4py loads "
                         "(srun --mpi=pmix / pmi2); under mpirun use the mpirun of that MPI")
    if accelerator.device_name() == "cuda":  # this rank's GPU from the start: NCCL collectives before the engine
        local = int(os.environ.get("LOCAL_RANK", 0))
        _check_local_rank(local, accelerator.device_count())
        accelerator.set_device(local)
    if world is not None and kwargs.get("timeout") is not None:
        _timed_world_clone(world, kwargs["timeout"])


def _timed_world_clone(world: int, timeout) -> None:
    """DeepSpeed runs ZeRO's collectives (gradient reduce-scatter, parameter all-gathers, safe_get_full_*) on a
    clone of the world group, made by ``dist.new_group(ranks)`` with torch's default timeout (NCCL 10 min,
    gloo 30), not the one given to init_distributed: make that clone now, with the run's timeout."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    if getattr(groups, "_WORLD_GROUP", "missing") is None:  # not cloned yet (a DeepSpeed that keeps no clone: skip)
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(world)), timeout=timeout)


def _check_launcher_env() -> None:
    """DeepSpeed takes the launcher's environment only when all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT are set; otherwise it runs MPI discovery, which with mpi4py installed overwrites RANK and
    WORLD_SIZE with a world of one. Name what a launcher that sets some of them (Kubeflow's PyTorchJob without
    torchrun: no LOCAL_RANK; a script that exports RANK alone) left out."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    given = [n for n in names if n in os.environ]
    # Either of RANK and WORLD_SIZE makes a launcher's process (launched_ranks): RANK without WORLD_SIZE fell to
    # DeepSpeed's MPI discovery too (with mpi4py: rank 0 of a world of one; without: an error blaming mpi4py).
    if ("RANK" in os.environ or "WORLD_SIZE" in os.environ) and len(given) < len(names):
        missing = [n for n in names if n not in os.environ]
        hint = (" (LOCAL_RANK: this process's index on its node, e.g. SLURM_LOCALID)" if "LOCAL_RANK" in missing
                else "")
        raise ValueError(f"the launcher set {', '.join(given)} but not {', '.join(missing)}: DeepSpeed needs all of "
                         f"{', '.join(names)} (else it falls back to MPI discovery). "
                         f"Set {' and '.join(missing)}{hint}, or start the ranks with deepspeed or torchrun, which set "
                         "them all")
    # More processes than ranks: a RANK/WORLD_SIZE left in the shell (an earlier job's, a notebook's) wins over
    # mpirun's or srun's own, and the processes take the same ranks (each a world of its own at WORLD_SIZE=1).
    # Fewer is a launcher per node (srun or mpirun starting torchrun or deepspeed on each), as it should be. A
    # per-node launcher's RANK/WORLD_SIZE are its own (torchrun sets TORCHELASTIC_RUN_ID, deepspeed CROSS_RANK),
    # whatever the step around it: `srun -n 8 --pty bash` then torchrun on 2 GPUs, each task of `srun -n 4
    # deepspeed --num_gpus 1 ...` a run of its own.
    launcher = "TORCHELASTIC_RUN_ID" in os.environ or "CROSS_RANK" in os.environ
    world = None if launcher else _int_env("WORLD_SIZE")
    for size in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        started = _int_env(size)
        if world is not None and started is not None and started > world:
            raise ValueError(f"WORLD_SIZE={world} (RANK={os.environ.get('RANK')}) but the launcher started "
                             f"{started} processes ({size}={started}): some would share a rank. RANK and WORLD_SIZE "
                             "set in the shell before mpirun/srun (an earlier job's, a notebook's?) win over the "
                             "launcher's: unset RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT there, or "
                             "set them per process from the launcher's (launch/slurm/rank_env.sh; README, \"MPI\")")


def _warn_master_addr_replaced() -> None:
    """DeepSpeed runs MPI discovery when any of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT is
    missing, and it replaces MASTER_ADDR with rank 0's first ``hostname -I`` address (deepspeed/comm/comm.py,
    mpi_discovery, 0.19.8): a MASTER_ADDR given to mpirun alone, to pick the training network, was dropped
    without a word (and where that first address is unreachable the ranks wait in rendezvous until the
    timeout). Said before the rendezvous, which may never end. MASTER_PORT is kept (agree_on_master_port)."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    if os.environ.get("MASTER_ADDR") and not all(n in os.environ for n in names):
        from .train_config import ConfigWarning

        warnings.warn(f"MASTER_ADDR={os.environ['MASTER_ADDR']} is not used: without RANK, WORLD_SIZE and LOCAL_RANK "
                      "(mpirun, srun --mpi) DeepSpeed's MPI discovery replaces it with rank 0's first `hostname -I` "
                      "address. To choose the address, start each rank with all five of RANK, WORLD_SIZE, LOCAL_RANK, "
                      "MASTER_ADDR, MASTER_PORT set (a wrapper exporting RANK=$OMPI_COMM_WORLD_RANK or $PMI_RANK ...: "
                      "README, \"MPI\")", ConfigWarning, stacklevel=3)


def _check_local_rank(local: int, count: int) -> None:
    if local >= count:
        raise ValueError(f"LOCAL_RANK={local} but this process sees {count} GPU(s) (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most {count} rank(s) per "
                         "node, each with all of the node's GPUs visible (under SLURM: --ntasks-per-node equal "
                         "to --gpus-per-node, no --gpus-per-task or --gpu-bind)")


def on_rank_zero(fn: Callable, *args) -> None:
    """``fn(*args)`` on rank 0 while the other ranks wait; an error there stops every rank (rank 0 raises
    it, the others a RuntimeError, or a ValueError when rank 0's was one) instead of leaving them blocked at
    the next collective."""
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    error = None
    if dist.get_rank() == 0:
        try:
            fn(*args)
        except Exception as e:  # every error: the other ranks must hear of it
            error = e
    device = get_accelerator().current_device_name()  # NCCL: this rank's GPU (set by init_distributed)
    # 0: fine; 1: an error; 2: a ValueError (bad input: the other ranks report it as one too, no traceback)
    failed = torch.tensor([0.0 if error is None else 2.0 if isinstance(error, ValueError) else 1.0], device=device)
    dist.all_reduce(failed)
    if error is not None:
        raise error
    if failed.item():
        kind = ValueError if failed.item() == 2 else RuntimeError
        raise kind(f"rank 0 failed in {getattr(fn, '__name__', fn)} (its error is in its output); "
                   f"rank {dist.get_rank()} stops too")


def failed_ranks(failed: bool) -> list[int]:
    """The ranks that passed ``failed=True``, in order, the same list on every rank (a collective: every rank
    calls it); ``[0]`` or ``[]`` without a process group. One all-reduce of world-size floats: it waits for
    every rank as a barrier does, at about a barrier's cost."""
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized():
        return [0] if failed else []
    flags = torch.zeros(dist.get_world_size(), device=get_accelerator().current_device_name())
    flags[dist.get_rank()] = float(failed)
    dist.all_reduce(flags)
    return flags.nonzero().flatten().tolist()


def max_over_ranks(value: float) -> float:
    """The largest of every rank's ``value`` (a collective: every rank calls it); ``value`` itself without
    a process group. Peak memory is the busiest rank's, not rank 0's."""
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=get_accelerator().current_device_name())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def agreement(value: str | None) -> tuple[bool, bool]:
    """(whether some rank has no ``value``, whether the ranks' values differ), comparing a 48-bit hash of
    each rank's string through max_over_ranks (a collective: every rank calls it); ``(value is None, False)``
    without a process group. Every rank gets the same answer, so every rank can stop on it."""
    import hashlib

    # 48 bits: exact in max_over_ranks' float64. Equal hashes iff the largest equals the smallest.
    h = 0.0 if value is None else float(1 + int.from_bytes(hashlib.blake2b(value.encode(), digest_size=6).digest(),
                                                           "little"))
    missing = max_over_ranks(float(value is None)) > 0
    return missing, max_over_ranks(h) != -max_over_ranks(-h)


def exit_process(code: int = 0) -> NoReturn:
    """End this process with ``code``: shut the process group down, then do what the interpreter's exit
    would (join non-daemon threads, run the ``atexit`` handlers, finalize MPI, flush stdout/stderr) and
    ``os._exit`` instead of its teardown.

    Why: gloo runs each collective on a worker thread, and a barrier keeps (weak) references to the
    collectives still queued when it was issued. Whichever thread drops the last reference destroys them,
    and the output tensors they hold need the GIL to be freed. When that thread is a gloo worker and the
    main thread has already begun ``Py_FinalizeEx``, CPython ends the worker with ``pthread_exit`` inside a
    noexcept C++ destructor and the rank aborts ("terminate called without an active exception", exit -6)
    after all its work is done. A core dump of ``tests/dist/int8_worker.py`` showed exactly this (3 aborts in
    about 90 2-rank CPU runs). ``destroy_process_group`` does not stop those threads while DeepSpeed still
    holds the group, so only skipping the teardown removes the race. Files the program left open are not
    flushed: close them first (the trainer closes its metrics; ``logging`` flushes in its atexit handler).
    mpi4py finalizes MPI from ``Py_AtExit``, which ``os._exit`` skips, so MPI is finalized here (under
    ``mpirun`` DeepSpeed finds the ranks through mpi4py; MPI requires every process to finalize before it
    exits, and mpich otherwise leaves its /dev/shm segment behind); a rank exiting with a non-zero ``code``
    among others aborts the MPI job with it instead (``MPI_Abort``: mpirun stops every rank and reports it).
    An error in any of these steps is printed and makes a zero ``code`` 1; an ``atexit`` handler's own error
    is printed and ignored, as at a normal exit.
    """
    def attempt(step) -> None:
        nonlocal code
        try:
            step()
        except BaseException:  # report it, keep shutting down
            traceback.print_exc()
            code = code or 1

    def destroy_group() -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def finalize_mpi() -> None:
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            world = getattr(mpi, "COMM_WORLD", None)
            if code and world is not None and world.Get_size() > 1:
                # A failing rank aborts the job: MPI_Finalize waits for every other rank (MPICH), which trained
                # on into their next collective, and mpirun then often reported 0 (a review: rc 0 in 2 of 3 runs)
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except (AttributeError, OSError, ValueError):
                        pass
                world.Abort(code)
            mpi.Finalize()

    attempt(destroy_group)
    attempt(threading._shutdown)  # a normal exit's first step: joins non-daemon threads (concurrent.futures...)
    attempt(atexit._run_exitfuncs)  # then logging.shutdown, multiprocessing's joins, ...
    attempt(finalize_mpi)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # replaced or closed by the program
            pass
    os._exit(code)


def run_and_exit(main: Callable[[], int | None]) -> NoReturn:
    """``exit_process(main())`` also when ``main`` raises: the traceback is printed as Python would, and
    the status is 1 (or ``SystemExit``'s code, e.g. argparse's 2), never the teardown's abort."""
    try:
        code = main()
    except SystemExit as e:  # sys.exit / argparse: its code, or its message and 1
        if e.code is None or isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_process(code or 0)
