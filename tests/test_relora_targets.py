"""Which layers relora_ds.wrap converts (relora_ds/targets.py) on the models a user brings: PEFT's target forms
(names or suffixes, a regular expression, 'all-linear'), transformers' Conv1D (GPT-2) against a Conv1D oracle,
loads of the base model's checkpoint into a model wrapped on meta, and what is refused or named (nn.MultiheadAttention,
tied weights, non-linear weights, a PEFT model). The rest of the Python API: test_relora_api.py."""
import copy

import pytest
import torch
import transformers
from torch import nn

import relora_ds
from test_relora_api import _tiny_llama


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


def test_a_wrapped_gpt2_state_dict_loads_back_untransposed():
    """A wrapped model's own state dict (a checkpoint of a run, with lora_A) holds each base in the layer's
    (out, in) layout and loads as it is; only the plain model's Conv1D (in, out) weight is transposed on load.
    GPT-2's attn.c_proj (the layers wrapped here) is square, so a transposed base would load without a shape
    error: oracle, the saved model's logits and tensors."""
    model = relora_ds.wrap(_tiny_gpt2(), rank=4, target_modules=r".*\.attn\.c_proj")
    with torch.no_grad():
        for _, layer in relora_ds.relora_layers(model):
            layer.lora_B.normal_(std=0.1)
    relora_ds.merge_and_reinit(model)  # a base that is no longer the plain checkpoint's
    with torch.no_grad():
        for _, layer in relora_ds.relora_layers(model):
            layer.lora_B.normal_(std=0.1)
    state = copy.deepcopy(model.state_dict())
    fresh = relora_ds.wrap(_tiny_gpt2(), rank=4, target_modules=r".*\.attn\.c_proj")
    fresh.load_state_dict(state)
    assert all(torch.equal(t, fresh.state_dict()[k]) for k, t in state.items())
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model(x).logits)


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
    with pytest.raises(ValueError, match=r"matched no linear layer.*list entries are names or dotted suffixes, a "
                                         r"regular expression is passed as one string"):
        relora_ds.wrap(_tiny_llama(), rank=4, target_modules=[r".*\.(q|v)_proj"])  # a regex in a list: named
    with pytest.raises(ValueError, match=r"target_modules must be a non-empty list .*got \[''\]"):
        relora_ds.wrap(_tiny_llama(), rank=4, target_modules=[""])
    with pytest.raises(ValueError, match=r"matched no linear layer.*target_modules='all-linear' selects every"):
        relora_ds.wrap(_tiny_gpt2(), rank=4)  # the LLaMA-style defaults name none of GPT-2's layers


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


def test_a_name_target_matches_whole_name_parts_and_all_linear_spares_only_the_models_own_head():
    """Mutations a trial ran that no test saw: a target matches a whole dotted part, so 'up_proj' is not Phi-3's
    gate_up_proj (PEFT's suffix rule); and a model that names its output layer (get_output_embeddings) has an
    inner linear named like a head ('classifier') wrapped by 'all-linear' (the names stand in for the output
    layer only in a model that names none)."""
    cfg = transformers.Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)
    with pytest.raises(ValueError, match=r"target_modules \['up_proj'\] matched no linear layer .* the other "
                                         r"entries did; linear layer names in this model end in: .*'gate_up_proj'"):
        relora_ds.wrap(transformers.Phi3ForCausalLM(cfg), rank=4, target_modules=["up_proj", "o_proj"])

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.ModuleDict({"classifier": nn.Linear(8, 8), "mix": nn.Linear(8, 8)})
            self.head = nn.Linear(8, 3)

        def get_output_embeddings(self):
            return self.head

    model = relora_ds.wrap(Tagger(), rank=2, target_modules="all-linear")
    assert sorted(n for n, _ in relora_ds.relora_layers(model)) == ["block.classifier", "block.mix"]
    assert type(model.head) is nn.Linear


