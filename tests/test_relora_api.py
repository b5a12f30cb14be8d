"""relora_ds.wrap / unwrap / merge_and_reinit / prune_optimizer_state on the models and optimizers a user
brings: Hugging Face architectures, eval mode, mixed dtypes, bad settings, DeepSpeed objects passed in the
wrong place (found by a test-drive, 2026-12-01). The layer and the conversion themselves: test_relora.py."""
import copy
import math

import pytest
import torch
import transformers
from torch import nn

import relora_ds
from relora_ds import ReLoRALinear


def _tiny_llama(**kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2),
                                      **kw})
    return transformers.LlamaForCausalLM(cfg)


def test_wrap_and_unwrap_keep_the_train_eval_mode():
    """An eval-mode model (from_pretrained returns one) stays in eval mode: no LoRA dropout at inference."""
    model = _tiny_llama().eval()
    relora_ds.wrap(model, rank=4, dropout=0.3)
    layers = [l for _, l in relora_ds.relora_layers(model)]
    assert layers and not any(l.training for l in layers)
    with torch.no_grad():
        for l in layers:
            l.lora_B.normal_(std=0.05)
    x = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, model(x).logits, atol=0, rtol=0)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x).logits, model(x).logits)  # dropout is on in training
    model.eval()
    relora_ds.unwrap(model)
    assert not any(m.training for m in model.modules())


def test_wrap_checks_every_layer_before_swapping_any():
    """rank=40 fits q_proj (64x64) but not k_proj (out 32): the error leaves the model untouched."""
    model = _tiny_llama()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"k_proj: rank=40 must be in \[1, min\(in_features=64, out_features=32\)\]"):
        relora_ds.wrap(model, rank=40)
    assert not list(relora_ds.relora_layers(model))
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    relora_ds.wrap(model, rank=16)  # a retry with a valid rank works
    assert len(list(relora_ds.relora_layers(model))) == 7


@pytest.mark.parametrize("kw, match", [
    (dict(alpha=float("nan")), "alpha=nan must be a positive finite number"),
    (dict(alpha=float("inf")), "alpha=inf must be a positive finite number"),
    (dict(alpha=0.0), "alpha=0.0 must be a positive finite number"),
    (dict(alpha=-8), "alpha=-8 must be a positive finite number"),
    (dict(rank=4.0), r"rank=4.0 must be an integer \(got float\)"),
    (dict(rank=True), r"rank=True must be an integer \(got bool\)"),
    (dict(dropout="0.1"), r"dropout='0.1' must be in \[0, 1\)"),
    (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),  # every input dropped: a NaN at the first forward
    (dict(dropout=-0.1), r"dropout=-0.1 must be in \[0, 1\)"),
])
def test_wrap_refuses_bad_rank_alpha_dropout(kw, match):
    model = _tiny_llama()
    with pytest.raises(ValueError, match=match):
        relora_ds.wrap(model, **{"rank": 4, **kw})
    assert not list(relora_ds.relora_layers(model))


def test_numpy_integer_rank_is_a_rank():
    import numpy as np
    model = relora_ds.wrap(_tiny_llama(), rank=np.int64(4))
    assert {l.rank for _, l in relora_ds.relora_layers(model)} == {4}


def test_unwrap_keeps_the_base_dtype_when_lora_masters_are_fp32():
    """bf16 model, fp32 LoRA factors (a common mixed-precision setup): the plain layer is bf16 again and
    holds round_bf16(W + s·B·A) computed in fp32."""
    model = _tiny_llama().to(torch.bfloat16)
    relora_ds.wrap(model, rank=4)
    for _, l in relora_ds.relora_layers(model):
        l.lora_A.data = l.lora_A.data.float()
        l.lora_B.data = torch.randn(l.lora_B.shape) * 0.1
    layer = model.model.layers[0].self_attn.q_proj
    want = (layer.weight.float() + layer.scale * layer.lora_B.data @ layer.lora_A.data).to(torch.bfloat16)
    relora_ds.unwrap(model)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and q.weight.dtype == torch.bfloat16
    torch.testing.assert_close(q.weight.data, want, atol=0, rtol=0)
    model(torch.randint(0, 128, (1, 8)))  # one dtype throughout: runs


