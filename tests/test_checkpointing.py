"""Selective activation checkpointing (relora_ds/checkpointing.py, --activation-checkpointing-policy selective).

Oracles: the same model without checkpointing (loss and every gradient), and what backward runs: under the
selective policy the recompute runs no big GEMM (only the rank-r products), so backward's big GEMMs are
exactly those of a backward without checkpointing, while full checkpointing runs the forward's again. What it
keeps in memory is checked against the heap in tests/test_memory_table.py, and compiled in tests/test_compile.py.
"""
from __future__ import annotations

import collections
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import relora_ds
from relora_ds import checkpointing

QWEN2 = relora_ds.LlamaConfig(  # biases on q/k/v (F.linear's addmm in the warm start), GQA
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, model_type="qwen2")


class _GemmLog(TorchDispatchMode):
    """(op, contraction k) of every mm/addmm dispatched, in place or not."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in ("aten::mm", "aten::addmm"):
            self.calls[func._schema.name, args[-2].shape[1]] += 1
        return func(*args, **(kwargs or {}))


def _hf_enable(model, kwargs):
    """transformers' checkpointing with ``kwargs`` (activation_checkpointing_enable from 5.x, whose
    gradient_checkpointing_enable is a deprecated alias)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _model(config=None, rank=4, **wrap_kw):
    torch.manual_seed(0)
    model = relora_ds.LlamaForCausalLM(config or relora_ds.LlamaConfig.preset("debug"))
    with torch.no_grad():  # biases (QWEN2's q/k/v) are zeros at init: a bias added twice would not show
        for m in model.modules():
            if isinstance(getattr(m, "bias", None), torch.Tensor):
                m.bias.normal_(0, 0.5)
    if rank:
        relora_ds.wrap(model, rank=rank, **wrap_kw)
        with torch.no_grad():  # a live low-rank branch (B = 0 would hide lora_A's gradient and the dropout)
            for _, layer in relora_ds.relora_layers(model):
                layer.lora_B.normal_(0, 0.05)
    return model


def _run(model, policy, batch, documents=None):
    """Loss, gradients and the backward's GEMMs, with ``policy`` (None: no checkpointing)."""
    if policy:
        model.gradient_checkpointing_enable(policy=policy)
    if documents is not None:
        model.document_masking_enable(documents)
    torch.manual_seed(123)  # the same LoRA dropout masks in every run
    loss = model(batch, labels=batch).loss
    with _GemmLog() as log:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, log.calls


@pytest.mark.parametrize("case", ["torch_path", "epilogue_chain_dropout", "reference", "int8", "full_rank_qwen2",
                                  "qwen2_documents"])
