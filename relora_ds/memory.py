"""The per-GPU memory model of a training run: model states by ZeRO stage and offload, activations per
sequence, and the peak of a run phase by phase (launch/memory_table.py prints it for the presets,
launch/preflight.py applies it to a run's own recipe).

Model states (bytes per parameter; Rajbhandari et al. 2020, ZeRO, Sec. 3 with K=12), N = data-parallel
ranks. Trainable parameters: bf16 weight 2 + bf16 grad 2 + fp32 master 4 + Adam m 4 + Adam v 4. Frozen
parameters (the ReLoRA base weights): bf16 weight 2, nothing else (no master, no grad, no Adam state).
    ZeRO 0: 16 T           ZeRO 1: 4 T + 12 T/N      ZeRO 2: 2 T + 14 T/N      ZeRO 3: 16 T/N
    plus frozen 2 F (ZeRO 0-2) or 2 F/N (ZeRO 3); with --quantize int8 F or F/N, plus the per-row scales
    (2 bytes per output row, replicated).
The warm start is full-rank (T = all parameters, F = 0); the ReLoRA phase trains LoRA A/B of the 7
projections, embeddings, lm_head and norms (T) and freezes the projections' weights (F).

Activations, bytes per sequence of s tokens, bf16, SDPA/flash attention (no s x s score matrix), counted
from relora_ds/model.py's autograd graph. Kept for backward after the forward:
    per layer      24 s h + 8 s i  [+ 14 s r in the ReLoRA phase]
      attention: RMSNorm 8 s h (fp32 copy of its input 4, normalized bf16 2, scaled output 2),
                 q, k, v after RoPE 6 s h (kv heads = heads), SDPA output 2 s h (o_proj's input is a
                 view of it: SDPA returns (B, T, H, hd) memory)
      MLP:       RMSNorm 8 s h; gate output, SiLU(gate), up output, down_proj input: 4 x 2 s i
      LoRA:      x A^T (s x r, bf16) kept for each of the 7 adapted projections: 7 x 2 s r
      Qwen3's q/k norms (qk_norm): 6 s (heads + kv heads) head_dim
      LoRA dropout (--dropout, default 0.1 as in the paper recipes; launch/preflight.py's estimate, from the
      run's own layers): each adapted projection's
      keep-mask of its input, 1 byte per element (6 s h + s i), 3 with the twin (reference path, and an int8
      base's BLAS path under dropout, which falls back to it: the dropped-out bf16 copy and the mask)
    final norm 8 s h, fp32 log-probs 4 s V
    with activation checkpointing (--activation-checkpointing), each layer keeps only its input: 2 s h
    selective (--activation-checkpointing-policy selective, relora_ds/checkpointing.py): the input and the
    outputs of its matmuls and attention: 14 s h + 4 s i [+ 14 s r]
      input 2 s h; q, k, v (before RoPE) 6 s h; SDPA output 2 s h; o_proj and down_proj outputs 4 s h;
      gate and up outputs 4 s i; x A^T of the 7 projections 14 s r (attention's logsumexp, 4 s heads, is
      left out here as in the other cases)
The peak comes in backward, at its start or (checkpointing) while a layer is recomputed:
    plain:          kept + 8 s V   (bf16 logits 2, their bf16 gradient 2, the fp32 log-prob gradient 4)
    checkpointing:  max(kept + 8 s V, L 2 s h + one layer's 24 s h + 8 s i [+ 14 s r] + 8 s h of gradients)
    selective:      max(kept + 8 s V, L (14 s h + 4 s i [+ 14 s r]) + 12 s h + 4 s i + 8 s h of gradients):
                    a recomputed layer adds what it saves for backward beyond what it kept (both RMSNorms'
                    16 s h, q and k after RoPE 4 s h, SiLU(gate) and down_proj's input 4 s i) and frees the
                    kept outputs its backward does not use once the recompute has read them (q and k before
                    RoPE, o_proj's and down_proj's outputs: 8 s h)
With the chunked loss (--loss-chunk-size c, relora_ds/loss.py) no logits are kept: 4 s V becomes the
hidden-state gradient 2 s h, 8 s V becomes 2 s h, and each micro-batch holds 4 V h (the fp32 head-weight
gradient) plus the larger of one chunk's logits 6 c V (forward) and the gradient's bf16 copy 2 V h.
Checked against torch.autograd.graph.saved_tensors_hooks (kept part) and against the heap in use (glibc
mallinfo2, sampled at every autograd node and module call) on CPU: tests/test_memory_table.py.
Not counted: the CUDA context, NCCL and DeepSpeed bucket buffers, allocator fragmentation, ZeRO-3
gather buffers and transient fp32 gradient partitions; the reserve (usable_bytes: 10% + 2 GiB, memory_table.py's
`--reserve-gb`) covers them.

Offload (memory_table.py's `--offload`; a run's DeepSpeed config, as ds_configs/zero2_offload.json and
zero3_offload.json; the names the trainer's start-up line prints). The GPU keeps the bf16 weights of the
trainable parameters (and at ZeRO-1 their full bf16 gradients, reduced only at the accumulation boundary):
    optimizer (ZeRO 1-3): 4 T (ZeRO 1), 2 T (ZeRO 2) or 2 T/N (ZeRO 3); fp32 master, grad partition, m, v:
        16 T/N to host
    optimizer+parameters (ZeRO 3 only): 0; the bf16 partitions 2 T/N and the frozen ones go to host as well
    parameters (ZeRO 3 only, the optimizer on the GPU): 14 T/N (gradient, fp32 master, m, v partitions); the bf16
        partitions 2 T/N and the frozen ones to host (DeepSpeed has no estimator for this case)
ZeRO-2 and 3 are DeepSpeed's estimate_zero2/zero3_model_states_mem_needs without their largest-layer working
set (tests/test_memory_table.py; DeepSpeed has no ZeRO-1 estimate). Host RAM per GPU (memory_table.py shows
it with --offload or --quantize): those offloaded bytes, the int8 base's merge residual (1 byte per frozen
parameter, whole on every rank: relora_ds/quant.py) and, at start-up and the warm-start switch, the model
every rank holds whole in fp32 below ZeRO-3 (4 bytes per parameter of the full-rank model; ZeRO-3 builds it
partitioned: relora_ds/zero_init.py).
"""
from __future__ import annotations

