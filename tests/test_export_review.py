"""Exports and evaluation against what a user gives them: an export over an earlier one, interrupted anywhere
(relora_ds.hf._replace_export), a tokenizer AutoTokenizer would rebuild, and inputs that are not what the
scripts take."""
import os
import stat

import pytest
import torch

import relora_ds
from relora_ds import LlamaConfig, LlamaForCausalLM
from relora_ds.hf import PROGRESS_FILE, export_run

IDS = {"bos_token_id": 1, "eos_token_id": 2}
_MUTATIONS = ("replace", "rename", "unlink", "remove", "rmdir")


class _Crash(BaseException):
    """The process dies here: no finally, no except OSError runs on (BaseException), nothing after it is written."""


def _model(seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig.preset("debug", vocab_size=320))


def _files(folder):
    """{name: bytes} of the plain files in `folder` (hidden staging folders left out)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} if folder.is_dir() else None


def _crash_at(monkeypatch, k):
    """From the k-th file-system change on (os.replace, rename, unlink, remove, rmdir), each raises _Crash;
    returns the count of changes made (k=None: none crash)."""
    done = [0]
    for name in _MUTATIONS:
        real = getattr(os, name)

        def fake(*a, _real=real, **kw):
            if k is not None and done[0] >= k:
                raise _Crash
            done[0] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(os, name, fake)
    return done


def test_a_crash_anywhere_in_an_export_over_an_earlier_one_never_pairs_weights_with_the_others_config(
        tmp_path, monkeypatch):
    """An export over an earlier one, the process killed at each file-system change in turn: the weights left, if
    any, sit beside the config.json (and progress file, if any) they were exported with, never the other
    export's; a folder without weights fails to load, loudly (the earlier export's go before the new ones come
    in). The next run's export puts the new one there whole, also after a failed one (a full disk)."""
    torch.manual_seed(0)  # another vocabulary: its config.json differs from the new export's
    old_model, new_model = LlamaForCausalLM(LlamaConfig.preset("debug", vocab_size=384)), _model(1)
    readme = b"the user's notes\n"

    def earlier(out):
        relora_ds.export_hf(old_model, out, token_ids=IDS, progress={"step": 1})
        (out / "README.md").write_bytes(readme)
        return _files(out)

    reference = tmp_path / "reference"
    relora_ds.export_hf(new_model, reference, token_ids=IDS, progress={"step": 2})
    (reference / "README.md").write_bytes(readme)
    old, new = earlier(tmp_path / "probe"), _files(reference)
    assert old["config.json"] != new["config.json"] and old["model.safetensors"] != new["model.safetensors"]
    with monkeypatch.context() as m:
        changes = _crash_at(m, None)
        relora_ds.export_hf(new_model, tmp_path / "probe", token_ids=IDS, progress={"step": 2})
    assert _files(tmp_path / "probe") == new and changes[0] >= 2
    for k in range(changes[0]):
        out = tmp_path / f"crash{k}" / "hf"
        earlier(out)
        with monkeypatch.context() as m:
            _crash_at(m, k)
            with pytest.raises(_Crash):
                relora_ds.export_hf(new_model, out, token_ids=IDS, progress={"step": 2})
        files = _files(out)
        assert files["README.md"] == readme
        if "model.safetensors" in files:
            era = old if files["model.safetensors"] == old["model.safetensors"] else new
            assert files["model.safetensors"] == era["model.safetensors"], f"crash at change {k}: foreign weights"
            assert files["config.json"] == era["config.json"], f"a crash at change {k} paired weights and config"
            assert files.get(PROGRESS_FILE) in (None, era[PROGRESS_FILE]), f"crash at change {k}: progress"
        with monkeypatch.context() as m:
            def full_disk(*a, **kw):
                raise OSError(28, "No space left on device")
            m.setattr(relora_ds.hf, "save_file", full_disk)
            with pytest.raises(OSError, match="No space"):
                export_run(new_model, out, {}, None, token_ids=IDS, progress={"step": 2})
        export_run(new_model, out, {}, None, token_ids=IDS, progress={"step": 2})
        assert _files(out) == new and sorted(p.name for p in out.parent.iterdir()) == ["hf"]
        assert not [p for p in out.iterdir() if not p.is_file()]


def test_the_replaced_folder_keeps_its_mode_and_the_users_files(tmp_path):
    """An export over an earlier one keeps the folder's mode and the user's files, links and folders as they
    were; the earlier weights (shards and index too) and progress file are gone."""
    for sub in (False, True):
        out = tmp_path / f"sub{int(sub)}" / "hf"
        relora_ds.export_hf(_model(0), out, token_ids=IDS, progress={"step": 1})
        (out / "model-00001-of-00002.safetensors").write_bytes(b"an old shard")
        (out / "model.safetensors.index.json").write_text("{}")
        (out / "notes.md").write_text("notes")
        (out / "link").symlink_to("notes.md")
        if sub:
            (out / "eval").mkdir()
            (out / "eval" / "result.json").write_text("{}")
        os.chmod(out, 0o750)
        inode = (out / "notes.md").stat().st_ino
        relora_ds.export_hf(_model(1), out, token_ids=IDS)
        assert stat.S_IMODE(out.stat().st_mode) == 0o750
        assert (out / "notes.md").stat().st_ino == inode and os.readlink(out / "link") == "notes.md"
        expected = {"config.json", "generation_config.json", "model.safetensors", "notes.md", "link"}
        assert {p.name for p in out.iterdir()} == expected | ({"eval"} if sub else set())
        assert not sub or (out / "eval" / "result.json").read_text() == "{}"
        loaded = relora_ds.hf.load_hf(out)
        assert torch.equal(loaded.model.embed_tokens.weight, _model(1).model.embed_tokens.weight)
        assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]


