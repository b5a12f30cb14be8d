"""Hugging Face hub datasets as prepare_data inputs (the hub simulated: no network here): pinned commits, a
hub validation split, hub and local sides mixed, and the offline error."""
from __future__ import annotations

import pytest

from relora_ds.data import DataWarning, load_manifest, prepare_data
from test_data_inputs import SENTENCES, write_jsonl


def test_hub_name_offline_is_a_clear_error(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # No network here: make the hub client fail at once instead of retrying for ~25 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"could not open Hugging Face hub dataset 'someone/no-such-corpus'"):
        prepare_data(["someone/no-such-corpus"], tmp_path / "out", vocab_size=300, hf_config="en")
    with pytest.raises(ValueError, match="must be the only input"):
        prepare_data(["someone/a", write_jsonl(tmp_path / "c.jsonl", SENTENCES)], tmp_path / "out")


def test_hub_dataset_is_pinned_to_the_commit_it_was_read_at(tmp_path, monkeypatch):
    """A hub corpus is read at the commit its revision points to now; the manifest records it, re-running
    is a no-op while it stays, and a moved branch re-prepares with --overwrite (the hub is simulated: no
    network here)."""
    import datasets
    import huggingface_hub

    head = {"main": "aaa111", "v1": "0f0f0f"}
    asked, loaded = [], []
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, name, revision=None: (
        asked.append((name, revision)) or type("Info", (), {"sha": head[revision or "main"]})()))
    real_load = datasets.load_dataset

    def fake_load(name, *args, **kw):
        if name != "someone/corpus":
            return real_load(name, *args, **kw)
        loaded.append(kw["revision"])
        return datasets.Dataset.from_dict({"text": SENTENCES}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    out = tmp_path / "out"
    prepare_data(["someone/corpus"], out, vocab_size=300)
    assert load_manifest(out)["recipe"]["hub_commit"] == "aaa111" and loaded == ["aaa111"]
    prepare_data(["someone/corpus"], out, vocab_size=300)
    assert loaded == ["aaa111"]  # unchanged: nothing re-read
    head["main"] = "bbb222"  # the branch moved: replacing the data is the user's call
    with pytest.raises(ValueError, match=r"another recipe \(.*hub_commit: \"aaa111\" -> \"bbb222\"\).* "
                                         r"\(or --hf-revision aaa111 to keep the commit this data was read at\)"):
        prepare_data(["someone/corpus"], out, vocab_size=300)
    prepare_data(["someone/corpus"], out, vocab_size=300, overwrite=True)
    assert load_manifest(out)["recipe"]["hub_commit"] == "bbb222" and loaded == ["aaa111", "bbb222"]
    # Offline: the data prepared at the last commit is kept (a warning says the hub could not be asked).
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, name, revision=None: 1 / 0)
    with pytest.warns(DataWarning, match="cannot reach the hub .* keeping the data prepared at commit bbb222"):
        prepare_data(["someone/corpus"], out, vocab_size=300)
    assert loaded == ["aaa111", "bbb222"]
    with pytest.raises(ValueError, match="could not open Hugging Face hub dataset 'someone/corpus'"):
        prepare_data(["someone/corpus"], tmp_path / "never_prepared", vocab_size=300)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, name, revision=None: (
        asked.append((name, revision)) or type("Info", (), {"sha": head[revision or "main"]})()))
    prepare_data(["someone/corpus"], tmp_path / "pinned", vocab_size=300, hf_revision="v1")
    assert asked[-1] == ("someone/corpus", "v1") and loaded[-1] == "0f0f0f"
    with pytest.raises(ValueError, match="hf_revision='v1' only applies to a hub dataset"):
        prepare_data([write_jsonl(tmp_path / "c.jsonl", SENTENCES)], tmp_path / "local", hf_revision="v1")


def test_hub_validation_split_as_the_validation_corpus(tmp_path, monkeypatch):
    """allenai/c4 style: --input NAME --val-input NAME reads its train split for training and its validation
    split for validation (simulated hub); --hf-split/--hf-val-split pick others."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info",
                        lambda self, name, revision=None: type("Info", (), {"sha": "c0ffee"})())
    splits = {"train": SENTENCES, "validation": [f"held out sentence {i}" for i in range(5)],
              "other": ["another split"]}
    read = []
    real_load = datasets.load_dataset

    def fake_load(name, *args, **kw):
        if name != "someone/corpus":
            return real_load(name, *args, **kw)
        read.append(kw["split"])
        return datasets.Dataset.from_dict({"text": splits[kw["split"]]}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    m = load_manifest(prepare_data(["someone/corpus"], tmp_path / "out", vocab_size=300,
                                   val_inputs=["someone/corpus"]))
    assert read == ["train", "validation"]
    assert m["splits"]["train"]["documents"] == len(SENTENCES) and m["splits"]["validation"]["documents"] == 5
    assert m["recipe"]["validation_corpus"]["hf_split"] == "validation"
    m = load_manifest(prepare_data(["someone/corpus"], tmp_path / "out2", vocab_size=300, hf_split="validation",
                                   val_inputs=["someone/corpus"], hf_val_split="other"))
    assert read[-2:] == ["validation", "other"]
    assert m["splits"]["train"]["documents"] == 5 and m["splits"]["validation"]["documents"] == 1
    assert m["recipe"]["hf_split"] == "validation" and m["recipe"]["validation_corpus"]["hf_split"] == "other"


def test_local_training_files_with_a_hub_validation_set_that_needs_a_config(tmp_path, monkeypatch):
    """C4's usual set-up: local train shards and --val-input allenai/c4 --hf-config en (and the reverse).
    hf_config and hf_revision go to the hub side (found by a review: both were refused as 'not local files');
    with no hub side they are still refused."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info",
                        lambda self, name, revision=None: type("Info", (), {"sha": "c0ffee"})())
    asked, real_load = [], datasets.load_dataset

    def fake_load(name, *args, **kw):
        if name != "someone/c4":
            return real_load(name, *args, **kw)
        asked.append((args, kw["split"], kw["revision"]))
        texts = [f"hub {kw['split']} text {i}" for i in range(7)]
        return datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    local = write_jsonl(tmp_path / "train.jsonl", SENTENCES)
    m = load_manifest(prepare_data([local], tmp_path / "a", vocab_size=300, val_inputs=["someone/c4"], hf_config="en",
                                   hf_revision="v1"))
    assert asked == [(("en",), "validation", "c0ffee")]
    assert m["splits"]["train"]["documents"] == len(SENTENCES) and m["splits"]["validation"]["documents"] == 7
    m = load_manifest(prepare_data(["someone/c4"], tmp_path / "b", vocab_size=300, val_inputs=[local], hf_config="en"))
    assert asked[-1] == (("en",), "train", "c0ffee")
    assert m["splits"]["train"]["documents"] == 7 and m["splits"]["validation"]["documents"] == len(SENTENCES)
    with pytest.raises(ValueError, match="hf_config='en' only applies to a hub dataset input, not local files"):
        prepare_data([local], tmp_path / "c", vocab_size=300, hf_config="en",
                     val_inputs=[write_jsonl(tmp_path / "v.jsonl", SENTENCES[:9])])
