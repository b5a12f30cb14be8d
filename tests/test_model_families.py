"""Continued pre-training of LLaMA-3.x, Qwen2, Qwen3 and Mistral checkpoints: our model loaded from a tiny
transformers-made checkpoint (random weights, fp32) against transformers' own LlamaForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM and MistralForCausalLM (the oracle), for each option (tied embeddings,
biases, explicit head_dim, q/k norms, "linear" and "llama3" RoPE scaling, sliding windows), and the export
back; then what stays refused. The trainer on such checkpoints: tests/test_model_families_trainer.py."""
import copy
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import relora_ds
from relora_ds import LlamaConfig, LlamaForCausalLM
from relora_ds.hf import config_from_hf, hf_config_dict
from relora_ds.model import RotaryEmbedding, rope_inv_freq

SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}  # LLaMA-3.1's numbers, its 8192 shrunk below the test's 48 tokens
FAMILIES = {
    # LLaMA-3.2-1B/3B: tied embeddings and llama3 RoPE at theta 500000.
    "llama3.2-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True, rope_theta=500000.0,
                                                     rope_scaling=LLAMA3)),
    # Every LLaMA option at once: q/k/v/o and MLP biases, heads 24 wide (not 64 / 4), linear RoPE (pre-4.37 "type"),
    # SiLU spelled "swish" (transformers' ACT2FN maps it to SiLU; a trial found it refused).
    "llama-bias-head_dim-linear": (transformers.LlamaConfig, dict(attention_bias=True, mlp_bias=True, head_dim=24,
                                                                  rope_scaling={"type": "linear", "factor": 4.0},
                                                                  hidden_act="swish")),
    # Qwen2/2.5 small: q/k/v biases (no o_proj bias), tied, theta 1e6, use_sliding_window false.
    "qwen2-tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True, rope_theta=1e6)),
    # Qwen2 with a 16-token window on its second layer only, shorter than the test's 48-token sequences.
    "qwen2-window": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),
    # Qwen3-0.6B/1.7B: per-head q/k RMSNorm, head_dim 128-style (here 24, not 64 / 4), tied, no biases.
    "qwen3-tied": (transformers.Qwen3Config, dict(tie_word_embeddings=True, head_dim=24, rope_theta=1e6)),
    # Qwen3 with attention biases and a 16-token window on its second layer.
    "qwen3-bias-window": (transformers.Qwen3Config, dict(attention_bias=True, use_sliding_window=True,
                                                         sliding_window=16, max_window_layers=1)),
    # Mistral-Nemo: head_dim given (32 where 64 / 4 = 16), sliding_window null.
    "mistral-nemo": (transformers.MistralConfig, dict(head_dim=32, sliding_window=None)),
    # Mistral-7B-v0.1: a window on every layer (its 4096 here 16 tokens), shorter than the sequences.
    "mistral-window": (transformers.MistralConfig, dict(sliding_window=16)),
}