def test_standalone_layer_with_bias_starts_like_nn_linear():
    """A layer built directly draws nn.Linear's weight and bias: the same values from the same seed."""
    torch.manual_seed(3)
    layer = ReLoRALinear(100, 30, rank=4, bias=True)
    torch.manual_seed(3)
    plain = nn.Linear(100, 30)
    assert torch.equal(layer.weight, plain.weight) and torch.equal(layer.bias, plain.bias)
    bound = 1 / math.sqrt(100)
    assert layer.bias.abs().max() <= bound and layer.bias.abs().min() > 0 and layer.bias.std() > bound / 4


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_wrap_draws_nothing_from_the_global_rng_and_keeps_the_model(quantize):
    """wrap loads each base weight into its new layer: it must not first draw a throw-away nn.Linear init
    (found by a review: a random fill of every base weight, ~1 min of one core at 7b, at each wrap), so the
    global generator is where it was, and the wrapped model computes the unwrapped one's logits (LoRA's
    B = 0; int8: within its quantization error)."""
    model = _tiny_llama(attention_bias=True).eval()
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        before = model(ids).logits
    state = torch.get_rng_state()
    relora_ds.wrap(model, rank=4, quantize=quantize)
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        after = model(ids).logits
    if quantize:
        assert (after - before).norm() / before.norm() < 2e-2
    else:
        assert torch.equal(after, before)


def test_multihead_attention_out_proj_is_refused_other_linears_wrap():
    """nn.MultiheadAttention reads out_proj.weight itself: a ReLoRA layer there would never run."""
    enc = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    with pytest.raises(ValueError, match=r"'self_attn.out_proj', which no ReLoRA layer can replace: nn.MultiheadAttention reads its out_proj"):
        relora_ds.wrap(enc, rank=4, target_modules=["out_proj", "linear1", "linear2"])
    assert not list(relora_ds.relora_layers(enc))
    relora_ds.wrap(enc, rank=4, target_modules=["linear1", "linear2"])
    for _, l in relora_ds.relora_layers(enc):
        l.lora_B.data.normal_()
    enc(torch.randn(2, 5, 32)).sum().backward()
    assert all(l.lora_A.grad is not None and l.lora_A.grad.abs().sum() > 0 for _, l in relora_ds.relora_layers(enc))


def test_default_targets_cover_phi3_fused_projections():
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)
    model = transformers.Phi3ForCausalLM(cfg)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left over to warn about
        relora_ds.wrap(model, rank=4)
    assert {n.rsplit(".", 1)[1] for n, _ in relora_ds.relora_layers(model)} == {"qkv_proj", "o_proj", "gate_up_proj",
                                                                               "down_proj"}


def test_default_targets_name_the_linears_they_leave_full_rank():
    model = _tiny_llama()
    model.model.layers[0].mlp.router = nn.Linear(64, 4)  # a layer the default names do not know
    with pytest.warns(UserWarning, match=r"leave 1 other linear layer full-rank and trainable: "
                                         r"\['model.layers.0.mlp.router'\]"):
        relora_ds.wrap(model, rank=4)
    assert len(list(relora_ds.relora_layers(model))) == 7  # lm_head is meant to stay: not named


def test_targets_that_name_non_linear_modules_say_what_they_are():
    """A target naming a module that is no linear layer (here an nn.Conv1d): the error names it and its type."""
    model = _tiny_llama()
    model.model.layers[0].mlp.up_proj = nn.Conv1d(64, 128, 1)
    with pytest.raises(ValueError, match=r"match by name but are neither nn.Linear nor transformers' Conv1D.*"
                                         r"'model.layers.0.mlp.up_proj \(Conv1d\)'"):
        relora_ds.wrap(model, rank=4, target_modules=["q_proj", "up_proj"])