def test_selective_same_loss_and_grads_and_no_big_gemm_recomputed(monkeypatch, case):
    """Against no checkpointing on the same model: loss and every gradient equal (the kept outputs are the very
    tensors the forward made; what recomputes is deterministic, the dropout mask redrawn from the restored RNG).
    Backward's GEMMs: under selective the only ones beyond a plain backward's are over k <= rank (the rank-r
    products recomputed); under full, the forward's big ones as well. Cases: the BLAS path as CPU runs it
    (merged weight), its epilogue chain with LoRA dropout (RELORA_MERGED_WEIGHT=0), the PEFT-style reference,
    an int8 base, and the full-rank warm start (no LoRA: every GEMM kept) of a Qwen2 (q/k/v biases), also with
    document masking (SDPA's masked kernel)."""
    rank, config, wrap_kw, documents = 4, None, {}, None
    if case == "epilogue_chain_dropout":
        monkeypatch.setenv("RELORA_MERGED_WEIGHT", "0")
        wrap_kw = dict(dropout=0.2)
    elif case == "reference":
        monkeypatch.setenv("RELORA_KERNELS", "reference")
    elif case == "int8":
        wrap_kw = dict(quantize="int8")
    elif case.endswith("qwen2") or case == "qwen2_documents":
        rank, config = 0, QWEN2
        documents = 2 if case == "qwen2_documents" else None
    batch = torch.randint(3, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    batch[0, 9] = batch[1, 20] = 2  # document ends (used only with document masking)
    plain = _run(_model(config, rank, **wrap_kw), None, batch, documents)
    selective = _run(_model(config, rank, **wrap_kw), "selective", batch, documents)
    full = _run(_model(config, rank, **wrap_kw), "full", batch, documents)
    for got in (selective, full):
        assert torch.equal(plain[0], got[0])
        assert plain[1].keys() == got[1].keys() and len(plain[1]) > 0
        for n in plain[1]:
            torch.testing.assert_close(got[1][n], plain[1][n], rtol=1e-5, atol=1e-7, msg=n)
    extra = {key: n - plain[2][key] for key, n in selective[2].items() if n != plain[2][key]}
    assert all(k <= rank for (_, k) in extra), extra  # only rank-r products recompute
    assert (len(extra) > 0) == (rank > 0)  # with LoRA they do (S Bᵀ, or the merged weight's B A)
    big = sum(n for (_, k), n in (full[2] - plain[2]).items() if k > rank)
    # full recomputes the forward's big GEMMs: 2 layers x 6 projections at least (the recompute stops once it
    # has what backward needs, before down_proj, whose output only the residual add reads)
    assert big >= 2 * 6


@pytest.mark.parametrize("num_layers", [1, None])
def test_selective_recomputes_the_first_layers_only(num_layers):
    """With num_layers=1 only the first layer recomputes (its norms, hence RMSNorm's rsqrt, run again in
    backward), the other keeps all its activations: 2 RMSNorms per recomputed layer."""
    model = _model()
    model.gradient_checkpointing_enable(num_layers=num_layers, policy="selective")
    assert model.model.checkpoint_policy == "selective"
    batch = torch.randint(3, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    loss = model(batch, labels=batch).loss

    class Rsqrt(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Rsqrt.n += func._schema.name == "aten::rsqrt"
            return func(*args, **(kwargs or {}))
    with Rsqrt():
        loss.backward()
    assert Rsqrt.n == 2 * (num_layers or model.config.num_hidden_layers)


def test_the_policy_keeps_big_matmuls_and_fused_attention_only():
    """Hand-picked ops: a projection's product (k = in) is kept at any token count, a rank-r one (k <= rank)
    is not, nor an in-place or out= product, nor the element-wise ops; SDPA's fused kernel is kept."""
    x, w, a, b = torch.randn(300, 64), torch.randn(96, 64), torch.randn(4, 64), torch.randn(96, 4)
    s = x @ a.t()
    aten = torch.ops.aten
    assert checkpointing.keeps(aten.mm.default, (x, w.t()), rank=4)  # X Wᵀ: 300 tokens, k = 64
    assert checkpointing.keeps(aten.mm.default, (x, a.t()), rank=4)  # X Aᵀ: k = 64, the small S kept
    assert checkpointing.keeps(aten.addmm.default, (torch.zeros(96), x, w.t()), rank=4)
    assert not checkpointing.keeps(aten.mm.default, (s, b.t()), rank=4)  # S Bᵀ: k = r
    assert not checkpointing.keeps(aten.addmm.default, (w, b, a), rank=4)  # W + s B A: k = r
    assert checkpointing.keeps(aten.mm.default, (s, b.t()), rank=0)  # no LoRA: every product kept
    assert not checkpointing.keeps(aten.addmm_.default, (torch.zeros(300, 96), x, w.t()), rank=4)  # in place
    assert not checkpointing.keeps(aten.mm.out, (x, w.t()), rank=4)  # out=
    for op in (aten.silu.default, aten.mul.Tensor, aten.rsqrt.default, aten.bmm.default):
        assert not checkpointing.keeps(op, (x, x), rank=4)
    assert checkpointing.keeps(aten._scaled_dot_product_flash_attention_for_cpu.default, (x, x, x), rank=4)
    assert checkpointing.keeps(aten._scaled_dot_product_efficient_attention.default, (x, x, x), rank=4)
    # Every fused kernel SDPA may pick on a GPU (cuDNN's on H100s), and flash-attn's ops, named by their schema
    # (flash-attn is not installed here: stand-ins with its ops' schema names). A mutation trial's survivors:
    # the cuDNN kernel or flash-attn's varlen forward left out, recomputed in backward.
    for op in (aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_cudnn_attention,
               aten._scaled_dot_product_fused_attention_overrideable):
        assert checkpointing.keeps(op.default, (x, x, x), rank=4), op
    for name in ("flash_attn::_flash_attn_forward", "flash_attn::_flash_attn_varlen_forward"):
        op = SimpleNamespace(_schema=SimpleNamespace(name=name, is_mutable=False))
        assert checkpointing.keeps(op, (x, x, x), rank=4), name


def test_lora_rank_is_the_largest_adapted_rank():
    assert checkpointing.lora_rank(_model(rank=0)) == 0
    model = _model(rank=4)
    assert checkpointing.lora_rank(model) == 4
    name, layer = next(iter(relora_ds.relora_layers(model)))
    layer.rank, layer.lora_A = 6, torch.nn.Parameter(torch.zeros(6, layer.lora_A.shape[1]))  # another rank
    assert checkpointing.lora_rank(model) == 6


def test_bad_policy_is_named():
    model = _model()
    with pytest.raises(ValueError, match=r"activation checkpointing policy 'some' is not valid; valid policies: "
                                         r"'full', 'selective'"):
        model.gradient_checkpointing_enable(policy="some")
    assert not model.model.gradient_checkpointing  # nothing half-enabled


@pytest.mark.parametrize("lowrank_blas,dropout", [(True, 0.0), (False, 0.0), (False, 0.2)])
def test_selective_on_the_triton_path(kernels_on, monkeypatch, lowrank_blas, dropout):
    """RELORA_KERNELS=triton (the interpreter here; float base): under the policy's dispatch mode the layer
    launches through its registered forward op, whose outputs (Y and S) the policy keeps, so backward launches
    no forward again; full checkpointing does, once per layer. Same loss and gradients as without
    checkpointing, whether S comes from torch.mm inside the op (LOWRANK_BLAS, without dropout) or from a
    kernel, and with LoRA dropout (the kept S and the recomputed keep-mask must agree). _run's backward runs
    under a dispatch mode (its GEMM log), so every backward here, the reference's too, goes through the
    backward op."""
    from kernel_utils import count_layer_launches
    from relora_kernels import linear

    monkeypatch.setattr(linear, "LOWRANK_BLAS", lowrank_blas)
    batch = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    plain = _run(_model(dropout=dropout), None, batch)
    layers = len(list(relora_ds.relora_layers(_model())))
    for policy, forwards in (("selective", layers), ("full", 2 * layers)):
        calls = count_layer_launches(monkeypatch)
        got = _run(_model(dropout=dropout), policy, batch)
        assert calls == {"lora_forward": forwards, "lora_backward": layers}, (policy, calls)
        assert torch.equal(plain[0], got[0]) and plain[1].keys() == got[1].keys()
        for n in plain[1]:
            torch.testing.assert_close(got[1][n], plain[1][n], rtol=1e-5, atol=1e-7, msg=n)


def test_the_policy_on_a_transformers_model_through_its_checkpointing_kwargs():
    """hf_checkpointing_kwargs: transformers' own gradient checkpointing of a ReLoRA-wrapped LlamaForCausalLM
    with the selective policy. Oracle: the same model without checkpointing (loss and gradients equal); its
    backward runs beyond a plain one's only the 7 rank-r products per layer, while transformers' default
    (full) runs the forward's big GEMMs again."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, attn_implementation="sdpa")

    def run(selective):
        torch.manual_seed(0)
        model = relora_ds.wrap(transformers.LlamaForCausalLM(cfg), rank=4)
        with torch.no_grad():
            for _, layer in relora_ds.relora_layers(model):
                layer.lora_B.normal_(0, 0.05)
        model.train()
        if selective is not None:
            _hf_enable(model, checkpointing.hf_checkpointing_kwargs(model) if selective else {"use_reentrant": False})
        batch = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
        loss = model(batch, labels=batch).loss
        with _GemmLog() as log:
            loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, log.calls

    plain, selective, full = run(None), run(True), run(False)
    assert torch.equal(plain[0], selective[0]) and plain[1].keys() == selective[1].keys()
    for n in plain[1]:
        torch.testing.assert_close(selective[1][n], plain[1][n], rtol=1e-5, atol=1e-7, msg=n)
    extra = selective[2] - plain[2]
    assert all(k == 4 for _, k in extra) and sum(extra.values()) == 2 * 7, extra
    assert sum(n for (_, k), n in (full[2] - plain[2]).items() if k > 4) >= 2 * 6


def test_a_replaced_linear_that_adds_the_bias_in_place_is_refused(monkeypatch):
    """DeepSpeed's ZeRO-3 F.linear (memory_efficient_linear) computes x @ Wᵀ then adds the bias in place, into
    the matmul output the policy keeps, through the _unsafe_view torch's mutation check does not follow: the
    recompute adds the bias twice. Shown here (the check bypassed: other gradients than without checkpointing,
    the oracle), then refused by the model; without biases that linear is harmless (same gradients)."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    batch = torch.randint(3, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    plain = _run(_model(QWEN2, rank=0), None, batch)
    with pytest.raises(RuntimeError, match=r"torch.nn.functional.linear has been replaced \(by DeepSpeed's ZeRO-3 "
                                           r"memory_efficient_linear\?\) and \S*self_attn.q_proj has a bias"):
        _run(_model(QWEN2, rank=0), "selective", batch)
    with pytest.raises(RuntimeError, match="has a bias"):
        checkpointing.hf_checkpointing_kwargs(_model(QWEN2, rank=0))
    with monkeypatch.context() as m:
        m.setattr(checkpointing, "check_linear", lambda module: None)
        unchecked = _run(_model(QWEN2, rank=0), "selective", batch)
    assert max((plain[1][n] - unchecked[1][n]).abs().max().item() for n in plain[1]) > 1e-2
    no_bias = relora_ds.LlamaConfig(**{**QWEN2.to_dict(), "model_type": "llama", "qkv_bias": False})
    want, got = _run(_model(no_bias, rank=0), None, batch), _run(_model(no_bias, rank=0), "selective", batch)
    checkpointing.hf_checkpointing_kwargs(_model(no_bias, rank=4))  # not refused either
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], rtol=1e-5, atol=1e-7, msg=n)


def test_lora_rank_of_a_partitioned_layer():
    """Under ZeRO-3 a partitioned lora_A is empty outside a gather: the rank comes from the layer itself."""
    model = _model(rank=4)
    for _, layer in relora_ds.relora_layers(model):
        layer.lora_A.data = torch.empty(0)
    assert checkpointing.lora_rank(model) == 4


@pytest.mark.parametrize("base", ["float", "int8"])
def test_the_blas_path_stays_in_place_unless_a_dispatch_mode_is_active(base):
    """kernels/torch_linear.py keeps its measured in-place epilogue (Y += …: aten::addmm_) by default, and runs
    out of place only under a dispatch mode, as the selective policy's (it keeps X Wᵀ, which must then not be
    written). Seen through torch's profiler, which adds no mode; the values are the same either way."""
    import contextlib

    from relora_kernels.int8_reference import int8_quantize_reference
    from relora_kernels.torch_linear import int8_lora_linear_torch, lora_linear_torch

    g = torch.Generator().manual_seed(0)
    x, w, a, b, bias = (torch.randn(*shape, generator=g) for shape in ((3, 5, 16), (24, 16), (4, 16), (24, 4), (24,)))

    def forward(mode):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with mode or contextlib.nullcontext():
                if base == "int8":
                    q, scale = int8_quantize_reference(w)[:2]
                    y = int8_lora_linear_torch(x, q, scale, a, b, 2.0, bias, merged_weight=False)
                else:
                    y = lora_linear_torch(x, w, a, b, 2.0, bias, merged_weight=False)
        return y, {e.name for e in prof.events()}

    (y0, plain), (y1, moded) = forward(None), forward(_GemmLog())
    assert "aten::addmm_" in plain
    assert "aten::addmm_" not in moded and "aten::addmm" in moded
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)


