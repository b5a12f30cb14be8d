"""ReLoRA layer, wrap/unwrap and merge-and-reinit against plain-torch oracles."""
import copy
import hashlib
import math

import pytest
import torch
import transformers
from torch import nn

import relora_ds
from relora_ds import LlamaConfig, LlamaForCausalLM, ReLoRALinear
from relora_ds.targets import DEFAULT_TARGET_MODULES


def _debug_model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig.preset("debug"))


def _hf_model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("make", [_debug_model, _hf_model], ids=["ours", "hf"])
def test_wrap_keeps_outputs_and_converts_every_projection(make):
    model = make().eval()
    x = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        before = model(x).logits
    relora_ds.wrap(model, rank=8)
    with torch.no_grad():
        after = model(x).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)  # B = 0: exactly the base model
    layers = dict(relora_ds.relora_layers(model))
    llama = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(layers) == 2 * len(llama)
    assert {n.rsplit(".", 1)[1] for n in layers} == llama
    assert all(not l.weight.requires_grad for l in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in trainable) and "lm_head.weight" in trainable
    assert any("norm" in n for n in trainable)
    assert len(relora_ds.lora_parameters(model)) == 2 * len(layers)


def test_lora_gets_gradients_first_backward_and_both_after_one_step():
    model = relora_ds.wrap(_debug_model(), rank=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 512, (2, 16))
    model(x, labels=x).loss.backward()
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_B.grad.abs().sum() > 0  # A ≠ 0 so B learns at once
    assert layer.lora_A.grad.abs().sum() == 0  # B = 0 so A's gradient is exactly zero at first
    assert layer.weight.grad is None
    opt.step()
    opt.zero_grad()
    model(x, labels=x).loss.backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


def test_target_modules_by_suffix_and_errors():
    model = relora_ds.wrap(_debug_model(), rank=4, target_modules=["q_proj", "v_proj"])
    names = [n for n, _ in relora_ds.relora_layers(model)]
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    with pytest.raises(ValueError, match="only once"):
        relora_ds.wrap(model)
    with pytest.raises(ValueError, match=r"matched no linear layer.*'q_proj'"):
        relora_ds.wrap(_debug_model(), target_modules=["query"])
    # A typo next to valid names is an error too: it would silently leave v_proj a plain full-rank linear.
    with pytest.raises(ValueError, match=r"target_modules \['v_prj'\] matched no linear layer .*'v_proj'"):
        relora_ds.wrap(_debug_model(), target_modules=["q_proj", "v_prj"])
    with pytest.raises(ValueError, match=r"layer model.layers.0.self_attn.q_proj: rank=65"):
        relora_ds.wrap(_debug_model(), rank=65)
    with pytest.raises(ValueError, match="rank=0"):
        relora_ds.wrap(_debug_model(), rank=0)
    # Our output layer trains full-rank (and its chunked loss needs the plain layer); a tied weight would
    # silently untie (an HF model with tie_word_embeddings: updates to the embedding would miss lm_head).
    refused = "'lm_head', which no ReLoRA layer can replace: relora_ds's output layer"
    with pytest.raises(ValueError, match=refused):
        relora_ds.wrap(_debug_model(), rank=4, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match=refused):  # the trainer's start-up check
        relora_ds.targets.target_linears(_debug_model(), ["q_proj", "lm_head"])
    tied = _hf_model()
    tied.lm_head.weight = tied.model.embed_tokens.weight
    with pytest.raises(ValueError, match=r"'lm_head', which no ReLoRA layer can replace: its weight is tied to \['model.embed_tokens.weight'\]"):
        relora_ds.wrap(tied, rank=4, target_modules=["lm_head"])


def test_layer_forward_matches_formula_with_bias_and_dropout():
    torch.manual_seed(0)
    layer = ReLoRALinear(12, 7, rank=3, alpha=6, dropout=0.3, bias=True, name="l")
    with torch.no_grad():
        layer.weight.normal_(), layer.bias.normal_(), layer.lora_B.normal_()
    x = torch.randn(4, 5, 12)
    layer.eval()
    ref = x @ layer.weight.T + layer.bias + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), ref)
    layer.train()
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    # by hand: keep where an fp32 uniform draw is >= p, scale the kept by 1/(1-p) (p = 0.3: a mask or a scale
    # written with p for 1-p is another result; at 0.5 both were the same)
    keep = torch.rand(x.shape, dtype=torch.float32) >= 0.3
    x_d = x * keep.float() / 0.7
    assert 0.2 < (x_d == 0).float().mean() < 0.4
    torch.testing.assert_close(y, x @ layer.weight.T + layer.bias + 2.0 * (x_d @ layer.lora_A.T) @ layer.lora_B.T)


