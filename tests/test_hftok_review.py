"""Hugging Face tokenizers end to end, against the tokenizer itself (``tokenizers.Tokenizer.from_file(...)
.encode``, the oracle): prepare_data's token files, the vocab size a model gets, the export's config ids and
its tokenizer (AutoTokenizer: same ids, same decoding, same chat template). Tokenizers built offline: a
byte-level BPE (LLaMA-3 style: the post-processor adds BOS), one without BOS holding added tokens past the
base vocab and a chat template (Qwen style), one whose EOS is also its PAD, and a SentencePiece unigram with
byte fallback (its pieces and scores, as SpmConverter reads them)."""
import io
import json

import numpy as np
import pytest
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import relora_ds
from relora_ds.data import load_manifest, prepare_data
from relora_ds.data.builtin_corpus import builtin_documents

# LLaMA-3's pre-tokenizer split
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
         r"\s+(?!\S)|\s+")
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXTS = ["  leading spaces ", "line\nbreaks\n\n\tand a tab", "naïve café, 漢字 ✓ 12345", "x <think> y </think> z"]


def _byte_level(out, *, bos, eos, pad=None, added=(), special=(), chat=None):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([d["text"] for d in builtin_documents()[:200]], trainers.BpeTrainer(
        vocab_size=320, special_tokens=[t for t in (bos, eos) if t],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(list(special))
    tok.add_tokens(list(added))
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos:
        steps.append(processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]))
    tok.post_processor = processors.Sequence(steps)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                         **({"chat_template": chat} if chat else {})).save_pretrained(out)


