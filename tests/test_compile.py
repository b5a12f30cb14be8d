"""--compile / LlamaForCausalLM.compile_layers: torch.compile of each decoder layer, against the eager model
(the oracle) in one process, and whole 2-rank trainer runs against the same runs eager."""
import copy
import json

import pytest
import torch

import relora_ds
from launch_utils import ROOT, run_ranks
from relora_ds.compiling import compile_stats
from trainer_utils import FP32_ZERO2, read_losses, write


# Qwen3 with GQA, per-head q/k norms, attention biases, head_dim 24 and a 16-token window on every second layer:
# two kinds of layer, so two graphs.
QWEN3_WINDOW = relora_ds.LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, model_type="qwen3", qk_norm=True, attention_bias=True,
    head_dim=24, sliding_window=16, layer_types=["full_attention", "sliding_attention"] * 2)


def _model(config=None, **wrap_kw):
    torch.manual_seed(0)
    model = relora_ds.LlamaForCausalLM(config or relora_ds.LlamaConfig.preset("debug"))
    relora_ds.wrap(model, rank=4, **wrap_kw)
    with torch.no_grad():  # B != 0, so that the low-rank term and lora_A's gradient are not zero
        for layer in relora_ds.relora.relora_layers(model):
            layer[1].lora_B.normal_(0, 0.02)
    return model


def _batch(vocab, eos=None, rows=2):
    batch = torch.randint(3, vocab, (rows, 33), generator=torch.Generator().manual_seed(1))
    if eos is not None:
        batch[0, 9] = batch[1, 20] = eos  # documents end inside the windows
    return batch


def _step(model, batch):
    """A forward and backward; returns the loss and the trainable parameters' gradients (then cleared)."""
    loss = model(batch, labels=batch).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _close(a, b, tol):
    (la, ga), (lb, gb) = a, b
    assert abs(la.item() - lb.item()) <= tol * abs(la.item())
    assert len(ga) == len(gb)
    errs = [((x - y).norm() / x.norm()).item() for x, y in zip(ga, gb)]
    assert max(errs) <= tol, errs


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", ["plain", "activation_checkpointing", "document_masking", "int8", "qwen3_window"])
def test_compiled_layers_match_the_eager_model_through_a_reset(fresh_dynamo, variant):
    """Same loss and gradients as the eager model (fp32: reordered sums only), one graph for all the layers (one
    per kind of layer) and no graph break; then an optimizer-like update and a ReLoRA merge-and-reinit written in
    place into both models, and again the same loss and gradients with no new graph: the compiled layers read the
    weights as inputs."""
    eager = _model(QWEN3_WINDOW if variant == "qwen3_window" else None, quantize="int8" if variant == "int8" else None)
    eos = 2
    if variant == "activation_checkpointing":
        eager.gradient_checkpointing_enable()
    if variant == "document_masking":
        eager.document_masking_enable(eos)
    compiled = copy.deepcopy(eager)
    # inductor for the LLaMA variants; for the Qwen3 one AOTAutograd's graphs without inductor's code (the guards,
    # graphs and breaks are Dynamo's either way; ~30 s less of CI)
    compiled.compile_layers(**({"backend": "aot_eager"} if variant == "qwen3_window" else {}))
    batch = _batch(eager.config.vocab_size, eos if variant == "document_masking" else None)
    before = _frozen(compiled)
    for step in range(2):
        ref, got = _step(eager, batch), _step(compiled, batch)
        _close(ref, got, 2e-5)
        stats = compile_stats()
        assert stats["graphs"] == (2 if variant == "qwen3_window" else 1) and stats["graph_breaks"] == 0, stats
        with torch.no_grad():
            for model in (eager, compiled):
                trained = [p for p in model.parameters() if p.requires_grad]
                for p, g in zip(trained, ref[1]):
                    p.sub_(0.5 * g / (g.norm() + 1e-12))  # the same update in both
                relora_ds.merge_and_reinit(model)  # W += s·B·A (an int8 base: requantized), A redrawn, B = 0
                for _, layer in relora_ds.relora.relora_layers(model):
                    layer.lora_B.normal_(0, 0.02, generator=torch.Generator().manual_seed(step))
    after = _frozen(compiled)
    assert after.keys() == before.keys() and all(not torch.equal(before[n], t) for n, t in after.items())
    if variant == "plain":  # a deep copy's compiled layers run the copy's weights, not the original's
        twin, eager_twin = copy.deepcopy(compiled), copy.deepcopy(eager)
        with torch.no_grad():
            for model in (twin, eager_twin):
                for _, layer in relora_ds.relora.relora_layers(model):
                    layer.lora_B.mul_(3)
        _close(_step(eager_twin, batch), _step(twin, batch), 2e-5)
        _close(_step(eager, batch), _step(compiled, batch), 2e-5)
        assert compile_stats()["graphs"] == 1