def test_an_export_whose_tokenizer_autotokenizer_rebuilds_says_how_to_load_it(tmp_path, small_data_dir):
    """Found by a review: transformers 5 loads the tokenizer of a model_type qwen2 directory as Qwen2Tokenizer
    (byte-level BPE from tokenizer.json's vocab and merges), whatever tokenizer_config.json names, so a Qwen2
    model trained on a SentencePiece tokenizer got other ids from AutoTokenizer than in training, silently.
    Oracle: SentencePiece's own encode of the data dir's tokenizer.model. The export warns, naming the loader
    that reads it as trained; a LLaMA export, which AutoTokenizer loads as written, does not warn."""
    import warnings

    import sentencepiece as spm
    import transformers

    from relora_ds.data import load_manifest

    sp_model = load_manifest(small_data_dir)["tokenizer_path"]
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    text = "Hello world, 12345"
    for model_type in ("qwen2", "llama"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig.preset("debug", vocab_size=512, model_type=model_type))
        out = tmp_path / model_type
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            relora_ds.export_hf(model, out, tokenizer=sp_model)
        notes = [str(w.message) for w in caught if "AutoTokenizer" in str(w.message)]
        auto = transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"]
        named = transformers.PreTrainedTokenizerFast.from_pretrained(out)(text)["input_ids"]
        assert named == [sp.bos_id(), *sp.encode(text)]
        if model_type == "llama":
            assert auto == named and notes == []
        else:
            assert auto != named, "transformers loads a qwen2 export's tokenizer as written now: drop the warning"
            assert len(notes) == 1 and "Qwen2Tokenizer" in notes[0] and "PreTrainedTokenizerFast" in notes[0], notes


def test_evaluate_names_a_run_given_for_its_export_and_a_damaged_progress_file(tmp_path, small_data_dir, capsys):
    """launch/evaluate.py given a run's output_dir or its checkpoints/ folder said only "not a Hugging Face model
    directory (no config.json)"; now the export to pass (load_hf_config's message). A damaged
    relora_ds_progress.json (a crash while a user edits it) failed with JSON's bare "Expecting value"; now it is
    named, with the flag that does without it."""
    import importlib.util
    import json

    from launch_utils import ROOT
    from relora_ds.data import load_manifest

    spec = importlib.util.spec_from_file_location("evaluate_py_under_review", ROOT / "launch/evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)

    run = tmp_path / "run"
    (run / "checkpoints" / "step_2").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_2")
    (run / "metrics.jsonl").write_text("")
    common = ["--data-dir", str(small_data_dir), "--seq-len", "16", "--windows", "2"]
    for given, named in ((run, f"pass its export {run / 'hf'}"), (run / "checkpoints", "export it")):
        assert evaluate.main([str(given), *common]) == 2
        assert named in capsys.readouterr().err
    relora_ds.export_hf(LlamaForCausalLM(LlamaConfig.preset("debug", vocab_size=512)), run / "hf",
                        tokenizer=load_manifest(small_data_dir)["tokenizer_path"], progress={"step": 1})
    assert evaluate.main([str(run / "hf"), *common]) == 0 and json.loads(capsys.readouterr().out)["windows"] == 2
    (run / "hf" / PROGRESS_FILE).write_text('{"step": 1, "document_mask')  # cut short
    assert evaluate.main([str(run / "hf"), *common]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'hf' / PROGRESS_FILE} is not the JSON object an export writes" in err
    assert "--document-masking on or off" in err
    assert evaluate.main([str(run / "hf"), *common, "--document-masking", "off"]) == 0


def test_export_script_names_what_to_give_for_a_folder_without_checkpoints_or_another_tag(tmp_path, monkeypatch,
                                                                                         capsys):
    """launch/export.py on a folder holding no checkpoint said only "found: none"; on one checkpoint's step_N/
    folder with --tag naming another it looked for that tag inside step_N/ ("no checkpoint step_6 in
    .../step_12; found: none"). Both now name what to give."""
    import importlib.util
    import json

    from launch_utils import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "launch"))
    spec = importlib.util.spec_from_file_location("export_py_under_review", ROOT / "launch/export.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ckpts = tmp_path / "run" / "checkpoints"
    for tag in ("step_6", "step_12"):
        (ckpts / tag).mkdir(parents=True)
        (ckpts / tag / "config.json").write_text(json.dumps({"train": {}, "model": {}}))
    (tmp_path / "empty").mkdir()
    cases = {(tmp_path / "empty", None): "found: none (give a run's output_dir, its checkpoints/ folder, or one "
                                         "checkpoint's step_N/ folder)",
             (ckpts / "step_12", "step_6"): f"{ckpts / 'step_12'} is one checkpoint, step_12, and --tag step_6 "
                                            f"another: give their checkpoints/ folder {ckpts} with --tag (found "
                                            "there: ['step_6', 'step_12'])"}
    for (given, tag), message in cases.items():
        with pytest.raises(SystemExit) as e:
            script.main([str(given), "--out", str(tmp_path / "out"), *(["--tag", tag] if tag else [])])
        assert e.value.code == 2 and message in capsys.readouterr().err
