"""Review of activation checkpointing (relora_ds/checkpointing.py) and --compile (relora_ds/compiling.py) on CPU.

Oracles: the same model without checkpointing, or eager (bit for bit: on CPU fp32 the checkpointed and the compiled
aot_eager step run the same kernels on the same inputs, the LoRA dropout masks redrawn from the restored RNG); for
the start-up check of --compile-backend, torch itself compiling with the backend.
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import relora_ds
from relora_ds import checkpointing
from relora_ds.compiling import cache_entries, compile_problem, compile_stats


def _own_model(dropout=0.0, quantize=None):
    torch.manual_seed(0)
    model = relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("debug"))
    return _live(relora_ds.wrap(model, rank=4, dropout=dropout, quantize=quantize))


def _live(model):
    """Nonzero biases (a bias kept or added twice shows) and B (lora_A's gradient, the dropout)."""
    with torch.no_grad():
        for m in model.modules():
            bias = getattr(m, "bias", None)
            if isinstance(bias, torch.nn.Parameter) and bias.requires_grad:
                bias.normal_(0, 0.3)
        for _, layer in relora_ds.relora_layers(model):
            layer.lora_B.normal_(0, 0.05)
    return model.train()


def _hf_model(kind, dropout, quantize):
    import transformers

    torch.manual_seed(0)
    if kind == "llama":  # GQA, attention biases
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                       attn_implementation="sdpa")
        model = relora_ds.wrap(transformers.LlamaForCausalLM(cfg), rank=4, dropout=dropout, quantize=quantize)
    else:  # Conv1D projections with biases, GPT-2's own dropouts on
        cfg = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
        model = relora_ds.wrap(transformers.GPT2LMHeadModel(cfg), rank=4, dropout=dropout, quantize=quantize,
                               target_modules=["c_attn", "c_proj", "c_fc"])
    return _live(model)


def _steps(model, batch, n=2):
    """n steps, each a forward and backward (loss, gradients), an update, a ReLoRA merge-and-reinit and a new B:
    the layers' weights change between the steps."""
    out = []
    for step in range(n):
        torch.manual_seed(100 + step)  # the same LoRA dropout masks in every run
        loss = model(batch, labels=batch).loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        out.append((loss.detach(), grads))
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(0.5 * p.grad / (p.grad.norm() + 1e-12))
        model.zero_grad(set_to_none=True)
        relora_ds.merge_and_reinit(model)
        with torch.no_grad():
            for _, layer in relora_ds.relora_layers(model):
                layer.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(step))
    return out


def _assert_identical(want, got):
    assert len(want) == len(got)
    for step, ((loss, grads), (loss_got, grads_got)) in enumerate(zip(want, got)):
        assert torch.equal(loss, loss_got), (step, loss, loss_got)
        assert grads.keys() == grads_got.keys() and grads, step
        assert [n for n in grads if not torch.equal(grads[n], grads_got[n])] == [], step


BATCH = torch.randint(3, 256, (2, 33), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dropout,quantize", [(0.0, None), (0.2, None), (0.2, "int8")])
def test_every_policy_gives_the_plain_steps_bit_for_bit_across_merges(dropout, quantize):
    """relora_ds's model: full and selective, every layer or the first only, the same loss and gradients as without
    checkpointing bit for bit, with LoRA dropout (the recompute draws the forward's mask) and an int8 base, at the
    step after a merge too (no saved tensor of the old weights)."""
    want = _steps(_own_model(dropout, quantize), BATCH)
    assert dropout == 0 or not torch.equal(want[0][0], _steps(_own_model(0.0, quantize), BATCH)[0][0])
    for policy in checkpointing.POLICIES:
        for num_layers in (None, 1):
            model = _own_model(dropout, quantize)
            model.gradient_checkpointing_enable(num_layers=num_layers, policy=policy)
            _assert_identical(want, _steps(model, BATCH))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_transformers_models_wrapped_checkpoint_bit_for_bit(kind):
    """transformers' LLaMA and GPT-2 wrapped with relora_ds.wrap, LoRA dropout and an int8 base: transformers'
    own checkpointing (full) and the selective policy through hf_checkpointing_kwargs give the plain steps bit
    for bit, across a merge."""
    want = _steps(_hf_model(kind, 0.2, "int8"), BATCH)
    for kwargs in ({"use_reentrant": False}, "selective"):
        model = _hf_model(kind, 0.2, "int8")
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=checkpointing.hf_checkpointing_kwargs(model) if kwargs == "selective"
            else kwargs)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        _assert_identical(want, _steps(model, BATCH))


