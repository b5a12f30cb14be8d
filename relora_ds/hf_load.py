"""Loading Hugging Face LLaMA, Qwen2, Qwen3 and Mistral checkpoints as relora_ds models (continued
pre-training): the config mapped and checked (a ValueError names what the model here would not compute as
transformers does), the safetensors read a tensor at a time. Public through ``relora_ds.hf``.
"""
from __future__ import annotations

import json
import shlex
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .model import LlamaForCausalLM
from .model_config import MODEL_TYPES, PER_LAYER_WINDOW, LlamaConfig

# The config keys our LlamaConfig and Hugging Face's share by name (export writes them back: hf.py).
CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                "initializer_range")


def config_from_hf(hf: dict) -> LlamaConfig:
    """Our config of a Hugging Face LLaMA, Qwen2, Qwen3 or Mistral ``config.json``: a ValueError names what the model
    here would not compute as transformers does (another architecture or activation, a RoPE type it does
    not implement)."""
    model_type = hf.get("model_type", "llama")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported; valid: {', '.join(MODEL_TYPES)} (LLaMA-shaped "
                         "decoders; for another architecture use the Python API: relora_ds.wrap on transformers' "
                         "model)")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?") if isinstance(hf["quantization_config"], dict) \
            else hf["quantization_config"]
        raise ValueError(f"a quantized checkpoint (quantization_config, quant_method={method!r}) is not supported: "
                         "start from its bf16/fp16/fp32 weights (relora_ds keeps the frozen base in int8 itself with "
                         "--quantize int8)")
    if float(hf.get("attention_dropout") or 0.0) != 0.0:  # transformers drops attention probabilities in training
        raise ValueError(f"attention_dropout={hf['attention_dropout']} is not supported (this model has no attention "
                         "dropout, so training would differ from transformers'); set it to 0.0 in config.json")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):  # transformers' ACT2FN maps both to SiLU
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (LLaMA's SwiGLU uses 'silu', also "
                         "spelled 'swish')")
    # transformers 5 writes rope_parameters, 4.x rope_scaling; given both, transformers 5 reads rope_scaling
    # (its convert_rope_params_to_dict) and takes the theta from it, else from a top-level rope_theta, not
    # from rope_parameters. Read as it does: another choice would be another RoPE, silently.
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if hf.get("rope_scaling") and hf.get("rope_parameters") and hf["rope_parameters"] != hf["rope_scaling"]:
        warnings.warn(f"config.json holds both rope_scaling {hf['rope_scaling']} and rope_parameters "
                      f"{hf['rope_parameters']}: rope_scaling is used, as transformers does (its rope_theta, else "
                      "the top-level one); delete the one you do not mean", UserWarning, stacklevel=2)
    if any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"per-layer-type RoPE parameters {sorted(rope)} are not supported (one RoPE for every layer)")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported (RoPE on the whole head)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope = _llama3_original_length(hf, rope)
    kw = {k: hf[k] for k in CONFIG_KEYS if k in hf and k != "rope_theta"}
    if model_type == "llama":  # Qwen2's q/k/v biases are fixed (qkv_bias follows model_type); Mistral has none
        kw.update({k: bool(hf[k]) for k in ("attention_bias", "mlp_bias") if k in hf})
    if model_type == "qwen3" and "attention_bias" in hf:  # its q/k norms follow model_type
        kw["attention_bias"] = bool(hf["attention_bias"])
    return LlamaConfig(model_type=model_type, rope_theta=float(theta), rope_scaling=rope or None,
                       # Qwen3Config's head_dim defaults to 128, not hidden / heads
                       head_dim=hf.get("head_dim", 128 if model_type == "qwen3" else None),
                       tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                       **_sliding_window(hf), **kw)


def _llama3_original_length(hf: dict, rope: dict) -> dict:
    """``rope`` with llama3 RoPE's original_max_position_embeddings as transformers 5 reads it: a top-level one
    (Phi-3's place) before the RoPE dict's. A top-level one other than the dict's is refused: transformers 4.x
    reads the dict's, so the RoPE would depend on the version. (Given in neither place, LlamaConfig names it.)"""
    key = "original_max_position_embeddings"
    top, own = hf.get(key), rope.get(key)
    if rope.get("rope_type", rope.get("type")) != "llama3" or top is None:
        return rope
    if own is not None and top != own:
        raise ValueError(f"config.json gives {key}={top} and its llama3 RoPE {key}={own}: transformers 5 reads the "
                         "top-level one, 4.x the RoPE's; give one value (or delete the top-level key)")
    return {**rope, key: top}


def _sliding_window(hf: dict) -> dict:
    """sliding_window and layer_types as transformers applies them to this config: Mistral's window on every
    layer (null: none; absent: MistralConfig's 4096), Qwen2's where use_sliding_window puts it (its
    layer_types, else the layers from max_window_layers on, as Qwen2Config derives them)."""
    if hf.get("model_type") == "mistral":  # MistralForCausalLM ignores layer_types, as here
        return {"sliding_window": hf.get("sliding_window", 4096)}
    window = hf.get("sliding_window", 4096)  # null: Qwen2Config makes every layer full attention
    if hf.get("model_type") in PER_LAYER_WINDOW and hf.get("use_sliding_window") and window is not None:
        layers = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28) else
                                           "full_attention" for i in range(hf.get("num_hidden_layers", 0))]
        if "sliding_attention" in layers:
            every = all(t == "sliding_attention" for t in layers)
            return {"sliding_window": window, "layer_types": None if every else layers}
    return {}


