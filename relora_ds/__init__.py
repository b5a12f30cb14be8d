"""relora_ds: ReLoRA (Lialin et al., ICLR 2024) pre-training on DeepSpeed ZeRO with Triton kernels."""
from .ds_patches import patch_deepspeed_nvme
from .hf import export_hf, load_hf
from .merge import merge_and_reinit
from .model import CausalLMOutput, LlamaForCausalLM
from .model_config import PRESETS, LlamaConfig
from .prune import prune_optimizer_state
from .relora import ReLoRALinear, lora_parameters, relora_layers, unwrap, wrap
from .schedule import build_scheduler, cosine_with_warmup, jagged_cosine, linear_with_warmup

__all__ = [
    "CausalLMOutput", "LlamaConfig", "LlamaForCausalLM", "PRESETS", "ReLoRALinear", "build_scheduler",
    "cosine_with_warmup", "export_hf", "jagged_cosine", "linear_with_warmup", "load_hf", "lora_parameters",
    "merge_and_reinit", "patch_deepspeed_nvme", "prune_optimizer_state", "relora_layers", "unwrap", "wrap",
]


def __getattr__(name: str):
    """``relora_ds.hf_trainer`` imports on first use (it imports transformers' Trainer, which nothing else
    here needs)."""
    if name == "hf_trainer":
        import importlib

        return importlib.import_module(".hf_trainer", __name__)
    raise AttributeError(f"module 'relora_ds' has no attribute {name!r}")