def _tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _as_conv1d_model(wrapped, original):
    """The oracle: GPT-2 with plain Conv1D layers holding each ReLoRA layer's base + s·B·A (dequantized for an
    int8 base), transposed by hand into Conv1D's (in, out) layout."""
    oracle = copy.deepcopy(original)
    with torch.no_grad():
        for name, layer in relora_ds.relora_layers(wrapped):
            conv = oracle.get_submodule(name)
            conv.weight.copy_((layer.base_weight() + layer.delta_weight()).T)
            conv.bias.copy_(layer.bias)
    return oracle


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_gpt2_conv1d_layers_wrap_merge_and_unwrap_to_conv1d(tmp_path, quantize):
    """GPT-2's projections are transformers' Conv1D (y = x·W + b, W stored (in, out)). The oracle is GPT-2 with
    Conv1D layers: a wrapped model computes what Conv1D layers holding base + s·B·A compute, a merge keeps
    the function (within int8's rounding for an int8 base), and unwrap gives Conv1D layers back, so
    save_pretrained writes a checkpoint GPT-2 loads (no transposed or missing weight)."""
    from transformers.pytorch_utils import Conv1D
    model = _tiny_gpt2()
    original = copy.deepcopy(model)
    x = torch.randint(0, 128, (2, 12))
    relora_ds.wrap(model, rank=4, target_modules="all-linear", quantize=quantize)
    names = [n for n, _ in relora_ds.relora_layers(model)]
    assert names == [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                          "mlp.c_proj")]
    with torch.no_grad():
        if quantize is None:  # B = 0: exactly the model it was
            assert torch.equal(model(x).logits, original(x).logits)
        for _, layer in relora_ds.relora_layers(model):
            layer.lora_B.normal_(std=0.1)
        before = model(x).logits
        torch.testing.assert_close(before, _as_conv1d_model(model, original)(x).logits, rtol=1e-5, atol=1e-5)
        deltas = {n: layer.base_weight() + layer.delta_weight() for n, layer in relora_ds.relora_layers(model)}
    relora_ds.merge_and_reinit(model)
    with torch.no_grad():
        for name, layer in relora_ds.relora_layers(model):  # W += s·B·A in the (out, in) layout
            err = (layer.base_weight() - deltas[name]).norm() / deltas[name].norm()
            assert err <= (1e-6 if quantize is None else 1e-2), (name, float(err))
        torch.testing.assert_close(model(x).logits, _as_conv1d_model(model, original)(x).logits, rtol=1e-5,
                                   atol=1e-5)
        for _, layer in relora_ds.relora_layers(model):
            layer.lora_B.normal_(std=0.1)
        before = model(x).logits
    rng = torch.get_rng_state()
    relora_ds.unwrap(model)
    assert torch.equal(torch.get_rng_state(), rng)  # unwrap draws no throw-away init
    assert all(type(model.get_submodule(n)) is Conv1D for n in names)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.state_dict().keys() == original.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", ["all-linear", r".*\.attn\.c_proj"])
def test_a_gpt2_wrapped_on_meta_loads_the_plain_gpt2_checkpoint(targets):
    """The large-model load: build and wrap on meta, to_empty, load the base model's own state (strict=False).
    Conv1D weights come (in, out) and are transposed into the ReLoRA layers; with only square layers chosen
    (c_proj here) a missed transpose would load without an error and compute something else (a review
    found both). Oracle: the same wrap of the model built with its weights."""
    plain = _tiny_gpt2()
    want = relora_ds.wrap(copy.deepcopy(plain), rank=4, seed=5, target_modules=targets)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(plain.config).eval()
        relora_ds.wrap(model, rank=4, seed=5, target_modules=targets)
    model.to_empty(device="cpu")
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert {k.rpartition(".")[2] for k in result.missing_keys} == {"lora_A", "lora_B", "merge_count"}
    model.tie_weights()
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain(x).logits)
        for (_, a), (_, b) in zip(relora_ds.relora_layers(model), relora_ds.relora_layers(want)):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.lora_A, b.lora_A)


