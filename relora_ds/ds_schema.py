"""What the installed DeepSpeed reads from a config: the keys it knows (a misspelt or unknown one is an
error naming the likely intended key: DeepSpeed ignores unknown top-level keys, ``"bf_16"`` trains in fp32,
and reports a misspelt optimizer parameter as a TypeError from inside the optimizer's constructor), how it
reads bf16/fp16 and an offloaded optimizer, and which Adam class it builds (with the parameters that class
accepts). relora_ds/ds_config.py completes a config from the recipe on top of these.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import typing
import warnings

from .train_config import ConfigWarning, TrainConfig

# The optimizer section's own keys (deepspeed/runtime/config.py: TYPE, OPTIMIZER_PARAMS, LEGACY_FUSION).
_OPTIMIZER_SECTION_KEYS = ("type", "params", "legacy_fusion")
# ReLoRA's reset prunes Adam moments and the recipe's betas/eps are Adam's. DeepSpeed matches names in any case.
_SUPPORTED_OPTIMIZERS = ("AdamW", "Adam")
# Sections DeepSpeed parses as objects ({"enabled": true, ...}): a bare true or null fails inside it.
_OBJECT_SECTIONS = ("bf16", "bfloat16", "fp16", "optimizer", "data_types", "aio", "tensorboard", "wandb",
                    "csv_monitor", "comet", "checkpoint", "activation_checkpointing", "flops_profiler",
                    "comms_logger", "compile", "timers", "pipeline", "tensor_parallel", "autotuning",
                    "weight_quantization", "hybrid_engine", "expert_parallel")
# Top-level switches DeepSpeed reads by truthiness ("false" is on) or combines with `|` (a string fails at start).
_SWITCH_KEYS = ("prescale_gradients", "disable_allgather", "dump_state", "zero_allow_untested_optimizer",
                "zero_force_ds_cpu_optimizer", "wall_clock_breakdown", "memory_breakdown",
                "use_data_before_expert_parallelism")
# Keys DeepSpeed reads as a dtype name ("fp16", "bf16", "fp32"; null for its default): anything else fails inside it.
_DTYPE_NAME_KEYS = ("communication_data_type", "seq_parallel_communication_data_type")
# DeepSpeed 0.19.8 stage_1_and_2.py: the flat partitions hold round_robin_bit16_groups (the parameters
# reordered [p0, p2, ..., p1, p3, ...] over 2 ranks), but _link_all_hp_params links bit16_groups (model order)
# with offsets summed in that order: each _hp_mapping points at another parameter's slice.
ROUND_ROBIN_WHY = ("DeepSpeed 0.19.8 then links each parameter to another parameter's slice of the fp32 masters "
                   "and optimizer state (stage_1_and_2.py _link_all_hp_params), so the warm-start switch, the "
                   "merge, the prune and the export, which read and write them there, would use other "
                   "parameters' values (its own step is right). Remove it: it only reorders the gradient "
                   "reduction")
# Keys deepspeed.initialize reads for a device mesh (sequence parallelism): this trainer shards data over all ranks.
_MESH_KEYS = ("sequence_parallel_size", "data_parallel_size")


def uses_bf16(ds: dict) -> bool:
    """bf16 as DeepSpeed reads it (its config model: ``"enabled": "false"`` is False, not a true string)."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config

    return bool(DeepSpeedBF16Config(**_bf16_section(ds)).enabled)


def as_bool(value):
    """``value`` as DeepSpeed's config models read a bool (pydantic's lax parsing: "false", 0, "off", ... are
    False); None where they would refuse it (their own validation then names it)."""
    import pydantic
    try:
        return pydantic.TypeAdapter(bool).validate_python(value)
    except pydantic.ValidationError:
        return None


def optimizer_offload(ds: dict) -> str | None:
    """Where an offloaded optimizer runs ("cpu", "nvme"), as DeepSpeed reads the section (also the legacy
    ``cpu_offload`` flag, a pydantic bool: "false" is off); None when it is not offloaded."""
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return None
    if as_bool(zero.get("cpu_offload", False)):
        return "cpu"
    device = (zero.get("offload_optimizer") or {}).get("device")
    return device if device in ("cpu", "nvme") else None


def uses_fp16(ds: dict) -> bool:
    from deepspeed.runtime.precision_config import DeepSpeedFP16Config

    return bool(DeepSpeedFP16Config(**ds.get("fp16", {})).enabled)


