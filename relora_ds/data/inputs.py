"""Corpus inputs: ``--input`` strings resolved to local files (directories searched recursively, globs,
``save_to_disk`` directories) or one Hugging Face hub dataset name, with clear errors for what cannot be
read; and the corpus fingerprint that makes re-runs no-ops. Reading them: :mod:`relora_ds.data.sources`."""
from __future__ import annotations

import atexit
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

from relora_ds.data.builtin_corpus import builtin_fingerprint
from relora_ds.train_config import PlainWarning


# name suffix -> datasets builder. Parquet has its own internal compression, so no ".parquet.gz".
SUPPORTED_SUFFIXES = {
    ".txt": "text", ".txt.gz": "text",
    ".jsonl": "json", ".jsonl.gz": "json",
    ".json": "json", ".json.gz": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",  # Dataset.save_to_disk's data files
}
# What Dataset.save_to_disk writes beside its .arrow files: metadata, not text.
_SAVE_TO_DISK_META = ("state.json", "dataset_info.json")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_GLOB_CHARS = re.compile(r"[*?\[]")
# What datasets.load_dataset reads in a data_files path as other than its name (below: plain_names).
_NOT_PLAIN = re.compile(r"[$*?\[\]{}]|::")


class DataWarning(PlainWarning):
    """Input that was repaired or skipped; always carries a count and, where it applies, a file name."""


def builder_for(path: str | Path) -> str | None:
    """The ``datasets`` builder for a file name, or None if its extension is not supported."""
    name = Path(path).name.lower()
    for suffix, builder in SUPPORTED_SUFFIXES.items():
        if name.endswith(suffix):
            return builder
    return None


def _unsupported(path: str) -> ValueError:
    return ValueError(
        f"unsupported input file {path!r}: supported extensions are {', '.join(SUPPORTED_SUFFIXES)}"
    )


def _files_in(candidates: list[str], origin: str) -> list[str]:
    """Supported files among `candidates` (from a directory or glob); the others are counted and warned.
    Hidden names are already left out (and counted) by _walk, and a glob matches them only where it spells
    their dot: those are read, as a path to a hidden file is."""
    files = sorted(c for c in candidates if os.path.isfile(c))
    kept = [f for f in files if builder_for(f)]
    skipped = [Path(f).name for f in files if not builder_for(f)]
    if not kept:
        raise ValueError(
            f"input {origin!r} holds no supported files (found {len(files)}: {skipped[:5]}); "
            f"supported extensions are {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if skipped:
        warnings.warn(
            f"input {origin!r}: skipped {len(skipped)} files with unsupported extensions "
            f"({', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}); "
            f"supported are {', '.join(SUPPORTED_SUFFIXES)}",
            DataWarning,
            stacklevel=3,
        )
    return kept


def _walk(root: Path, origin: str, exclude: tuple[Path, ...]) -> list[str]:
    """Every non-hidden path under directory `root` (hidden files counted in a warning), without the
    paths in `exclude` and what lies under them; a ``save_to_disk`` dataset's metadata files are not text."""
    found, hidden, caches = [], 0, 0
    paths, seen = [], set()
    # Symlinked folders are read through (Path.rglob on Python 3.11 skips them: a hub cache snapshot's
    # links, a tree of linked shards); a folder reached twice (a link cycle, a second link) is read once.
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        paths += [Path(folder) / name for name in names]
    for p in sorted(paths):
        if _excluded(p, exclude):
            continue
        if any(part.startswith(".") for part in p.relative_to(root).parts):  # .git, .ipynb_checkpoints
            hidden += p.is_file()
        elif _is_save_to_disk_cache(p):
            caches += 1
        elif not _is_save_to_disk_meta(p):
            found.append(str(p))
    if hidden:
        warnings.warn(f"input {origin!r}: skipped {hidden} hidden files (names or folders starting "
                      "with '.')", DataWarning, stacklevel=3)
    if caches:
        warnings.warn(f"input {origin!r}: skipped {caches} .arrow files of a save_to_disk dataset that its "
                      "state.json does not list (caches a later .map() or .filter() wrote there, holding "
                      "transformed copies of its rows)", DataWarning, stacklevel=3)
    return found


def _is_save_to_disk_cache(p: Path) -> bool:
    """An .arrow file beside a save_to_disk dataset's state.json that the state does not list as data."""
    state = p.parent / "state.json"
    if p.suffix != ".arrow" or not state.is_file():
        return False
    try:
        listed = {d["filename"] for d in json.loads(state.read_text())["_data_files"]}
    except (ValueError, KeyError, TypeError):  # not datasets' state.json: nothing to tell apart
        return False
    return p.name not in listed


def _is_save_to_disk_meta(p: Path) -> bool:
    """A metadata file Dataset.save_to_disk writes beside its .arrow files (not text to read)."""
    return p.name in _SAVE_TO_DISK_META and any(p.parent.glob("*.arrow"))


def _excluded(p: Path, exclude: tuple[Path, ...]) -> bool:
    # As strings: `e in q.parents` builds a Path per ancestor, ~0.3 ms a file (17 s of 50,000 files' resolving).
    real = os.path.realpath(p)  # `exclude` is resolved; p may be reached through a link
    return any(q == e or q.startswith(os.path.join(e, "")) for q in (str(p), real) for e in map(str, exclude))


def _check_not_dataset_dict(root: Path, origin: str) -> None:
    if (root / "dataset_dict.json").is_file():
        splits = sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "state.json").is_file())
        raise ValueError(f"input {origin!r} is a DatasetDict saved with save_to_disk (splits {splits}): give one "
                         f"split's directory, e.g. {str(root / (splits[0] if splits else 'train'))!r}, so that "
                         "other splits do not end up in the training data")


