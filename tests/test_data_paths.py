"""Which files an input names: paths, globs, directories, hidden names, prepare's own outputs, files named twice,
a hub dataset name, and the corpus fingerprint that follows them. (Other bad input: test_data_inputs.py.)"""
from __future__ import annotations

import gzip
import json
import re

import pytest

from relora_ds.data import DataWarning, load_manifest, prepare_data
from relora_ds.data.inputs import builder_for, corpus_fingerprint, local_fingerprint, resolve_inputs
from test_data_inputs import SENTENCES, _documents, write_jsonl


def test_missing_path_names_the_path(tmp_path):
    missing = str(tmp_path / "no_such_dir" / "data.jsonl")
    with pytest.raises(ValueError, match=f"input path '{missing}' does not exist"):
        prepare_data([missing], tmp_path / "out", vocab_size=300)
    # The failed first prepare leaves no --out directory holding only its lock file (a user-journey review);
    # a directory that was there stays.
    assert not (tmp_path / "out").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(ValueError, match="does not exist"):
        prepare_data([missing], tmp_path / "mine", vocab_size=300)
    assert (tmp_path / "mine").is_dir()
    with pytest.raises(ValueError, match="matches no files"):
        prepare_data([str(tmp_path / "c4-train.*.json.gz")], tmp_path / "out", vocab_size=300)


def test_unsupported_extension_lists_the_supported_ones(tmp_path):
    doc = tmp_path / "corpus.docx"
    doc.write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match=r"unsupported input file .*corpus\.docx.*\.txt, \.txt\.gz, \.jsonl"):
        prepare_data([str(doc)], tmp_path / "out", vocab_size=300)
    # In a directory, such files are skipped with a counted warning; nothing supported is an error.
    write_jsonl(tmp_path / "ok.jsonl", SENTENCES)
    (tmp_path / "README.md").write_text("about this data")
    with pytest.warns(DataWarning, match=r"skipped 2 files with unsupported extensions \(README.md, corpus.docx"):
        prepare_data([str(tmp_path)], tmp_path / "out", vocab_size=300)
    empty_dir = tmp_path / "only_docs"
    empty_dir.mkdir()
    (empty_dir / "a.pdf").write_bytes(b"%PDF")
    with pytest.raises(ValueError, match="holds no supported files"):
        prepare_data([str(empty_dir)], tmp_path / "out2", vocab_size=300)


def test_hidden_folders_and_an_output_inside_the_input_are_not_read(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / ".ipynb_checkpoints").mkdir(parents=True)
    write_jsonl(corpus / "a.jsonl", SENTENCES)
    write_jsonl(corpus / ".ipynb_checkpoints" / "a-checkpoint.jsonl", SENTENCES)  # a copy: would double the corpus
    with pytest.warns(DataWarning, match="skipped 1 hidden files"):
        m = load_manifest(prepare_data([str(corpus)], tmp_path / "out", vocab_size=300))
    assert sum(s["documents"] for s in m["splits"].values()) == len(SENTENCES)
    # An output directory inside the input: its manifest.json is never read as corpus, so the second call
    # finds the same corpus (fingerprint) and has nothing to do.
    for _ in range(2):
        m = load_manifest(prepare_data([str(corpus)], corpus / "prepared", vocab_size=300))
        assert sum(s["documents"] for s in m["splits"].values()) == len(SENTENCES)
    assert m["created"] == load_manifest(corpus / "prepared")["created"]


def test_hidden_files_a_glob_names_by_their_dot_are_read(tmp_path):
    """Python's glob matches a hidden name only where the pattern spells its dot (`data/.*.jsonl`): asked for, such
    files are read, as a path to one is. They used to be dropped unsaid after matching (the glob then "held no
    supported files (found 0: [])"; `data/.*` read .cache/b.jsonl but not .a.jsonl), while a directory, or a
    glob without the dot, leaves hidden files out (counted in a warning for a directory)."""
    data = tmp_path / "data"
    (data / ".cache").mkdir(parents=True)
    hidden, cached, plain = (write_jsonl(data / name, SENTENCES[:5])
                             for name in (".a.jsonl", ".cache/b.jsonl", "c.jsonl"))
    assert resolve_inputs([str(data / ".*.jsonl")]) == ([hidden], None)
    assert resolve_inputs([hidden]) == ([hidden], None)
    assert resolve_inputs([str(data / ".*")]) == ([hidden, cached], None)
    assert resolve_inputs([str(data / "*")]) == resolve_inputs([str(data / "**" / "*.jsonl")]) == ([plain], None)
    with pytest.warns(DataWarning, match="skipped 2 hidden files"):
        assert resolve_inputs([str(data)]) == ([plain], None)


