"""LLaMA-style decoder in plain PyTorch (the paper's architecture, numerically Hugging Face's LlamaForCausalLM,
and Qwen2ForCausalLM / Qwen3ForCausalLM / MistralForCausalLM, which differ only in configuration).

Pre-norm RMSNorm, SwiGLU MLP, rotary position embeddings (optionally "linear" or "llama3" scaled), causal
attention through torch SDPA (or flash-attn when installed), optionally within a sliding window. The presets
have no biases and an untied lm_head; a config can add attention/MLP biases, an explicit head_dim and an
lm_head tied to the embedding.
Module and parameter names equal Hugging Face's, so state dicts map one to one and ReLoRA's `wrap` finds the
same layers in either model. This file knows nothing of DeepSpeed, Triton or ReLoRA.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import types
import warnings

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import checkpointing
from .compiling import compile_problem, raise_recompile_limit
from .documents import Documents, sdpa_dtype
from .loss import linear_cross_entropy
from .model_config import LlamaConfig

_NOT_INSTALLED = "flash-attn is not installed"


@functools.cache
def _flash_attn_problem() -> str | None:
    """None when flash-attn imports; else why not. Tried once, at the first CUDA fp16/bf16 forward: a wheel
    built for another torch is found by pip but fails to import (undefined symbols), and `auto` must then
    fall back to SDPA instead of stopping the run."""
    if importlib.util.find_spec("flash_attn") is None:
        return _NOT_INSTALLED
    try:
        importlib.import_module("flash_attn")
    except Exception as e:  # ImportError, OSError from a mismatched CUDA/torch build, ...
        return f"flash-attn is installed but does not import ({type(e).__name__}: {e})"
    return None


class CausalLMOutput(dict):
    """``logits`` (B, T, V; None when a chunked loss was computed instead) and ``loss`` (None without labels):
    a dict with attribute access, as Hugging Face's ModelOutput, so that DeepSpeed finds its tensors. It hooks
    them to run the engine's backward prologue (which zeroes the BF16 optimizer's bf16 gradient between
    micro-steps) and ZeRO-3's backward hooks; a dataclass hid them (ZeRO-3 warned they "may not get triggered
    properly")."""

    def __init__(self, logits: torch.Tensor | None, loss: torch.Tensor | None = None):
        super().__init__(logits=logits, loss=loss)

    @property
    def logits(self) -> torch.Tensor | None:
        return self["logits"]

    @property
    def loss(self) -> torch.Tensor | None:
        return self["loss"]