def _not_a_relora_ds_run(path: Path) -> None:
    """Refuse a relora_ds run directory or training checkpoint given as a Hugging Face model, naming what to
    pass instead. A directory whose config.json names a model_type is a model (a Hugging Face Trainer's
    checkpoint-N/ under DeepSpeed holds DeepSpeed's `latest` beside it)."""
    try:
        if "model_type" in json.loads((path / "config.json").read_text()):
            return
    except (OSError, ValueError, TypeError):  # absent or unreadable: named by the caller if no check below applies
        pass
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file():
        export = path / "hf"
        raise ValueError(f"{path} is a relora_ds run directory, not a Hugging Face model: pass its export "
                         f"{export}" + ("" if (export / "config.json").is_file() else
                                       f" (not there: python launch/export.py {shlex.quote(str(path))} --out "
                                       f"{shlex.quote(str(export))})"))
    if any(path.glob("*model_states.pt")) or (path / "latest").is_file():
        raise ValueError(f"{path} is a relora_ds (DeepSpeed) training checkpoint, not a Hugging Face model: "
                         f"export it (python launch/export.py {shlex.quote(str(path))} --out DIR) and pass DIR")


def load_hf_config(path: str | Path) -> LlamaConfig:
    path = Path(path)
    _not_a_relora_ds_run(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: not a Hugging Face model directory (LLaMA, Qwen2, Qwen3 or "
                         "Mistral)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    return config_from_hf(config)


def check_tied_head(path: str | Path, config: LlamaConfig) -> None:
    """Refuse a tied config (tie_word_embeddings) whose checkpoint stores lm_head.weight with values other than
    the embedding's, or without the embedding. transformers 5 then does not tie as the config says: it loads the
    head untied (or ties the embedding to the head), where the model here would tie the head to the embedding, a
    model of other logits, silently. A head equal to the embedding (a .bin conversion stores both) loads."""
    head, embed, path = "lm_head.weight", "model.embed_tokens.weight", Path(path)
    if not config.tie_word_embeddings:
        return
    stored = _stored_names(path)
    if head not in stored:
        return
    if embed not in stored:
        raise ValueError(f"{path}: config.json ties lm_head to the embedding (tie_word_embeddings true), but the "
                         f"checkpoint stores {head} and no {embed}; store the tensor as {embed}")
    with safe_open(str(path / stored[head]), framework="pt") as reader:
        a = reader.get_tensor(head)
    with safe_open(str(path / stored[embed]), framework="pt") as reader:
        b = reader.get_tensor(embed)
    if a.shape != b.shape or not (torch.equal(a, b) if a.dtype == b.dtype else torch.equal(a.float(), b.float())):
        raise ValueError(f"{path}: config.json ties lm_head to the embedding (tie_word_embeddings true), but the "
                         f"checkpoint stores {head} with values other than {embed}'s: transformers 5 loads the two "
                         "untied (4.x would drop the stored head). Set tie_word_embeddings to false in config.json to "
                         f"train both as stored, or delete {head} from the checkpoint to tie the head to the embedding")


def _safetensors_files(path: Path) -> list[str]:
    """The safetensors files of a Hugging Face directory (a sharded one's, from its index); [] where it has none."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"] if (path / "model.safetensors").is_file() else []


def _stored_names(path: Path) -> dict[str, str]:
    """{tensor name: its safetensors file} of a Hugging Face directory, read from the files' headers."""
    names = {}
    for f in _safetensors_files(path):
        with safe_open(str(path / f), framework="pt") as reader:
            names.update(dict.fromkeys(reader.keys(), f))
    return names


def hf_tensors(path: str | Path, dtype: torch.dtype | None = torch.float32,
               names: Collection[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor cast to ``dtype``; None: as stored) for each weight of a Hugging Face directory's
    safetensors (only those in `names` where given: the others are not read), one at a time (rotary tables
    skipped; a quantized checkpoint refused)."""
    path = Path(path)
    files = _safetensors_files(path)
    if not files:
        raise ValueError(f"{path} has no model.safetensors(.index.json); convert .bin checkpoints to "
                         "safetensors first")
    for f in files:
        with safe_open(str(path / f), framework="pt") as reader:
            for key in reader.keys():
                if key.endswith("rotary_emb.inv_freq") or (names is not None and key not in names):
                    continue
                tensor = reader.get_tensor(key)
                if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                    raise ValueError(f"{path / f}: {key} is stored as {tensor.dtype}, a quantized checkpoint; "
                                     "start from its bf16/fp16/fp32 weights")
                yield key, tensor if dtype is None else tensor.to(dtype)


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` from a Hugging Face LLaMA, Qwen2, Qwen3 or Mistral directory (safetensors, single or
    sharded). A tied model's lm_head is its embedding, whether the file stores lm_head.weight or not."""
    config = load_hf_config(path)
    check_tied_head(path, config)
    # Each tensor cast to `dtype` as it is read: the host holds the model once in `dtype` (4 bytes per
    # parameter in fp32), not also the whole checkpoint in its own dtype beside it.
    state = dict(hf_tensors(path, dtype))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True gave lm_head a Parameter of its own
    return model