def test_shared_biases_and_shared_layers_are_refused_or_named():
    """Found by a review: a bias shared by two linear layers was untied without a word (only a shared weight was
    refused), and 'all-linear' skipped a linear layer shared by two blocks (a tied weight) without naming it,
    though it stays full-rank and trainable. An explicit name is refused for either; 'all-linear' skips them
    and the warning names them."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.v, self.ff = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.v.bias = self.q.bias
            self.blocks = nn.ModuleList(nn.Module() for _ in range(2))
            self.blocks[0].fc = self.blocks[1].fc = nn.Linear(8, 8, bias=False)

    with pytest.raises(ValueError, match=r"selects 'q' \(and 1 more: \['q', 'v'\]\), which no ReLoRA layer can "
                                         r"replace: its bias is shared with \['v.bias'\]: a ReLoRA layer would untie"):
        relora_ds.wrap(Shared(), rank=2, target_modules=["q", "v"])
    with pytest.raises(ValueError, match=r"selects 'blocks.0.fc'.*its weight is tied to \['blocks.1.fc.weight'\]"):
        relora_ds.wrap(Shared(), rank=2, target_modules=["fc"])
    with pytest.warns(UserWarning, match=r"3 trainable weights no ReLoRA layer takes stay full-rank \(192 parameters"
                                         r"\): \['q.weight \(8, 8\)', 'v.weight \(8, 8\)', 'blocks.0.fc.weight "):
        model = relora_ds.wrap(Shared(), rank=2, target_modules="all-linear")
    assert [n for n, _ in relora_ds.relora_layers(model)] == ["ff"]
    assert model.q.bias is model.v.bias


def test_a_model_in_ddp_or_fsdp_is_refused():
    """Found by a review: wrap(DDP(model)) added LoRA factors DDP's reducer never syncs, so each rank trained its
    own (2 gloo ranks: their lora_B gradients differed). Refused, inside a container too, naming the order."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(_tiny_llama())
        for model, where in ((ddp, r"\(it\)"), (nn.Sequential(ddp), r"\(its submodule '0'\)")):
            with pytest.raises(ValueError, match=rf"wrap: the model is in torch's DistributedDataParallel {where}, "
                                                 r"which syncs only .* Call relora_ds.wrap\(model, ...\) first, then "
                                                 r"DistributedDataParallel\(model\)"):
                relora_ds.wrap(model, rank=4)
        assert not any(True for _ in relora_ds.relora_layers(ddp))
        # FSDP2 too (a review: after a forward wrap passed, and the factors were plain tensors each rank trained
        # alone; sharded, an int8 check named the DTensor weights "already quantized by another library")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        sharded = _tiny_llama()
        fully_shard(sharded, mesh=init_device_mesh("cpu", (1,)))
        for model in (sharded, nn.Sequential(sharded)):
            with pytest.raises(ValueError, match=r"wrap: the model is in torch's FSDP2 \(fully_shard\) \((it|its "
                                                 r"submodule '0')\), which syncs only .* first, then fully_shard"):
                relora_ds.wrap(model, rank=4)
    finally:
        dist.destroy_process_group()


