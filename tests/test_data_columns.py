"""Which column holds the text: a missing or non-string text column is named, files with other columns
beside the text or differently named text columns are read together, and records without a text are counted
apart from blank documents. (Other bad input: test_data_inputs.py.)"""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from relora_ds.data import DataWarning, load_manifest, load_tokenizer, prepare_data
from test_data_inputs import SENTENCES, _tiny_tokenizer, write_jsonl


def test_blank_documents_are_counted(tmp_path):
    """Blank texts, and records whose text is null or absent (counted apart: found by a user-journey review,
    a wrong text column looked like blank documents)."""
    path = tmp_path / "c.jsonl"
    records = ([{"text": t} for t in SENTENCES[:50] + ["", "   ", "\n"]] + [{"text": None}, {"title": "no text"}]
               + [{"text": t} for t in SENTENCES[50:]])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.warns(DataWarning) as caught:
        out = prepare_data([str(path)], tmp_path / "out", vocab_size=300)
    said = [str(w.message) for w in caught]
    assert any("skipped 3 empty or blank documents" in m for m in said), said
    assert any("skipped 2 records of" in m and "whose text column is null or absent (text_column='text'" in m
               for m in said), said
    m = load_manifest(out)
    assert m["warnings"]["empty_documents"] == 3 and m["warnings"]["records_without_text"] == 2
    assert sum(s["documents"] for s in m["splits"].values()) == len(SENTENCES)


def test_missing_text_column_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", SENTENCES, column="content")
    with pytest.raises(ValueError, match=r"text column 'text' not found in .*c\.jsonl.*\['content'\]"):
        prepare_data([path], tmp_path / "out", vocab_size=300)
    with pytest.raises(ValueError, match=r"text column 'body' not found .*\['content'\]"):
        prepare_data([path], tmp_path / "out", vocab_size=300, text_column="body", streaming=True)
    assert not list((tmp_path / "out").glob(".*tmp")) and not (tmp_path / "out" / ".work").exists()
    prepare_data([path], tmp_path / "out", vocab_size=300, text_column="content")


