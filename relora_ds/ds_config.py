"""Load a DeepSpeed JSON and complete it from the run config (the single home of batch and optimizer values).

The JSON holds the engine's own settings: ZeRO stage and offload, bf16/fp16, communication, optimizer
*type* and implementation flags (e.g. ``torch_adam``). Batch sizes, learning rate, betas, eps, weight
decay, gradient clipping and the LR schedule come from the recipe; finding one of them in the JSON is an
error naming both places, so no value is silently preferred over another.

Every key is checked against what the installed DeepSpeed reads (relora_ds/ds_schema.py), with the likely
intended key named.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

from .ds_schema import (ROUND_ROBIN_WHY, _as_int, _bf16_section, adam_parameters, as_bool, check_deepspeed_keys,
                        optimizer_offload, uses_bf16, uses_fp16)
from .train_config import ConfigWarning, TrainConfig

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_OPT_KEYS = ("lr", "betas", "eps", "weight_decay")

# Used when no --deepspeed file is given (plain `python launch/train.py`): ZeRO off, fp32.
DEFAULT_DS_CONFIG = {"zero_optimization": {"stage": 0},
                     "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}


def load_ds_config(path: str | Path | None) -> dict:
    if path is None:
        return copy.deepcopy(DEFAULT_DS_CONFIG)
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"--deepspeed {path}: no such file (configs ship in ds_configs/)")
    try:
        return json.loads(path.read_text(), object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed {path}: invalid JSON: {e}") from None
    except _DuplicateKey as e:
        raise ValueError(f"--deepspeed {path}: key {e.args[0]!r} appears twice in one object (JSON readers keep "
                         "the last silently); keep one") from None


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list) -> dict:
    """json's object_pairs_hook: a key twice in one object is an error, not the last one silently."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _off(value) -> bool:
    """``enabled`` switched off unambiguously for a section DeepSpeed reads by truthiness: false or 0 (a
    string such as "false" it would read as on)."""
    return isinstance(value, (bool, int)) and not value


def complete_ds_config(ds: dict, cfg: TrainConfig, world_size: int, source: str = "the DeepSpeed config") -> dict:
    """A copy of ``ds`` with batch sizes, optimizer hyperparameters and clipping from ``cfg``."""
    ds = copy.deepcopy(ds)
    check_deepspeed_keys(ds, source)
    _refuse_auto(ds, source)
    if isinstance(ds.get("zero_optimization"), bool):  # DeepSpeed's legacy form: true means stage 1
        ds["zero_optimization"] = {"stage": 1 if ds["zero_optimization"] else 0}
    twice = [k for k in _BATCH_KEYS if k in ds]
    if "gradient_clipping" in ds:
        twice.append("gradient_clipping")
    if "scheduler" in ds:
        raise ValueError(f"{source} has a 'scheduler' section; the LR schedule (ReLoRA's jagged cosine) is set "
                         "by the recipe (lr, warmup_steps, cycle_length, restart_warmup_steps, min_lr_ratio): "
                         "remove it")
    _refuse_unused_sections(ds, source)
    _refuse_int8_breaking_zero3(ds, cfg.quantize, source)
    opt = ds.setdefault("optimizer", default_optimizer(ds))
    params = opt.setdefault("params", {})
    twice += [f"optimizer.params.{k}" for k in _OPT_KEYS if k in params]
    if twice:
        raise ValueError(f"{source} sets {twice}, which the recipe also sets (micro_batch_size, "
                         "global_batch_size, lr, adam_beta1/2, adam_eps, weight_decay, grad_clip): remove them "
                         "from the JSON so that each value has one home")
    if str(opt.get("type")).lower() == "adam" and "adam_w_mode" not in params and cfg.weight_decay:
        raise ValueError(f"{source}: optimizer.type 'Adam' builds AdamW in DeepSpeed (decoupled weight decay) unless "
                         f"optimizer.params.adam_w_mode is false, and weight_decay={cfg.weight_decay}: write type "
                         "'AdamW' for decoupled decay, or add \"adam_w_mode\": false for Adam's L2 weight decay")
    if params.get("amsgrad") and cfg.mode == "relora":
        raise ValueError(f"{source} sets optimizer.params.amsgrad, whose running max of exp_avg_sq would keep every "
                         "moment ReLoRA's reset prunes: remove it (mode='relora' runs Adam/AdamW without amsgrad)")
    low = [k for k, on in (("bf16", uses_bf16(ds)), ("fp16", uses_fp16(ds))) if on]
    if cfg.merge_residual and cfg.mode == "relora" and not low:
        warnings.warn("merge_residual=True is ignored: the weights are fp32 (no bf16/fp16 in the DeepSpeed "
                      "config), so a merge leaves no rounding residual; its buffers still take 2 bytes per "
                      "base parameter of host memory", ConfigWarning, stacklevel=2)
    stage = _zero_config(ds, source).stage
    if stage == 3 and cfg.activation_checkpointing and cfg.activation_checkpointing_policy == "selective":
        zero = ds["zero_optimization"]
        if "memory_efficient_linear" in zero and as_bool(zero["memory_efficient_linear"]) is not False:
            raise ValueError(f"{source} sets zero_optimization.memory_efficient_linear, which replaces "
                             "torch.nn.functional.linear with DeepSpeed's version that adds a bias in place into "
                             "its matmul's output; the selective checkpointing policy keeps that output, so its "
                             "recompute would add the bias twice (wrong gradients): remove the key (the trainer "
                             "then turns it off) or use --activation-checkpointing-policy full")
        zero["memory_efficient_linear"] = False
    _release_nvme_parameters_after_use(ds, stage, source)
    zero = ds.get("zero_optimization")
    if stage in (1, 2) and isinstance(zero, dict) and as_bool(zero.get("round_robin_gradients", False)) is not False:
        raise ValueError(f"{source}: zero_optimization.round_robin_gradients is not supported: {ROUND_ROBIN_WHY}")
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
    _accumulate_bf16_optimizer_grads_once(ds, source)
    _refuse_bf16_masters_with_fp32_moments(ds, stage, source)
    _refuse_fp16_masters_with_fp32_moments(ds, stage, source)
    ds.setdefault("steps_per_print", 10**9)  # our own logging replaces DeepSpeed's
    _parse_as_deepspeed(ds, source)
    return ds