def test_biases_train_full_rank_as_before_wrap():
    """A wrapped linear's bias keeps training (the reference code's ReLoRA does too): same bias gradients as
    the unwrapped model while B = 0, no gradient for the frozen W; a bias frozen before wrap stays frozen,
    and unwrap gives each back as it was."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True)
    plain = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # fresh HF biases are zero
    plain.model.layers[1].mlp.up_proj.bias.requires_grad_(False)
    wrapped = relora_ds.wrap(copy.deepcopy(plain), rank=4)
    x = torch.randint(0, 256, (2, 9))
    plain(x, labels=x).loss.backward()
    wrapped(x, labels=x).loss.backward()
    plain_linears = dict(plain.named_modules())
    layers = list(relora_ds.relora_layers(wrapped))
    assert len(layers) == 2 * 7
    for name, layer in layers:
        ref = plain_linears[name].bias
        assert layer.bias.requires_grad == ref.requires_grad
        assert layer.weight.grad is None and layer.lora_B.grad is not None
        if ref.requires_grad:
            torch.testing.assert_close(layer.bias.grad, ref.grad, atol=1e-6, rtol=1e-5)
            assert ref.grad.abs().sum() > 0
        else:
            assert layer.bias.grad is None
    relora_ds.unwrap(wrapped)
    assert not wrapped.model.layers[1].mlp.up_proj.bias.requires_grad
    assert wrapped.model.layers[0].mlp.up_proj.bias.requires_grad
    assert all(p.requires_grad for n, p in wrapped.named_parameters() if n.endswith("proj.weight"))


def _documented_A(run_seed, layer_name, restart, shape):
    """Hand-written oracle of the documented re-init draw (relora_ds.relora.reinit_seed and
    kaiming_uniform_A, written out, not called): the first 8 bytes (little-endian, 63 bits) of
    sha256("run_seed/layer_name/restart") seed a CPU generator for nn.init.kaiming_uniform_(a=√5) in fp32."""
    digest = hashlib.sha256(f"{run_seed}/{layer_name}/{restart}".encode()).digest()
    g = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.float32), a=math.sqrt(5), generator=g)


def test_merge_and_reinit_keeps_outputs_redraws_A_zeroes_B_and_ranks_agree():
    """wrap draws A for restart 0, and the k-th merge redraws it for restart k (merge_count counts the merge
    before A is drawn: the ZeRO path, zero_reset.merge_and_reinit_engine, draws with the new count too, and
    tests/dist/zero_reset_worker.py pins it to restart 1 after one merge). Oracle: `_documented_A`."""
    model = relora_ds.wrap(_debug_model(), rank=4, seed=7).eval()
    layers = list(relora_ds.relora_layers(model))
    for n, l in layers:
        assert torch.equal(l.lora_A, _documented_A(7, n, 0, l.lora_A.shape)), n  # the initial draw: restart 0
    initial_A = {n: l.lora_A.detach().clone() for n, l in layers}
    with torch.no_grad():
        for p in relora_ds.lora_parameters(model):
            p.normal_(0, 0.05)
    x = torch.randint(0, 512, (2, 13))
    with torch.no_grad():
        before = model(x).logits
    stats = relora_ds.merge_and_reinit(model)
    assert stats["layers"] == 14
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, atol=1e-5, rtol=1e-5)
    # A second "rank": the same model built from the same seeds, merged independently.
    other = relora_ds.wrap(_debug_model(), rank=4, seed=7)
    relora_ds.merge_and_reinit(other)
    for (n, l), (_, l2) in zip(layers, relora_ds.relora_layers(other)):
        assert int(l.merge_count) == 1
        assert torch.equal(l.lora_A, _documented_A(7, n, 1, l.lora_A.shape)), n  # restart 1's draw...
        assert not torch.equal(l.lora_A, initial_A[n]), n  # ...not the initial A drawn again
        assert torch.count_nonzero(l.lora_B) == 0
        assert torch.equal(l.lora_A, l2.lora_A)
        bound = 1 / l.in_features ** 0.5
        assert l.lora_A.abs().max() <= bound and l.lora_A.std() > bound / 3  # Kaiming-uniform(a=√5)
    # Distinct layers and distinct restarts draw distinct A; the second merge draws restart 2's.
    a0 = model.model.layers[0].self_attn.q_proj.lora_A.clone()
    assert not torch.equal(a0, model.model.layers[1].self_attn.q_proj.lora_A)
    relora_ds.merge_and_reinit(model)
    assert not torch.equal(a0, model.model.layers[0].self_attn.q_proj.lora_A)
    for n, l in layers:
        assert int(l.merge_count) == 2 and torch.equal(l.lora_A, _documented_A(7, n, 2, l.lora_A.shape)), n


def test_restarts_accumulate_rank():
    """Paper Eq. 2: k merges of rank-r updates give rank(W − W0) = k·r > r."""
    torch.manual_seed(0)
    # float64 so that merge rounding stays far below matrix_rank's default tolerance
    layer = ReLoRALinear(48, 40, rank=3, name="layer", dtype=torch.float64)
    w0 = layer.weight.detach().clone()
    k = 4
    for _ in range(k):
        with torch.no_grad():
            layer.lora_B.normal_()
        layer.merge_()
        layer.merge_count += 1
        layer.reset_lora(int(layer.merge_count))
    assert torch.linalg.matrix_rank(layer.weight - w0) == k * 3 > 3


def test_unwrap_restores_plain_linear_with_merged_weight():
    model = relora_ds.wrap(_debug_model(), rank=4).eval()
    with torch.no_grad():
        for p in relora_ds.lora_parameters(model):
            p.normal_(0, 0.05)
    x = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        before = model(x).logits
    relora_ds.unwrap(model)
    assert not list(relora_ds.relora_layers(model))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert model.model.layers[0].mlp.down_proj.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, atol=1e-5, rtol=1e-5)
    # A projection frozen before wrap comes back frozen.
    frozen = _debug_model()
    frozen.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    relora_ds.unwrap(relora_ds.wrap(frozen, rank=4))
    assert not frozen.model.layers[0].mlp.up_proj.weight.requires_grad
    assert frozen.model.layers[1].mlp.up_proj.weight.requires_grad


def test_bf16_merge_is_computed_in_fp32():
    torch.manual_seed(0)
    layer = ReLoRALinear(64, 32, rank=8, name="l", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.normal_(), layer.lora_B.normal_(0, 0.01)
    expected = (layer.weight.float() + layer.scale * layer.lora_B.float() @ layer.lora_A.float()).bfloat16()
    layer.merge_()
    assert torch.equal(layer.weight, expected)


def test_same_outputs_as_peft_lora_with_the_same_factors():
    """PEFT's LoRA is the oracle: identical A, B, alpha and rank must give identical logits."""
    import copy

    import peft

    base = _hf_model(seed=3).eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(DEFAULT_TARGET_MODULES))).eval()
    ours = relora_ds.wrap(copy.deepcopy(base), rank=4, alpha=8).eval()
    g = torch.Generator().manual_seed(0)
    for name, layer in relora_ds.relora_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            a = torch.randn(layer.lora_A.shape, generator=g) * 0.1
            b = torch.randn(layer.lora_B.shape, generator=g) * 0.1
            layer.lora_A.copy_(a), layer.lora_B.copy_(b)
            peft_layer.lora_A["default"].weight.copy_(a), peft_layer.lora_B["default"].weight.copy_(b)
    x = torch.randint(0, 256, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-5, rtol=1e-5)
        assert (ours(x).logits - base(x).logits).abs().max() > 1e-3  # the LoRA path really contributed


