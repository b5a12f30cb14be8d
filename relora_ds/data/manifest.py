"""The manifest of a prepared data dir: what was tokenized, with which tokenizer, into which files.

A prepared dir holds its tokenizer (``tokenizer.model``, SentencePiece, or a Hugging Face ``tokenizer.json``
with its ``tokenizer_config.json``), one token file per split (``train.bin``, ``validation.bin``:
raw little-endian ``uint16``/``uint32`` ids, memory-mappable) and ``manifest.json``, written last and
atomically, so a dir with a manifest is complete. Its ``recipe`` entry is everything that decides the
bytes of the token files; :func:`relora_ds.data.prepare.prepare_data` is a no-op when it matches.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
from pathlib import Path

from relora_ds.durable import replace_durably

MANIFEST = "manifest.json"
FORMAT = "relora_ds.packed_tokens/1"
SPLITS = ("train", "validation")


def builtin_data_dir(vocab_size: int) -> Path:
    """Where the built-in corpus is prepared for `vocab_size` when no data dir is given.

    ``$RELORA_DATA_CACHE/builtin-vocab{N}``, default ``~/.cache/relora_ds/builtin-vocab{N}``.
    """
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size!r} must be a positive int")
    root = os.environ.get("RELORA_DATA_CACHE") or "~/.cache/relora_ds"
    try:
        return Path(root).expanduser() / f"builtin-vocab{vocab_size}"
    except RuntimeError:  # "Could not determine home directory" (docker --user N: HOME unset, no passwd entry)
        raise ValueError(f"the built-in corpus's cache {root} is under the home directory, and this process has "
                         f"none (HOME is unset and uid {os.getuid()} has no passwd entry): set RELORA_DATA_CACHE "
                         "to a writable directory, or pass --data-dir") from None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# A Hugging Face tokenizer is these files (those present): tokenizer.json holds the vocabulary and rules, the
# other two name its special tokens (which one ends a document).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Kept with a tokenizer.json: transformers (5.25, checked) saves a tokenizer's chat template in this file beside
# it, not in tokenizer_config.json, and AutoTokenizer reads it there. Not in the tokenizer's hash: it changes no id.
HF_CHAT_TEMPLATE_FILES = ("chat_template.jinja",)
TOKENIZER_FILES = ("tokenizer.model", *HF_TOKENIZER_FILES, *HF_CHAT_TEMPLATE_FILES)  # a data dir's tokenizer


def tokenizer_sha256(path: str | Path) -> str:
    """The identity of a tokenizer file as data dirs and checkpoints record it: a SentencePiece ``.model``'s
    sha256; for a Hugging Face ``tokenizer.json``, the sha256 over it and the special-token files beside it."""
    path = Path(path)
    if path.suffix != ".json":
        return file_sha256(path)
    files = {"tokenizer.json": path, **{name: path.parent / name for name in HF_TOKENIZER_FILES[1:]
                                        if (path.parent / name).is_file()}}
    h = hashlib.sha256()
    for name, file in files.items():
        h.update(f"{name}\0{file_sha256(file)}\n".encode())
    return h.hexdigest()


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype holding every id: halves the file and page-cache use at <= 64k."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class DamagedManifest(ValueError):
    """A manifest.json that is not a JSON object (cut short by an interrupted copy): the data it describes are
    re-prepared like incomplete data."""


def read_manifest_file(data_dir: str | Path) -> dict | None:
    """The manifest as stored (paths relative to the dir), or None if there is none."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise DamagedManifest(f"{path} is damaged ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict):
        raise DamagedManifest(f"{path} is damaged (a JSON {type(manifest).__name__}, not an object)")
    return manifest


def write_manifest(data_dir: Path, manifest: dict) -> None:
    """Through a flushed temporary file, the folder flushed after the rename (the files it names are first)."""
    replace_durably(json.dumps(manifest, indent=2, sort_keys=True) + "\n", data_dir / MANIFEST)


