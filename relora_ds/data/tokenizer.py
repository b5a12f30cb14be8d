"""The tokenizer: train a SentencePiece model on the corpus, or use an existing one -- a SentencePiece
``.model`` or a Hugging Face ``tokenizer.json`` (LLaMA-3, Qwen, Mistral, ...), for continued pre-training of
a model on its own token ids. :class:`Tokenizer` is what prepare_data encodes with, either kind.

Trained models follow LLaMA's recipe: BPE, byte fallback (no input is ever <unk>), identity
normalization and no whitespace folding (so ``decode(encode(text)) == text`` and verse keeps its line
breaks), digits split, ids unk=0, bos=1, eos=2 and no pad (sequences are packed, nothing is padded).
"""
from __future__ import annotations

import io
import json
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm

from relora_ds.data import manifest as mf
from relora_ds.data.inputs import DataWarning

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# SentencePiece skips longer training "sentences"; we feed lines, and a Wikipedia paragraph can exceed
# the 4192-byte default.
MAX_TRAIN_LINE_BYTES = 1 << 16
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def training_lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Non-empty lines of `texts`, stopping at the line (or piece) that reaches `max_chars` characters, also
    inside a document: a whole book or dump given as one `.txt` document must not feed SentencePiece all of
    itself. A line over MAX_TRAIN_LINE_BYTES (which SentencePiece would skip: a corpus of only such lines
    left it nothing to train on) is cut into pieces under that size, at the last space of each piece where
    there is one."""
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            for piece in _pieces(line):
                yield piece
                seen += len(piece)
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
    if path.is_dir() or path.suffix == ".json":
        raise ValueError(f"tokenizer {str(path)!r} is not a SentencePiece .model file (open_tokenizer reads "
                         "model directories and Hugging Face tokenizer.json files)")
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


def resolve_tokenizer(path: str | Path) -> Path:
    """The tokenizer file `path` names: a SentencePiece ``.model``, a Hugging Face ``tokenizer.json``, or a
    model directory holding one of them (its ``tokenizer.model`` where it has both: the file LLaMA-2-style
    checkpoints, our exports and data dirs prepared before tokenizer.json was read all use)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                return path / name
        raise ValueError(f"tokenizer directory {str(path)!r} holds neither a SentencePiece tokenizer.model nor a "
                         "Hugging Face tokenizer.json")
    if not path.is_file():
        raise ValueError(f"tokenizer {str(path)!r} does not exist (give a SentencePiece .model, a Hugging Face "
                         "tokenizer.json or a model directory holding one)")
    return path


