"""A prepared dir's recipe (relora_ds/data/recipe.py): a re-run with the same one is a no-op, another is refused
naming each difference (or re-prepared with --overwrite), and options that change nothing are not recorded."""
from __future__ import annotations

import json
import os
import re
import warnings

import pytest

from relora_ds.data import DataWarning, load_manifest, prepare_data
from relora_ds.data import prepare as prepare_module
from test_data_inputs import write_jsonl
from test_data_prepare import DOCS_150


def test_rerun_is_a_noop_and_changes_re_prepare(tmp_path, monkeypatch):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: " + "words " * (i % 17)}) + "\n"
                              for i in range(300)))
    out = tmp_path / "out"
    prepare_data([str(corpus)], out, vocab_size=300)
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".")}
    with monkeypatch.context() as m:  # the no-op neither reads nor tokenizes (was: a 2-s wall-clock bound)
        m.setattr(prepare_module, "_prepare", lambda *a, **k: pytest.fail("a re-run with the same recipe prepared"))
        prepare_data([str(corpus)], out, vocab_size=300, num_proc=2, seq_len=8)  # neither changes the data
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".")} == files

    # A different recipe replaces complete data only when asked: runs trained on it could not resume.
    with pytest.raises(ValueError, match=r"holds data prepared from another recipe \(val_fraction: 0.01 -> 0.2\); "
                                         r"runs trained on it could not resume .* Pass --overwrite"):
        prepare_data([str(corpus)], out, vocab_size=300, val_fraction=0.2)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".")} == files
    prepare_data([str(corpus)], out, vocab_size=300, val_fraction=0.2, overwrite=True)
    assert load_manifest(out)["splits"]["validation"]["documents"] > 30
    sha = load_manifest(out)["tokenizer_sha256"]
    os.utime(corpus)  # the corpus was rewritten
    mtime = (out / "manifest.json").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"another recipe \(corpus_fingerprint: "):
        prepare_data([str(corpus)], out, vocab_size=300, val_fraction=0.2)
    prepare_data([str(corpus)], out, vocab_size=300, val_fraction=0.2, overwrite=True)
    assert (out / "manifest.json").stat().st_mtime_ns != mtime
    assert load_manifest(out)["tokenizer_sha256"] == sha  # same text, same tokenizer


def test_the_refusal_names_each_recipe_difference():
    """recipe_diff, as the refusal to replace prepared data prints it: a key one side lacks is "absent" (not
    the same as null), nested keys are dotted, and long values are cut around where they differ."""
    from relora_ds.data.recipe import recipe_diff

    assert recipe_diff({"a": 1, "hf_split": None}, {"a": 1}) == "hf_split: null -> absent"
    assert recipe_diff({"max_docs": None, "v": 1}, {"max_docs": 50, "v": 2}) == "max_docs: null -> 50; v: 1 -> 2"
    long = "/data/tokenizers/shared-by-the-team/2026/november/"
    assert recipe_diff({"tok": {"given": long + "v1.model"}}, {"tok": {"given": long + "v2.model"}}) == (
        'tok.given: ...team/2026/november/v1.model" -> ...team/2026/november/v2.model"')


def test_changing_txt_unit_on_prepared_data_is_another_recipe(tmp_path):
    """.txt split into documents by txt_unit: the same out dir prepared again with another txt_unit must be
    refused (or redone with overwrite), not taken as the data already there. Oracle: the document count of the
    file, by hand (1 document of 150 lines; 150 documents)."""
    from relora_ds.data import load_manifest, prepare_data
    f = tmp_path / "a.txt"
    f.write_text("\n".join(d.replace("\n", " ") for d in DOCS_150) + "\n")
    out = tmp_path / "out"
    prepare_data([str(f)], out, vocab_size=300, val_fraction=0.0)
    assert load_manifest(out)["splits"]["train"]["documents"] == 1
    with pytest.raises(ValueError, match="txt_unit"):
        prepare_data([str(f)], out, vocab_size=300, val_fraction=0.0, txt_unit="line")
    prepare_data([str(f)], out, vocab_size=300, val_fraction=0.0, txt_unit="line", overwrite=True)
    assert load_manifest(out)["splits"]["train"]["documents"] == len(DOCS_150)


