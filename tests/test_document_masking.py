"""Document masking (model.document_masking_enable / --document-masking): inside a packed window each document
attends only to itself. Oracle: each document run alone through the same model (positions from 0)."""
import re

import pytest
import torch

import relora_ds
from relora_ds import LlamaConfig, LlamaForCausalLM

EOS = 2


def _model(**kw) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, **kw)
    return LlamaForCausalLM(cfg).double().eval()


def _documents(lengths, seed):
    """Documents of random ids (never EOS) each ending with EOS; the last one cut (a window's tail)."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.cat([torch.randint(3, 64, (n - 1,), generator=g), torch.tensor([EOS])]) for n in lengths]
    docs[-1] = docs[-1][:-2]  # the window ends inside its last document
    return docs


def _alone_and_packed(model, rows):
    """(logits of each document run alone, logits of the packed windows at the same positions). The documents
    run alone without document masking (plain causal attention: an oracle independent of the masks)."""
    packed = model(torch.stack([torch.cat(docs) for docs in rows])).logits
    eos, model.model.document_eos = model.model.document_eos, None
    alone, at = [], []
    for b, docs in enumerate(rows):
        start = 0
        for doc in docs:
            alone.append(model(doc[None]).logits[0])
            at.append(packed[b, start:start + len(doc)])
            start += len(doc)
    model.model.document_eos = eos
    return torch.cat(alone), torch.cat(at)


@pytest.mark.parametrize("kw", [{}, {"num_key_value_heads": 2}, {"model_type": "mistral", "sliding_window": 5},
                                {"model_type": "qwen2", "sliding_window": 5,
                                 "layer_types": ["full_attention", "sliding_attention"]}],
                         ids=["mha", "gqa", "window", "window_on_one_layer"])
def test_each_document_of_a_window_gets_the_logits_it_gets_alone(kw):
    """Two windows with their documents at different places (a mask per row); GQA; a sliding window shorter
    than the documents (mask = window and document). Without masking the later documents' logits differ:
    the comparison can fail."""
    model = _model(**kw)
    rows = [_documents([7, 11, 9], seed=1), _documents([12, 4, 11], seed=2)]
    alone, packed = _alone_and_packed(model, rows)
    assert (alone - packed).abs().max() > 1e-3  # unmasked: earlier documents leak in
    model.document_masking_enable(EOS)
    alone, packed = _alone_and_packed(model, rows)
    # RoPE's cos/sin are fp32: a document at another position differs by their rounding (~1e-8 here)
    torch.testing.assert_close(packed, alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("checkpointing, autocast", [(False, False), (True, False), (False, True)],
                         ids=["plain", "checkpointing", "autocast"])
def test_one_mask_per_window_is_built_and_shared_by_the_layers(checkpointing, autocast, monkeypatch):
    """Attention gets one (B, 1, T, T) mask per distinct window, whatever the depth, also when checkpointing
    recomputes the layers in backward, and backward keeps only those: a mask built in each layer (or a bool mask
    SDPA converts in each call) was kept once per layer, 4·B·T² bytes each in fp32. Under autocast the mask is
    built in autocast's dtype (one in fp32 was cast, and kept, once per layer: a review found it). Its rows are
    padded to 8 elements (CUDA's memory-efficient SDPA copies the mask in each call otherwise). Four layers, two
    windows (Qwen2 layer types): two masks, their allowed entries counted by hand."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, model_type="qwen2", sliding_window=5,
                      layer_types=["full_attention", "sliding_attention"] * 2)
    model = LlamaForCausalLM(cfg)
    model.document_masking_enable(EOS)
    if checkpointing:
        model.gradient_checkpointing_enable()
    ids = torch.stack([torch.cat(_documents([7, 11, 9], seed=1)), torch.cat(_documents([12, 4, 11], seed=2))])
    T = ids.shape[1]
    given, kept = {}, {}  # by storage; the tensors are held, so no address is reused
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kw):
        given[attn_mask.untyped_storage().data_ptr()] = attn_mask
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    def pack(t):
        if t.shape == (2, 1, T, T):
            kept[t.untyped_storage().data_ptr()] = t
        return t
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert len(given) == 2
    assert all(m.dtype == (torch.bfloat16 if autocast else torch.float32) and m.stride(2) % 8 == 0
               for m in given.values())
    if not checkpointing:  # (checkpointing keeps no activations; its recomputation is not seen by these hooks)
        assert kept.keys() == given.keys()
    allowed = sorted((m == 0).sum().item() for m in given.values())
    documents = relora_ds.documents.document_ids(ids, EOS)
    same = documents[:, :, None] == documents[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    window = causal & ~torch.ones(T, T, dtype=torch.bool).tril(-5)
    assert allowed == sorted([(same & causal).sum().item(), (same & window).sum().item()])


def test_masking_compiles_to_one_graph_with_checkpointing():
    """torch.compile(fullgraph=True) of a checkpointed, masked model: the masks are built before the first
    layer, not inside a checkpointed region (dynamo refused that as an unsafe side effect: a review found
    it). Loss and gradients equal eager's."""
    import torch._dynamo

    model = _model().float().train()
    model.gradient_checkpointing_enable()
    model.document_masking_enable(EOS)
    ids = torch.stack([torch.cat(_documents([7, 11, 9], seed=1)), torch.cat(_documents([12, 4, 11], seed=2))])
    grads = []
    for run in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad()
        loss = run(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch._dynamo.reset()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_masked_training_step_matches_per_document_training_and_activation_checkpointing():
    """Loss and gradients of a packed window under masking equal those of its documents run alone (the loss
    of each document's own next-token predictions, plus each EOS predicting the next document's first token,
    which is a logit of its own document's pass); activation checkpointing gives the same gradients."""
    model = _model()
    relora_ds.wrap(model, rank=4)
    docs = _documents([9, 8, 10], seed=3)
    window = torch.cat(docs)[None]
    model.document_masking_enable(EOS)
    loss = model(window, labels=window).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    # the oracle: each document alone, its logits concatenated, the same shifted cross-entropy
    logits = torch.cat([model(d[None]).logits[0] for d in docs])
    want = torch.nn.functional.cross_entropy(logits[:-1].float(), window[0, 1:])  # the loss is fp32
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    want_grads = torch.autograd.grad(want, [p for p in model.parameters() if p.requires_grad])
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)

    model.train()  # checkpointing recomputes only in training mode with grad enabled
    model.gradient_checkpointing_enable()
    ckpt = torch.autograd.grad(model(window, labels=window).loss, [p for p in model.parameters() if p.requires_grad])
    for g, w in zip(ckpt, grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=0)


def test_a_window_without_eos_is_one_document_and_masking_can_be_disabled():
    model = _model()
    x = torch.randint(3, 64, (2, 13), generator=torch.Generator().manual_seed(4))
    plain = model(x).logits
    model.document_masking_enable(EOS)
    torch.testing.assert_close(model(x).logits, plain, rtol=1e-12, atol=0)  # no EOS: the causal mask
    docs = _documents([6, 7], seed=5)
    y = torch.cat(docs)[None]
    masked = model(y).logits
    model.document_masking_disable()
    assert (model(y).logits - masked).abs().max() > 1e-3


@pytest.mark.parametrize("eos, match", [(64, r"eos_token_id must be a token id in \[0, 64\), got 64"),
                                        (-1, r"got -1"), (True, r"got True"), ("2", r"got '2'")])
def test_bad_eos_ids_are_named(eos, match):
    with pytest.raises(ValueError, match=match):
        _model().document_masking_enable(eos)


def test_flash_attn_varlen_gets_each_document_as_a_sequence():
    """flash-attn's variable-length kernel takes the batch flattened to (B·T) tokens and cu_seqlens, where each
    sequence starts; a document cut by a window's end is its own sequence in each row. Hand-computed: rows
    [5 5 EOS 7 7] and [8 EOS 9 9 9] hold documents of 3, 2 | 2, 3 tokens."""
    from relora_ds.documents import Documents

    ids = torch.tensor([[5, 5, EOS, 7, 7], [8, EOS, 9, 9, 9]])
    cu_seqlens, max_seqlen = Documents(ids, EOS).varlen()
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 3, 5, 7, 10] and max_seqlen == 3
    # a row that ends with its EOS, and a row with no EOS (one document); the same ids in both rows
    cu_seqlens, max_seqlen = Documents(torch.tensor([[5, EOS, 7, EOS], [5, 5, 5, 5], [6, 6, 6, 6]]), EOS).varlen()
    assert cu_seqlens.tolist() == [0, 2, 4, 8, 12] and max_seqlen == 4