def _unigram(out):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(d["text"] for d in builtin_documents()[:200]),
                                   model_writer=proto, vocab_size=400, model_type="unigram", byte_fallback=True,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto.getvalue())
    tok = Tokenizer(models.Unigram([(p.piece, p.score) for p in model.pieces], unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<pad>"])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                         pad_token="<pad>").save_pretrained(out)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    _byte_level(root / "llama3", bos="<|begin_of_text|>", eos="<|end_of_text|>")
    _byte_level(root / "eos_pad", bos="<|begin_of_text|>", eos="<|end_of_text|>", pad="<|end_of_text|>")
    # Qwen style: no BOS; <|im_start|>, <think>, </think> and the pad token are added past the trained vocab.
    _byte_level(root / "chat", bos=None, eos="<|im_end|>", pad="<|endoftext|>", special=["<|im_start|>", "<|im_end|>"],
                added=["<think>", "</think>"], chat=CHAT)
    _unigram(root / "unigram")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = [d["text"] for d in builtin_documents()[1000:1030]] + TEXTS
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path, docs


# (bos token or None, eos token, pad token) as each tokenizer was built
SPECIAL = {"llama3": ("<|begin_of_text|>", "<|end_of_text|>", None),
           "eos_pad": ("<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>"),
           "chat": (None, "<|im_end|>", "<|endoftext|>"), "unigram": ("<s>", "</s>", "<pad>")}


@pytest.mark.parametrize("kind", list(SPECIAL))
def test_prepared_ids_vocab_and_export_follow_the_tokenizer_itself(tmp_path, toks, corpus, kind):
    """Each document is the oracle's encoding (with its post-processor's BOS, once) then EOS, once; the vocab
    size covers the added tokens past the trained vocab; the export's config.json and generation_config.json
    carry the tokenizer's BOS/EOS, and AutoTokenizer on the export encodes and decodes as the oracle does."""
    path, docs = corpus
    oracle = Tokenizer.from_file(str(toks / kind / "tokenizer.json"))
    bos, eos, pad = ((None if t is None else oracle.token_to_id(t)) for t in SPECIAL[kind])
    out = prepare_data([str(path)], tmp_path / "data", tokenizer=str(toks / kind), val_fraction=0.0)
    manifest = load_manifest(out)
    want = [i for text in docs for i in [*oracle.encode(text).ids, eos]]
    assert np.fromfile(out / "train.bin", dtype=manifest["dtype"]).tolist() == want
    assert want.count(eos) == len(docs) and (bos is None or want.count(bos) == len(docs))
    vocab = max(oracle.get_vocab(with_added_tokens=True).values()) + 1
    assert (manifest["bos_id"], manifest["eos_id"], manifest["pad_id"], manifest["vocab_size"]) == (bos, eos, pad,
                                                                                                   vocab)
    # chat: 320 trained (<|im_end|> among them) and 4 added
    assert vocab == {"chat": 324}.get(kind, oracle.get_vocab_size(with_added_tokens=False))

    model = relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("debug", vocab_size=manifest["vocab_size"]))
    relora_ds.export_hf(model, tmp_path / "hf", tokenizer=manifest["tokenizer_path"])
    for name in ("config.json", "generation_config.json"):
        config = json.loads((tmp_path / "hf" / name).read_text())
        assert (config["bos_token_id"], config["eos_token_id"]) == (bos, eos), name
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (tok.bos_token_id if bos is not None else None, tok.eos_token_id, tok.pad_token_id) == (bos, eos, pad)
    assert len(tok) == vocab == transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").vocab_size
    for text in docs[-len(TEXTS):]:
        ids = oracle.encode(text).ids
        assert tok(text)["input_ids"] == ids
        assert tok.decode(ids) == oracle.decode(ids, skip_special_tokens=False)


def test_the_chat_template_travels_with_the_tokenizer(tmp_path, toks, corpus):
    """Found by this review: transformers saves a tokenizer's chat template as chat_template.jinja beside
    tokenizer.json, and neither the data dir's copy of the tokenizer nor the export (which copies the data dir's)
    kept it: AutoTokenizer on the export had no chat template (apply_chat_template raised). Oracle: AutoTokenizer
    on the tokenizer's own directory."""
    path, _ = corpus
    source = transformers.AutoTokenizer.from_pretrained(toks / "chat")
    assert (toks / "chat" / "chat_template.jinja").is_file() and source.chat_template == CHAT
    out = prepare_data([str(path)], tmp_path / "data", tokenizer=str(toks / "chat"), val_fraction=0.0)
    model = relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("debug", vocab_size=324))
    relora_ds.export_hf(model, tmp_path / "hf", tokenizer=load_manifest(out)["tokenizer_path"])
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello <think>"}]
    for directory in (out, tmp_path / "hf"):
        tok = transformers.AutoTokenizer.from_pretrained(directory)
        assert tok.chat_template == CHAT, directory
        assert tok.apply_chat_template(messages, tokenize=True) == source.apply_chat_template(messages, tokenize=True)


def test_a_replaced_tokenizer_leaves_no_chat_template_and_a_mixture_keeps_it(tmp_path, toks, corpus):
    """Data re-prepared with --overwrite and a tokenizer without a chat template must not keep the earlier
    tokenizer's chat_template.jinja (AutoTokenizer would load it with the new tokenizer), and a mixture of
    data prepared with a chat template carries it. Oracle: AutoTokenizer on the tokenizer's own directory."""
    from relora_ds.data import make_mixture

    path, _ = corpus
    out = prepare_data([str(path)], tmp_path / "data", tokenizer=str(toks / "chat"), val_fraction=0.0)
    (tmp_path / "more.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    more = prepare_data([str(tmp_path / "more.jsonl")], tmp_path / "more", tokenizer=str(toks / "chat"),
                        val_fraction=0.0)
    mix = make_mixture([(out, 0.5), (more, 0.5)], tmp_path / "mix")
    assert transformers.AutoTokenizer.from_pretrained(mix).chat_template == CHAT
    prepare_data([str(path)], out, tokenizer=str(toks / "llama3"), val_fraction=0.0, overwrite=True)
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template is None
    assert not (out / "chat_template.jinja").exists()


