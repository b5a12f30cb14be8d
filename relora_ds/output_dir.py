"""A run's output_dir: refused where it holds another run (or would delete this run's own input), locked by rank
0 while the run lives (a second run there is refused, naming the holder), and seen by every rank (node-local disks
are refused: each rank writes its checkpoint shards there and a resume reads them all back)."""
from __future__ import annotations

import datetime
import errno
import fcntl
import os
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path

from .train_config import ConfigWarning, TrainConfig


def check_output_dir(cfg: TrainConfig) -> None:
    """A new run (no --resume) in an output_dir that holds another run's checkpoints or metrics would mix
    the two (metrics appended, old checkpoints kept beside new ones): refuse, naming the ways out. With
    --overwrite, refuse an input of this run that lies inside what would be deleted."""
    out = Path(cfg.output_dir)
    existing = next(p for p in (out, *out.parents) if p.exists())  # out itself, or what would hold it
    if not existing.is_dir():
        raise ValueError(f"output_dir {out}: {existing} exists and is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir {out}: {existing} is not writable by this user; pick another --output-dir")
    found = [p.name for p in (out / "checkpoints" / "latest", out / "metrics.jsonl") if p.is_file()]
    if found and not cfg.resume and not cfg.overwrite:
        raise ValueError(f"output_dir {out} holds a run ({', '.join(found)}): pass --resume to continue it, "
                         "--overwrite to start over there (its checkpoints, metrics, TensorBoard logs and "
                         "export are deleted), or another --output-dir")
    if cfg.overwrite:  # what --overwrite deletes must not be this run's own input
        for name in ("hf_model", "warm_start_from", "data_dir"):
            src = getattr(cfg, name)
            if src and out.resolve() in (Path(src).resolve(), *Path(src).resolve().parents):
                raise ValueError(f"{name}={src} lies inside output_dir {out}, which --overwrite deletes: copy "
                                 "it elsewhere first, or pick another --output-dir")
    for name in ("hf_model", "warm_start_from"):  # the export reads the source's config and tokenizer files
        src = getattr(cfg, name)
        if cfg.export and src and Path(src).resolve() == (out / "hf").resolve():
            raise ValueError(f"{name}={src} is this run's export directory ({out / 'hf'}, written at its end with "
                             "export: true): copy it elsewhere first, pick another --output-dir, or --no-export")


LOCK_FILE = ".lock"
_HELD: dict[Path, object] = {}  # this process's locks: a second Trainer here (a notebook) takes the same one


def lock_output_dir(out: Path):
    """Rank 0's exclusive lock on ``output_dir`` until :func:`unlock_output_dir` or the process ends (an open
    file: the kernel drops the lock however the process ends). A second run there -- e.g. a ``--resume``
    while the first still trains -- would interleave its metrics and checkpoints with the first's, so it is
    refused, naming the holder. On a file system without ``flock`` (some NFS/Lustre mounts) a warning."""
    path = (out / LOCK_FILE).resolve()
    if path in _HELD:
        return _HELD[path]
    try:
        out.resolve().mkdir(parents=True, exist_ok=True)  # a symlink to a folder not made yet: its target
        f = open(path, "a+")
    except OSError as e:  # read-only or immutable (root passes os.access), a full disk, ...
        raise ValueError(f"output_dir {out}: cannot create {path} ({e.strerror}); pick another --output-dir") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):  # EWOULDBLOCK is EAGAIN on Linux
            warnings.warn(f"cannot lock output_dir {out} ({e.strerror}): nothing stops a second run from "
                          "writing there while this one runs", ConfigWarning, stacklevel=2)
            return _write_holder(path, f)  # unlocked, but the other ranks still read it
        f.seek(0)
        holder = f.read().strip() or "holder unknown"
        f.close()
        raise ValueError(f"output_dir {out} is in use by a run still going ({holder}): two runs would "
                         "interleave their metrics and checkpoints. Stop that run first (SIGTERM to that pid, "
                         "its rank 0, stops every rank after a checkpoint; SIGTERM to the `deepspeed` command "
                         "alone leaves the ranks running), or pick another --output-dir. If that process is "
                         f"gone (its node crashed, on NFS), delete {path}") from None
    return _write_holder(path, f)


