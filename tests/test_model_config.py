"""LlamaConfig's named sizes against their published shapes, and the shapes, biases and RoPE scalings a model
family cannot have refused (relora_ds/model_config.py). (Our model against Hugging Face's: test_model_hf.py.)"""
import pytest

from relora_ds import LlamaConfig, LlamaForCausalLM


def test_presets_match_paper_sizes_and_unknown_preset_is_an_error():
    assert LlamaConfig.preset("130m").hidden_size == 768
    assert LlamaConfig.preset("1b").intermediate_size == 5461
    assert LlamaForCausalLM(LlamaConfig.preset("debug")).num_parameters() < 1_000_000
    assert 2e6 <= LlamaForCausalLM(LlamaConfig.preset("tiny")).num_parameters() <= 5e6
    with pytest.raises(ValueError, match="valid presets: .*130m"):
        LlamaConfig.preset("13m")
    with pytest.raises(ValueError, match="unknown LlamaConfig field"):
        LlamaConfig.preset("debug", hiden_size=3)


# (hidden, intermediate, layers, heads, max_position_embeddings): the ReLoRA paper's Table 2 (hidden, heads,
# layers) with the reference code's MLP widths, at its sequence length 512; OpenLLaMA-3B's and LLaMA-7B's configs.
PAPER_SIZES = {"60m": (512, 1376, 8, 8, 512), "130m": (768, 2048, 12, 12, 512), "250m": (768, 2560, 24, 16, 512),
               "350m": (1024, 2736, 24, 16, 512), "1b": (2048, 5461, 24, 32, 512), "3b": (3200, 8640, 26, 32, 512),
               "7b": (4096, 11008, 32, 32, 2048)}


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_every_named_size_has_its_published_shape(name):
    """Mutations a trial ran that no test saw: a named size's heads, layers or MLP width changed, or 7b's 2048
    positions lost. Each against its published shape, with LLaMA's vocabulary and full multi-head attention."""
    cfg = LlamaConfig.preset(name)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.max_position_embeddings) == PAPER_SIZES[name]
    assert (cfg.vocab_size, cfg.num_key_value_heads, cfg.head_dim) == (32000, cfg.num_attention_heads,
                                                                       cfg.hidden_size // cfg.num_attention_heads)


def test_llama3_rope_scaling_needs_high_freq_factor_above_low_freq_factor():
    """Mutation a trial ran that no test saw: LLaMA-3.1's smoothing divides by high_freq_factor -
    low_freq_factor, so equal factors are refused (as above one), and factors 1 and 4 (LLaMA-3.1's) pass."""
    llama3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    for low, high in ((4.0, 4.0), (4.0, 1.0)):
        with pytest.raises(ValueError, match="high_freq_factor must be above low_freq_factor"):
            LlamaConfig.preset("debug", rope_scaling={**llama3, "low_freq_factor": low, "high_freq_factor": high})
    cfg = LlamaConfig.preset("debug", rope_scaling={**llama3, "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    assert cfg.rope_scaling["high_freq_factor"] == 4.0


def test_shapes_and_biases_a_family_cannot_have_are_refused():
    """Mutations a trial ran that no test saw: query heads not a multiple of the key/value heads (grouped-query
    attention shares each kv head among a whole number of query heads), a non-positive RoPE scaling factor,
    and MLP biases on Qwen3 (its Hugging Face architecture has none)."""
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by num_key_value_heads=3"):
        LlamaConfig.preset("debug", num_key_value_heads=3)
    for factor in (-2.0, 0.0):
        with pytest.raises(ValueError, match=r"\['factor'\] must be positive numbers"):
            LlamaConfig.preset("debug", rope_scaling={"rope_type": "linear", "factor": factor})
    with pytest.raises(ValueError, match=r"model_type='qwen3' cannot have \{'mlp_bias': True\}"):
        LlamaConfig.preset("debug", model_type="qwen3", mlp_bias=True)
    assert LlamaConfig.preset("debug", num_key_value_heads=2).num_key_value_heads == 2
