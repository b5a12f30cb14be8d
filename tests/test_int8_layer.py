"""int8 frozen base weights in the layer and the model: storage, forward, state dicts and export, loading a base,
dtype casts, meta-device builds, frozen bytes per preset, and bad input. The quantizer, merges and kernels:
tests/test_int8_quant.py."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import relora_ds
from relora_ds import LlamaConfig, LlamaForCausalLM, quant
from relora_ds.hf import load_hf
from launch_utils import ROOT, run_ranks


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------------------------ layer/model
def tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig.preset("debug"))


def test_wrap_int8_storage_and_forward_close_to_float():
    model, ref = tiny_model(), tiny_model()
    relora_ds.wrap(model, rank=4, quantize="int8")
    relora_ds.wrap(ref, rank=4)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight is None and layer.weight_q.dtype == torch.int8
    # weight_q: a frozen parameter (ZeRO-3 partitions it; no optimizer group takes it), never trainable
    q_params = [p for n, p in model.named_parameters() if n.endswith("weight_q")]
    assert len(q_params) == 14 and not any(p.requires_grad for p in q_params)
    assert all(n.endswith(("weight_scale", "weight_residual", "merge_count")) or "rotary" in n
               for n, _ in model.named_buffers())
    assert "quantize='int8'" in repr(layer)
    x = torch.randint(0, 512, (2, 16))
    assert rel(model(x).logits, ref(x).logits) < 0.02
    model.bfloat16()  # the residual stays int8 on the host, q stays int8; scales stay bf16
    assert layer.weight_q.dtype == torch.int8 and layer.weight_residual.dtype == torch.int8
    assert layer.weight_residual.device.type == "cpu"


def test_the_gathered_state_of_an_int8_base_stays_int8():
    """full_fp32_state_dict (the warm-start switch, the export) keeps the int8 base as int8, not as float32 at 4x
    its size in host memory (28 GB instead of 7 for a 7B base), exactly the model's codes; the float parameters
    come as fp32, the buffers (bf16 scales, int8 residuals) as they are. A model outside an engine: its
    parameters are the masters."""
    from types import SimpleNamespace

    from relora_ds.engine_state import full_fp32_state_dict

    model = relora_ds.wrap(tiny_model(), rank=4, quantize="int8")
    state = full_fp32_state_dict(SimpleNamespace(module=model))
    codes = {n: p for n, p in model.named_parameters() if n.endswith("weight_q")}
    assert len(codes) == 14 and all(state[n].dtype == torch.int8 and torch.equal(state[n], p) for n, p in codes.items())
    assert all(state[n].dtype == torch.float32 for n, p in model.named_parameters() if p.is_floating_point())
    buffers = {n: b for n, b in model.named_buffers() if n.endswith(("weight_scale", "weight_residual"))}
    assert len(buffers) == 28 and all(state[n].dtype == b.dtype and torch.equal(state[n], b) for n, b in buffers.items())


def test_state_dict_roundtrip_exact_and_export(tmp_path):
    model = relora_ds.wrap(tiny_model(), rank=4, quantize="int8")
    with torch.no_grad():
        for _, layer in relora_ds.relora_layers(model):
            layer.lora_B.normal_(0, 0.02)
    relora_ds.merge_and_reinit(model)
    with torch.no_grad():
        for _, layer in relora_ds.relora_layers(model):
            layer.lora_B.normal_(0, 0.02)
    state = model.state_dict()
    other = relora_ds.wrap(LlamaForCausalLM(LlamaConfig.preset("debug")), rank=4, quantize="int8")
    other.load_state_dict(state)
    assert all(torch.equal(a, other.state_dict()[k]) for k, a in state.items())
    x = torch.randint(0, 512, (2, 16))
    want = model(x).logits
    relora_ds.export_hf(model, tmp_path / "hf")
    loaded = load_hf(tmp_path / "hf")
    keys = set(loaded.state_dict())
    assert not any("weight_q" in k or "residual" in k or "scale" in k or "lora" in k for k in keys)
    assert torch.allclose(loaded(x).logits, want, atol=1e-4, rtol=1e-4)
    unwrapped = relora_ds.unwrap(model)
    assert torch.allclose(unwrapped(x).logits, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("bad", ["int4", "INT8", 8, "fp8"])
def test_bad_quantize_value(bad):
    with pytest.raises(ValueError, match="valid values: None, 'int8'"):
        relora_ds.wrap(tiny_model(), rank=4, quantize=bad)


class Linear8bitLt(nn.Linear):  # stands in for bitsandbytes' class (checked by module name)
    pass


Linear8bitLt.__module__ = "bitsandbytes.nn.modules"


class QuantLinear(nn.Module):  # stands in for auto_gptq's: no nn.Linear, packed weights in a qweight buffer
    def __init__(self, n):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(n // 8, n, dtype=torch.int32))


@pytest.mark.parametrize("quantize", ["int8", None])
@pytest.mark.parametrize("kind", ["class", "int8_weight", "quant_state", "gptq"])
def test_already_quantized_layers_refused(kind, quantize):
    """With quantize=None too (a review's find: an int8 weight failed in ReLoRALinear's constructor with
    torch's "Only Tensors of floating point ... can require gradients"), and for GPTQ/AWQ-style layers, which
    are no nn.Linear (they were "matched no nn.Linear layer", quantization unmentioned)."""
    model = tiny_model()
    attn = model.model.layers[0].self_attn
    if kind == "class":
        attn.q_proj = Linear8bitLt(64, 64, bias=False)
    elif kind == "int8_weight":
        attn.q_proj.weight = nn.Parameter(torch.zeros(64, 64, dtype=torch.int8), requires_grad=False)
    elif kind == "quant_state":
        attn.q_proj.weight.quant_state = object()
    else:
        for layer in model.model.layers:
            layer.self_attn.q_proj = QuantLinear(64)
    match = (r"q_proj'.* is already quantized by another library \(QuantLinear carries quantization state.*"
             if kind == "gptq" else r"q_proj' is already quantized by another library \(.*\); .*")
    match += "and pass quantize='int8'" if quantize else "for an 8-bit base pass quantize='int8'"
    with pytest.raises(ValueError, match=match):
        relora_ds.wrap(model, rank=4, quantize=quantize)


def test_foreign_quantization_names_libraries_by_whole_module_name_and_checks_the_weight_and_the_layer():
    """quant.foreign_quantization against hand-written expectations: a Linear subclass from a module that only
    begins like a listed library ("quantopt", "hqq_extras", "awqward") is the user's own layer, not refused;
    one from inside a listed library ("hqq.core.quantize") is. A plain nn.Linear whose weight is a float-dtype
    tensor subclass (torchao's quantized tensors) or whose module carries quantization state ('SCB' on the
    layer, as bitsandbytes keeps it) is refused. (A mutation audit found all three checks removable with every
    test passing.)"""
    def linear_from(module_name):
        cls = type("Layer", (nn.Linear,), {})
        cls.__module__ = module_name
        return cls(8, 4)

    for own in ("quantopt.layers", "hqq_extras", "awqward", "transformers.integrations_extra"):
        assert quant.foreign_quantization(linear_from(own)) is None, own
    assert quant.foreign_quantization(linear_from("hqq.core.quantize")) == (
        "its class hqq.core.quantize.Layer is a quantized linear layer")

    class Packed(torch.Tensor):  # a float-dtype tensor subclass, as torchao's quantized weights are
        pass

    linear = nn.Linear(8, 4)
    linear.weight = nn.Parameter(torch.randn(4, 8).as_subclass(Packed))
    assert quant.foreign_quantization(linear) == "its weight is a Packed tensor subclass"
    linear = nn.Linear(8, 4)
    linear.SCB = torch.ones(4)  # on the layer, not on its weight
    assert quant.foreign_quantization(linear) == "it carries quantization state ('SCB')"
    assert quant.foreign_quantization(nn.Linear(8, 4)) is None


def test_host_buffers_are_made_on_the_cpu_whatever_the_layers_device():
    """quant.host_device, hand-written: the merge residual lives in host memory for a layer built on any
    accelerator (a device that need not exist here: nothing is allocated), and on meta where a layer is built
    on meta. (A mutation audit found that returning the layer's own device passed every CPU test: only the
    multi-GPU int8 test would see the residual land on the GPU.)"""
    cpu = torch.device("cpu")
    assert quant.host_device("cuda") == quant.host_device(torch.device("cuda", 1)) == cpu
    assert quant.host_device("cpu") == quant.host_device() == cpu
    assert quant.host_device("meta") == torch.device("meta")
    with torch.device("meta"):
        assert quant.host_device() == torch.device("meta")


@pytest.mark.parametrize("kw", [{"quantize": "int8"}, {"merge_residual": True}])
def test_ddp_leaves_the_host_residuals_out_of_its_buffer_broadcasts(kw):
    """torch's DistributedDataParallel broadcasts a module's buffers from rank 0 (at construction, and at each
    forward with broadcast_buffers), which NCCL refuses for the host-memory residuals of a CUDA model (a review,
    by reading: the Trainer without DeepSpeed on several GPUs). wrap names them in
    _ddp_params_and_buffers_to_ignore: DDP's own list of what it syncs (one gloo rank here) holds every other
    buffer of the model, its int8 scales included, and none of them."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = relora_ds.wrap(LlamaForCausalLM(LlamaConfig.preset("debug")), rank=4, **kw)
    residuals = [b for name, b in model.named_buffers() if name.endswith(("weight_residual", "merge_residual"))]
    assert len(residuals) == 7 * model.config.num_hidden_layers
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        synced = {id(b) for b in DistributedDataParallel(model).modules_buffers}
    finally:
        dist.destroy_process_group()
    assert not synced & {id(b) for b in residuals}
    assert synced == {id(b) for b in model.buffers()} - {id(b) for b in residuals}
    bases = {id(b) for name, b in model.named_buffers() if name.endswith("weight_scale")}  # (weight_q: a parameter)
    assert len(bases) == (len(residuals) if "quantize" in kw else 0) and bases <= synced


def test_a_merge_under_ddp_gives_every_rank_rank_0s_host_residuals(tmp_path):
    """DDP copies rank 0's parameters and buffers to every rank but leaves the host residuals out (above), so
    ranks that built the model apart (seeded by rank, counting on DDP's broadcast as DDP scripts do) merged rank
    0's weights with their own residuals: after the first merge an int8 base's weight_q differed by up to 2
    steps, a bf16 base by one rounding step (a review). A merge given the DDP module broadcasts rank 0's first.
    Oracle: the run whose ranks all start from rank 0's seed; every tensor bit for bit on both ranks, int8 and
    bf16 with merge_residual (2 gloo ranks, 2 merges)."""
    run_ranks(ROOT / "tests/dist/ddp_host_buffers_worker.py", tmp_path, timeout=300)
    for kind in ("int8", "residual"):
        want = torch.load(tmp_path / f"same_{kind}_rank0.pt")
        for rank in (0, 1):
            got = torch.load(tmp_path / f"apart_{kind}_rank{rank}.pt")
            assert got.keys() == want.keys()
            differ = [k for k in want if not torch.equal(got[k], want[k])]
            assert not differ, (kind, rank, len(differ), differ[:4])
        assert any(k.endswith(("weight_residual", "merge_residual")) for k in want)


def test_dequantize_and_merge_use_the_whole_weight_they_are_given():
    """``q=``: FSDP2 passes the int8 weight gathered whole from its shards, which is not the layer's weight_q.
    dequantized(layer, q=q2) is q2 · scale (the exact fp32 product, by hand); merge_(layer, A, B, q=q2) writes
    into q2, leaving weight_q as it was, what a merge of an identical layer holding q2 as its own weight_q
    (the default path) writes. (A mutation audit found both functions could ignore q with every one-process
    test passing.)"""
    torch.manual_seed(0)
    layer = relora_ds.ReLoRALinear(96, 40, 4, quantize="int8")
    twin = relora_ds.ReLoRALinear(96, 40, 4, quantize="int8")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05, generator=g)
        q2 = torch.randint(-127, 128, layer.weight_q.shape, generator=g, dtype=torch.int8)
        twin.load_state_dict(layer.state_dict())
        twin.weight_q.copy_(q2)
    before, q2_before = layer.weight_q.clone(), q2.clone()
    assert torch.equal(quant.dequantized(layer, q=q2), q2.float() * layer.weight_scale.float()[:, None])
    quant.merge_(layer, layer.lora_A, layer.lora_B, q=q2)
    quant.merge_(twin, twin.lora_A, twin.lora_B)
    assert torch.equal(layer.weight_q, before) and not torch.equal(q2, q2_before)
    assert torch.equal(q2, twin.weight_q) and torch.equal(layer.weight_scale, twin.weight_scale)
    assert torch.equal(layer.weight_residual, twin.weight_residual)