def _frozen(model):
    """The frozen bases (float weights, or an int8 base's codes), which only the merges write."""
    return {n: t.clone() for n, t in [*model.named_parameters(), *model.named_buffers()]
            if n.endswith((".weight", ".weight_q")) and not t.requires_grad}


def test_compiled_dropout_matches_the_eager_masks_and_survives_activation_checkpointing(fresh_dynamo):
    """LoRA dropout in compiled layers. With inductor's fallback_random (its random ops drawn by torch's own, in
    the eager order) the compiled model gets the eager model's masks, so the eager model is the oracle: same
    loss and gradients, keep rate and scale included. By default inductor draws its own masks: the same seed
    gives the same loss and gradients, another seed other ones, and activation checkpointing redraws in
    backward the masks the forward used (its gradients are the plain compiled model's)."""
    import torch._inductor.config as inductor_config

    base = _model(dropout=0.3)
    batch = _batch(base.config.vocab_size)

    def run(seed, checkpointing, compiled=True):
        model = copy.deepcopy(base)
        if checkpointing:
            model.gradient_checkpointing_enable()
        if compiled:
            model.compile_layers()
        torch.manual_seed(seed)
        return _step(model, batch)

    plain = run(1, False)
    _close(plain, run(1, False), 0.0)
    _close(plain, run(1, True), 2e-5)
    assert abs(run(2, False)[0].item() - plain[0].item()) > 1e-4
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        eager = run(1, False, compiled=False)
        _close(eager, run(1, False), 2e-5)
        _close(eager, run(1, True), 2e-5)
    assert abs(eager[0].item() - run(2, False, compiled=False)[0].item()) > 1e-4  # the masks matter


@pytest.mark.parametrize("quantize,backend,policy", [(None, "inductor", None), ("int8", "aot_eager", "selective")])
def test_compiled_layers_on_the_triton_path_call_the_kernels_as_ops(fresh_dynamo, kernels_on, monkeypatch, quantize,
                                                                     backend, policy):
    """RELORA_KERNELS=triton (Triton's interpreter here), float and int8 bases: traced, the layer launches through
    its two registered ops (relora_kernels.linear.FORWARD_OP, BACKWARD_OP), so a decoder layer stays one graph with
    no break, and the compiled model has the eager model's loss and gradients (on the reference path: the
    kernels' torch twin, which they match, tests/test_kernels.py). The ops run inside the compiled
    code: one forward and one backward launch per LoRA layer and step, also under the selective policy (its
    forward kept, not recomputed: with the checkpoint inside the compiled function, AOTAutograd's min-cut
    partitioner, aot_eager's and inductor's, applies the policy to the op). inductor for the float base (its
    generated code calls the ops), AOTAutograd's graphs for the int8 one."""
    from kernel_utils import count_layer_launches

    eager = _model(quantize=quantize)
    if policy:
        eager.gradient_checkpointing_enable(policy=policy)
    compiled = copy.deepcopy(eager)
    compiled.compile_layers(backend=backend)
    batch = _batch(eager.config.vocab_size, rows=1)  # 32 tokens: one block of the interpreter's GEMM tiles
    with monkeypatch.context() as m:  # the oracle on the pure-torch reference twin (one interpreted step less)
        m.setenv("RELORA_KERNELS", "reference")
        want = _step(eager, batch)
    calls = count_layer_launches(monkeypatch)
    _close(want, _step(compiled, batch), 2e-5)
    stats = compile_stats()
    assert stats["graphs"] == 1 and stats["graph_breaks"] == 0, stats
    layers = len(list(relora_ds.relora.relora_layers(compiled)))
    assert calls == {"lora_forward": layers, "lora_backward": layers}, calls  # the compiling step
    calls.clear()
    _close(want, _step(compiled, batch), 2e-5)
    assert calls == {"lora_forward": layers, "lora_backward": layers}, calls  # the compiled code alone


