"""relora_ds/loss.py: the chunked lm_head cross-entropy against the plain path (F.linear + F.cross_entropy)
evaluated in float64: loss and both gradients, any chunking, ignored labels, bf16, autocast, eval."""
import pytest
import torch
import torch.nn.functional as F

from relora_ds import LlamaConfig, LlamaForCausalLM
from relora_ds.loss import linear_cross_entropy


def _inputs(n=37, d=24, v=53, dtype=torch.float32, seed=0, ignore=(3, 4, 5, 30)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * d ** -0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[list(ignore)] = -100
    return h, w, y


def _plain(h, w, y, dtype=None):
    """The spec: what LlamaForCausalLM computes without chunking (logits in h's dtype, loss in fp32)."""
    hh, ww = (h, w) if dtype is None else (h.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_())
    loss = F.cross_entropy(F.linear(hh, ww).float(), y, ignore_index=-100)
    return loss, *torch.autograd.grad(loss, (hh, ww))


def _chunked(h, w, y, chunk, scale=1.0):
    loss = linear_cross_entropy(h, w, y, chunk)
    return loss, *torch.autograd.grad(loss * scale, (h, w))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("chunk", [1, 7, 16, 37, 100])
def test_fp32_matches_plain_for_any_chunking(chunk):
    h, w, y = _inputs()
    want = _plain(h, w, y, torch.float64)
    got = _chunked(h, w, y, chunk)
    assert got[0].item() == pytest.approx(want[0].item(), rel=1e-6)
    assert _rel(got[1], want[1]) < 1e-6 and _rel(got[2], want[2]) < 1e-6
    assert got[1].dtype == h.dtype and got[2].dtype == w.dtype


def test_a_chunk_with_only_ignored_labels_and_a_scaled_loss():
    h, w, y = _inputs(ignore=range(8, 16))  # chunk 8 makes tokens 8..15 one chunk with nothing to predict
    want = _plain(h, w, y, torch.float64)
    got = _chunked(h, w, y, 8, scale=3.0)
    assert got[0].item() == pytest.approx(want[0].item(), rel=1e-6)
    assert _rel(got[1], 3 * want[1]) < 1e-6 and _rel(got[2], 3 * want[2]) < 1e-6
    assert torch.count_nonzero(got[1][8:16]) == 0  # ignored positions get no gradient


def test_bf16_is_as_accurate_as_the_plain_bf16_path():
    h, w, y = _inputs(n=300, d=64, v=500, dtype=torch.bfloat16, ignore=())
    want = _plain(h, w, y, torch.float64)
    plain = _plain(h, w, y)
    got = _chunked(h, w, y, 64)
    for i in range(3):
        assert _rel(got[i], want[i]) <= 1.5 * _rel(plain[i], want[i]) + 1e-6, i


def test_no_logits_beyond_one_chunk_are_ever_made(monkeypatch):
    """The point of the chunking: every (tokens x vocab) product has at most chunk rows."""
    import relora_ds.loss as loss_mod
    rows, real = [], F.linear

    def linear(x, w, *a):
        rows.append(x.shape[0])
        return real(x, w, *a)
    monkeypatch.setattr(loss_mod.F, "linear", linear)
    h, w, y = _inputs(n=100)
    _chunked(h, w, y, 16)
    assert rows == [16] * 6 + [4]


def test_eval_gives_the_same_loss_without_gradients(monkeypatch):
    """Under no_grad (evaluation) no chunk computes a gradient (the softmax and two GEMMs a chunk, for nothing)."""
    from relora_ds import loss as loss_mod

    needs, real = [], loss_mod._chunk_loss_and_grads
    monkeypatch.setattr(loss_mod, "_chunk_loss_and_grads", lambda *a: needs.append(a[4:6]) or real(*a))
    h, w, y = _inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y, 10)
    assert not loss.requires_grad and needs == [(False, False)] * 4
    assert loss.item() == pytest.approx(_plain(h, w, y, torch.float64)[0].item(), rel=1e-6)


def test_bf16_keeps_bf16_gradients_for_backward():
    """What forward keeps for backward in bf16: the hidden-state gradient in bf16 (the hidden states' size, not
    twice it in fp32) and the head-weight gradient summed in fp32; backward hands both back in bf16."""
    h, w, y = _inputs(n=64, dtype=torch.bfloat16)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        loss = linear_cross_entropy(h, w, y, 16)
    assert sorted(kept) == sorted([((64, 24), torch.bfloat16), ((53, 24), torch.float32)])
    loss.backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16