def test_options_that_change_nothing_are_ignored_with_a_warning_and_not_recorded(tmp_path):
    """txt_unit without a .txt input and text_column with .txt inputs alone do nothing: a user trial found them
    recorded in the recipe, so the same command without them was refused ("another recipe (txt_unit ...)")
    over byte-identical files, and the data's fingerprint changed (a checkpoint could not resume after
    --overwrite). Oracle: the same inputs prepared without the option (its files, recipe and fingerprint)."""
    from relora_ds.data.manifest import train_data_fingerprint

    jsonl = write_jsonl(tmp_path / "c.jsonl", DOCS_150)
    txt = tmp_path / "c.txt"
    txt.write_text("\n".join(d.replace("\n", " ") for d in DOCS_150) + "\n")
    for inputs, option, why, base in (([jsonl], dict(txt_unit="line"), "no input is a .txt file", {}),
                                      ([str(txt)], dict(text_column="body"), ".txt files have no columns",
                                       dict(txt_unit="line"))):
        (name, value), = option.items()
        ref = prepare_data(inputs, tmp_path / f"ref_{name}", vocab_size=300, val_fraction=0.1, **base)
        with pytest.warns(DataWarning, match=rf"^{name}={value!r} is ignored: {re.escape(why)}"):
            out = prepare_data(inputs, tmp_path / f"with_{name}", vocab_size=300, val_fraction=0.1, **base, **option)
        assert load_manifest(ref)["splits"]["validation"]["documents"] > 0
        for split in ("train", "validation"):
            assert (out / f"{split}.bin").read_bytes() == (ref / f"{split}.bin").read_bytes()
        assert load_manifest(out)["recipe"] == load_manifest(ref)["recipe"]
        assert train_data_fingerprint(load_manifest(out)) == train_data_fingerprint(load_manifest(ref))
        mtimes = [(d / "manifest.json").stat().st_mtime_ns for d in (out, ref)]
        prepare_data(inputs, out, vocab_size=300, val_fraction=0.1, **base)  # one recipe: no-ops, no refusal
        with pytest.warns(DataWarning, match=f"{name}={value!r} is ignored"):
            prepare_data(inputs, ref, vocab_size=300, val_fraction=0.1, **base, **option)
        assert [(d / "manifest.json").stat().st_mtime_ns for d in (out, ref)] == mtimes


def test_tokenizer_train_chars_with_a_given_tokenizer_is_ignored_with_a_warning(tmp_path):
    """tokenizer_train_chars caps the text a trained tokenizer reads: with --tokenizer nothing is trained, so it
    changes nothing (a bad-input trial found it taken without a word). Oracle: the same preparation without it."""
    from test_data_inputs import _tiny_tokenizer

    tok = str(_tiny_tokenizer(tmp_path))
    jsonl = write_jsonl(tmp_path / "c.jsonl", DOCS_150)
    ref = prepare_data([jsonl], tmp_path / "ref", tokenizer=tok, val_fraction=0.1)
    with pytest.warns(DataWarning, match=r"^tokenizer_train_chars=1000 is ignored: a given tokenizer is used as it is"):
        out = prepare_data([jsonl], tmp_path / "with", tokenizer=tok, val_fraction=0.1, tokenizer_train_chars=1000)
    assert (out / "train.bin").read_bytes() == (ref / "train.bin").read_bytes()
    assert load_manifest(out)["recipe"] == load_manifest(ref)["recipe"]
    with warnings.catch_warnings():  # a trained tokenizer reads it: no warning
        warnings.simplefilter("error", DataWarning)
        prepare_data([jsonl], tmp_path / "trained", vocab_size=300, val_fraction=0.1, tokenizer_train_chars=100_000)


