"""Our LLaMA equals Hugging Face's LlamaForCausalLM (the oracle) with the same weights, both directions."""
import json
import os
import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import relora_ds
from relora_ds import LlamaConfig, LlamaForCausalLM
from relora_ds.hf import config_from_hf, hf_config_dict


def _hf_config(cfg: LlamaConfig) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False)


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_export_hf_loads_in_transformers_with_equal_logits(tmp_path, kv_heads):
    torch.manual_seed(0)
    cfg = LlamaConfig.preset("debug", num_key_value_heads=kv_heads)
    model = LlamaForCausalLM(cfg).eval()
    umask = os.umask(0o022)  # safetensors alone writes 0600: the export is as readable as its config.json
    try:
        relora_ds.export_hf(model, tmp_path)
    finally:
        os.umask(umask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {
        "model.safetensors": "0o644", "config.json": "0o644", "generation_config.json": "0o644"}
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        ours, theirs = model(x, labels=x), hf(x, labels=x)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)


def test_load_hf_from_a_transformers_checkpoint(tmp_path):
    torch.manual_seed(1)
    cfg = LlamaConfig.preset("debug", rope_theta=5000.0)
    hf = transformers.LlamaForCausalLM(_hf_config(cfg)).eval()
    hf.save_pretrained(tmp_path)
    ours = relora_ds.load_hf(tmp_path).eval()
    assert ours.config.rope_theta == 5000.0 and ours.config.num_hidden_layers == cfg.num_hidden_layers
    x = torch.randint(0, cfg.vocab_size, (3, 21))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-4, rtol=0)


def test_export_merges_relora_layers(tmp_path):
    torch.manual_seed(2)
    model = relora_ds.wrap(LlamaForCausalLM(LlamaConfig.preset("debug")), rank=4)
    with torch.no_grad():
        for p in relora_ds.lora_parameters(model):
            p.normal_(0, 0.1)  # a non-trivial LoRA delta that export must fold in
    relora_ds.export_hf(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 512, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).logits, hf(x).logits, atol=1e-4, rtol=0)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is False


def test_loss_is_shifted_next_token_cross_entropy():
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig.preset("debug"))
    x = torch.randint(0, 512, (2, 9))
    out = model(x, labels=x)
    logp = torch.log_softmax(out.logits.float(), -1)
    by_hand = -torch.stack([logp[b, t, x[b, t + 1]] for b in range(2) for t in range(8)]).mean()
    torch.testing.assert_close(out.loss, by_hand)
    assert model(x).loss is None
    model.chunked_loss_enable(4)
    assert model(x, labels=x).logits is None
    model.chunked_loss_disable()  # the plain path again, with logits (a mutation trial's no-op passed the rest)
    out = model(x, labels=x)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, by_hand)
    # one sequence without its batch dimension (or a batch of batches) is named, not an IndexError deep inside
    for bad in (x[0], x[None]):
        shape = re.escape(str(tuple(bad.shape)))
        with pytest.raises(ValueError, match=rf"input_ids must be \(batch, seq_len\), got shape {shape}"):
            model(bad)


@pytest.mark.parametrize("field, value, match", [
    ("rope_scaling", {"type": "dynamic", "factor": 2.0},  # the pre-4.37 spelling
     r"rope scaling 'dynamic' is not supported; valid rope types: 'default' \(plain RoPE\), 'linear', 'llama3'"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},  # transformers 5
     r"rope scaling 'yarn' is not supported; valid rope types: .*'llama3'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, r"lacks \['low_freq_factor', 'high_freq_factor', "
                                                             r"'original_max_position_embeddings'\]"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor=0.5 is not supported"),
    # transformers 5's RoPE per layer type (Gemma-3 style): a mutation trial's dropped refusal loaded plain RoPE
    ("rope_parameters", {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e6}},
     r"per-layer-type RoPE parameters \['full_attention', 'sliding_attention'\] are not supported"),
    # transformers applies it in training: ours has none (a review's find: the value was dropped silently)
    ("attention_dropout", 0.5, r"attention_dropout=0.5 is not supported \(this model has no attention dropout"),
    ("hidden_act", "gelu", r"hidden_act=.gelu. is not supported \(LLaMA.s SwiGLU uses .silu., also spelled .swish.\)"),
    ("model_type", "gemma", "model_type='gemma' is not supported; valid: llama, qwen2, qwen3, mistral"),
    ("head_dim", 15, "head_dim must be a positive even integer .*got 15"),
    ("quantization_config", {"quant_method": "fp8", "weight_block_size": [128, 128]},
     r"a quantized checkpoint \(quantization_config, quant_method='fp8'\) is not supported"),
])
def test_hf_configs_we_cannot_reproduce_are_refused(field, value, match):
    """What the model here would not compute as transformers does is refused, naming what is valid (the
    families and RoPE types it does reproduce are tested against transformers in test_model_families.py)."""
    hf = {**hf_config_dict(LlamaConfig.preset("debug"), torch.float32), field: value}
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf)


