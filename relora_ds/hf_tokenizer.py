"""A run's SentencePiece tokenizer in Hugging Face form, for an export (relora_ds/hf.py): converted, then
checked to encode as SentencePiece did in training."""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path


# Checked by save_hf_tokenizer on every export: leading, repeated and trailing spaces, newlines, tabs,
# digits, non-ASCII (byte fallback) and the empty string; and _model_probes, the model's own pieces.
_PROBES = ["Hello world", " leading space", "  two  spaces  ", "line\nbreak\n\n", "\tTab", "12345 3.14",
           "naïve café, 漢字 ✓", "", " ", "text with <s>, </s> and <unk> written in it", "\x85next line\x85",
           "\u3000ideographic\u00a0space\u2028"]
# tokenizers' Precompiled normalizer maps a character with a compatibility mapping and the combining marks after
# it as one grapheme, dropping the marks ("\u00a0\u0301": " "), where SentencePiece's charsmap maps the
# character and keeps them (3,514 such characters before U+0301 in a byte-fallback nmt_nfkc model): every
# transformers conversion of such a model (T5's, ALBERT's) has it, so it is warned about, not refused.
_COMBINING_PROBES = ["word\u00a0\u0301 more", "x\u00b2\u0308y", "a\u0301\u0300b"]


def _model_probes(proto, count: int = 300) -> list[str]:
    """Texts made of ``proto``'s pieces: each user-defined symbol (SentencePiece reads it in text, and adds one
    dummy prefix to the whole text; transformers makes it an added token and prefixes every piece of text
    around it) alone, inside a word and between spaces; and ``count`` seeded mixes of pieces, whitespace and
    code points."""
    import random
    import unicodedata

    kind = type(proto.pieces[0]) if proto.pieces else None
    user = [p.piece for p in proto.pieces if p.type == kind.USER_DEFINED] if kind else []
    probes = [t for piece in user for t in (piece, f"a{piece}b", f" {piece} ", f"{piece}{piece}x")]
    words = [p.piece.replace("\u2581", " ") for p in proto.pieces if kind and p.type in (kind.NORMAL,
                                                                                        kind.USER_DEFINED)]
    rng = random.Random(0)
    for _ in range(count if words else 0):
        parts = []
        for _ in range(rng.randint(1, 8)):
            r = rng.random()
            if r < 0.5:
                parts.append(rng.choice(words))
            elif r < 0.7:
                parts.append(rng.choice([" ", "  ", "\n", "\t", "\u00a0", "\u3000", "\x85"]))
            else:  # no combining mark: _COMBINING_PROBES
                char = "\u0301"
                while unicodedata.category(char).startswith("M"):
                    char = chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0x2FFFF)]))
                parts.append(char)
        probes.append("".join(parts))
    return probes


class TokenizerNotConvertible(ValueError):
    """A SentencePiece model transformers cannot reproduce exactly: an export then carries tokenizer.model
    alone (``hf.export_run``)."""


def sentencepiece_special_ids(sp_model: str | Path) -> dict:
    """``{"bos_token_id", "eos_token_id"}`` of a SentencePiece model (BOS None where it has none, as T5's)."""
    from .data.tokenizer import load_tokenizer

    sp = load_tokenizer(sp_model)
    return {"bos_token_id": sp.bos_id() if sp.bos_id() >= 0 else None, "eos_token_id": sp.eos_id()}