def test_an_int8_model_wrapped_on_meta_quantizes_the_plain_checkpoint_on_load():
    """The same load with quantize='int8': the checkpoint's float weights were unexpected keys and the int8
    base stayed as to_empty left it (logits off by 0.31 here) although strict=False loads are the documented
    path; now each is quantized as wrap quantizes: bit for bit the int8 wrap of the loaded model."""
    plain = _tiny_llama().eval()
    want = relora_ds.wrap(copy.deepcopy(plain), rank=4, quantize="int8")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(plain.config).eval()
        relora_ds.wrap(model, rank=4, quantize="int8")
    model.to_empty(device="cpu")
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert {k.rpartition(".")[2] for k in result.missing_keys} == {"lora_A", "lora_B", "merge_count"}
    got, ref = model.state_dict(), want.state_dict()
    for key in ref:
        if "rotary" not in key:
            assert torch.equal(got[key], ref[key]), key
    # a wrapped model's own state (it holds lora_A) loads as it is
    again = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in relora_ds.relora_layers(model):
            layer.lora_B.normal_()
        relora_ds.merge_and_reinit(model)
    again.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_all_linear_leaves_out_what_no_relora_layer_can_take():
    """'all-linear' skips what an explicit name is refused for: nn.MultiheadAttention's out_proj (named in the
    warning with in_proj_weight: both stay full-rank), a head tied to the embedding that the model does not
    report as its output layer, and a classification head (score/classifier, as PEFT). Spelled in any case."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(16, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.ff = nn.Linear(8, 8)
            self.out = nn.Linear(8, 16, bias=False)
            self.out.weight = self.emb.weight

    with pytest.warns(UserWarning, match=r"2 trainable weights no ReLoRA layer takes stay full-rank \(256 "
                                         r"parameters\): \['attn.in_proj_weight \(24, 8\)', 'attn.out_proj.weight"):
        model = relora_ds.wrap(Model(), rank=2, target_modules="ALL-Linear")
    assert [n for n, _ in relora_ds.relora_layers(model)] == ["ff"]
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=4, n_positions=16, num_labels=3,
                                  pad_token_id=0, bos_token_id=0, eos_token_id=0)
    classifier = relora_ds.wrap(transformers.GPT2ForSequenceClassification(cfg), rank=2, target_modules="all-linear")
    assert type(classifier.score) is nn.Linear and len(list(relora_ds.relora_layers(classifier))) == 4


def test_a_regex_matches_the_names_of_the_uncompiled_model():
    """torch.compile's wrapper prefixes every name with _orig_mod.: a regex written for the model matches the
    compiled one too (as the names-or-suffixes list does)."""
    compiled = torch.compile(_tiny_gpt2())
    relora_ds.wrap(compiled, rank=2, target_modules=r"transformer\.h\.\d+\.attn\.c_attn")
    assert [n for n, _ in relora_ds.relora_layers(compiled)] == ["_orig_mod.transformer.h.0.attn.c_attn",
                                                                 "_orig_mod.transformer.h.1.attn.c_attn"]


def test_a_peft_model_is_refused_with_the_way_out():
    """A PEFT LoRA model: the default targets wrapped the projections PEFT left alone beside its adapters (with a
    warning listing PEFT's lora_A/lora_B as linear layers), 'all-linear' would wrap those adapters."""
    import peft  # a dev dependency (setup.py)
    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for targets in (None, "all-linear", ["k_proj"]):
        with pytest.raises(ValueError, match=r"holds PEFT adapter layers \(2, e.g. 'base_model.model.model.layers.0."
                                             r"self_attn.q_proj'\).*merge_and_unload\(\)"):
            relora_ds.wrap(model, rank=4, target_modules=targets)
    assert not any(True for _ in relora_ds.relora_layers(model))
    plain = model.merge_and_unload()
    assert len(list(relora_ds.relora_layers(relora_ds.wrap(plain, rank=4)))) == 7


def test_regex_and_all_linear_targets_select_as_peft_does():
    """PEFT's string forms: a regular expression the full module name must match, and 'all-linear' (every
    linear layer but the output layer). A list keeps the names-or-suffixes meaning."""
    model = relora_ds.wrap(_tiny_llama(num_hidden_layers=2), rank=4, target_modules=r".*\.1\.self_attn\.(q|v)_proj")
    assert [n for n, _ in relora_ds.relora_layers(model)] == ["model.layers.1.self_attn.q_proj",
                                                              "model.layers.1.self_attn.v_proj"]
    model = relora_ds.wrap(_tiny_llama(), rank=4, target_modules="all-linear")
    assert sorted(n.rsplit(".", 1)[1] for n, _ in relora_ds.relora_layers(model)) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert type(model.lm_head) is nn.Linear  # the output layer stays full-rank
    ours = relora_ds.wrap(relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("tiny")), rank=4,
                          target_modules="all-linear")  # relora_ds's own lm_head (LMHead) is left out too
    assert len(list(relora_ds.relora_layers(ours))) == 7 * ours.config.num_hidden_layers
    with pytest.raises(ValueError, match=r"target_modules='q_proj' matched no linear layer \(nn.Linear or "
                                         r"transformers' Conv1D\); linear layer names in this model end in: "
                                         r"\['down_proj'.*a string is a regular expression the full module name must "
                                         r"match \(e.g. \['model.layers.0.self_attn.q_proj'.*: for every 'q_proj' "
                                         r"layer pass \['q_proj'\] or r'\.\*\\\.q_proj'"):
        relora_ds.wrap(_tiny_llama(), rank=4, target_modules="q_proj")  # a string is a full-name pattern
    with pytest.raises(ValueError, match=r"target_modules='\(q' is not a valid regular expression .*'all-linear'"):
        relora_ds.wrap(_tiny_llama(), rank=4, target_modules="(q")
    with pytest.raises(ValueError, match=r"target_modules must be a non-empty list .*got \[''\]"):
        relora_ds.wrap(_tiny_llama(), rank=4, target_modules=[""])
    with pytest.raises(ValueError, match=r"matched no linear layer.*target_modules='all-linear' selects every"):
        relora_ds.wrap(_tiny_gpt2(), rank=4)  # the LLaMA-style defaults name none of GPT-2's layers


