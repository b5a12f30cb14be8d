"""Load a DeepSpeed JSON and complete it from the run config (the single home of batch and optimizer values).

The JSON holds the engine's own settings: ZeRO stage and offload, bf16/fp16, communication, optimizer
*type* and implementation flags (e.g. ``torch_adam``). Batch sizes, learning rate, betas, eps, weight
decay, gradient clipping and the LR schedule come from the recipe; finding one of them in the JSON is an
error naming both places, so no value is silently preferred over another.

DeepSpeed ignores top-level keys it does not know (``"bf_16"`` trains in fp32) and reports a misspelt
optimizer parameter as a TypeError from inside the optimizer's constructor, so every key is checked here
against what the installed DeepSpeed reads, with the likely intended key named.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import json
import typing
import warnings
from pathlib import Path

from .train_config import ConfigWarning, TrainConfig

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_OPT_KEYS = ("lr", "betas", "eps", "weight_decay")
# The optimizer section's own keys (deepspeed/runtime/config.py: TYPE, OPTIMIZER_PARAMS, LEGACY_FUSION).
_OPTIMIZER_SECTION_KEYS = ("type", "params", "legacy_fusion")
# ReLoRA's reset prunes Adam moments and the recipe's betas/eps are Adam's. DeepSpeed matches names in any case.
_SUPPORTED_OPTIMIZERS = ("AdamW", "Adam")

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
    opt = ds.setdefault("optimizer", default_optimizer(ds))
    params = opt.setdefault("params", {})
    twice += [f"optimizer.params.{k}" for k in _OPT_KEYS if k in params]
    if twice:
        raise ValueError(f"{source} sets {twice}, which the recipe also sets (micro_batch_size, "
                         "global_batch_size, lr, adam_beta1/2, adam_eps, weight_decay, grad_clip): remove them "
                         "from the JSON so that each value has one home")
    if params.get("amsgrad") and cfg.mode == "relora":
        raise ValueError(f"{source} sets optimizer.params.amsgrad, whose running max of exp_avg_sq would keep every "
                         "moment ReLoRA's reset prunes: remove it (mode='relora' runs Adam/AdamW without amsgrad)")
    low = [k for k, on in (("bf16", uses_bf16(ds)), ("fp16", uses_fp16(ds))) if on]
    if cfg.merge_residual and cfg.mode == "relora" and not low:
        warnings.warn("merge_residual=True is ignored: the weights are fp32 (no bf16/fp16 in the DeepSpeed "
                      "config), so a merge leaves no rounding residual; its buffers still take 2 bytes per "
                      "base parameter of host memory", ConfigWarning, stacklevel=2)
    stage = _zero_config(ds, source).stage
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
    ds.setdefault("steps_per_print", 10**9)  # our own logging replaces DeepSpeed's
    return ds


def uses_bf16(ds: dict) -> bool:
    """bf16 as DeepSpeed reads it (its config model: ``"enabled": "false"`` is False, not a true string)."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config

    return bool(DeepSpeedBF16Config(**_bf16_section(ds)).enabled)


def zero_stage(ds: dict) -> int:
    """The ZeRO stage of a completed config (complete_ds_config turns the legacy boolean into a section)."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def engine_layout(ds: dict) -> dict:
    """What decides the files and optimizer state a checkpoint holds: ZeRO stage, weight precision, where
    the optimizer runs and its class (torch's AdamW, FusedAdam and DeepSpeedCPUAdam keep other param-group
    keys: loaded directly into another, the first step fails). Two configs with the same layout load each
    other's checkpoints directly; others go through the universal checkpoint (checkpoint.plan_resume)."""
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


def optimizer_offload(ds: dict) -> str | None:
    """Where an offloaded optimizer runs ("cpu", "nvme"), as DeepSpeed reads the section (also the legacy
    ``cpu_offload`` flag); None when it is not offloaded."""
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return None
    if zero.get("cpu_offload"):
        return "cpu"
    device = (zero.get("offload_optimizer") or {}).get("device")
    return device if device in ("cpu", "nvme") else None


