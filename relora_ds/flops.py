"""Model FLOPs of a training step, for the TFLOP/s and MFU columns of metrics.jsonl.

Per token, the matrix products the step's algorithm needs (PaLM, Chowdhery et al. 2022, App. B: 6N + 12·L·h·T
for dense training), whatever kernels compute them:
- each weight matrix costs 2 FLOPs per parameter in the forward and 2 for the input gradient, and 2 more for
  its own gradient only if it trains: a trainable matrix 6, a frozen ReLoRA base (bf16 or int8) 4, the LoRA
  factors 6. The input embedding is a lookup and costs nothing (unless tied to the head).
- attention: scores and their weighted sum, 4·h·T per layer in the forward and twice that in the backward,
  12·L·h·T; the causal mask is not credited, as in PaLM. A layer with a sliding window w (Mistral, Qwen2/3)
  attends min(T, w) keys per query, not T: 12·h·min(T, w) for it.
Not counted: norms, softmax, element-wise ops and recomputation (activation checkpointing); so this is MFU,
not hardware FLOPs utilization. Checked against torch.utils.flop_counter on the reference path
(tests/test_flops.py). The torch/Triton paths may do more or fewer products for the same step (a merged
weight for few tokens, say); they do not change the model's FLOPs.
"""
from __future__ import annotations

import warnings

import torch

from .train_config import ConfigWarning

# Dense bf16 peak TFLOP/s per GPU (vendor datasheets, without sparsity), matched in this order against
# torch.cuda.get_device_name(). Anything else: set peak_tflops in the recipe to get the mfu column.
# fp16's dense peak is the same on all of them.
PEAK_BF16_TFLOPS = (("H100 NVL", 835.5), ("H200 NVL", 835.5), ("H100 PCIe", 756.0), ("H800 PCIe", 756.0),
                    ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("A100", 312.0), ("A800", 312.0),
                    ("L40S", 362.05))


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per trained token of ``model`` (ours or a wrapped one) on the data's windows of
    ``seq_len + 1`` tokens: the model runs all ``seq_len + 1`` positions (the head only the ``seq_len``
    predicted ones under the chunked loss) and is trained on ``seq_len`` predictions, the tokens that
    tokens/s counts. Counts whole parameters under ZeRO-3, whose partitioned
    parameters are empty tensors (``ds_shape``, ``ds_numel``)."""
    cfg = model.config
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    head_weight = model.lm_head.weight
    linear = head = 0
    for p in model.parameters():
        if len(getattr(p, "ds_shape", p.shape)) != 2 or (p is embed and not tied):
            continue
        cost = (6 if p.requires_grad else 4) * getattr(p, "ds_numel", p.numel())
        if p is head_weight:
            head += cost
        else:
            linear += cost
    positions = seq_len + 1
    # The chunked loss (chunked_loss_enable) runs the head on the seq_len predicted positions only.
    head_positions = seq_len if getattr(model, "loss_chunk_size", 0) else positions
    window_of = getattr(cfg, "window_of", lambda layer: None)
    keys = sum(min(positions, window_of(layer) or positions) for layer in range(cfg.num_hidden_layers))
    per_position = linear + 12 * cfg.num_attention_heads * cfg.head_dim * keys
    return (per_position * positions + head * head_positions) / seq_len


def peak_tflops(device_name: str | None) -> float | None:
    """The table's dense bf16/fp16 peak for a CUDA device name, or None."""
    for key, value in PEAK_BF16_TFLOPS:
        if device_name and key in device_name:
            return value
    return None


def mfu_peak(device_name: str, half: bool, warn: bool = True) -> float | None:
    """MFU's denominator for a run on `device_name` without a recipe peak_tflops: the table's peak when the
    run trains in bf16/fp16, None in fp32 (no tensor-core peak to compare with) or on a GPU the table lacks,
    which gets a warning (where `warn`) rather than a silently missing mfu column."""
    if not half:
        return None
    peak = peak_tflops(device_name)
    if peak is None and warn:
        warnings.warn(f"no mfu column: the peak TFLOP/s of {device_name!r} is not in relora_ds/flops.py's table; "
                      "give peak_tflops (its dense bf16/fp16 peak per GPU)", ConfigWarning, stacklevel=2)
    return peak
