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


@pytest.mark.parametrize("checkpointing", [False, True])
def test_one_mask_per_window_is_built_and_shared_by_the_layers(checkpointing):
    """Backward keeps one (B, 1, T, T) mask per distinct window, whatever the depth: a mask built in each layer
    (or a bool mask SDPA converts in each call) kept one per layer, 4·B·T² bytes each in fp32. Four layers, two
    windows (Qwen2 layer types): two masks."""
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
    masks = {}
    def pack(t):  # the storages of every (B, 1, T, T) tensor autograd keeps, and their values
        if t.shape == (2, 1, T, T):
            masks[t.untyped_storage().data_ptr()] = t.detach().clone()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids).loss.backward()
    assert len(masks) == 2
    kept = sorted(((m == 0).sum().item() for m in masks.values()))
    allowed = relora_ds.model.document_ids(ids, EOS)
    same = allowed[:, :, None] == allowed[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    window = causal & ~torch.ones(T, T, dtype=torch.bool).tril(-5)
    assert kept == sorted([(same & causal).sum().item(), (same & window).sum().item()])


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


def test_flash_attention_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"document masking runs on torch SDPA.*use attn_implementation 'auto' or 'sdpa'"):
        _model(attn_implementation="flash").document_masking_enable(EOS)


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
    batch = torch.stack([data[i] for i in range(16)])  # eval_windows: 16 equal windows
    model.document_masking_enable(load_manifest(small_data_dir)["eos_id"])
    with torch.no_grad():
        masked = model.eval()(batch, labels=batch).loss.item()
        model.document_masking_disable()
        plain = model(batch, labels=batch).loss.item()
    assert masked == pytest.approx(logged, rel=1e-5)
    assert abs(plain - logged) > 1e-3


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
    proc = train1(tmp_path, data, check=False, document_masking=True, total_steps=2)
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