def _parse_as_deepspeed(ds: dict, source: str) -> None:
    """DeepSpeed's own parse of the completed config, the one deepspeed.initialize makes: a value it refuses
    (e.g. an unknown communication_data_type) is a ValueError naming the file here, in preflight too, not an
    error (or a traceback) from every rank's engine start. train_batch_size is left out: DeepSpeed derives it
    from its world size, 1 before the process group starts."""
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel("ERROR")  # its world-size line and deprecation warnings: DeepSpeed says them again at start
    try:
        DeepSpeedConfig({k: v for k, v in copy.deepcopy(ds).items() if k != "train_batch_size"})
    except (DeepSpeedConfigError, ValueError, TypeError, AttributeError, AssertionError) as e:
        raise ValueError(f"{source}: DeepSpeed refuses this config: {e}") from None
    finally:
        logger.setLevel(level)


def _release_nvme_parameters_after_use(ds: dict, stage: int, source: str) -> None:
    """ZeRO-3 with the parameters on NVMe: each partition swapped in holds one of ``offload_param.buffer_count``
    swap buffers (DeepSpeed's default 5) until it is released, and DeepSpeed keeps a gathered parameter that
    is used again within ``stage3_max_reuse_distance`` elements (default 1e9, counted over the modules between
    the two uses: most of a step's weights below ~0.5B parameters, forward into backward, and the later
    layers' above). A ReLoRA run's frozen weights then stayed swapped in until the buffers ran out in the
    second step's forward (measured: 130m on 1 rank, ds_configs/zero3_nvme.json, ``AssertionError: Not enough
    buffers 0 for swapping 1``; full-rank training did not hit it). Unset, it is 0 here: each parameter goes
    back to its swap file after use. A value above 0 is kept, with a warning."""
    zero = ds.get("zero_optimization")
    if stage != 3 or not isinstance(zero, dict) or (zero.get("offload_param") or {}).get("device") != "nvme":
        return
    keys = [k for k in ("stage3_max_reuse_distance", "max_reuse_distance") if k in zero]
    if not keys:
        zero["stage3_max_reuse_distance"] = 0
    elif zero[keys[0]] != 0:
        warnings.warn(f"{source} sets zero_optimization.{keys[0]}={zero[keys[0]]} with the parameters on nvme: "
                      "a parameter used again within that many elements keeps its swap buffer, and DeepSpeed "
                      "stops the step (\"Not enough buffers\") once they outnumber offload_param.buffer_count; "
                      "remove the key (the trainer then sets 0: released after each use)", ConfigWarning,
                      stacklevel=3)


