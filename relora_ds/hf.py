"""Hugging Face LLaMA checkpoints: export (merged, plain weights) and load (continued pre-training).

Our module names equal Hugging Face's, so the state dict maps one to one; ReLoRA layers are merged into
plain weights (dequantized when stored in int8) and their LoRA tensors and counters are dropped.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model import LlamaForCausalLM
from .model_config import LlamaConfig
from .relora import relora_layers

_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                "initializer_range")


def hf_config_dict(config: LlamaConfig, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **{k: getattr(config, k) for k in _CONFIG_KEYS},
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def merged_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Plain LLaMA state dict: every ReLoRA layer's weight = base + scale·B·A (fp32 sum, cast once)."""
    merged: dict[str, torch.Tensor] = {}
    layer_names = set()
    for name, layer in relora_layers(model):
        layer_names.add(name)
        with torch.no_grad():
            w = layer.base_weight() + layer.delta_weight().to(layer.lora_A.device)
        merged[f"{name}.weight"] = w.to(dtype or layer.lora_A.dtype)
        if layer.bias is not None:
            merged[f"{name}.bias"] = layer.bias.detach().to(dtype or layer.bias.dtype)
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in layer_names:
            continue  # weight/bias written above; lora_A/B, merge_count and quantization buffers dropped
        merged[key] = t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()
    return {k: v.contiguous().cpu() for k, v in merged.items()}


def export_hf(model: torch.nn.Module, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in Hugging Face LLaMA format; returns out_dir."""
    config = getattr(model, "config", None)
    if not isinstance(config, LlamaConfig):
        raise ValueError(f"export_hf expects a relora_ds.LlamaForCausalLM, got {type(model).__name__} "
                         "(for a Hugging Face model: relora_ds.unwrap(model).save_pretrained(dir))")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = merged_state_dict(model, dtype)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(config, state["lm_head.weight"].dtype), indent=2))
    return out


def config_from_hf(hf: dict) -> LlamaConfig:
    if hf.get("model_type") not in ("llama", None):
        raise ValueError(f"not a LLaMA checkpoint: model_type={hf.get('model_type')!r}")
    if hf.get("tie_word_embeddings"):
        raise ValueError("tied embeddings are not supported (relora_ds trains an untied lm_head)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("checkpoints with attention/MLP biases are not supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {rope.get('rope_type')!r} is not supported (only plain RoPE)")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    kw = {k: hf[k] for k in _CONFIG_KEYS if k in hf and k != "rope_theta"}
    return LlamaConfig(rope_theta=float(theta), **kw)


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` from a Hugging Face LLaMA directory (safetensors, single or sharded)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: not a Hugging Face model directory")
    config = config_from_hf(json.loads((path / "config.json").read_text()))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{path} has no model.safetensors(.index.json); convert .bin checkpoints to "
                         "safetensors first")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f)))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config.head_dim, config.rope_theta)
    return model.to(dtype)