def _transformers_model(family, seed=0):
    config_cls, options = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**SHAPE, **copy.deepcopy(options))  # transformers adds rope_theta into rope_scaling
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # trained-looking norms and biases: fresh ones (1 and 0) hide a misplaced one
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.uniform_(-0.5, 1.5)
    return model


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_load_wrap_and_export_equal_transformers(tmp_path, family):
    """load_hf of transformers' checkpoint gives transformers' logits; after ReLoRA's wrap with a non-zero
    LoRA delta, export_hf writes a checkpoint that transformers loads as the same class, with the options
    in its config, and the logits of our wrapped model."""
    theirs = _transformers_model(family)
    theirs.save_pretrained(tmp_path / "src")
    ours = relora_ds.load_hf(tmp_path / "src").eval()
    x = torch.randint(0, SHAPE["vocab_size"], (2, 48))
    torch.testing.assert_close(_logits(ours, x), _logits(theirs, x), atol=1e-5, rtol=0)
    tied = theirs.config.tie_word_embeddings
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied

    relora_ds.wrap(ours, rank=4)
    with torch.no_grad():
        for p in relora_ds.lora_parameters(ours):
            p.normal_(0, 0.05)
    relora_ds.export_hf(ours, tmp_path / "out")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(exported) is type(theirs)
    torch.testing.assert_close(_logits(exported, x), _logits(ours, x), atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    source = theirs.config
    assert (config["model_type"], config["tie_word_embeddings"], config["head_dim"]) == (
        source.model_type, tied, source.head_dim if hasattr(source, "head_dim") else 16)
    assert config.get("rope_scaling", {}).get("rope_type", "default") == source.rope_parameters["rope_type"]
    assert getattr(exported.config, "sliding_window", None) == getattr(source, "sliding_window", None)
    assert ("lm_head.weight" in load_file(str(tmp_path / "out" / "model.safetensors"))) == (not tied)
    # load_hf reads the export back to the weights unwrap merges in place, bit for bit.
    again = relora_ds.load_hf(tmp_path / "out").eval()
    assert torch.equal(_logits(again, x), _logits(relora_ds.unwrap(ours), x))


def test_transformers_4_configs_and_the_like_of_a_source_model(tmp_path):
    """A config as transformers 4.x wrote it (rope_scaling beside a top-level rope_theta, Qwen2 without
    layer_types) maps as the 5.x one does; an export `like` its source keeps the source's other keys
    (Qwen2's max_window_layers) and writes Mistral's null sliding_window explicitly (MistralConfig's default is
    4096)."""
    v4 = {**SHAPE, "model_type": "llama", "rope_theta": 500000.0, "rope_scaling": dict(LLAMA3, type="llama3"),
          "tie_word_embeddings": True}
    cfg = config_from_hf(v4)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.tie_word_embeddings) == (500000.0, LLAMA3, True)
    for family in ("qwen2-tied", "mistral-nemo"):
        _transformers_model(family).save_pretrained(tmp_path / family)
        model = relora_ds.load_hf(tmp_path / family)
        relora_ds.export_hf(model, tmp_path / f"{family}-out", like=tmp_path / family)
        src, out = (json.loads((tmp_path / d / "config.json").read_text()) for d in (family, f"{family}-out"))
        assert out["model_type"] == src["model_type"]
        if family.startswith("qwen2"):
            assert out["max_window_layers"] == src["max_window_layers"] and out["use_sliding_window"] is False
        else:
            assert "sliding_window" in out and out["sliding_window"] is None
            assert transformers.AutoConfig.from_pretrained(tmp_path / f"{family}-out").sliding_window is None


@pytest.mark.parametrize("scaling", [LLAMA3 | {"original_max_position_embeddings": 8192},
                                     {"rope_type": "linear", "factor": 4.0}], ids=["llama3", "linear"])
def test_rope_scaling_frequencies_equal_transformers_past_the_original_length(scaling):
    """LLaMA-3.1's real numbers (head_dim 128, theta 500000, 8192 original positions): our inverse frequencies
    are transformers' bit for bit, and cos/sin agree at positions up to 8x the original length."""
    config = transformers.LlamaConfig(hidden_size=1024, num_attention_heads=8, max_position_embeddings=65536,
                                      rope_theta=500000.0, rope_scaling=dict(scaling))
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    mapped = config_from_hf(config.to_dict())
    assert (mapped.head_dim, mapped.rope_theta, mapped.rope_scaling) == (128, 500000.0, scaling)
    assert torch.equal(rope_inv_freq(128, 500000.0, mapped.rope_scaling), rotary.inv_freq)
    assert not torch.equal(rope_inv_freq(128, 500000.0), rotary.inv_freq)  # the scaling changed something
    ours = RotaryEmbedding(mapped.head_dim, mapped.rope_theta, mapped.rope_scaling)
    cos, sin = ours(65536, torch.device("cpu"), torch.float32)
    positions = torch.tensor([[0, 1, 8191, 8192, 8193, 20000, 65535]])
    want_cos, want_sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(cos[positions[0]], want_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[positions[0]], want_sin[0], atol=1e-6, rtol=0)


