"""The text repair pass (relora_ds/data/repair.py): invalid UTF-8, lone surrogate escapes in JSON, a
byte-order mark and damaged gzip files, each repaired and counted, or named; nothing silently lost."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from relora_ds.data import DataWarning, load_manifest, load_tokenizer, prepare_data
from relora_ds.data.repair import repair_utf8
from test_data_inputs import SENTENCES, _tiny_tokenizer, write_jsonl


def test_invalid_utf8_is_replaced_counted_and_named(tmp_path):
    good = "\n".join(SENTENCES).encode()
    with gzip.open(tmp_path / "bad.jsonl.gz", "wb") as f:
        f.write(b'{"text": "caf\xe9 au lait \xff\xfe"}\n' + b"".join(
            json.dumps({"text": s}).encode() + b"\n" for s in SENTENCES))
    (tmp_path / "bad.txt").write_bytes(good + b"\nbroken \xc3( byte")
    (tmp_path / "fine.txt").write_bytes(good)
    with pytest.warns(DataWarning) as record:
        out = prepare_data([str(tmp_path)], tmp_path / "out", vocab_size=300, val_fraction=0.0)
    messages = [str(w.message) for w in record if "UTF-8" in str(w.message)]
    assert any("bad.jsonl.gz: replaced 3 invalid UTF-8 bytes" in m for m in messages), messages
    assert any("bad.txt: replaced 1 invalid UTF-8 bytes" in m for m in messages), messages
    assert not any("fine.txt" in m for m in messages)
    m = load_manifest(out)
    assert sorted(p.rsplit("/", 1)[1] for p in m["warnings"]["invalid_utf8_bytes"]) == ["bad.jsonl.gz", "bad.txt"]
    sp = load_tokenizer(m["tokenizer_path"])
    text = sp.decode(np.fromfile(m["splits"]["train"]["path"], dtype=m["dtype"]).tolist())
    assert "caf\ufffd au lait \ufffd\ufffd" in text and "broken \ufffd( byte" in text


def test_invalid_utf8_at_the_very_end_of_a_file_is_replaced_not_dropped(tmp_path):
    """A file cut inside a multi-byte character (a truncated download): its last 2 bytes \\xe2\\x82 (of the
    3-byte euro sign) are each replaced by U+FFFD and counted, as every invalid byte is (hand-computed)."""
    for name, opener in (("cut.txt", open), ("cut.txt.gz", gzip.open)):
        src = tmp_path / name
        with opener(src, "wb") as f:
            f.write("café ok\nprice 5".encode() + b"\xe2\x82")
        dest = tmp_path / f"{name}.repaired"
        assert repair_utf8(str(src), str(dest)) == (2, 0)
        assert dest.read_text(encoding="utf-8") == "café ok\nprice 5\ufffd\ufffd"


def test_lone_surrogate_escapes_in_json_are_replaced_pairs_and_escaped_backslashes_kept(tmp_path):
    """Arrow's JSON reader refused a whole file for one lone surrogate escape (JavaScript and Python's
    json.dumps write them). Each lone one (high, low, or a high at a string's end) becomes \\ufffd; a valid
    pair (an emoji) and an escaped backslash followed by "ud800" stay as they are (hand-written expectations)."""
    lines = [r'{"text": "lone high \ud800 here"}', r'{"text": "lone low \udc00 and at the end \udbff"}',
             r'{"text": "a pair \ud83d\ude00 stays"}', r'{"text": "a backslash \\ud800 is text"}']
    expected = ["lone high \ufffd here", "lone low \ufffd and at the end \ufffd", "a pair \U0001f600 stays",
                "a backslash \\ud800 is text"]
    for name, opener in (("s.jsonl", open), ("s.jsonl.gz", gzip.open)):
        src = tmp_path / name
        with opener(src, "wb") as f:
            f.write("\n".join(lines + [json.dumps({"text": s}) for s in SENTENCES]).encode())
        dest = tmp_path / f"{name}.repaired"
        assert repair_utf8(str(src), str(dest), json=True) == (0, 3)
        repaired = [json.loads(line)["text"] for line in dest.read_text(encoding="utf-8").splitlines()]
        assert repaired == expected + SENTENCES
    # Only pairs: the file is read as it is, nothing written.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(lines[2] + "\n" + lines[3] + "\n")
    assert repair_utf8(str(pairs), str(tmp_path / "pairs.out"), json=True) == (0, 0)
    assert not (tmp_path / "pairs.out").exists()
    # End to end: counted, named, and the documents trained on.
    with pytest.warns(DataWarning, match=r"s\.jsonl: replaced 3 lone UTF-16 surrogate escapes"):
        out = prepare_data([str(tmp_path / "s.jsonl")], tmp_path / "out", vocab_size=300, val_fraction=0.0)
    m = load_manifest(out)
    assert list(m["warnings"]["lone_surrogate_escapes"].values()) == [3]
    assert m["splits"]["train"]["documents"] == len(lines) + len(SENTENCES)


def test_a_truncated_gzip_file_is_named(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", SENTENCES)
    whole = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES * 20).encode())
    (corpus / "trunc.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (corpus / "not_gzip.jsonl.gz").write_bytes(b'{"text": "plain"}\n')
    # Invalid UTF-8 before the cut (a review): the check's pass ended at the bad byte, and the repair's read on
    # to the cut and raised a bare EOFError naming no file.
    bad = gzip.compress(b'{"text": "caf\xe9"}\n' + "".join(json.dumps({"text": t}) + "\n"
                                                          for t in SENTENCES * 20).encode())
    (corpus / "bad_trunc.jsonl.gz").write_bytes(bad[: len(bad) // 2])
    for name in ("trunc.jsonl.gz", "not_gzip.jsonl.gz", "bad_trunc.jsonl.gz"):
        with pytest.raises(ValueError, match=rf"could not read .*{name}: .*\(a truncated or corrupt gzip file\?\)"):
            prepare_data([str(corpus / "a.jsonl"), str(corpus / name)], tmp_path / f"out_{name}", vocab_size=300)


def test_a_byte_order_mark_does_not_start_the_first_document(tmp_path):
    """Windows editors write a UTF-8 BOM: it is dropped from .txt and .jsonl (plain and gzipped), so the
    token files equal those of the same text without it."""
    docs = SENTENCES[:50]
    plain, bom = tmp_path / "plain", tmp_path / "bom"
    for d in (plain, bom):
        d.mkdir()
    body_txt = "\n".join(docs)
    body_jsonl = "".join(json.dumps({"text": t}) + "\n" for t in docs)
    (plain / "a.txt").write_text(body_txt, encoding="utf-8")
    (plain / "b.jsonl").write_text(body_jsonl, encoding="utf-8")
    (bom / "a.txt").write_bytes(b"\xef\xbb\xbf" + body_txt.encode())
    with gzip.open(bom / "b.jsonl.gz", "wb") as f:
        f.write(b"\xef\xbb\xbf" + body_jsonl.encode())
    tok = _tiny_tokenizer(tmp_path)
    outs = [prepare_data([str(d)], tmp_path / f"out_{d.name}", tokenizer=str(tok), txt_unit="line")
            for d in (plain, bom)]
    for split in ("train", "validation"):
        assert (outs[0] / f"{split}.bin").read_bytes() == (outs[1] / f"{split}.bin").read_bytes()
    assert load_manifest(outs[1])["splits"]["train"]["documents"] + \
        load_manifest(outs[1])["splits"]["validation"]["documents"] == 100


def test_an_unreadable_file_read_through_its_repaired_copy_is_named_by_its_own_path(tmp_path):
    """A JSONL file with an invalid UTF-8 byte is read from a repaired copy in the output's work dir, which is
    gone when the user reads the error: a cut-off last line must name the user's file (a review found the copy
    named)."""
    path = tmp_path / "broken.jsonl"
    path.write_bytes("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES).encode() + b'{"text": "caf\xe9')
    with pytest.warns(DataWarning), pytest.raises(ValueError, match=rf"could not read {path}: ") as err:
        prepare_data([str(path)], tmp_path / "out", tokenizer=str(_tiny_tokenizer(tmp_path)))
    assert "utf8-repaired" not in str(err.value)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz_upper_case"])
def test_a_repair_does_not_depend_on_where_the_file_is_cut_into_chunks(tmp_path, monkeypatch, gz):
    """repair_utf8 reads a file in chunks of _CHUNK bytes (4 MiB): an escape, a hint of one or a character cut by
    a chunk's end must come out as from the whole file. Brute force over every cut: chunks of 3 to 40 bytes (a
    hint, the 4 bytes \\ud8, then spans at most two) each give the hand-written result. File A: its one lone
    escape a low surrogate (no high one to hint at it) and a U+FEFF inside the text (only a leading one is a
    byte-order mark); file B: a byte-order mark, a valid pair (kept) and a lone high surrogate. A ".GZ" name is
    gzip too (input names match case-insensitively)."""
    from relora_ds.data import repair

    files = {"a": ([r'{"text": "low \udc00 only"}', '{"text": "zero\ufeffwidth"}'],
                   ["low \ufffd only", "zero\ufeffwidth"], b""),
             "b": ([r'{"text": "pair \ud83d\ude00 kept"}', r'{"text": "lone \ud800 high"}'],
                   ["pair \U0001f600 kept", "lone \ufffd high"], b"\xef\xbb\xbf")}
    for key, (lines, expected, bom) in files.items():
        src = tmp_path / (f"{key}.JSONL.GZ" if gz else f"{key}.jsonl")
        data = bom + "\n".join(lines).encode() + b"\n"
        src.write_bytes(gzip.compress(data) if gz else data)
        for chunk in range(3, 41):
            monkeypatch.setattr(repair, "_CHUNK", chunk)
            dest = tmp_path / f"{key}.{chunk}.repaired"
            assert repair_utf8(str(src), str(dest), json=True) == (0, 1), (key, chunk)
            text = dest.read_text(encoding="utf-8")
            assert [json.loads(line)["text"] for line in text.splitlines()] == expected, (key, chunk)