def test_train_config_quantize_validation():
    from relora_ds.train_config import TrainConfig

    assert TrainConfig(cycle_length=10, total_steps=10, quantize="int8").quantize == "int8"
    with pytest.raises(ValueError, match="valid values"):
        TrainConfig(cycle_length=10, total_steps=10, quantize="int4")
    with pytest.raises(ValueError, match="mode=full"):
        TrainConfig(mode="full", total_steps=10, quantize="int8")


def test_frozen_bytes_at_most_052_of_bf16_for_every_preset():
    for name in relora_ds.PRESETS:
        cfg = LlamaConfig.preset(name)
        with torch.device("meta"):
            model = relora_ds.wrap(LlamaForCausalLM(cfg), rank=8)
        shapes = [(l.out_features, l.in_features) for _, l in relora_ds.relora_layers(model)]
        int8 = sum(quant.device_bytes(o, i, "int8") for o, i in shapes)
        bf16 = sum(quant.device_bytes(o, i, None) for o, i in shapes)
        assert int8 <= 0.52 * bf16, (name, int8 / bf16)


def _absmax_by_hand(w):
    """Per-row absmax int8 with a bf16 scale, rounding half up, and the residual's next 8 bits (254 per step)."""
    scale = (w.abs().amax(1) / 127).to(torch.bfloat16).float()
    v = w / scale[:, None]
    q = torch.floor(v + 0.5).clamp(-127, 127)
    return q, scale, torch.floor((v - q) * 254 + 0.5).clamp(-127, 127)