def uses_fp16(ds: dict) -> bool:
    from deepspeed.runtime.precision_config import DeepSpeedFP16Config

    return bool(DeepSpeedFP16Config(**ds.get("fp16", {})).enabled)


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
    """DeepSpeed 0.19.8's BF16_Optimizer adds the *running* bf16 gradient into its fp32 buffer after every
    micro-step (``backward_epilogue`` -> ``update_hp_grads(clear_lp_grads=False)``), so over k micro-steps
    micro-batch i is counted k - i times: gradient = sum_i (k - i) g_i / k instead of sum_i g_i / k.
    ``immediate_grad_update`` moves each micro-step's gradient into the fp32 buffer and frees the bf16 one,
    which counts every micro-batch once (tests/test_ds_config.py compares k=4 with k=1)."""
    _check_grad_accum_dtype(ds, source)
    if ds["gradient_accumulation_steps"] == 1 or not uses_bf16_optimizer(ds, source):
        return
    bf16 = _bf16_section(ds)
    if bf16.get("immediate_grad_update", True) is not True:
        raise ValueError(f"{source} sets bf16.immediate_grad_update={bf16['immediate_grad_update']!r} with "
                         "data_types.grad_accum_dtype='fp32' at ZeRO stage 1 and gradient_accumulation_steps="
                         f"{ds['gradient_accumulation_steps']}: DeepSpeed's BF16_Optimizer then adds micro-batch i "
                         "of k into the gradient k - i times. Set it to true (or leave it out), or drop "
                         "grad_accum_dtype, or use one micro-step per optimizer step")
    bf16["immediate_grad_update"] = True


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


def _bf16_section(ds: dict) -> dict:
    # deepspeed/runtime/precision_config.py get_bfloat16_config: "bf16", else the older "bfloat16".
    return ds["bf16"] if ds.get("bf16") is not None else ds.get("bfloat16", {})


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
    ("compile", lambda sec: isinstance(sec, dict) and bool(sec.get("deepcompile")),
     "the trainer never calls engine.compile()"),
    ("comms_logger", lambda sec: isinstance(sec, dict) and bool(sec.get("enabled")),
     "the trainer never prints DeepSpeed's communication summary"),
    *((m, lambda sec: isinstance(sec, dict) and bool(sec.get("enabled")), _MONITOR_WHY)
      for m in ("tensorboard", "wandb", "csv_monitor", "comet")),
    ("flops_profiler", lambda sec: isinstance(sec, dict) and bool(sec.get("enabled")),
     "its timers expect DeepSpeed's own forward/backward calls and stop the first backward here with "
     "'AssertionError: timer is not started'; relora_ds logs tflops_per_gpu and mfu per step itself"),
)


def _refuse_unused_sections(ds: dict, source: str) -> None:
    for key, on, why in _UNUSED_SECTIONS:
        if key in ds and on(ds[key]):
            raise ValueError(f"{source}: the {key!r} section has no effect here ({why}); remove it")


def _as_int(value):
    """A value as DeepSpeed's pydantic config reads an int field ("2" and 2.0 are 2), so that checks see the
    ZeRO stage it will run; anything else as it is (the section's own validation names it)."""
    try:
        return int(value) if not isinstance(value, bool) and float(value) == int(float(value)) else value
    except (TypeError, ValueError):
        return value