@pytest.mark.parametrize("num_layers", [None, 1])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_same_loss_and_grads_with_recompute(monkeypatch, dropout, num_layers):
    """gradient_checkpointing_enable(): each decoder layer runs again in backward (recompute), the loss equals
    the plain run's bit for bit and every gradient within 1e-5 (oracle: the same model without checkpointing),
    LoRA dropout included (the RNG state is restored for the recompute). num_layers=1: only the first layer
    runs again."""
    from relora_ds.model import DecoderLayer
    calls = []
    real = DecoderLayer.forward
    monkeypatch.setattr(DecoderLayer, "forward", lambda self, *a: calls.append(self) or real(self, *a))
    batch = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    results = []
    for ckpt in (False, True):
        model = relora_ds.wrap(_debug_model(), rank=4, dropout=dropout)
        with torch.no_grad():
            for _, layer in relora_ds.relora_layers(model):
                layer.lora_B.normal_(0, 0.05)  # a live low-rank branch (B = 0 would hide dropout)
        if ckpt:
            model.gradient_checkpointing_enable(num_layers=num_layers)
        calls.clear()
        torch.manual_seed(123)  # the same dropout masks in both runs
        loss = model(batch, labels=batch).loss
        loss.backward()
        n_layers = model.config.num_hidden_layers
        order = [list(model.model.layers).index(layer) for layer in calls]  # the forward's, then backward's recomputes
        recomputed = list(reversed(range(num_layers or n_layers))) if ckpt else []
        assert n_layers > 1 and order == list(range(n_layers)) + recomputed, order
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1) and g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-7), n
    with torch.no_grad():  # no recompute (and no checkpoint) outside autograd
        calls.clear()
        model(batch)
        assert len(calls) == model.config.num_hidden_layers
    model.gradient_checkpointing_disable()  # no recompute after it (a mutation trial's no-op passed the rest)
    calls.clear()
    model(batch, labels=batch).loss.backward()
    assert len(calls) == model.config.num_hidden_layers