def test_int8_layer_load_keeps_the_initial_rounding_error_for_its_merges():
    """load_base_ stores W0's own rounding error in the residual, so merged weights track W0 + Σ s·B·A (the
    true weight, in fp64 here) within one rounding, not the int8 rounding of W0 plus one more per merge."""
    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(48, 96, generator=g) * 0.02
    layer = relora_ds.ReLoRALinear(96, 48, 4, quantize="int8")
    layer.load_base_(W0)
    q, scale, res = _absmax_by_hand(W0)
    assert torch.equal(layer.weight_q.float(), q) and torch.equal(layer.weight_scale.float(), scale)
    assert torch.equal(layer.weight_residual.float(), res)
    exact = W0.double()
    for _ in range(4):
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.05, generator=g)
        exact += layer.scale * (layer.lora_B.double() @ layer.lora_A.double())
        layer.merge_()
        q1, s1, _ = _absmax_by_hand(exact.float())
        assert rel(layer.base_weight(), exact) <= 1.05 * rel(q1 * s1[:, None], exact)


def test_device_bytes_are_the_int8_layers_device_tensors():
    assert quant.device_bytes(40, 96, None) == 2 * 40 * 96
    assert quant.device_bytes(40, 96, "int8") == 40 * 96 + 2 * 40  # int8 weight + one bf16 scale per row
    layer = relora_ds.ReLoRALinear(96, 40, 4, quantize="int8")
    on_device = sum(t.numel() * t.element_size() for t in (layer.weight_q, layer.weight_scale))
    assert quant.device_bytes(40, 96, "int8") == on_device