from relora_ds.model_config import LlamaConfig

GIB = 2**30
# What the ZeRO optimizer moves to host memory, and the stages DeepSpeed allows it at (relora_ds/zero_reset.offloaded
# prints the same names).
OFFLOAD_STAGES = {"none": (0, 1, 2, 3), "optimizer": (1, 2, 3), "parameters": (3,), "optimizer+parameters": (3,)}


def param_counts(cfg: LlamaConfig, rank: int) -> dict[str, int]:
    """Parameter counts: projections (LoRA targets), LoRA A/B at ``rank``, and the rest (embeddings, head, norms)."""
    h, i, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out): q k v o gate up down
    return {"projections": L * sum(a * b for a, b in shapes),
            "projection_rows": L * sum(b for _, b in shapes),
            "lora": L * sum(rank * (a + b) for a, b in shapes),
            "other": 2 * V * h + (2 * L + 1) * h}


def frozen_bytes(counts: dict[str, int], quantize: str | None) -> tuple[int, int]:
    """Device bytes of the frozen projection weights as (ZeRO-3-partitioned parameters, replicated buffers):
    bf16 (2 per parameter, 0), or int8 (1 per parameter, a bf16 scale per output row); relora_ds/quant.py,
    whose int8 merge residual lives in host memory."""
    if quantize == "int8":
        return counts["projections"], 2 * counts["projection_rows"]
    return 2 * counts["projections"], 0


def _check_offload(stage: int, offload: str) -> None:
    if offload not in OFFLOAD_STAGES:
        raise ValueError(f"offload={offload!r} is not valid: use one of {', '.join(OFFLOAD_STAGES)}")
    if stage not in OFFLOAD_STAGES[offload]:
        raise ValueError(f"offload={offload!r} needs ZeRO stage {' or '.join(map(str, OFFLOAD_STAGES[offload]))}, "
                         f"got stage {stage}")


def state_bytes(trainable: int, frozen: tuple[float, float], stage: int, n: int, offload: str = "none",
                fp32_grads: bool = False) -> float:
    """Per-GPU model-state bytes at a ZeRO stage over n ranks: trainable parameters' weights, grads, fp32
    masters and Adam m and v, plus the frozen weights (``frozen_bytes``: its parameters are partitioned by
    ZeRO-3 only, its buffers never). With ``offload`` only what stays on the GPU (module docstring).
    ``fp32_grads``: DeepSpeed's BF16_Optimizer (ZeRO-1 with ``data_types.grad_accum_dtype`` fp32,
    relora_ds.ds_config.uses_bf16_optimizer) also keeps a whole fp32 gradient buffer, 4 T more."""
    _check_offload(stage, offload)
    params, buffers = frozen
    if offload == "optimizer+parameters":
        return buffers
    if offload == "optimizer":
        t = {1: 4 * trainable, 2: 2 * trainable, 3: 2 * trainable / n}[stage]
    elif offload == "parameters":  # ZeRO-3's bf16 partitions, frozen ones included, on the host
        return 14 * trainable / n + buffers
    else:
        t = {0: 16 * trainable, 1: (8 if fp32_grads else 4) * trainable + 12 * trainable / n,
             2: 2 * trainable + 14 * trainable / n, 3: 16 * trainable / n}[stage]
    return t + params / (n if stage == 3 else 1) + buffers


