"""LLaMA model configuration with the paper's named sizes (ReLoRA, arXiv 2307.05695, Table 2)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


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
    """Query heads; hidden_size must be divisible by it."""
    num_key_value_heads: int | None = None
    """Key/value heads (grouped-query attention); None means equal to num_attention_heads."""
    max_position_embeddings: int = 512
    """Longest sequence the model is trained for (the paper uses 512); rotary tables grow on demand."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    initializer_range: float = 0.02
    """Std of the normal init of linear and embedding weights (LLaMA init)."""
    attn_implementation: str = "auto"
    """'auto' (flash-attn when importable on CUDA in fp16/bf16, else torch SDPA), 'sdpa' or 'flash'."""

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.attn_implementation not in ("auto", "sdpa", "flash"):
            raise ValueError(f"attn_implementation={self.attn_implementation!r}; valid: 'auto', 'sdpa', 'flash'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

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
