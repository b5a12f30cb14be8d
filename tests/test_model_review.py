"""Model numerics against transformers (the oracle) in float64, on angles tests/test_model_families.py and
tests/test_document_masking.py leave open: forward and every gradient next to transformers' eager and SDPA
attention, with one key/value head or one per query head, "linear" and "llama3" RoPE past the original length,
windows shorter and longer than the sequence; packed documents under document masking next to each document run
alone through transformers; a tied config whose checkpoint stores another lm_head (transformers unties it)."""
import copy
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import relora_ds
from relora_ds import LlamaForCausalLM
from relora_ds.hf import config_from_hf, load_hf_config
from relora_ds.hf_load import check_tied_head

SHAPE = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=16)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
CASES = {  # sequences of 40 tokens: past max_position_embeddings and past llama3's original 8 positions
    "llama-mqa-llama3": (transformers.LlamaConfig, dict(num_key_value_heads=1, rope_scaling=LLAMA3)),
    "llama-mha-linear-tied": (transformers.LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=True,
                                                             rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "mistral-window-shorter": (transformers.MistralConfig, dict(num_key_value_heads=1, sliding_window=7)),
    "mistral-window-longer": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=41)),
    "qwen2-window-one-layer": (transformers.Qwen2Config, dict(num_key_value_heads=4, use_sliding_window=True,
                                                              sliding_window=5, max_window_layers=1)),
    "qwen3-mqa-window-tied": (transformers.Qwen3Config, dict(num_key_value_heads=1, head_dim=24,
                                                             tie_word_embeddings=True, use_sliding_window=True,
                                                             sliding_window=6, max_window_layers=0)),
}


def _pair(case: str, attn: str) -> tuple[torch.nn.Module, LlamaForCausalLM]:
    """(transformers' model with ``attn`` attention, ours with its weights), float64, trained-looking norms and
    biases (fresh ones, 1 and 0, hide a misplaced one)."""
    config_cls, options = CASES[case]
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(
        config_cls(**SHAPE, **copy.deepcopy(options), attn_implementation=attn)).double().eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.uniform_(-0.5, 1.5)
    ours = LlamaForCausalLM(config_from_hf(theirs.config.to_dict())).double().eval()
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if "rotary" not in k})
    return theirs, ours


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_every_gradient_equal_transformers_in_float64(case, attn):
    """Logits, loss and the gradient of every parameter. RMSNorm and RoPE's tables are fp32 in both models
    (transformers' own choice), so the float64 models agree to fp32 rounding (~1e-7 of values of ~1); eager
    attention sums in another order than SDPA."""
    theirs, ours = _pair(case, attn)
    x = torch.randint(0, SHAPE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    want, got = theirs(x, labels=x), ours(x, labels=x)
    want.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.loss.double(), want.loss.double(), rtol=1e-6, atol=0)
    want_grads, got_grads = _grads(theirs), _grads(ours)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=0, atol=1e-7, msg=name)


def _packed_rows(eos: int):
    """Two windows of 29 tokens, their documents at different places: a 1-token document (its EOS alone) and
    a window ending inside its last document."""
    g = torch.Generator().manual_seed(2)

    def documents(lengths):
        docs = [torch.cat([torch.randint(3, SHAPE["vocab_size"], (n - 1,), generator=g), torch.tensor([eos])])
                for n in lengths]
        docs[-1] = docs[-1][:-2]
        return docs
    return [documents([7, 11, 9, 1, 3]), documents([12, 4, 1, 11, 3])]


@pytest.mark.parametrize("case", ["llama-mqa-llama3", "mistral-window-shorter", "qwen3-mqa-window-tied"])
def test_packed_documents_equal_each_document_alone_through_transformers(case):
    """Document masking: the logits of each document of a packed window, and the gradients of a weighted sum of
    them, equal those of the document run alone (positions from 0) through transformers' model."""
    eos = 2
    theirs, ours = _pair(case, "sdpa")
    rows = _packed_rows(eos)
    ours.document_masking_enable(eos)
    packed = ours(torch.stack([torch.cat(docs) for docs in rows])).logits
    weights = torch.randn(packed.shape, dtype=packed.dtype, generator=torch.Generator().manual_seed(3))
    (packed * weights).sum().backward()
    alone_sum = 0
    for b, docs in enumerate(rows):
        start = 0
        for doc in docs:
            alone = theirs(doc[None]).logits[0]
            torch.testing.assert_close(packed[b, start:start + len(doc)].detach(), alone.detach(), rtol=0, atol=1e-6)
            alone_sum = alone_sum + (alone * weights[b, start:start + len(doc)]).sum()
            start += len(doc)
    alone_sum.backward()
    want_grads, got_grads = _grads(theirs), _grads(ours)
    for name, grad in want_grads.items():  # sums over 10 documents of gradients of ~50: fp32 rounding ~1e-5
        torch.testing.assert_close(got_grads[name], grad, rtol=0, atol=2e-5, msg=name)


