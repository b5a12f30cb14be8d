"""Selective activation checkpointing: a recomputed decoder layer keeps its GEMM and attention outputs.

Full checkpointing (``--activation-checkpointing``) keeps only each layer's input and runs the whole layer
again in backward: every GEMM twice. The selective policy (``--activation-checkpointing-policy selective``;
torchtitan's op-level "selective AC", Korthikanti et al. 2022's idea at op granularity) keeps, during the
forward, the outputs of

- the big matmuls (``aten.mm``/``aten.addmm``): the seven projections' ``X Wᵀ`` and ``X Aᵀ``, the
  full-rank layers' products in the warm start, and the merged weight's products;
- attention: torch SDPA's fused kernels (flash, memory-efficient, cuDNN, CPU flash) and flash-attn's
  (when it is installed and registers its ops with torch, flash-attn >= 2.7);
- the Triton layer path's forward (``RELORA_KERNELS=triton``), which launches through a registered torch op
  under the policy's dispatch mode (relora_kernels.linear.FORWARD_OP): its ``Y`` and ``S = X Aᵀ``;

and recomputes the rest in backward: RMSNorm, RoPE, SiLU and the gating product, the residual adds, the
LoRA dropout mask, and the rank-r products (``S Bᵀ``, ``s·B A``), whose contraction over r is the smallest
dimension of the product, so recomputing them costs ``r/in`` of the big GEMM's. What backward recomputes
is thus a small fraction of a forward, against a whole one with full checkpointing; what a layer keeps is
about half of what it keeps without checkpointing (``relora_ds/memory.py`` has the per-layer bytes).

Mechanism: torch's ``create_selective_checkpoint_contexts`` (public since torch 2.4, setup.py's floor) as ``checkpoint``'s
``context_fn``. It sees torch ops only: the BLAS path (``auto``'s default on CPU and CUDA) and the reference
are torch ops throughout, and the Triton path's launches are inside its two registered ops. A kept output
must not be written in place afterwards (torch checks it and raises where the write goes through the tensor
or a view of it, not through every alias: see check_linear): the BLAS layer path computes its outputs out of
place under a dispatch mode (kernels/torch_linear.py).
"""
from __future__ import annotations

import functools

import torch

POLICIES = ("full", "selective")

_MATMULS = ("aten::mm", "aten::addmm")
# The Triton layer path's forward (kernels/linear.py): Y = X Wᵀ + s·S Bᵀ (+ b) and S, one op.
_LORA_LAYERS = ("relora_kernels::lora_linear_forward",)
# Fused attention kernels, by schema name (no import of flash_attn needed): their outputs (and the logsumexp
# backward needs) are kept. torch's math attention is a composite of bmm and softmax; it recomputes.
_ATTENTION = ("aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
              "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_fused_attention_overrideable",
              "flash_attn::_flash_attn_forward", "flash_attn::_flash_attn_varlen_forward")


def keeps(func, args, rank: int = 0) -> bool:
    """Whether the selective policy keeps ``func``'s output: an out-of-place matmul ``(m, k) @ (k, n)`` whose
    contraction k is above ``rank`` (the largest LoRA rank of the model, 0 without LoRA: a product over k <=
    rank is a rank-r one, cheap to recompute), fused attention, or the Triton LoRA layer's forward."""
    schema = func._schema
    if schema.is_mutable:  # an in-place or out= op: its output is a tensor something else owns
        return False
    if schema.name in _ATTENTION or schema.name in _LORA_LAYERS:
        return True
    if schema.name in _MATMULS:
        return args[-2].shape[1] > rank  # mm(a, b), addmm(bias, a, b): k = a's columns
    return False