@pytest.mark.parametrize("streaming", [False, True])
def test_files_with_differently_named_text_columns_are_read_together(tmp_path, streaming):
    """text_column=[...]: each file takes the first name it has (found by a user-journey review: one name for
    every file, so a corpus of two schemas needed its files rewritten). Every document of both files is
    trained on: the same documents as one file of the texts under one name; none found is an error naming
    them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "mixed"
    d.mkdir()
    write_jsonl(d / "a.jsonl", SENTENCES[:60])
    (d / "b.jsonl").write_text("".join(json.dumps({"content": t, "meta": i}) + "\n"
                                       for i, t in enumerate(SENTENCES[60:90])))
    pq.write_table(pa.table({"body": SENTENCES[90:100], "text": ["not this"] * 10}), d / "c.parquet")
    # .json arrays, whose columns are not read ahead: streamed, they were one group (a review: KeyError 'text').
    (d / "d.json").write_text(json.dumps([{"content": t} for t in SENTENCES[100:110]]))
    (d / "e.json").write_text(json.dumps([{"text": t} for t in SENTENCES[110:]]))
    with pytest.raises(ValueError, match=r"text column 'text' not found in .*b\.jsonl.*\['content', 'meta'\]"):
        prepare_data([str(d)], tmp_path / "out", vocab_size=300, streaming=streaming)
    kw = dict(vocab_size=300, val_fraction=0.0, streaming=streaming)
    out = prepare_data([str(d)], tmp_path / "out", text_column=["body", "text", "content"], **kw)
    one = prepare_data([write_jsonl(tmp_path / "one.jsonl", SENTENCES)], tmp_path / "one", **kw)
    m, m1 = load_manifest(out), load_manifest(one)
    assert m["splits"]["train"]["documents"] == len(SENTENCES) and m["recipe"]["text_column"] == ["body", "text",
                                                                                                     "content"]
    tokens = lambda m: sorted(np.fromfile(m["splits"]["train"]["path"], dtype=m["dtype"]).tolist())  # noqa: E731
    assert m["tokenizer_sha256"] == m1["tokenizer_sha256"] and tokens(m) == tokens(m1)
    with pytest.raises(ValueError, match=r"none of the text columns \['body', 'title'\] found in .*a\.jsonl"):
        prepare_data([str(d)], tmp_path / "out2", text_column=["body", "title"], **kw)
    # One name in a list is that name: the same recipe as the str (data prepared with it is not "another").
    path = write_jsonl(tmp_path / "plain.jsonl", SENTENCES)
    assert load_manifest(prepare_data([path], tmp_path / "p", text_column=["text"], **kw))["recipe"]["text_column"] \
        == "text"
    prepare_data([path], tmp_path / "p", text_column="text", **kw)


def test_non_string_text_column_is_an_error(tmp_path):
    """A numeric column used to be read as no text at all ("empty corpus: no non-empty line ...")."""
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": s, "title": "t", "score": 0.5}) + "\n"
                            for i, s in enumerate(SENTENCES)))
    for streaming in (False, True):
        with pytest.raises(ValueError, match=r"text column 'id' of .*c\.jsonl holds int64 values, not text; its "
                                             r"string columns are \['body', 'title'\] \(choose one with --text-column\)"):
            prepare_data([str(path)], tmp_path / "out", vocab_size=300, text_column="id", streaming=streaming)
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(10)))
    with pytest.raises(ValueError, match=r"text column 'text' of .*numbers\.jsonl holds int64 values, not text; it "
                                         r"has no string column \(its columns are \['text'\]\)"):
        prepare_data([str(numbers)], tmp_path / "out", tokenizer=str(_tiny_tokenizer(tmp_path)))
    prepare_data([str(path)], tmp_path / "out", vocab_size=300, text_column="body")
    # One record's number or list among texts (datasets then reads the column as JSON values): that record is
    # named, not another column suggested.
    for stray, shown in ((12345, r"12345 \(int\)"), (["a", "b"], r'\["a", "b"\] \(list\)')):
        mixed = tmp_path / "mixed.jsonl"
        mixed.write_text("".join(json.dumps({"text": s, "title": "t"}) + "\n" for s in SENTENCES[:5])
                         + json.dumps({"text": stray, "title": "t"}) + "\n" + json.dumps({"text": "x"}) + "\n")
        for streaming in (False, True):
            with pytest.raises(ValueError, match=rf"text column 'text' of .*mixed\.jsonl holds a value that is not "
                                                 rf"text at .*mixed\.jsonl line 6: {shown}: fix or drop that record"):
                prepare_data([str(mixed)], tmp_path / "mixed_out", vocab_size=300, streaming=streaming)
    # Numbers in a file after one of strings: datasets cast them to the strings "0", "1", ... (a review found
    # them trained on); each file's text type now keeps them apart, and the numbers are named.
    import pyarrow as pa
    import pyarrow.parquet as pq
    strings = write_jsonl(tmp_path / "a_strings.jsonl", SENTENCES)
    with pytest.raises(ValueError, match=r"text column 'text' of .*numbers\.jsonl holds int64 values"):
        prepare_data([strings, str(numbers)], tmp_path / "out2", vocab_size=300)
    pq.write_table(pa.table({"text": SENTENCES}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": list(range(10))}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"text column 'text' of .*b\.parquet holds int64 values"):
        prepare_data([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], tmp_path / "out3", vocab_size=300)
    # A corrupt file among others is named (Arrow's own message names none)
    (tmp_path / "b.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"could not read .*b\.parquet: ArrowInvalid"):
        prepare_data([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], tmp_path / "out4", vocab_size=300)


def test_the_encoder_names_a_value_that_is_not_text(tmp_path):
    """Encode, the map every record goes through, is the last check of the text column's values (a streamed
    dataset without features is checked at its first record only: sources._select_text): a number or a list
    is named, never encoded as a blank document (0, []) nor failing as an AttributeError (12345); null is a
    record without text."""
    from relora_ds.data.encode import Encode
    from relora_ds.data.tokenizer import open_tokenizer

    encode = Encode(open_tokenizer(_tiny_tokenizer(tmp_path)), val_fraction=0.0, num_threads=1)
    out = encode({"text": ["kings", None, " "]})
    assert [len(ids) > 0 for ids in out["ids"]] == [True, False, False]
    assert out["no_text"].tolist() == [False, True, False]
    for stray, shown in ((12345, r"int values, not strings: '12345'"), (0, r"int values, not strings: '0'"),
                         ([], r"list values, not strings: '\[\]'"), (False, r"bool values")):
        with pytest.raises(ValueError, match=rf"^the text column holds {shown}"):
            encode({"text": ["kings", stray]})


@pytest.mark.parametrize("streaming", [False, True])
def test_files_with_other_columns_beside_the_text_are_read_together(tmp_path, streaming):
    """A directory of JSON Lines / Parquet files whose metadata columns differ (a common dump): each file's
    text column is read, in order. datasets reads one load as one schema: it refused the directory, naming
    the first file (found by a test-drive), and when streaming failed later, inside tokenization. A file
    without the text column is named."""
    import datasets

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", SENTENCES[:40])
    (corpus / "b.jsonl").write_text("".join(json.dumps({"id": i, "text": t, "url": "u"}) + "\n"
                                            for i, t in enumerate(SENTENCES[40:80])))
    datasets.Dataset.from_dict({"text": SENTENCES[80:100], "meta": list(range(20))}).to_parquet(corpus / "c.parquet")
    datasets.Dataset.from_dict({"text": SENTENCES[100:]}).to_parquet(corpus / "d.parquet")
    out = prepare_data([str(corpus)], tmp_path / "out", vocab_size=300, val_fraction=0.0, streaming=streaming)
    sp = load_tokenizer(out / "tokenizer.model")
    want = [i for t in SENTENCES for i in [sp.bos_id(), *sp.encode(t), sp.eos_id()]]
    assert np.fromfile(out / "train.bin", dtype=load_manifest(out)["dtype"]).tolist() == want
    (corpus / "e.jsonl").write_text(json.dumps({"content": "no text here", "id": 1}) + "\n")
    with pytest.raises(ValueError, match=r"text column 'text' not found in .*e\.jsonl; its columns are \['content', "
                                         r"'id'\]"):
        prepare_data([str(corpus)], tmp_path / "bad", vocab_size=300, val_fraction=0.0, streaming=streaming)
    # JSON files whose first records agree but whose later ones do not (a review): a key added in a later
    # record of the second file (streaming failed with datasets' CastError), and a number in its text column
    # (cast to the first file's strings and trained as digits); each file is read with its own schema.
    later = tmp_path / "later"
    later.mkdir()
    write_jsonl(later / "a.jsonl", SENTENCES[:40])
    rows = [{"text": t} for t in SENTENCES[40:80]]
    rows[30]["meta"] = "added"
    (later / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = prepare_data([str(later)], tmp_path / "later_out", tokenizer=str(out / "tokenizer.model"),
                       val_fraction=0.0, streaming=streaming)
    want = [i for t in SENTENCES[:80] for i in [sp.bos_id(), *sp.encode(t), sp.eos_id()]]
    assert np.fromfile(out / "train.bin", dtype=load_manifest(out)["dtype"]).tolist() == want
    rows = [{"text": t} for t in SENTENCES[40:80]]
    rows[5]["text"] = 987654321
    (later / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"text column 'text' of .*b\.jsonl holds a value that is not text at "
                                         r".*b\.jsonl line 6: 987654321 \(int\)"):
        prepare_data([str(later)], tmp_path / "later_bad", vocab_size=300, val_fraction=0.0, streaming=streaming)


def test_a_group_read_again_file_by_file_logs_no_failure(tmp_path):
    """Two saved datasets with other column names in one folder: datasets reads them as one group, fails
    (and logs "Failed to read file ... CastError"), and they are read again file by file, every document
    kept. The log named a file that was then read (a user trial took it for a dropped file): no longer
    printed."""
    import datasets

    corpus = tmp_path / "corpus"
    datasets.Dataset.from_dict({"text": SENTENCES[:50]}).save_to_disk(str(corpus / "a"))
    datasets.Dataset.from_dict({"body": SENTENCES[50:], "n": list(range(len(SENTENCES) - 50))}).save_to_disk(
        str(corpus / "b"))
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    datasets_logger = logging.getLogger("datasets")  # its own handler (stderr at import), not propagated
    datasets_logger.addHandler(handler)
    try:
        out = prepare_data([str(corpus)], tmp_path / "out", vocab_size=300, val_fraction=0.0,
                           text_column=["text", "body"])
    finally:
        datasets_logger.removeHandler(handler)
    assert not [m for m in logged if "Failed to read file" in m], logged
    assert load_manifest(out)["splits"]["train"]["documents"] == len(SENTENCES)
    assert datasets.logging.get_verbosity() != datasets.logging.CRITICAL  # restored
