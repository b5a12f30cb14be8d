"""Hugging Face tokenizers (``tokenizer.json``: LLaMA-3, Qwen, ...) in the data pipeline, the trainer's
model/data check and the export. Oracle: transformers' ``AutoTokenizer`` on the same directory."""
import json
import shutil

import numpy as np
import pytest
import transformers

import relora_ds
from relora_ds.data import in_validation, load_manifest, open_tokenizer, prepare_data
from relora_ds.data.builtin_corpus import builtin_documents

CRAFTED = ["  leading spaces and a trailing one ", "line\nbreaks\n\n and a\ttab", "naïve café, 漢字 ✓ 12345",
           "a document that writes <|end_of_text|> and <|begin_of_text|> and <|endoftext|> as text"]
SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|endoftext|>")


def _hf_tokenizer(out, *, adds_bos: bool, bos, eos, vocab_size=400, **special):
    """A byte-level BPE saved by transformers, as LLaMA-3 (`adds_bos`: its post-processor puts BOS first) or
    Qwen (no BOS) ship theirs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([d["text"] for d in builtin_documents()[:300]], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                         **special).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {"llama3": _hf_tokenizer(root / "llama3", adds_bos=True, bos="<|begin_of_text|>", eos="<|end_of_text|>"),
            "qwen": _hf_tokenizer(root / "qwen", adds_bos=False, bos=None, eos="<|endoftext|>"),
            # GPT-2's bos_token (and unk_token) is its EOS, and its encoding adds none: documents are `ids EOS`.
            "gpt2": _hf_tokenizer(root / "gpt2", adds_bos=False, bos="<|endoftext|>", eos="<|endoftext|>",
                                  unk_token="<|endoftext|>")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = [d["text"] for d in builtin_documents()[1000:1060]] + CRAFTED
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path, docs


def _expected_splits(tokenizer_dir, docs, val_fraction):
    """transformers' encoding of each document (with the special tokens it adds itself: LLaMA-3's BOS) and
    its EOS, concatenated per split."""
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    out = {"train": [], "validation": []}
    for text in docs:
        out["validation" if in_validation(text, val_fraction) else "train"] += hf(text)["input_ids"] + [hf.eos_token_id]
    return out, hf


@pytest.mark.parametrize("kind", ["llama3", "qwen", "gpt2"])
def test_prepared_tokens_are_transformers_encoding(tmp_path, toks, corpus, kind):
    path, docs = corpus
    plain = [d for d in docs if not any(s in d for s in SPECIAL)]
    with pytest.warns(UserWarning, match=r"1 documents of .* spell a special token of the tokenizer \('<\|begin_of_text"
                                         r"\|>', .*encoded as text.*split_special_tokens=True"):
        out = prepare_data([str(path)], tmp_path / "data", tokenizer=str(toks[kind]), val_fraction=0.2, num_proc=2)
    m = load_manifest(out)
    assert m["warnings"]["documents_spelling_special_tokens"] == 1
    # A byte-level BPE makes no <unk>; GPT-2's unk is its EOS, which the packing adds (all 64 documents
    # counted one before).
    assert m["warnings"]["unk_tokens"] == 0
    expected, hf = _expected_splits(toks[kind], plain, 0.2)
    assert m["bos_id"] == (hf.bos_token_id if kind == "llama3" else None) and m["eos_id"] == hf.eos_token_id
    assert m["vocab_size"] == len(hf) and m["tokenizer_path"].endswith("tokenizer.json") and m["dtype"] == "uint16"
    for split in ("train", "validation"):
        got = np.fromfile(out / f"{split}.bin", dtype=np.uint16).tolist()
        special_doc = next(d for d in docs if "<|end_of_text|>" in d)
        if in_validation(special_doc, 0.2) == (split == "validation"):
            # The crafted document spelling the special tokens is the last one: its ids are text pieces.
            n = len(hf(special_doc, split_special_tokens=True)["input_ids"]) + 1
            assert hf.decode(got[-n:-1], skip_special_tokens=False).removeprefix("<|begin_of_text|>") == special_doc
            assert not set(got[-n + 1:-1]) & {hf.convert_tokens_to_ids(s) for s in SPECIAL}
            got = got[:-n]
        assert got == expected[split], split
    # The data dir holds the tokenizer transformers loads; re-running is a no-op, the file given directly too.
    assert transformers.AutoTokenizer.from_pretrained(out)(plain[0])["input_ids"] == hf(plain[0])["input_ids"]
    before = (out / "train.bin").stat().st_mtime_ns
    prepare_data([str(path)], out, tokenizer=str(toks[kind] / "tokenizer.json"), val_fraction=0.2)
    assert (out / "train.bin").stat().st_mtime_ns == before


@pytest.mark.parametrize("kind, add_bos_token", [("llama3", False), ("gpt2", True)])
def test_documents_follow_the_post_processor_where_add_bos_token_disagrees(tmp_path, toks, corpus, kind,
                                                                          add_bos_token):
    """transformers 5's AutoTokenizer adds BOS as tokenizer.json's post-processor says, whatever the config's
    add_bos_token: the data does the same, and the disagreement is named."""
    path, docs = corpus
    tok = tmp_path / "tok"
    shutil.copytree(toks[kind], tok)
    config = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": add_bos_token}))
    with pytest.warns(UserWarning, match=rf"add_bos_token={add_bos_token}, but tokenizer.json's post-processor "
                                         rf"{'adds' if kind == 'llama3' else 'does not add'} .*as transformers 5"):
        out = prepare_data([str(path)], tmp_path / "data", tokenizer=str(tok), val_fraction=0.0)
    hf = transformers.AutoTokenizer.from_pretrained(tok)
    got = np.fromfile(out / "train.bin", dtype=np.uint16)
    assert got[:len(hf(docs[0])["input_ids"])].tolist() == hf(docs[0])["input_ids"]
    assert load_manifest(out)["bos_id"] == (hf.bos_token_id if kind == "llama3" else None)


def test_another_end_of_document_token_is_another_recipe(tmp_path, toks, corpus):
    """tokenizer_config.json decides the EOS every document ends with: changing it changes the data's
    tokenizer hash, so prepared data is not silently kept (nor replaced without --overwrite)."""
    path, _ = corpus
    tok = tmp_path / "tok"
    shutil.copytree(toks["qwen"], tok)
    out = prepare_data([str(path)], tmp_path / "data", tokenizer=str(tok))
    config = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|end_of_text|>"}))
    with pytest.raises(ValueError, match=r"another recipe \(tokenizer.given: "):
        prepare_data([str(path)], out, tokenizer=str(tok))
    prepare_data([str(path)], out, tokenizer=str(tok), overwrite=True)
    assert load_manifest(out)["eos_id"] == open_tokenizer(toks["llama3"]).eos_id != open_tokenizer(toks["qwen"]).eos_id


def test_ids_past_65535_are_stored_as_uint32(tmp_path):
    """A vocabulary larger than uint16 (LLaMA-3: 128256) is stored as uint32, every id intact."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"filler{i}": len(vocab) + i for i in range(70_000)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|eos|>"])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>").save_pretrained(tmp_path / "big")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(20)))
    out = prepare_data([str(corpus)], tmp_path / "data", tokenizer=str(tmp_path / "big"), val_fraction=0.0)
    m = load_manifest(out)
    assert m["dtype"] == "uint32" and m["vocab_size"] == 70_257 and m["eos_id"] == 70_256
    ids = np.fromfile(out / "train.bin", dtype=np.uint32)
    assert (ids == 70_256).sum() == 20 and ids[len("document 0")] == 70_256