def test_a_file_named_twice_is_read_once(tmp_path):
    """The same file given as a path, again through another spelling and through its directory (a common
    `--input data/ data/a.jsonl` slip) is one corpus file, not a corpus counted two or three times."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    path = write_jsonl(corpus / "a.jsonl", SENTENCES)
    out = prepare_data([path, str(corpus / ".." / "corpus" / "a.jsonl"), str(corpus)], tmp_path / "out",
                       vocab_size=300)
    m = load_manifest(out)
    assert sum(s["documents"] for s in m["splits"].values()) == len(SENTENCES)


def test_file_extensions_are_matched_case_insensitively():
    assert builder_for("C4-TRAIN.00000-OF-01024.JSON.GZ") == "json"
    assert (builder_for("Notes.TXT"), builder_for("x.Parquet"), builder_for("a.JsonL")) == ("text", "parquet", "json")
    assert builder_for("a.docx") is None


def test_a_hub_name_is_the_only_input_and_never_a_file_name(tmp_path, monkeypatch):
    """Hand-written rules of resolve_inputs' docstring: a hub dataset must be the only input (a second name was
    dropped unsaid under a mutation trial's mutant), and a missing relative path with a file extension
    ("data/train.jsonl", owner/name-shaped) is a missing path, not a hub dataset to fetch from the network."""
    monkeypatch.chdir(tmp_path)
    assert resolve_inputs(["allenai/c4"]) == ([], "allenai/c4")
    with pytest.raises(ValueError, match=r"a hub dataset \('allenai/c4'\) must be the only input; got "
                                         r"\['allenai/c4', 'allenai/dolma'\]"):
        resolve_inputs(["allenai/c4", "allenai/dolma"])
    for missing in ("data/train.jsonl", "shards/part-0.parquet", "c4/en.json.gz"):
        with pytest.raises(ValueError, match=rf"input path '{missing}' does not exist"):
            resolve_inputs([missing])


def test_what_lies_under_an_excluded_directory_is_not_read_nor_counted(tmp_path):
    """`exclude` leaves out the paths it names "or anything under them" (resolve_inputs' docstring): a file under
    an excluded directory is not corpus, and prepare's own hidden scratch directory (.work) inside an input
    directory is not reported as the user's hidden files."""
    import warnings

    corpus = tmp_path / "corpus"
    (corpus / "out" / ".work").mkdir(parents=True)
    (corpus / "prepared").mkdir()
    a = write_jsonl(corpus / "a.jsonl", SENTENCES[:10])
    write_jsonl(corpus / "prepared" / "b.jsonl", SENTENCES[10:20])
    (corpus / "out" / ".work" / "tokenized0.arrow").write_bytes(b"cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipped 1 hidden files" for prepare's .work
        assert resolve_inputs([str(corpus)], exclude=[corpus / "prepared", corpus / "out" / ".work"]) == ([a], None)
    b = str(corpus / "prepared" / "b.jsonl")
    assert resolve_inputs([str(corpus)], exclude=[corpus / "out" / ".work"]) == ([a, b], None)


def test_a_glob_leaves_out_prepare_s_own_files_and_says_when_that_is_all_it_matched(tmp_path):
    """`--input 'proj/*' --out proj`: prepare's outputs a glob matches are left out like those a directory holds
    (the files in `exclude`), without an "unsupported extensions" warning about them; a glob matching only them
    says so."""
    import warnings

    proj = tmp_path / "proj"
    proj.mkdir()
    data = write_jsonl(proj / "data.jsonl", SENTENCES[:10])
    own = [proj / "manifest.json", proj / "train.bin", proj / "tokenizer.model"]
    for f in own:
        f.write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_inputs([str(proj / "*")], exclude=own) == ([data], None)
    with pytest.raises(ValueError, match=rf"input glob '.*\*\.json' matches only prepare's own output files "
                                         rf"\['{re.escape(str(proj / 'manifest.json'))}'\]"):
        resolve_inputs([str(proj / "*.json")], exclude=own)


def test_a_glob_matching_nothing_to_read_says_what_it_matched(tmp_path):
    """A glob matching only an empty directory, or only a save_to_disk dataset's metadata files, found nothing to
    read; it used to say it matched "only prepare's own output files", which it did not (no exclude given)."""
    import datasets

    (tmp_path / "shards" / "empty").mkdir(parents=True)
    datasets.Dataset.from_dict({"text": SENTENCES[:5]}).save_to_disk(str(tmp_path / "saved"))
    for glob in (tmp_path / "shards" / "*", tmp_path / "saved" / "*.json"):
        with pytest.raises(ValueError, match=rf"^input '{re.escape(str(glob))}' holds no supported files \(found 0"):
            resolve_inputs([str(glob)])


def test_a_json_file_named_like_save_to_disk_metadata_is_corpus_without_arrow_files_beside_it(tmp_path):
    """state.json and dataset_info.json are skipped as save_to_disk metadata only beside .arrow files; in a folder
    of JSON files they are the user's data (skipping them would lose documents unsaid)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = [write_jsonl(corpus / name, SENTENCES[:5]) for name in ("a.jsonl", "dataset_info.json", "state.json")]
    assert resolve_inputs([str(corpus)]) == (files, None)
    assert resolve_inputs([str(corpus / "*.json")]) == (files[1:], None)


def test_the_corpus_fingerprint_follows_a_files_size_and_a_hub_dataset_s_config(tmp_path):
    """The fingerprint covers each file's size besides its mtime (a file rewritten within the filesystem's mtime
    granularity, or copied back with its old mtime, changes size) and a hub dataset's config (C4's 'en' and
    'realnewslike' are other documents), as corpus_fingerprint's docstring says."""
    import os

    path = tmp_path / "a.jsonl"
    write_jsonl(path, SENTENCES[:10])
    st = os.stat(path)
    before = local_fingerprint([str(path)])
    write_jsonl(path, SENTENCES[:11])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size != st.st_size
    assert local_fingerprint([str(path)]) != before
    assert corpus_fingerprint(([str(path)], None)) == local_fingerprint([str(path)])
    hub = ([], "allenai/c4")
    assert corpus_fingerprint(hub, "en", "abc123") == corpus_fingerprint(hub, "en", "abc123")
    assert corpus_fingerprint(hub, "en", "abc123") != corpus_fingerprint(hub, "realnewslike", "abc123")
    assert corpus_fingerprint(hub, "en", "abc123") != corpus_fingerprint(hub, "en", "def456")