def host_state_bytes(trainable: int, frozen: tuple[float, float], stage: int, n: int, offload: str,
                     residual: int = 0) -> float:
    """Per-GPU host-memory bytes: the offloaded states (each rank's fp32 master, fp32 gradient, m and v
    partitions, 16 T/N, and with the parameters also their bf16 partitions and the frozen ones) plus
    ``residual``, the int8 merge residual every rank keeps whole in host memory."""
    _check_offload(stage, offload)
    optimizer = 16 * trainable / n if offload in ("optimizer", "optimizer+parameters") else 0.0
    parameters = (2 * trainable + frozen[0]) / n if offload in ("parameters", "optimizer+parameters") else 0.0
    offloaded = optimizer + parameters
    return offloaded + residual


def qk_norm_bytes(cfg: LlamaConfig, seq_len: int) -> int:
    """Bytes per sequence Qwen3's per-head q and k RMSNorms (``qk_norm``) keep in a layer: 6 per element of q
    and k (fp32 input copy 4, normalized 2; their scaled output goes to RoPE, which keeps cos and sin, not
    it) and 4 per head of each token (the fp32 reciprocal RMS); 0 without them."""
    if not getattr(cfg, "qk_norm", False):
        return 0
    return seq_len * (cfg.num_attention_heads + cfg.num_key_value_heads) * (6 * cfg.head_dim + 4)


def layer_activation_bytes(cfg: LlamaConfig, seq_len: int, rank: int | None, extra: int = 0) -> int:
    """Bytes one decoder layer keeps for backward per sequence (rank=None: no LoRA branch); ``extra``: more
    bytes per sequence a layer keeps (the LoRA dropout's masks, :func:`run_phases`)."""
    s, h, i = seq_len, cfg.hidden_size, cfg.intermediate_size
    return 24 * s * h + 8 * s * i + (14 * s * rank if rank else 0) + qk_norm_bytes(cfg, seq_len) + extra


def dropout_mask_bytes(cfg: LlamaConfig, seq_len: int, twin: bool = False) -> int:
    """Bytes per sequence the LoRA dropout's keep-masks add to a layer that adapts all seven projections:
    1 byte per element of each one's input (6 s h + s i), 3 where the torch twin runs (the dropped-out bf16
    copy too: the reference path, and an int8 base's BLAS path under dropout)."""
    return (3 if twin else 1) * seq_len * (6 * cfg.hidden_size + cfg.intermediate_size)


def selective_layer_bytes(cfg: LlamaConfig, seq_len: int, rank: int | None) -> int:
    """Bytes a layer recomputed under the selective policy keeps per sequence: its input and the outputs of
    its matmuls and fused attention (relora_ds/checkpointing.py)."""
    s, h, i = seq_len, cfg.hidden_size, cfg.intermediate_size
    return 14 * s * h + 4 * s * i + (14 * s * rank if rank else 0)


def recomputed_layers(cfg: LlamaConfig, checkpointing: bool | int) -> int:
    """How many decoder layers recompute: all (True), none (False), or the first ``checkpointing`` of them
    (the trainer's activation_checkpointing_layers)."""
    if checkpointing is True:
        return cfg.num_hidden_layers
    return min(int(checkpointing or 0), cfg.num_hidden_layers)


def kept_activation_bytes(cfg: LlamaConfig, seq_len: int, rank: int | None, checkpointing: bool | int = False,
                          chunked_loss: bool = False, policy: str = "full", extra: int = 0) -> int:
    """Activation bytes alive between forward and backward, per sequence (the chunked loss's per
    micro-batch weight gradient not included: see activation_peak_bytes). ``checkpointing``: see
    recomputed_layers; a recomputed layer keeps only its input (``policy`` "full") or also its matmul and
    attention outputs ("selective")."""
    s, h, V = seq_len, cfg.hidden_size, cfg.vocab_size
    n = recomputed_layers(cfg, checkpointing)
    recomputed = selective_layer_bytes(cfg, seq_len, rank) if policy == "selective" else 2 * s * h
    layers = n * recomputed + (cfg.num_hidden_layers - n) * layer_activation_bytes(cfg, seq_len, rank, extra)
    head = 2 * s * h if chunked_loss else 4 * s * V  # the hidden-state gradient, or the fp32 log-probs
    return layers + 8 * s * h + head