def test_compiled_partial_selective_matches_eager_through_merges_without_recompiling():
    """--compile (aot_eager: the eager kernels, so bit for bit) of an int8 model with LoRA dropout, the selective
    policy on the first layer only: training, evaluation and a merge-and-reinit, three times. Every loss,
    gradient and evaluation loss is the eager model's; the layers' code holds 3 entries (selective and plain
    training, evaluation) from the first cycle on, with no graph break and no recompile-limit hit."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        eager = _own_model(0.2, "int8")
        eager.gradient_checkpointing_enable(num_layers=1, policy="selective")
        compiled = copy.deepcopy(eager)
        compiled.compile_layers(backend="aot_eager")
        batch = BATCH[:, :17]
        for cycle in range(3):
            runs = []
            for model in (eager, compiled):
                train = _steps(model.train(), batch, n=1)
                with torch.no_grad():
                    runs.append((train, model.eval()(batch, labels=batch).loss))
            _assert_identical(runs[0][0], runs[1][0])
            assert torch.equal(runs[0][1], runs[1][1]), cycle
            stats = compile_stats()
            assert (stats["graphs"], stats["graph_breaks"], stats["recompile_limit_hits"]) == (3, 0, 0), (cycle,
                                                                                                          stats)
            assert cache_entries(compiled) == 3, cycle
    finally:
        torch._dynamo.reset()


def _compiles(backend):
    """Whether torch compiles and runs a one-op function's forward and backward with ``backend`` here (None), or
    why not."""
    torch._dynamo.reset()
    try:
        x = torch.ones(4, requires_grad=True)
        torch.compile(lambda x: (x * 2 + 1).sum(), backend=backend)(x).backward()
        return None
    except Exception as e:  # torch._dynamo.exc.BackendCompilerFailed: the backend's ImportError, a TypeError...
        return repr(e)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend,package", [("tvm", "tvm"), ("openxla", "torch_xla"), ("openxla_eval", "torch_xla"),
                                             ("dynamo_minifier_backend", None), ("cudagraphs", None),
                                             ("ts", None), ("aot_ts", None)])
def test_backends_torch_registers_but_cannot_run_here_are_refused_at_start_up(caplog, backend, package):
    """torch registers these backends, yet compiling with them here fails at the first step (after the data and
    the engine: tvm and openxla need packages that are not installed, the minifier is no compiler, TorchScript
    (ts, aot_ts) cannot script torch.fx's graphs) or, cudagraphs on the CPU, skips what it was asked for. The
    start-up check (compile_problem, which check_compile raises) names each, leaving torch.compile's counters as
    they were; the backends that run are still accepted."""
    if package and importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    failed = _compiles(backend)
    if backend == "cudagraphs":  # runs, without the CUDA graphs it was chosen for (torch's log line)
        assert failed is None and "skipping cudagraphs due to cpu device" in caplog.text
    else:
        assert failed is not None
    before = compile_stats()
    problem = compile_problem(cuda=False, backend=backend)
    assert problem is not None and backend in problem
    assert compile_stats() == before
    assert "aot_eager" in problem or "install" in problem  # what would do
    for works in ("aot_eager", "eager", "aot_eager_decomp_partition"):
        assert compile_problem(cuda=False, backend=works) is None
    assert "dynamo_minifier_backend" not in compile_problem(cuda=False, backend="inductr")  # not offered


def test_zero3_trainer_runs_checkpointed_give_the_plain_losses_bit_for_bit(tmp_path, small_data_dir):
    """2 gloo ranks, ZeRO-3 fp32 (memory_efficient_linear off, as the selective policy needs), an int8 base and LoRA
    dropout: warm start, the switch and a reset (step 6). Full and selective checkpointing (the recompute gathering
    each layer's partitioned weights again) log the losses of the run without checkpointing bit for bit."""
    import json

    from launch_utils import ROOT, run_ranks
    from trainer_utils import FP32_ZERO2, read_losses, write

    runs = {}
    for policy in (None, *checkpointing.POLICIES):
        out = tmp_path / str(policy)
        out.mkdir()
        kw = dict(activation_checkpointing=True, activation_checkpointing_policy=policy) if policy else {}
        recipe, ds = write(out, small_data_dir, dropout=0.1, quantize="int8", total_steps=7, eval_every=0, **kw)
        ds.write_text(json.dumps({**FP32_ZERO2, "zero_optimization": {"stage": 3, "memory_efficient_linear": False}}))
        run_ranks(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", ds)
        runs[policy], recs = read_losses(out / "run")
        assert [r["step"] for r in recs if r.get("event") == "reset"] == [6]
    assert len(runs[None]) == 7
    assert runs["full"] == runs[None] and runs["selective"] == runs[None], runs
