"""relora_ds.wrap / unwrap / merge_and_reinit / prune_optimizer_state on the models and optimizers a user
brings: Hugging Face architectures, eval mode, mixed dtypes, bad settings, DeepSpeed objects passed in the
wrong place (found by a test-drive, 2026-12-01). The layer and the conversion themselves: test_relora.py."""
import copy
import math
import re

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


def test_merged_weight_and_the_merged_state_dict_keep_the_base_dtype_with_fp32_masters():
    """merged_weight() (what relora_ds.hf.merged_state_dict and so export_hf write) defaults to the base
    weight's dtype, not the factors': a bf16 model with fp32 LoRA masters exports round_bf16(W + s·B·A),
    summed in fp32, as bf16 like every other tensor (fp32 would double those layers and mix dtypes)."""
    from relora_ds.hf import merged_state_dict
    model = relora_ds.wrap(_tiny_llama().to(torch.bfloat16), rank=4)
    g = torch.Generator().manual_seed(0)
    for _, l in relora_ds.relora_layers(model):
        l.lora_A.data = l.lora_A.data.float()
        l.lora_B.data = torch.randn(l.lora_B.shape, generator=g) * 0.1
    layer = model.model.layers[0].self_attn.q_proj
    want = (layer.weight.float() + layer.scale * layer.lora_B.data @ layer.lora_A.data).to(torch.bfloat16)
    got = layer.merged_weight()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert layer.merged_weight(torch.float32).dtype == torch.float32  # an explicit dtype still wins
    state = merged_state_dict(model)
    assert torch.equal(state["model.layers.0.self_attn.q_proj.weight"], want)
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.bfloat16}


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
    the order. A LoRA factor the user froze (no optimizer state: it never trains) is named as frozen, not as a
    late wrap (ZeRO-2) or a master-less partition (ZeRO-3), nor merged as if trained (stage 0). One process of
    its own (DeepSpeed's process group), ZeRO stages 0, 2 and 3 in turn."""
    import subprocess
    import sys

    from launch_utils import ROOT, free_port, launch_env
    env = {**launch_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(ROOT / "tests/dist/late_wrap_worker.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("stage", "frozen"))]
    assert lines == ["stage 0: wrap(engine) refused", "stage 0: merge refused", "stage 0: prune refused",
                     "stage 2: wrap(engine) refused", "stage 2: wrap(engine.module) refused",
                     "stage 3: wrap(engine) refused", "stage 3: merge refused", "stage 3: prune refused",
                     "frozen stage 0: refused", "frozen stage 2: refused", "frozen stage 3: refused"]
    assert "accumulation: merge warned" in proc.stdout  # a merge inside a gradient accumulation is named


def test_prune_names_a_model_or_module_passed_in_the_wrong_place():
    model = relora_ds.wrap(_tiny_llama(), rank=4)
    opt = torch.optim.AdamW(relora_ds.lora_parameters(model))
    with pytest.raises(ValueError, match=r"first argument is the model \(LlamaForCausalLM\); pass the optimizer"):
        relora_ds.prune_optimizer_state(model, relora_ds.lora_parameters(model))
    with pytest.raises(ValueError, match=r"params is a module .*relora_ds.lora_parameters\(model\)"):
        relora_ds.prune_optimizer_state(opt, model)


def test_prune_names_the_engine_when_given_deepspeeds_optimizer_wrapper():
    """engine.optimizer (DeepSpeed's fp16/ZeRO wrappers, whose moments live with the fp32 masters) passed to
    prune_optimizer_state is refused naming the engine as what to pass, before any state is read (bare
    instances: their class is what is checked, as for the FSDP1 refusal)."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    params = relora_ds.lora_parameters(relora_ds.wrap(_tiny_llama(), rank=4))
    for cls in (FP16_Optimizer, DeepSpeedZeroOptimizer):
        with pytest.raises(ValueError, match=rf"got DeepSpeed's {cls.__name__}; pass the engine itself"):
            relora_ds.prune_optimizer_state(cls.__new__(cls), params)


def test_merging_a_model_without_relora_layers_says_to_wrap_it_first():
    """merge_and_reinit of a plain model (wrap forgotten, or after unwrap) is a ValueError naming wrap."""
    for model in (_tiny_llama(), relora_ds.unwrap(relora_ds.wrap(_tiny_llama(), rank=4))):
        with pytest.raises(ValueError, match=r"no ReLoRALinear layers \(call relora_ds.wrap first\)"):
            relora_ds.merge_and_reinit(model)
    opt = torch.optim.AdamW(relora_ds.wrap(_tiny_llama(), rank=4).parameters())  # (an AttributeError of AdamW's)
    with pytest.raises(ValueError, match=r"got a torch.optim.adamw.AdamW; pass the wrapped model .*the optimizer goes "
                                         r"to relora_ds.prune_optimizer_state"):
        relora_ds.merge_and_reinit(opt)


def test_deepspeeds_engine_subclasses_are_engines_everywhere():
    """wrap checked the class name DeepSpeedEngine and unwrap its subclasses too (a review): the hybrid and
    pipeline engines (DeepSpeed's own subclasses, built here without their __init__) are refused by wrap and
    unwrap, as the engine is."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.hybrid_engine import DeepSpeedHybridEngine
    from deepspeed.runtime.pipe.engine import PipelineEngine

    for cls in (DeepSpeedEngine, DeepSpeedHybridEngine, PipelineEngine):
        engine = cls.__new__(cls)
        nn.Module.__init__(engine)
        with pytest.raises(ValueError, match=r"wrap: the model is already in a DeepSpeed engine"):
            relora_ds.wrap(engine, rank=4)
        with pytest.raises(ValueError, match=r"unwrap: the model's parameters are managed by a DeepSpeed engine"):
            relora_ds.unwrap(engine)


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



@pytest.mark.parametrize("quantize", [None, "int8"])
def test_merging_factors_of_the_wrong_shape_names_the_expected_shapes_and_changes_nothing(quantize):
    """ReLoRALinear.merge_(A, B) with factors of another layer's shape: a clear error naming the shapes this
    layer takes (it was a broadcasting RuntimeError from the merge statistics), the weights untouched; factors
    of another rank than the layer's merge as their product says."""
    layer = relora_ds.ReLoRALinear(16, 12, 4, quantize=quantize)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for A, B in ((torch.randn(5, 16), torch.randn(12, 4)), (torch.randn(4, 12), torch.randn(12, 4)),
                 (torch.randn(4, 16), torch.randn(16, 4)), (torch.randn(16), torch.randn(12, 1))):
        with pytest.raises(ValueError, match=rf"merge_: expected A \(r, 16\) and B \(12, r\) for this 12x16 layer; "
                                             rf"got A {re.escape(str(tuple(A.shape)))} and B"):
            layer.merge_(A, B)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    A, B = torch.randn(2, 16), torch.randn(12, 2) * 0.1  # rank 2 into a rank-4 layer
    base = layer.base_weight().float()
    old_step = layer.weight_scale.float()[:, None].clone() if quantize else None
    want = base + layer.scale * (B @ A)
    layer.merge_(A, B)
    if quantize is None:  # fp32: the sum itself (the torch path's order: s·(B·A) added once)
        torch.testing.assert_close(layer.base_weight(), want, rtol=1e-6, atol=1e-6)
    else:  # int8: the new rounding (half a step of the new row scale) and the residual the merge added back,
        # what the old rounding dropped (at most half an old step)
        bound = 0.5 * layer.weight_scale.float()[:, None] + 0.5 * old_step + 1e-6
        assert bool(((layer.base_weight().float() - want).abs() <= bound).all())