@dataclass
class Tokenizer:
    """A tokenizer as the data pipeline uses it: which file it is, its special ids, and a batch encoder
    packing each document as ``[BOS] ids EOS``. Holds paths, not the loaded model, so that it pickles
    cheaply to ``datasets.map`` workers; the model loads on first use in each process."""

    path: Path
    """The ``.model`` or ``tokenizer.json`` (a Hugging Face tokenizer's other files lie beside it)."""
    vocab_size: int
    """Highest id + 1 (added tokens included): the model's embedding must have at least this many rows."""
    bos_id: int | None
    """Starts every document; None where the tokenizer adds none (T5, Qwen, GPT-2)."""
    eos_id: int
    """Ends every document."""
    unk_id: int | None
    pad_id: int | None
    _backend: object = field(default=None, repr=False, compare=False)
    _special_pattern: re.Pattern | None = field(default=None, repr=False, compare=False)

    @property
    def kind(self) -> str:
        return "huggingface" if self.path.suffix == ".json" else "sentencepiece"

    @property
    def files(self) -> list[Path]:
        """The files that are this tokenizer (what a data dir keeps a copy of, and an export)."""
        if self.kind == "sentencepiece":
            return [self.path]
        beside = (self.path.parent / name for name in (*mf.HF_TOKENIZER_FILES[1:], *mf.HF_CHAT_TEMPLATE_FILES))
        return [self.path, *(f for f in beside if f.is_file())]

    def copy_to(self, directory: Path) -> None:
        """Copy this tokenizer's files into `directory` under the standard names (``tokenizer.model`` or
        ``tokenizer.json``, the config files as they are named)."""
        own_name = "tokenizer.model" if self.kind == "sentencepiece" else "tokenizer.json"
        for f in self.files:
            shutil.copyfile(f, Path(directory) / (own_name if f == self.path else f.name))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_backend": None, "_special_pattern": None}

    @property
    def backend(self):
        """The loaded model (a SentencePieceProcessor or a ``tokenizers.Tokenizer``), loaded on first use."""
        if self._backend is None:
            self._backend = (spm.SentencePieceProcessor(model_file=str(self.path)) if self.kind == "sentencepiece"
                             else _hf_backend(self.path))
        return self._backend

    def spells_special_token(self, texts: list[str]) -> list[bool]:
        """Whether each text contains the spelling of one of a Hugging Face tokenizer's special tokens
        ("<|endoftext|>"): encoded as text here, where AutoTokenizer's default reads the token. Always False
        for SentencePiece, which never reads them from text (nor does the tokenizer.json exported from it)."""
        if self.kind == "sentencepiece":
            return [False] * len(texts)
        if self._special_pattern is None:
            specials = sorted({t.content for t in self.backend.get_added_tokens_decoder().values() if t.special})
            self._special_pattern = re.compile("|".join(map(re.escape, specials)) or r"(?!)")  # (?!): none
        return [self._special_pattern.search(t) is not None for t in texts]

    def special_example(self) -> str:
        """A few special-token spellings, for messages."""
        specials = [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special]
        return ", ".join(repr(t) for t in specials[:3]) + (", ..." if len(specials) > 3 else "")

    def spelled(self, i: int | None) -> str:
        """Token `i` as its piece and id, for messages ("no token" for None)."""
        if i is None:
            return "no token"
        piece = self.backend.id_to_piece(i) if self.kind == "sentencepiece" else self.backend.id_to_token(i)
        return f"{piece!r} (id {i})"

    def encode_documents(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """``[BOS] ids EOS`` (int32) of each text. Text that spells a special token ("<s>", "<|endoftext|>")
        is encoded as text, as SentencePiece does: only the packing writes special ids."""
        if self.kind == "sentencepiece":
            return [np.asarray(ids, dtype=np.int32) for ids in self.backend.encode(
                texts, add_bos=self.bos_id is not None, add_eos=True, out_type="numpy", num_threads=num_threads)]
        bos, eos = [self.bos_id] if self.bos_id is not None else [], [self.eos_id]
        # The Rust encoder batches over its own thread pool (RAYON_NUM_THREADS); num_threads is SentencePiece's.
        return [np.asarray(bos + e.ids + eos, dtype=np.int32)
                for e in self.backend.encode_batch(texts, add_special_tokens=False)]


def open_tokenizer(path: str | Path) -> Tokenizer:
    """The :class:`Tokenizer` in `path` (a ``.model``, a ``tokenizer.json`` or a model directory, see
    :func:`resolve_tokenizer`). A Hugging Face tokenizer's BOS and EOS are the ``bos_token`` and
    ``eos_token`` of its tokenizer_config.json (or special_tokens_map.json), as transformers reads them;
    documents start with BOS where the tokenizer itself adds it (tokenizer.json's post-processor):
    LLaMA-3 does, Qwen and GPT-2 do not."""
    given, path = Path(path), resolve_tokenizer(path)
    if path.suffix != ".json":
        try:
            sp = load_tokenizer(path)
        except ValueError as e:
            if given.is_dir() and (given / "tokenizer.json").is_file():  # e.g. a tiktoken file of that name
                raise ValueError(f"{e}; to use the directory's Hugging Face tokenizer, pass "
                                 f"{str(given / 'tokenizer.json')!r}") from e
            raise
        return Tokenizer(path, sp.vocab_size(), sp.bos_id() if sp.bos_id() >= 0 else None, sp.eos_id(),
                         sp.unk_id() if sp.unk_id() >= 0 else None, sp.pad_id() if sp.pad_id() >= 0 else None)
    backend = _hf_backend(path)
    special = _hf_special_tokens(path.parent)
    from tokenizers import Tokenizer as HFTokenizer

    written = HFTokenizer.from_file(str(path))  # (AutoTokenizer would append a misspelt special token as new)

    def token_id(name: str) -> int | None:
        token = special.get(name)
        if token is None:
            return None
        i = backend.token_to_id(token)
        if i is None or written.token_to_id(token) is None:
            raise ValueError(f"{path.parent}: {name} {token!r} is not a token of {path.name}; set {name} in "
                             "tokenizer_config.json to one of its tokens (or add the token to the tokenizer)")
        return i

    eos = token_id("eos_token")
    if eos is None:
        raise ValueError(f"{path.parent} names no eos_token (tokenizer_config.json or special_tokens_map.json): "
                         "documents are packed as [BOS] text EOS, so the tokenizer needs an end-of-document token. "
                         + ("Set eos_token in its tokenizer_config.json to one of the tokenizer's tokens (e.g. "
                            "\"</s>\" or \"<|endoftext|>\", as its vocabulary spells it)"
                            if (path.parent / "tokenizer_config.json").is_file() else
                            "Give the model directory (or the tokenizer.json inside it) that holds its "
                            "tokenizer_config.json, or write one there with eos_token set"))
    bos = token_id("bos_token")
    # tokenizer.json's post-processor decides, as in transformers 5 (its TokenizersBackend ignores the
    # config's add_bos_token, which 4.x's LlamaTokenizerFast applied): where the two disagree, say so.
    plain = backend.encode("a", add_special_tokens=False).ids
    added = backend.encode("a", add_special_tokens=True).ids
    prefix = added[:added.index(plain[0])] if plain and plain[0] in added else added
    if prefix and prefix != [bos]:  # what AutoTokenizer puts first is what the documents start with
        if len(prefix) > 1:
            raise ValueError(f"{path.parent}: tokenizer.json's post-processor puts {len(prefix)} tokens "
                             f"({[backend.id_to_token(i) for i in prefix]}) before each text; documents are packed "
                             "as [BOS] text EOS, with one BOS at most: use a tokenizer that adds one (or none)")
        warnings.warn(f"{path.parent}: tokenizer.json's post-processor starts each text with "
                      f"{backend.id_to_token(prefix[0])!r} (id {prefix[0]}), while tokenizer_config.json names "
                      f"bos_token {special.get('bos_token')!r}: documents start with the post-processor's, as "
                      "AutoTokenizer's encodings do", DataWarning, stacklevel=2)
        bos = prefix[0]
    adds_bos = bool(prefix)
    if special.get("add_bos_token") is not None and bool(special["add_bos_token"]) != adds_bos:
        does = "adds" if adds_bos else "does not add"
        warnings.warn(f"{path.parent}: tokenizer_config.json says add_bos_token={special['add_bos_token']}, but "
                      f"tokenizer.json's post-processor {does} {special.get('bos_token')!r}; "
                      f"documents follow tokenizer.json ({'with' if adds_bos else 'without'} BOS), as transformers 5's "
                      "AutoTokenizer does (4.x followed add_bos_token)", DataWarning, stacklevel=2)
    vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
    return Tokenizer(path, vocab_size, bos if adds_bos else None, eos, token_id("unk_token"), token_id("pad_token"),
                     _backend=backend)


def tokenizer_difference(a: str | Path, b: str | Path) -> str | None:
    """None where two tokenizer files give the same ids, else how they differ: SentencePiece ``.model``
    bytes; for ``tokenizer.json``, its JSON content (a re-save may reorder or re-indent it), then the
    document packing (BOS, EOS). Files of different kinds are different tokenizers."""
    a, b = Path(a), Path(b)
    if (a.suffix == ".json") != (b.suffix == ".json"):
        return f"a {a.name} and a {b.name}"
    if a.suffix != ".json":
        return None if a.read_bytes() == b.read_bytes() else "other pieces"
    if json.loads(a.read_text(encoding="utf-8")) != json.loads(b.read_text(encoding="utf-8")):
        return "other pieces"
    ta, tb = open_tokenizer(a), open_tokenizer(b)
    if json.loads(ta.backend.to_str()) != json.loads(tb.backend.to_str()):  # one config's class rebuilds it
        return "the same tokenizer.json, but another pipeline (tokenizer_config.json's tokenizer_class or special " \
               "tokens)"
    for what, ia, ib in (("end", ta.eos_id, tb.eos_id), ("start", ta.bos_id, tb.bos_id)):
        if ia != ib:
            return (f"the same pieces, but its documents {what} with {ta.spelled(ia)}, not {tb.spelled(ib)} "
                    "(tokenizer_config.json)")
    return None


def _hf_backend(path: Path):
    """The ``tokenizers.Tokenizer`` AutoTokenizer encodes with: in a directory with a tokenizer_config.json, the one
    AutoTokenizer builds there (its class may rebuild the pipeline: transformers 5's LlamaTokenizer puts its own
    Metaspace pre-tokenizer in place of the file's normalizer; it adds the config's special tokens the file lacks
    and marks them special), else the file's."""
    from tokenizers import Tokenizer as HFTokenizer

    config = path.parent / "tokenizer_config.json"
    try:
        cls = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class") if config.is_file() else None
    except ValueError as e:  # (also UnicodeDecodeError)
        raise ValueError(f"{config} is not valid JSON: {e}") from None
    try:
        if path.name != "tokenizer.json" or not config.is_file():  # (AutoTokenizer reads tokenizer.json only)
            backend = HFTokenizer.from_file(str(path))
        else:
            from transformers import AutoTokenizer

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its notes on the class's own defaults
                backend = HFTokenizer.from_str(AutoTokenizer.from_pretrained(path.parent).backend_tokenizer.to_str())
    except Exception as e:  # the Rust side raises its own exception type for a malformed file
        raise ValueError(f"{str(path)!r} is not a Hugging Face tokenizer.json"
                         f"{f' that transformers loads as {cls}' if cls else ''}: {e}") from e
    backend.encode_special_tokens = True  # "<|endoftext|>" in a document is text, not the special token
    backend.no_truncation()
    backend.no_padding()
    return backend


def _hf_special_tokens(directory: Path) -> dict:
    """bos/eos/unk/pad token strings (None where unset) and add_bos_token (None where unset) of a Hugging
    Face tokenizer directory: special_tokens_map.json over tokenizer_config.json, as transformers reads them
    (checked: where the two name different EOS tokens, AutoTokenizer takes the map's; a token may be written
    as ``{"content": ...}``)."""
    found: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (directory / name).is_file():
            try:
                found.update(json.loads((directory / name).read_text(encoding="utf-8")))
            except json.JSONDecodeError as e:
                raise ValueError(f"{directory / name} is not valid JSON: {e}") from e
    special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in found.items()
               if k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return {**special, "add_bos_token": found.get("add_bos_token")}


def check_tokenizer_matches(data_dir: str | Path, vocab_size: int | None = None, *,
                            tokenizer_sha256: str | None = None) -> dict:
    """Check a prepared data dir against the model (and checkpoint) that will train on it.

    Raises ValueError if the tokenizer file in `data_dir` is not the one its manifest names, if
    `vocab_size` (the model's embedding rows) is smaller than the tokenizer's, or if
    `tokenizer_sha256` (e.g. stored in a checkpoint) differs from the manifest's. Returns the manifest.
    """
    manifest = mf.load_manifest(data_dir)
    actual = mf.tokenizer_sha256(manifest["tokenizer_path"])
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
