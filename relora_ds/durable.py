"""Writes that survive a crash or a power loss: a file's data or a directory's entries flushed to stable
storage (fsync), and a small file replaced through a flushed temporary one: checkpoints and their universal
conversion, metrics.jsonl up to each checkpoint (metrics.py), an export before its renames (hf.py), a prepared
data dir before its manifest (data/prepare.py)."""
from __future__ import annotations

import errno
import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush ``path`` to stable storage: a file's data, or a directory's entries (the names of the files in it;
    a file system that cannot sync a directory, EINVAL or ENOTSUP, keeps them by its own rules)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if not (e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS) and Path(path).is_dir()):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under the folder ``path``, then the folders' entries, deepest first, ``path`` last
    (the caller flushes ``path``'s own entry in its parent, after a rename into place)."""
    for item in sorted(Path(path).rglob("*"), reverse=True):  # "a/b" sorts after "a": a folder's files first
        fsync_path(item)
    fsync_path(path)


def replace_durably(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` through a temporary file, flushed before the rename and the rename after: a
    crash or a power loss leaves the old file or the new, never an empty or half one."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)