def test_a_directory_without_a_readable_config_is_named(tmp_path):
    from relora_ds.hf import load_hf_config

    with pytest.raises(ValueError, match="has no config.json: not a Hugging Face model directory"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",')  # cut short by a full disk
    with pytest.raises(ValueError, match=rf"^{tmp_path}/config.json is not valid JSON: Expecting"):
        load_hf_config(tmp_path)


def test_a_resume_whose_hf_model_directory_is_gone_says_what_it_reads_there(tmp_path):
    """--resume of a --hf-model run whose model directory was deleted (the checkpoint holds the weights, so it
    looks needless): the error says the resume reads the architecture and tokenizer there, as the first start
    did. A first start without it keeps the plain error."""
    from relora_ds.startup import model_config_for
    from relora_ds.train_config import TrainConfig

    gone = tmp_path / "qwen"
    with pytest.raises(ValueError, match=rf"^{gone} has no config.json: not a Hugging Face model directory .*\. A "
                                         rf"resumed run reads its model's architecture and tokenizer from --hf-model "
                                         rf"{gone} as its first start did \(the checkpoint holds the weights\): "
                                         r"restore that directory$"):
        model_config_for(TrainConfig(hf_model=str(gone), resume=True, cycle_length=4, total_steps=8), 512)
    with pytest.raises(ValueError, match=r"has no config.json: not a Hugging Face model directory \([^)]*\)$"):
        model_config_for(TrainConfig(hf_model=str(gone), cycle_length=4, total_steps=8), 512)


def test_a_relora_ds_run_or_checkpoint_given_as_a_hugging_face_model_is_named(tmp_path):
    """--hf-model / --warm-start-from given a run directory or a training checkpoint (found by a user-journey
    review: "convert .bin checkpoints to safetensors", or "not a Hugging Face model directory"): the error
    names what it is and what to pass."""
    from relora_ds.hf import load_hf_config

    run = tmp_path / "run"
    (run / "checkpoints" / "step_40").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    (run / "checkpoints" / "latest").write_text("step_40")
    (run / "checkpoints" / "step_40" / "config.json").write_text('{"train": {}, "model": {}}')
    (run / "checkpoints" / "step_40" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"^{run} is a relora_ds run directory, not a Hugging Face model: pass "
                                         rf"its export {run}/hf \(not there: python launch/export.py {run} --out "
                                         rf"{run}/hf\)$"):
        load_hf_config(run)
    for ckpt in (run / "checkpoints", run / "checkpoints" / "step_40"):
        with pytest.raises(ValueError, match=rf"^{ckpt} is a relora_ds \(DeepSpeed\) training checkpoint, not a "
                                             rf"Hugging Face model: export it \(python launch/export.py {ckpt} "):
            load_hf_config(ckpt)
    (run / "hf").mkdir()
    (run / "hf" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"pass its export {run}/hf$"):
        load_hf_config(run)
    # a run that has not checkpointed yet: its metrics.jsonl alone names it (a mutation trial's checkpoints-only
    # rule passed every other test)
    young = tmp_path / "young"
    young.mkdir()
    (young / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match=rf"^{young} is a relora_ds run directory, not a Hugging Face model"):
        load_hf_config(young)
    # A Hugging Face Trainer's checkpoint under DeepSpeed (its `latest` and global_step*/ beside the model) is
    # a model: read as one (a review found it refused).
    hf_ckpt = tmp_path / "checkpoint-500"
    (hf_ckpt / "global_step500").mkdir(parents=True)
    (hf_ckpt / "latest").write_text("global_step500")
    (hf_ckpt / "global_step500" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (hf_ckpt / "config.json").write_text(json.dumps(hf_config_dict(LlamaConfig.preset("debug"), torch.float32)))
    assert load_hf_config(hf_ckpt) == LlamaConfig.preset("debug")


def test_load_hf_refuses_quantized_tensors_and_casts_each_tensor(tmp_path):
    """A checkpoint holding int8/fp8 tensors (a quantizer's, its config stripped) is one clear error, not
    torch's 'unexpected keys' traceback or a silent cast of fp8 codes; float tensors load in the asked dtype."""
    from safetensors.torch import load_file, save_file

    model = LlamaForCausalLM(LlamaConfig.preset("debug"))
    relora_ds.export_hf(model, tmp_path / "ok", dtype=torch.bfloat16, token_ids={"bos_token_id": 1, "eos_token_id": 2})
    loaded = relora_ds.load_hf(tmp_path / "ok", dtype=torch.float32)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for name, p in loaded.state_dict().items():
        assert torch.equal(p, model.state_dict()[name].to(torch.bfloat16).float()), name
    for bad in (torch.float8_e4m3fn, torch.int8):
        (tmp_path / "q").mkdir(exist_ok=True)
        (tmp_path / "q" / "config.json").write_bytes((tmp_path / "ok" / "config.json").read_bytes())
        state = load_file(tmp_path / "ok" / "model.safetensors")
        state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(bad)
        save_file(state, tmp_path / "q" / "model.safetensors")
        with pytest.raises(ValueError, match=rf"up_proj.weight is stored as {bad}, a quantized checkpoint"):
            relora_ds.load_hf(tmp_path / "q")


def test_hf_tensors_reads_only_the_names_asked_for_in_their_stored_dtype(tmp_path):
    """hf_tensors(dtype=None, names=...) (the ReLoRA start from a Hugging Face model reads the trained weights
    only, ~1 of a 7B's 27 GB): exactly the named tensors of every shard, as stored (bf16 stays bf16). Oracle:
    safetensors' own load_file of each shard. Mutations a trial ran that no test saw: the names ignored, everything
    cast to fp32."""
    from relora_ds.hf import hf_tensors

    cfg = LlamaConfig.preset("debug")
    hf = transformers.LlamaForCausalLM(_hf_config(cfg)).to(torch.bfloat16)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    stored = {}
    for shard in tmp_path.glob("model-*.safetensors"):
        stored.update(load_file(str(shard)))
    last = cfg.num_hidden_layers - 1
    names = {"model.embed_tokens.weight", "model.norm.weight", f"model.layers.{last}.mlp.up_proj.weight"}
    assert len({json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"][n]
                 for n in names}) > 1  # in more than one shard
    got = dict(hf_tensors(tmp_path, dtype=None, names=names))
    assert got.keys() == names
    for name, tensor in got.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, stored[name]), name
    assert {t.dtype for _, t in hf_tensors(tmp_path)} == {torch.float32}  # the default casts each to fp32


def test_rope_frequencies_survive_a_cast_to_bf16():
    """Casting the model (load_hf(dtype=bf16), model.to(bf16)) must not round the RoPE frequencies:
    transformers keeps them fp32 as well."""
    model = LlamaForCausalLM(LlamaConfig.preset("debug", max_position_embeddings=2048))
    before = model.model.rotary_emb(2048, torch.device("cpu"), torch.float32)
    model.to(torch.bfloat16)
    after = model.model.rotary_emb(2048, torch.device("cpu"), torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # bf16 activations get cos/sin computed in fp32 (positions past 256 are not bf16 numbers) and then cast,
    # as transformers' (the oracle) gives them; a mutation trial's bf16 positions passed every other test
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=2048)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    want = rotary(torch.zeros(1, dtype=torch.bfloat16), torch.arange(2048)[None])
    got = model.model.rotary_emb(2048, torch.device("cpu"), torch.bfloat16)
    assert all(g.dtype == torch.bfloat16 and torch.equal(g, w[0]) for g, w in zip(got, want))


def _randomize_norms(model):
    """Trained RMSNorm weights: fresh ones are all 1, which hides a norm applied in the wrong place."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)


def test_export_carries_rope_theta_eps_and_trained_norms(tmp_path):
    """Non-default rope_theta and rms_norm_eps (the debug preset's defaults equal transformers' own, so a value
    left out of config.json went unnoticed) and non-unit norm weights, against transformers (the oracle)."""
    torch.manual_seed(4)
    cfg = LlamaConfig.preset("debug", rope_theta=5000.0, rms_norm_eps=1e-3)
    model = LlamaForCausalLM(cfg).eval()
    _randomize_norms(model)
    relora_ds.export_hf(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["rope_theta"], written["rms_norm_eps"]) == (5000.0, 1e-3)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf(x).logits, atol=1e-4, rtol=0)


def test_load_hf_reads_eps_and_trained_norms(tmp_path):
    torch.manual_seed(5)
    cfg = LlamaConfig.preset("debug", rms_norm_eps=1e-3)
    hf = transformers.LlamaForCausalLM(_hf_config(cfg)).eval()
    _randomize_norms(hf)
    hf.save_pretrained(tmp_path)
    ours = relora_ds.load_hf(tmp_path).eval()
    assert ours.config.rms_norm_eps == 1e-3
    x = torch.randint(0, cfg.vocab_size, (2, 29))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-4, rtol=0)


def test_export_in_bf16_casts_every_tensor_and_records_the_dtype(tmp_path):
    """export_hf(dtype=bf16): each ReLoRA weight is W + s·B·A summed in fp32 (written out here) and cast once;
    every other tensor is cast too; config.json says bfloat16, so transformers loads it as bf16."""
    from safetensors.torch import load_file

    torch.manual_seed(6)
    model = relora_ds.wrap(LlamaForCausalLM(LlamaConfig.preset("debug")), rank=4)
    with torch.no_grad():
        for p in relora_ds.lora_parameters(model):
            p.normal_(0, 0.1)
    relora_ds.export_hf(model, tmp_path, dtype=torch.bfloat16)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    layer = model.model.layers[1].mlp.down_proj
    want = (layer.weight.float() + layer.scale * (layer.lora_B.float() @ layer.lora_A.float())).to(torch.bfloat16)
    assert torch.equal(state["model.layers.1.mlp.down_proj.weight"], want)
    assert torch.equal(state["model.embed_tokens.weight"], model.model.embed_tokens.weight.to(torch.bfloat16))
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype="auto")
    assert hf.dtype == torch.bfloat16


def test_rmsnorm_is_transformers_bitwise_in_bf16():
    """The normalized input is cast to bf16 before the bf16 weight multiplies it, as in LlamaRMSNorm."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from relora_ds.model import RMSNorm

    g = torch.Generator().manual_seed(7)
    ours, theirs = RMSNorm(64, 1e-6).bfloat16(), LlamaRMSNorm(64, eps=1e-6).bfloat16()
    with torch.no_grad():
        ours.weight.copy_(torch.rand(64, generator=g) + 0.5)
        theirs.weight.copy_(ours.weight)
    x = torch.randn(4, 9, 64, generator=g).bfloat16()
    assert torch.equal(ours(x), theirs(x))


def test_a_model_trains_only_on_data_of_its_own_tokenizer(tmp_path, small_data_dir):
    """--hf-model / --warm-start-from with a data dir: the model's tokenizer.model must be the data's (same
    vocab size proves nothing), or its tokenizer.json where it holds only that kind (compared through the
    .model converted as the export converts it); a model directory without one is named as unverifiable."""
    from relora_ds.data import prepare_data
    from relora_ds.startup import check_model_and_data
    from relora_ds.train_config import TrainConfig

    model = LlamaForCausalLM(LlamaConfig.preset("debug", vocab_size=512))
    relora_ds.export_hf(model, tmp_path / "hf", tokenizer=small_data_dir / "tokenizer.model")
    other = prepare_data(None, tmp_path / "other", vocab_size=512, max_docs=300)  # its own 512-piece tokenizer
    for field in ("hf_model", "warm_start_from"):
        cfg = TrainConfig(**{field: str(tmp_path / "hf")}, mode="lora", rank=4, total_steps=10)
        assert check_model_and_data(cfg, small_data_dir, 512)[0].vocab_size == 512
        with pytest.raises(ValueError, match=r"hf/tokenizer.model \(sha256 .*\) is not the tokenizer .*other was "
                                             r"prepared with .*prepare_data.py --tokenizer .*hf$"):
            check_model_and_data(cfg, other, 512)
    # A model re-saved by transformers keeps only its tokenizer.json: the data's tokenizer.model converted as
    # the export converts it must equal it (it was refused as "another tokenizer", a user trial on 2026-12-05).
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "resaved")
    assert sorted(p.name for p in (tmp_path / "resaved").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "hf" / name, tmp_path / "resaved" / name)
    cfg = TrainConfig(hf_model=str(tmp_path / "resaved"), mode="lora", rank=4, total_steps=10)
    assert check_model_and_data(cfg, small_data_dir, 512)[0].vocab_size == 512
    with pytest.raises(ValueError, match=r"other was prepared with a tokenizer.model, .*resaved holds only a "
                                         r"tokenizer.json, and they are different tokenizers \(tokenizer.model "
                                         r"converted to a tokenizer.json has other pieces\).* --tokenizer .*resaved\)"):
        check_model_and_data(cfg, other, 512)
    # The other way round: data prepared with the tokenizer.json, a model holding only a tokenizer.model.
    by_json = prepare_data(None, tmp_path / "by_json", tokenizer=str(tmp_path / "resaved"), max_docs=300)
    assert json.loads((by_json / "manifest.json").read_text())["tokenizer_path"].endswith("tokenizer.json")
    (tmp_path / "hf" / "tokenizer.json").unlink()
    cfg = TrainConfig(hf_model=str(tmp_path / "hf"), mode="lora", rank=4, total_steps=10)
    assert check_model_and_data(cfg, by_json, 512)[0].vocab_size == 512
    shutil.copy(other / "tokenizer.model", tmp_path / "hf" / "tokenizer.model")
    with pytest.raises(ValueError, match=r"by_json was prepared with a tokenizer.json, .*hf holds only a "
                                         r"tokenizer.model, and they are different tokenizers"):
        check_model_and_data(cfg, by_json, 512)
    (tmp_path / "hf" / "tokenizer.model").unlink()
    with pytest.warns(UserWarning, match=r"has no tokenizer.model or tokenizer.json, so relora_ds cannot check that "
                                         r".*other was tokenized with this model's tokenizer"):
        check_model_and_data(cfg, other, 512)


