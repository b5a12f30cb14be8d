"""Pre-tokenization: corpus -> tokenizer + one packed token file per split + manifest, once.

Every document becomes ``BOS ids EOS`` (``ids EOS`` with a tokenizer without BOS, such as T5's); the
documents of a split are concatenated in corpus order into one flat file of ids (packing: training
windows cross document boundaries, the EOS (and BOS) marks them, and nothing is padded or truncated).
This file decides whether to prepare (the manifest's recipe against this one: relora_ds/data/recipe.py),
gets the tokenizer and writes the manifest; relora_ds/data/encode.py tokenizes the documents into the split
files.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
import warnings
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import datasets
import numpy as np
import sentencepiece as spm
import tokenizers

from relora_ds.data import manifest as mf
from relora_ds.data.encode import MAP_BATCH, Encode, in_validation, tokenize_and_write
from relora_ds.data.inputs import DataWarning, resolve_inputs
from relora_ds.data.sources import Corpus, load_corpus
from relora_ds.data.tokenizer import Tokenizer, open_tokenizer, train_tokenizer, training_lines
from relora_ds.data.recipe import (DEFAULT_VOCAB_SIZE, PrepareConfig, at_defaults, inapplicable_options, recipe_diff,
                                   recipe_of, same_recipe)
from relora_ds.durable import fsync_path, replace_durably

log = logging.getLogger(__name__)

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
        if (given.path.parent / "additional_chat_templates").is_dir():  # transformers 5's named templates
            warnings.warn(f"the tokenizer's named chat templates ({given.path.parent / 'additional_chat_templates'}"
                          ") are not copied with it (its default chat_template.jinja is); a run's export has the "
                          "default alone: copy that folder into the export if you need them", DataWarning,
                          stacklevel=4)
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
    if counts["documents_holding_eos"]:
        warnings.warn(f"{counts['documents_holding_eos']} documents of {what} encode to the EOS id "
                      f"{tok.spelled(tok.eos_id)} inside their text (an eos_token that is a plain vocabulary entry, "
                      "not a special token: AutoTokenizer reads it from text too); --document-masking would end "
                      "each of them there, and is refused on this data", DataWarning, stacklevel=4)


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
    if "::" in str(out_dir):  # its work dir holds datasets' cache, whose path datasets splits at '::' (a chain)
        raise ValueError(f"out_dir {str(out_dir)!r} has '::' in its path, which Hugging Face datasets reads as a "
                         "chained URL (its cache goes there): give a directory without '::'")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not a directory: give a directory (new or "
                         "holding prepared data) for --out")
    if out_dir.is_dir() and not (out_dir / mf.MANIFEST).is_file() and not overwrite:
        # Neither new nor prepared data (a model directory, say: its tokenizer files would be replaced). What a
        # prepare cut short leaves (token files, a tokenizer, dot-files) is this directory's own.
        own = {*mf.TOKENIZER_FILES, *(f"{split}.bin" for split in mf.SPLITS)}
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in own and not p.name.startswith("."))
        if foreign:
            raise ValueError(f"out_dir {str(out_dir)!r} holds files that are not prepared data ({foreign[:4]}) and no "
                             f"{mf.MANIFEST}: give a new directory (or one holding prepared data) for --out, or "
                             "--overwrite to prepare into it anyway (its tokenizer files are replaced)")
    created, lock = _lock_out_dir(out_dir)
    if lock is None:  # prepared data in a directory this process cannot write: a no-op, or an error saying why
        try:
            return _prepare_locked(inputs, out_dir, cfg, overwrite)
        except OSError as e:
            raise ValueError(f"data dir {out_dir} is not writable ({e.strerror}) and its data would have to be "
                             "prepared again: prepare into a writable directory (prepare_data.py --out, "
                             "--data-dir)") from None
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
    cleaned up) locks a new one. Prepared data in a directory this process cannot write (shared read-only):
    no lock (None), as nothing will be written where the data is the one asked for."""
    created = False
    while True:
        created |= not out_dir.exists()
        try:
            out_dir.resolve().mkdir(parents=True, exist_ok=True)
            lock = open(out_dir / ".prepare.lock", "a")
        except OSError as e:  # read-only, a file on the path, a full disk, ...
            if (out_dir / mf.MANIFEST).is_file() and not os.access(out_dir, os.W_OK):
                return False, None
            raise ValueError(f"data dir {out_dir}: cannot create it or its lock file ({e.strerror}); pick a "
                             "writable directory (prepare_data.py --out, --data-dir)") from None
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.fstat(lock.fileno()).st_ino == os.stat(out_dir / ".prepare.lock").st_ino:
                return created, lock
        except FileNotFoundError:
            pass
        lock.close()