def load_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared data dir, with ``tokenizer_path`` and split ``path`` made absolute.

    Keys: format, vocab_size, bos_id (None: the tokenizer has no BOS), eos_id, pad_id (None: packed, never
    padded), unk_id,
    tokenizer_path, tokenizer_sha256, dtype, splits ({name: {path, tokens, documents}}),
    corpus (description, fingerprint), recipe, warnings, versions, created.
    """
    data_dir = Path(data_dir)
    manifest = read_manifest_file(data_dir)
    if manifest is None:
        raise ValueError(f"{str(data_dir)!r} is not a prepared data dir (no {MANIFEST}); create it with "
                         f"python launch/prepare_data.py --out {shlex.quote(str(data_dir))} [--input ...]")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{str(data_dir / MANIFEST)!r} has format {manifest.get('format')!r}, this code "
                         f"reads {FORMAT!r}; re-run prepare_data")
    manifest["tokenizer_path"] = str((data_dir / manifest["tokenizer_path"]).resolve())
    for split in manifest["splits"].values():
        if "path" in split:  # a mixture's splits are its members' (relora_ds.data.mixture)
            split["path"] = str((data_dir / split["path"]).resolve())
    return manifest


def train_data_fingerprint(manifest: dict) -> str:
    """sha256 of what decides the training split's tokens, read from the manifest alone (no token file is
    read: free on a 100 GB corpus). It covers the prepare recipe -- the corpus fingerprint (the input files'
    paths, sizes and mtimes, or a hub dataset's commit), the tokenizer, val_fraction, max_docs, ... -- less
    a separate validation corpus (``--val-input``, which trains nothing), the tokenizer's sha256, the token
    dtype and the training split's token and document counts. Data re-prepared from changed inputs or
    options changes it; re-running prepare_data with the same recipe (a no-op), or moving or copying the
    data dir, does not. Checkpoints record it so that ``--resume`` refuses data their sampler never saw."""
    recipe = {k: v for k, v in (manifest.get("recipe") or {}).items() if k != "validation_corpus"}
    train = manifest["splits"]["train"]
    key = {"recipe": recipe, "tokenizer_sha256": manifest.get("tokenizer_sha256"), "dtype": manifest.get("dtype"),
           "train_tokens": int(train["tokens"]), "train_documents": int(train.get("documents", 0))}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def files_intact(data_dir: Path, manifest: dict) -> bool:
    """Whether the token files a stored manifest names have the right sizes and the tokenizer its hash."""
    itemsize = 2 if manifest["dtype"] == "uint16" else 4
    for split in manifest["splits"].values():
        if "path" not in split:  # a mixture's: its members' files (checked when it is opened)
            continue
        path = data_dir / split["path"]
        if not path.is_file() or path.stat().st_size != split["tokens"] * itemsize:
            return False
    tokenizer = data_dir / manifest["tokenizer_path"]
    return tokenizer.is_file() and tokenizer_sha256(tokenizer) == manifest["tokenizer_sha256"]


def document_ends_problem(manifest: dict, data_dir: str | Path | None = None) -> str | None:
    """Why EOS ids do not mark exactly the ends of the documents of this data (document masking cuts windows
    at them), or None where they do. One id for BOS and EOS (OPT-style tokenizers) ends a one-token document at
    every BOS; an ``<unk>`` that is the EOS ends one at every unknown piece the text produced. A tokenizer that
    only names its EOS unk (GPT-2's byte-level BPE: every text encodes without unknown pieces) is fine. A
    mixture (with its ``data_dir``) is also judged by each member's own manifest: one made before its manifest
    counted the members' documents holding the EOS id (2026-12-07) does not say."""
    if manifest.get("kind") == "mixture" and data_dir is not None:
        from .mixture import member_dirs
        for member in member_dirs(data_dir, manifest):
            if (problem := document_ends_problem(load_manifest(member), member)) is not None:
                return f"its member {member}: {problem}"
    eos = manifest["eos_id"]
    if manifest.get("bos_id") == eos:
        return (f"the data's tokenizer uses one id ({eos}) for BOS and EOS, so an EOS cannot tell where a document "
                "ends (each BOS would be a document of its own)")
    holding = manifest.get("warnings", {}).get("documents_holding_eos", 0)
    if holding:
        return (f"{holding:,} documents of the data hold the EOS id ({eos}) inside their text (the tokenizer's "
                "eos_token is not a special token), each of which would end a document there")
    unk_tokens = manifest.get("warnings", {}).get("unk_tokens", 0)
    if manifest.get("unk_id") == eos and unk_tokens:
        return (f"the data's tokenizer uses one id ({eos}) for <unk> and EOS, and its text holds {unk_tokens:,} "
                "unknown pieces, each of which would end a document")
    return None
