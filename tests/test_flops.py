"""relora_ds.flops against torch.utils.flop_counter: the FLOPs one forward+backward really runs on the
reference path (pure torch matmuls; attention through SDPA's math backend, which FlopCounterMode sees),
for a full-rank model, a ReLoRA-wrapped one (frozen base, LoRA factors) and an int8 base."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import relora_ds
from relora_ds import LlamaConfig, LlamaForCausalLM
from relora_ds.flops import flops_per_token, mfu_peak, peak_tflops


def _counted_per_token(model, batch, seq_len):
    """A step on the data's windows (seq_len + 1 tokens, seq_len of them predicted): FLOPs per trained token."""
    x = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(x, labels=x).loss.backward()
    return counter.get_total_flops() / (batch * seq_len)


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("seq_len", [33, 64])
def test_flops_per_token_equal_the_counted_flops(monkeypatch, seq_len, quantize):
    monkeypatch.setenv("RELORA_KERNELS", "reference")  # the spec's products, no shape-dependent shortcut
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    full = flops_per_token(model, seq_len)
    assert full == pytest.approx(_counted_per_token(model, 2, seq_len), rel=1e-12)
    # Hand count for the dense model: 6 per weight-matrix parameter (not the embedding) + 12 L h T, for each
    # of the T = seq_len + 1 positions, per trained token.
    linear, T = 2 * (4 * 48 * 48 + 3 * 48 * 80) + 96 * 48, seq_len + 1
    assert full == pytest.approx((6 * linear + 12 * 2 * 48 * T) * T / seq_len, rel=1e-12)
    relora_ds.wrap(model, rank=4, quantize=quantize)
    low = flops_per_token(model, seq_len)
    assert low == pytest.approx(_counted_per_token(model, 2, seq_len), rel=1e-12)
    lora = 2 * 4 * (4 * (48 + 48) + 3 * (48 + 80))
    # The frozen base loses its weight gradient; the LoRA factors cost 6 each.
    assert low == pytest.approx(full - (2 * (linear - 96 * 48) - 6 * lora) * T / seq_len, rel=1e-12)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_grouped_query_attention_counts_every_query_head(monkeypatch, quantize):
    """GQA (2 key/value heads for 4 query heads): the K/V projections shrink, the attention products do not
    (scores and values cost heads x head_dim per position pair whatever the K/V width), as counted."""
    monkeypatch.setenv("RELORA_KERNELS", "reference")
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    assert flops_per_token(model, 33) == pytest.approx(_counted_per_token(model, 2, 33), rel=1e-12)
    relora_ds.wrap(model, rank=4, quantize=quantize)
    assert flops_per_token(model, 33) == pytest.approx(_counted_per_token(model, 2, 33), rel=1e-12)


def test_a_head_tied_to_the_embedding_is_counted_once_as_a_matmul():
    """A tied head (one parameter, the embedding's): its matmul costs 6 per weight like an untied head's,
    counted once, and the lookup nothing; the same total as the untied model's, as FlopCounterMode counts."""
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    untied = flops_per_token(model, 33)
    model.lm_head.weight = model.model.embed_tokens.weight
    assert flops_per_token(model, 33) == pytest.approx(_counted_per_token(model, 2, 33), rel=1e-12)
    assert flops_per_token(model, 33) == untied


def test_the_chunked_loss_runs_the_head_on_the_predicted_positions_only():
    """chunked_loss_enable: the head's product (and its gradients, made in the forward) covers the seq_len
    predicted positions, not the window's seq_len + 1 (found by a review: counted one position too many)."""
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    plain = flops_per_token(model, 33)
    model.chunked_loss_enable(16)
    assert flops_per_token(model, 33) == pytest.approx(_counted_per_token(model, 2, 33), rel=1e-12)
    assert plain - flops_per_token(model, 33) == pytest.approx(6 * 96 * 48 / 33, rel=1e-12)


