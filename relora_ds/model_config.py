"""LLaMA model configuration with the paper's named sizes (ReLoRA, arXiv 2307.05695, Table 2), and the
options of the LLaMA-shaped Hugging Face families continued pre-training starts from (LLaMA-3.x, Qwen2,
Qwen3, Mistral): explicit head_dim, biases, q/k norms, tied embeddings, RoPE scaling, sliding windows."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

# The Hugging Face architectures this decoder reproduces exactly. They differ only in what their configs
# can express: LLaMA's attention_bias (q, k, v, o) and mlp_bias, Qwen2's fixed q/k/v biases and per-layer
# sliding window, Qwen3's per-head RMSNorm of q and k (and Qwen2's window), Mistral's sliding window.
MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
# The model types whose config can put the sliding window on some layers only (layer_types).
PER_LAYER_WINDOW = ("qwen2", "qwen3")
# RoPE types whose frequencies relora_ds computes as transformers' modeling_rope_utils does, with the keys each
# needs. Dynamic NTK, YaRN and LongRoPE change the frequencies with the sequence length or scale the
# attention, and are refused.
ROPE_TYPES = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclass
class LlamaConfig:
    """Shape of a LLaMA-style decoder; field names follow Hugging Face's ``LlamaConfig``."""

    vocab_size: int = 32000
    """Number of token ids; must cover the tokenizer's vocabulary."""
    hidden_size: int = 768
    """Model width (embedding and residual stream size)."""
    intermediate_size: int = 2048
    """Inner width of the SwiGLU MLP."""
    num_hidden_layers: int = 12
    """Number of decoder blocks."""
    num_attention_heads: int = 12
    """Query heads; hidden_size must be divisible by it unless head_dim is given."""
    num_key_value_heads: int | None = None
    """Key/value heads (grouped-query attention); None means equal to num_attention_heads."""
    max_position_embeddings: int = 512
    """Longest sequence the model is trained for (the paper uses 512); RoPE is computed per call, so longer
    inputs run too."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    initializer_range: float = 0.02
    """Std of the normal init of linear and embedding weights (LLaMA init)."""
    attn_implementation: str = "auto"
    """'auto' (flash-attn when importable on CUDA in fp16/bf16, else torch SDPA), 'sdpa' or 'flash'."""
    model_type: str = "llama"
    """The Hugging Face architecture the model is exported as (MODEL_TYPES); it decides which biases and
    options the exported config can express."""
    head_dim: int | None = None
    """Width of each attention head; None means hidden_size / num_attention_heads (Mistral-Nemo: 128, where
    5120 / 32 would be 160)."""
    attention_bias: bool = False
    """Biases on q_proj, k_proj, v_proj and o_proj (LLaMA's attention_bias)."""
    qkv_bias: bool | None = None
    """Biases on q_proj, k_proj and v_proj but not o_proj (Qwen2's fixed layout); None means the
    model_type's own (True for qwen2, else False)."""
    mlp_bias: bool = False
    """Biases on gate_proj, up_proj and down_proj (LLaMA's mlp_bias)."""
    qk_norm: bool | None = None
    """RMSNorm over each head of q and k before RoPE (Qwen3's q_norm, k_norm; weights trained full-rank);
    None means the model_type's own (True for qwen3, else False)."""
    tie_word_embeddings: bool = False
    """lm_head's weight is the input embedding itself (LLaMA-3.2-1B/3B, small Qwen2): one parameter, trained
    full-rank."""
    rope_scaling: dict | None = None
    """RoPE frequency scaling as in Hugging Face configs, e.g. ``{"rope_type": "linear", "factor": 4.0}`` or
    LLaMA-3.1's "llama3" (ROPE_TYPES); None is plain RoPE."""
    sliding_window: int | None = None
    """Attention window (Mistral; Qwen2/Qwen3 with use_sliding_window) in tokens a query sees, itself included: a
    query at position i attends keys j with i - window < j <= i, as transformers masks it. None: full causal."""
    layer_types: list[str] | None = None
    """Which layers the window applies to, one per layer as transformers' layer_types: "sliding_attention" or
    "full_attention" (Qwen2/Qwen3 slide only from max_window_layers on). None: every layer (Mistral)."""

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
            setattr(self, name, int(getattr(self, name)))  # a NumPy integer as Python's (config.json writes it)
        # a negative eps makes RMSNorm's rsqrt NaN, silently; initializer_range 0 starts every weight at zero (no
        # symmetry to break), a negative or NaN one failed in torch's normal_ when the model was built
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"LlamaConfig.{name} must be a positive finite number, got {value!r}")
            setattr(self, name, float(value))
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                                 f"{self.num_attention_heads}; set head_dim to give the heads' width explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not _is_int(self.head_dim) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be a positive even integer (RoPE rotates pairs), "
                             f"got {self.head_dim!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.attn_implementation not in ("auto", "sdpa", "flash"):
            raise ValueError(f"attn_implementation={self.attn_implementation!r}; valid: 'auto', 'sdpa', 'flash'")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not supported; valid: {', '.join(MODEL_TYPES)}")
        if self.qkv_bias is None:
            self.qkv_bias = self.model_type == "qwen2"
        if self.qk_norm is None:
            self.qk_norm = self.model_type == "qwen3"
        self._check_expressible()
        self.rope_scaling = _checked_rope_scaling(self.rope_scaling)
        if self.sliding_window is not None and (not _is_int(self.sliding_window) or self.sliding_window <= 0):
            raise ValueError(f"sliding_window must be a positive number of tokens or None, got {self.sliding_window!r}")
        self._check_layer_types()

    def _check_layer_types(self) -> None:
        if self.layer_types is None:
            return
        self.layer_types = list(self.layer_types)
        valid = ("sliding_attention", "full_attention")
        if len(self.layer_types) != self.num_hidden_layers or any(t not in valid for t in self.layer_types):
            raise ValueError(f"layer_types must give one of {valid} for each of the {self.num_hidden_layers} layers, "
                             f"got {self.layer_types!r}")
        if self.sliding_window is None and "sliding_attention" in self.layer_types:
            raise ValueError("layer_types names sliding_attention layers but sliding_window is None: give the "
                             "window's length in tokens")
        if self.model_type not in PER_LAYER_WINDOW:
            raise ValueError(f"layer_types (a window on some layers only) is a Qwen2/Qwen3 option; model_type="
                             f"{self.model_type!r} applies sliding_window to every layer: use layer_types=None")

    def window_of(self, layer: int) -> int | None:
        """The attention window of layer `layer` (index from 0), None where it attends the whole prefix."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def _check_expressible(self) -> None:
        """The biases and window must be ones the model_type's Hugging Face config can say, or the export
        would load in transformers as another model."""
        need = {"llama": dict(qkv_bias=False, qk_norm=False),  # attention_bias and mlp_bias: either
                "qwen2": dict(qkv_bias=True, attention_bias=False, mlp_bias=False, qk_norm=False),
                "qwen3": dict(qkv_bias=False, mlp_bias=False, qk_norm=True),  # attention_bias: either
                "mistral": dict(qkv_bias=False, attention_bias=False, mlp_bias=False, qk_norm=False)}[self.model_type]
        wrong = {k: getattr(self, k) for k, v in need.items() if bool(getattr(self, k)) != v}
        if wrong:
            raise ValueError(f"model_type={self.model_type!r} cannot have {wrong}: its Hugging Face architecture "
                             f"fixes {need}")
        if self.sliding_window is not None and self.model_type == "llama":
            raise ValueError("sliding_window is a Mistral/Qwen2/Qwen3 option that LLaMA's Hugging Face config lacks: "
                             "use model_type 'mistral', 'qwen2' or 'qwen3', or sliding_window=None")

    @classmethod
    def preset(cls, name: str, **overrides) -> "LlamaConfig":
        """A named size (``LlamaConfig.preset("130m", vocab_size=32000)``); overrides replace fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ValueError(f"unknown LlamaConfig field(s) {bad}; valid fields: {sorted(fields)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Paper Table 2 sizes (hidden / layers / heads / MLP) at vocab 32000 and sequence length 512; 3b is
# OpenLLaMA-3B's shape, 7b LLaMA-7B's. `debug` and `tiny` are CPU sizes for tests and the demo.
PRESETS: dict[str, dict] = {
    "debug": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128),
    "tiny": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, max_position_embeddings=256),
    "60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
    "130m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "250m": dict(hidden_size=768, intermediate_size=2560, num_hidden_layers=24, num_attention_heads=16),
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_hidden_layers=24, num_attention_heads=16),
    "1b": dict(hidden_size=2048, intermediate_size=5461, num_hidden_layers=24, num_attention_heads=32),
    "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               max_position_embeddings=2048),
}