def test_activation_checkpointing_layers_are_checked():
    model = _debug_model()
    n = model.config.num_hidden_layers
    for bad in (0, n + 1, True, 1.5):
        with pytest.raises(ValueError, match=rf"num_layers must be a number of decoder layers from 1 to {n} \(or "
                                             rf"None: all\), got {bad!r}"):
            model.gradient_checkpointing_enable(num_layers=bad)
    for good in (1, n):  # both ends of the range the message names (a mutation trial refused n)
        model.gradient_checkpointing_enable(num_layers=good)
        assert model.model.gradient_checkpointing and model.model.checkpoint_layers == good


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_merges_of_a_zero_update_leave_a_base_with_merge_residual_as_it_was(dtype):
    """B = 0 (a fresh layer): each merge adds nothing, so W and the residual stay exactly as they were. An
    fp64 base drifted by 5.6e-9 in three merges: its residual was taken against base.float(), W's own fp32
    rounding error, which the next merge added in (a mutation trial's find)."""
    torch.manual_seed(0)
    layer = ReLoRALinear(64, 32, rank=4, name="l", dtype=dtype, merge_residual=True)
    w0 = layer.weight.detach().clone()
    for _ in range(3):
        layer.merge_()
    assert torch.equal(layer.weight, w0) and not layer.merge_residual.any()


def test_merge_residual_keeps_frequent_small_bf16_merges():
    """100 merges of small updates (0.1% of the weights' std each) into a bf16 base: rounding each result
    to bf16 loses most of them; with merge_residual (error feedback) the weight stays within one bf16
    rounding of the exactly accumulated one (fp64 oracle)."""
    torch.manual_seed(0)
    W0 = torch.randn(64, 48).bfloat16()

    def run(residual: bool):
        layer = ReLoRALinear(48, 64, rank=4, alpha=4, merge_residual=residual, dtype=torch.bfloat16)
        layer.load_base_(W0)
        exact, g = W0.double(), torch.Generator().manual_seed(1)
        for _ in range(100):
            A, B = torch.randn(4, 48, generator=g), torch.randn(64, 4, generator=g) * 5e-4  # fp32 masters
            layer.merge_(A, B)
            exact = exact + layer.scale * (B.double() @ A.double())
        return layer, exact

    plain, exact = run(False)
    fed, exact_again = run(True)
    assert torch.equal(exact, exact_again)
    update = (exact - W0.double()).norm()
    one_rounding = (exact.bfloat16().double() - exact).norm() / update
    lost = (plain.weight.double() - exact).norm() / update
    kept = (fed.weight.double() - exact).norm() / update
    assert lost > 0.3 and kept <= 1.1 * one_rounding, (lost, kept, one_rounding)
    assert fed.merge_residual.dtype == torch.bfloat16 and fed.merge_residual.abs().max() > 0
    fed.to(torch.float32)  # a dtype/device move (DeepSpeed's bf16 cast, .cuda()) leaves the residual alone
    assert fed.merge_residual.dtype == torch.bfloat16 and fed.merge_residual.device.type == "cpu"
    with pytest.raises(ValueError, match="merge_residual is for float bases"):
        ReLoRALinear(48, 64, rank=4, quantize="int8", merge_residual=True)