def test_compile_needs_a_working_compiler():
    """--compile on a CPU without a C++ compiler fails at start-up, naming the fix, not at the first step; a
    backend that generates no code does not need one, and a backend torch does not have is named with the ones
    it has."""
    import torch._inductor.config as inductor_config

    from types import SimpleNamespace

    from relora_ds.startup import check_compile

    cfg = SimpleNamespace(compile=True, compile_backend="inductor")  # what check_compile reads of a TrainConfig
    check_compile(cfg, cuda=False)  # this machine's compiler
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/c++")}):
        with pytest.raises(ValueError, match=r"compile: torch.compile on the CPU builds C\+\+.*set CXX.*without "
                                             r"--compile"):
            check_compile(cfg, cuda=False)
        check_compile(SimpleNamespace(compile=False, compile_backend="inductor"), cuda=False)  # not asked for
        check_compile(SimpleNamespace(compile=True, compile_backend="aot_eager"), cuda=False)  # builds no C++
    check_compile(cfg, cuda=False)  # the compiler is back
    with pytest.raises(ValueError, match=r"compile: compile_backend='inductr' is not one of torch's backends: "
                                         r"aot_eager, .*inductor.*; or train without --compile") as refused:
        check_compile(SimpleNamespace(compile=True, compile_backend="inductr"), cuda=False)
    assert "TESTING_ONLY" not in str(refused.value)  # torch's own test doubles are not offered
    check_compile(SimpleNamespace(compile=True, compile_backend="aot_eager_decomp_partition"), cuda=False)
    # On a GPU inductor writes Triton: its package is what is asked for.
    import importlib.util

    from relora_ds.compiling import compile_problem
    assert compile_problem(cuda=True) is None  # triton is installed here (CI's interpreter tests)
    real = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
        assert compile_problem(cuda=True) == ("torch.compile on a GPU generates Triton kernels, and triton is not "
                                              "installed")


def test_the_recompile_limit_is_only_ever_raised():
    """compile_layers asks for a recompile limit of its entries: raised where torch's is lower, never lowered
    (the limit is process-wide: other compiled code of the user's keeps its own setting)."""
    from relora_ds.compiling import _limit_option, raise_recompile_limit, recompile_limit

    before, option = recompile_limit(), _limit_option(torch._dynamo.config)
    try:
        raise_recompile_limit(1)
        assert recompile_limit() == before
        raise_recompile_limit(before + 5)
        assert recompile_limit() == before + 5
    finally:
        setattr(torch._dynamo.config, option, before)


def test_compiling_the_layers_twice_is_refused():
    """A second compile_layers is refused by name, the layers keep their compiled forward (a mutation trial
    dropping the refusal passed every other test). Nothing is compiled here: torch.compile is lazy."""
    from relora_ds.compiling import _limit_option, recompile_limit

    before, option = recompile_limit(), _limit_option(torch._dynamo.config)
    model = relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("debug"))
    try:
        model.compile_layers()
        forwards = [vars(layer)["forward"] for layer in model.model.layers]
        with pytest.raises(RuntimeError, match=r"compile_layers: the decoder layers are compiled already"):
            model.compile_layers()
        assert [vars(layer)["forward"] for layer in model.model.layers] == forwards
    finally:
        setattr(torch._dynamo.config, option, before)


