"""Checkpoints: DeepSpeed engine state + our client state, switched in atomically.

Layout: ``<output_dir>/checkpoints/step_<N>/`` (DeepSpeed's files, ``config.json`` with the run and model
configs, ``rng_rank<r>.pt`` per rank) and ``<output_dir>/checkpoints/latest`` holding the tag of the last
*complete* checkpoint. ``latest`` is written to a temporary file and renamed only after every rank has
finished writing and flushed its files to stable storage (fsync), so a crash while saving, or a power loss
after it, leaves it pointing at a checkpoint whose files are all there.

What a resume may change and how it loads: ``relora_ds/resume_plan.py``; the conversion to DeepSpeed's universal
checkpoint, for another number of ranks or another engine layout, is in ``relora_ds/universal.py``.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .distributed import failed_ranks, on_rank_zero
from .durable import fsync_path, fsync_tree, replace_durably
from .recovery import replace_recovery_scripts

LATEST = "latest"
REWOUND = "rewound"  # checkpoints after a --resume-from point


def rng_state() -> dict:
    """This rank's generators: python, numpy, torch's CPU one and, on CUDA, its own device's (the one its
    dropout draws from). Not every visible GPU's: a resume may see fewer GPUs per node, or map ranks to
    local devices differently."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_device"] = torch.cuda.get_rng_state()  # the current device's
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif "cuda" in state:  # saved before 2026-12-01: every visible device's; this rank's is its own device's
        device = torch.cuda.current_device()
        if device < len(state["cuda"]):
            torch.cuda.set_rng_state(state["cuda"][device])