def test_llama3_rope_scaling_at_wavelengths_exactly_on_its_bounds_equals_transformers():
    """llama3 RoPE keeps a wavelength equal to original / low_freq_factor in the blended band (slowed by factor
    only through the blend: transformers' `wavelen > low_freq_wavelen` is strict), and likewise one equal to
    original / high_freq_factor. Factors chosen so that both bounds fall exactly on one of the 64 wavelengths
    (in fp32, as they are compared); oracle: transformers' inverse frequencies, bit for bit. A mutation trial's
    `>=` at the low bound passed every other test (the real factors never hit a wavelength)."""
    import math

    wavelen = 2 * math.pi / rope_inv_freq(128, 500000.0)
    old = 8192
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": old / float(wavelen[50]),
               "high_freq_factor": old / float(wavelen[30]), "original_max_position_embeddings": old}
    for k, factor in ((50, "low_freq_factor"), (30, "high_freq_factor")):
        assert torch.tensor(old / scaling[factor], dtype=torch.float32) == wavelen[k]  # exactly on the bound
    config = transformers.LlamaConfig(hidden_size=1024, num_attention_heads=8, max_position_embeddings=65536,
                                      rope_theta=500000.0, rope_scaling=dict(scaling))
    want = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config).inv_freq
    assert torch.equal(rope_inv_freq(128, 500000.0, config_from_hf(config.to_dict()).rope_scaling), want)


def test_a_tied_model_trains_one_weight_and_relora_keeps_it_full_rank():
    """Tied: one Parameter whose gradient is the sum of what an untied twin with the same values gives its
    embedding and its lm_head; wrap keeps it (and the q/k/v biases) trainable full-rank, in the optimizer
    once, tied after a step. The untied presets' state dict keys are as before."""
    torch.manual_seed(0)
    tied = LlamaForCausalLM(LlamaConfig(**SHAPE, model_type="qwen2", tie_word_embeddings=True))
    untied = LlamaForCausalLM(LlamaConfig(**SHAPE, model_type="qwen2"))
    untied.load_state_dict(tied.state_dict())
    x = torch.randint(0, 256, (2, 12))
    tied(x, labels=x).loss.backward()
    untied(x, labels=x).loss.backward()
    torch.testing.assert_close(tied.model.embed_tokens.weight.grad,
                               untied.model.embed_tokens.weight.grad + untied.lm_head.weight.grad)

    relora_ds.wrap(tied, rank=4)
    embed = tied.model.embed_tokens.weight
    assert tied.lm_head.weight is embed and embed.requires_grad
    trainable = {n for n, p in tied.named_parameters() if p.requires_grad}
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias"} <= trainable
    assert tied.model.layers[0].self_attn.o_proj.bias is None
    opt = torch.optim.SGD([p for p in tied.parameters() if p.requires_grad], lr=1.0)
    assert sum(p is embed for g in opt.param_groups for p in g["params"]) == 1
    before = embed.detach().clone()
    opt.step()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight and not torch.equal(before, embed)
    keys = set(LlamaForCausalLM(LlamaConfig.preset("debug")).state_dict())
    assert "lm_head.weight" in keys and not any("bias" in k for k in keys)


@pytest.mark.parametrize("family", ["llama-bias-head_dim-linear", "qwen2-tied", "qwen3-bias-window"])
def test_a_fresh_model_initializes_as_transformers_does(family):
    """A model built from scratch: biases zero, norms one, linear and embedding weights N(0, initializer_range),
    as transformers' _init_weights makes them (the oracle: its model from the same config). torch's own
    nn.Linear init leaves biases uniform in +-1/sqrt(in): a mutation trial's skipped bias init passed every
    other test."""
    config_cls, options = FAMILIES[family]
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(config_cls(**SHAPE, **copy.deepcopy(options)))
    ours = LlamaForCausalLM(config_from_hf(theirs.config.to_dict()))
    params = dict(ours.named_parameters())
    assert params.keys() == dict(theirs.named_parameters()).keys()
    for name, p in theirs.named_parameters():
        if name.endswith(".bias") or "norm" in name:
            assert torch.equal(params[name], p), name  # zeros, ones
        else:
            assert abs(params[name].std().item() - p.std().item()) < 0.1 * p.std().item(), name


def test_load_state_dict_of_a_tied_model_with_or_without_lm_head():
    """DeepSpeed's fp32 state dicts name the shared weight once (model.embed_tokens.weight); transformers
    ignores a stored lm_head.weight of a tied model, and so do we."""
    torch.manual_seed(1)
    config = LlamaConfig.preset("debug", tie_word_embeddings=True)
    src = LlamaForCausalLM(config)
    state = {k: v.clone() for k, v in src.state_dict().items() if k != "lm_head.weight"}
    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, src.model.embed_tokens.weight)
    model.load_state_dict({**state, "lm_head.weight": torch.zeros_like(state["model.embed_tokens.weight"])})
    assert torch.equal(model.lm_head.weight, src.model.embed_tokens.weight)