def _refresh_chat_templates(given: Tokenizer, out_dir: Path) -> None:
    """The given tokenizer's chat template (``chat_template.jinja``), changed or removed since ``out_dir`` was
    prepared, replaced there: it changes no token id, so it is not in the tokenizer's hash and the data stay
    up to date without it, but a run's export copies the data dir's template."""
    for name in mf.HF_CHAT_TEMPLATE_FILES:
        source, kept = given.path.parent / name, out_dir / name
        if given.kind != "huggingface" or not source.is_file():
            if kept.is_file():
                kept.unlink()
                log.warning("removed %s: the tokenizer %s has none now", kept, given.path)
        elif not kept.is_file() or mf.file_sha256(kept) != mf.file_sha256(source):
            replace_durably(source.read_bytes().decode("utf-8"), kept)  # (its bytes: no newline translation)
            log.warning("replaced %s with the tokenizer's changed chat template (%s)", kept, source)


def _prepare_locked(inputs: list[str] | None, out_dir: Path, cfg: PrepareConfig, overwrite: bool) -> Path:
    # Resolved once: resolving warns about each skipped file, and the fingerprint and the loading
    # must see the same files. Inputs may lie in out_dir: only what prepare writes there is left out.
    own = [out_dir / name for name in (mf.MANIFEST, *mf.TOKENIZER_FILES, ".work", ".tokenizer.tmp",
                                       ".prepare.lock", *(f"{s}.bin" for s in mf.SPLITS),
                                       *(f".{t}.tmp" for t in mf.HF_CHAT_TEMPLATE_FILES))]
    resolved = resolve_inputs(inputs, exclude=own) if inputs is not None else None
    resolved_val = resolve_inputs(list(cfg.val_inputs), exclude=own) if cfg.val_inputs else None
    if cfg.hf_val_split is not None and resolved_val is not None and resolved_val[1] is None:
        # Checked here, not when the validation files are read: that comes after the whole training corpus.
        raise ValueError(f"hf_val_split={cfg.hf_val_split!r} (--hf-val-split) picks the split of a hub dataset "
                         f"given as --val-input, but --val-input here is {len(resolved_val[0])} local files, "
                         "which have no splits: leave --hf-val-split out, or give a hub dataset name as --val-input")
    if resolved and resolved_val:
        val_files = {os.path.realpath(f) for f in resolved_val[0]}  # reached by any name or link
        both = sorted(f for f in resolved[0] if os.path.realpath(f) in val_files)
        if both:
            raise ValueError(f"{len(both)} files are both training input and --val-input, so validation would "
                             f"be trained on: {both[:5]}{' ...' if len(both) > 5 else ''}; leave them out of "
                             "one of the two (e.g. a narrower glob for --input)")
        copies = _copies(resolved[0], resolved_val[0])
        if copies:
            shown = ", ".join(f"{v} = {t}" for t, v in copies[:3]) + (" ..." if len(copies) > 3 else "")
            raise ValueError(f"{len(copies)} --val-input files are byte-identical copies of training input files, "
                             f"so validation would be trained on: {shown}; leave them out of one of the two")
    val_split = cfg.hf_val_split or "validation"
    if resolved and resolved_val and resolved[1] and resolved[1] == resolved_val[1] and cfg.hf_split == val_split:
        raise ValueError(f"hub dataset {resolved[1]!r}, split {val_split!r}, is both the training input and "
                         "--val-input, so validation would be trained on; read another split for one of the two "
                         "(hf_split / hf_val_split, e.g. hf_val_split 'validation')")
    inapplicable = inapplicable_options(resolved, resolved_val, tokenizer_given=cfg.tokenizer is not None)
    cfg = at_defaults(cfg, inapplicable)
    recipe = recipe_of(resolved, cfg, out_dir, resolved_val)
    try:
        old = mf.read_manifest_file(out_dir)
    except mf.DamagedManifest as e:  # e.g. an interrupted copy: as incomplete data
        log.warning("%s; re-preparing", e)
        old = None
    if old is not None and same_recipe(old.get("recipe"), recipe, inapplicable) and mf.files_intact(out_dir, old):
        log.info("%s is up to date (manifest matches); nothing to do", out_dir)
        if cfg.tokenizer is not None:
            _refresh_chat_templates(open_tokenizer(cfg.tokenizer), out_dir)
        _report_windows(old, cfg.seq_len)
        return out_dir
    if old is not None and mf.files_intact(out_dir, old) and not overwrite:
        raise ValueError(f"{out_dir} holds data prepared from another recipe ({recipe_diff(old.get('recipe', {}), recipe)}); "
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


def _copies(train: list[str], val: list[str]) -> list[tuple[str, str]]:
    """(training file, validation file) pairs of byte-identical files: a copy, which the check by name misses.
    Compared by size, then first 64 KiB, then sha256: files that differ are not read through."""
    def head(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read(1 << 16)

    by_size: dict[int, list[str]] = {}
    for f in train:
        by_size.setdefault(os.path.getsize(f), []).append(f)
    pairs = []
    for v in val:
        size = os.path.getsize(v)
        twin = next((t for t in by_size.get(size, [])
                     if size and head(t) == head(v) and mf.file_sha256(t) == mf.file_sha256(v)), None)
        if twin is not None:
            pairs.append((twin, v))
    return pairs


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
    parts = [(corpus, Encode(tok, train_fraction, cfg.num_proc))]
    names = [corpus.description if val_corpus is None else f"the training corpus ({corpus.description})"]
    if val_corpus is not None:  # a fraction of 1: every document of it validates
        parts.append((val_corpus, Encode(tok, 1.0, cfg.num_proc)))
        names.append(f"the validation corpus (--val-input: {val_corpus.description})")
    counts = tokenize_and_write(parts, out_dir, work_dir, dtype, unk_id, num_proc=cfg.num_proc, seq_len=cfg.seq_len)
    named = list(zip(counts, names))  # each corpus's counts: the warnings name the corpus they are about
    seconds = time.perf_counter() - start

    splits = {s: {k: sum(c["splits"][s][k] for c in counts) for k in counts[0]["splits"][s]} for s in mf.SPLITS}
    total = {k: sum(c[k] for c in counts) for k in counts[0] if k != "splits"}
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
            # (~val_fraction x documents go to validation: 30 documents at 0.01 expect 0.3)
            more = (f"; or raise --val-fraction: about val_fraction x {total_docs} documents go to validation "
                    f"({total_docs * cfg.val_fraction:.2g} at {cfg.val_fraction})") if total_docs >= 2 else ""
            warnings.warn(f"the validation split is empty ({total_docs} documents, val_fraction="
                          f"{cfg.val_fraction}); evaluation will see no data{few}{more}", DataWarning, stacklevel=3)
        if splits["train"]["documents"] == 0:
            raise ValueError(f"the training split is empty ({total_docs} documents, all in validation){few}")

    # On disk before any rename shows them, so the manifest (written durably, last) never names a token file
    # a power loss could still empty or cut short.
    for f in [*tok.files, *(out_dir / f".{split}.bin.tmp" for split in mf.SPLITS)]:
        fsync_path(f)
    # Readers holding the old files keep their inodes; new readers see no manifest until it is complete.
    (out_dir / mf.MANIFEST).unlink(missing_ok=True)
    for name in mf.TOKENIZER_FILES:  # another recipe's tokenizer, possibly of the other kind
        (out_dir / name).unlink(missing_ok=True)
    for f in tok.files:
        f.replace(out_dir / f.name)
    tok_path = out_dir / tok.path.name
    for split in mf.SPLITS:
        (out_dir / f".{split}.bin.tmp").replace(out_dir / f"{split}.bin")
    fsync_path(out_dir)  # the renames on disk before the manifest names their files
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