def test_merge_and_reinit_sends_any_zero_engine_to_the_zero_path(monkeypatch):
    import relora_ds.zero_reset as zero_reset

    class PipelineEngine(nn.Module):  # a DeepSpeedEngine subclass by another name
        def __init__(self, module):
            super().__init__()
            self.module = module

        def zero_optimization_stage(self):
            return 2

    torch.manual_seed(0)
    engine = PipelineEngine(relora_ds.wrap(relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("debug")), rank=4))
    calls = []
    monkeypatch.setattr(zero_reset, "merge_and_reinit_engine", lambda e: calls.append(e) or {"layers": -1})
    assert relora_ds.merge_and_reinit(engine) == {"layers": -1} and calls == [engine]
    assert all(int(l.merge_count) == 0 for _, l in relora_ds.relora_layers(engine))  # nothing merged locally


class _Phi3LikeMLP(nn.Module):  # Phi-3 names: gate_up_proj / qkv_proj next to LLaMA's up_proj / v_proj
    def __init__(self):
        super().__init__()
        self.gate_up_proj, self.up_proj = nn.Linear(8, 16), nn.Linear(8, 8)
        self.qkv_proj, self.v_proj = nn.Linear(8, 24), nn.Linear(8, 8)


def test_target_suffix_matches_whole_dotted_components_only():
    model = nn.Module()
    model.mlp = _Phi3LikeMLP()
    relora_ds.wrap(model, rank=2, target_modules=["up_proj", "v_proj"])
    assert [n for n, _ in relora_ds.relora_layers(model)] == ["mlp.up_proj", "mlp.v_proj"]
    assert type(model.mlp.gate_up_proj) is nn.Linear and type(model.mlp.qkv_proj) is nn.Linear
    other = nn.Module()
    other.mlp = _Phi3LikeMLP()
    with pytest.raises(ValueError, match="matched no linear layer"):
        relora_ds.wrap(other, rank=2, target_modules=["proj"])  # a partial name selects nothing


def test_rank_may_equal_the_smaller_dimension():
    layer = ReLoRALinear(8, 6, rank=6, alpha=6)
    assert layer.lora_A.shape == (6, 8) and layer.lora_B.shape == (6, 6) and layer.scale == 1.0
    with pytest.raises(ValueError, match="rank=7"):
        ReLoRALinear(8, 6, rank=7)


@pytest.mark.parametrize("masters", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_layer_merge_on_the_triton_path(monkeypatch, dtype, masters):
    """ReLoRALinear.merge_ on the Triton path (interpreted; what `auto` runs for every float-base merge on
    CUDA, ZeRO's fp32 masters passed as A and B): the kernel runs (spied), with the layer's scale, and W
    becomes round(W + s·B·A) with fp32 accumulation; an fp64 layer stays on the torch merge, in fp64 also
    with fp32 masters (it computed their product in fp32). A review found this branch never ran in a CPU
    test (passing alpha for scale went unnoticed)."""
    import relora_kernels.merge as kmerge

    monkeypatch.setenv("RELORA_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    launched = []
    real = kmerge.merge_launch
    monkeypatch.setattr(kmerge, "merge_launch", lambda *a, **kw: launched.append(a) or real(*a, **kw))
    g = torch.Generator().manual_seed(2)
    layer = ReLoRALinear(70, 45, rank=5, alpha=16, name="l", dtype=dtype)  # scale 3.2: alpha would be 16
    with torch.no_grad():
        layer.weight.copy_(torch.randn(45, 70, generator=g))
        layer.lora_B.copy_(torch.randn(45, 5, generator=g) * 0.1)
    A, B = layer.lora_A.detach().float().clone(), layer.lora_B.detach().float().clone()
    exact = layer.weight.double() + layer.scale * B.double() @ A.double()
    w0 = layer.weight.detach().clone()
    layer.merge_(A, B) if masters else layer.merge_()
    assert len(launched) == (0 if dtype == torch.float64 else 1)
    got = layer.weight.detach().double()
    if dtype == torch.float64:
        torch.testing.assert_close(got, exact, rtol=1e-12, atol=0)
        return
    # fp32 accumulation (the rank-5 dot and the add: at most (r + 2) fp32 roundings of |W| + s·|B|·|A|), then
    # one rounding to W's dtype (1 ulp); a wrong scale (alpha for alpha/r) moves W by ~1e-1.
    bound = torch.finfo(dtype).eps * exact.abs() + 7 * torch.finfo(torch.float32).eps * (
        w0.double().abs() + layer.scale * B.double().abs() @ A.double().abs())
    assert ((got - exact).abs() <= bound).all()
    assert not torch.equal(layer.weight, w0)