def test_wrap_int8_of_a_meta_model_outside_its_context_is_named():
    with torch.device("meta"):
        model = _tiny_llama()
    with pytest.raises(ValueError, match=r"quantize='int8': layer 'model.layers.0.self_attn.q_proj' is on the meta "
                                         r"device"):
        relora_ds.wrap(model, rank=4, quantize="int8")
    with torch.device("meta"):
        relora_ds.wrap(model, rank=4, quantize="int8")  # inside the context (what the trainer does): fine


@pytest.mark.parametrize("attr", ["ds_id", "_hp_mapping"])
def test_merge_and_prune_refuse_zero_managed_parameters_outside_the_engine(attr):
    """engine.module / engine.optimizer instead of the engine: the plain path would merge the bf16 copy (or a
    ZeRO-3 shard) and leave the fp32 master's B as it was, so the update came back at the next step."""
    model = relora_ds.wrap(_tiny_llama(), rank=4)
    for p in relora_ds.lora_parameters(model):
        setattr(p, attr, object())  # what DeepSpeed's ZeRO-3 / ZeRO-1,2 put on the parameters it manages
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"managed by a DeepSpeed ZeRO engine; pass the engine itself"):
        relora_ds.merge_and_reinit(model)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    opt = torch.optim.AdamW(relora_ds.lora_parameters(model))
    with pytest.raises(ValueError, match=r"managed by a DeepSpeed ZeRO engine"):
        relora_ds.prune_optimizer_state(opt, relora_ds.lora_parameters(model))
    # unwrap too (a review's find: under ZeRO-3 it failed on the empty shards, and with whole parameters it
    # merged the bf16 copies instead of the fp32 masters), with the ways that work named
    with pytest.raises(ValueError, match=r"unwrap: the model's parameters are managed by a DeepSpeed engine .*"
                                         r"model_from_engine\(engine\)"):
        relora_ds.unwrap(model)
    assert any(True for _ in relora_ds.relora_layers(model))  # left wrapped


