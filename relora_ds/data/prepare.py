"""Pre-tokenization: corpus -> tokenizer + one packed token file per split + manifest, once.

Every document becomes ``BOS ids EOS`` (``ids EOS`` with a tokenizer without BOS, such as T5's); the
documents of a split are concatenated in corpus order into one flat file of ids (packing: training
windows cross document boundaries, the EOS (and BOS) marks them, and nothing is padded or truncated).
This file decides whether to prepare (the recipe and its manifest), gets the tokenizer and writes the
manifest; relora_ds/data/encode.py tokenizes the documents into the split files.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import datasets
import numpy as np
import sentencepiece as spm
import tokenizers

from relora_ds.data import manifest as mf
from relora_ds.data.encode import MAP_BATCH, Encode, in_validation, tokenize_and_write
from relora_ds.data.inputs import DataWarning, builder_for, corpus_fingerprint, hub_commit, resolve_inputs
from relora_ds.data.sources import TXT_UNITS, Corpus, load_corpus
from relora_ds.data.tokenizer import Tokenizer, open_tokenizer, resolve_tokenizer, train_tokenizer, training_lines

log = logging.getLogger(__name__)

DEFAULT_VOCAB_SIZE = 32000


@dataclass(frozen=True)
class PrepareConfig:
    """How to turn a corpus into a prepared data dir (everything but the inputs and the dir)."""

    tokenizer: str | None = None
    """An existing tokenizer to use: a SentencePiece ``.model``, a Hugging Face ``tokenizer.json`` (with its
    tokenizer_config.json beside it) or a model directory holding either; None trains a SentencePiece BPE on
    the corpus's training split."""
    vocab_size: int | None = None
    """Vocabulary of the trained tokenizer (None: 32000). With `tokenizer`: None or its exact size."""
    seq_len: int | None = None
    """Only reported (windows per split, documents longer than a window): the files do not depend on it."""
    text_column: str | list[str] = "text"
    """Column holding the text in JSON/Parquet/hub corpora (``.txt`` files have none); a list: each file (or
    the hub dataset) takes the first of them it has."""
    num_proc: int = 1
    """Tokenizer processes (``datasets.map``) or threads (streaming); the output does not depend on it."""
    hf_config: str | None = None
    """Config name of a hub dataset input (``en`` for ``allenai/c4``)."""
    hf_revision: str | None = None
    """Branch, tag or commit of a hub dataset input (None: its default branch); the commit it resolves to is
    recorded, and the data is re-prepared when it moves."""
    val_fraction: float = 0.01
    """Share of documents in the validation split, chosen by a hash of each document's text."""
    val_inputs: tuple[str, ...] | None = None
    """A separate corpus for the validation split (files, directories, globs or a hub dataset name, read
    with the same text_column, hf_config, hf_revision and txt_unit), e.g. C4's own validation set, which the
    paper reports; every document of the inputs then trains (val_fraction is not used). None: the hash split."""
    hf_split: str = "train"
    """Split of a hub dataset input."""
    hf_val_split: str | None = None
    """Split of a hub dataset in val_inputs (None: "validation")."""
    streaming: bool | None = None
    """Read the corpus with ``datasets`` streaming; None: for hub datasets and corpora > RAM/4."""
    txt_unit: str = "document"
    """What one document is in a ``.txt`` file: the whole "document", a "paragraph" or a "line"."""
    max_docs: int | None = None
    """Use only the first N documents of the inputs (smoke tests; val_inputs are read whole); None: all."""
    tokenizer_train_chars: int = 100_000_000
    """Train the tokenizer on the first ~N characters of the training split (about 100 MB of text)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "max_docs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive int or None")
        if not isinstance(self.num_proc, int) or self.num_proc < 1:
            raise ValueError(f"num_proc={self.num_proc!r} must be a positive int")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction!r} must be in [0, 1)")
        if self.val_inputs is not None:
            if isinstance(self.val_inputs, (str, Path)) or not self.val_inputs:
                raise ValueError(f"val_inputs={self.val_inputs!r} must be a non-empty list of files, directories, "
                                 "globs or one hub dataset name")
            object.__setattr__(self, "val_inputs", tuple(str(v) for v in self.val_inputs))
            if self.val_fraction != PrepareConfig.val_fraction:
                raise ValueError(f"val_fraction={self.val_fraction} splits the inputs, val_inputs gives the "
                                 "validation split: give one of the two")
        if self.hf_val_split is not None and self.val_inputs is None:
            raise ValueError(f"hf_val_split={self.hf_val_split!r} is the split of a hub dataset in val_inputs; "
                             "there are no val_inputs")
        if self.txt_unit not in TXT_UNITS:
            raise ValueError(f"txt_unit={self.txt_unit!r} is not one of {TXT_UNITS}")
        names = [self.text_column] if isinstance(self.text_column, str) else self.text_column
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"text_column={self.text_column!r} must be a column name or a non-empty list of them")
        if not isinstance(self.text_column, str):  # one name: a str, as recipes recorded it; JSON-safe list
            object.__setattr__(self, "text_column", names[0] if len(names) == 1 else list(names))
        if self.tokenizer_train_chars < 1:
            raise ValueError(f"tokenizer_train_chars={self.tokenizer_train_chars!r} must be positive")


def _current_commit(hub: str, revision: str | None, out_dir: Path, validation: bool = False) -> str:
    """The hub dataset's commit now; offline, the one `out_dir` was prepared at (with a warning), so that
    re-running on prepared data stays a no-op without network. `validation`: of the val_inputs dataset."""
    try:
        return hub_commit(hub, revision)
    except ValueError:
        recipe = (mf.read_manifest_file(out_dir) or {}).get("recipe", {})
        prepared = (recipe.get("validation_corpus", {}) if validation else recipe).get("hub_commit")
        if prepared is None:
            raise
        warnings.warn(f"cannot reach the hub to check whether {hub!r} moved; keeping the data prepared at "
                      f"commit {prepared}", DataWarning, stacklevel=4)
        return prepared


def _recipe(resolved: tuple[list[str], str | None] | None, cfg: PrepareConfig, out_dir: Path,
            resolved_val: tuple[list[str], str | None] | None = None) -> dict:
    """Everything that decides the bytes of the token files, and nothing else: not num_proc, streaming
    or seq_len, nor how the inputs were spelled (the fingerprint covers the resolved files)."""
    if cfg.tokenizer is not None:
        tokenizer = {"given": mf.tokenizer_sha256(resolve_tokenizer(cfg.tokenizer))}
    else:
        tokenizer = {"train_bpe": {"vocab_size": cfg.vocab_size or DEFAULT_VOCAB_SIZE,
                                   "train_chars": cfg.tokenizer_train_chars}}
    hub = resolved[1] if resolved is not None else None
    if hub is None and (resolved_val is None or resolved_val[1] is None) and cfg.hf_revision is not None:
        raise ValueError(f"hf_revision={cfg.hf_revision!r} only applies to a hub dataset input")
    commit = _current_commit(hub, cfg.hf_revision, out_dir) if hub is not None else None
    # Keys absent at their defaults: data prepared before they existed keeps its recipe (no re-prepare).
    val = {}
    if resolved_val is not None:
        val_hub = resolved_val[1]
        val_commit = _current_commit(val_hub, cfg.hf_revision, out_dir, validation=True) if val_hub else None
        val = {"validation_corpus": {
            "fingerprint": corpus_fingerprint(resolved_val, cfg.hf_config, hub_revision=val_commit),
            **({"hub_commit": val_commit, "hf_split": cfg.hf_val_split or "validation"} if val_commit else {})}}
    return {
        "corpus_fingerprint": corpus_fingerprint(resolved, cfg.hf_config, hub_revision=commit),
        **({"hub_commit": commit} if commit else {}),  # absent for local corpora: their recipes are unchanged
        **({"hf_split": cfg.hf_split} if cfg.hf_split != "train" else {}),
        **val,
        "tokenizer": tokenizer,
        "text_column": cfg.text_column, "hf_config": cfg.hf_config, "txt_unit": cfg.txt_unit,
        "val_fraction": cfg.val_fraction, "max_docs": cfg.max_docs,
    }


def _texts(ds, val_fraction: float):
    """Training-split texts of a (possibly streaming) "text" dataset, in corpus order."""
    for batch in ds.iter(batch_size=MAP_BATCH):
        for text in batch["text"]:
            if isinstance(text, str) and not in_validation(text, val_fraction):
                yield text


def _get_tokenizer(corpus: Corpus, cfg: PrepareConfig, dest: Path, val_fraction: float) -> Tokenizer:
    """The tokenizer, its files copied (or trained) into the directory `dest` and opened from there."""
    if cfg.tokenizer is not None:
        given = open_tokenizer(cfg.tokenizer)
        if cfg.vocab_size is not None and cfg.vocab_size != given.vocab_size:
            raise ValueError(f"vocab_size={cfg.vocab_size} but tokenizer {cfg.tokenizer!r} has "
                             f"{given.vocab_size} pieces; give one of the two")
        given.copy_to(dest)
        return open_tokenizer(dest)
    start = time.perf_counter()
    lines = list(training_lines(_texts(corpus.dataset, val_fraction), cfg.tokenizer_train_chars))
    if not lines and val_fraction > 0 and any(isinstance(t, str) and t.strip() for t in _texts(corpus.dataset, 0.0)):
        raise ValueError(f"the training split is empty: every document of the corpus hashes into validation at "
                         f"val_fraction={val_fraction} (a corpus this small needs a smaller --val-fraction, or more and "
                         "smaller documents: --txt-unit paragraph or line for .txt inputs)")
    size = train_tokenizer(lines, dest / "tokenizer.model", vocab_size=cfg.vocab_size or DEFAULT_VOCAB_SIZE,
                           num_threads=cfg.num_proc)
    log.info("trained a %d-piece BPE tokenizer in %.1fs", size, time.perf_counter() - start)
    return open_tokenizer(dest)


def _warn_counts(counts: dict, what: str, text_column, tok: Tokenizer) -> None:
    """The counted warnings of one corpus's tokenization (`counts`: tokenize_and_write's); `what` names it."""
    if counts["empty_documents"]:
        warnings.warn(f"skipped {counts['empty_documents']} empty or blank documents in {what}",
                      DataWarning, stacklevel=4)
    if counts["records_without_text"]:
        warnings.warn(f"skipped {counts['records_without_text']} records of {what} whose text column "
                      f"is null or absent (text_column={text_column!r}: a record of another schema?)",
                      DataWarning, stacklevel=4)
    if counts["unk_tokens"]:
        warnings.warn(f"{counts['unk_tokens']} tokens are <unk>: the tokenizer has no byte fallback for "
                      f"some characters of {what}", DataWarning, stacklevel=4)
    if counts["documents_spelling_special_tokens"]:
        warnings.warn(f"{counts['documents_spelling_special_tokens']} documents of {what} spell a "
                      f"special token of the tokenizer ({tok.special_example()}): they are encoded as text, as "
                      "training should see them; transformers' AutoTokenizer reads such text as the special token "
                      "unless called with split_special_tokens=True", DataWarning, stacklevel=4)


def _report_windows(manifest: dict, seq_len: int | None) -> None:
    if not seq_len:
        return
    for name, split in manifest["splits"].items():
        windows = max(0, (split["tokens"] - 1) // seq_len)
        log.info("%s: %d windows of seq_len=%d (+1 target token)", name, windows, seq_len)
        if windows == 0:
            warnings.warn(f"split {name!r} has {split['tokens']} tokens: not one window of seq_len={seq_len}",
                          DataWarning, stacklevel=3)


def prepare_data(inputs: list[str] | None, out_dir: str | Path, overwrite: bool = False, **options) -> Path:
    """Tokenize `inputs` (None: the built-in corpus) into `out_dir`; returns `out_dir`.

    `options` are the fields of :class:`PrepareConfig` (tokenizer, vocab_size, seq_len, text_column,
    num_proc, hf_config, hf_revision, val_fraction, val_inputs, hf_split, hf_val_split, streaming, txt_unit,
    max_docs, tokenizer_train_chars). There is
    no seed: the validation split is a hash of each text and tokenizer training is deterministic.
    A no-op when `out_dir` already holds data prepared from the same recipe; safe to call from several
    processes at once (they serialize on a lock file, and the later ones find the work done). Complete data
    from another recipe (other options, changed input files, a hub branch that moved) is replaced only with
    `overwrite`: runs trained on it could no longer resume (their tokenizer or data would change under
    them), so without it a ValueError names what differs. Incomplete or damaged data is re-prepared.
    """
    cfg = PrepareConfig(**options)
    if cfg.tokenizer is not None:  # a wrong path or format is named now, not after reading the corpus
        open_tokenizer(cfg.tokenizer)
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if inputs is not None:
        inputs = [str(i) for i in inputs]
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not a directory: give a directory (new or "
                         "holding prepared data) for --out")
    created, lock = _lock_out_dir(out_dir)
    with lock:
        try:
            return _prepare_locked(inputs, out_dir, cfg, overwrite)
        except BaseException:
            # A failed first prepare (a bad input, a typo) leaves no directory behind holding only its lock file;
            # removed while locked: a process waiting on the lock finds it gone and starts over (_lock_out_dir).
            if created and {p.name for p in out_dir.iterdir()} <= {".prepare.lock"}:
                (out_dir / ".prepare.lock").unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    out_dir.rmdir()
            raise


def _lock_out_dir(out_dir: Path):
    """(whether this call created `out_dir`, the open lock file, held). Processes preparing the same
    directory serialize on it; one whose lock file was removed while it waited (a failed first prepare
    cleaned up) locks a new one."""
    created = False
    while True:
        created |= not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / ".prepare.lock", "a")
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.fstat(lock.fileno()).st_ino == os.stat(out_dir / ".prepare.lock").st_ino:
                return created, lock
        except FileNotFoundError:
            pass
        lock.close()


def _prepare_locked(inputs: list[str] | None, out_dir: Path, cfg: PrepareConfig, overwrite: bool) -> Path:
    # Resolved once: resolving warns about each skipped file, and the fingerprint and the loading
    # must see the same files. Inputs may lie in out_dir: only what prepare writes there is left out.
    own = [out_dir / name for name in (mf.MANIFEST, *mf.TOKENIZER_FILES, ".work", ".tokenizer.tmp",
                                       ".prepare.lock", *(f"{s}.bin" for s in mf.SPLITS))]
    resolved = resolve_inputs(inputs, exclude=own) if inputs is not None else None
    resolved_val = resolve_inputs(list(cfg.val_inputs), exclude=own) if cfg.val_inputs else None
    if cfg.hf_val_split is not None and resolved_val is not None and resolved_val[1] is None:
        # Checked here, not when the validation files are read: that comes after the whole training corpus.
        raise ValueError(f"hf_val_split={cfg.hf_val_split!r} (--hf-val-split) picks the split of a hub dataset "
                         f"given as --val-input, but --val-input here is {len(resolved_val[0])} local files, "
                         "which have no splits: leave --hf-val-split out, or give a hub dataset name as --val-input")
    if resolved and resolved_val:
        both = sorted(set(resolved[0]) & set(resolved_val[0]))
        if both:
            raise ValueError(f"{len(both)} files are both training input and --val-input, so validation would "
                             f"be trained on: {both[:5]}{' ...' if len(both) > 5 else ''}; leave them out of "
                             "one of the two (e.g. a narrower glob for --input)")
    val_split = cfg.hf_val_split or "validation"
    if resolved and resolved_val and resolved[1] and resolved[1] == resolved_val[1] and cfg.hf_split == val_split:
        raise ValueError(f"hub dataset {resolved[1]!r}, split {val_split!r}, is both the training input and "
                         "--val-input, so validation would be trained on; read another split for one of the two "
                         "(hf_split / hf_val_split, e.g. hf_val_split 'validation')")
    inapplicable = _inapplicable_options(resolved, resolved_val)
    cfg = _at_defaults(cfg, inapplicable)
    recipe = _recipe(resolved, cfg, out_dir, resolved_val)
    old = mf.read_manifest_file(out_dir)
    if old is not None and _same_recipe(old.get("recipe"), recipe, inapplicable) and mf.files_intact(out_dir, old):
        log.info("%s is up to date (manifest matches); nothing to do", out_dir)
        _report_windows(old, cfg.seq_len)
        return out_dir
    if old is not None and mf.files_intact(out_dir, old) and not overwrite:
        raise ValueError(f"{out_dir} holds data prepared from another recipe ({_recipe_diff(old.get('recipe', {}), recipe)}); "
                         "runs trained on it could not resume once it is replaced. Pass --overwrite to "
                         "re-prepare it, or another --out"
                         + (f" (or --hf-revision {old['recipe']['hub_commit']} to keep the commit this data "
                            "was read at)" if old.get("recipe", {}).get("hub_commit") not in
                            (None, recipe.get("hub_commit")) else ""))
    if old is not None:
        log.warning("%s holds data from a different recipe or is incomplete; re-preparing", out_dir)
    manifest = _prepare(inputs, (resolved, resolved_val), cfg, out_dir, recipe)
    _report_windows(manifest, cfg.seq_len)
    return out_dir


_IGNORED_BECAUSE = {"txt_unit": "no input is a .txt file (it says what one document of a .txt file is)",
                    "text_column": ".txt files have no columns"}


def _inapplicable_options(resolved: tuple[list[str], str | None] | None,
                          resolved_val: tuple[list[str], str | None] | None) -> dict[str, object]:
    """The options that cannot change these inputs' documents (training and validation), with their defaults:
    txt_unit without a .txt file, text_column with .txt files alone. None for the built-in corpus, which
    refuses both (load_corpus)."""
    if resolved is None:
        return {}
    sides = [r for r in (resolved, resolved_val) if r is not None]
    builders = {builder_for(f) for files, _ in sides for f in files}
    defaults = {}
    if "text" not in builders:
        defaults["txt_unit"] = PrepareConfig.txt_unit
    if builders == {"text"} and not any(hub for _, hub in sides):
        defaults["text_column"] = PrepareConfig.text_column
    return defaults


def _at_defaults(cfg: PrepareConfig, inapplicable: dict[str, object]) -> PrepareConfig:
    """`cfg` with the `inapplicable` options at their defaults, each one given warned about. Recorded as given,
    an identical re-run without it was another recipe (refused), and the data's fingerprint changed with it, so
    checkpoints could not resume on the same bytes."""
    for name, default in inapplicable.items():
        if getattr(cfg, name) != default:
            warnings.warn(f"{name}={getattr(cfg, name)!r} is ignored: {_IGNORED_BECAUSE[name]}", DataWarning,
                          stacklevel=4)
    return replace(cfg, **inapplicable)


def _same_recipe(old: dict | None, new: dict, inapplicable: dict[str, object]) -> bool:
    """Whether a manifest's recipe `old` is `new`, the `inapplicable` options aside: data prepared before they
    were recorded at their defaults holds them as given (txt_unit 'line' with .jsonl files alone), and is the
    same data when the rest, the input files' fingerprint included, is the same."""
    return old is not None and {**old, **{k: new[k] for k in inapplicable if k in old}} == new


