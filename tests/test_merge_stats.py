"""What each merge adds, in its record: ‖s·B·A‖_F and its size relative to ‖W‖_F over the layers (is ReLoRA's
low-rank phase changing the weights at all, or is each update rounded away?). Oracle: torch.linalg.norm of the
product and of the weight, taken before the merge."""
import pytest
import torch

import relora_ds
from relora_ds import LlamaConfig, LlamaForCausalLM
from relora_ds.quant import dequantized
from relora_ds.relora import relora_layers


def _model(quantize=None, dtype=torch.float32, intermediate_size=48):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=intermediate_size, num_hidden_layers=2,
                      num_attention_heads=4)
    model = relora_ds.wrap(LlamaForCausalLM(cfg).to(dtype), rank=4, alpha=8, quantize=quantize)
    g = torch.Generator().manual_seed(1)
    for _, layer in relora_layers(model):  # trained factors: B away from 0, each layer its own size
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * torch.rand(1, generator=g))
    return model


@pytest.mark.parametrize("quantize, dtype, intermediate_size", [
    (None, torch.float32, 48), (None, torch.bfloat16, 48), ("int8", torch.float32, 48),
    # gate/up of 2,500 rows: ‖W‖ summed over three chunks of rows (1024, 1024, 452), the int8 scales' too
    (None, torch.float32, 2500), ("int8", torch.float32, 2500)])
def test_each_merge_records_the_update_norm_and_its_size_relative_to_the_weight(quantize, dtype, intermediate_size):
    model = _model(quantize, dtype, intermediate_size)
    deltas, ratios = [], []
    for _, layer in relora_layers(model):
        W = dequantized(layer) if quantize else layer.weight
        delta = torch.linalg.norm(layer.scale * (layer.lora_B.double() @ layer.lora_A.double()))
        deltas.append(delta.item())
        ratios.append((delta / torch.linalg.norm(W.double())).item())
    event = relora_ds.merge_and_reinit(model)
    assert event["update_norm_mean"] == pytest.approx(sum(deltas) / len(deltas), rel=1e-6)
    assert event["update_rel_mean"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-6)
    assert event["update_rel_max"] == pytest.approx(max(ratios), rel=1e-6)
    assert len(set(round(r, 6) for r in ratios)) == len(ratios)  # the layers differ: mean and max say something
    # After the merge B = 0: the next merge adds nothing.
    assert relora_ds.merge_and_reinit(model)["update_rel_max"] == 0.0