@pytest.mark.parametrize("cast", ["half", "float", "to_fp16", "double"])
def test_dtype_casts_keep_the_int8_scales_and_the_weight(cast):
    """model.half() (what DeepSpeed's fp16 engine does), .float(), .to(dtype) cast every float buffer: the
    int8 base's per-channel scales must stay bf16, or a row whose scale fp16 cannot hold changes (below 6e-5
    rounded, below 3e-8 zero: a review measured rows of std 1e-6 and 1e-7 lost entirely). Oracle: the
    dequantized weight before the cast, bitwise."""
    torch.manual_seed(0)
    layer = relora_ds.ReLoRALinear(64, 8, 4, quantize="int8")
    row_std = torch.tensor([1e-1, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7])
    layer.load_base_(torch.randn(8, 64) * row_std[:, None])
    before, scale = layer.base_weight().clone(), layer.weight_scale.clone()
    {"half": layer.half, "float": layer.float, "double": layer.double,
     "to_fp16": lambda: layer.to(torch.float16)}[cast]()
    assert layer.weight_scale.dtype == torch.bfloat16 and torch.equal(layer.weight_scale, scale)
    assert layer.weight_q.dtype == torch.int8 and layer.weight_residual.dtype == torch.int8
    assert torch.equal(layer.base_weight(), before) and (before[7] != 0).any()
    # the layer still runs and merges in the new dtype
    x = torch.randn(3, 64, dtype=layer.lora_A.dtype)
    assert layer(x).dtype == x.dtype
    layer.merge_(layer.lora_A.detach().float(), layer.lora_B.detach().float())
    assert layer.weight_scale.dtype == torch.bfloat16