def test_compile_layers_refuses_a_backend_that_cannot_build_code_here(fresh_dynamo):
    """compile_layers(backend="ts") (TorchScript, which cannot script torch.fx's graphs in this torch) was taken,
    and the model failed at its first forward; now refused at the call, naming the backend, the layers as they were.
    The oracle: torch.compile with that backend on a layer's MLP fails at its first call."""
    model = relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("debug"))
    mlp = model.model.layers[0].mlp
    with pytest.raises(Exception, match="method cannot be used as a value"):
        torch.compile(lambda h: mlp(h).sum(), backend="ts")(torch.randn(1, 4, model.config.hidden_size))
    for backend, shown in (("ts", r"compile_backend='ts' failed to compile a one-line function here"),
                           ("inductr", r"compile_backend='inductr' is not one of torch's backends: .*aot_eager")):
        with pytest.raises(ValueError, match=rf"^compile_layers: {shown}"):
            model.compile_layers(backend=backend)
        assert not any("forward" in vars(layer) for layer in model.model.layers)


class _Engine:
    """What relora_ds.evaluate.validation_losses calls of a DeepSpeed engine, around a plain model."""

    def __init__(self, model):
        self.model, self.device = model, torch.device("cpu")

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def eval(self):
        self.model.eval()

    def train(self):
        self.model.train()


def test_evaluations_and_the_switch_stay_within_the_recompile_limit(fresh_dynamo):
    """A trainer's sequence on a model with two kinds of layer (QWEN3_WINDOW): full-rank training, evaluations
    with a full, a 3-row and a 1-row last batch, the warm-start switch (a new wrapped model; the trainer resets
    torch.compile's caches there), ReLoRA training through a merge, evaluation again. The short batches run
    eagerly (no graph, no dynamic shapes), so each phase holds one training and one evaluation graph per kind
    of layer, and nothing reaches torch's recompile limit (past which a layer would run eagerly without a
    word); the evaluations equal the eager model's. backend="eager": Dynamo's guards and graphs without
    inductor's build time."""
    from relora_ds.evaluate import validation_losses

    torch.manual_seed(0)
    windows = torch.randint(3, QWEN3_WINDOW.vocab_size, (7, 33), generator=torch.Generator().manual_seed(2))

    def phase(model):
        eager = copy.deepcopy(model)
        model.compile_layers(backend="eager")
        _step(model, windows[:4])
        for n in (7, 5):  # batches of 4 + 3, and 4 + 1 rows
            got = validation_losses(_Engine(model), windows, 4, 0, 1, n)
            want = validation_losses(_Engine(eager), windows, 4, 0, 1, n)
            assert got[1] == want[1] == n * 32 and abs(got[0] - want[0]) <= 1e-5 * want[0]
        stats = compile_stats()
        assert (stats["graphs"], stats["graph_breaks"], stats["recompile_limit_hits"]) == (4, 0, 0), stats

    full = relora_ds.LlamaForCausalLM(QWEN3_WINDOW)
    phase(full)
    state = full.state_dict()
    torch._dynamo.reset()  # as Trainer._switch_to_lowrank
    torch._dynamo.utils.counters.clear()
    low = relora_ds.LlamaForCausalLM(QWEN3_WINDOW)
    low.load_state_dict(state)
    relora_ds.wrap(low, rank=4)
    _step(low, windows[:4])
    relora_ds.merge_and_reinit(low)
    phase(low)


def test_compile_stats_count_recompile_limit_hits(fresh_dynamo):
    """Past torch's recompile limit a compiled function runs eagerly, which torch says only in a log line:
    compile_stats counts it (the trainer warns)."""
    model = _model()
    with torch._dynamo.config.patch(recompile_limit=1):  # (monkeypatch would delete the option at its undo)
        model.compile_layers(backend="eager")  # raises the limit to 4 entries per kind of layer
        assert torch._dynamo.config.recompile_limit == 4
        torch._dynamo.config.recompile_limit = 1
        batch = _batch(model.config.vocab_size)
        _step(model, batch)
        with torch.no_grad():  # another grad mode: a second entry, over the limit of 1
            model(batch)
        assert compile_stats()["recompile_limit_hits"] == 1
    assert torch._dynamo.config.recompile_limit == 8