def save_hf_tokenizer(sp_model: str | Path, out_dir: str | Path, *, model_max_length: int,
                      probes: list[str] | None = None) -> dict:
    """Write `sp_model` (SentencePiece) as a Hugging Face fast tokenizer into `out_dir`; returns its
    ``{"bos_token_id", "eos_token_id"}``.

    transformers' LLaMA conversion gives the vocab and merges, but its pre-tokenizer (``Metaspace``,
    prepend "first") does not prepend "▁" to text that already starts with a space, where SentencePiece's
    dummy prefix always does: `` leading`` would encode differently from training. The normalizer is
    therefore rebuilt from the model's own normalizer spec, and the result is checked against
    SentencePiece on `probes` (ValueError naming the first text that differs). ``tokenizer.model`` is
    copied too, for SentencePiece users.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, decoders, normalizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from .data.tokenizer import load_tokenizer

    sp_model, out = Path(sp_model), Path(out_dir)
    sp = load_tokenizer(sp_model)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_model.read_bytes())
    spec = proto.normalizer_spec
    if not spec.escape_whitespaces:
        raise TokenizerNotConvertible(f"{sp_model}: SentencePiece models without escape_whitespaces are not "
                                      "supported")
    bos = [sp.bos_id()] if sp.bos_id() >= 0 else []  # T5's spiece.model has no BOS
    pieces = {name: sp.id_to_piece(i) for name, i in
              (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())) if i >= 0}
    with tempfile.TemporaryDirectory() as tmp:  # transformers converts a directory holding tokenizer.model
        shutil.copy(sp_model, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", **pieces}))
        backend = AutoTokenizer.from_pretrained(tmp).backend_tokenizer
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:
        # SentencePiece strips spaces only; tokenizers' Strip takes any Unicode whitespace (U+0085 too, which
        # nmt_nfkc keeps)
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else [])])
    # split_special_tokens: "<s>" written in a text is text, as SentencePiece encoded it in training.
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length,
                                  add_bos_token=bool(bos), add_eos_token=False, split_special_tokens=True,
                                  **pieces)
    for text in [*_PROBES, *_model_probes(proto)] if probes is None else probes:
        want = [*bos, *sp.encode(text)]
        got = tok(text, verbose=False)["input_ids"]  # a probe over model_max_length is no user's input
        if got != want:
            raise TokenizerNotConvertible(
                f"{sp_model}: the Hugging Face tokenizer encodes {text!r} as {got[:12]}, SentencePiece as "
                f"{want[:12]}: transformers cannot convert this model exactly (SentencePiece reads its "
                "tokenizer.model)")
    combining = [text for text in _COMBINING_PROBES
                 if tok(text, verbose=False)["input_ids"] != [*bos, *sp.encode(text)]]
    if combining and probes is None:
        warnings.warn(f"{sp_model}: its tokenizer.json encodes {combining[0]!r} otherwise than SentencePiece: "
                      "tokenizers' Precompiled normalizer drops the combining marks after a character with a "
                      "compatibility mapping (a no-break space, a superscript, ...), as in every transformers "
                      "conversion of this model; other text encodes alike. SentencePiece reads the exported "
                      "tokenizer.model exactly", stacklevel=2)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    # transformers 5 records its own class name (TokenizersBackend), which 4.x cannot load; the generic
    # fast class loads tokenizer.json as written in both.
    config_path = out / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                       "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    shutil.copy(sp_model, out / "tokenizer.model")
    return {"bos_token_id": bos[0] if bos else None, "eos_token_id": sp.eos_id()}


def auto_tokenizer_difference(folder: str | Path) -> str | None:
    """None where transformers' ``AutoTokenizer`` loads the tokenizer.json of `folder` (a model directory, its
    config.json written) as written, else how it encodes otherwise. transformers 5 rebuilds the tokenizer of
    some model types from tokenizer.json's vocab and merges under its own normalizer and pre-tokenizer,
    whatever class tokenizer_config.json names (model_type qwen2: Qwen2Tokenizer's byte-level BPE), which a
    SentencePiece model's conversion or another family's tokenizer does not survive."""
    import transformers

    try:
        auto = transformers.AutoTokenizer.from_pretrained(folder)
        written = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    except Exception as e:  # a check: whatever fails in transformers is named, and the export goes on
        return f"transformers {transformers.__version__}'s AutoTokenizer cannot load it ({type(e).__name__}: {e})"
    for text in _PROBES:
        got, want = auto(text, verbose=False)["input_ids"], written(text, verbose=False)["input_ids"]
        if got != want:
            model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
            return (f"transformers {transformers.__version__}'s AutoTokenizer loads the tokenizer of this "
                    f"{model_type} model as {type(auto).__name__}, which encodes {text!r} as {got[:12]}, where its "
                    f"tokenizer.json (the training tokenizer) gives {want[:12]}")
    return None


def converted_difference(sp_model: str | Path, tokenizer_json: str | Path) -> str | None:
    """None where a SentencePiece ``tokenizer.model`` and a ``tokenizer.json`` give the same ids: the former
    converted as an export converts it (:func:`save_hf_tokenizer`) equals the latter (its JSON content, BOS
    and EOS: data.tokenizer.tokenizer_difference); else how they differ. A model saved by relora_ds and
    re-saved by transformers keeps only the tokenizer.json, while its data was prepared from the .model."""
    from .data.tokenizer import tokenizer_difference

    with tempfile.TemporaryDirectory() as tmp:
        try:
            save_hf_tokenizer(sp_model, tmp, model_max_length=2048)  # the length is tokenizer_config's only
        except TokenizerNotConvertible as e:
            return f"{Path(sp_model).name} has no exact tokenizer.json to compare ({e})"
        difference = tokenizer_difference(Path(tmp) / "tokenizer.json", tokenizer_json)
    return None if difference is None else f"{Path(sp_model).name} converted to a tokenizer.json has {difference}"