class LMHead(nn.Linear):
    """The output projection (an ``nn.Linear``: same parameter name and state dict as Hugging Face's).

    ``head(h)`` gives logits; ``head(h, targets=y, chunk_size=n)`` gives the mean cross-entropy without the
    logits (relora_ds/loss.py). The loss is computed inside this module's forward so that ZeRO-3, which
    gathers a module's parameters around its forward, has the weight in place."""

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, chunk_size: int = 0) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        return linear_cross_entropy(x, self.weight, targets, chunk_size)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 and scale after casting back, exactly as Hugging Face's LlamaRMSNorm.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None,
                  device: torch.device | None = None) -> torch.Tensor:
    """RoPE's inverse frequencies, (head_dim/2,) fp32, computed as transformers' modeling_rope_utils does:
    plain; "linear" (every frequency / factor: positions interpolated); "llama3" (LLaMA-3.1: wavelengths
    above original_max_position_embeddings / low_freq_factor slowed by factor, those below
    original / high_freq_factor kept, a linear blend between)."""
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    rope_type = scaling["rope_type"] if scaling else "default"
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        slowed = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * slowed / factor + smooth * slowed
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, blended, slowed)
    assert rope_type == "default", rope_type  # LlamaConfig refuses the others
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype):
        # Computed per call in fp32 (cheap next to attention). No buffer: model.to(torch.bfloat16) would round
        # the frequencies (cos off by 0.47 at position 512 with head_dim 128), and no cache to go stale.
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling, device)
        pos = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)  # (T, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, head_dim); cos/sin: (T, head_dim)."""
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int = 0):
        super().__init__()
        self.sliding_window = config.window_of(layer)  # None: the whole prefix
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attn_implementation = config.attn_implementation
        h = config.hidden_size
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=config.attention_bias)
        if config.qk_norm:  # Qwen3: each head of q and k normalized (one weight of head_dim), before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: Documents | None = None) -> torch.Tensor:
        """documents: None, or the batch's documents under document masking (attention within each)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, hd), (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self._use_flash(q):
            import flash_attn  # (B, T, H, hd) layout, handles GQA itself

            # window_size (left, right), flash-attn >= 2.3: keys i - left .. i + right, so left = window - 1.
            window = {} if self.sliding_window is None else {"window_size": (self.sliding_window - 1, 0)}
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if documents is None:
                y = flash_attn.flash_attn_func(q, k, v, causal=True, **window)
            else:  # every document of the batch one sequence of the variable-length kernel
                cu_seqlens, max_seqlen = documents.varlen()
                y = flash_attn.flash_attn_varlen_func(
                    q.reshape(B * T, self.n_heads, self.head_dim), k.reshape(B * T, self.n_kv_heads, self.head_dim),
                    v.reshape(B * T, self.n_kv_heads, self.head_dim), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                    causal=True, **window).view(B, T, self.n_heads, self.head_dim)
        else:
            if self.n_kv_heads != self.n_heads:
                rep = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            if documents is not None:  # within each document (and window), causal: one mask shared by the layers
                mask = documents.mask(self.sliding_window, sdpa_dtype(q))
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            elif self.sliding_window is not None and T > self.sliding_window:
                mask = _sliding_window_mask(T, self.sliding_window, q.device)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:  # within the window every query sees its whole prefix
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2)  # (B, T, H, hd)
        return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim))

    def _use_flash(self, q: torch.Tensor) -> bool:
        """Whether attention of queries like ``q`` (its device and dtype) runs on flash-attn."""
        if self.attn_implementation == "sdpa":
            return False
        on_gpu = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        problem = _flash_attn_problem() if on_gpu or self.attn_implementation == "flash" else None
        if self.attn_implementation == "flash" and (problem or not on_gpu):
            raise ValueError("attn_implementation='flash' needs flash-attn and CUDA fp16/bf16 inputs "
                             f"({problem or 'flash-attn imports'}; device={q.device}, dtype={q.dtype})")
        if problem and problem != _NOT_INSTALLED:  # installed but broken: say so, once
            _warn_flash_fallback(problem)
        return on_gpu and problem is None


@functools.cache
def _warn_flash_fallback(problem: str) -> None:
    warnings.warn(f"attention runs on torch SDPA: {problem}; reinstall flash-attn for this torch, or set "
                  "attn_implementation='sdpa' to silence this", RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=4)
def _sliding_window_mask(T: int, window: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool, True where query i may attend key j: i - window < j <= i (transformers' sliding window)."""
    i = torch.arange(T, device=device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance < window)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, m, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, m, bias=bias)
        self.up_proj = nn.Linear(h, m, bias=bias)
        self.down_proj = nn.Linear(m, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, documents=None, selective: tuple[int, str | None] | None = None):
        """The layer; with ``selective=(rank, biased)`` under selective checkpointing
        (relora_ds/checkpointing.py, whose ``lora_rank`` and ``biased_linear`` give the two). Compiled
        (``LlamaForCausalLM.compile_layers`` compiles this method), the checkpoint is inside the graph, as
        torchtitan composes them: the policy then marks the traced ops and the partitioner keeps or recomputes
        them (compiled kernels called from an eager checkpoint would be hidden from the policy and recompute
        whole). The module's hooks, such as ZeRO-3's parameter gathers, run around this method."""
        if selective is None:
            return self._block(x, cos, sin, documents)
        rank, biased = selective
        return torch.utils.checkpoint.checkpoint(self._block, x, cos, sin, documents, use_reentrant=False,
                                                 context_fn=functools.partial(checkpointing.selective_contexts,
                                                                              rank=rank, biased=biased))

    def _block(self, x, cos, sin, documents):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, documents)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        # On the meta device (shape checks, a model about to take loaded tensors) nothing is initialized: meta
        # tensors hold no values, and torch's meta normal_ imports torch._dynamo (1.3-2.6 s). Elsewhere the
        # embedding's own init runs as in torch (the random stream of every run stays as it was).
        meta = torch.get_default_device().type == "meta"
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size) if meta else None)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.gradient_checkpointing = False
        self.checkpoint_layers = config.num_hidden_layers  # the first this many recompute (gradient_checkpointing)
        self.checkpoint_policy = "full"  # or "selective": relora_ds/checkpointing.py
        self.document_eos: int | None = None  # LlamaForCausalLM.document_masking_enable

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        # RoPE is relative (q_i·k_j depends on i - j only), so a document inside a window needs no position reset.
        cos, sin = self.rotary_emb(input_ids.shape[1], x.device, x.dtype)
        # Document masking: its masks (or flash-attn's sequence lengths) are built once, shared by the layers.
        documents = None
        if self.document_eos is not None:
            # q leaves RoPE in x's dtype, promoted with autocast's where it is on (fp32 from fp32 embeddings)
            device = x.device.type
            q_dtype = torch.promote_types(torch.get_autocast_dtype(device), x.dtype) \
                if torch.is_autocast_enabled(device) else x.dtype
            documents = Documents(input_ids, self.document_eos).prepare(
                dict.fromkeys(layer.self_attn.sliding_window for layer in self.layers), sdpa_dtype(x),
                flash=self.layers[0].self_attn._use_flash(x.new_empty(0, dtype=q_dtype)))
        # selective checkpointing recomputes the products over a LoRA rank (the warm start has none)
        selective = None
        if self.gradient_checkpointing and self.checkpoint_policy == "selective" and torch.is_grad_enabled():
            selective = checkpointing.lora_rank(self.layers), checkpointing.biased_linear(self.layers)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and torch.is_grad_enabled() and i < self.checkpoint_layers:
                # Only the layer's input is kept (selective: also its matmul and attention outputs); its other
                # activations are recomputed in backward (the RNG state is restored, so a LoRA dropout mask is
                # drawn identically both times).
                if selective is not None:
                    x = layer(x, cos, sin, documents, selective=selective)
                else:
                    x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, documents, use_reentrant=False)
            else:
                x = layer(x, cos, sin, documents)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """``out = model(input_ids, labels=None)``: ``.logits`` (B, T, V) and ``.loss``.

    The loss is next-token cross-entropy with the shift done inside, as in Hugging Face: position t
    predicts ``labels[:, t+1]``; label -100 is ignored. Pass a packed window of seq_len+1 tokens as both
    input_ids and labels to train on seq_len predictions. After ``chunked_loss_enable(n)`` a call with labels
    computes the loss n tokens at a time and returns no logits (relora_ds/loss.py).
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
        self.loss_chunk_size = 0  # chunked_loss_enable()
        self.tie_weights()
        self.apply(self._init_weights)
        # Checkpoints of a tied model hold the shared weight once (transformers' safetensors, DeepSpeed's fp32
        # state dicts name it model.embed_tokens.weight): lm_head.weight is that tensor.
        self._register_load_state_dict_pre_hook(_tied_head_from_embedding, with_module=True)

    def tie_weights(self) -> None:
        """With tie_word_embeddings, make lm_head's weight the embedding's Parameter itself (one tensor,
        one optimizer entry; Hugging Face's name). Call again after anything that replaces parameters
        (load_state_dict(assign=True))."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.is_meta:
            return  # no values to draw (see LlamaModel)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> CausalLMOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        hidden = self.model(input_ids)  # (B, T, hidden)
        if labels is not None and self.loss_chunk_size:
            targets = labels[:, 1:].reshape(-1).to(hidden.device)
            loss = self.lm_head(hidden[:, :-1].reshape(-1, hidden.shape[-1]), targets=targets,
                                chunk_size=self.loss_chunk_size)
            return CausalLMOutput(logits=None, loss=loss)
        logits = self.lm_head(hidden)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return CausalLMOutput(logits=logits, loss=loss)

    def chunked_loss_enable(self, chunk_size: int = 1024) -> None:
        """With labels, compute the loss ``chunk_size`` tokens at a time without the full logits (the output's
        ``logits`` is then None). Same loss and gradients as the plain path up to rounding, except where no
        label is scored (all ignored): loss 0 here, NaN there (relora_ds/loss.py)."""
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size!r}")
        self.loss_chunk_size = chunk_size

    def chunked_loss_disable(self) -> None:
        self.loss_chunk_size = 0

    def document_masking_enable(self, eos_token_id: int) -> None:
        """Attention within each document of a packed window: a token attends only to the earlier tokens of
        its own document, which ends at its EOS (``eos_token_id``), so each document of a window gets the
        logits it gets alone (RoPE is relative: no position reset is needed). Runs on flash-attn's
        variable-length kernel where flash-attn runs (each document of the batch one sequence), else on torch
        SDPA with a (batch, 1, T, T) mask. The loss is unchanged: an EOS still predicts the next document's first
        token (BOS, where the tokenizer has one)."""
        if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int) or \
                not 0 <= eos_token_id < self.config.vocab_size:
            raise ValueError(f"eos_token_id must be a token id in [0, {self.config.vocab_size}), got {eos_token_id!r}")
        self.model.document_eos = eos_token_id

    def document_masking_disable(self) -> None:
        self.model.document_eos = None

    def gradient_checkpointing_enable(self, num_layers: int | None = None, policy: str = "full") -> None:
        """Recompute each decoder layer in backward instead of keeping its activations (Hugging Face's name);
        ``num_layers``: only the first ``num_layers`` of them (Megatron-LM's ``--recompute-num-layers``), the
        later ones keep theirs. ``policy``: "full" keeps only a layer's input; "selective" also keeps its
        matmul and attention outputs and recomputes the cheap rest (relora_ds/checkpointing.py)."""
        n = self.config.num_hidden_layers
        if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)
                                       or not 1 <= num_layers <= n):
            raise ValueError(f"num_layers must be a number of decoder layers from 1 to {n} (or None: all), "
                             f"got {num_layers!r}")
        checkpointing.check_policy(policy)
        self.model.gradient_checkpointing = True
        self.model.checkpoint_layers = n if num_layers is None else num_layers
        self.model.checkpoint_policy = policy

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    def compile_layers(self, **kwargs) -> None:
        """``torch.compile`` each decoder layer's ``forward`` in place, as torchtitan compiles its blocks: the
        layers share one graph (recompiled only for what differs between them, such as a sliding window), which
        fuses the norms, RoPE and the MLP's activation; under selective checkpointing the checkpoint is inside
        it (DecoderLayer.forward). The layers' module hooks stay outside the graph, eager: ZeRO-3's parameter
        gathers (the trainer makes each layer one gather, relora_ds/engines.py) are disabled for torch.compile
        and would break it at every linear layer. Parameter names, the state dict and the ReLoRA resets are
        unchanged: a merge writes the weights in place and the graphs read them as inputs. ``kwargs`` go to
        ``torch.compile``. The embedding, the final norm and the loss stay eager. Raises torch's recompile limit
        (process-wide) to 4 entries per kind of layer where it is lower. A backend named by a string that cannot
        build code here (relora_ds.compiling.compile_problem) is refused now, not at the first forward."""
        backend = kwargs.get("backend", "inductor")
        # on the CPU still where DeepSpeed moves it to the GPU next (the trainer compiles before deepspeed.initialize)
        cuda = self.lm_head.weight.is_cuda or torch.cuda.is_available()
        if isinstance(backend, str) and (problem := compile_problem(cuda, backend)):
            raise ValueError(f"compile_layers: {problem}")
        # Each kind of layer (a sliding window or not) takes cache entries in the layers' shared code object for
        # training (plain, or selective checkpointing) and evaluation (no grad); torch's default limit of 8
        # entries, past which it runs the code eagerly without a word (relora_ds.compiling.compile_stats counts
        # it), is raised to leave room for 4 each.
        raise_recompile_limit(4 * len({layer.self_attn.sliding_window for layer in self.model.layers}))
        if any("forward" in vars(layer) for layer in self.model.layers):
            raise RuntimeError("compile_layers: the decoder layers are compiled already")
        # One compiled function bound to each layer: a deep copy of the model rebinds it to the copy's layers.
        compiled = torch.compile(DecoderLayer.forward, **kwargs)
        for layer in self.model.layers:
            layer.forward = types.MethodType(compiled, layer)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def _tied_head_from_embedding(model, state_dict, prefix, *args) -> None:
    """load_state_dict of a tied model: lm_head.weight is the embedding's, stored or not (a stored copy is
    ignored, as transformers ignores it)."""
    embed = f"{prefix}model.embed_tokens.weight"
    if model.config.tie_word_embeddings and embed in state_dict:
        state_dict[f"{prefix}lm_head.weight"] = state_dict[embed]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; labels are shifted here (Hugging Face semantics)."""
    shift_logits = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
