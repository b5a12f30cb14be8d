"""What each merge adds, in its record: ‖s·B·A‖_F and its size relative to ‖W‖_F over the layers (is ReLoRA's
low-rank phase changing the weights at all, or is each update rounded away?). Oracle: torch.linalg.norm of the
product and of the weight, taken before the merge."""
import math

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


def test_the_update_norm_of_a_nearly_cancelling_update_is_accurate_and_never_nan():
    """‖s·B·A‖_F from the r×r Gram matrices cancels when B·A is much smaller than ‖B‖‖A‖. Oracle:
    torch.linalg.norm of the fp64 product. (1) B's two columns b, −b(1+1e-4) over A's equal rows: ‖BA‖ is 1e-4
    of the factors' scale, which the float64 Gram sum resolves (rel 1e-6) and a float32 one does not (it was
    far off, or negative). (2) An exact tie by hand, rank-2 factors over one input and one output (the layer
    gives only s): B = [1, −1], A = [x; y] with x − y ≈ 6e-11, whose four rounded Gram products sum to −2.2e-16
    in every order: the norm is 0 (within the Gram formula's
    resolution of the true 6e-11·s), not sqrt(negative) = NaN. (A mutation audit found both the float64
    accumulation and the clamp removable with every test passing.)"""
    from relora_ds.merge_stats import update_norms

    layer = relora_ds.ReLoRALinear(64, 48, 2, alpha=4)  # s = 2
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 64, generator=g), torch.randn(48, 1, generator=g)
    A, B = torch.cat([a, a]), torch.cat([b, -b * (1 + 1e-4)], 1)
    want = layer.scale * torch.linalg.norm(B.double() @ A.double()).item()
    delta, weight = update_norms(layer, layer.weight, A, B)
    assert delta == pytest.approx(want, rel=1e-6)
    assert weight == pytest.approx(torch.linalg.norm(layer.weight.double()).item(), rel=1e-6)
    x, y = 1.0004770097765527, 1.0004770097142435
    delta, _ = update_norms(layer, layer.weight, torch.tensor([[x], [y]], dtype=torch.float64),
                            torch.tensor([[1.0, -1.0]], dtype=torch.float64))
    assert not math.isnan(delta) and 0.0 <= delta <= 2 * 2e-8  # s · sqrt(a few float64 ulps)


def test_update_stats_of_a_zero_weight_and_of_no_layers():
    """update_stats by hand: a layer whose weight is all zeros has an infinite relative update (the update is
    not 'nothing', nor a ZeroDivisionError in the merge), which the mean and max carry; no layers: {} (its
    docstring; zero_reset calls it with every rank's norms). (A mutation audit found the weight > 0 guard, the
    inf and the empty case each changeable with every test passing.)"""
    from relora_ds.merge_stats import update_stats

    stats = update_stats([(1.0, 4.0), (0.5, 0.0)])
    assert stats == {"update_norm_mean": 0.75, "update_rel_mean": math.inf, "update_rel_max": math.inf}
    assert update_stats([(1.0, 4.0), (0.5, 1.0)]) == {"update_norm_mean": 0.75, "update_rel_mean": 0.375,
                                                      "update_rel_max": 0.5}
    assert update_stats([]) == {}