def _bf16_section(ds: dict) -> dict:
    # deepspeed/runtime/precision_config.py get_bfloat16_config: "bf16", else the older "bfloat16".
    return ds["bf16"] if ds.get("bf16") is not None else ds.get("bfloat16", {})


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
        if key in _MESH_KEYS:
            raise ValueError(f"{source}: {key!r} sets a DeepSpeed device mesh for sequence parallelism, which this "
                             "trainer does not have: it is data-parallel over every rank (the sampler shards the "
                             "data over all of them). Remove it")
        recipe_key = key in {f.name for f in dataclasses.fields(TrainConfig)}
        if key in _OBJECT_SECTIONS and not isinstance(ds[key], dict):
            also = (f"; the recipe setting {key!r} goes in the recipe (or --{key.replace('_', '-')})"
                    if recipe_key else "")
            raise ValueError(f"{source}: {key!r} must be an object, not {ds[key]!r} (e.g. "
                             f"{_SECTION_EXAMPLES.get(key, '{...}')}); leave the key out for DeepSpeed's "
                             f"default{also}")
        if key in _DTYPE_NAME_KEYS and ds[key] is not None and not (
                isinstance(ds[key], str) and ds[key].lower() in ("fp32", "fp16", "bf16")):  # DeepSpeed lowercases
            raise ValueError(f"{source}: {key!r} must name a dtype (\"fp32\", \"fp16\" or \"bf16\"), not "
                             f"{ds[key]!r}; leave the key out for DeepSpeed's default")
        if key in _SWITCH_KEYS and not isinstance(ds[key], (bool, int)):
            raise ValueError(f"{source}: {key}={ds[key]!r} must be true or false (a JSON boolean, or 0/1); DeepSpeed "
                             "reads it by truthiness, so a string such as \"false\" counts as true")
        if recipe_key and key not in deepspeed_top_level_keys():
            raise ValueError(f"{source}: {key!r} is not a DeepSpeed key but a recipe setting: set it in the "
                             f"recipe (or --{key.replace('_', '-')}), not in the DeepSpeed JSON")
        if key not in deepspeed_top_level_keys():
            # DeepSpeed ignores unknown top-level keys: "bf_16" would train in fp32 without a word.
            _unknown(f"{source}: top-level key", key, deepspeed_top_level_keys(), list_valid=False,
                     hint=" (DeepSpeed would silently ignore it)")
    tp = ds.get("tensor_parallel")
    if isinstance(tp, dict) and isinstance(_as_int(tp.get("autotp_size", 0)), int) and _as_int(tp["autotp_size"]) > 1:
        raise ValueError(f"{source}: tensor_parallel.autotp_size={tp['autotp_size']} turns on DeepSpeed's AutoTP, "
                         "which replaces the linear layers by tensor-parallel shards (the ReLoRA layers' merges and "
                         "resets do not reach those) and makes ranks of a group read the same data, while this "
                         "trainer is data-parallel over every rank: remove it (or set 1)")
    if "bf16" in ds and "bfloat16" in ds:
        raise ValueError(f"{source} has both 'bf16' and 'bfloat16' (DeepSpeed then reads only 'bf16'): keep 'bf16'")
    if isinstance(ds.get("checkpoint"), dict) and "load_universal" in ds["checkpoint"]:
        raise ValueError(f"{source}: checkpoint.load_universal is set by the trainer itself, for the resumes that "
                         "need it (another number of ranks, ZeRO stage, precision or optimizer offload); with it "
                         "set here a plain resume fails: remove it")
    _refuse_other_checkpoint_writers(ds, source)
    zero, removed_zero = ds.get("zero_optimization"), getattr(ds_cfg, "_REMOVED_ZERO_CONFIG_KEYS", {})
    if "zero_optimization" in ds and not isinstance(zero, dict | bool):
        raise ValueError(f"{source}: zero_optimization={zero!r} must be a section, e.g. "
                         '"zero_optimization": {"stage": 2} (or DeepSpeed\'s legacy true/false)')
    for key in zero if isinstance(zero, dict) else ():
        if key in removed_zero:
            raise ValueError(f"{source}: {removed_zero[key]}")
    for key in ("offload_optimizer", "offload_param"):  # read with .get() below, and by DeepSpeed
        section = zero.get(key) if isinstance(zero, dict) else None
        if section is not None and not isinstance(section, dict):
            raise ValueError(f"{source}: zero_optimization.{key}={section!r} must be an object, e.g. "
                             f"{{\"device\": \"cpu\"}}, or null (none)")
    every = ds.get("steps_per_print")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        # DeepSpeed takes the step count modulo it at every step: 0 failed there (ZeroDivisionError), "10" too
        raise ValueError(f"{source}: steps_per_print={every!r} must be a positive whole number (DeepSpeed's "
                         "progress lines every N steps); leave it out to have the trainer turn them off")
    tag = ds["checkpoint"].get("tag_validation", "WARN") if isinstance(ds.get("checkpoint"), dict) else "WARN"
    if not (isinstance(tag, str) and tag.upper() in ("WARN", "IGNORE", "FAIL")):  # else a traceback at start
        raise ValueError(f"{source}: checkpoint.tag_validation={tag!r} is not valid; valid values: 'WARN', "
                         "'IGNORE', 'FAIL' (any case)")
    stage = _as_int(zero.get("stage", 0)) if isinstance(zero, dict) else 0
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{source}: zero_optimization.stage={stage!r} is not a ZeRO stage: valid stages are 0, 1, "
                         "2 and 3")
    if stage in (2, 3) and as_bool(zero.get("reduce_scatter", True)) is not False and (
            ds.get("prescale_gradients") or ds.get("gradient_predivide_factor", 1.0) != 1.0):
        raise ValueError(f"{source}: prescale_gradients and gradient_predivide_factor are not supported by "
                         f"DeepSpeed at ZeRO stage {stage} with reduce_scatter (its default): remove them, or "
                         "set zero_optimization.reduce_scatter to false")
    if isinstance(zero, dict) and zero.get("zenflow") is not None:  # {} too: DeepSpeed fills in its defaults
        raise ValueError(f"{source}: zero_optimization.zenflow is not supported: ZenFlow's optimizer (ZenFlowCPUAdam) "
                         "updates only selected columns each step and keeps state of its own, which ReLoRA's merges "
                         "and optimizer resets do not reach; remove zenflow (offload_optimizer alone trains with "
                         "DeepSpeedCPUAdam)")
    offload = zero.get("offload_optimizer") if isinstance(zero, dict) else None
    if isinstance(offload, dict) and as_bool(offload.get("super_offload", False)) is True:
        raise ValueError(f"{source}: zero_optimization.offload_optimizer.super_offload is not supported: SuperOffload "
                         "steps DeepSpeedCPUAdam in a worker process of its own, whose Adam moments ReLoRA's "
                         "optimizer resets cannot reach; remove super_offload (offload_optimizer alone trains with "
                         "DeepSpeedCPUAdam in the rank's process)")
    partial = zero.get("offload_optimizer") if isinstance(zero, dict) and stage == 3 else None
    if isinstance(partial, dict) and partial.get("device", "none") not in ("none", None) and \
            isinstance(partial.get("ratio"), (int, float)) and not isinstance(partial["ratio"], bool) and \
            partial["ratio"] < 1:
        # DeepSpeed 0.19.8 stage3.py: the sub-groups left on the accelerator step on a backup torch AdamW, and
        # _rigid_state_dict / _rigid_load_state_dict save and load self.optimizer's state alone
        warnings.warn(f"{source}: zero_optimization.offload_optimizer.ratio={partial['ratio']} keeps a share of the "
                      "optimizer on the accelerator, where DeepSpeed steps it with a second AdamW whose moments its "
                      "checkpoints do not hold: at every --resume those restart from zero (the resumed run is not "
                      "the uninterrupted one). Leave ratio out (1: all offloaded) for an exact resume",
                      ConfigWarning, stacklevel=2)
    if isinstance(zero, dict) and stage < 3:
        param = zero.get("offload_param")
        if as_bool(zero.get("cpu_offload_param", False)):  # DeepSpeed's legacy offload_param: {"device": "cpu"}
            param = {"device": "cpu (cpu_offload_param)"}
        if isinstance(param, dict) and param.get("device", "none") not in ("none", None):
            raise ValueError(f"{source}: zero_optimization.offload_param (device {param['device']!r}) acts only at "
                             f"ZeRO stage 3, and this config is stage {stage}: DeepSpeed would keep the parameters "
                             "on the accelerator without a word. Use stage 3 (ds_configs/zero3_offload.json) or "
                             "remove offload_param")
        optimizer = zero.get("offload_optimizer")
        if stage == 0 and optimizer_offload(ds):
            raise ValueError(f"{source}: an offloaded optimizer (zero_optimization.offload_optimizer / cpu_offload) "
                             "needs ZeRO stage 1 or higher: at stage 0 DeepSpeed builds its CPU Adam for parameters "
                             "that stay on the accelerator (it fails at the first step on a GPU). Use stage 1 or 2 "
                             "(ds_configs/zero2_offload.json), or remove the offload")
        if isinstance(optimizer, dict) and optimizer.get("device") == "nvme":
            raise ValueError(f"{source}: zero_optimization.offload_optimizer (device 'nvme') swaps to NVMe only at "
                             f"ZeRO stage 3; at stage {stage} DeepSpeed keeps the optimizer in host memory as with "
                             "'cpu', without a word: use device 'cpu'")
        # stage3_* keys, and the same settings by their field names (DeepSpeed reads either spelling)
        only3 = sorted(k for k in zero if k.startswith("stage3_") or k in _stage3_field_names())
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
        if key in _UNSUPPORTED_DATA_TYPES:
            raise ValueError(f"{source}: data_types.{key} is not supported: {_UNSUPPORTED_DATA_TYPES[key]}. Set the "
                             "training precision with the bf16 or fp16 section; data_types takes grad_accum_dtype")
        if key != GRAD_ACCUM_DTYPE:  # the one key of data_types relora_ds supports
            _unknown(f"{source}: data_types: key", key, {GRAD_ACCUM_DTYPE: None, **_UNSUPPORTED_DATA_TYPES})
    if isinstance(ds.get("aio"), dict):  # DeepSpeed's get_aio_config reads the keys of AIO_DEFAULT_DICT only
        from deepspeed.runtime.swap_tensor.aio_config import AIO_DEFAULT_DICT

        for key in ds["aio"]:
            if key not in AIO_DEFAULT_DICT:
                renamed = "; DeepSpeed 0.15 renamed it 'intra_op_parallelism'" if key == "thread_count" else ""
                _unknown(f"{source}: aio: key", key, AIO_DEFAULT_DICT,
                         hint=f" (DeepSpeed would silently ignore it{renamed})")
    _check_optimizer(ds, source)
    try:  # after the sections' keys are checked: these parse them
        both = uses_bf16(ds) and uses_fp16(ds)
    except ValueError as e:  # pydantic's message names the field and the section's class, not the file
        raise ValueError(f"{source}: {e}") from None
    if both:
        raise ValueError(f"{source} enables both bf16 and fp16: enable one (bf16 on GPUs that have it)")


