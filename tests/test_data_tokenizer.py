"""The tokenizer prepare_data trains or takes: trained on the training split only and within its character
budget, and packing with tokenizers that lack a BOS (accepted) or an EOS (refused)."""
import hashlib
import io
import json

import numpy as np
import pytest
import sentencepiece as spm

from relora_ds.data import load_manifest, load_tokenizer, prepare_data
from relora_ds.data import prepare as prepare_mod
from relora_ds.data.tokenizer import training_lines


DOCS = [f"Line {i} of a short document about {w}.\nIts second line {i}." for i, w in
        enumerate(["kings", "queens", "ghosts", "storms", "letters", "swords"] * 25)]


def _held_out(text, fraction):
    """Independent oracle of the documented split: blake2b-64 of the UTF-8 text, little-endian, < fraction."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") < fraction * 2.0**64


def _capture_training_lines(monkeypatch):
    seen = []
    real = prepare_mod.train_tokenizer

    def spy(lines, *a, **kw):
        lines = list(lines)
        seen.extend(lines)
        return real(lines, *a, **kw)

    monkeypatch.setattr(prepare_mod, "train_tokenizer", spy)
    return seen


def test_training_lines_stop_after_the_character_budget():
    """Non-blank lines are taken until they reach max_chars, inside a document too (hand-counted)."""
    texts = ["a\nbb\n\n", "ccc", "dddd", "eeeee"]
    assert list(training_lines(texts, 3)) == ["a", "bb"]  # 1 + 2 = 3 >= 3
    assert list(training_lines(texts, 4)) == ["a", "bb", "ccc"]
    assert list(training_lines(texts, 10**6)) == ["a", "bb", "ccc", "dddd", "eeeee"]
    # One big document (a book given as one .txt document) stops at the budget, not at its end ...
    assert list(training_lines(["a\nbb\nccc\ndddd\n"], 2)) == ["a", "bb"]
    # ... and so does one huge line, cut into pieces of MAX_TRAIN_LINE_BYTES // 4 characters: 3 of 100.
    from relora_ds.data.tokenizer import MAX_TRAIN_LINE_BYTES
    step = MAX_TRAIN_LINE_BYTES // 4
    assert [len(p) for p in training_lines(["x" * (100 * step)], 2 * step + 1)] == [step] * 3


def test_tokenizer_is_trained_on_the_training_split_only_and_within_its_budget(tmp_path, monkeypatch):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    seen = _capture_training_lines(monkeypatch)
    prepare_data([str(path)], tmp_path / "out", vocab_size=300, val_fraction=0.2)
    train_docs = [t for t in DOCS if not _held_out(t, 0.2)]
    assert 0 < len(train_docs) < len(DOCS)  # both splits hold documents
    # Validation text never shapes the tokenizer (it is held out), in corpus order.
    assert seen == [line for t in train_docs for line in t.split("\n")]

    seen.clear()
    budget = 2000
    prepare_data([str(path)], tmp_path / "budget", vocab_size=300, val_fraction=0.2, tokenizer_train_chars=budget)
    lines, total = [], 0
    for line in (x for t in train_docs for x in t.split("\n")):  # the documented budget: lines up to N chars
        lines.append(line)
        total += len(line)
        if total >= budget:
            break
    assert seen == lines and len(seen) < 2 * len(train_docs)


def test_a_tokenizer_without_bos_packs_documents_as_ids_eos(tmp_path):
    """T5's spiece.model (the paper's tokenizer) has no BOS: pad 0, eos 1, unk 2, a unigram model with
    NFKC normalization. It used to be refused; each document is now its ids then EOS (oracle: SentencePiece
    itself on each document, in corpus order)."""
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(DOCS * 2), model_writer=proto, vocab_size=150,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   normalization_rule_name="nmt_nfkc", minloglevel=2)
    model = tmp_path / "spiece.model"
    model.write_bytes(proto.getvalue())
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    out = prepare_data([str(corpus)], tmp_path / "out", tokenizer=str(model), val_fraction=0.0)
    m = load_manifest(out)
    assert (m["bos_id"], m["eos_id"]) == (None, 1)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    want = [i for d in DOCS for i in [*sp.encode(d), 1]]
    assert np.fromfile(m["splits"]["train"]["path"], dtype=m["dtype"]).tolist() == want


def test_a_tokenizer_without_eos_is_refused(tmp_path):
    """Every document is packed as [BOS] text EOS: a model with no EOS piece cannot mark document ends."""
    model = tmp_path / "no_eos.model"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(DOCS * 2), model_prefix=str(tmp_path / "no_eos"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, bos_id=1, eos_id=-1,
                                   unk_id=0, pad_id=-1, minloglevel=2)
    assert spm.SentencePieceProcessor(model_file=str(model)).eos_id() == -1
    with pytest.raises(ValueError, match=r"has no EOS piece \(eos_id=-1\)"):
        load_tokenizer(model)


def test_unk_count_leaves_out_the_packings_bos_and_eos():
    """Hand-counted: documents [BOS 0 5 EOS], [], [BOS EOS], [BOS 0 0 EOS] hold 3 <unk> (id 0) from the text;
    a tokenizer whose unk is its EOS (GPT-2, Pythia) or BOS gets none from the ids the packing added."""
    from relora_ds.data.encode import _unk_count

    values, lengths = np.array([1, 0, 5, 2, 1, 2, 1, 0, 0, 2]), np.array([4, 0, 2, 4])
    assert _unk_count(values, lengths, 0, has_bos=True) == 3
    assert _unk_count(values, lengths, 2, has_bos=True) == 0
    assert _unk_count(values, lengths, 1, has_bos=True) == 0
    assert _unk_count(values, lengths, 1, has_bos=False) == 3  # no BOS added: the 1s are the text's