def test_bad_hugging_face_tokenizers_are_named(tmp_path, toks, corpus):
    path, _ = corpus
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(toks["qwen"] / "tokenizer.json", bare / "tokenizer.json")  # no tokenizer_config.json
    with pytest.raises(ValueError, match=r"bare names no eos_token .* documents are packed as \[BOS\] text EOS, .* token. "
                                         r"Give the model directory .* or write one there with eos_token set"):
        prepare_data([str(path)], tmp_path / "d1", tokenizer=str(bare / "tokenizer.json"))
    # found by a user trial: with a tokenizer_config.json that lacks eos_token, the advice was to give one
    (bare / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    with pytest.raises(ValueError, match=r"bare names no eos_token .* Set eos_token in its tokenizer_config.json "
                                         r"to one of the tokenizer's tokens"):
        prepare_data([str(path)], tmp_path / "d1", tokenizer=str(bare))
    (bare / "tokenizer_config.json").write_text('{"eos_token": ')  # damaged: named (a review: a bare JSONDecodeError)
    with pytest.raises(ValueError, match=r"bare/tokenizer_config.json is not valid JSON"):
        prepare_data([str(path)], tmp_path / "d2", tokenizer=str(bare))
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match=r"eos_token '</s>' is not a token of tokenizer.json"):
        prepare_data([str(path)], tmp_path / "d2", tokenizer=str(bare))
    # A tokenizer.model that is not SentencePiece (LLaMA-3 ships a tiktoken file): the tokenizer.json is named.
    (bare / "tokenizer.model").write_text("IQ== 0\n")
    with pytest.raises(ValueError, match=r"is not a SentencePiece model: .*; to use the directory's Hugging Face "
                                         r"tokenizer, pass '.*bare/tokenizer.json'"):
        prepare_data([str(path)], tmp_path / "d3", tokenizer=str(bare))
    (bare / "tokenizer.model").unlink()
    (bare / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"is not a Hugging Face tokenizer.json"):
        prepare_data([str(path)], tmp_path / "d3", tokenizer=str(bare))