@pytest.mark.parametrize("quantize", ["int8", None])
def test_load_base_refuses_a_wrong_shape_or_an_integer_weight(quantize):
    """copy_ broadcast a (in,) weight over every row, and an int8 weight_q was quantized as if its codes were
    weights (a review found it): both are named, the layer unchanged."""
    layer = relora_ds.ReLoRALinear(16, 4, 2, quantize=quantize)
    before = layer.base_weight().clone()
    for bad, what in ((torch.randn(16), "torch.float32 (16,)"), (torch.randn(16, 4), "torch.float32 (16, 4)"),
                      (torch.zeros(4, 16, dtype=torch.int8), "torch.int8 (4, 16)")):
        with pytest.raises(ValueError, match=re.escape(f"expected a float weight of shape (4, 16), got {what}")):
            layer.load_base_(bad)
    assert torch.equal(layer.base_weight(), before)
    layer.load_base_(torch.randn(4, 16, dtype=torch.float64))  # any float dtype is a weight
    assert not torch.equal(layer.base_weight(), before)


@pytest.mark.parametrize("kw", [dict(quantize="int8"), dict(merge_residual=True), {}])
def test_a_layer_built_on_meta_and_host_buffers_under_another_default_device(kw):
    """ReLoRALinear(..., device="meta") with its default init_base: an int8 layer crashed copying the meta
    weight's quantization into a CPU residual (a review found it). Host residuals follow meta, else the CPU,
    and to_empty makes them real host tensors; lora_A's draw is a CPU tensor under any default device
    (oracle: the same seeded draw outside the context)."""
    from relora_ds.relora import kaiming_uniform_A

    layer = relora_ds.ReLoRALinear(64, 8, 4, device="meta", **kw)
    assert all(t.is_meta for t in layer.parameters())
    assert all(b.is_meta for n, b in layer.named_buffers() if n.endswith("residual"))
    layer.to_empty(device="cpu")
    assert all(b.device.type == "cpu" for b in layer.buffers())
    with torch.device("meta"):
        drawn = kaiming_uniform_A((4, 64), seed=7)
    assert drawn.device.type == "cpu" and torch.equal(drawn, kaiming_uniform_A((4, 64), seed=7))
    assert drawn.abs().max() > 0


@pytest.mark.parametrize("kw", [dict(quantize="int8"), dict(merge_residual=True)])
def test_a_meta_built_model_materialized_with_to_empty_loads_its_host_residuals(kw):
    """Build on meta, to_empty, load_state_dict (the usual large-model load): the host residual buffers
    become real host tensors and take the checkpoint's values, so the next merge equals the source model's."""
    import relora_ds
    from relora_ds import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dtype = torch.float32 if kw.get("quantize") else torch.bfloat16  # a float base rounds only in bf16
    src = relora_ds.wrap(LlamaForCausalLM(LlamaConfig.preset("debug")).to(dtype), rank=4, **kw)
    with torch.no_grad():
        for _, layer in relora_ds.relora_layers(src):
            layer.lora_B.normal_(std=0.02)
    relora_ds.merge_and_reinit(src)  # a non-zero residual to carry over
    with torch.device("meta"):
        dst = relora_ds.wrap(LlamaForCausalLM(LlamaConfig.preset("debug")).to(dtype), rank=4, **kw)
    dst.to_empty(device="cpu")
    dst.load_state_dict(src.state_dict())
    name = "weight_residual" if kw.get("quantize") else "merge_residual"
    for (_, a), (_, b) in zip(relora_ds.relora_layers(src), relora_ds.relora_layers(dst)):
        assert getattr(b, name).device.type == "cpu"
        assert torch.equal(getattr(a, name), getattr(b, name)) and getattr(a, name).abs().sum() > 0
    with torch.no_grad():
        for (_, a), (_, b) in zip(relora_ds.relora_layers(src), relora_ds.relora_layers(dst)):
            a.lora_B.normal_(std=0.02)
            b.lora_B.copy_(a.lora_B)
    relora_ds.merge_and_reinit(src)
    relora_ds.merge_and_reinit(dst)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