def _checked_rope_scaling(scaling: dict | None) -> dict | None:
    """`scaling` with its type under "rope_type" (older configs: "type"), or None for plain RoPE; an
    unsupported type or a missing key is a ValueError naming what is valid."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(rope_type, str):
        raise ValueError(f"rope_scaling's rope_type={rope_type!r} must be a name; valid rope types: 'default' (plain "
                         f"RoPE), {', '.join(repr(t) for t in ROPE_TYPES)}")
    # rope_theta (transformers 5 keeps it here) is the config's own field.
    scaling = {"rope_type": rope_type,
               **{k: v for k, v in scaling.items() if k not in ("type", "rope_type", "rope_theta")}}
    if rope_type == "default":
        return None
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope scaling {rope_type!r} is not supported; valid rope types: 'default' (plain RoPE), "
                         f"{', '.join(repr(t) for t in ROPE_TYPES)}")
    missing = [k for k in ROPE_TYPES[rope_type] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks {missing}; it needs {list(ROPE_TYPES[rope_type])}")
    if not all(isinstance(scaling[k], numbers.Real) and not isinstance(scaling[k], bool)
               and math.isfinite(scaling[k]) and scaling[k] > 0 for k in ROPE_TYPES[rope_type]):
        raise ValueError(f"rope_scaling {scaling}: {list(ROPE_TYPES[rope_type])} must be positive numbers")
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"rope_scaling {scaling}: high_freq_factor must be above low_freq_factor")
    return scaling


def _is_int(value) -> bool:
    """A whole number as a Python or NumPy integer (JSON's 64 passes; 64.0, "64" and True do not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