def test_a_linear_replaced_after_the_kwargs_are_built_is_refused_at_the_forward(monkeypatch):
    """The HF Trainer order: the policy's kwargs are built on the wrapped model, then deepspeed.initialize
    (ZeRO-3) replaces F.linear. The check runs again at each checkpointed call: a transformers Qwen2 adapted on
    its MLP only (q/k/v stay biased nn.Linear) is refused at its first forward. Layer norms' biases do not count
    (they never reach F.linear): no refusal for a model whose only biased layers are not linears."""
    import transformers
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = relora_ds.wrap(transformers.Qwen2ForCausalLM(cfg), rank=4, target_modules=["gate_proj", "up_proj",
                                                                                       "down_proj"])
    model.train()
    kwargs = checkpointing.hf_checkpointing_kwargs(model)  # F.linear still torch's own here
    _hf_enable(model, kwargs)
    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    batch = torch.randint(0, 256, (2, 9))
    with pytest.raises(RuntimeError, match=r"\S*self_attn.q_proj has a bias"):
        model(batch, labels=batch)
    norm_only = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8, bias=False))
    assert checkpointing.biased_linear(norm_only) is None
    assert checkpointing.biased_linear(torch.nn.Sequential(torch.nn.Linear(8, 8))) == "0"
    # Every linear of relora_ds's Qwen2 wrapped: its biased q/k/v are ReLoRA layers (no nn.Linear is left),
    # whose reference path passes F.linear the bias too; a model without biases is not refused.
    wrapped = _model(QWEN2, rank=4)
    assert not any(isinstance(m, torch.nn.Linear) for m in wrapped.model.modules())
    assert checkpointing.biased_linear(wrapped) == "model.layers.0.self_attn.q_proj"
    with pytest.raises(RuntimeError, match=r"model.layers.0.self_attn.q_proj has a bias"):
        checkpointing.hf_checkpointing_kwargs(wrapped)
    checkpointing.hf_checkpointing_kwargs(_model(rank=4))


def test_lora_rank_of_a_partitioned_layer_without_a_rank_attribute():
    """A LoRA layer that keeps no ``rank`` (another library's): its rank is lora_A's rows, read from the whole
    shape (ds_shape) under ZeRO-3, whose partitioned tensor is empty outside a gather (a mutation trial's
    survivor read the empty local shape, rank 0: every rank-r product then kept as a big one)."""
    layer = torch.nn.Module()
    layer.lora_A = torch.nn.Parameter(torch.zeros(6, 8))
    layer.lora_A.ds_shape = layer.lora_A.shape
    layer.lora_A.data = torch.empty(0)
    assert checkpointing.lora_rank(torch.nn.Sequential(layer)) == 6
