"""Next-token cross-entropy through the lm_head without materializing the (tokens x vocab) logits.

The plain path keeps 4 s V bytes of fp32 log-probs per sequence for backward and adds 8 s V of logits and
logit gradients at its start: with activation checkpointing these are most of the activation memory
(relora_ds/memory.py). Here the tokens go through the head in chunks: each chunk's logits are made,
reduced to its loss, turned into the gradients of the hidden states and of the head weight, and freed,
all in the forward (the approach of Liger-Kernel's fused linear cross-entropy, in plain torch). Backward
only scales the stored gradients. Kept for backward: the hidden-state gradient (the hidden states' size)
and one fp32 head-weight gradient per micro-batch (4 V d bytes). Transient: one chunk's logits, 6 bytes per
chunk token per vocab entry (fp32 logits, and the activation-dtype GEMM output or gradient beside them).

Numerics follow ``F.cross_entropy(F.linear(h, W).float(), y)``: logits in the activations' dtype, softmax
and loss in fp32, the logit gradient cast back to the activations' dtype before the two GEMMs, the weight
gradient summed over chunks in fp32. fp16 is the exception: its gradients are made before the loss scale
(DeepSpeed's fp16 optimizer multiplies the loss by up to 2^16) and would underflow in fp16's range, so
there the gradient GEMMs run and the hidden-state gradient is kept in fp32, and backward scales before it
casts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import relora_kernels

IGNORE_INDEX = -100


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float16 else dtype


def _chunk_loss_and_grads(h, weight, y, n_valid, need_dh, need_dw, dh_out, dw_acc, weight_g):
    """One chunk: its summed loss (fp32); writes d(mean loss)/dh into dh_out and adds d/dW into dw_acc.
    weight_g: the weight in the gradients' dtype (_grad_dtype)."""
    logits = F.linear(h, weight).float()
    lse = torch.logsumexp(logits, dim=-1)
    valid = y != IGNORE_INDEX
    safe_y = torch.where(valid, y, 0)
    target = logits.gather(1, safe_y[:, None])[:, 0]
    loss = ((lse - target) * valid).sum()
    if need_dh or need_dw:
        grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
        grad[torch.arange(len(y), device=y.device), safe_y] -= 1.0
        grad.mul_((valid / n_valid)[:, None])
        grad = grad.to(weight_g.dtype)
        if need_dh:
            dh_out.copy_(grad @ weight_g)
        if need_dw:
            dw_acc.add_(grad.t() @ h.to(weight_g.dtype))
    return loss


def _chunked(hidden, weight, targets, chunk_size, need_dh, need_dw):
    """(mean loss, d loss/d hidden or None, fp32 d loss/d weight or None), one chunk of logits at a time."""
    n_valid = (targets != IGNORE_INDEX).sum().clamp_min(1).to(torch.float32)
    grad_dtype = _grad_dtype(hidden.dtype)
    weight_g = weight.to(grad_dtype) if need_dh or need_dw else None  # a copy for fp16 only
    dh = torch.empty_like(hidden, dtype=grad_dtype) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        stop = start + chunk_size
        loss += _chunk_loss_and_grads(hidden[start:stop], weight, targets[start:stop], n_valid, need_dh, need_dw,
                                      dh[start:stop] if need_dh else None, dw, weight_g)
    return loss / n_valid, dh, dw


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        loss, dh, dw = _chunked(hidden, weight, targets, chunk_size, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            raise RuntimeError("the chunked loss computes its gradients in forward: it has no second derivative "
                               "(create_graph=True); use the plain path (loss_chunk_size=0)")
        dh, dw = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        # grad_loss is 1 or a loss scale; scale in the stored gradient's dtype, then cast (fp16: 2^16 is inf).
        dh = (dh * grad_loss.to(dh.dtype)).to(hidden_dtype) if dh is not None else None
        if dw is not None and weight_dtype == torch.float16:
            dw = (dw * grad_loss).to(weight_dtype)
        elif dw is not None:  # cast first: no second fp32 copy of the weight gradient
            dw = dw.to(weight_dtype, copy=True).mul_(grad_loss)
        return dh, dw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int) -> torch.Tensor:
    """Mean cross-entropy of ``F.linear(hidden, weight)`` against ``targets`` (label -100 ignored), computed
    ``chunk_size`` tokens at a time. hidden: (N, d); weight: (V, d); targets: (N,) integer.

    Gradients reach ``hidden`` and ``weight`` as with the plain path. Under autocast the GEMMs run in the
    autocast dtype, as ``F.linear`` would. With no valid target the loss is 0 (the plain path gives NaN)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size!r}")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"expected hidden (N, d), weight (V, d), targets (N,); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    device_type = hidden.device.type
    hidden, weight = relora_kernels.autocast_inputs(device_type, hidden, weight)
    with torch.autocast(device_type, enabled=False):
        if not torch.is_grad_enabled():  # evaluation: the loss alone (ctx.needs_input_grad ignores no_grad)
            return _chunked(hidden, weight, targets, chunk_size, False, False)[0]
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size)