def test_hf_model_smaller_vocab_and_positions_are_named_with_the_fix(tmp_path, small_data_dir):
    """A model with fewer embedding rows than the data's tokenizer has pieces: the fix is the model's own
    tokenizer (vocab_size does not apply to a Hugging Face model). A seq_len past the model's
    max_position_embeddings is named."""
    import shutil

    from relora_ds.startup import check_model_and_data
    from relora_ds.train_config import TrainConfig

    model = LlamaForCausalLM(LlamaConfig.preset("debug", vocab_size=500, max_position_embeddings=64))
    relora_ds.export_hf(model, tmp_path / "hf")
    shutil.copy(small_data_dir / "tokenizer.model", tmp_path / "hf" / "tokenizer.model")
    cfg = TrainConfig(hf_model=str(tmp_path / "hf"), mode="lora", rank=4, total_steps=10, seq_len=32)
    # Its own tokenizer, which the data was prepared with: the model directory itself is inconsistent.
    with pytest.raises(ValueError, match=r"the model in .*hf has 500 embedding rows, fewer than the 512 ids of its "
                                         r"own tokenizer .* inconsistent.*resize_token_embeddings\(512\)"):
        check_model_and_data(cfg, small_data_dir, 512)
    # Another tokenizer's data (the model holds none to compare): the fix is the model's own tokenizer.
    (tmp_path / "hf" / "tokenizer.model").unlink()
    with pytest.raises(ValueError, match=r"the model in .*hf has 500 embedding rows, fewer than the 512 pieces of "
                                         r"the tokenizer .* was prepared with: prepare the data with the model's own "
                                         r"tokenizer \(launch/prepare_data.py --tokenizer .*hf\)"), \
            pytest.warns(UserWarning, match="cannot check"):
        check_model_and_data(cfg, small_data_dir, 512)
    model = LlamaForCausalLM(LlamaConfig.preset("debug", vocab_size=512, max_position_embeddings=64))
    relora_ds.export_hf(model, tmp_path / "hf")
    cfg.seq_len = 128
    with pytest.warns(UserWarning, match=r"seq_len=128 is longer than the max_position_embeddings=64 of the model"):
        check_model_and_data(cfg, small_data_dir, 512)