def activation_phases(cfg: LlamaConfig, seq_len: int, rank: int | None, checkpointing: bool | int = False,
                      loss_chunk_size: int = 0, policy: str = "full", extra: int = 0) -> list[tuple[int, int]]:
    """(bytes per sequence, bytes per micro-batch) at each candidate peak (rank=None: no LoRA branch).

    Start of backward: everything kept plus the logits' 8 s V of transients; with the chunked loss instead
    2 s h per sequence, and per micro-batch the fp32 weight gradient 4 V h plus the larger of one chunk's
    logits in the forward (6 c V) and the gradient's cast to the weight dtype in the backward (2 V h).
    Where a layer keeps its activations, also the backward of the last such layer: everything kept but the
    loss's buffers, plus 8 s h of that layer's gradients in flight. With checkpointing, also the recompute of
    a layer: what the recomputed layers keep, one layer's activations beyond what it kept (all of them under
    the full policy; under the selective one 12 s h + 4 s i net, see the module's docstring) and 8 s h
    of gradients in flight (the loss's buffers, and the activations of the later layers that kept theirs, are
    freed by then: backward reaches the first layers last)."""
    s, h, V, i = seq_len, cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    kept = kept_activation_bytes(cfg, seq_len, rank, checkpointing, bool(loss_chunk_size), policy, extra)
    if loss_chunk_size:
        phases = [(kept + 2 * s * h, 4 * V * h + max(6 * loss_chunk_size * V, 2 * V * h))]
    else:
        phases = [(kept + 8 * s * V, 0)]
    n = recomputed_layers(cfg, checkpointing)
    if n < cfg.num_hidden_layers:  # the backward of the last layer that kept its activations: the loss's
        head = 2 * s * h if loss_chunk_size else 4 * s * V  # buffers freed, 8 s h of its gradients in flight
        phases.append((kept - head + 8 * s * h, 0))
    if n and policy == "selective":  # the recompute also redraws the dropout masks and redoes the q/k norms
        phases.append((n * selective_layer_bytes(cfg, seq_len, rank) + 12 * s * h + 4 * s * i + 8 * s * h
                       + qk_norm_bytes(cfg, seq_len) + extra, 0))
    elif n:
        phases.append((n * 2 * s * h + layer_activation_bytes(cfg, seq_len, rank, extra) + 8 * s * h, 0))
    return phases


def activation_peak_bytes(cfg: LlamaConfig, seq_len: int, rank: int | None, micro_batch: int,
                          checkpointing: bool | int = False, loss_chunk_size: int = 0, policy: str = "full",
                          extra: int = 0) -> int:
    """Peak activation bytes of one micro-batch, reached in backward (or, chunked loss, in its forward). A
    chunk holds at most the micro-batch's tokens (relora_ds/loss.py slices them)."""
    chunk = min(loss_chunk_size, micro_batch * seq_len)
    return max(micro_batch * per_seq + fixed
               for per_seq, fixed in activation_phases(cfg, seq_len, rank, checkpointing, chunk, policy, extra))


def largest_fitting_micro_batch(per_rank_batch: int, fits) -> int:
    """Largest micro-batch dividing the per-rank batch (the trainer's batch arithmetic) for which
    ``fits(micro_batch)``; 0 if none."""
    return max((d for d in range(1, per_rank_batch + 1) if per_rank_batch % d == 0 and fits(d)), default=0)


def usable_bytes(memory_gb: float, reserve_gb: float | None = None, flag: str = "--memory-gb") -> float:
    """What a GPU of ``memory_gb`` GB leaves for model states and activations after the reserve (GiB; default
    10% + 2 GiB) for the CUDA context, NCCL and DeepSpeed buffers and fragmentation."""
    reserve = reserve_gb * GIB if reserve_gb is not None else 0.1 * memory_gb * 1e9 + 2 * GIB
    budget = memory_gb * 1e9 - reserve
    if budget <= 0:
        raise ValueError(f"{flag} {memory_gb:g} leaves nothing usable after the reserve of {reserve / GIB:.1f} GiB "
                         f"(default 10% + 2 GiB); give a larger {flag}" + (" or a smaller --reserve-gb"
                                                                         if flag == "--memory-gb" else ""))
    return budget