@pytest.mark.parametrize("family", ["mistral-window", "qwen2-window", "qwen3-bias-window"])
def test_sliding_window_past_its_length_equals_transformers_forward_and_backward(tmp_path, family):
    """Sequences three times the window: logits and the embedding's gradient equal transformers' (whose
    mask lets query i see keys i-15..i), where full causal attention would differ; Qwen2's window only on the
    layers its config names (a window on every layer differs too). The trainer's start-up takes a --seq-len
    past the window."""
    theirs = _transformers_model(family)
    theirs.save_pretrained(tmp_path)
    ours = relora_ds.load_hf(tmp_path)
    assert ours.config.sliding_window == 16
    assert ours.config.layer_types == (None if family == "mistral-window" else ["full_attention", "sliding_attention"])
    assert ours.config.qk_norm == family.startswith("qwen3")
    x = torch.randint(0, SHAPE["vocab_size"], (2, 48))
    losses = []
    for model in (ours, theirs):
        model.zero_grad()
        loss = model(x, labels=x).loss
        loss.backward()
        losses.append((loss.item(), model.model.embed_tokens.weight.grad.clone()))
    assert losses[0][0] == pytest.approx(losses[1][0], abs=1e-5)
    torch.testing.assert_close(losses[0][1], losses[1][1], atol=1e-6, rtol=1e-4)
    windowed = _logits(ours, x)
    agree = (windowed - _logits(theirs, x)).abs().max().item()  # ours vs transformers: rounding only
    assert agree <= 1e-5, agree  # the logits equal transformers' (the first 16 positions and past the window)
    controls = [{"sliding_window": None, "layer_types": None}]  # full causal attention
    if family != "mistral-window":
        controls.append({"layer_types": None})  # the window on every layer
    for other in controls:
        changed = LlamaForCausalLM(LlamaConfig(**{**ours.config.to_dict(), **other})).eval()
        changed.load_state_dict(ours.state_dict())
        # Past the window the logits move 100x more than ours and transformers' differ (Qwen3's normed q/k
        # make the random model's attention flat: there the window moves them least, 1.4e-4).
        moved = (_logits(changed, x)[:, 16:] - windowed[:, 16:]).abs().max().item()
        assert moved > 100 * max(agree, 1e-7), (other, moved, agree)
        torch.testing.assert_close(_logits(changed, x)[:, :16], windowed[:, :16], atol=1e-5, rtol=0)
    from relora_ds.startup import check_model_and_data
    from relora_ds.train_config import TrainConfig

    cfg = TrainConfig(hf_model=str(tmp_path), mode="lora", rank=4, total_steps=10, seq_len=100)
    assert check_model_and_data(cfg, None, 256)[0].sliding_window == 16


def test_qwen2_window_layers_map_both_ways():
    """Qwen2Config's rule (layers from max_window_layers on slide, when use_sliding_window) read from either
    form of the config, and written back with both: layer_types (transformers 5) and max_window_layers."""
    qwen = {**hf_config_dict(LlamaConfig(**SHAPE, model_type="qwen2"), torch.float32), "use_sliding_window": True,
            "sliding_window": 32, "max_window_layers": 2}  # no layer from 2 on: no window anywhere
    assert config_from_hf(qwen).sliding_window is None
    one = config_from_hf({**qwen, "max_window_layers": 1})
    assert (one.sliding_window, one.layer_types) == (32, ["full_attention", "sliding_attention"])
    every = config_from_hf({**qwen, "max_window_layers": 0})
    assert (every.sliding_window, every.layer_types) == (32, None)
    # a null window: Qwen2Config makes every layer full attention (was refused, asking for the window's length)
    assert config_from_hf({**qwen, "max_window_layers": 1, "sliding_window": None}).sliding_window is None
    assert transformers.Qwen2Config(**{**{k: v for k, v in qwen.items() if k != "architectures"},
                                       "max_window_layers": 1, "sliding_window": None}).layer_types == \
        ["full_attention"] * 2
    explicit = config_from_hf({**qwen, "layer_types": ["sliding_attention", "full_attention"]})
    assert explicit.layer_types == ["sliding_attention", "full_attention"]
    for config, max_window_layers in ((one, 1), (every, 0), (explicit, 2)):
        out = hf_config_dict(config, torch.float32)
        assert out["layer_types"] == (config.layer_types or ["sliding_attention"] * 2)
        assert out["max_window_layers"] == max_window_layers and out["use_sliding_window"] is True
        assert config_from_hf(out).layer_types == config.layer_types
        theirs = transformers.Qwen2Config(**{k: v for k, v in out.items() if k != "architectures"})
        assert theirs.layer_types == out["layer_types"] and theirs.sliding_window == 32