def resolve_inputs(inputs: list[str], exclude=None) -> tuple[list[str], str | None]:
    """(local files, hub dataset name): exactly one of the two is non-empty.

    Directories, and directories a glob matches, are read recursively, without hidden files and folders
    (counted in a warning) and without the paths in `exclude` (prepare's own outputs, when its output
    directory lies inside an input) or anything under them. A directory written by ``Dataset.save_to_disk``
    is read through its ``.arrow`` files. A glob matches hidden names only where it spells their dot (Python's
    glob: ``data/.*.jsonl``), and reads what it matches.

    A string that is neither an existing path nor a glob with matches is a hub name only if it looks
    like ``owner/name`` and has no file extension; anything else is a missing-path error.
    """
    if not inputs:
        raise ValueError("inputs is an empty list: give files, directories, globs or a hub dataset name "
                         "(or None for the built-in corpus)")
    exclude = tuple(Path(e).resolve() for e in ([exclude] if isinstance(exclude, (str, Path)) else exclude or ()))
    files: list[str] = []
    hub: list[str] = []
    for item in inputs:
        item = str(item)
        path = Path(item).expanduser()
        # Absolute paths as named, not resolved: a symlink's target may carry no extension (a hub cache's
        # blobs), and the name says how to read it; the same file reached twice is read once (below).
        if path.is_file():
            if builder_for(path) is None:
                raise _unsupported(item)
            files.append(os.path.abspath(path))
        elif path.is_dir():
            _check_not_dataset_dict(path.resolve(), item)
            files.extend(_files_in(_walk(Path(os.path.abspath(path)), item, exclude), item))
        elif _GLOB_CHARS.search(item):
            matches = [Path(os.path.abspath(m)) for m in glob.glob(str(path), recursive=True)]
            if not matches:
                raise ValueError(f"input glob {item!r} matches no files")
            found, own = [], []
            for m in sorted(matches):
                if _excluded(m, exclude):
                    own.append(str(m))
                elif m.is_dir():
                    _check_not_dataset_dict(m, f"{item} -> {m}")
                    found.extend(_walk(m, item, exclude))
                elif not _is_save_to_disk_meta(m):
                    found.append(str(m))
            if len(own) == len(matches):  # else nothing found is _files_in's "holds no supported files"
                raise ValueError(f"input glob {item!r} matches only prepare's own output files {own[:5]}")
            files.extend(_files_in(found, item))
        elif _HUB_NAME.match(item) and builder_for(item) is None and not item.startswith("."):
            hub.append(item)
        else:
            raise ValueError(f"input path {item!r} does not exist (not a file, directory, glob match, "
                             f"or Hugging Face hub name like 'allenai/c4')")
    if hub and (files or len(hub) > 1):
        raise ValueError(f"a hub dataset ({hub[0]!r}) must be the only input; got {list(inputs)}")
    # Each file once, by what it is (where it first came in the order), under its shortest name (a glob's
    # ** through a link cycle also finds it under loop/loop/...)
    by_target: dict[str, str] = {}
    for f in files:
        real = os.path.realpath(f)
        by_target[real] = min(by_target.get(real, f), f, key=lambda name: (name.count(os.sep), name))
    return list(by_target.values()), (hub[0] if hub else None)