@pytest.mark.parametrize("kw", [{}, {"num_key_value_heads": 2}, {"model_type": "mistral", "sliding_window": 5}],
                         ids=["mha", "gqa", "window"])
def test_document_masking_through_flash_attn_varlen_gives_each_document_its_alone_logits(kw, monkeypatch):
    """Where flash-attn runs (CUDA; stood in for here) document masking goes through flash_attn_varlen_func. A
    stand-in implementing its documented rule (per sequence of cu_seqlens: causal, keys i-left .. i+right, GQA;
    (total, H, hd) layout) gives each document the logits it gets alone on plain SDPA without masking."""
    import sys
    import types

    import relora_ds.model as model_module

    calls = []

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                               window_size=(-1, -1)):
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32 and causal
        starts = cu_seqlens_q.tolist()
        assert max_seqlen_q == max_seqlen_k == max(b - a for a, b in zip(starts, starts[1:]))
        rep = q.shape[1] // k.shape[1]
        out = torch.full_like(q, float("nan"))
        for a, b in zip(starts, starts[1:]):
            qs, ks, vs = q[a:b], k[a:b].repeat_interleave(rep, 1), v[a:b].repeat_interleave(rep, 1)
            i, j = torch.arange(b - a)[:, None], torch.arange(b - a)[None, :]
            left = b - a if window_size[0] < 0 else window_size[0]
            allowed = (j <= i) & (j >= i - left)
            scores = torch.einsum("ihd,jhd->hij", qs, ks) / q.shape[-1] ** 0.5
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            out[a:b] = torch.einsum("hij,jhd->ihd", probs, vs)
        calls.append(len(starts) - 1)
        return out

    model = _model(**kw)
    rows = [_documents([7, 11, 9], seed=1), _documents([12, 4, 11], seed=2)]
    alone, _ = _alone_and_packed(model, rows)  # on SDPA, unmasked documents run alone
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    monkeypatch.setattr(model_module.Attention, "_use_flash", lambda self, q: True)
    model.document_masking_enable(EOS)
    packed = model(torch.stack([torch.cat(docs) for docs in rows])).logits
    assert calls == [6, 6]  # both layers, six documents each
    at = torch.cat([packed[b, start - len(doc):start] for b, docs in enumerate(rows)
                    for doc, start in zip(docs, torch.tensor([len(d) for d in docs]).cumsum(0).tolist())])
    torch.testing.assert_close(at, alone, rtol=1e-6, atol=1e-6)