def test_a_regex_matches_whole_names_and_a_root_multihead_attention_is_refused():
    """A mutation audit's survivors: a string target is a regular expression the full module name must match
    (README, PEFT's re.fullmatch: '.*q_proj' must not take q_proj_gate); and a model that is itself an
    nn.MultiheadAttention (module name '') has the out_proj no ReLoRA layer can replace, as a nested one."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.q_proj_gate = nn.Linear(8, 8), nn.Linear(8, 8)

    model = relora_ds.wrap(Net(), rank=2, target_modules=r".*q_proj")
    assert isinstance(model.q_proj, relora_ds.ReLoRALinear) and type(model.q_proj_gate) is nn.Linear
    with pytest.raises(ValueError, match="nn.MultiheadAttention reads its out_proj"):
        relora_ds.wrap(nn.MultiheadAttention(8, 2), rank=2, target_modules=["out_proj"])


def test_linear_subclasses_that_compute_something_else_are_not_replaced():
    """Found by a review: an nn.Linear subclass whose forward is no ``x·Wᵀ + b`` (Llama 4's and Phi-MoE's routers
    return a tuple after top-k, a grouped linear multiplies blocks) was replaced by a ReLoRA layer, and the model
    failed at its first forward. Its forward is probed against the plain map (the oracle: F.linear): 'all-linear'
    skips and names it, an explicit name is refused; a subclass computing the same map (Falcon's FalconLinear,
    or one with its own forward) is wrapped, also on meta when it is Falcon's."""
    class Router(nn.Linear):
        def forward(self, x):
            logits = super().forward(x)
            return logits.topk(1, dim=-1).values.sigmoid(), logits

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class SameMap(nn.Linear):
        def forward(self, x):
            return x @ self.weight.T + self.bias

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.router, self.scaled, self.same, self.ff = Router(8, 4), Scaled(8, 8), SameMap(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.ff(self.same(self.scaled(x))).sum() + self.router(x)[1].sum()

    with pytest.raises(ValueError, match=r"selects 'router', which no ReLoRA layer can replace: its class Router "
                                         r"overrides Linear.forward and returns tuple for a \(3, 8\) input"):
        relora_ds.wrap(Model(), rank=2, target_modules=["router", "ff"])
    with pytest.raises(ValueError, match=r"'scaled'.*its class Scaled overrides Linear.forward and computes something "
                                         r"other than x·Wᵀ \+ b \(relative difference 1 on a probe\)"):
        relora_ds.wrap(Model(), rank=2, target_modules=["scaled"])
    with pytest.warns(UserWarning, match=r"2 trainable weights no ReLoRA layer takes stay full-rank \(96 parameters\): "
                                         r"\['router.weight \(4, 8\)', 'scaled.weight \(8, 8\)'\]"):
        model = relora_ds.wrap(Model(), rank=2, target_modules="all-linear")
    assert [n for n, _ in relora_ds.relora_layers(model)] == ["same", "ff"]
    model(torch.randn(2, 8)).backward()  # the router still returns its tuple
    with torch.device("meta"):
        meta = Model()
    with pytest.raises(ValueError, match=r"'same'.*overrides Linear.forward, and its weight \(meta\) cannot be run"):
        relora_ds.wrap(meta, rank=2, target_modules=["same"])
    from transformers.models.falcon.modeling_falcon import FalconLinear
    with torch.device("meta"):
        falcon = nn.Sequential(FalconLinear(8, 8), FalconLinear(8, 8, bias=False))
    relora_ds.wrap(falcon, rank=2, target_modules="all-linear")
    assert len(list(relora_ds.relora_layers(falcon))) == 2


def test_all_linear_leaves_layers_narrower_than_the_rank_full_rank():
    """Found by a review: 'all-linear' on a mixture of experts (Qwen2-MoE's shared_expert_gate has one output) was
    refused at any rank above 1, with no way through 'all-linear'. It leaves such layers out (full-rank and
    trainable, named in a warning); a layer named explicitly is still refused, and a rank no layer takes is."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.router, self.ff = nn.Linear(8, 1), nn.Linear(8, 4), nn.Linear(8, 8)

    with pytest.warns(UserWarning, match=r"'all-linear' leaves 2 linear layers narrower than rank=6 full-rank and "
                                         r"trainable: \['gate', 'router'\]"):
        model = relora_ds.wrap(Model(), rank=6, target_modules="all-linear")
    assert [n for n, _ in relora_ds.relora_layers(model)] == ["ff"] and model.gate.weight.requires_grad
    assert [n for n, _ in relora_ds.relora_layers(relora_ds.wrap(Model(), rank=4, target_modules="all-linear"))] == \
        ["router", "ff"]
    with pytest.raises(ValueError, match=r"layer gate: rank=6 must be in \[1, min\(in_features=8, out_features=1\)\]"):
        relora_ds.wrap(Model(), rank=6, target_modules=["gate", "ff"])
    with pytest.raises(ValueError, match=r"'all-linear': every linear layer it selects is narrower than rank=9 .*"
                                         r"choose a rank of at most 8"):
        relora_ds.wrap(Model(), rank=9, target_modules="all-linear")