def test_compile_reports_warn_on_new_breaks_and_limit_hits(monkeypatch, recwarn):
    """Trainer._report_compile (a stub trainer; compile_stats given): an event per report, a warning only for
    graph breaks or recompile-limit hits that are new since the last report."""
    import relora_ds.trainer as trainer_mod

    events = []
    stub = trainer_mod.Trainer.__new__(trainer_mod.Trainer)
    stub.engine_phase, stub.rank, stub._compile_reports, stub._compile_reported = "lowrank", 0, set(), None
    stub.engine = type("E", (), {"module": _model()})()
    stub._event = events.append
    breaks = dict(graphs=3, graph_breaks=2, break_reasons={"Skip calling `torch.compiler.disable()`d": 2})
    stats = iter([dict(graphs=1, graph_breaks=0, break_reasons={}, recompile_limit_hits=0),
                  dict(breaks, recompile_limit_hits=0), dict(breaks, recompile_limit_hits=1),
                  dict(breaks, recompile_limit_hits=1)])
    monkeypatch.setattr(trainer_mod, "compile_stats", lambda: next(stats))
    stub._report_compile("step", 1)
    assert not recwarn.list
    stub._report_compile("evaluation", 2)
    (w,) = recwarn.list
    assert "broke the decoder layers' graphs 2 times (2x Skip calling" in str(w.message)
    recwarn.clear()
    stub._report_compile("evaluation", 3)  # the same breaks: no warning again; a limit hit: one
    (w,) = recwarn.list
    assert "reached its recompile limit 1 times" in str(w.message)
    recwarn.clear()
    stub._report_compile("step", 4)  # the same hit again: no warning (a mutation trial's survivor warned)
    assert not recwarn.list
    assert [(e["step"], e["after"], e["graphs"]) for e in events] == [(1, "step", 1), (2, "evaluation", 3),
                                                                     (3, "evaluation", 3), (4, "step", 3)]
    assert stub._compile_reports == {("lowrank", "step"), ("lowrank", "evaluation")}


def _run(tmp_path, data_dir, compile_, stage=2, policy="full", backend="inductor"):
    out = tmp_path / (f"compiled_zero{stage}_{policy}" if compile_ else "eager")
    out.mkdir()
    # 13 evaluation windows on 2 ranks of 4 rows: short last batches, evaluated eagerly
    recipe, ds = write(out, data_dir, compile=compile_, activation_checkpointing=True,
                       activation_checkpointing_policy=policy, quantize="int8", eval_windows=13,
                       **({"compile_backend": backend} if compile_ else {}))
    if stage != 2:
        ds.write_text(json.dumps({**FP32_ZERO2, "zero_optimization": {"stage": stage}}))
    proc = run_ranks(ROOT / "launch/train.py", "--config", recipe, "--deepspeed", ds)
    losses, recs = read_losses(out / "run")
    return losses, recs, proc.stderr


def test_compiled_trainer_runs_match_the_eager_run(tmp_path, small_data_dir):
    """2 ranks, fp32, an int8 base: warm start, switch to ReLoRA, two resets, evaluations with short last
    batches. Compiled (through AOTAutograd, inductor's decompositions and partitioner) under ZeRO-2 with full
    activation checkpointing, and under ZeRO-3 (each layer's weights gathered by its hooks around the compiled
    forward) with the selective policy (the checkpoint inside the graph) and with full checkpointing
    (DeepSpeed's memory_efficient_linear traced in the graph), the losses and validation losses are the eager
    ZeRO-2 run's (reordered sums only), and each run reports what was compiled: after the first step of each phase
    one graph for the layers, after the first evaluation one more (no grad), no break, no recompile-limit hit."""
    eager, eager_recs, _ = _run(tmp_path, small_data_dir, False)
    assert not any(r.get("event") == "compiled" for r in eager_recs)
    assert len(eager) == 12
    # AOTAutograd's graphs with inductor's decompositions and partitioner but no generated code (CI's cold cache:
    # ~40 s a run; inductor's code for the same layers, fp32 and int8, under both checkpointing policies, is
    # checked against the eager model by the layer tests above, and inductor here took ~80 s of CI's cold cache)
    for stage, policy in ((2, "full"), (3, "selective"), (3, "full")):
        compiled, recs, stderr = _run(tmp_path, small_data_dir, True, stage, policy, "aot_eager_decomp_partition")
        assert eager.keys() == compiled.keys()
        assert all(abs(eager[s] - compiled[s]) <= 1e-5 * eager[s] for s in eager), (stage, eager, compiled)
        val = [[r["val_loss"] for r in rs if "val_loss" in r] for rs in (eager_recs, recs)]
        assert len(val[0]) == 2 and all(abs(a - b) <= 1e-5 * a for a, b in zip(*val)), (stage, val)
        events = [(e["step"], e["phase"], e["after"], e["graphs"], e["graph_breaks"], e["recompile_limit_hits"],
                   e["cache_entries"]) for e in recs if e.get("event") == "compiled"]
        # cache entries of the layers' forward: the switch dropped the full-rank phase's (else 2, then 3)
        assert events == [(1, "full", "step", 1, 0, 0, 1), (3, "lowrank", "step", 1, 0, 0, 1),
                          (6, "lowrank", "evaluation", 2, 0, 0, 2)], (stage, events)
        assert "compile:" not in stderr, stage