# data_types keys DeepSpeed 0.19.8 reads, which relora_ds refuses, with the reason.
_UNSUPPORTED_DATA_TYPES = {
    "param_dtype": "DeepSpeed requires it to equal the bf16/fp16 section's dtype, which alone sets the precision "
                   "here",
    "buffer_dtype": "it casts the model's floating-point buffers, among them the bf16 scales of an int8 base "
                    "(quantize=int8) and the bf16 merge residuals, which must keep their dtype",
    "keep_in_fp32_modules": "it keeps chosen floating-point buffers in fp32, which an int8 base's bf16 scales and the "
                            "bf16 merge residuals must not be",
}


def _refuse_other_checkpoint_writers(ds: dict, source: str) -> None:
    """A checkpoint is complete for the trainer (relora_ds/checkpoint.py) when engine.save_checkpoint has
    returned on every rank, each rank's files are flushed and rank 0 then writes config.json, moves `latest`
    and deletes older checkpoints. DeepSpeed's other writers break that: the decoupled writer and the
    DataStates engine write in the background after save_checkpoint returns; the mock writer writes nothing,
    the fast one nothing on a rank it gives no writer, and each failed without DeepSpeed's own launcher
    (0.19.8: KeyError 'CROSS_SIZE', a variable that launcher sets); node-local storage has each node's first
    rank write the same model-states file, on the shared output_dir the trainer requires
    (check_shared_output_dir)."""
    ckpt = ds.get("checkpoint") if isinstance(ds.get("checkpoint"), dict) else {}
    why = ("the trainer marks a checkpoint complete (config.json, `latest`) and deletes older ones once DeepSpeed's "
           "save_checkpoint returns with every file written, through torch.save")
    if ckpt.get("writer") is not None:
        raise ValueError(f"{source}: checkpoint.writer selects DeepSpeed's fast, python, mock or decoupled checkpoint "
                         "writers (the decoupled one writes after save_checkpoint returns; mock writes nothing; the "
                         "fast one writes nothing on a rank it gives no writer; 0.19.8 failed with them without its "
                         f"own launcher, KeyError 'CROSS_SIZE'), but {why}: remove it")
    if ckpt.get("use_node_local_storage"):
        raise ValueError(f"{source}: checkpoint.use_node_local_storage has the first rank of each node write the "
                         "same model-states file, and the trainer's output_dir is shared by every node (each rank "
                         "reads every shard on resume): remove it")
    if "datastates_ckpt" in ds and ds["datastates_ckpt"] is not False:
        raise ValueError(f"{source}: datastates_ckpt switches on DeepSpeed's DataStates engine, which writes after "
                         f"save_checkpoint returns (DeepSpeed reads anything but false as on), but {why}: remove it")