def test_the_trainer_masks_documents_in_training_and_validation(tmp_path, small_data_dir):
    """--document-masking: a 1-rank run; its logged final validation loss is the masked loss of the model
    rebuilt from its last checkpoint over the same windows (the data's EOS id ends documents), and the
    unmasked loss of that model is another number (the windows hold document ends)."""
    from trainer_utils import read_losses, train1

    from relora_ds import checkpoint, wrap
    from relora_ds.data import PackedTokens, load_manifest

    train1(tmp_path, small_data_dir, document_masking=True, total_steps=6, eval_every=6)
    run = tmp_path / "run"
    _, recs = read_losses(run)
    logged = next(r["val_loss"] for r in recs if r.get("step") == 6 and "val_loss" in r)
    saved = checkpoint.load_config(run / "checkpoints", "step_6")
    assert saved["train"]["document_masking"] is True
    model = LlamaForCausalLM(LlamaConfig(**saved["model"]))
    wrap(model, rank=saved["train"]["rank"], alpha=saved["train"]["alpha"])
    model.load_state_dict(checkpoint.full_state_dict(run / "checkpoints", "step_6"))
    data = PackedTokens(small_data_dir, "validation", seq_len=32)
    batch = torch.stack([data[j * len(data) // 16] for j in range(16)])  # eval_windows: 16 spread evenly
    model.document_masking_enable(load_manifest(small_data_dir)["eos_id"])
    with torch.no_grad():
        masked = model.eval()(batch, labels=batch).loss.item()
        model.document_masking_disable()
        plain = model(batch, labels=batch).loss.item()
    assert masked == pytest.approx(logged, rel=1e-5)
    assert abs(plain - logged) > 1e-3
    # Its export (launch/export.py, the checkpoint's path; the trainer's records the same progress) records the
    # masking, and launch/evaluate.py evaluates as the run did (it evaluated unmasked before).
    import json

    from launch_utils import ROOT, launch_env, run_python
    proc = run_python(ROOT / "launch/export.py", run / "checkpoints", "--out", tmp_path / "hf", env=launch_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "hf" / "relora_ds_progress.json").read_text())["document_masking"] is True
    proc = run_python(ROOT / "launch/evaluate.py", tmp_path / "hf", "--data-dir", small_data_dir, "--seq-len", "32",
                      "--windows", "16", "--dtype", "float32", env=launch_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1])["loss"] == pytest.approx(logged, rel=1e-4)


def test_data_whose_bos_is_its_eos_is_refused_for_document_masking(tmp_path, small_data_dir):
    """One id for BOS and EOS (OPT-style tokenizers): each document's BOS would end a document of one token
    (a review found the boundaries silently wrong). Refused at start-up, naming the reason."""
    import json
    import shutil

    from trainer_utils import train1

    data = tmp_path / "data"
    shutil.copytree(small_data_dir, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["bos_id"] = manifest["eos_id"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    proc = train1(tmp_path, data, check=False, document_masking=True, total_steps=4)
    assert proc.returncode != 0 and "one id" in proc.stderr and "BOS and EOS" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("manifest, problem", [
    ({"bos_id": 1, "eos_id": 2, "unk_id": 0, "warnings": {"unk_tokens": 5}}, None),
    ({"bos_id": None, "eos_id": 2, "unk_id": 2, "warnings": {"unk_tokens": 0}}, None),  # GPT-2: unk only named
    ({"bos_id": 2, "eos_id": 2, "unk_id": 0, "warnings": {"unk_tokens": 0}}, r"one id \(2\) for BOS and EOS"),
    ({"bos_id": None, "eos_id": 2, "unk_id": 2, "warnings": {"unk_tokens": 7}},
     r"one id \(2\) for <unk> and EOS, and its text holds 7 unknown pieces"),
], ids=["own_eos", "unk_named_eos_none_produced", "bos_is_eos", "unk_is_eos_and_produced"])
def test_data_whose_eos_ids_are_not_only_document_ends_is_named(manifest, problem):
    from relora_ds.data.manifest import document_ends_problem

    found = document_ends_problem(manifest)
    assert found is None if problem is None else re.search(problem, found), found


def test_the_mask_of_each_window_and_dtype_is_the_brute_force_rule():
    """Documents.mask(window, dtype), against a loop over (row, i, j): 0 where j <= i, both in one document (a
    document ends with its EOS) and i - j < window, else -inf; in the dtype asked for, each (window, dtype)
    its own (an fp32 mask handed to bf16 activations, or the other way, would be one of another dtype)."""
    from relora_ds.documents import Documents

    ids = torch.tensor([[5, EOS, 7, 7, EOS, 9], [EOS, 4, 4, 4, 4, 4]])
    docs = Documents(ids, EOS)
    for window in (None, 2, 3):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            mask = docs.mask(window, dtype)
            assert mask.dtype == dtype and mask.shape == (2, 1, 6, 6)
            for b, row in enumerate(ids.tolist()):
                doc = [sum(t == EOS for t in row[:k]) for k in range(6)]  # EOSes before token k
                for i in range(6):
                    for j in range(6):
                        ok = j <= i and doc[i] == doc[j] and (window is None or i - j < window)
                        assert mask[b, 0, i, j].item() == (0.0 if ok else float("-inf")), (window, dtype, b, i, j)