_ABSENT = object()


def _recipe_diff(old: dict, new: dict, prefix: str = "") -> str:
    """The recipe keys that differ, as ``key: old -> new`` (nested keys dotted; a key only one side has is
    "absent"; long values shown around where they first differ)."""
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            parts.append(_recipe_diff(a, b, f"{prefix}{key}."))
        else:
            ta, tb = ("absent" if v is _ABSENT else json.dumps(v) for v in (a, b))
            parts.append(f"{prefix}{key}: {' -> '.join(_around_first_difference(ta, tb))}")
    return "; ".join(parts)


def _around_first_difference(a: str, b: str, width: int = 40) -> tuple[str, str]:
    """``a`` and ``b`` cut to about ``width`` characters each, keeping where they first differ in view."""
    if max(len(a), len(b)) <= width:
        return a, b
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, first - width // 2)
    return tuple(("..." if start else "") + t[start:start + width] + ("..." if len(t) > start + width else "")
                 for t in (a, b))


def _prepare(inputs: list[str] | None, resolved: tuple, cfg: PrepareConfig, out_dir: Path, recipe: dict) -> dict:
    """Write everything under temporary names, then swap it in; the manifest goes last."""
    work_dir = out_dir / ".work"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir()
    tok_tmp = out_dir / ".tokenizer.tmp"
    shutil.rmtree(tok_tmp, ignore_errors=True)
    tok_tmp.mkdir()
    try:
        manifest = _prepare_files(inputs, resolved, cfg, out_dir, work_dir, tok_tmp, recipe)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        shutil.rmtree(tok_tmp, ignore_errors=True)
        for tmp in [out_dir / f".{s}.bin.tmp" for s in mf.SPLITS]:
            tmp.unlink(missing_ok=True)
    return manifest