def zero_stage(ds: dict) -> int:
    """The ZeRO stage of a completed config (complete_ds_config turns the legacy boolean into a section)."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def engine_layout(ds: dict) -> dict:
    """What decides the files and optimizer state a checkpoint holds: ZeRO stage, weight precision, where
    the optimizer runs and its class (torch's AdamW, FusedAdam and DeepSpeedCPUAdam keep other param-group
    keys: loaded directly into another, the first step fails). Two configs with the same layout load each
    other's checkpoints directly; others go through the universal checkpoint (resume_plan.plan_resume)."""
    zero = _zero_config(ds, "the DeepSpeed config")
    offload = zero.offload_optimizer.device if zero.offload_optimizer is not None else "none"
    precision = "bf16" if uses_bf16(ds) else "fp16" if uses_fp16(ds) else "fp32"
    completed = ds if "optimizer" in ds else {**ds, "optimizer": default_optimizer(ds)}  # as complete_ds_config
    return {"zero_stage": zero.stage, "precision": precision,
            "offload_optimizer": str(getattr(offload, "value", offload)),
            "optimizer": adam_parameters(completed)[0].__name__}


def default_optimizer(ds: dict) -> dict:
    """The optimizer section of a JSON without one: torch's AdamW (FusedAdam needs a CUDA build of its op),
    but DeepSpeedCPUAdam for an offloaded optimizer, as the ds_configs/*offload* files choose (torch's AdamW
    on the host is far slower)."""
    return {"type": "AdamW", "params": {} if optimizer_offload(ds) else {"torch_adam": True}}


# ZeRO-3 settings an int8 base does not survive, with the reason (DeepSpeed 0.19.8).
_INT8_BREAKING_ZERO3 = {
    "use_all_reduce_for_fetch_params": "its fetch gathers a layer's parameters (the int8 base with the bf16 LoRA "
                                       "factors) into one flat buffer of a single dtype: the first forward fails",
    "zero_quantized_weights": "it re-quantizes every partition through fp16 and casts the gathered values back to "
                              "the parameter's dtype, which for the int8 base truncates them",
    "zero_quantized_nontrainable_weights": "it re-quantizes the frozen partitions (the int8 base among them) through "
                                           "fp16 and casts the gathered values back to int8, truncating them",
}


def _refuse_int8_breaking_zero3(ds: dict, quantize: str | None, source: str) -> None:
    zero = ds.get("zero_optimization")
    if not quantize or not isinstance(zero, dict) or _as_int(zero.get("stage", 0)) != 3:
        return  # below stage 3 DeepSpeed reads none of them
    for key, why in _INT8_BREAKING_ZERO3.items():
        for spelling in (key, f"stage3_{key}"):
            if as_bool(zero.get(spelling, False)) is not False:  # DeepSpeed's pydantic bool: "false" is off
                raise ValueError(f"{source}: zero_optimization.{spelling} with quantize={quantize!r}: {why}. Remove "
                                 f"it, or train without quantize")


def _refuse_auto(ds, source: str, path: str = "") -> None:
    """``"auto"`` is a Hugging Face Trainer placeholder: DeepSpeed itself drops such a value and silently
    uses its default (``"bf16": {"enabled": "auto"}`` trains in fp32)."""
    items = ds.items() if isinstance(ds, dict) else enumerate(ds) if isinstance(ds, list) else ()
    for key, value in items:
        where = f"{path}.{key}" if path else str(key)
        if value == "auto":
            raise ValueError(f"{source}: {where} is \"auto\", a Hugging Face Trainer placeholder that DeepSpeed "
                             "ignores (it would use its default without a word): give a value, or leave the key "
                             "out (batch sizes, lr and clipping come from the recipe)")
        _refuse_auto(value, source, where)


def uses_bf16_optimizer(ds: dict, source: str = "the DeepSpeed config") -> bool:
    """Whether DeepSpeed 0.19 wraps the optimizer in its ``BF16_Optimizer``.

    ``DeepSpeedEngine._do_optimizer_sanity_check``: bf16 weights, fp32 gradient accumulation
    (``data_types.grad_accum_dtype``), ZeRO stage 1 and the optimizer not offloaded to the CPU. (At stage 0
    that mix is refused by ``_check_grad_accum_dtype``; stages 2 and 3 use the ZeRO optimizer.)"""
    if not uses_bf16(ds) or _grad_accum_dtype(ds, source) != "fp32":
        return False
    zero = _zero_config(ds, source)
    offload = zero.offload_optimizer.device if zero.offload_optimizer is not None else "none"
    return zero.stage == 1 and offload != "cpu"


