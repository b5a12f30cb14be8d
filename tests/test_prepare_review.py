"""prepare_data's token files against an independent tokenization: the texts read with plain json/gzip/pyarrow/
open(), each non-blank one encoded by SentencePiece directly as ``BOS ids EOS`` and concatenated in input order
(README "Data"). Unicode edge cases, every input format, workers and streaming, .txt paragraphs and lines, and
Parquet/Arrow text columns holding invalid UTF-8."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from relora_ds.data import load_manifest, prepare_data
from relora_ds.data.inputs import DataWarning
from test_data_inputs import SENTENCES, write_jsonl

# NUL, CRLF, zero-width characters and a BOM inside a text, emoji sequences, blank and whitespace-only texts
# (U+3000 and U+00A0 are whitespace too: dropped), a combining mark, a line over 1 MB.
EDGE_TEXTS = ["hello world", "nul\x00inside", "crlf\r\nline two\r\n", "zero\u200bwidth\u200d joiner\ufeff mid",
              "emoji \U0001F600\U0001F1EB\U0001F1F7\U0001F469\u200d\U0001F467", "", "   \t\n  ", "\u3000", "\u00a0",
              "combining e\u0301", "x" * 1_100_000 + " long", "last"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    out = prepare_data([write_jsonl(d / "t.jsonl", SENTENCES + ["é 😀 γ"])], d / "tok", vocab_size=300)
    return str(out / "tokenizer.model")


def expected(tokenizer: str, texts) -> np.ndarray:
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    ids = [[sp.bos_id(), *sp.encode(t), sp.eos_id()] for t in texts if isinstance(t, str) and t.strip()]
    return np.array([i for doc in ids for i in doc], dtype=np.int64)


def train_tokens(out) -> np.ndarray:
    m = load_manifest(out)
    return np.fromfile(m["splits"]["train"]["path"], dtype=m["dtype"]).astype(np.int64)


def _edge_inputs(tmp_path) -> list[str]:
    a = tmp_path / "a.jsonl"  # ASCII escapes (json.dumps' default): \u0000, surrogate pairs
    a.write_text("".join(json.dumps({"text": t}) + "\n" for t in EDGE_TEXTS), encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:  # raw UTF-8
        f.writelines(json.dumps({"text": t, "meta": i}, ensure_ascii=False) + "\n" for i, t in enumerate(EDGE_TEXTS))
    pq.write_table(pa.table({"text": pa.array(EDGE_TEXTS + [None], pa.large_string())}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_bytes("one\r\ntwo\rthree\n\nfour\x00 \U0001F600\n".encode())
    return [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.parquet", "d.txt")]


@pytest.mark.parametrize("streaming,num_proc", [(False, 1), (False, 2), (True, 2)])
def test_the_token_stream_is_an_independent_tokenization_of_each_input(tmp_path, tokenizer, streaming, num_proc):
    files = _edge_inputs(tmp_path)
    txt = "one\ntwo\nthree\n\nfour\x00 \U0001F600\n"  # universal newlines, as README says
    out = prepare_data(files, tmp_path / "out", tokenizer=tokenizer, val_fraction=0.0, streaming=streaming,
                       num_proc=num_proc)
    want = expected(tokenizer, EDGE_TEXTS * 3 + [txt])
    np.testing.assert_array_equal(train_tokens(out), want)
    assert load_manifest(out)["splits"]["train"]["documents"] == 3 * 8 + 1


@pytest.mark.parametrize("unit", ["paragraph", "line"])
def test_txt_paragraphs_and_lines_are_an_independent_split_of_the_text(tmp_path, tokenizer, unit):
    text = ("\n \nfirst para\nstill first  \n\n\nsecond\r\n\r\nthird \u2028 same line\n\t\n"
            "fourth\x0cpara\n\u3000\nfifth\n \n \n")
    (tmp_path / "p.txt").write_bytes(text.encode())
    lines = text.replace("\r\n", "\n").split("\n")
    if unit == "line":
        docs = lines
    else:  # runs of lines that are not blank (whitespace only), joined by their newlines
        docs, run = [], []
        for line in lines + [""]:
            if line.strip():
                run.append(line)
            elif run:
                docs, run = docs + ["\n".join(run)], []
    out = prepare_data([str(tmp_path / "p.txt")], tmp_path / "out", tokenizer=tokenizer, val_fraction=0.0,
                       txt_unit=unit)
    np.testing.assert_array_equal(train_tokens(out), expected(tokenizer, docs))


def _string_array(values: list[bytes | None], large: bool) -> pa.Array:
    """A string column holding `values` as they are, invalid UTF-8 included (what pyarrow itself refuses to
    build, and some other writers write)."""
    binary = pa.array(values, pa.large_binary() if large else pa.binary())
    return pa.Array.from_buffers(pa.large_string() if large else pa.string(), len(binary), binary.buffers())


@pytest.mark.parametrize("fmt,streaming", [("parquet", False), ("parquet", True), ("arrow", False)])
def test_invalid_utf8_in_a_parquet_or_arrow_text_column_is_replaced_and_counted(tmp_path, tokenizer, fmt,
                                                                                streaming):
    """As in .txt and JSON files (README: invalid UTF-8 bytes become U+FFFD, counted per file). A string column
    holding one failed the whole prepare with a bare UnicodeDecodeError naming no file (a review)."""
    raw = [b"clean text", None, b"bad \xff byte", b"two \xfe\xfd bytes and \xc3", "caf\u00e9".encode()]
    table = pa.table({"id": list(range(len(raw))), "text": _string_array(raw, large=fmt == "arrow")})
    path = tmp_path / f"in.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        with pa.ipc.new_stream(path, table.schema) as writer:
            writer.write_table(table)
    before = path.read_bytes()
    with pytest.warns(DataWarning, match=rf"{path.name}: replaced 4 invalid UTF-8 bytes with U\+FFFD"):
        out = prepare_data([str(path)], tmp_path / "out", tokenizer=tokenizer, val_fraction=0.0,
                           streaming=streaming)
    # each of these invalid sequences is one byte: Python's "replace" makes each one U+FFFD
    want = expected(tokenizer, [None if b is None else b.decode("utf-8", "replace") for b in raw])
    np.testing.assert_array_equal(train_tokens(out), want)
    manifest = load_manifest(out)
    assert manifest["warnings"]["invalid_utf8_bytes"] == {str(path): 4}
    assert manifest["splits"]["train"]["documents"] == 4
    assert path.read_bytes() == before  # repaired in a copy


@pytest.mark.parametrize("gz", [False, True])
def test_a_copy_of_a_training_file_as_val_input_is_refused(tmp_path, tokenizer, gz):
    """The same file by two names is refused (test_data_inputs.py); a copy of it held the same documents and
    was accepted: validation then measured the training data (a review). A file of the same size that
    differs is read as validation."""
    suffix = ".jsonl.gz" if gz else ".jsonl"
    train, copy, other = (tmp_path / f"{name}{suffix}" for name in ("train", "copy", "other"))
    body = "".join(json.dumps({"text": t}) + "\n" for t in SENTENCES * 10).encode()
    assert len(body) > 1 << 16  # other differs past the first 64 KiB: the sha256 tells them apart
    changed = body[:-20] + body[-20:].replace(b"swords", b"sworde")
    for path, data in ((train, body), (copy, body), (other, changed)):
        path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    assert gz or train.stat().st_size == other.stat().st_size
    with pytest.raises(ValueError, match=rf"1 --val-input files are byte-identical copies of training input "
                                         rf"files, so validation would be trained on: {copy} = {train}"):
        prepare_data([str(train)], tmp_path / "out", tokenizer=tokenizer, val_inputs=[str(copy)])
    out = prepare_data([str(train)], tmp_path / "out2", tokenizer=tokenizer, val_inputs=[str(other)])
    sp_texts = [json.loads(line)["text"] for line in changed.decode().splitlines()]
    m = load_manifest(out)
    val = np.fromfile(m["splits"]["validation"]["path"], dtype=m["dtype"]).astype(np.int64)
    np.testing.assert_array_equal(val, expected(tokenizer, sp_texts))


def test_an_empty_validation_split_of_many_small_documents_names_val_fraction(tmp_path, tokenizer):
    """30 short documents at the default val_fraction 0.01 expect 0.3 in validation: the warning named --txt-unit
    (.txt only) and --val-input, never --val-fraction, which a new user then had to guess (and which works)."""
    texts = [f"document {i}: " + " ".join(SENTENCES) for i in range(30)]
    files = [write_jsonl(tmp_path / "d.jsonl", texts)]
    with pytest.warns(DataWarning, match=r"validation split is empty \(30 documents, val_fraction=0.01\).*raise "
                                         r"--val-fraction: about val_fraction x 30 documents go to validation "
                                         r"\(0.3 at 0.01\)"):
        prepare_data(files, tmp_path / "a", tokenizer=tokenizer, val_fraction=0.01)
    out = prepare_data(files, tmp_path / "b", tokenizer=tokenizer, val_fraction=0.3)
    assert load_manifest(out)["splits"]["validation"]["documents"] > 0