def test_compiled_selective_checkpointing_keeps_what_the_policy_keeps(fresh_dynamo):
    """--compile with the selective policy: the checkpoint runs inside the compiled function
    (DecoderLayer.forward, torchtitan's composition), so inductor's partitioner applies the policy to
    the traced ops. Oracles: the eager model under the same policy (loss and gradients; one graph, no break,
    one cache entry), and the heap after the forward (CPU, tests/test_memory_table.py's measure): the compiled
    layers keep about what the eager selective ones keep, far more than full checkpointing's inputs (a
    policy ignored, the compiled kernels recomputed whole, keeps no more than those) and far less than no
    checkpointing."""
    import gc

    from relora_ds.compiling import cache_entries
    from test_memory_table import _heap_in_use

    cfg = relora_ds.LlamaConfig.preset("tiny", attn_implementation="sdpa", num_hidden_layers=2, vocab_size=64)
    batch = torch.randint(0, 64, (2, 129), generator=torch.Generator().manual_seed(1))

    def kept(model):
        _step(model, batch)  # warm-up (the compile; a first pass's per-shape buffers)
        gc.collect()
        base = _heap_in_use()
        loss = model(batch, labels=batch).loss
        held = _heap_in_use() - base
        loss.backward()
        model.zero_grad(set_to_none=True)
        return held

    models = {}
    for name, policy in (("none", None), ("full", "full"), ("selective", "selective")):
        models[name] = _model(cfg)
        if policy:
            models[name].gradient_checkpointing_enable(policy=policy)
    compiled = copy.deepcopy(models["selective"])
    compiled.compile_layers()
    _close(_step(models["selective"], batch), _step(compiled, batch), 2e-5)
    assert compile_stats()["graphs"] == 1 and compile_stats()["graph_breaks"] == 0, compile_stats()
    assert cache_entries(compiled) == 1
    eager = {name: kept(model) for name, model in models.items()}
    got = kept(compiled)
    assert 2 * eager["full"] < got <= 1.05 * eager["selective"], (got, eager)
    assert got < 0.8 * eager["none"], (got, eager)


def test_compile_stats_name_the_five_most_frequent_break_reasons(fresh_dynamo):
    """A graph break's reason is the first line of torch's message (reasons differing below it are one), and the
    report keeps the five most frequent, with every break counted in graph_breaks. torch's counters filled by
    hand: 6 reasons, one of them in two multi-line variants."""
    from torch._dynamo.utils import counters

    counters.clear()
    for reason, n in (("f", 1), ("a\ndetail 1", 5), ("e", 2), ("b", 6), ("a\ndetail 2", 2), ("c", 4), ("d", 3)):
        counters["graph_break"][reason] += n
    stats = compile_stats()
    assert stats["graph_breaks"] == 23
    assert stats["break_reasons"] == {"a": 7, "b": 6, "c": 4, "d": 3, "e": 2}
    counters.clear()