def test_export_hf_of_a_transformers_model_or_a_zero3_module_names_the_way_to_save_it(tmp_path):
    """export_hf writes relora_ds's own model; a transformers model handed to it is refused with the way out
    (save_pretrained of the unwrapped model), not an AttributeError from its config, and so is a ZeRO-3
    engine's module (mutation trials dropping either refusal passed every other test)."""
    hf = transformers.LlamaForCausalLM(_hf_config(LlamaConfig.preset("debug")))
    with pytest.raises(ValueError, match=r"export_hf expects a relora_ds.LlamaForCausalLM or a DeepSpeed engine "
                                         r"training one, got LlamaForCausalLM \(for a Hugging Face model: "
                                         r"relora_ds.unwrap\(model\).save_pretrained\(dir\)\)"):
        relora_ds.export_hf(relora_ds.wrap(hf, rank=2), tmp_path)
    # the module of a ZeRO-3 engine holds empty placeholders (DeepSpeed marks each partitioned parameter with a
    # ds_id, stood in for here): an export of it would write empty tensors
    ours = LlamaForCausalLM(LlamaConfig.preset("debug"))
    for i, p in enumerate(ours.parameters()):
        p.ds_id = i
    with pytest.raises(ValueError, match=r"partitioned by DeepSpeed ZeRO-3 .*pass the engine itself, "
                                         r"export_hf\(engine, out_dir\), on every rank"):
        relora_ds.export_hf(ours, tmp_path)
    assert not any(tmp_path.iterdir())