def _accumulate_bf16_optimizer_grads_once(ds: dict, source: str) -> None:
    """DeepSpeed 0.19.8's BF16_Optimizer, without ``immediate_grad_update``, adds the bf16 gradient into its
    fp32 buffer after every micro-step and relies on the engine's backward prologue to zero the bf16 one
    first. That prologue runs from hooks DeepSpeed puts on the tensors of the model's output; while our
    CausalLMOutput was a dataclass (until 2026-12-03) DeepSpeed saw none, the prologue never ran, and micro-batch
    i of k was counted k - i times. ``immediate_grad_update`` (set here unless the config says otherwise)
    moves each micro-step's gradient into the fp32 buffer and frees the bf16 one at once: correct either way,
    and no bf16 gradient is kept between micro-steps (tests/test_ds_config.py compares k=4 with k=1, both
    ways)."""
    _check_grad_accum_dtype(ds, source)
    if ds["gradient_accumulation_steps"] == 1 or not uses_bf16_optimizer(ds, source):
        return
    _bf16_section(ds).setdefault("immediate_grad_update", True)


def _refuse_bf16_masters_with_fp32_moments(ds: dict, stage: int, source: str) -> None:
    """bf16 master weights (``bf16.bf16_master_weights_and_grads``, ZeRO 1-3) with Adam moments kept in fp32 (the
    offloaded DeepSpeedCPUAdam's default): a checkpoint load rounds every moment to bf16 (torch's
    Optimizer.load_state_dict casts state to its parameter's dtype, here the bf16 master partition), so a resumed
    run's next step differs from the uninterrupted run's (measured: moments off by up to 4.6e-7 of 1.8e-4, every
    parameter's next update changed; tests/test_precision_review.py). Moments kept in bf16 from the start resume
    exactly."""
    bf16 = _bf16_section(ds)
    if stage == 0 or not uses_bf16(ds) or not isinstance(bf16, dict) or \
            as_bool(bf16.get("bf16_master_weights_and_grads", False)) is not True:
        return
    moments_fp32 = as_bool(ds["optimizer"].get("params", {}).get("fp32_optimizer_states", True)) is not False
    if as_bool(bf16.get("bf16_optimizer_states", False)) is not True and moments_fp32:
        raise ValueError(f"{source} sets bf16.bf16_master_weights_and_grads with Adam moments in fp32: a checkpoint "
                         "load rounds the moments to the bf16 masters' dtype, so a resumed run does not continue "
                         "the saved one. Add \"bf16_optimizer_states\": true to the bf16 section (or, offloaded, "
                         "\"fp32_optimizer_states\": false to optimizer.params: moments in bf16 from the start, and a "
                         "resume continues exactly), or remove bf16_master_weights_and_grads (fp32 masters and "
                         "moments)")


def _refuse_fp16_masters_with_fp32_moments(ds: dict, stage: int, source: str) -> None:
    """fp16 master weights (``fp16.fp16_master_weights_and_grads``, ZeRO 1-3, offloaded DeepSpeedCPUAdam) with its
    fp32 Adam moments: a checkpoint load casts the moments to the fp16 masters' dtype, where exp_avg_sq below fp16's
    range flushes to zero (measured: 39% of them; the resumed step 1.5e4 times the update;
    tests/test_diff_review.py). DeepSpeed has no fp16 counterpart of bf16_optimizer_states."""
    fp16 = ds.get("fp16")
    if stage == 0 or not uses_fp16(ds) or not isinstance(fp16, dict) or \
            as_bool(fp16.get("fp16_master_weights_and_grads", False)) is not True:
        return
    if as_bool(ds["optimizer"].get("params", {}).get("fp32_optimizer_states", True)) is not False:
        raise ValueError(f"{source} sets fp16.fp16_master_weights_and_grads with Adam moments in fp32: a checkpoint "
                         "load casts the moments to fp16, where small exp_avg_sq values become 0, so a resumed run "
                         "does not continue the saved one. Remove fp16_master_weights_and_grads (fp32 masters and "
                         "moments), or use bf16 with bf16_master_weights_and_grads and bf16_optimizer_states")