def _write_holder(path: Path, f):
    """Who holds the lock file ``f`` at ``path``: this host, pid and time (named to a second run, and read by
    every rank: check_shared_output_dir)."""
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}, "
            f"since {datetime.datetime.now().isoformat(timespec='seconds')}\n")
    f.flush()
    os.fsync(f.fileno())  # to the server of a network file system, where the other nodes read it
    _HELD[path] = f
    return f


def check_shared_output_dir(out: Path, rank: int, world: int, tries: int = 31, pause_s: float = 3.0) -> None:
    """Every rank must see the ``output_dir`` rank 0 locked: each rank writes its checkpoint shards there, and
    a resume plans from what rank 0 wrote (``latest``, config.json) and loads every shard. On node-local disks
    the ranks of other nodes would find no checkpoint, start from step 0 while rank 0 resumes, and fail later
    in a mismatched collective. Compares what each rank reads of rank 0's lock file (host, pid, start time)
    through ``agreement``, up to ``tries`` times ``pause_s`` apart (90 s: an NFS client may cache a lookup of
    the directory before rank 0 made it, for up to a minute; each try lists the parent, which revalidates it;
    the same count on every rank, so the collectives match); then a ValueError on every rank."""
    from .distributed import agreement

    if world == 1:
        return
    for attempt in range(tries):
        try:
            os.listdir(out.parent)  # (an NFS directory's attributes, and what it holds, looked up afresh)
            text = (out / LOCK_FILE).read_text() or None
        except OSError:
            text = None
        missing, differ = agreement(text)
        if not (missing or differ):
            return
        if attempt + 1 < tries:
            time.sleep(pause_s)
    who = (f"rank {rank} on {socket.gethostname()} cannot see rank 0's {LOCK_FILE} there" if text is None else
           f"another rank cannot see rank 0's {LOCK_FILE} there, or reads another")
    raise ValueError(f"output_dir {out} is not one directory shared by every rank ({who}; waited "
                     f"{(tries - 1) * pause_s:g} s; every rank stops): each rank writes its checkpoint shards there and a "
                     "resume reads them all back. Put --output-dir on a file system every node mounts (NFS, "
                     "Lustre, ...) at the same path")


def holds_output_dir_lock(out: Path) -> bool:
    """Whether this process holds ``output_dir``'s lock (lock_output_dir then hands back the held one)."""
    return (Path(out) / LOCK_FILE).resolve() in _HELD


def unlock_output_dir(out: Path) -> None:
    """Release this process's lock on ``output_dir`` (none held: nothing to do)."""
    f = _HELD.pop((Path(out) / LOCK_FILE).resolve(), None)
    if f is not None:  # the holder's line goes first: a pid left there would name a run that is gone
        f.seek(0)
        f.truncate()
        f.close()  # closing the file drops the flock


def clear_previous_run(out: Path, names: tuple[str, ...]) -> None:
    """--overwrite: delete ``names`` in ``out`` (files or folders). A folder that is a symlink (checkpoints on a
    scratch disk) is emptied and stays; what cannot be deleted (a read-only checkpoint kept on purpose) is named
    in a ValueError, before any step: left there, an old checkpoint would be resumed as this run's."""
    failed: list[str] = []

    def note(_fn, path, exc):  # rmtree's onexc (Python >= 3.12), or onerror with exc_info
        failed.append(f"{path} ({exc[1] if isinstance(exc, tuple) else exc})")

    def remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, **{"onexc" if sys.version_info >= (3, 12) else "onerror": note})
        elif path.is_dir():  # a link to a folder elsewhere: its contents are the run's, the link the user's
            for child in path.iterdir():
                remove(child)
        elif path.exists() or path.is_symlink():
            try:
                path.unlink()
            except OSError as e:
                failed.append(f"{path} ({e})")

    for name in names:
        remove(Path(out) / name)
    if failed:
        raise ValueError(f"--overwrite: {len(failed)} path(s) of the previous run in {out} could not be deleted, "
                         f"e.g. {failed[:3]}; delete them (make them writable), or train into another output_dir")