def test_a_glob_that_matches_directories_reads_them(tmp_path):
    """`--input "shards/*"` over sub-directories and a file: every document of all three is read."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "shards" / "s1").mkdir(parents=True)
    (tmp_path / "shards" / "s2").mkdir()
    write_jsonl(tmp_path / "shards" / "s1" / "a.jsonl", SENTENCES[:40])
    with gzip.open(tmp_path / "shards" / "s2" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES[40:80]))
    pq.write_table(pa.table({"text": pa.array(SENTENCES[80:])}), tmp_path / "shards" / "c.parquet")
    assert _documents(prepare_data([str(tmp_path / "shards" / "*")], tmp_path / "out", vocab_size=300)) == 120
    assert _documents(prepare_data([str(tmp_path / "shards" / "s*")], tmp_path / "out2", vocab_size=300)) == 80


def test_inputs_inside_the_output_directory_are_read(tmp_path):
    """Only what prepare writes there is left out: `--input proj/raw --out proj` and `--input 'proj/*.jsonl'
    --out proj` read the corpus, and a second run finds the same corpus (nothing to do)."""
    proj = tmp_path / "proj"
    (proj / "raw").mkdir(parents=True)
    write_jsonl(proj / "raw" / "a.jsonl", SENTENCES)
    write_jsonl(proj / "b.jsonl", SENTENCES[:30])
    for inputs in ([str(proj / "raw")], [str(proj / "*.jsonl")]):
        out = prepare_data(inputs, proj, vocab_size=300, overwrite=True)
        created = load_manifest(out)["created"]
        assert _documents(out) == (120 if "raw" in inputs[0] else 30)
        assert load_manifest(prepare_data(inputs, proj, vocab_size=300))["created"] == created


def test_symlinked_inputs_are_read_by_their_names_and_each_file_once(tmp_path):
    """A Hugging Face hub cache snapshot links each file's name to an extensionless blob (a review): a file or
    a glob input was resolved to the blob and refused or crashed; a directory's symlinked sub-folder was
    skipped without a word; a validation file reached through a link escaped the train/validation overlap
    refusal. Oracle: the same documents given as plain files."""
    import os

    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    (snap / "more").mkdir(parents=True)
    write_jsonl(blobs / "9f2c1e", SENTENCES[:60])
    write_jsonl(blobs / "77aa01", SENTENCES[60:])
    os.symlink(blobs / "9f2c1e", snap / "train.jsonl")
    shards = tmp_path / "shards"
    shards.mkdir()
    os.symlink(blobs / "77aa01", shards / "s1.jsonl")
    os.symlink(shards, snap / "more" / "linked")  # a linked folder inside a directory input
    os.symlink(snap, snap / "more" / "loop")  # a link cycle: read once
    plain = tmp_path / "plain"
    plain.mkdir()
    write_jsonl(plain / "a.jsonl", SENTENCES[:60])
    write_jsonl(plain / "b.jsonl", SENTENCES[60:])
    want = prepare_data([str(plain)], tmp_path / "want", vocab_size=300)
    for item in (str(snap), str(snap / "**" / "*.jsonl")):  # (the glob also walks the cycle, as far as it goes)
        files, _ = resolve_inputs([item])
        assert sorted(files) == [str(snap / "more" / "linked" / "s1.jsonl"), str(snap / "train.jsonl")], (item, files)
    assert resolve_inputs([str(snap / "train.jsonl")])[0] == [str(snap / "train.jsonl")]
    # each document once
    out = prepare_data([str(snap)], tmp_path / "out", vocab_size=300)
    assert load_manifest(out)["splits"]["train"]["documents"] + \
        load_manifest(out)["splits"]["validation"]["documents"] == len(SENTENCES)
    assert load_manifest(want)["splits"]["train"]["documents"] + \
        load_manifest(want)["splits"]["validation"]["documents"] == len(SENTENCES)
    with pytest.raises(ValueError, match=r"1 files are both training input and --val-input"):
        prepare_data([str(snap)], tmp_path / "overlap", vocab_size=300, val_inputs=[str(shards / "s1.jsonl")])