def _check_grad_accum_dtype(ds: dict, source: str) -> None:
    """DeepSpeed raises NotImplementedError("unsupported mix ...") at initialize when ZeRO is off and the
    gradient accumulation dtype differs from the weights' (engine._do_optimizer_sanity_check)."""
    accum = _grad_accum_dtype(ds, source)
    weights = "bf16" if uses_bf16(ds) else "fp16" if uses_fp16(ds) else "fp32"
    if accum is not None and accum != weights and _zero_config(ds, source).stage == 0:
        raise ValueError(f"{source} sets data_types.grad_accum_dtype={ds['data_types']['grad_accum_dtype']!r} "
                         f"with {weights} weights at ZeRO stage 0, which DeepSpeed does not support: use ZeRO "
                         f"stage 1 or higher, or remove grad_accum_dtype (accumulate in {weights})")


def _grad_accum_dtype(ds: dict, source: str) -> str | None:
    from deepspeed.runtime.config import DtypeEnum

    value = ds.get("data_types", {}).get("grad_accum_dtype")
    if value is None:
        return None
    try:
        return DtypeEnum(value).name
    except ValueError:
        valid = sorted({str(v) for e in DtypeEnum for v in e._all_values[1:]})
        raise ValueError(f"{source}: data_types.grad_accum_dtype={value!r} is not a dtype DeepSpeed knows; "
                         f"valid values: {valid}") from None


def _zero_config(ds: dict, source: str):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = ds.get("zero_optimization", {})
    try:
        return DeepSpeedZeroConfig(**(zero if isinstance(zero, dict) else {"stage": 1 if zero else 0}))
    except ValueError as e:  # pydantic's ValidationError: a bad value (key names are checked before)
        raise ValueError(f"{source}: zero_optimization: {e}") from None


# Sections DeepSpeed reads but that act only through calls this trainer does not make, or that would log a
# part of the run: accepted, they would do nothing (or mislead) without a word. (key, is it on?, why)
_MONITOR_WHY = ("DeepSpeed's monitor sees only its own lr and loss scale, and restarts its sample axis at the "
                "warm-start switch (a new engine); relora_ds logs every metric and event to "
                "output_dir/metrics.jsonl and output_dir/tensorboard itself")
_UNUSED_SECTIONS = (
    ("activation_checkpointing", lambda sec: bool(sec),
     "the model recomputes with torch.utils.checkpoint, not DeepSpeed's checkpointing: use the recipe's "
     "activation_checkpointing (--activation-checkpointing)"),
    ("compile", lambda sec: isinstance(sec, dict) and as_bool(sec.get("deepcompile", False)) is not False,
     "the trainer never calls engine.compile(): use the recipe's compile (--compile), torch.compile of each "
     "decoder layer"),
    # Pydantic sections: DeepSpeed reads "enabled": "false" as false, and so does as_bool.
    ("comms_logger", lambda sec: isinstance(sec, dict) and as_bool(sec.get("enabled", False)) is not False,
     "the trainer never prints DeepSpeed's communication summary"),
    *((m, lambda sec: isinstance(sec, dict) and as_bool(sec.get("enabled", False)) is not False, _MONITOR_WHY)
      for m in ("tensorboard", "wandb", "csv_monitor", "comet")),
    # Read by truthiness (get_scalar_param): anything but an empty section or "enabled": false (or 0) is refused,
    # a misspelt key included.
    ("data_efficiency", lambda sec: bool(sec) and not (isinstance(sec, dict) and _off(sec.get("enabled"))),
     "curriculum learning and data routing act only through DeepSpeed's own dataloader (deepspeed_io) and "
     "model conversions, which the trainer does not use: its batches come from relora_ds.data"),
    ("torch_autocast", lambda sec: bool(sec) and not (isinstance(sec, dict) and _off(sec.get("enabled"))),
     "the memory estimate, the MFU and the gradient norm read the training precision from the bf16/fp16 "
     "sections, which would say fp32 under it: use "
     "\"bf16\": {\"enabled\": true} (fp32 masters in the optimizer, as ds_configs/zero2.json)"),
    ("flops_profiler", lambda sec: isinstance(sec, dict) and bool(sec.get("enabled")),
     "its timers expect DeepSpeed's own forward/backward calls and stop the first backward here with "
     "'AssertionError: timer is not started'; relora_ds logs tflops_per_gpu and mfu per step itself"),
)


def _refuse_unused_sections(ds: dict, source: str) -> None:
    for key, on, why in _UNUSED_SECTIONS:
        if key in ds and on(ds[key]):
            raise ValueError(f"{source}: the {key!r} section has no effect here ({why}); remove it")