def run_phases(model_config: LlamaConfig, cfg, ds: dict, world_size: int, start_step: int = 0) -> list[dict] | str:
    """Per-GPU memory of a training run (launch/preflight.py), phase by phase: a dict per phase (``phase``,
    ``states`` and ``activations`` bytes at the run's micro-batch, ``fits(micro_batch, budget)``), or why it
    is not estimated. A run resumed at ``start_step`` past its warm start has the ReLoRA phase only; resumed from
    the warm start's last checkpoint (``start_step == warm_start_steps``) it first holds the full-rank engine's
    states, without a step. Parameters are counted on a meta-device copy of the run's model, built and wrapped as
    the trainer builds it (any target_modules, tied embeddings, biases, int8 base); states and activations
    follow this module's model (its docstring), which counts the LoRA activations of all seven projections,
    and adds the LoRA dropout's masks of the projections the run adapts and document masking's SDPA masks."""
    import torch

    from relora_ds import LlamaForCausalLM, relora_layers, wrap
    from relora_ds.ds_config import _zero_config, uses_bf16_optimizer
    from relora_ds.ds_schema import uses_bf16, uses_fp16

    if not (uses_bf16(ds) or uses_fp16(ds)):
        return "fp32 training (the memory model counts bf16/fp16 weights and activations)"
    zero = _zero_config(ds, "the DeepSpeed config")  # as DeepSpeed reads it: legacy spellings mapped
    devices = [getattr(part, "device", None) for part in (zero.offload_optimizer, zero.offload_param)]
    on_host = [str(getattr(d, "value", d)) in ("cpu", "nvme") for d in devices]  # a str or an enum by version
    offload = {(True, True): "optimizer+parameters", (True, False): "optimizer", (False, True): "parameters",
               (False, False): "none"}[tuple(on_host)]
    fp32_grads = uses_bf16_optimizer(ds)
    ckpt = (cfg.activation_checkpointing_layers or True) if cfg.activation_checkpointing else False
    with torch.device("meta"):
        model = LlamaForCausalLM(model_config)
        total = sum(p.numel() for p in model.parameters())
        if cfg.mode != "full":
            wrap(model, rank=cfg.rank, alpha=cfg.alpha, target_modules=cfg.target_modules, quantize=cfg.quantize)
    phases = []  # (name, rank, trained parameters, frozen bytes, dropout masks, trains)
    if cfg.mode == "full":
        phases.append(("full-rank", None, total, (0, 0), 0, True))
    elif 0 < cfg.warm_start_steps and start_step <= cfg.warm_start_steps:  # none with warm_start_from (loaded)
        # A resume from the warm start's last checkpoint loads the full-rank engine and switches before a step.
        phases.append(("warm start" if start_step < cfg.warm_start_steps else "warm start (loaded, no step)", None,
                       total, (0, 0), 0, start_step < cfg.warm_start_steps))
    if cfg.mode != "full":
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() * (1 if p.dtype == torch.int8 else 2) for p in model.parameters() if not p.requires_grad)
        scales = sum(2 * b.numel() for name, b in model.named_buffers() if name.endswith("weight_scale"))
        twin = cfg.kernels == "reference" or (cfg.quantize is not None and cfg.kernels != "triton")
        masks = (3 if twin else 1) * cfg.seq_len * sum(layer.in_features for _, layer in relora_layers(model)) \
            // model_config.num_hidden_layers if cfg.dropout > 0 else 0
        phases.append(("ReLoRA" if cfg.mode == "relora" else "LoRA", cfg.rank, trainable, (frozen, scales), masks,
                       True))
    # Document masking under SDPA: an additive (B, 1, T, T) mask in the activations' dtype per sliding-window
    # length, rows padded to 8 (relora_ds/documents.py), alive through the step; flash-attn's path builds none
    # ("auto" may take it on the ranks: counted, an upper bound).
    T = cfg.seq_len + 1  # a packed window, its last token a label only
    windows = {layer.self_attn.sliding_window for layer in model.model.layers}
    document_mask = len(windows) * T * -(-T // 8) * 8 * 2 \
        if cfg.document_masking and model_config.attn_implementation != "flash" else 0
    out = []
    for name, rank, trainable, frozen, masks, trains in phases:
        states = state_bytes(trainable, frozen, zero.stage, world_size, offload, fp32_grads)

        def activations(micro_batch, rank=rank, masks=masks, trains=trains):
            if not trains:
                return 0
            return activation_peak_bytes(model_config, cfg.seq_len, rank, micro_batch, ckpt, cfg.loss_chunk_size,
                                         cfg.activation_checkpointing_policy, masks) + micro_batch * document_mask
        out.append({"phase": name, "states": states, "activations": activations(cfg.micro_batch_size),
                    "fits": lambda m, budget, states=states, activations=activations: states + activations(m) <= budget})
    return out