@pytest.mark.parametrize("amp", ["fp32", "autocast_bf16", "bf16_x_fp32_masters"])
@pytest.mark.parametrize("mode", ["reference", "torch", "triton"])
def test_int8_layer_computes_the_float_formula_on_its_dequantized_base(monkeypatch, mode, amp):
    """An int8 layer with a bias and nonzero LoRA factors, on each path (Triton interpreted), against
    y = x·Ŵᵀ + bias + s·(x·Aᵀ)·Bᵀ in fp64 on the dequantized base Ŵ, with every gradient. A review found the
    int8 bias and int8 autocast unchecked (dropping the bias, or the autocast cast, passed every test: the
    biases of a fresh Hugging Face model are zero). Under autocast the output is bf16 and the parameters'
    gradients keep their fp32 dtype, as for F.linear; bf16 activations with fp32 masters (what a bf16
    model's ReLoRA layers see) run too."""
    import torch.nn.functional as F

    monkeypatch.setenv("RELORA_KERNELS", mode)
    if mode == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(5)
    layer = relora_ds.ReLoRALinear(40, 24, rank=4, bias=True, quantize="int8", name="l").eval()
    with torch.no_grad():
        layer.load_base_(torch.randn(24, 40, generator=g) * 0.2)
        layer.bias.copy_(torch.randn(24, generator=g))
        layer.lora_A.copy_(torch.randn(4, 40, generator=g) * 0.3)
        layer.lora_B.copy_(torch.randn(24, 4, generator=g) * 0.3)
    x = torch.randn(3, 7, 40, generator=g)
    dy = torch.randn(3, 7, 24, generator=g)
    params = (layer.lora_A, layer.lora_B, layer.bias)

    xd = x.double().requires_grad_()
    a, b, bias = (p.detach().double().requires_grad_() for p in params)
    want = F.linear(xd, layer.base_weight().double(), bias) + layer.scale * (xd @ a.t()) @ b.t()
    want_grads = torch.autograd.grad(want, (xd, a, b, bias), dy.double())

    xin = (x.bfloat16() if amp == "bf16_x_fp32_masters" else x).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp != "fp32"):
        y = layer(xin)
    grads = torch.autograd.grad(y, (xin, *params), dy.to(y.dtype))
    low = amp != "fp32"
    assert y.dtype == (torch.bfloat16 if low else torch.float32)
    assert [t.dtype for t in grads] == [xin.dtype] + [torch.float32] * 3
    bound = 2e-2 if low else 1e-5
    for name, got, ref in zip(("y", "dx", "dA", "dB", "dbias"), (y, *grads), (want, *want_grads)):
        assert rel(got, ref) < bound, (name, rel(got, ref))


def test_the_gathered_state_holds_the_state_dicts_tensors_with_frozen_floats_as_fp32():
    """full_fp32_state_dict outside an engine (its parameters are the masters): exactly the keys of the module's
    state_dict (a non-persistent buffer, as rotary tables are, left out), a frozen bf16 weight as fp32 of the
    same values, a persistent integer buffer as it is; keep=False holds nothing."""
    from types import SimpleNamespace

    from relora_ds.engine_state import full_fp32_state_dict

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.base = nn.Parameter(torch.tensor([1.5, -2.25], dtype=torch.bfloat16), requires_grad=False)
            self.register_buffer("count", torch.tensor(3))
            self.register_buffer("table", torch.zeros(4), persistent=False)
    model = Model()
    state = full_fp32_state_dict(SimpleNamespace(module=model))
    assert set(state) == set(model.state_dict()) == {"lin.weight", "lin.bias", "base", "count"}
    assert state["base"].dtype == torch.float32 and state["base"].tolist() == [1.5, -2.25]
    assert state["count"].dtype == torch.int64 and int(state["count"]) == 3
    assert torch.equal(state["lin.weight"], model.lin.weight)
    assert full_fp32_state_dict(SimpleNamespace(module=model), keep=False) == {}


def test_an_int8_layer_leaves_an_integer_weight_unexpected():
    """A replaced layer's state whose weight is an integer tensor (another library's int8 codes) is no float
    base: it stays an unexpected key and weight_q is unchanged (a mutation audit: quantizing it as numbers
    raised from inside the quantizer instead)."""
    layer = relora_ds.ReLoRALinear(8, 8, 2, quantize="int8")
    before = layer.weight_q.clone()
    res = layer.load_state_dict({"weight": torch.randint(-127, 128, (8, 8), dtype=torch.int8)}, strict=False)
    assert "weight" in res.unexpected_keys and torch.equal(layer.weight_q, before), res