def _selective_policy(ctx, func, *args, rank, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy
    return CheckpointPolicy.MUST_SAVE if keeps(func, args, rank) else CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts(rank: int = 0, biased: str | None = None):
    """``checkpoint(..., context_fn=functools.partial(selective_contexts, rank=r, biased=name))``: the forward's
    and the recompute's contexts, for a model whose largest LoRA rank is ``r`` (0: none). ``biased``: a
    module of the model that may pass a bias to ``F.linear`` (:func:`biased_linear`), checked against a replaced
    ``F.linear`` at every checkpointed call (:func:`check_linear`: DeepSpeed replaces it as late as
    ``deepspeed.initialize``)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    if biased is not None:
        check_linear(biased)
    return create_selective_checkpoint_contexts(functools.partial(_selective_policy, rank=rank))


def lora_rank(module: torch.nn.Module) -> int:
    """The largest LoRA rank among ``module``'s adapted layers (their ``rank``, else ``lora_A``'s rows: its
    whole shape under ZeRO-3, whose partitioned tensors are empty outside a gather); 0 if none."""
    ranks = [m.rank if isinstance(getattr(m, "rank", None), int) else getattr(m.lora_A, "ds_shape", m.lora_A.shape)[0]
             for m in module.modules() if isinstance(getattr(m, "lora_A", None), torch.Tensor)]
    return max(ranks, default=0)


def biased_linear(module: torch.nn.Module) -> str | None:
    """The name of a layer of ``module`` that may call ``F.linear`` with a bias (an ``nn.Linear``, or a ReLoRA
    layer, whose reference path does), or None."""
    return next((name or type(m).__name__ for name, m in module.named_modules()
                 if isinstance(getattr(m, "bias", None), torch.Tensor)
                 and (isinstance(m, torch.nn.Linear) or hasattr(m, "lora_A"))), None)


def check_linear(biased: str | None) -> None:
    """Refuse a replaced ``torch.nn.functional.linear`` where a layer (``biased``, see :func:`biased_linear`)
    may pass it a bias. DeepSpeed's ZeRO-3 (``memory_efficient_linear``, on by default; the trainer turns it
    off for this policy) replaces it for the rest of the process, at ``zero.Init`` or ``deepspeed.initialize``,
    with a version that adds the bias in place into its matmul's output: the output the policy keeps, through
    a view torch's mutation check does not see, so the recompute would add the bias twice."""
    if biased is None or torch.nn.functional.linear is torch._C._nn.linear:
        return
    raise RuntimeError(f"selective activation checkpointing: torch.nn.functional.linear has been replaced (by "
                       f"DeepSpeed's ZeRO-3 memory_efficient_linear?) and {biased} has a bias, which that version "
                       "adds in place into the matmul output the policy keeps (wrong gradients); set "
                       "zero_optimization.memory_efficient_linear to false in the DeepSpeed config (DeepSpeed never "
                       "undoes the replacement: in a process where an earlier engine made it, restore "
                       "torch.nn.functional.linear = torch._C._nn.linear), or use the full policy")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"activation checkpointing policy {policy!r} is not valid; valid policies: "
                         f"{', '.join(map(repr, POLICIES))} (full: recompute each layer whole; selective: keep its "
                         "matmul and attention outputs, recompute the rest)")
    return policy


def hf_checkpointing_kwargs(model: torch.nn.Module) -> dict:
    """The selective policy for a Hugging Face transformers model (the FSDP2 and HF Trainer paths):
    ``model.activation_checkpointing_enable(activation_checkpointing_kwargs=hf_checkpointing_kwargs(model))``
    (``gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`` before transformers 5.x; they go to
    ``torch.utils.checkpoint.checkpoint`` around each decoder layer). Call it after ``relora_ds.wrap``: the
    rank-r products are told apart by the model's largest LoRA rank. A replaced ``F.linear`` is refused at
    each checkpointed call (:func:`check_linear`)."""
    biased = biased_linear(model)
    check_linear(biased)
    return {"use_reentrant": False,
            "context_fn": functools.partial(selective_contexts, rank=lora_rank(model), biased=biased)}