def test_a_qwen2_config_without_max_window_layers_or_layer_types_slides_where_transformers_does():
    """A Qwen2 config.json with use_sliding_window but neither layer_types nor max_window_layers: Qwen2Config's
    default max_window_layers (28) decides, the layers from 28 on slide; without use_sliding_window none does (a
    mutation trial's other default, and one ignoring use_sliding_window, passed every other test). Oracle:
    transformers' Qwen2Config of the same dict."""
    hf = {**hf_config_dict(LlamaConfig(**{**SHAPE, "num_hidden_layers": 30}, model_type="qwen2"), torch.float32),
          "use_sliding_window": True, "sliding_window": 32}
    for key in ("layer_types", "max_window_layers"):
        hf.pop(key, None)
    theirs = transformers.Qwen2Config(**{k: v for k, v in hf.items() if k != "architectures"})
    assert theirs.layer_types == ["full_attention"] * 28 + ["sliding_attention"] * 2
    ours = config_from_hf(hf)
    assert (ours.sliding_window, ours.layer_types) == (32, theirs.layer_types)
    # use_sliding_window false (Qwen2.5's configs, which still name a sliding_window): full attention everywhere
    off = {**hf, "use_sliding_window": False}
    assert transformers.Qwen2Config(**{k: v for k, v in off.items() if k != "architectures"}).layer_types == \
        ["full_attention"] * 30
    assert config_from_hf(off).sliding_window is None


def test_a_window_no_layer_uses_exports_as_none_and_qwen3_head_dim_defaults_as_transformers(tmp_path):
    """A Qwen2 config with a sliding_window but every layer full attention (accepted, trains without a window)
    exported: its export crashed at the end of the run looking for a sliding layer (a review); now
    use_sliding_window false, and transformers' model of the export gives our logits. A Qwen3 config.json
    without head_dim: Qwen3Config's 128, not hidden / heads (load_hf failed on a size mismatch)."""
    cfg = LlamaConfig(**SHAPE, model_type="qwen2", sliding_window=8, layer_types=["full_attention"] * 2)
    model = LlamaForCausalLM(cfg).eval()
    assert all(layer.self_attn.sliding_window is None for layer in model.model.layers)
    relora_ds.export_hf(model, tmp_path / "qwen2", token_ids={"bos_token_id": 1, "eos_token_id": 2})
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2").eval()
    assert theirs.config.layer_types == ["full_attention"] * 2
    x = torch.randint(0, SHAPE["vocab_size"], (2, 24))
    torch.testing.assert_close(_logits(theirs, x), _logits(model, x), rtol=1e-5, atol=1e-5)

    torch.manual_seed(0)
    qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SHAPE)).eval()
    assert qwen3.config.head_dim == 128
    qwen3.save_pretrained(tmp_path / "qwen3")
    path = tmp_path / "qwen3" / "config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "head_dim"}))
    assert transformers.AutoConfig.from_pretrained(tmp_path / "qwen3").head_dim == 128
    ours = relora_ds.load_hf(str(tmp_path / "qwen3")).eval()
    torch.testing.assert_close(_logits(ours, x), _logits(qwen3, x), rtol=1e-5, atol=1e-5)


def test_qwen2_ignores_llamas_bias_keys_as_transformers_does():
    """Qwen2's biases are fixed (q/k/v, no o_proj or MLP bias): a config.json carrying LLaMA's attention_bias and
    mlp_bias (a hand-edited or converted one) loads with the biases transformers' Qwen2ForCausalLM has, not
    refused (a mutation trial reading the keys for Qwen2 as for LLaMA passed every other test)."""
    config = transformers.Qwen2Config(**SHAPE, attention_bias=True, mlp_bias=True)
    theirs = transformers.AutoModelForCausalLM.from_config(config)
    ours = LlamaForCausalLM(config_from_hf(config.to_dict()))
    assert dict(ours.named_parameters()).keys() == dict(theirs.named_parameters()).keys()