def test_engine_at_stage_0_with_bf16_is_refused_before_any_change():
    """DeepSpeed's FP16 optimizer (bf16/fp16 at stage 0) keeps masters and moments out of reach."""
    class Engine:  # the engine surface the check reads
        def __init__(self, module, bf16):
            self.module, self.bf16 = module, bf16
            self.optimizer = torch.optim.AdamW(relora_ds.lora_parameters(module))  # fp32 stage 0: the torch one
            self.micro_steps = 0

        def gradient_accumulation_steps(self):
            return 1

        def zero_optimization_stage(self):
            return 0

        def bfloat16_enabled(self):
            return self.bf16

        def fp16_enabled(self):
            return False
    pytest.importorskip("deepspeed")
    model = relora_ds.wrap(_tiny_llama(), rank=4)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    for call in (lambda e: relora_ds.merge_and_reinit(e),
                 lambda e: relora_ds.prune_optimizer_state(e, relora_ds.lora_parameters(model))):
        with pytest.raises(ValueError, match=r"runs bf16 with ZeRO stage 0.*use ZeRO stage 1 or higher"):
            call(Engine(model, bf16=True))
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert relora_ds.merge_and_reinit(Engine(model, bf16=False))["layers"] == 7  # fp32 stage 0: the model is the master


def test_a_model_wrapped_on_meta_then_loaded_with_base_weights_starts_as_a_fresh_wrap():
    """The FSDP/torchtitan-style load: build and wrap under torch.device("meta"), to_empty, load the base
    model's weights (no LoRA keys: strict=False). The factors and merge_count were uninitialized memory (NaN
    logits, a random merge count; a library user's review found it); they now start as a wrap on real weights
    does (oracle: that wrap): same A, B = 0, no merge, same logits as the unwrapped model."""
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM as HFLlama

    cfg = HFConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    torch.manual_seed(0)
    base = HFLlama(cfg)
    want = relora_ds.wrap(copy.deepcopy(base), rank=4, seed=3)
    with torch.device("meta"):
        model = relora_ds.wrap(HFLlama(cfg), rank=4, seed=3)
    model.to_empty(device="cpu")
    missing = model.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all(k.endswith(("lora_A", "lora_B", "merge_count")) or "rotary" in k for k in missing)
    model.model.rotary_emb.inv_freq.copy_(base.model.rotary_emb.inv_freq)  # a non-persistent buffer
    for k, v in want.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.randint(0, 64, (2, 9))
    assert torch.equal(model(x).logits, base(x).logits)