# ----------------------------------------------------------------------------- key checks
def check_deepspeed_keys(ds: dict, source: str = "the DeepSpeed config") -> None:
    """Raise ValueError for a key the installed DeepSpeed would ignore or choke on, naming the likely
    intended one: top-level keys, the sections parsed by pydantic models (zero_optimization with its
    offload sections, bf16, fp16, the tensorboard/wandb/csv_monitor/comet monitors), data_types, and
    optimizer.params (the keys the Adam constructor DeepSpeed will call
    accepts, plus DeepSpeed's own flags)."""
    import deepspeed.runtime.config as ds_cfg
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    if not isinstance(ds, dict):
        raise ValueError(f"{source} must be a JSON object, not {type(ds).__name__}")
    removed = {**getattr(ds_cfg, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {})}
    for key in ds:
        if key in removed:
            raise ValueError(f"{source}: {removed[key]}")
        if key in {f.name for f in dataclasses.fields(TrainConfig)} - deepspeed_top_level_keys():
            raise ValueError(f"{source}: {key!r} is not a DeepSpeed key but a recipe setting: set it in the "
                             f"recipe (or --{key.replace('_', '-')}), not in the DeepSpeed JSON")
        if key not in deepspeed_top_level_keys():
            # DeepSpeed ignores unknown top-level keys: "bf_16" would train in fp32 without a word.
            _unknown(f"{source}: top-level key", key, deepspeed_top_level_keys(), list_valid=False,
                     hint=" (DeepSpeed would silently ignore it)")
    if "bf16" in ds and "bfloat16" in ds:
        raise ValueError(f"{source} has both 'bf16' and 'bfloat16' (DeepSpeed then reads only 'bf16'): keep 'bf16'")
    if isinstance(ds.get("checkpoint"), dict) and "load_universal" in ds["checkpoint"]:
        raise ValueError(f"{source}: checkpoint.load_universal is set by the trainer itself, for the resumes that "
                         "need it (another number of ranks, ZeRO stage, precision or optimizer offload); with it "
                         "set here a plain resume fails: remove it")
    zero, removed_zero = ds.get("zero_optimization"), getattr(ds_cfg, "_REMOVED_ZERO_CONFIG_KEYS", {})
    if zero is not None and not isinstance(zero, dict | bool):
        raise ValueError(f"{source}: zero_optimization={zero!r} must be a section, e.g. "
                         '"zero_optimization": {"stage": 2} (or DeepSpeed\'s legacy true/false)')
    for key in zero if isinstance(zero, dict) else ():
        if key in removed_zero:
            raise ValueError(f"{source}: {removed_zero[key]}")
    stage = _as_int(zero.get("stage", 0)) if isinstance(zero, dict) else 0
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{source}: zero_optimization.stage={stage!r} is not a ZeRO stage: valid stages are 0, 1, "
                         "2 and 3")
    if stage in (2, 3) and zero.get("reduce_scatter", True) and (
            ds.get("prescale_gradients") or ds.get("gradient_predivide_factor", 1.0) != 1.0):
        raise ValueError(f"{source}: prescale_gradients and gradient_predivide_factor are not supported by "
                         f"DeepSpeed at ZeRO stage {stage} with reduce_scatter (its default): remove them, or "
                         "set zero_optimization.reduce_scatter to false")
    if isinstance(zero, dict) and stage < 3:
        param = zero.get("offload_param")
        if isinstance(param, dict) and param.get("device", "none") not in ("none", None):
            raise ValueError(f"{source}: zero_optimization.offload_param (device {param['device']!r}) acts only at "
                             f"ZeRO stage 3, and this config is stage {stage}: DeepSpeed would keep the parameters "
                             "on the accelerator without a word. Use stage 3 (ds_configs/zero3_offload.json) or "
                             "remove offload_param")
        optimizer = zero.get("offload_optimizer")
        if isinstance(optimizer, dict) and optimizer.get("device") == "nvme":
            raise ValueError(f"{source}: zero_optimization.offload_optimizer (device 'nvme') swaps to NVMe only at "
                             f"ZeRO stage 3; at stage {stage} DeepSpeed keeps the optimizer in host memory as with "
                             "'cpu', without a word: use device 'cpu'")
        only3 = sorted(k for k in zero if k.startswith("stage3_"))
        if only3:
            warnings.warn(f"{source}: {', '.join(only3)} act only at ZeRO stage 3; this config is stage {stage}, "
                          "so DeepSpeed ignores them", ConfigWarning, stacklevel=2)
    from deepspeed.monitor.config import CometConfig, CSVConfig, TensorBoardConfig, WandbConfig
    from deepspeed.runtime.constants import GRAD_ACCUM_DTYPE

    for section, model in (("zero_optimization", DeepSpeedZeroConfig), ("bf16", DeepSpeedBF16Config),
                           ("bfloat16", DeepSpeedBF16Config), ("fp16", DeepSpeedFP16Config),
                           ("tensorboard", TensorBoardConfig), ("wandb", WandbConfig), ("csv_monitor", CSVConfig),
                           ("comet", CometConfig)):
        if isinstance(ds.get(section), dict):
            _check_model_keys(ds[section], model, f"{source}: {section}")
    for key in ds.get("data_types", {}) if isinstance(ds.get("data_types"), dict) else ():
        if key != GRAD_ACCUM_DTYPE:  # the one key DeepSpeed 0.19 reads there (and relora_ds relies on)
            _unknown(f"{source}: data_types: key", key, {GRAD_ACCUM_DTYPE: None})
    if isinstance(ds.get("aio"), dict):  # DeepSpeed's get_aio_config reads the keys of AIO_DEFAULT_DICT only
        from deepspeed.runtime.swap_tensor.aio_config import AIO_DEFAULT_DICT

        for key in ds["aio"]:
            if key not in AIO_DEFAULT_DICT:
                _unknown(f"{source}: aio: key", key, AIO_DEFAULT_DICT, hint=" (DeepSpeed would silently ignore it)")
    _check_optimizer(ds, source)
    if uses_bf16(ds) and uses_fp16(ds):  # after the sections' keys are checked: these parse them
        raise ValueError(f"{source} enables both bf16 and fp16: enable one (bf16 on GPUs that have it)")


@functools.lru_cache(maxsize=None)
def deepspeed_top_level_keys() -> frozenset[str]:
    """Every top-level key the installed DeepSpeed reads from its JSON.

    DeepSpeed has no list of them: each of its parsers (``DeepSpeedConfig._initialize_params`` and the
    section configs it builds) looks its own key up. So a minimal config is parsed through a dict that
    records each key looked up, which follows the installed version. ``deepspeed.initialize`` itself also
    reads the two mesh sizes."""
    from collections.abc import KeysView

    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger

    seen: set[str] = set()

    class Recording(dict):
        def get(self, key, default=None):
            seen.add(key)
            return super().get(key, default)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def keys(self):  # `key in d.keys()` goes through __contains__
            return KeysView(self)

    level = logger.level
    logger.setLevel("WARNING")  # "Config mesh_device None world_size = 1"
    try:
        DeepSpeedConfig(Recording(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1))
    finally:
        logger.setLevel(level)
    return frozenset(seen | {"sequence_parallel_size", "data_parallel_size"})