def latest_tag(ckpt_dir: Path) -> str | None:
    path = Path(ckpt_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def _write_latest(ckpt_dir: Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` atomically (a rename): a crash leaves the old or the new, never half."""
    replace_durably(tag, Path(ckpt_dir) / LATEST)


@contextlib.contextmanager
def _recording_writes(engine, written: list[Path], failed: list[Exception]):
    """Append to ``written`` each file ``engine.save_checkpoint`` writes through its checkpoint engine (this
    rank's model states and optimizer shard), so that this rank flushes exactly its own: another node's listing
    of a shared directory can miss a file just made (NFS caches lookups). Every path given to the engine's
    save is a file written by the time save_checkpoint returns with DeepSpeed's torch.save engine, the only
    one the DeepSpeed config may select (ds_schema refuses the writers that write later or not at all).

    A write that fails is put in ``failed`` instead of raised, and the writes after it are skipped:
    save_checkpoint goes on to its closing barrier, which the other ranks wait in (raised from the write, the
    error left them there until the launcher's timeout). The caller raises it once save_checkpoint returns.
    So is a failure of rank 0's copy of DeepSpeed's recovery scripts (shutil.copyfile, not the checkpoint
    engine: a full disk failed it after rank 0's shard, and every rank waited out the timeout), of the optimizer's
    state dict (a rank out of host memory: it copies the offloaded moments), and of the copy of an NVMe-offloaded
    optimizer's swap files into the checkpoint (shutil.copytree, which save_checkpoint imports as it runs: files
    the size of the moments, the likeliest to fill a disk). A failure before one of DeepSpeed's own collectives
    inside the save (ZeRO-3's gather of the model states) still leaves the others there."""
    writer = getattr(engine, "checkpoint_engine", None)
    with contextlib.ExitStack() as stack:
        if writer is not None:
            stack.enter_context(_held(writer, "save", failed, record=lambda path: written.append(Path(path))))
        for name in ("_save_zero_checkpoint", "_copy_recovery_script"):  # (the first calls the second on rank 0)
            if hasattr(engine, name):
                stack.enter_context(_held(engine, name, failed))
        if getattr(engine, "zero_nvme_offload_optimizer", lambda: False)():
            stack.enter_context(_held(shutil, "copytree", failed))
        yield


@contextlib.contextmanager
def _held(obj, name: str, failed: list[Exception], record=None):
    """``obj.<name>`` replaced (an instance attribute) by a call that, once ``failed`` holds an error, does
    nothing, and otherwise puts the error it raises in ``failed`` instead of raising it; ``record(path)``
    first, for a writer's ``save(state_dict, path, ...)``. Restored after."""
    real, own = getattr(obj, name), name in getattr(obj, "__dict__", {})

    def held(*args, **kwargs):
        if failed:
            return None
        if record is not None:
            record(args[1] if len(args) > 1 else kwargs["path"])
        try:
            return real(*args, **kwargs)
        except Exception as e:  # every error: the other ranks must hear of it (save's _agreed)
            failed.append(e)
            return None

    setattr(obj, name, held)
    try:
        yield
    finally:
        if own:
            setattr(obj, name, real)
        else:
            delattr(obj, name)  # the class's method again


@contextlib.contextmanager
def _agreed(ckpt_dir: Path, tag: str, part: str):
    """Run the block on every rank, then stop every rank if it failed on any: the rank it failed on raises its
    own error, the others a RuntimeError naming that rank. A rank that raised alone left the others waiting in
    the next collective until the launcher's timeout (NCCL's: 10-30 min), without a word of why. The agreement
    waits for every rank, as the barrier it replaces did. (A KeyboardInterrupt is raised at once: a Ctrl-C
    reaches every rank, and a rank waiting for the others would not stop.)"""
    try:
        yield
    except Exception:  # every error: the other ranks must hear of it
        failed_ranks(True)
        raise
    failed = failed_ranks(False)
    if failed:
        rank = dist.get_rank() if dist.is_initialized() else 0
        who = (f"rank {failed[0]} failed while {part} (its error is in its output)" if len(failed) == 1 else
               f"ranks {', '.join(map(str, failed))} failed while {part} (their errors are in their output)")
        raise RuntimeError(f"rank {rank}: saving checkpoint {Path(ckpt_dir) / tag} stopped: {who}. `latest` still "
                           f"names the last complete checkpoint ({latest_tag(ckpt_dir)}), which --resume loads")


def tag_step(tag: str) -> int:
    """The training step a checkpoint tag (``step_N``) was saved at."""
    prefix, _, number = tag.partition("_")
    if prefix != "step" or not number.isdigit():
        raise ValueError(f"checkpoint tag {tag!r} is not of the form step_N")
    return int(number)


def checkpoint_folders(ckpt_dir: Path) -> list[Path]:
    """The folders in ``ckpt_dir`` named as checkpoints are (``step_N``), complete or not. Anything else there
    (a user's ``cp -r step_8 step_8_backup``) is not the run's to count, resume from or delete."""
    return [p for p in Path(ckpt_dir).glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]


def save(engine, ckpt_dir: Path, step: int, client_state: dict, config: dict, keep_last: int,
         protect: tuple[str, ...] = ()) -> Path:
    """Every rank calls this. Returns the checkpoint directory. Pruning to ``keep_last`` spares the tags in
    ``protect`` (and does not count them). A failure on any rank stops every rank, before `latest` moves
    (:func:`_agreed`)."""
    ckpt_dir = Path(ckpt_dir)
    tag = f"step_{step}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    with _agreed(ckpt_dir, tag, "preparing the folder"):
        if rank == 0:
            _clear_the_way(ckpt_dir, tag)
    with _agreed(ckpt_dir, tag, "writing the checkpoint's files"):
        written, failed = [], []
        try:
            with _recording_writes(engine, written, failed):
                engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
            if failed:
                raise failed[0]
            written.append(ckpt_dir / tag / f"rng_rank{rank}.pt")
            torch.save(rng_state(), written[-1])
            for path in written:  # on disk before any rank marks the folder complete or deletes an older one
                fsync_path(path)
        except (OSError, RuntimeError) as e:  # a full disk reads "basic_ios::clear: iostream error" from torch
            raise _save_failed(ckpt_dir, tag, rank, e) from e
    # Every rank's files are written: only now does config.json mark the folder complete.
    with _agreed(ckpt_dir, tag, "marking the checkpoint complete"):
        if rank == 0:
            replace_recovery_scripts(ckpt_dir, engine)  # DeepSpeed's would export a ReLoRA model wrong (recovery.py)
            # Rank 0 flushes what else is in the folder and its entries, and the folder's own entry in ckpt_dir;
            # the files flushed already cost a system call each (DeepSpeed's recovery scripts lie in ckpt_dir).
            fsync_tree(ckpt_dir / tag)
            fsync_path(ckpt_dir)
            replace_durably(json.dumps(config, indent=2), ckpt_dir / tag / "config.json")
        if os.environ.get("RELORA_TEST_CRASH_IN_SAVE") == str(step):
            os._exit(17)  # tests: die after the files, before `latest` moves (a crash mid-save)
        if rank == 0:
            _write_latest(ckpt_dir, tag)
            _prune_old(ckpt_dir, keep_last, keep=tag, protect=protect)
    return ckpt_dir / tag


def _clear_the_way(ckpt_dir: Path, tag: str) -> None:
    """Rank 0, before any rank writes: remove the folder of ``tag`` a save that crashed left, and make
    ``ckpt_dir`` (DeepSpeed's rank 0 makes it ahead of its first barrier, where a failure would be rank 0's
    alone)."""
    if (ckpt_dir / tag).exists() and latest_tag(ckpt_dir) != tag:
        # Left by a save that crashed (maybe on another number of ranks): its stale shards would sit next
        # to the new ones, and ds_to_universal reads every *_optim_states.pt it finds.
        try:
            shutil.rmtree(ckpt_dir / tag)
        except OSError as e:
            raise RuntimeError(f"saving checkpoint {ckpt_dir / tag}: the folder of that name, left by a save that did "
                               f"not complete, cannot be removed ({type(e).__name__}: {e}); remove it (or make it "
                               f"writable). `latest` still names {latest_tag(ckpt_dir)}, which --resume loads") from e
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _save_failed(ckpt_dir, tag, 0, e) from e


def _save_failed(ckpt_dir: Path, tag: str, rank: int, error: Exception) -> RuntimeError:
    # (a first save's makedirs may be what failed: the nearest folder that exists)
    free = shutil.disk_usage(next(p for p in (ckpt_dir, *ckpt_dir.parents) if p.exists())).free
    return RuntimeError(f"rank {rank}: saving checkpoint {ckpt_dir / tag} failed ({type(error).__name__}: {error}); "
                        f"its file system has {free / 2**20:,.0f} MiB free{' (full?)' if free < 2**30 else ''}. "
                        f"`latest` still names the last complete checkpoint ({latest_tag(ckpt_dir)}), which "
                        "--resume loads")


def _prune_old(ckpt_dir: Path, keep_last: int, keep: str, protect: tuple[str, ...] = ()) -> None:
    """The newest ``keep_last`` complete checkpoints by step up to ``keep`` (the one just saved) stay. A folder
    without config.json is a save that crashed, which no resume can load: it takes no place among them and
    goes too (only when pruning at all, keep_last > 0). A complete one past ``keep`` (a run that died after
    writing it but before moving ``latest``, resumed from an earlier one) is neither counted nor deleted: this
    run replaces it when it saves that step, and ``--resume-from`` can load it meanwhile. Complete ones named
    in ``protect`` (the warm start's last step) are neither counted nor deleted."""
    if keep_last <= 0:
        return
    folders = checkpoint_folders(ckpt_dir)
    complete = sorted((p for p in folders if (p / "config.json").is_file() or p.name == keep),
                      key=lambda p: tag_step(p.name))
    stale = [p for p in folders if p not in complete]
    complete = [p for p in complete if tag_step(p.name) <= tag_step(keep) and p.name not in protect]
    for old in stale + [p for p in complete[:-keep_last] if p.name != keep]:
        # config.json first: a deletion cut short (the job killed) leaves a folder no resume takes for
        # complete, which the next prune removes, not one that still says complete with shards gone.
        try:
            (old / "config.json").unlink(missing_ok=True)
        except OSError:  # a folder made read-only to keep it: left, as rmtree leaves what it cannot delete
            continue
        shutil.rmtree(old, ignore_errors=True)
    # A universal conversion killed mid-way left its folder (universal.make_universal names it) beside them;
    # it is started afresh only when that step converts again, so one of a step now gone would stay for ever.
    for tmp in ckpt_dir.glob(".step_*_universal.tmp"):
        if not (ckpt_dir / tmp.name[1:-len("_universal.tmp")]).is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
    # latest_universal (DeepSpeed's load_checkpoint(dir, load_universal=True) without a tag reads it; make_universal
    # writes it) naming a conversion of a step pruned here would send that load to a missing folder: it goes.
    pointer = ckpt_dir / "latest_universal"
    if pointer.is_file() and not (ckpt_dir / pointer.read_text().strip()).is_dir():
        pointer.unlink(missing_ok=True)


# The param-group kinds of the engines (relora_ds.engines.param_groups; a phase leaves an empty one out): a
# checkpoint of another layout holds its optimizer state in other groups, which DeepSpeed cannot load.
OPTIMIZER_GROUPS = ("lora", "matrices", "vectors")

def complete_tags(ckpt_dir: Path) -> list[str]:
    """The checkpoint tags in ``ckpt_dir`` whose files are all written (config.json comes last), by step."""
    tags = [p.name for p in checkpoint_folders(ckpt_dir) if (p / "config.json").is_file()]
    return sorted(tags, key=tag_step)


def check_complete(ckpt_dir: Path, tag: str, files: bool = True) -> None:
    """The checkpoint a resume will load has its folder and config.json (a folder deleted by hand while
    ``latest`` still names it is named here, not by a FileNotFoundError; files DeepSpeed misses are named
    where it loads them, resume.py), its config.json is JSON, and (``files``) no file of it is cut short
    (:func:`cut_short`). A truncated shard (a disk that filled, a node lost mid-write, a copy interrupted)
    otherwise failed inside DeepSpeed's load on the rank reading it, with torch's "failed finding central
    directory" naming no file, while the other ranks went on. Every rank calls this before any engine exists;
    under a process group rank 0 alone reads the files' ends (W ranks reading W ranks' shards each would be
    W² opens on a shared file system) and its verdict stops every rank."""
    folder = Path(ckpt_dir) / tag
    problem = ("lacks its folder" if not folder.is_dir() else
               "lacks config.json" if not (folder / "config.json").is_file() else None)
    if problem is None:
        try:
            json.loads((folder / "config.json").read_text())
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            problem = f"has a damaged config.json ({e})"
    if problem:
        _refuse(ckpt_dir, tag, problem)
    if files:
        def check_files():
            cut = cut_short(folder)
            if cut:
                _refuse(ckpt_dir, tag, f"has {len(cut)} damaged file(s), cut short: "
                                       f"{', '.join(cut[:5])}{' ...' if len(cut) > 5 else ''}")
        on_rank_zero(check_files) if dist.is_initialized() else check_files()


def cut_short(folder: Path) -> list[str]:
    """The ``.pt`` files under ``folder`` (relative names) whose write was cut short: empty, or a torch.save zip
    archive (it starts with "PK") without the record a zip ends with, read from each file's end. A file in
    torch's legacy format (DeepSpeed's ``checkpoint_serialization: false``: a pickle, no end record to check)
    passes."""
    cut = []
    for path in sorted(folder.rglob("*.pt")):
        with open(path, "rb") as f:
            head = f.read(2)
        if not head or (head == b"PK" and not zipfile.is_zipfile(path)):
            cut.append(str(path.relative_to(folder)))
    return cut


def _refuse(ckpt_dir: Path, tag: str, problem: str) -> None:
    others = [t for t in complete_tags(ckpt_dir) if t != tag]
    raise ValueError(f"checkpoint {Path(ckpt_dir) / tag} (the one to resume from) {problem}; complete checkpoints "
                     f"in {ckpt_dir}: {others or 'none'}" + (": resume from one with --resume-from step_N" if others
                                                            else ": start over with --overwrite"))


def rewind(ckpt_dir: Path, tag: str, later: list[str]) -> list[Path]:
    """Go back to ``tag``: point ``latest`` at it and move the ``later`` checkpoints into ``ckpt_dir/rewound/``
    (kept, out of the way of the saves that will write those steps again; never pruned: delete them when
    done with them). Rank 0 calls this."""
    # `latest` first: a crash while moving leaves it on `tag`, and the next --resume-from moves the rest.
    _write_latest(ckpt_dir, tag)
    moved = []
    for name in later:
        dest = ckpt_dir / REWOUND / name
        n = 1
        while dest.exists():  # rewound twice past the same step: keep both
            dest, n = ckpt_dir / REWOUND / f"{name}.{n}", n + 1
        dest.parent.mkdir(exist_ok=True)
        os.replace(ckpt_dir / name, dest)
        moved.append(dest)
    return moved


def load_config(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((Path(ckpt_dir) / tag / "config.json").read_text())


def load_rng(ckpt_dir: Path, tag: str) -> bool:
    """This rank's RNG state as saved (same world size); whether it was there: a missing file is named, not
    passed over."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = Path(ckpt_dir) / tag / f"rng_rank{rank}.pt"
    if path.is_file():
        set_rng_state(torch.load(path, weights_only=False))
        return True
    warnings.warn(f"{path} is missing: rank {rank} resumes without its saved RNG state (its LoRA dropout masks "
                  "differ from an uninterrupted run's)", RuntimeWarning, stacklevel=2)
    return False


def is_sharded(ckpt_dir: Path, tag: str) -> bool:
    """Whether the checkpoint's optimizer state is split over ranks (ZeRO-1/2/3, DeepSpeed's bf16 optimizer)."""
    return any((Path(ckpt_dir) / tag).glob("*zero_pp_rank_*_optim_states.pt"))


def full_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Every tensor of the model saved in ``<ckpt_dir>/<tag>``, whole, on any world size: trainable
    parameters as their fp32 masters, frozen parameters and buffers in their own dtype.

    - Without ZeRO (stage 0): the module states, which hold the whole model; for a ``mode: full`` run in
      bf16/fp16 (the module states in that dtype), its trainable parameters as the fp32 masters of DeepSpeed's
      FP16 optimizer, from the saved optimizer state (:func:`_stage0_masters`).
    - DeepSpeed's bf16 optimizer (ZeRO-1 with bf16 weights and fp32 gradient accumulation), whose files
      DeepSpeed's zero_to_fp32 cannot read: the module states, with the fp32 masters put together from the
      ranks' partitions (:func:`relora_ds.zero_reset.bf16_optimizer_masters`).
    - ZeRO-1/2/3: DeepSpeed's zero_to_fp32, plus what it leaves out. DeepSpeed saves frozen-parameter
      fragments only where gradients are partitioned (ZeRO-2/3), so at ZeRO-1 the frozen base weights come
      from the module states, which hold them whole there (ZeRO-3 writes per-rank module states instead, and
      zero_to_fp32 has its frozen ones)."""
    src = Path(ckpt_dir) / tag
    module_states = src / "mp_rank_00_model_states.pt"
    states = torch.load(module_states, map_location="cpu", weights_only=False) if module_states.is_file() else {}
    module = states.get("module") or {}
    if not is_sharded(ckpt_dir, tag):
        if not module:
            raise FileNotFoundError(f"{src} holds neither ZeRO optimizer files nor {module_states.name}: "
                                    "not a DeepSpeed checkpoint folder")
        return {**module, **_stage0_masters(src, states)}
    from .zero_reset import bf16_optimizer_masters

    masters = bf16_optimizer_masters(src, {k: v.shape for k, v in module.items()})
    if masters is not None:
        return {**module, **masters}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with globbable(ckpt_dir) as plain:
        state = get_fp32_state_dict_from_zero_checkpoint(str(plain), tag=tag)
    state.update({k: v for k, v in module.items() if k not in state})
    return state


@contextlib.contextmanager
def globbable(ckpt_dir: str | Path):
    """``ckpt_dir``, or where its path holds glob characters (``[ ] * ?``) a link to it with a plain path, for
    DeepSpeed, which finds a checkpoint's files with ``glob.glob(os.path.join(dir, pattern))`` (load_checkpoint,
    zero_to_fp32, ds_to_universal): under "runs [v2]" it found none. The link lives in a temporary directory of
    this process while the block runs; an error raised in the block names ``ckpt_dir`` where it named the link."""
    if not glob.has_magic(str(ckpt_dir)):
        yield Path(ckpt_dir)
        return
    with tempfile.TemporaryDirectory(prefix="relora_ds-ckpt-") as links:
        if glob.has_magic(links):
            raise ValueError(f"the temporary directory {links!r} (TMPDIR) has glob characters ([ ] * ?) in its path, "
                             f"as {str(ckpt_dir)!r} does: set TMPDIR to a directory with a plain path")
        link, target = Path(links) / "checkpoints", Path(ckpt_dir).resolve()
        link.symlink_to(target, target_is_directory=True)
        try:
            yield link
        except Exception as e:  # DeepSpeed's message names the link, gone once it reaches the user: the checkpoint
            e.args = tuple(a.replace(str(link), str(target)) if isinstance(a, str) else a for a in e.args)
            for name in ("filename", "filename2"):  # (an OSError's str names these, not its args)
                if isinstance(getattr(e, name, None), str):
                    setattr(e, name, getattr(e, name).replace(str(link), str(target)))
            raise


def _stage0_masters(src: Path, states: dict) -> dict[str, torch.Tensor]:
    """name -> fp32 master of each trainable parameter of a checkpoint without ZeRO whose optimizer is one of
    DeepSpeed's FP16 optimizers (bf16/fp16 at stage 0: a ``mode: full`` run), from its saved state: FP16_Optimizer's
    flat fp32 group per param group ("fp32_groups_flat"), FP16_UnfusedOptimizer's fp32 copy per parameter
    ("fp32_groups"). Neither names the parameters: they are the engine's param groups
    (relora_ds.engines.param_groups) in order, rebuilt from the checkpoint's model config; each master, rounded
    to 16 bits, must be the saved 16-bit weight, as DeepSpeed copies it after every step. {} for another
    optimizer (at fp32 the module states are the masters)."""
    optimizer = states.get("optimizer") or {}
    saved = optimizer.get("fp32_groups_flat", optimizer.get("fp32_groups"))
    if saved is None:
        return {}
    groups, aliases = _param_group_names(src)
    module = states["module"]
    missing = [name for names in groups for name in names if name not in module]
    if len(groups) != len(saved) or missing:
        raise ValueError(f"{src}: its FP16 optimizer saved {len(saved)} param group(s), the model its config.json "
                         f"describes has {len(groups)} ({[len(g) for g in groups]} parameters)" +
                         (f", {len(missing)} of them not in its module states (e.g. {missing[:3]})" if missing else ""))
    masters = {}
    for i, (names, group) in enumerate(zip(groups, saved)):
        shapes = [module[name].shape for name in names]
        if isinstance(group, torch.Tensor):  # FP16_Optimizer: one flat group, the parameters in order
            if group.numel() != sum(s.numel() for s in shapes):
                raise ValueError(f"{src}: param group {i}'s flat fp32 masters hold {group.numel()} elements, its "
                                 f"parameters in the model config.json describes {sum(s.numel() for s in shapes)}")
            group = [t.view(s) for t, s in zip(group.split([s.numel() for s in shapes]), shapes)]
        elif [t.shape for t in group] != shapes:
            raise ValueError(f"{src}: param group {i}'s fp32 masters have shapes {[tuple(t.shape) for t in group]}, "
                             f"its parameters in the model config.json describes {[tuple(s) for s in shapes]}")
        for name, master in zip(names, group):
            weight = module[name]
            # bit patterns: a NaN weight is its master's rounding too
            if not torch.equal(master.to(weight.dtype).view(torch.int16), weight.view(torch.int16)):
                raise ValueError(f"{src}: the fp32 master taken for {name} does not round to its saved "
                                 f"{weight.dtype} weight: the optimizer state does not match the parameters "
                                 "config.json's model gives; its 16-bit weights alone are torch.load(...)['module']")
            masters.update({alias: master.float() for alias in aliases[name] if alias in module})
    return masters


def _param_group_names(src: Path) -> tuple[list[list[str]], dict[str, list[str]]]:
    """The parameter names in each optimizer param group of the engine that saved ``src`` (a ``mode: full`` run,
    the only one DeepSpeed's stage-0 16-bit optimizers train), from its model built on the meta device; and
    each name's aliases in the module states (a tied lm_head.weight is the embedding)."""
    from .engines import param_groups
    from .model import LlamaForCausalLM
    from .model_config import LlamaConfig

    run = load_config(src.parent, src.name)
    if not isinstance(run.get("model"), dict) or (run.get("train") or {}).get("mode") != "full":
        raise ValueError(f"{src}: an FP16 optimizer's checkpoint without ZeRO whose config.json is not a relora_ds "
                         f"`mode: full` run's (mode {(run.get('train') or {}).get('mode')!r}): its fp32 masters "
                         "cannot be told apart; its 16-bit weights alone are torch.load(...)['module']")
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**run["model"]))
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    return ([[name for name, _ in group] for _, group in param_groups(model)],
            {names[0]: names for names in aliases.values()})