def test_autocast_runs_the_gemms_in_the_autocast_dtype():
    h, w, y = _inputs(n=64, d=32, v=80)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100)
        got = linear_cross_entropy(h, w, y, 16)
    assert got.item() == pytest.approx(want.item(), rel=1e-3)
    assert got.item() != pytest.approx(_plain(h, w, y)[0].item(), rel=1e-6)  # i.e. not computed in fp32
    gh, gw = torch.autograd.grad(got, (h, w))
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    want_h, want_w = torch.autograd.grad(want, (h, w))  # the plain path's gradients under the same autocast
    for g, ref in ((gh, want_h), (gw, want_w)):
        assert ((g - ref).norm() / ref.norm()).item() <= 1e-2  # seen: 0 and 2.6e-3 (bf16 rounding)


@pytest.mark.parametrize("bad", [0, -4, True, 8.0])
def test_bad_chunk_size_is_an_error(bad):
    h, w, y = _inputs()
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        linear_cross_entropy(h, w, y, bad)
    model = LlamaForCausalLM(LlamaConfig.preset("debug"))
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        model.chunked_loss_enable(bad)


def test_model_chunked_loss_same_loss_and_gradients():
    torch.manual_seed(0)
    cfg = LlamaConfig.preset("debug")
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 33))
    labels = ids.clone()
    labels[1, 5:12] = -100
    plain = model(ids, labels=labels)
    plain.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.chunked_loss_enable(20)  # 96 predicted tokens: chunks straddle the sequences
    out = model(ids, labels=labels)
    out.loss.backward()
    assert out.logits is None
    assert out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)
    assert max(_rel(p.grad, want[n]) for n, p in model.named_parameters()) < 1e-5
    assert model(ids).logits.shape == (3, 33, cfg.vocab_size)  # without labels: logits as before


@pytest.mark.parametrize("h_scale", [1.0, 1e-3])
def test_fp16_under_a_loss_scale_matches_the_plain_path(h_scale):
    """DeepSpeed's fp16 engine backpropagates loss * 2^16. The chunked loss makes its gradients before that
    scale exists: in fp16 they underflowed (dW 17% off) and 2^16 itself overflowed to inf (dh NaN). Against
    an fp32 reference, the chunked fp16 gradients must be at least as good as the plain fp16 path's; also with
    small hidden states, whose head-weight gradient (1e-8 to 1e-7 an entry, about fp16's smallest subnormal)
    underflows unless scaled first."""
    torch.manual_seed(0)
    N, d, V = 4096, 32, 3000
    h0, W0 = (torch.randn(N, d) * h_scale).half(), (torch.randn(V, d) * 0.02).half()
    y = torch.randint(0, V, (N,))
    h, W = h0.float().requires_grad_(), W0.float().requires_grad_()
    F.cross_entropy(F.linear(h, W), y).backward()
    for scale in (2.0 ** 15, 2.0 ** 16):
        errs = {}
        for chunked in (False, True):
            hc, Wc = h0.clone().requires_grad_(), W0.clone().requires_grad_()
            loss = linear_cross_entropy(hc, Wc, y, 1024) if chunked else F.cross_entropy(F.linear(hc, Wc).float(), y)
            (loss * scale).backward()
            assert hc.grad.dtype == Wc.grad.dtype == torch.float16
            errs[chunked] = [((g.float() / scale - ref).norm() / ref.norm()).item()
                             for g, ref in ((hc.grad, h.grad), (Wc.grad, W.grad))]
        assert all(c <= 1.2 * p for c, p in zip(errs[True], errs[False])), (scale, errs)
        assert max(errs[True]) < 1e-3, (scale, errs)


def test_second_derivative_is_refused():
    h = torch.randn(6, 4, requires_grad=True)
    W = torch.randn(5, 4, requires_grad=True)
    loss = linear_cross_entropy(h, W, torch.randint(0, 5, (6,)), 4)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_no_valid_target_at_all_gives_zero_loss_and_zero_gradients():
    """As documented (the plain path's 0/0 would be NaN and poison the step): a micro-batch whose labels are
    all ignored contributes loss 0 and no gradient, with and without autograd."""
    h, w, y = _inputs(ignore=range(37))
    loss, dh, dw = _chunked(h, w, y, 5)
    assert loss.item() == 0.0 and torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0
    with torch.no_grad():
        assert linear_cross_entropy(h, w, y, 5).item() == 0.0


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_only_one_input_needing_a_gradient_gets_the_plain_paths(frozen):
    """A frozen lm_head (or hidden states that need none): the other input still gets F.cross_entropy's
    gradient (fp64 oracle). A mutation audit swapped the two needs_input_grad flags with every test passing:
    a frozen head would have left the whole model below it without a gradient."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 24, generator=g, dtype=torch.float64).requires_grad_(frozen != "hidden")
    w = (torch.randn(53, 24, generator=g, dtype=torch.float64) * 0.2).requires_grad_(frozen != "weight")
    y = torch.randint(0, 53, (37,), generator=g)
    live = w if frozen == "hidden" else h
    want, = torch.autograd.grad(F.cross_entropy(F.linear(h, w), y), live)
    got, = torch.autograd.grad(linear_cross_entropy(h, w, y, 8), live)
    torch.testing.assert_close(got, want)