def test_an_option_only_the_validation_corpus_uses_is_recorded(tmp_path):
    """txt_unit with .jsonl training input and a .txt --val-input (text_column with .txt training input and a
    .jsonl one) applies to the validation corpus: kept in the recipe, no warning. Oracle: the validation
    file's lines (its records), counted by hand."""
    train_jsonl = write_jsonl(tmp_path / "t.jsonl", DOCS_150)
    val_txt = tmp_path / "v.txt"
    val_txt.write_text("\n".join(f"held out line {i}" for i in range(12)) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        out = prepare_data([train_jsonl], tmp_path / "a", vocab_size=300, val_inputs=[str(val_txt)], txt_unit="line")
        m = load_manifest(out)
        assert m["recipe"]["txt_unit"] == "line" and m["splits"]["validation"]["documents"] == 12
        train_txt = tmp_path / "t.txt"
        train_txt.write_text("\n\n".join(DOCS_150))
        val_jsonl = write_jsonl(tmp_path / "v.jsonl", [f"held out {i}" for i in range(7)], column="body")
        out = prepare_data([str(train_txt)], tmp_path / "b", vocab_size=300, val_inputs=[val_jsonl],
                           text_column="body")
        m = load_manifest(out)
        assert m["recipe"]["text_column"] == "body" and m["splits"]["validation"]["documents"] == 7


def test_data_prepared_with_an_option_that_changed_nothing_stays_up_to_date(tmp_path):
    """A dir prepared before such options were left out of the recipe holds them as given (txt_unit 'line' with
    .jsonl input): the same data, so re-running with or without the option (or with --overwrite) is a no-op
    that keeps its manifest, and with it the fingerprint its checkpoints recorded. Oracle: the manifest's bytes
    before and after."""
    jsonl = write_jsonl(tmp_path / "c.jsonl", DOCS_150)
    out = prepare_data([jsonl], tmp_path / "old", vocab_size=300)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["recipe"]["txt_unit"] = "line"  # what the code before recorded for --txt-unit line
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = (out / "manifest.json").read_bytes()
    prepare_data([jsonl], out, vocab_size=300)
    with pytest.warns(DataWarning, match="txt_unit='line' is ignored"):
        prepare_data([jsonl], out, vocab_size=300, txt_unit="line", overwrite=True)
    assert (out / "manifest.json").read_bytes() == before
    with pytest.raises(ValueError, match=r"another recipe \(max_docs: null -> 5; txt_unit: \"line\" -> \"document\"\)"):
        prepare_data([jsonl], out, vocab_size=300, max_docs=5)  # another recipe: every difference is named


def test_prepare_config_refuses_values_that_cannot_prepare_and_keeps_one_text_column_a_name():
    """PrepareConfig's checks, at their boundaries: val_fraction 1.0 would leave no training document, max_docs 0
    and tokenizer_train_chars 0 no text. A list of one text column is recorded as the name alone (as recipes
    recorded it before lists existed: the same data is the same recipe); more stay a list."""
    from relora_ds.data.recipe import PrepareConfig

    for kw, match in ((dict(val_fraction=1.0), r"val_fraction=1.0 must be in \[0, 1\)"),
                      (dict(val_fraction=-0.1), r"val_fraction=-0.1 must be in \[0, 1\)"),
                      (dict(max_docs=0), r"max_docs=0 must be a positive int or None"),
                      (dict(tokenizer_train_chars=0), r"tokenizer_train_chars=0 must be positive")):
        with pytest.raises(ValueError, match=match):
            PrepareConfig(**kw)
    assert PrepareConfig(val_fraction=0.0).val_fraction == 0.0
    assert PrepareConfig(text_column=["body"]).text_column == "body"
    assert PrepareConfig(text_column=("body", "text")).text_column == ["body", "text"]


def test_which_options_are_inapplicable_depends_on_every_input_side(tmp_path):
    """inapplicable_options, by hand: txt_unit with no .txt file on either side; text_column with .txt files
    alone and no hub dataset on either side (a hub --val-input reads its text column); tokenizer_train_chars
    with a given tokenizer."""
    from relora_ds.data.recipe import PrepareConfig, inapplicable_options

    txt, jsonl = ([str(tmp_path / "a.txt")], None), ([str(tmp_path / "a.jsonl")], None)
    assert inapplicable_options(txt, None) == {"text_column": PrepareConfig.text_column}
    assert inapplicable_options(txt, ([], "owner/validation")) == {}
    assert inapplicable_options(txt, jsonl) == {}
    assert inapplicable_options(jsonl, None) == {"txt_unit": PrepareConfig.txt_unit}
    assert inapplicable_options(jsonl, txt) == {}
    assert inapplicable_options(jsonl, None, tokenizer_given=True) == {
        "txt_unit": "document", "tokenizer_train_chars": PrepareConfig.tokenizer_train_chars}


def test_a_recipe_leaves_out_default_hub_keys_and_offline_keeps_each_sides_prepared_commit(tmp_path, monkeypatch):
    """Keys absent at their defaults (data prepared before they existed keeps its recipe): a local corpus's
    recipe has no hub_commit and, at hf_split 'train', no hf_split. Offline, current_commit falls back to the
    commit the dir was prepared at: the training corpus's, or with validation=True the validation corpus's
    (recorded under validation_corpus); with none recorded the error stands."""
    from relora_ds.data import recipe as recipe_mod
    from relora_ds.data.manifest import write_manifest
    from relora_ds.data.recipe import PrepareConfig, current_commit, recipe_of

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a"}\n')
    rec = recipe_of(([str(corpus)], None), PrepareConfig(), tmp_path / "out")
    assert "hf_split" not in rec and "hub_commit" not in rec and "validation_corpus" not in rec

    def offline(name, revision=None):
        raise ValueError("offline")

    monkeypatch.setattr(recipe_mod, "hub_commit", offline)
    out = tmp_path / "prepared"
    out.mkdir()
    with pytest.raises(ValueError, match="offline"):
        current_commit("owner/train", None, out)
    write_manifest(out, {"recipe": {"hub_commit": "aaa", "validation_corpus": {"hub_commit": "bbb"}}})
    with pytest.warns(DataWarning, match="keeping the data prepared at commit aaa"):
        assert current_commit("owner/train", None, out) == "aaa"
    with pytest.warns(DataWarning, match="keeping the data prepared at commit bbb"):
        assert current_commit("owner/validation", None, out, validation=True) == "bbb"
    # A pinned revision: a commit sha is that commit, offline too; a branch or tag cannot be checked offline
    # against data the dir does not say it was prepared for (it kept commit aaa: a no-op on another revision)
    sha = "b" * 40
    assert current_commit("owner/train", sha, out) == sha
    with pytest.raises(ValueError, match=r"offline The data in .* was prepared at commit aaa, but which commit "
                                         r"revision 'v2' names now cannot be checked offline: pin the commit sha"):
        current_commit("owner/train", "v2", out)
