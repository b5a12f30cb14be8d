"""Start-up checks shared by the trainer and launch/preflight.py: what would fail every rank, checked before
any engine exists (ValueError naming the problem)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import check_tokenizer_matches
from .hf import config_from_hf
from .model import LlamaForCausalLM
from .model_config import LlamaConfig
from .relora import target_linears
from .train_config import TrainConfig


def load_hf_config(path: str | Path) -> LlamaConfig:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{path}: no config.json (expected a Hugging Face LLaMA directory)")
    return config_from_hf(json.loads(cfg_path.read_text()))


def model_config_for(cfg: TrainConfig, vocab_size: int) -> LlamaConfig:
    """The run's model: a Hugging Face directory's (hf_model / warm_start_from), else the preset."""
    source = cfg.hf_model or cfg.warm_start_from
    if source:
        return load_hf_config(source)
    return LlamaConfig.preset(cfg.model, vocab_size=vocab_size, max_position_embeddings=cfg.seq_len + 1)


def check_model_and_data(cfg: TrainConfig, data_dir: str | Path | None,
                         vocab_size: int) -> tuple[LlamaConfig, dict | None]:
    """(model config, data manifest or None without data_dir): preset or HF directory, tokenizer vs model
    vocab, and target_modules (a bad name fails here, not at the switch after the warm start)."""
    model_config = model_config_for(cfg, vocab_size)
    manifest = check_tokenizer_matches(data_dir, model_config.vocab_size) if data_dir is not None else None
    if cfg.mode != "full":
        with torch.device("meta"):
            target_linears(LlamaForCausalLM(model_config), cfg.target_modules)
    return model_config, manifest