def test_a_re_prepare_takes_the_tokenizers_changed_chat_template(tmp_path, toks, corpus):
    """The chat template is not in the tokenizer's hash (it changes no id), so a re-prepare after it changed (or
    went) finds the data up to date; it left the old template, which the run's export then copied. Oracle:
    AutoTokenizer on the tokenizer's own directory."""
    import shutil

    path, _ = corpus
    mine = tmp_path / "tok"
    shutil.copytree(toks / "chat", mine)
    out = prepare_data([str(path)], tmp_path / "data", tokenizer=str(mine), val_fraction=0.0)
    before = (out / "train.bin").stat().st_mtime_ns
    (mine / "chat_template.jinja").write_text(CHAT.replace("<|im_end|>", "<|im_end|>!"))
    prepare_data([str(path)], out, tokenizer=str(mine), val_fraction=0.0)
    assert (out / "train.bin").stat().st_mtime_ns == before  # up to date: not re-tokenized
    want = transformers.AutoTokenizer.from_pretrained(mine).chat_template
    assert "!" in want and transformers.AutoTokenizer.from_pretrained(out).chat_template == want
    (mine / "chat_template.jinja").unlink()
    prepare_data([str(path)], out, tokenizer=str(mine), val_fraction=0.0)
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template is None
    assert not (out / "chat_template.jinja").exists() and (out / "train.bin").stat().st_mtime_ns == before


def test_an_export_like_a_model_keeps_its_named_chat_templates(tmp_path, toks):
    """transformers 5 saves a tokenizer's named chat templates other than the default in
    additional_chat_templates/*.jinja: an export like that model (its tokenizer carried over) kept the default
    alone, and an export over an earlier one with such a folder kept the old templates beside a new tokenizer.
    The oracle: AutoTokenizer on the source model's folder."""
    from relora_ds.hf import export_hf
    from relora_ds.hf_load import load_hf

    src = tmp_path / "src"
    tok = transformers.AutoTokenizer.from_pretrained(toks / "chat")
    tok.chat_template = {"default": CHAT, "tool_use": "{{ messages[0]['content'] }} <tools>"}
    tok.save_pretrained(src)
    assert (src / "additional_chat_templates" / "tool_use.jinja").is_file()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    want = transformers.AutoTokenizer.from_pretrained(src).chat_template
    assert set(want) == {"default", "tool_use"}
    out = export_hf(load_hf(src), tmp_path / "out", like=src)
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == want
    export_hf(load_hf(src), out, tokenizer=toks / "chat" / "tokenizer.json")  # another tokenizer over it
    assert not (out / "additional_chat_templates").exists()
    export_hf(load_hf(src), out, like=src)
    (out / "elsewhere").mkdir()
    (out / "additional_chat_templates").rename(out / "elsewhere" / "named")
    (out / "additional_chat_templates").symlink_to(out / "elsewhere" / "named")  # a link: unlinked, not followed
    export_hf(load_hf(src), out, like=src)
    assert (out / "additional_chat_templates").is_dir() and not (out / "additional_chat_templates").is_symlink()
    assert (out / "elsewhere" / "named" / "tool_use.jinja").is_file()


def test_preparing_with_a_tokenizer_whose_named_chat_templates_stay_behind_says_so(tmp_path, toks, corpus):
    """A data dir keeps a tokenizer's files, and its default chat template, not the additional_chat_templates/
    folder transformers 5 writes for named ones: said, not dropped silently."""
    from relora_ds.data.inputs import DataWarning

    src = tmp_path / "tok"
    tok = transformers.AutoTokenizer.from_pretrained(toks / "chat")
    tok.chat_template = {"default": CHAT, "tool_use": "{{ messages[0]['content'] }} <tools>"}
    tok.save_pretrained(src)
    with pytest.warns(DataWarning, match=r"named chat templates .*additional_chat_templates\) are not copied"):
        prepare_data([str(corpus[0])], tmp_path / "data", tokenizer=str(src / "tokenizer.json"), val_fraction=0.0)