def plain_names(files: list[str]) -> list[str]:
    """``files`` as names datasets.load_dataset reads as given: its ``data_files`` are patterns and URLs, not
    names. It expands $VARS, globs [...], ? and * and splits at '::', so a file 'exp[1]/c.txt' read 'exp1/c.txt',
    'a?b.txt' read 'axb.txt' as well (other data, silently: a review), and '$HOME/c.txt' or 'a::b/c.txt' failed.
    A file whose path has none of these is itself; any other is a link to it with a plain name (its supported
    suffix, which datasets infers the compression from) in a temporary directory removed at exit (a streamed
    dataset opens its files late)."""
    if not any(_NOT_PLAIN.search(f) for f in files):
        return list(files)
    links = tempfile.mkdtemp(prefix="relora_ds-inputs-")
    atexit.register(shutil.rmtree, links, ignore_errors=True)
    if _NOT_PLAIN.search(links):
        raise ValueError(f"the temporary directory {links!r} (TMPDIR) has one of $ * ? [ ] {{ }} :: in its path, "
                         "which datasets would expand: set TMPDIR to a directory with a plain path")
    named = []
    for i, f in enumerate(files):
        if not _NOT_PLAIN.search(f):
            named.append(f)
            continue
        suffix = next((s for s in SUPPORTED_SUFFIXES if Path(f).name.lower().endswith(s)), "")
        link = os.path.join(links, f"{i}{suffix}")
        os.symlink(os.path.abspath(f), link)
        named.append(link)
    return named


def local_fingerprint(files: list[str]) -> str:
    """sha256 of each file's path, size and mtime: cheap, and changes whenever a file is rewritten."""
    h = hashlib.sha256(b"local-v1")
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def hub_commit(name: str, revision: str | None = None) -> str:
    """The commit sha a hub dataset's `revision` (branch, tag or sha; None: the default branch) points to
    now: prepared data records it and is re-prepared when it moves."""
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(name, revision=revision).sha
    except Exception as e:  # offline, unknown name or revision: all surface as different types
        raise ValueError(
            f"could not open Hugging Face hub dataset {name!r} (revision {revision!r}): {type(e).__name__}: "
            f"{e}. Hub datasets need network access; a local path by this name does not exist either."
        ) from e


def corpus_fingerprint(resolved: tuple[list[str], str | None] | None, hf_config: str | None = None,
                       hub_revision: str | None = None) -> str:
    """Changes whenever the documents can, computed without reading them: sha256 of the built-in
    sources (``resolved`` None), of local files' paths, sizes and mtimes, or of a hub dataset's name,
    config and commit (`hub_revision`, as resolved by :func:`hub_commit`). ``resolved`` is what
    :func:`resolve_inputs` returned."""
    if resolved is None:
        return builtin_fingerprint()
    files, hub = resolved
    if hub is not None:
        return hashlib.sha256(f"hub\0{hub}\0{hf_config}\0{hub_revision}".encode()).hexdigest()
    return local_fingerprint(files)