def test_wrapping_after_deepspeed_initialize_is_refused_at_once_or_at_the_first_reset(tmp_path):
    """A library user's review: wrap() after deepspeed.initialize was accepted and the LoRA factors, in no
    optimizer group or ZeRO partition, never trained (B stayed 0); the merge then said OK and the prune failed
    with a bare KeyError. wrap(engine) and wrap of an engine-managed ZeRO-1/2 model are refused now, and a
    reset on an engine whose LoRA factors it does not manage (stage 0, or a ZeRO-3 module wrapped late) names
    the order. One process of its own (DeepSpeed's process group), ZeRO stages 0, 2 and 3 in turn."""
    import subprocess
    import sys

    from launch_utils import ROOT, free_port, launch_env
    env = {**launch_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(ROOT / "tests/dist/late_wrap_worker.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("stage")]
    assert lines == ["stage 0: wrap(engine) refused", "stage 0: merge refused", "stage 0: prune refused",
                     "stage 2: wrap(engine) refused", "stage 2: wrap(engine.module) refused",
                     "stage 3: wrap(engine) refused", "stage 3: merge refused", "stage 3: prune refused"]
    assert "accumulation: merge warned" in proc.stdout  # a merge inside a gradient accumulation is named


def test_prune_names_a_model_or_module_passed_in_the_wrong_place():
    model = relora_ds.wrap(_tiny_llama(), rank=4)
    opt = torch.optim.AdamW(relora_ds.lora_parameters(model))
    with pytest.raises(ValueError, match=r"first argument is the model \(LlamaForCausalLM\); pass the optimizer"):
        relora_ds.prune_optimizer_state(model, relora_ds.lora_parameters(model))
    with pytest.raises(ValueError, match=r"params is a module .*relora_ds.lora_parameters\(model\)"):
        relora_ds.prune_optimizer_state(opt, model)


def test_a_compiled_model_draws_the_factors_an_uncompiled_one_draws():
    """torch.compile's wrapper puts ``_orig_mod.`` in every module name, which seeds lora_A's draws: wrapping
    a compiled model drew other factors than the same model uncompiled (so a run resumed with or without
    compile re-initialized differently at its next merge). Names are seeded without it (oracle: the plain wrap)."""
    plain = relora_ds.wrap(_tiny_llama(), rank=4, seed=2)
    compiled = torch.compile(_tiny_llama())
    relora_ds.wrap(compiled, rank=4, seed=2)
    for (n1, a), (n2, b) in zip(relora_ds.relora_layers(plain), relora_ds.relora_layers(compiled)):
        assert n2 == "_orig_mod." + n1 and b.name == a.name == n1
        assert torch.equal(a.lora_A, b.lora_A)
    relora_ds.merge_and_reinit(plain)
    relora_ds.merge_and_reinit(compiled)
    for (_, a), (_, b) in zip(relora_ds.relora_layers(plain), relora_ds.relora_layers(compiled)):
        assert torch.equal(a.lora_A, b.lora_A)


def test_mixture_of_experts_weights_left_full_rank_are_named():
    """transformers 5 keeps a Mixtral layer's experts as fused 3-D parameters, not nn.Linear: wrap() with the
    default targets converted only attention and said nothing while most weights stayed full-rank (a library
    user's review). They are named now, with their count; a dense LLaMA gets no such warning."""
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"3 trainable weights no ReLoRA layer takes stay full-rank "
                                         r"\(18,560 parameters\): .*experts.gate_up_proj \(4, 96, 32\)"):
        relora_ds.wrap(transformers.MixtralForCausalLM(cfg), rank=4)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relora_ds.wrap(_tiny_llama(), rank=4)


def test_a_merge_drops_the_old_factors_gradients():
    """Merging between backward and step handed the old factors' gradients to the new ones (a library user's
    review: |B| 0.0064 after the next step, silently). The merge now drops them: B stays 0 through that step,
    while a merge after step with the gradients still there (zero_grad comes first in the next iteration,
    the canonical loop) changes nothing and says nothing."""
    model = relora_ds.wrap(_tiny_llama(), rank=4)
    opt = torch.optim.AdamW(relora_ds.lora_parameters(model), lr=1e-2)
    x = torch.randint(0, 128, (2, 9))
    model(x, labels=x).loss.backward()
    relora_ds.merge_and_reinit(model)
    assert all(p.grad is None for p in relora_ds.lora_parameters(model))
    opt.step()
    assert all(layer.lora_B.abs().sum() == 0 for _, layer in relora_ds.relora_layers(model))
    import warnings
    opt.zero_grad()
    model(x, labels=x).loss.backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relora_ds.merge_and_reinit(model)


def test_fsdp2_sharded_meta_model_materializes_fresh_factors():
    """The same load under FSDP2 (fully_shard before to_empty): the factors are DTensors, and the re-init
    first failed on them (mixed torch.Tensor and DTensor, a review found it); 2 ranks, each its shard of the
    fresh wrap's A, B = 0 (oracle: the wrap of the same model on real weights)."""
    from launch_utils import ROOT, run_ranks
    proc = run_ranks(ROOT / "tests/dist/fsdp2_meta_worker.py", timeout=300)
    assert proc.stdout.count("fsdp2 meta ok") == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