def _check_model_keys(section: dict, model, where: str) -> None:
    """Keys of ``section`` against a DeepSpeed pydantic config model: field names and their aliases
    (``stage3_*``), recursing into sub-models such as offload_optimizer."""
    fields = model.model_fields
    known = {}
    for name, f in fields.items():
        known[name] = f
        aliases = [f.alias, f.validation_alias]
        aliases += list(getattr(f.validation_alias, "choices", []) or [])
        known.update({a: f for a in aliases if isinstance(a, str)})
    for key, value in section.items():
        if key not in known:
            _unknown(f"{where}: key", key, known)
        sub = _config_model(known[key].annotation)
        if sub is not None and isinstance(value, dict):
            _check_model_keys(value, sub, f"{where}.{key}")


def _config_model(annotation):
    from pydantic import BaseModel

    for tp in (annotation, *typing.get_args(annotation)):  # Optional[Model] -> Model
        if inspect.isclass(tp) and issubclass(tp, BaseModel):
            return tp
    return None


def _check_optimizer(ds: dict, source: str) -> None:
    opt = ds.get("optimizer")
    if opt is None:
        return
    if not isinstance(opt, dict):
        raise ValueError(f"{source}: 'optimizer' must be an object like {DEFAULT_DS_CONFIG['optimizer']}")
    for key in opt:
        if key not in _OPTIMIZER_SECTION_KEYS:
            _unknown(f"{source}: optimizer key", key, _OPTIMIZER_SECTION_KEYS)
    kind = opt.get("type")
    if not isinstance(kind, str) or kind.lower() not in [t.lower() for t in _SUPPORTED_OPTIMIZERS]:
        raise ValueError(f"{source}: optimizer.type={kind!r} is not supported; valid types: "
                         f"{list(_SUPPORTED_OPTIMIZERS)} (ReLoRA's reset prunes Adam moments and the recipe's "
                         "adam_beta1/2 and adam_eps are Adam's)")
    params = opt.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"{source}: optimizer.params must be an object, not {params!r}")
    ctor, valid = adam_parameters(ds)
    for key in params:
        if key not in valid:
            _unknown(f"{source}: optimizer.params key", key, valid,
                     hint=f" to {ctor.__module__}.{ctor.__name__}, which DeepSpeed builds for this config")


def adam_parameters(ds: dict) -> tuple[type, list[str]]:
    """The Adam class DeepSpeed 0.19 builds for this config and the optimizer.params keys it accepts.

    ``DeepSpeedEngine._configure_basic_optimizer`` / ``get_optimizer_configuration``: DeepSpeed pops
    ``adam_w_mode``, ``torch_adam`` and ``fp32_optimizer_states`` (and ``foreach`` with torch_adam) and passes
    the rest to torch.optim.AdamW/Adam (``torch_adam``), DeepSpeedCPUAdam (optimizer offloaded to cpu or
    nvme) or FusedAdam, together with a mode flag of its own, which params must then not repeat."""
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    opt = ds.get("optimizer", {})
    params = opt.get("params", {})
    own = {"torch_adam", "adam_w_mode", "fp32_optimizer_states"}
    if params.get("torch_adam"):
        w_mode = opt.get("type", "").lower() == "adamw" or params.get("adam_w_mode", True)
        ctor, passed = (torch.optim.AdamW if w_mode else torch.optim.Adam), {"foreach"}
        own.add("foreach")
    else:
        if optimizer_offload(ds):
            ctor, passed = DeepSpeedCPUAdam, {"adamw_mode", "fp32_optimizer_states"}
        else:
            ctor, passed = FusedAdam, {"adam_w_mode"}
    accepted = list(inspect.signature(ctor).parameters)[1:]  # [0] is the parameters (params / model_params)
    return ctor, sorted(own | (set(accepted) - passed))


def _unknown(what: str, key, known, hint: str = "", list_valid: bool = True) -> typing.NoReturn:
    """ValueError naming the unknown key, the closest known one (difflib) and, unless the list is long and
    a close match was found, all valid ones."""
    close = difflib.get_close_matches(str(key), list(known), n=1)
    msg = f"{what} {key!r} is unknown{hint}"
    if close:
        msg += f"; did you mean {close[0]!r}?"
    if list_valid or not close:
        msg += f"{'' if close else ';'} valid keys: {sorted(known)}"
    raise ValueError(msg)