def _model_dir(path, tokenizer_dir, vocab_size=512):
    """A Hugging Face model directory holding `tokenizer_dir`'s tokenizer (export_hf copies its files)."""
    relora_ds.export_hf(relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("debug", vocab_size=vocab_size)),
                        path, tokenizer=tokenizer_dir / "tokenizer.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (path / name).read_bytes() == (tokenizer_dir / name).read_bytes()
    return path


def test_a_model_trains_only_on_data_of_its_own_hugging_face_tokenizer(tmp_path, toks, corpus):
    from relora_ds.startup import check_model_and_data
    from relora_ds.train_config import TrainConfig

    path, _ = corpus
    data = prepare_data([str(path)], tmp_path / "data", tokenizer=str(toks["llama3"]))
    model = _model_dir(tmp_path / "model", toks["llama3"])
    cfg = TrainConfig(hf_model=str(model), mode="lora", rank=4, total_steps=10, seq_len=32)
    assert check_model_and_data(cfg, data, 512)[1]["eos_id"] == open_tokenizer(model).eos_id
    # Re-saved (other indentation and key order): the same tokenizer.
    spec = json.loads((model / "tokenizer.json").read_text())
    (model / "tokenizer.json").write_text(json.dumps(dict(reversed(spec.items()))))
    check_model_and_data(cfg, data, 512)
    # The same pieces with another end-of-document token (LLaMA-3-Instruct's <|eot_id|> style): named as such.
    eot = _model_dir(tmp_path / "eot_model", toks["llama3"])
    config = json.loads((eot / "tokenizer_config.json").read_text())
    (eot / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
    cfg = TrainConfig(hf_model=str(eot), mode="lora", rank=4, total_steps=10, seq_len=32)
    with pytest.raises(ValueError, match=r"the same pieces, but its documents end with '<\|endoftext\|>' \(id 2\), "
                                         r"not '<\|end_of_text\|>' \(id 1\) \(tokenizer_config.json\)"):
        check_model_and_data(cfg, data, 512)
    other = _model_dir(tmp_path / "qwen_model", toks["qwen"])
    cfg = TrainConfig(hf_model=str(other), mode="lora", rank=4, total_steps=10, seq_len=32)
    with pytest.raises(ValueError, match=r"qwen_model/tokenizer.json \(sha256 .*\) is not the tokenizer .*data was "
                                         r"prepared with \(sha256 .*; other pieces\).*--tokenizer .*qwen_model$"):
        check_model_and_data(cfg, data, 512)


def test_continued_pretraining_on_hugging_face_tokens_exports_the_models_tokenizer(tmp_path, toks, corpus):
    """launch/train.py --hf-model on data prepared with the model's tokenizer.json, through a ReLoRA reset:
    the export carries the model's tokenizer files, and launch/export.py finds the run's tokenizer.json
    through its data dir (an export without `like` copies it too)."""
    import os

    from launch_utils import ROOT, launch_env, run_python
    from trainer_utils import read_losses, train1

    path, docs = corpus
    data = prepare_data([str(path)], tmp_path / "data", tokenizer=str(toks["llama3"]), val_fraction=0.1)
    model = _model_dir(tmp_path / "model", toks["llama3"])
    # The data dir given relative to the trainer's directory (ROOT), as typed on a command line: checkpoints
    # record it absolute, and launch/export.py below runs from another directory.
    train1(tmp_path, os.path.relpath(data, ROOT), hf_model=str(model), total_steps=8, warm_start_steps=0,
           cycle_length=4, eval_every=8, save_every=8, export=True)
    assert json.loads((tmp_path / "run/checkpoints/step_8/config.json").read_text())["data_dir"] == str(data)
    losses, recs = read_losses(tmp_path / "run")
    assert len(losses) == 8 and [r["step"] for r in recs if r.get("event") == "reset"] == [4, 8]
    hf = tmp_path / "run" / "hf"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (hf / name).read_bytes() == (model / name).read_bytes(), name
    assert json.loads((hf / "config.json").read_text())["eos_token_id"] == open_tokenizer(model).eos_id
    proc = run_python(ROOT / "launch/export.py", tmp_path / "run", "--out", tmp_path / "exported", env=launch_env(),
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    relora_ds.export_hf(relora_ds.load_hf(tmp_path / "exported"), tmp_path / "plain", tokenizer=data / "tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(toks["llama3"])
    for out in ("exported", "plain"):
        tok = transformers.AutoTokenizer.from_pretrained(tmp_path / out)
        assert tok(docs[0])["input_ids"] == theirs(docs[0])["input_ids"] and tok.eos_token_id == theirs.eos_token_id
    proc = run_python(ROOT / "launch/export.py", tmp_path / "run", "--out", tmp_path / "e2", "--tokenizer",
                      toks["qwen"], env=launch_env())
    assert proc.returncode == 2 and "qwen/tokenizer.json is not the tokenizer" in proc.stderr, proc.stderr[-2000:]
    # --out the model the run started from: one error line (a review found two tracebacks and a retry that
    # blamed the tokenizer), the source untouched
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    proc = run_python(ROOT / "launch/export.py", tmp_path / "run", "--out", model, env=launch_env())
    assert proc.returncode == 2 and "is the directory the model was loaded from" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_special_tokens_map_wins_over_tokenizer_config_as_in_transformers(tmp_path):
    """tokenizer_config.json and special_tokens_map.json name different EOS tokens: the EOS id is the one
    transformers' AutoTokenizer reports (the oracle; transformers 4.46 and 5 both take the map's). A mutation
    audit found relora_ds taking the config's, so documents ended with another EOS than the model's."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from relora_ds.data.tokenizer import open_tokenizer
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<eot>": 3, "a": 4, "b": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d = tmp_path / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                          "eos_token": "<eot>", "unk_token": "<unk>"}))
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "unk_token": "<unk>"}))
    want = transformers.AutoTokenizer.from_pretrained(d).eos_token_id
    assert open_tokenizer(d / "tokenizer.json").eos_id == want


def test_a_tokenizer_config_class_that_rebuilds_the_pipeline_encodes_as_autotokenizer(tmp_path):
    """Found by a review: a LLaMA-2-style directory (tokenizer.json converted from SentencePiece, no
    tokenizer.model, tokenizer_config.json naming LlamaTokenizer, as LLaMA-2/Mistral ship theirs) was encoded
    with tokenizer.json as written, but transformers 5's LlamaTokenizer replaces the file's normalizer with its
    own Metaspace pre-tokenizer: every text starting with a space got other ids than AutoTokenizer gives. The
    data now follow the pipeline AutoTokenizer builds. Oracle: AutoTokenizer on the same directory."""
    import io

    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(d["text"] for d in builtin_documents()[:300]),
                                   model_writer=proto, vocab_size=400, model_type="bpe", byte_fallback=True,
                                   normalization_rule_name="identity", minloglevel=2)
    (tmp_path / "sp.model").write_bytes(proto.getvalue())
    relora_ds.hf_tokenizer.save_hf_tokenizer(tmp_path / "sp.model", tmp_path / "llama2", model_max_length=4096)
    (tmp_path / "llama2" / "tokenizer.model").unlink()
    config = json.loads((tmp_path / "llama2" / "tokenizer_config.json").read_text())
    (tmp_path / "llama2" / "tokenizer_config.json").write_text(json.dumps({**config,
                                                                          "tokenizer_class": "LlamaTokenizer"}))
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "llama2", split_special_tokens=True)
    assert type(auto).__name__ == "LlamaTokenizer"
    texts = [" leading space", "  two spaces first", "no leading space", *CRAFTED]
    ours = open_tokenizer(tmp_path / "llama2")
    want = [auto(t)["input_ids"] + [auto.eos_token_id] for t in texts]
    assert [ids.tolist() for ids in ours.encode_documents(texts)] == want
    assert ours.bos_id == auto.bos_token_id and ours.vocab_size == len(auto)


def test_what_autotokenizer_adds_or_rebuilds_is_what_the_data_hold(tmp_path, toks):
    """Found by a review, each against AutoTokenizer on the same directory: a config's additional special token
    that tokenizer.json lacks is appended by AutoTokenizer (an id past the file's vocab, which the model must
    embed: it was not counted in vocab_size); a post-processor that starts each text with a token the config does
    not name as bos_token (LLaMA-3 style, no bos_token) gave documents without it; and two directories with the
    same tokenizer.json under different tokenizer_class (one rebuilt by transformers) counted as one tokenizer."""
    from relora_ds.data.tokenizer import DataWarning, tokenizer_difference

    d = tmp_path / "extra"
    shutil.copytree(toks["llama3"], d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "additional_special_tokens": ["<|extra|>"]}))
    auto = transformers.AutoTokenizer.from_pretrained(d)
    ours = open_tokenizer(d)
    assert ours.vocab_size == len(auto) == 401 and ours.backend.token_to_id("<|extra|>") == 400
    assert ours.spells_special_token(["text <|extra|> text"]) == [True]
    unnamed = tmp_path / "unnamed"
    shutil.copytree(toks["llama3"], unnamed)
    config.pop("bos_token")
    (unnamed / "tokenizer_config.json").write_text(json.dumps(config))
    auto = transformers.AutoTokenizer.from_pretrained(unnamed)
    with pytest.warns(DataWarning, match=r"post-processor starts each text with '<\|begin_of_text\|>' \(id 0\), while "
                                         r"tokenizer_config.json names bos_token None"):
        ours = open_tokenizer(unnamed)
    assert ours.bos_id == 0 and [ids.tolist() for ids in ours.encode_documents(CRAFTED[:3])] == [
        auto(t)["input_ids"] + [auto.eos_token_id] for t in CRAFTED[:3]]
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(toks["llama3"], rebuilt)
    config = json.loads((rebuilt / "tokenizer_config.json").read_text())
    (rebuilt / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "BertTokenizer"}))
    assert tokenizer_difference(toks["llama3"] / "tokenizer.json", toks["llama3"] / "tokenizer.json") is None
    assert "the same tokenizer.json, but another pipeline" in tokenizer_difference(
        toks["llama3"] / "tokenizer.json", rebuilt / "tokenizer.json")


def test_an_eos_that_text_can_spell_is_counted_and_refused_for_document_masking(tmp_path):
    """Found by a review: with an eos_token that is a plain vocabulary entry (no special added token), text that
    spells it encodes to the EOS id inside a document (as AutoTokenizer's encoding does), which document masking
    takes for a document's end; nothing said so. Counted, warned, and named by document_ends_problem."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from relora_ds.data.manifest import document_ends_problem

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2, "</s>": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "unk_token": "<unk>"}))
    docs = ["hello </s> world", "world hello", "hello world </s>"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok", split_special_tokens=True)
    assert auto(docs[0])["input_ids"] == [1, 3, 2]  # the oracle: the text makes the EOS id
    with pytest.warns(UserWarning, match=r"2 documents of .* encode to the EOS id '</s>' \(id 3\) inside their text"):
        out = prepare_data([str(tmp_path / "docs.jsonl")], tmp_path / "data", tokenizer=str(tmp_path / "tok"),
                           val_fraction=0.0)
    manifest = load_manifest(out)
    assert np.fromfile(out / "train.bin", dtype=np.uint16).tolist() == [1, 3, 2, 3, 2, 1, 3, 1, 2, 3, 3]
    assert manifest["warnings"]["documents_holding_eos"] == 2
    assert "2 documents of the data hold the EOS id (3) inside their text" in document_ends_problem(manifest)
    # A mixture with it as a member: its manifest counts them (it kept only unk_tokens: a mixture passed), and one
    # made before that (no count) is judged by its members' manifests.
    from relora_ds.data import make_mixture
    (tmp_path / "clean.jsonl").write_text(json.dumps({"text": "world hello"}) + "\n")
    clean = prepare_data([str(tmp_path / "clean.jsonl")], tmp_path / "clean", tokenizer=str(tmp_path / "tok"),
                         val_fraction=0.0)
    assert document_ends_problem(load_manifest(clean), clean) is None
    mix = make_mixture([(clean, 0.5), (out, 0.5)], tmp_path / "mix")
    mixed = load_manifest(mix)
    assert mixed["warnings"]["documents_holding_eos"] == 2
    assert "2 documents of the data hold the EOS id (3)" in document_ends_problem(mixed)
    del mixed["warnings"]["documents_holding_eos"]
    assert document_ends_problem(mixed, mix) == (f"its member {out}: 2 documents of the data hold the EOS id (3) "
                                                 "inside their text (the tokenizer's eos_token is not a special "
                                                 "token), each of which would end a document there")
