"""Load a DeepSpeed JSON and complete it from the run config (the single home of batch and optimizer values).

The JSON holds the engine's own settings: ZeRO stage and offload, bf16/fp16, communication, optimizer
*type* and implementation flags (e.g. ``torch_adam``). Batch sizes, learning rate, betas, eps, weight
decay, gradient clipping and the LR schedule come from the recipe; finding one of them in the JSON is an
error naming both places, so no value is silently preferred over another.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from .train_config import TrainConfig

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_OPT_KEYS = ("lr", "betas", "eps", "weight_decay")

# Used when no --deepspeed file is given (plain `python launch/train.py`): ZeRO off, fp32.
DEFAULT_DS_CONFIG = {"zero_optimization": {"stage": 0},
                     "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}


def load_ds_config(path: str | Path | None) -> dict:
    if path is None:
        return copy.deepcopy(DEFAULT_DS_CONFIG)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--deepspeed {path}: no such file (configs ship in ds_configs/)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed {path}: invalid JSON: {e}") from None


def complete_ds_config(ds: dict, cfg: TrainConfig, world_size: int, source: str = "the DeepSpeed config") -> dict:
    """A copy of ``ds`` with batch sizes, optimizer hyperparameters and clipping from ``cfg``."""
    ds = copy.deepcopy(ds)
    twice = [k for k in _BATCH_KEYS if k in ds]
    if "gradient_clipping" in ds:
        twice.append("gradient_clipping")
    if "scheduler" in ds:
        raise ValueError(f"{source} has a 'scheduler' section; the LR schedule (ReLoRA's jagged cosine) is set "
                         "by the recipe (lr, warmup_steps, cycle_length, restart_warmup_steps, min_lr_ratio): "
                         "remove it")
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    params = opt.setdefault("params", {})
    twice += [f"optimizer.params.{k}" for k in _OPT_KEYS if k in params]
    if twice:
        raise ValueError(f"{source} sets {twice}, which the recipe also sets (micro_batch_size, "
                         "global_batch_size, lr, adam_beta1/2, adam_eps, weight_decay, grad_clip): remove them "
                         "from the JSON so that each value has one home")
    low = [k for k in ("bf16", "fp16") if ds.get(k, {}).get("enabled", False)]
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if low and stage == 0 and cfg.mode != "full":
        # DeepSpeed then wraps the optimizer in its FP16 optimizer, whose fp32 masters and Adam moments
        # (keyed by those masters) the ReLoRA merge and prune cannot reach (relora_ds/zero_reset.py).
        raise ValueError(f"{source} enables {low[0]} with ZeRO stage 0, which mode={cfg.mode!r} does not "
                         "support: use ZeRO stage 1 or higher (ds_configs/zero1.json; on one rank it holds the "
                         f"same state as stage 0), or disable {low[0]} (fp32)")
    per_step = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_step:
        raise ValueError(f"global_batch_size={cfg.global_batch_size} is not divisible by micro_batch_size="
                         f"{cfg.micro_batch_size} x world_size={world_size} = {per_step}; valid global batch "
                         f"sizes are multiples of {per_step}")
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.global_batch_size // per_step
    ds["train_batch_size"] = cfg.global_batch_size
    ds["gradient_clipping"] = cfg.grad_clip
    params.update(lr=cfg.lr, betas=[cfg.adam_beta1, cfg.adam_beta2], eps=cfg.adam_eps,
                  weight_decay=cfg.weight_decay)
    ds.setdefault("steps_per_print", 10**9)  # our own logging replaces DeepSpeed's
    return ds


def uses_bf16(ds: dict) -> bool:
    return bool(ds.get("bf16", {}).get("enabled", False))
