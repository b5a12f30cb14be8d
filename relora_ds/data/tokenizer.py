"""The SentencePiece tokenizer: train one on the corpus, or load an existing ``.model``.

Trained models follow LLaMA's recipe: BPE, byte fallback (no input is ever <unk>), identity
normalization and no whitespace folding (so ``decode(encode(text)) == text`` and verse keeps its line
breaks), digits split, ids unk=0, bos=1, eos=2 and no pad (sequences are packed, nothing is padded).
"""
from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from relora_ds.data.manifest import file_sha256, load_manifest
from relora_ds.data.sources import DataWarning

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# SentencePiece skips longer training "sentences"; we feed lines, and a Wikipedia paragraph can exceed
# the 4192-byte default.
MAX_TRAIN_LINE_BYTES = 1 << 16
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def training_lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Non-empty lines of `texts`, stopping after about `max_chars` characters. A line over
    MAX_TRAIN_LINE_BYTES (which SentencePiece would skip: a corpus of only such lines left it nothing to
    train on) is cut into pieces under that size, at the last space of each piece where there is one."""
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                for piece in _pieces(line):
                    yield piece
                seen += len(line)
        if seen >= max_chars:
            return


def _pieces(line: str) -> Iterator[str]:
    if len(line) * 4 <= MAX_TRAIN_LINE_BYTES or len(line.encode()) <= MAX_TRAIN_LINE_BYTES:
        yield line
        return
    step = MAX_TRAIN_LINE_BYTES // 4  # characters: at most 4 UTF-8 bytes each
    while line:
        cut = len(line) if len(line) <= step else (line.rfind(" ", step // 2, step) + 1 or step)
        piece, line = line[:cut], line[cut:]
        if piece.strip():
            yield piece


def train_tokenizer(lines: Iterable[str], model_path: Path, *, vocab_size: int, num_threads: int = 1) -> int:
    """Train a BPE SentencePiece model on `lines` and write it to `model_path`; returns its vocab size.

    A `vocab_size` larger than the corpus supports is capped to the largest one that works, with a
    warning; one too small for byte fallback plus the corpus's characters is a ValueError. Nothing is
    random: every line is used (no ``input_sentence_size`` sampling) and BPE merges are deterministic,
    whatever `num_threads` (checked: identical pieces with 1 and 2 threads).
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    lines = list(lines)  # trained twice if the vocab has to be capped
    if not lines:
        raise ValueError("empty corpus: no non-empty line of text to train the tokenizer on")
    options = dict(
        model_type="bpe", byte_fallback=True, character_coverage=0.9995,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        max_sentence_length=MAX_TRAIN_LINE_BYTES, num_threads=max(1, num_threads), minloglevel=2,
    )
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto,
                                       vocab_size=vocab_size, **options)
    except RuntimeError as e:
        too_high, too_small = _TOO_HIGH.search(str(e)), _TOO_SMALL.search(str(e))
        if too_small:
            raise ValueError(
                f"vocab_size={vocab_size} is too small for this corpus: byte fallback and its characters "
                f"need at least {too_small.group(2)} pieces"
            ) from e
        if not too_high:
            raise
        cap = int(too_high.group(2))
        warnings.warn(f"vocab_size={vocab_size} is larger than this corpus supports; capped to {cap}",
                      DataWarning, stacklevel=2)
        proto = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto,
                                       vocab_size=cap, **options)
    model_path.write_bytes(_without_thread_count(proto.getvalue()))
    return load_tokenizer(model_path).vocab_size()


def _without_thread_count(serialized: bytes) -> bytes:
    """The model with its recorded ``num_threads`` reset: the pieces do not depend on it, and the file's
    hash (stored with the data, compared at training time) must not either."""
    # sentencepiece's generated protobuf module; protobuf comes with tensorboard (setup.py).
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(serialized)
    model.trainer_spec.num_threads = 1
    return model.SerializeToString()


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    """Load a SentencePiece ``.model``; it must define EOS (every document ends with one). Documents start
    with BOS where the model has one; T5's ``spiece.model`` (the paper's tokenizer) has none."""
    path = Path(path)
    if path.is_dir():
        hint = (f"; pass {str(path / 'tokenizer.model')!r}" if (path / "tokenizer.model").is_file() else
                " and holds no tokenizer.model (a Hugging Face tokenizer.json cannot be used: the data pipeline "
                "is SentencePiece)")
        raise ValueError(f"tokenizer {str(path)!r} is a directory, not a SentencePiece .model file{hint}")
    if not path.is_file():
        raise ValueError(f"tokenizer file {str(path)!r} does not exist")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{str(path)!r} is not a SentencePiece model: {e}") from e
    if sp.eos_id() < 0:
        raise ValueError(f"tokenizer {str(path)!r} has no EOS piece (eos_id={sp.eos_id()}); documents are "
                         f"packed as [BOS] text EOS, so the model needs an end-of-document token")
    return sp


def check_tokenizer_matches(data_dir: str | Path, vocab_size: int | None = None, *,
                            tokenizer_sha256: str | None = None) -> dict:
    """Check a prepared data dir against the model (and checkpoint) that will train on it.

    Raises ValueError if the tokenizer file in `data_dir` is not the one its manifest names, if
    `vocab_size` (the model's embedding rows) is smaller than the tokenizer's, or if
    `tokenizer_sha256` (e.g. stored in a checkpoint) differs from the manifest's. Returns the manifest.
    """
    manifest = load_manifest(data_dir)
    actual = file_sha256(manifest["tokenizer_path"])
    if actual != manifest["tokenizer_sha256"]:
        raise ValueError(f"tokenizer {manifest['tokenizer_path']!r} has sha256 {actual[:12]}..., but the "
                         f"data in {str(data_dir)!r} was tokenized with {manifest['tokenizer_sha256'][:12]}...; "
                         f"re-run prepare_data")
    if tokenizer_sha256 is not None and tokenizer_sha256 != manifest["tokenizer_sha256"]:
        raise ValueError(f"the data in {str(data_dir)!r} was tokenized with tokenizer sha256 "
                         f"{manifest['tokenizer_sha256'][:12]}..., not the expected {tokenizer_sha256[:12]}... "
                         f"(a checkpoint trained on other data?)")
    if vocab_size is not None and vocab_size < manifest["vocab_size"]:
        raise ValueError(f"model vocab_size={vocab_size} is smaller than the tokenizer's "
                         f"{manifest['vocab_size']} (data dir {str(data_dir)!r}); use vocab_size >= "
                         f"{manifest['vocab_size']}")
    return manifest