def _prepare_files(inputs: list[str] | None, resolved: tuple, cfg: PrepareConfig, out_dir: Path, work_dir: Path,
                   tok_tmp: Path, recipe: dict) -> dict:
    """Tokenizer, token files and manifest; returns the manifest. `resolved`: (inputs, val_inputs) resolved."""
    resolved, resolved_val = resolved
    # hf_config goes to the hub side: local training files with a hub validation set (or the reverse) is
    # C4's usual set-up. With no hub side the training corpus refuses it.
    val_hub = resolved_val is not None and resolved_val[1] is not None
    train_hub = resolved is not None and resolved[1] is not None
    corpus = load_corpus(resolved, work_dir=work_dir, hub_revision=recipe.get("hub_commit"),
                         text_column=cfg.text_column, hf_config=cfg.hf_config if train_hub or not val_hub else None,
                         hf_split=cfg.hf_split, txt_unit=cfg.txt_unit, streaming=cfg.streaming, num_proc=cfg.num_proc)
    val_corpus = None if resolved_val is None else load_corpus(
        resolved_val, work_dir=work_dir / "validation", text_column=cfg.text_column,
        hf_config=cfg.hf_config if val_hub else None,
        hub_revision=recipe["validation_corpus"].get("hub_commit"),
        hf_split=cfg.hf_val_split or ("validation" if resolved_val[1] else "train"),
        txt_unit=cfg.txt_unit, streaming=cfg.streaming, num_proc=cfg.num_proc)
    train_fraction = 0.0 if val_corpus is not None else cfg.val_fraction  # 0: every input document trains
    if cfg.max_docs is not None:
        ds = corpus.dataset
        corpus.dataset = (ds.take(cfg.max_docs) if corpus.streaming
                          else ds.select(range(min(cfg.max_docs, len(ds)))))
        corpus.description += f", its first {cfg.max_docs} documents"
    tok = _get_tokenizer(corpus, cfg, tok_tmp, train_fraction)
    vocab_size = tok.vocab_size
    dtype = mf.token_dtype(vocab_size)
    unk_id = -1 if tok.unk_id is None else tok.unk_id
    start = time.perf_counter()
    counts = tokenize_and_write([(corpus, Encode(tok, train_fraction, cfg.num_proc))], out_dir, work_dir, dtype,
                                unk_id, num_proc=cfg.num_proc, seq_len=cfg.seq_len)
    named = [(counts, corpus.description if val_corpus is None else f"the training corpus ({corpus.description})")]
    if val_corpus is not None:
        # Tokenized apart (a fraction of 1: every document of it validates), so that its counts, and the warnings
        # that name a corpus, are its own; its split file replaces the training corpus's empty one.
        val_dir = work_dir / "validation"
        val_dir.mkdir(parents=True, exist_ok=True)
        val_counts = tokenize_and_write([(val_corpus, Encode(tok, 1.0, cfg.num_proc))], val_dir, val_dir, dtype,
                                        unk_id, num_proc=cfg.num_proc, seq_len=cfg.seq_len)
        assert counts["splits"]["validation"]["tokens"] == val_counts["splits"]["train"]["tokens"] == 0
        (val_dir / ".validation.bin.tmp").replace(out_dir / ".validation.bin.tmp")
        named.append((val_counts, f"the validation corpus (--val-input: {val_corpus.description})"))
    seconds = time.perf_counter() - start

    splits = {s: {k: sum(c["splits"][s][k] for c, _ in named) for k in counts["splits"][s]} for s in mf.SPLITS}
    total = {k: sum(c[k] for c, _ in named) for k in counts if k != "splits"}
    total_tokens = sum(s["tokens"] for s in splits.values())
    total_docs = sum(s["documents"] for s in splits.values())
    if total_docs == 0:
        raise ValueError(f"empty corpus: {' and '.join(what for _, what in named)} "
                         f"{'holds' if len(named) == 1 else 'hold'} no non-blank document")
    for part_counts, what in named:
        _warn_counts(part_counts, what, cfg.text_column, tok)
    if val_corpus is not None:  # val_fraction is not used: the given corpus is the whole validation split
        if splits["train"]["documents"] == 0:
            raise ValueError(f"the training split is empty: {named[0][1]} holds no non-blank document")
        if splits["validation"]["documents"] == 0:
            warnings.warn(f"the validation split is empty: {named[1][1]} holds no non-blank document; evaluation "
                          "will see no data", DataWarning, stacklevel=3)
    else:
        # The hash split sends each document whole to one split: a few big documents (a .txt file is one under
        # txt_unit="document") leave one split empty, and a larger val_fraction only changes which one.
        few = ("; each document goes whole to one split, so split the text into more documents (txt_unit="
               "'paragraph' or 'line', --txt-unit, for .txt inputs) or give a validation corpus (--val-input)"
               if total_docs * cfg.val_fraction < 10 else "")
        if splits["validation"]["documents"] == 0 and cfg.val_fraction > 0:
            warnings.warn(f"the validation split is empty ({total_docs} documents, val_fraction="
                          f"{cfg.val_fraction}); evaluation will see no data{few}", DataWarning, stacklevel=3)
        if splits["train"]["documents"] == 0:
            raise ValueError(f"the training split is empty ({total_docs} documents, all in validation){few}")

    # Readers holding the old files keep their inodes; new readers see no manifest until it is complete.
    (out_dir / mf.MANIFEST).unlink(missing_ok=True)
    for name in mf.TOKENIZER_FILES:  # another recipe's tokenizer, possibly of the other kind
        (out_dir / name).unlink(missing_ok=True)
    for f in tok.files:
        f.replace(out_dir / f.name)
    tok_path = out_dir / tok.path.name
    for split in mf.SPLITS:
        (out_dir / f".{split}.bin.tmp").replace(out_dir / f"{split}.bin")
    manifest = {
        "format": mf.FORMAT,
        "recipe": recipe,
        "vocab_size": vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
        "unk_id": tok.unk_id, "tokenizer_path": tok_path.name, "tokenizer_sha256": mf.tokenizer_sha256(tok_path),
        "dtype": dtype,
        "splits": {s: {"path": f"{s}.bin", "tokens": splits[s]["tokens"], "documents": splits[s]["documents"]}
                   for s in mf.SPLITS},
        "corpus": {"inputs": inputs, "description": corpus.description,
                   **({"val_inputs": list(cfg.val_inputs), "val_description": val_corpus.description}
                      if val_corpus is not None else {}),
                   "fingerprint": recipe["corpus_fingerprint"], "streaming": corpus.streaming},
        "warnings": {"invalid_utf8_bytes": {**corpus.invalid_utf8, **(val_corpus.invalid_utf8 if val_corpus else {})},
                     "lone_surrogate_escapes": {**corpus.lone_surrogates,
                                                **(val_corpus.lone_surrogates if val_corpus else {})},
                     "empty_files": corpus.empty_files + (val_corpus.empty_files if val_corpus else []),
                     **total},
        "stats": {"tokenize_seconds": round(seconds, 3), "tokens_per_second": round(total_tokens / seconds),
                  "num_proc": cfg.num_proc},
        "versions": {"sentencepiece": spm.__version__, "tokenizers": tokenizers.__version__,
                     "datasets": datasets.__version__, "numpy": np.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(cfg),
    }
    mf.write_manifest(out_dir, manifest)
    long_docs = sum(s["longer_than_seq_len"] for s in splits.values())
    log.info("prepared %s: %s tokens (train %s, validation %s), %s documents, %s tokens/s%s",
             out_dir, f"{total_tokens:,}", f"{splits['train']['tokens']:,}",
             f"{splits['validation']['tokens']:,}", f"{total_docs:,}", f"{total_tokens / seconds:,.0f}",
             f"; {long_docs} documents span several windows of seq_len={cfg.seq_len}" if cfg.seq_len else "")
    return manifest