@pytest.mark.parametrize("overrides, match", [
    (dict(model_type="gpt2"), r"model_type='gpt2' is not supported; valid: llama, qwen2, qwen3, mistral"),
    (dict(model_type="qwen2", mlp_bias=True), r"model_type='qwen2' cannot have \{'mlp_bias': True\}"),
    (dict(model_type="qwen2", qkv_bias=False), r"model_type='qwen2' cannot have \{'qkv_bias': False\}"),
    (dict(model_type="mistral", attention_bias=True), r"model_type='mistral' cannot have \{'attention_bias': True\}"),
    (dict(qkv_bias=True), r"model_type='llama' cannot have \{'qkv_bias': True\}"),
    (dict(sliding_window=64), r"sliding_window is a Mistral/Qwen2/Qwen3 option"),
    (dict(qk_norm=True), r"model_type='llama' cannot have \{'qk_norm': True\}"),
    (dict(model_type="qwen3", qk_norm=False), r"model_type='qwen3' cannot have \{'qk_norm': False\}"),
    (dict(model_type="qwen2", sliding_window=8, layer_types=["sliding_attention"]),
     r"layer_types must give one of \('sliding_attention', 'full_attention'\) for each of the 2 layers"),
    (dict(model_type="qwen2", layer_types=["sliding_attention", "full_attention"]),
     r"layer_types names sliding_attention layers but sliding_window is None"),
    (dict(model_type="mistral", sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
     r"layer_types \(a window on some layers only\) is a Qwen2/Qwen3 option; model_type='mistral'"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0]}),
     r"rope scaling 'longrope' is not supported; valid rope types: 'default' \(plain RoPE\), 'linear', 'llama3'"),
    (dict(rope_scaling={"rope_type": "linear"}), r"rope_scaling of type 'linear' lacks \['factor'\]"),
    (dict(hidden_size=60, num_attention_heads=8), r"hidden_size=60 is not divisible by num_attention_heads=8; set "
                                                  r"head_dim"),
])
def test_configs_the_export_could_not_express_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**{**SHAPE, **overrides})


@pytest.mark.parametrize("overrides, match", [
    (dict(hidden_size=64.5), r"LlamaConfig.hidden_size must be a positive integer, got 64.5"),  # was: "not divisible"
    (dict(num_hidden_layers=2.7), r"num_hidden_layers must be a positive integer, got 2.7"),  # was: a TypeError later
    (dict(hidden_size="64"), r"hidden_size must be a positive integer, got '64'"),
    (dict(num_hidden_layers=True), r"num_hidden_layers must be a positive integer, got True"),
    (dict(vocab_size=0), r"vocab_size must be a positive integer, got 0"),
    (dict(head_dim=16.0), r"head_dim must be a positive even integer \(RoPE rotates pairs\), got 16.0"),
    (dict(rms_norm_eps=-1e-6), r"rms_norm_eps must be a positive finite number, got -1e-06"),  # was: NaN losses
    (dict(rms_norm_eps=0), r"rms_norm_eps must be a positive finite number, got 0"),
    (dict(rope_theta=0.0), r"rope_theta must be a positive finite number, got 0.0"),
    (dict(rope_theta=float("inf")), r"rope_theta must be a positive finite number, got inf"),
    (dict(initializer_range=0.0), r"initializer_range must be a positive finite number, got 0.0"),  # was: all zeros
    (dict(initializer_range=-0.02), r"initializer_range must be a positive finite number, got -0.02"),
    (dict(initializer_range=float("nan")), r"initializer_range must be a positive finite number, got nan"),
    (dict(model_type="mistral", sliding_window=8.5), r"sliding_window must be a positive number of tokens or None"),
])
def test_sizes_must_be_whole_numbers_and_eps_and_theta_positive(overrides, match):
    """What no model can be built from is refused by the config, naming the field (a float size went on to a
    misleading divisibility error or a TypeError in the build, a negative eps to NaN losses)."""
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**{**SHAPE, **overrides})
    import numpy as np
    config = LlamaConfig(**{**SHAPE, "num_hidden_layers": np.int64(2), "rope_theta": 500_000})
    assert type(config.num_hidden_layers) is int and type(config.rope_theta) is float  # JSON can write them
    json.dumps(config.to_dict())