@functools.lru_cache(maxsize=None)
def _stage3_field_names() -> frozenset[str]:
    """zero_optimization settings read only at stage 3, by the field names of their stage3_* aliases
    (prefetch_bucket_size, max_live_parameters, ...)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return frozenset(name for name, field in DeepSpeedZeroConfig.model_fields.items()
                     if field.alias and field.alias.startswith("stage3_"))


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
    return frozenset(seen | set(_MESH_KEYS))


_SECTION_EXAMPLES = {"bf16": '{"enabled": true}', "bfloat16": '{"enabled": true}', "fp16": '{"enabled": true}',
                     "optimizer": '{"type": "AdamW", "params": {"torch_adam": true}}',
                     "data_types": '{"grad_accum_dtype": "fp32"}'}


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
        raise ValueError(f"{source}: 'optimizer' must be an object like "
                         "{'type': 'AdamW', 'params': {'torch_adam': True}}")
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
    for key in ("adam_w_mode", "torch_adam", "fp32_optimizer_states"):
        if key in params and not isinstance(params[key], (bool, int)):
            # DeepSpeed reads these with Python truthiness: the string "false" would pick AdamW / torch's Adam.
            raise ValueError(f"{source}: optimizer.params.{key}={params[key]!r} must be true or false (a JSON "
                             "boolean, or 0/1); DeepSpeed reads it by truthiness, so a string such as \"false\" "
                             "counts as true")
    if kind.lower() == "adamw" and "adam_w_mode" in params and not params["adam_w_mode"]:
        raise ValueError(f"{source}: optimizer.type 'AdamW' with params.adam_w_mode false: DeepSpeed ignores "
                         "adam_w_mode for type AdamW (decoupled weight decay either way). For Adam with L2 weight "
                         "decay write type 'Adam' with adam_w_mode false; else remove adam_w_mode")
    ctor, valid = adam_parameters(ds)
    for key in params:
        if key not in valid:
            _unknown(f"{source}: optimizer.params key", key, valid,
                     hint=f" to {ctor.__module__}.{ctor.__name__}, which DeepSpeed builds for this config")
    if ctor.__name__ == "Adam" and ctor.__module__.startswith("torch.optim") and params.get("decoupled_weight_decay"):
        # adam_w_mode false picks torch's Adam for L2 decay, which decoupled_weight_decay turns into AdamW's
        raise ValueError(f"{source}: optimizer.params.decoupled_weight_decay true contradicts adam_w_mode false "
                         "(torch's Adam with decoupled weight decay is AdamW); for decoupled decay remove both (type "
                         "Adam or AdamW decouples by default), for L2 decay remove decoupled_weight_decay")
    if params.get("torch_adam") and optimizer_offload(ds):
        warnings.warn(f"{source}: optimizer.params.torch_adam with an offloaded optimizer: DeepSpeed steps "
                      f"torch.optim.{ctor.__name__} on the host instead of its vectorized DeepSpeedCPUAdam, several "
                      "times slower per step; remove torch_adam (ds_configs/zero2_offload.json has none)",
                      ConfigWarning, stacklevel=3)


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
