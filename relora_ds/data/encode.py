"""Tokenizing a corpus into the packed split files: every document -> ``[BOS] ids EOS``, assigned to train or
validation by a hash of its text, appended to its split's file in corpus order.

Tokenization runs through ``datasets.map`` (``num_proc`` processes) or, when streaming, through the
tokenizer's own thread pool inside ``IterableDataset.map``; both give byte-identical files.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from tqdm.auto import tqdm

from relora_ds.data import manifest as mf
from relora_ds.data.sources import Corpus
from relora_ds.data.tokenizer import Tokenizer

MAP_BATCH = 1000
_WRITE_BATCH = 10_000


def in_validation(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: a pure function of its text.

    blake2b is stable across Python processes, runs and machines (Python's ``hash()`` is salted), and
    identical documents land in the same split, so duplicates never leak from train into validation.
    """
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64


class Encode:
    """``datasets.map`` function: texts -> ``[BOS] ids EOS`` (empty for blank texts) and the split flag."""

    def __init__(self, tokenizer: Tokenizer, val_fraction: float, num_threads: int):
        self.tokenizer, self.val_fraction, self.num_threads = tokenizer, val_fraction, num_threads

    def __call__(self, batch: dict) -> dict:
        texts = []
        for text in batch["text"]:
            if text is not None and not isinstance(text, str):
                raise ValueError(f"the text column holds {type(text).__name__} values, not strings: "
                                 f"{str(text)[:80]!r}")
            texts.append(text or "")
        keep = [bool(t.strip()) for t in texts]
        nonblank = [t for t, k in zip(texts, keep, strict=True) if k]
        encoded = iter(self.tokenizer.encode_documents(nonblank, self.num_threads))
        empty = np.zeros(0, dtype=np.int32)
        ids = [next(encoded) if k else empty for k in keep]
        first = 1 if self.tokenizer.bos_id is not None else 0  # (BOS may be the EOS id: OPT)
        return {
            "ids": ids,
            # the text produced the EOS id (an eos_token that is a plain vocabulary entry): document masking
            # would end the document there
            "holds_eos": np.array([bool((d[first:-1] == self.tokenizer.eos_id).any()) for d in ids], dtype=bool),
            "validation": np.array([in_validation(t, self.val_fraction) for t in texts], dtype=bool),
            "spells_special": np.array(self.tokenizer.spells_special_token(texts), dtype=bool),
            "no_text": np.array([text is None for text in batch["text"]], dtype=bool),
        }


_TOKENIZED = datasets.Features({"ids": datasets.List(datasets.Value("int32")),
                                "validation": datasets.Value("bool"), "spells_special": datasets.Value("bool"),
                                "holds_eos": datasets.Value("bool"),
                                "no_text": datasets.Value("bool")})  # the text column null or absent


def _tokenized(corpus: Corpus, encode: Encode, num_proc: int, cache_file: Path):
    """(the corpus mapped to ids and split flags, a progress bar or None)."""
    ds = corpus.dataset
    if corpus.streaming:
        tokenized = ds.map(encode, batched=True, batch_size=MAP_BATCH, remove_columns=["text"],
                           features=_TOKENIZED)
        return tokenized, tqdm(desc="Tokenizing", unit=" docs")
    # datasets.map runs `num_proc` processes (each with one SentencePiece thread) and keeps order.
    encode.num_threads = 1
    tokenized = ds.map(encode, batched=True, batch_size=MAP_BATCH, remove_columns=["text"],
                       features=_TOKENIZED, num_proc=num_proc if num_proc > 1 else None,
                       cache_file_name=str(cache_file), load_from_cache_file=False, desc="Tokenizing")
    return tokenized, None


def tokenize_and_write(parts: list[tuple[Corpus, Encode]], out_dir: Path, work_dir: Path, dtype: str,
                       unk_id: int, *, num_proc: int, seq_len: int | None) -> list[dict]:
    """Tokenize each (corpus, encoder) in turn and append each document to ``out_dir/.{split}.bin.tmp``;
    returns each part's counts (tokens and documents per split, documents longer than `seq_len` + 1 tokens,
    empty documents, records without a text, <unk> tokens, documents spelling a special token), so that a
    warning can name the corpus it is about. `work_dir` holds datasets' cache files."""
    all_counts = []
    files = {s: open(out_dir / f".{s}.bin.tmp", "wb") for s in mf.SPLITS}
    try:
        for i, (corpus, encode) in enumerate(parts):
            counts = {"splits": {s: {"tokens": 0, "documents": 0, "longer_than_seq_len": 0} for s in mf.SPLITS},
                      "empty_documents": 0, "records_without_text": 0, "unk_tokens": 0,
                      "documents_spelling_special_tokens": 0, "documents_holding_eos": 0}
            _write_part(corpus, encode, num_proc, seq_len, work_dir / f"tokenized{i}.arrow", files, counts,
                        dtype, unk_id)
            all_counts.append(counts)
    finally:
        for f in files.values():
            f.close()
    return all_counts


def _write_part(corpus, encode, num_proc, seq_len, cache_file, files, counts, dtype, unk_id) -> None:
    """Append one corpus's documents to the split files, adding to `counts` (tokenize_and_write's)."""
    stats = counts["splits"]
    tokenized, progress = _tokenized(corpus, encode, num_proc, cache_file)
    try:
        for table in tokenized.with_format("arrow").iter(batch_size=_WRITE_BATCH):
            ids = table.column("ids").combine_chunks()
            lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
            values = ids.flatten().to_numpy(zero_copy_only=False)
            is_val = table.column("validation").to_numpy(zero_copy_only=False)
            no_text = table.column("no_text").to_numpy(zero_copy_only=False)
            counts["records_without_text"] += int(no_text.sum())
            counts["empty_documents"] += int(((lengths == 0) & ~no_text).sum())
            counts["unk_tokens"] += _unk_count(values, lengths, unk_id, encode.tokenizer.bos_id is not None)
            counts["documents_spelling_special_tokens"] += int(pc.sum(table.column("spells_special")).as_py() or 0)
            counts["documents_holding_eos"] += int(pc.sum(table.column("holds_eos")).as_py() or 0)
            token_is_val = np.repeat(is_val, lengths)
            for split, doc_mask, tok_mask in (("train", ~is_val, ~token_is_val),
                                              ("validation", is_val, token_is_val)):
                chunk = values[tok_mask].astype(dtype)
                chunk.tofile(files[split])
                s = stats[split]
                s["tokens"] += int(chunk.size)
                s["documents"] += int((doc_mask & (lengths > 0)).sum())
                if seq_len:
                    s["longer_than_seq_len"] += int((doc_mask & (lengths > seq_len + 1)).sum())
            if progress is not None:
                progress.update(table.num_rows)
    finally:
        if progress is not None:
            progress.close()


def _unk_count(values: np.ndarray, lengths: np.ndarray, unk_id: int, has_bos: bool) -> int:
    """<unk> ids the encoder produced in packed documents (``values``, ``lengths`` tokens each), not counting
    the BOS/EOS the packing added: GPT-2 and Pythia tokenizers name one token unk, bos and eos
    (``<|endoftext|>``), which is no <unk> from the text."""
    is_unk = values == unk_id
    ends = np.cumsum(lengths)[lengths > 0]
    is_unk[ends - 1] = False
    if has_bos:
        is_unk[ends - lengths[lengths > 0]] = False
    return int(is_unk.sum())