# The trainer (launch/train.py) on --hf-model: trainer_utils' recipe (a 2-step full-rank warm start, ReLoRA
# resets at steps 6 and 10) from tiny transformers-made tied checkpoints, on the built-in corpus's 512-token
# vocabulary (the checkpoints hold no tokenizer, which the trainer only warns about).
def _hf_dir(tmp_path, family):
    config_cls, options = FAMILIES[family]
    torch.manual_seed(0)
    config = config_cls(**{**SHAPE, "vocab_size": 512}, **copy.deepcopy(options))
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / family)
    return str(tmp_path / family)


def test_flash_attn_gets_the_window_as_its_documented_window_size(monkeypatch):
    """flash-attn (GPU only) takes the window as window_size=(left, right): query i sees keys i-left .. i+right
    (its docstring). A stand-in implementing exactly that documented rule, in flash's (B, T, H, hd) layout with
    GQA, gives the SDPA path's output: the window reaches flash as 15 keys back for a 16-token window."""
    import sys
    import types

    import relora_ds.model as model_module

    def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
        T, rep = q.shape[1], q.shape[2] // k.shape[2]
        q, k, v = (t.transpose(1, 2) for t in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        left, right = (T if w < 0 else w for w in window_size)
        allowed = (j >= i - left) & (j <= i + right) & ((j <= i) if causal else True)
        scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~allowed, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2)

    config = LlamaConfig(**SHAPE, model_type="mistral", sliding_window=16)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    x = torch.randint(0, SHAPE["vocab_size"], (2, 48))
    sdpa = _logits(model, x)
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    monkeypatch.setattr(model_module.Attention, "_use_flash", lambda self, q: True)
    torch.testing.assert_close(_logits(model, x), sdpa, atol=1e-5, rtol=0)
    full = LlamaForCausalLM(LlamaConfig(**SHAPE, model_type="mistral")).eval()
    full.load_state_dict(model.state_dict())
    assert not torch.allclose(_logits(full, x), sdpa, atol=1e-3)  # the stand-in honours the window


def test_a_flash_attn_that_does_not_import_falls_back_to_sdpa_under_auto(monkeypatch):
    """A flash-attn wheel built for another torch is found (find_spec) but fails to import. Under
    attn_implementation='auto' a CUDA bf16 forward then runs on SDPA with one warning naming the import error,
    instead of stopping the run at its first step; 'flash' refuses with the same reason. (No GPU here: a
    stand-in query that says it is a CUDA bf16 tensor; the import fails as a None entry in sys.modules makes it.)"""
    import importlib.util
    import sys
    import types
    import warnings

    import relora_ds.model as model_module

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    q = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device="cuda:0")
    attention = {impl: LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation=impl)).model.layers[0]
                 .self_attn for impl in ("auto", "flash")}
    model_module._flash_attn_problem.cache_clear()
    model_module._warn_flash_fallback.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"SDPA: flash-attn is installed but does not import "
                                                r"\(ModuleNotFoundError: import of flash_attn halted"):
            assert attention["auto"]._use_flash(q) is False
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once: not at every layer and step
            assert attention["auto"]._use_flash(q) is False
        with pytest.raises(ValueError, match="attn_implementation='flash' needs flash-attn .*does not import"):
            attention["flash"]._use_flash(q)
    finally:  # the next test sees this machine's real flash-attn (or its absence)
        model_module._flash_attn_problem.cache_clear()
        model_module._warn_flash_fallback.cache_clear()