@pytest.mark.parametrize("model_type,window,layer_types", [("mistral", 16, None), ("mistral", 40, None),
                                                            ("qwen2", 16, ["full_attention", "sliding_attention"])])
def test_a_sliding_window_layer_is_credited_the_keys_it_attends(monkeypatch, model_type, window, layer_types):
    """A layer whose queries attend at most `window` keys: its attention products count min(T, window) keys,
    not T. The oracle: FlopCounterMode counts the products the reference path runs (the whole T x T scores,
    the window being a mask), less by hand the 12 h·d·(T - window) per position of each sliding layer."""
    monkeypatch.setenv("RELORA_KERNELS", "reference")
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128, model_type=model_type,
                      sliding_window=window, layer_types=layer_types)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    T, sliding = 34, 2 if layer_types is None else 1
    masked_out = 12 * 48 * max(0, T - window) * sliding * T / 33
    assert flops_per_token(model, 33) == pytest.approx(_counted_per_token(model, 2, 33) - masked_out, rel=1e-12)
    relora_ds.wrap(model, rank=4)
    assert flops_per_token(model, 33) == pytest.approx(_counted_per_token(model, 2, 33) - masked_out, rel=1e-12)


def test_a_zero3_partitioned_model_is_counted_whole():
    """Under ZeRO-3 each rank's parameters are empty tensors outside a gather, their whole shape in ds_shape and
    size in ds_numel: the count is the unpartitioned model's (a mutation trial's survivors: the local shape or
    numel read, which counts nothing, or every matrix as a 1-D empty tensor). Emulated: each parameter's data
    emptied after its ds_shape and ds_numel are set, as DeepSpeed's partitioning leaves them."""
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    relora_ds.wrap(model, rank=4)
    whole = flops_per_token(model, 33)
    for p in model.parameters():
        p.ds_shape, p.ds_numel = p.shape, p.numel()
        p.data = torch.empty(0)
    assert flops_per_token(model, 33) == whole


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 NVL") == peak_tflops("NVIDIA H200 NVL") == 835.5
    assert peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA H800 PCIe") == 756.0 and peak_tflops("NVIDIA H800") == 989.4  # as H100's
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 == peak_tflops("NVIDIA A800-SXM4-80GB")
    assert peak_tflops("NVIDIA L40S") == 362.05
    assert peak_tflops("NVIDIA L4") is None and peak_tflops(None) is None


def test_mfu_peak_in_half_precision_only_and_a_gpu_the_table_lacks_is_named():
    import warnings

    from relora_ds.train_config import ConfigWarning

    assert mfu_peak("NVIDIA H100 80GB HBM3", half=True) == 989.4  # bf16 or fp16: the same dense peak
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mfu_peak("NVIDIA H100 80GB HBM3", half=False) is None  # fp32: no mfu, and nothing to warn of
        assert mfu_peak("NVIDIA L4", half=True, warn=False) is None  # another rank: rank 0 says it
    with pytest.warns(ConfigWarning, match="no mfu column: the peak TFLOP/s of 'NVIDIA L4' is not in .*give "
                                           "peak_tflops"):
        assert mfu_peak("NVIDIA L4", half=True) is None


def test_attention_flops_use_heads_times_head_dim_not_hidden_size(monkeypatch):
    """A model whose explicit head_dim makes heads x head_dim differ from hidden_size (Qwen3-style: Qwen3-0.6B has
    hidden 1024 and 16 x 128 = 2048). A mutation audit found hidden_size in place of heads x head_dim passing
    every test (their models had heads x head_dim = hidden). Oracle: torch's FlopCounterMode."""
    monkeypatch.setenv("RELORA_KERNELS", "reference")
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, head_dim=16, max_position_embeddings=128)  # 4 x 16 = 64 != 48
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    x = torch.randint(0, 96, (2, 34), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(x, labels=x).loss.backward()
    assert flops_per_token(model, 33) == pytest.approx(counter.get_total_flops() / (2 * 33), rel=1e-12)