def test_load_hf_casts_to_the_requested_dtype(tmp_path):
    torch.manual_seed(4)
    relora_ds.export_hf(LlamaForCausalLM(LlamaConfig.preset("debug")), tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    model = relora_ds.load_hf(tmp_path, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert params and all(p.dtype == torch.bfloat16 for p in params.values())
    for name, p in params.items():  # oracle: the file's fp32 tensors rounded to bf16
        assert torch.equal(p.detach(), stored[name].to(torch.bfloat16)), name


def test_a_checkpoint_holding_rotary_inv_freq_buffers_loads(tmp_path):
    """transformers < 4.31 saved each layer's rotary_emb.inv_freq (1 / theta^(2i/d)): such checkpoints load,
    the stored buffer is ignored (ours is recomputed) and the weights are the file's."""
    torch.manual_seed(5)
    cfg = LlamaConfig.preset("debug")
    relora_ds.export_hf(LlamaForCausalLM(cfg), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    d = cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    for i in range(cfg.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = relora_ds.load_hf(tmp_path)
    assert torch.equal(model.state_dict()["lm_head.weight"], state["lm_head.weight"])


def test_tied_embeddings_load_as_one_parameter():
    """tie_word_embeddings (LLaMA-3.2-1B/3B, small Qwen2), once refused, is now one Parameter shared by the
    embedding and lm_head; an untied config keeps two (the presets' state dict keys are unchanged)."""
    hf = {**hf_config_dict(LlamaConfig.preset("debug"), torch.float32), "tie_word_embeddings": True}
    model = LlamaForCausalLM(config_from_hf(hf))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(1 for _ in model.parameters()) == sum(1 for _ in LlamaForCausalLM(LlamaConfig.preset("debug")).parameters()) - 1


def test_export_dtype_reads_transformers_5_dtype_key(tmp_path):
    """transformers 5 writes "dtype" (not torch_dtype) in config.json: a bf16 source exports in bf16.
    Oracle: what transformers' save_pretrained writes for a bf16 model."""
    import transformers
    from relora_ds.hf import export_dtype
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    written = json.loads((tmp_path / "src" / "config.json").read_text())
    name = written.get("dtype") or written.get("torch_dtype")
    assert name == "bfloat16"
    assert export_dtype(None, tmp_path / "src") == torch.bfloat16
    # "auto" (a config saying nothing definite) and no dtype at all export fp32; a name given is checked
    for key in ("torch_dtype", "dtype"):
        bare = {k: v for k, v in written.items() if k not in ("torch_dtype", "dtype")}
        (tmp_path / "src" / "config.json").write_text(json.dumps({**bare, key: "auto"}))
        assert export_dtype(None, tmp_path / "src") == torch.float32
    assert export_dtype(None) == torch.float32 and export_dtype("float16") == torch.float16
    with pytest.raises(ValueError, match=r"export dtype 'float64' is not supported; valid: 'float32', 'bfloat16', "
                                         r"'float16'"):
        export_dtype("float64")


def test_mistral_config_without_sliding_window_gets_transformers_default():
    """A Mistral config.json without sliding_window: transformers' MistralConfig default window (4096) applies."""
    import transformers
    from relora_ds.hf import config_from_hf
    hf = {"model_type": "mistral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
    assert config_from_hf(hf).sliding_window == transformers.MistralConfig(**{k: v for k, v in hf.items()
                                                                            if k != "model_type"}).sliding_window


def test_load_hf_reads_every_shard_the_untied_default_and_transformers_rope_theta(tmp_path):
    """Mutations a trial ran that no test saw, each against transformers' logits from the same directory: a
    sharded checkpoint (every model of 7B and up) is read shard by shard, all of them; a config.json without
    tie_word_embeddings loads untied, transformers' LLaMA default; a config holding rope_theta both at the top
    and in rope_parameters takes the one transformers takes."""
    torch.manual_seed(2)
    cfg = LlamaConfig.preset("debug")
    hf = transformers.LlamaForCausalLM(_hf_config(cfg)).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 19))

    def same_logits(path):
        theirs = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        ours = relora_ds.load_hf(path).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-4, rtol=0)
        return ours, theirs

    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    same_logits(tmp_path / "sharded")

    hf.save_pretrained(tmp_path / "untied")
    config = json.loads((tmp_path / "untied" / "config.json").read_text())
    assert config.pop("tie_word_embeddings") is False
    (tmp_path / "untied" / "config.json").write_text(json.dumps(config))
    ours, _ = same_logits(tmp_path / "untied")
    assert not ours.config.tie_word_embeddings

    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0}
    config["rope_theta"] = 80_000.0
    shutil.copytree(tmp_path / "untied", tmp_path / "theta")
    (tmp_path / "theta" / "config.json").write_text(json.dumps(config))
    ours, theirs = same_logits(tmp_path / "theta")
    assert ours.config.rope_theta == 500.0


def test_export_in_bf16_casts_the_biases_too(tmp_path):
    """A bf16 export of a model with attention and MLP biases: every tensor is bf16, the biases too (a mutation
    keeping their fp32 went unseen: the bf16 export test's model has none)."""
    from safetensors.torch import load_file

    model = relora_ds.wrap(LlamaForCausalLM(LlamaConfig.preset("debug", attention_bias=True, mlp_bias=True)), rank=4)
    relora_ds.export_hf(model, tmp_path, dtype=torch.bfloat16)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.bias" in state and "model.layers.0.mlp.down_proj.bias" in state
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