def test_sdpa_never_runs_flash_attn_and_flash_refuses_what_flash_attn_cannot_run(monkeypatch):
    """Where flash-attn imports: 'auto' runs it for CUDA fp16/bf16 queries only, 'sdpa' never (a user's choice
    to compare with or avoid flash-attn), and 'flash' refuses a CPU or fp32 forward, naming the device and
    dtype, rather than running SDPA without a word. (No GPU here: stand-in queries that say their device and
    dtype; flash-attn an importable stand-in module.) Mutations a trial ran that no test saw: 'sdpa' running
    flash-attn, 'flash' falling back to SDPA off the GPU."""
    import importlib.util
    import sys
    import types

    import relora_ds.model as model_module

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    attention = {impl: LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation=impl)).model.layers[0]
                 .self_attn for impl in ("auto", "sdpa", "flash")}
    gpu_bf16 = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device="cuda:0")
    gpu_fp32 = types.SimpleNamespace(is_cuda=True, dtype=torch.float32, device="cuda:0")
    cpu_bf16 = types.SimpleNamespace(is_cuda=False, dtype=torch.bfloat16, device="cpu")
    model_module._flash_attn_problem.cache_clear()
    try:
        assert attention["auto"]._use_flash(gpu_bf16) is True and attention["flash"]._use_flash(gpu_bf16) is True
        assert attention["sdpa"]._use_flash(gpu_bf16) is False
        for q in (gpu_fp32, cpu_bf16):
            assert attention["auto"]._use_flash(q) is False and attention["sdpa"]._use_flash(q) is False
            with pytest.raises(ValueError, match=rf"attn_implementation='flash' needs flash-attn and CUDA fp16/bf16 "
                                                 rf"inputs \(flash-attn imports; device={q.device}, dtype={q.dtype}\)"):
                attention["flash"]._use_flash(q)
    finally:  # the next test sees this machine's real flash-attn (or its absence)
        model_module._flash_attn_problem.cache_clear()


def test_rope_scaling_beside_rope_parameters_is_read_as_transformers_reads_it(tmp_path):
    """A transformers-5 config (rope_parameters: default RoPE at theta 1e6) to which someone added a 4.x-style
    rope_scaling (linear, factor 4) to extend the context: transformers builds its model from rope_scaling, with
    the theta from it or the top-level one (10000 here), not rope_parameters'; ours took rope_parameters and
    trained, evaluated and exported another RoPE without a word (a user trial: logits up to 10 apart). Oracle:
    transformers' from_pretrained of the same directory. The two disagreeing is warned of."""
    _transformers_model("qwen2-tied").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 1e6 and "rope_scaling" not in config
    config["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert theirs.config.rope_parameters["rope_type"] == "linear"
    with pytest.warns(UserWarning, match=r"holds both rope_scaling .* and rope_parameters .*: rope_scaling is used, "
                                         r"as transformers does"):
        ours = relora_ds.load_hf(tmp_path).eval()
    x = torch.randint(0, SHAPE["vocab_size"], (2, 48))
    torch.testing.assert_close(_logits(ours, x), _logits(theirs, x), atol=1e-5, rtol=0)
    assert (ours.config.rope_theta, ours.config.rope_scaling) == (theirs.config.rope_parameters["rope_theta"],
                                                                   {"rope_type": "linear", "factor": 4.0})
    # An export like this source writes the RoPE it computes, without the source's contradicting rope_parameters
    # (a mutation trial keeping them passed every other test): it loads back without the warning, as transformers
    # reads it.
    relora_ds.export_hf(ours, tmp_path / "out", like=tmp_path)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = relora_ds.load_hf(tmp_path / "out").eval()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(again, x), _logits(exported, x), atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(again, x), _logits(theirs, x), atol=1e-5, rtol=0)


def test_an_export_like_its_source_keeps_the_sources_dtype(tmp_path):
    """export_hf(model, out, like=src) without a dtype writes the dtype src was stored in, as the trainer's export
    does (a trial found the Python API writing float32 for a bf16 source: twice its size); an explicit dtype
    still wins. Oracle: the safetensors' dtypes and what transformers reads from the config."""
    theirs = _transformers_model("qwen2-tied").to(torch.bfloat16)
    theirs.save_pretrained(tmp_path / "src")
    model = relora_ds.load_hf(tmp_path / "src")
    relora_ds.export_hf(model, tmp_path / "like", like=tmp_path / "src")
    relora_ds.export_hf(model, tmp_path / "fp32", torch.float32, like=tmp_path / "src")
    for out, want in (("like", torch.bfloat16), ("fp32", torch.float32)):
        assert {t.dtype for t in load_file(str(tmp_path / out / "model.safetensors")).values()} == {want}
        assert transformers.AutoConfig.from_pretrained(tmp_path / out).dtype == want