def test_a_tied_config_whose_checkpoint_stores_another_head_is_refused(tmp_path):
    """tie_word_embeddings true, but the checkpoint stores lm_head.weight with other values: transformers 5 loads
    the head untied (oracle: its logits are those of that head), where ours tied it to the embedding, silently
    another model. Refused, naming both ways out; a stored head equal to the embedding loads, tied, with
    transformers' logits; a head stored without the embedding is named as well."""
    torch.manual_seed(0)
    source = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**SHAPE, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    source.save_pretrained(tmp_path / "tied")
    state = load_file(str(tmp_path / "tied" / "model.safetensors"))
    embed = state["model.embed_tokens.weight"]
    x = torch.randint(0, SHAPE["vocab_size"], (1, 24))

    def variant(name, tensors):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((tmp_path / "tied" / "config.json").read_text())
        save_file(tensors, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
        return tmp_path / name

    other_head = torch.randn(embed.shape, generator=torch.Generator().manual_seed(1)) * 0.02
    untied = variant("other-head", {**state, "lm_head.weight": other_head})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(untied).eval()
    with torch.no_grad():
        hidden = theirs.model(x).last_hidden_state
        torch.testing.assert_close(theirs(x).logits, hidden @ other_head.T)  # transformers keeps the stored head
        assert (theirs(x).logits - hidden @ embed.T).abs().max() > 1e-2
    with pytest.raises(ValueError, match="stores lm_head.weight with values other than model.embed_tokens.weight's"
                                         ".*tie_word_embeddings to false.*delete lm_head.weight"):
        relora_ds.load_hf(untied)
    with pytest.raises(ValueError, match="stores lm_head.weight with values other than"):
        check_tied_head(untied, load_hf_config(untied))  # the trainer's ZeRO-3 build: the config, then this

    same = relora_ds.load_hf(variant("same-head", {**state, "lm_head.weight": embed.clone()})).eval()
    assert same.lm_head.weight is same.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(same(x).logits, source(x).logits, rtol=0, atol=1e-5)

    head_only = {k: v for k, v in state.items() if k != "model.embed_tokens.weight"} | {"lm_head.weight": embed}
    with pytest.raises(ValueError, match="stores lm_head.weight and no model.embed_tokens.weight"):
        relora_ds.load_hf(variant("head-only", head_only))


def test_llama3_rope_reads_its_original_length_where_transformers_5_does():
    """llama3 RoPE's original_max_position_embeddings: transformers 5 takes a top-level one before the RoPE dict's
    (oracle: its inverse frequencies, bit for bit); a top-level one other than the dict's is refused (transformers
    4.x reads the dict's). Before, the dict's was read silently: other frequencies than transformers 5's."""
    from relora_ds.model import rope_inv_freq

    llama3 = {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}
    base = dict(model_type="llama", hidden_size=64, num_attention_heads=4, max_position_embeddings=64)
    for extra, rope in (({}, LLAMA3), ({"original_max_position_embeddings": 16}, llama3),
                        ({"original_max_position_embeddings": 16}, llama3 | {"original_max_position_embeddings": 16})):
        hf = base | extra | {"rope_scaling": dict(rope)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(
                transformers.LlamaConfig.from_dict(copy.deepcopy(hf))).inv_freq
        ours = config_from_hf(copy.deepcopy(hf)).rope_scaling
        assert torch.equal(rope_inv_freq(16, 10000.0, ours), want), (extra, rope)
    differs = base | {"original_max_position_embeddings": 16, "rope_scaling": llama3 | {
        "original_max_position_embeddings": 32}}
    with pytest.raises(ValueError, match="original_max_position_embeddings=16 and its llama3 RoPE "
                                         "original_max_position_embeddings=32"):
        config_from_hf(differs)
