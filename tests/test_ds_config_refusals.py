"""DeepSpeed JSON settings that DeepSpeed would drop, ignore, read differently or fail on later: each is an
error naming the setting and the reason (or a warning), before any engine is built; the same settings where
they are valid pass. (Keys and the optimizer DeepSpeed builds: test_ds_config.py.)"""
import json
import re
import warnings

import pytest

from relora_ds.ds_config import complete_ds_config
from relora_ds.ds_schema import check_deepspeed_keys
from relora_ds.train_config import ConfigWarning, TrainConfig

from test_ds_config import BASE


def test_values_deepspeed_would_drop_or_read_differently():
    """"auto" (a Hugging Face Trainer placeholder) is dropped by DeepSpeed for its default; "enabled":
    "false" is False to DeepSpeed; the legacy `"zero_optimization": true` is stage 1; a typo under data_types
    (whose grad_accum_dtype decides the bf16 optimizer) is named."""
    from relora_ds.ds_config import uses_bf16

    cfg = TrainConfig(**BASE)
    for ds, where in (({"bf16": {"enabled": "auto"}}, "bf16.enabled"),
                      ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}},
                       "zero_optimization.reduce_bucket_size")):
        with pytest.raises(ValueError, match=rf'{where} is "auto", a Hugging Face Trainer placeholder'):
            complete_ds_config(ds, cfg, world_size=1)
    assert not uses_bf16({"bf16": {"enabled": "false"}}) and uses_bf16({"bf16": {"enabled": "true"}})
    assert complete_ds_config({"bf16": {"enabled": "false"}}, cfg, world_size=1)  # fp32 at stage 0: accepted
    assert complete_ds_config({"zero_optimization": True}, cfg, world_size=1)["zero_optimization"] == {"stage": 1}
    with pytest.raises(ValueError, match=r"data_types: key 'grad_acum_dtype' is unknown; did you mean 'grad_accum"):
        check_deepspeed_keys({"data_types": {"grad_acum_dtype": "fp32"}})
    with pytest.raises(ValueError, match=r"tensorboard: key 'output' is unknown; did you mean 'output_path'"):
        check_deepspeed_keys({"tensorboard": {"enabled": True, "output": "tb"}})


@pytest.mark.parametrize("ds, key", [
    ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu"),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95]}}}, "optimizer.params.betas"),
    ({"optimizer": {"type": "AdamW", "params": {"eps": 1e-6}}}, "optimizer.params.eps"),
    ({"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.1}}}, "optimizer.params.weight_decay"),
])
def test_a_recipe_value_in_the_json_is_an_error_not_overwritten(ds, key):
    with pytest.raises(ValueError, match=rf"sets \['{key}'\], which the recipe also sets"):
        complete_ds_config(ds, TrainConfig(**BASE), world_size=2)


@pytest.mark.parametrize("section, value, why", [
    ("activation_checkpointing", {"partition_activations": True}, "--activation-checkpointing"),
    ("compile", {"deepcompile": True}, "never calls engine.compile(): use the recipe's compile (--compile)"),
    ("comms_logger", {"enabled": True}, "communication summary"),
    ("tensorboard", {"enabled": True, "output_path": "tb"}, "output_dir/metrics.jsonl and output_dir/tensorboard"),
    ("wandb", {"enabled": True, "project": "p"}, "restarts its sample axis at the warm-start switch"),
    ("csv_monitor", {"enabled": True}, "DeepSpeed's monitor sees only its own lr"),
    ("flops_profiler", {"enabled": True}, "AssertionError: timer is not started"),
    # found by a user trial: accepted, and the batches (and losses) were those of a run without them
    ("data_efficiency", {"enabled": True, "data_sampling": {"enabled": True, "curriculum_learning": {
        "enabled": True, "data_cluster_path": "/tmp/none", "curriculum_metrics": {}}}}, "deepspeed_io"),
    ("torch_autocast", {"enabled": True, "dtype": "bfloat16"},
     "read the training precision from the bf16/fp16 sections"),
])
def test_sections_this_trainer_would_leave_without_effect_are_refused(section, value, why):
    """DeepSpeed accepts them, and here they would do nothing or log a fragment: an error, not silence;
    the same sections switched off pass."""
    with pytest.raises(ValueError, match=rf"the '{section}' section has no effect here \(.*{re.escape(why)}"):
        complete_ds_config({section: value}, TrainConfig(**BASE), world_size=2)
    off = {"activation_checkpointing": {}, "compile": {"deepcompile": False}}.get(section, {**value, "enabled": False})
    complete_ds_config({section: off}, TrainConfig(**BASE), world_size=2)


def test_strings_for_booleans_are_read_as_deepspeed_reads_them():
    """From a user trial. Pydantic sections (the monitors, comms_logger) read "enabled": "false" as false:
    accepted, as DeepSpeed accepts them. Sections DeepSpeed reads by truthiness (data_efficiency,
    torch_autocast, the Adam mode flags) would take the string "false" as true: refused, as is a misspelt
    key in a section that could act."""
    for section in ("tensorboard", "wandb", "csv_monitor", "comms_logger"):
        complete_ds_config({section: {"enabled": "false"}}, TrainConfig(**BASE), world_size=2)
    for section, value in (("data_efficiency", {"enabeld": True}), ("data_efficiency", {"enabled": "false"}),
                           ("torch_autocast", {"enable": True}), ("torch_autocast", {"enabled": "false"})):
        with pytest.raises(ValueError, match=rf"the '{section}' section has no effect here"):
            complete_ds_config({section: value}, TrainConfig(**BASE), world_size=2)
    for key in ("adam_w_mode", "torch_adam", "fp32_optimizer_states"):
        ds = {"optimizer": {"type": "Adam", "params": {"torch_adam": True, key: "false"}}}
        with pytest.raises(ValueError, match=rf"optimizer.params.{key}='false' must be true or false \(a JSON "
                                             r"boolean, or 0/1\); DeepSpeed reads it by truthiness"):
            complete_ds_config(ds, TrainConfig(**BASE, weight_decay=0.1), world_size=2)
    # what DeepSpeed reads as off passes: 0 for the flags, false or 0 for the sections
    complete_ds_config({"optimizer": {"type": "Adam", "params": {"torch_adam": 1, "adam_w_mode": 0}}},
                       TrainConfig(**BASE, weight_decay=0.1), world_size=2)
    for section in ("data_efficiency", "torch_autocast"):
        for off in (False, 0):
            complete_ds_config({section: {"enabled": off}}, TrainConfig(**BASE), world_size=2)


def test_amsgrad_is_refused_for_relora():
    """amsgrad's running max of exp_avg_sq keeps every moment a reset prunes; named before launch."""
    ds = {"optimizer": {"type": "AdamW", "params": {"torch_adam": True, "amsgrad": True}}}
    with pytest.raises(ValueError, match=r"optimizer.params.amsgrad, whose running max of exp_avg_sq"):
        complete_ds_config(json.loads(json.dumps(ds)), TrainConfig(**BASE), world_size=1)
    full = complete_ds_config(json.loads(json.dumps(ds)), TrainConfig(**BASE, mode="full"), world_size=1)
    assert full["optimizer"]["params"]["amsgrad"] is True  # no resets in a full-rank run: allowed


def test_settings_deepspeed_would_ignore_or_choke_on_are_named():
    """From a test-drive: each of these trained without a word (offload_param at stage 2: parameters stayed on
    the accelerator; offload_optimizer to nvme at stage 2: the optimizer stayed in host memory), or failed later with a DeepSpeed traceback (bf16 with fp16; load_universal in the JSON
    broke the next plain resume)."""
    import warnings

    from relora_ds.train_config import ConfigWarning

    bad = [({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "enables both bf16 and fp16"),
           ({"checkpoint": {"load_universal": True}}, "checkpoint.load_universal is set by the trainer itself"),
           ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
            r"offload_param \(device 'cpu'\) acts only at ZeRO stage 3, and this config is stage 2"),
           # stage_1_and_2.py: any offload_optimizer device but none sets cpu_offload; no swapper exists there
           ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}},
            r"offload_optimizer \(device 'nvme'\) swaps to NVMe only at ZeRO stage 3; at stage 2 DeepSpeed keeps"),
           ({"zero_optimization": {"stage": 2}, "gradient_predivide_factor": 2.0},
            "gradient_predivide_factor are not supported by DeepSpeed at ZeRO stage 2 with reduce_scatter"),
           ({"zero_optimization": {"stage": 3}, "prescale_gradients": True}, "at ZeRO stage 3 with reduce_scatter"),
           # DeepSpeed reads "2" as stage 2 (found by a review: the checks compared the string and let it pass)
           ({"zero_optimization": {"stage": "2", "offload_param": {"device": "cpu"}}},
            r"offload_param \(device 'cpu'\) acts only at ZeRO stage 3, and this config is stage 2"),
           # found by a test-drive: each was a TypeError/AttributeError traceback
           ({"zero_optimization": {"stage": "two"}}, r"zero_optimization.stage='two' is not a ZeRO stage: valid"),
           ({"zero_optimization": {"stage": None}}, r"zero_optimization.stage=None is not a ZeRO stage"),
           ({"zero_optimization": 2}, r"zero_optimization=2 must be a section, e.g. \"zero_optimization\": "
                                      r"\{\"stage\": 2\}"),
           # found by a review: sequence_parallel_size broke DeepSpeed's batch arithmetic, data_parallel_size
           # alone did nothing; offload at stage 0 built CPU Adam for accelerator parameters; a bare true or
           # null section was a TypeError/AttributeError traceback; AdamW ignores adam_w_mode false
           ({"sequence_parallel_size": 2}, r"'sequence_parallel_size' sets a DeepSpeed device mesh .* data-parallel"),
           ({"data_parallel_size": 8}, r"'data_parallel_size' sets a DeepSpeed device mesh"),
           # found by a review: AutoTP replaced the linear layers by shards the merges and resets do not reach
           ({"tensor_parallel": {"autotp_size": "2"}}, r"tensor_parallel.autotp_size=2 turns on DeepSpeed's AutoTP"),
           ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}},
            r"an offloaded optimizer .* needs ZeRO stage 1 or higher"),
           ({"zero_optimization": {"stage": 0, "cpu_offload": True}}, r"needs ZeRO stage 1 or higher"),
           ({"bf16": True}, r"'bf16' must be an object, not True \(e.g. \{\"enabled\": true\}\)"),
           ({"fp16": None}, r"'fp16' must be an object, not None"),
           ({"optimizer": None}, r"'optimizer' must be an object, not None \(e.g. \{\"type\": \"AdamW\""),
           ({"data_types": None}, r"'data_types' must be an object"),
           ({"zero_optimization": None}, r"zero_optimization=None must be a section"),
           ({"optimizer": {"type": "AdamW", "params": {"torch_adam": True, "adam_w_mode": False}}},
            r"optimizer.type 'AdamW' with params.adam_w_mode false: DeepSpeed ignores adam_w_mode"),
           # found by a review: torch's Adam with decoupled_weight_decay is AdamW, whatever adam_w_mode false says
           ({"optimizer": {"type": "Adam", "params": {"torch_adam": True, "adam_w_mode": False,
                                                      "decoupled_weight_decay": True}}},
            r"decoupled_weight_decay true contradicts adam_w_mode false \(torch's Adam with decoupled weight decay "
            r"is AdamW\)"),
           # found by a review of the DeepSpeed integration: DeepSpeed maps the legacy flag to offload_param and
           # ignores it below stage 3; ZenFlow builds an optimizer the resets do not reach; DeepSpeed reads these
           # data_types and would cast the int8 base's buffers (they were refused as unknown keys)
           ({"zero_optimization": {"stage": 2, "cpu_offload_param": True}},
            r"offload_param \(device 'cpu \(cpu_offload_param\)'\) acts only at ZeRO stage 3"),
           ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}, "zenflow": {"topk_ratio": 0.1}}},
            r"zero_optimization.zenflow is not supported: ZenFlow's optimizer \(ZenFlowCPUAdam\)"),
           ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}, "zenflow": {}}},
            r"zero_optimization.zenflow is not supported"),  # DeepSpeed fills in its defaults
           # found by a review: SuperOffload's DeepSpeedCPUAdam steps in a worker process, out of the resets' reach
           ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "super_offload": True}}},
            r"offload_optimizer.super_offload is not supported: SuperOffload steps DeepSpeedCPUAdam in a worker "
            r"process"),
           ({"data_types": {"buffer_dtype": "bf16"}}, r"data_types.buffer_dtype is not supported: it casts the "
                                                      r"model's floating-point buffers, among them the bf16 scales"),
           ({"data_types": {"param_dtype": "bf16"}}, r"data_types.param_dtype is not supported"),
           ({"data_types": {"keep_in_fp32_modules": ["norm"]}}, r"data_types.keep_in_fp32_modules is not supported")]
    for ds, match in bad:
        with pytest.raises(ValueError, match=match):
            complete_ds_config(ds, TrainConfig(**BASE), world_size=2)
    with pytest.raises(ValueError, match=r"optimizer.type 'Adam' builds AdamW in DeepSpeed .* unless "
                                         r"optimizer.params.adam_w_mode is false, and weight_decay=0.1"):
        complete_ds_config({"optimizer": {"type": "Adam", "params": {"torch_adam": True}}},
                           TrainConfig(**BASE, weight_decay=0.1), world_size=2)
    with pytest.warns(ConfigWarning, match=r"stage3_param_persistence_threshold act only at ZeRO stage 3; this "
                                           r"config is stage 2"):
        complete_ds_config({"zero_optimization": {"stage": 2, "stage3_param_persistence_threshold": 0}},
                           TrainConfig(**BASE), world_size=2)
    with pytest.warns(ConfigWarning, match=r"max_live_parameters, prefetch_bucket_size act only at ZeRO stage 3"):
        complete_ds_config({"zero_optimization": {"stage": 1, "prefetch_bucket_size": 10, "max_live_parameters": 5}},
                           TrainConfig(**BASE), world_size=2)  # the same settings without their stage3_ prefix
    # ZeRO-3's partial optimizer offload: DeepSpeed's checkpoints lack its backup AdamW's moments (stage3.py)
    with pytest.warns(ConfigWarning, match=r"offload_optimizer.ratio=0.5 keeps a share of the optimizer on the "
                                           r"accelerator, .* at every --resume those restart from zero"):
        complete_ds_config({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}},
                           TrainConfig(**BASE), world_size=2)
    for ratio in ({}, {"ratio": 1}, {"ratio": 1.0}):  # all offloaded: no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConfigWarning)
            complete_ds_config({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", **ratio}}},
                               TrainConfig(**BASE), world_size=2)
    with pytest.warns(ConfigWarning, match=r"torch_adam with an offloaded optimizer: DeepSpeed steps "
                                           r"torch.optim.AdamW on the host instead of its vectorized DeepSpeedCPUAdam"):
        complete_ds_config({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                            "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}},
                           TrainConfig(**BASE), world_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        complete_ds_config({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                                  "offload_param": {"device": "cpu"}},
                            "checkpoint": {"tag_validation": "Warn"}}, TrainConfig(**BASE), world_size=2)
        for params in ({"torch_adam": True, "adam_w_mode": False}, {"torch_adam": True, "adam_w_mode": True}):
            complete_ds_config({"optimizer": {"type": "Adam", "params": params}},
                               TrainConfig(**BASE, weight_decay=0.1), world_size=2)
        complete_ds_config({"optimizer": {"type": "Adam", "params": {"torch_adam": True}}},
                           TrainConfig(**BASE), world_size=2)  # no weight decay: Adam and AdamW are one


def test_nvme_offload_is_checked_before_any_engine(tmp_path):
    """Each of these failed inside engine creation on every rank: DeepSpeed's async_io op (libaio) missing
    (oracle: DeepSpeed's own builder), an nvme_path that is not a writable directory (the optimizer's or the
    parameters'), the optimizer's pipelined swapping (DeepSpeed's stopped at the first optimizer step: an
    assertion in its buffer allocation), an fp32 model's parameters on NVMe on DeepSpeed's CPU accelerator (0.19.8 gives the parameter swapper bf16 there: the
    first matmul failed with 'expected m1 and m2 to have the same dtype'), and int8 base weights on NVMe
    (the swapper's buffers have the model's dtype)."""
    from types import SimpleNamespace

    from deepspeed.accelerator import get_accelerator

    from relora_ds import ds_machine
    from relora_ds.ds_machine import check_offload_on_device

    acc = lambda device="cuda", aio=True: SimpleNamespace(  # noqa: E731
        device_name=lambda: device,
        create_op_builder=lambda name: SimpleNamespace(is_compatible=lambda verbose=False: aio))
    nvme = lambda path=str(tmp_path), bf16=True: {  # noqa: E731
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                              "offload_param": {"device": "nvme", **({"nvme_path": path} if path else {})}},
        "bf16": {"enabled": bf16}}
    check_offload_on_device(nvme(), acc())
    check_offload_on_device(nvme(), acc("cpu"))  # bf16 on the CPU accelerator
    check_offload_on_device(nvme(bf16=False), acc())  # fp32 on a GPU
    check_offload_on_device({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, acc(aio=False))
    # The optimizer on NVMe: its own nvme_path checked; the parameters' dtype and int8 limits are not its.
    optimizer_nvme = lambda path=str(tmp_path): {"zero_optimization": {"stage": 3, "offload_optimizer": {  # noqa: E731
        "device": "nvme", **({"nvme_path": path} if path else {})}}}
    check_offload_on_device(optimizer_nvme(), acc("cpu"), "int8")
    with pytest.raises(ValueError, match=r"offload_optimizer offloads to nvme, which needs DeepSpeed's async_io op"):
        check_offload_on_device(optimizer_nvme(), acc(aio=False))
    with pytest.raises(ValueError, match=r"offload_optimizer.nvme_path is not set: set it to a directory on a local"):
        check_offload_on_device(optimizer_nvme(None), acc())
    pipelined = optimizer_nvme()
    pipelined["zero_optimization"]["offload_optimizer"].update(pipeline_read=True, pipeline_write=True)
    with pytest.raises(ValueError, match=r"offload_optimizer.pipeline_read and pipeline_write: DeepSpeed 0.19.8's "
                                         r"pipelined optimizer swapping stopped at the first optimizer step"):
        check_offload_on_device(pipelined, acc())
    off = optimizer_nvme()  # DeepSpeed reads "false" as off (a review: refused as on)
    off["zero_optimization"]["offload_optimizer"].update(pipeline_read="false", pipeline_write=0)
    check_offload_on_device(off, acc())
    with pytest.raises(ValueError, match=r"offload_param offloads to nvme, which needs DeepSpeed's async_io op"):
        check_offload_on_device(nvme(), acc(aio=False))
    (tmp_path / "a_file").write_text("")
    for path, what in ((None, "is not set"), (str(tmp_path / "missing"), "is not a writable directory"),
                       (str(tmp_path / "a_file"), "is not a writable directory")):
        with pytest.raises(ValueError, match=rf"offload_param.nvme_path .*{what}.*local NVMe"):
            check_offload_on_device(nvme(path), acc())
    # A read-only directory (chmod does not stop root, who runs CI: os.access answers instead).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ds_machine.os, "access", lambda path, mode: not mode & ds_machine.os.W_OK)
        with pytest.raises(ValueError, match=r"offload_param.nvme_path .*is not a writable directory"):
            check_offload_on_device(nvme(str(tmp_path)), acc())
    with pytest.raises(ValueError, match=r"CPU accelerator, where DeepSpeed 0.19.8 swaps parameters only in bf16, "
                                         r"and this config trains in fp32: enable bf16, or offload the parameters"):
        check_offload_on_device(nvme(bf16=False), acc("cpu"))
    with pytest.raises(ValueError, match=r"quantize='int8' with zero_optimization.offload_param on nvme: DeepSpeed's "
                                         r"parameter swapper holds every partition in the model's dtype"):
        check_offload_on_device(nvme(), acc(), "int8")
    check_offload_on_device({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, acc(), "int8")
    # What no machine runs is named before what this one lacks (an int8 trial installed nothing to learn it).
    with pytest.raises(ValueError, match=r"quantize='int8' with zero_optimization.offload_param on nvme"):
        check_offload_on_device(nvme(None), acc(aio=False), "int8")
    with pytest.raises(ValueError, match=r"CPU accelerator, where DeepSpeed 0.19.8 swaps parameters only in bf16"):
        check_offload_on_device(nvme(None, bf16=False), acc("cpu", aio=False))
    pipelined["zero_optimization"]["offload_optimizer"]["nvme_path"] = None
    with pytest.raises(ValueError, match=r"offload_optimizer.pipeline_read and pipeline_write: DeepSpeed 0.19.8's"):
        check_offload_on_device(pipelined, acc(aio=False))
    real = get_accelerator().create_op_builder("AsyncIOBuilder")  # scripts/test.sh installs libaio-dev
    assert real is not None and real.is_compatible(verbose=False), "install libaio-dev"
    check_offload_on_device(nvme(), get_accelerator())


@pytest.mark.parametrize("key", ["use_all_reduce_for_fetch_params", "stage3_use_all_reduce_for_fetch_params",
                                 "zero_quantized_weights", "zero_quantized_nontrainable_weights"])
def test_zero3_settings_that_break_an_int8_base_are_refused_with_it(key):
    """Found by a review of the int8 path: the all-reduce fetch flattens a layer's int8 base and bf16 factors
    into one buffer of one dtype (DeepSpeed's "expected there to be only one unique element" at the first
    forward); ZeRO's weight quantization casts the gathered int8 base back through fp16. Without quantize
    they pass."""
    ds = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, key: True}}
    with pytest.raises(ValueError, match=rf"zero_optimization.{key} with quantize='int8': "):
        complete_ds_config(ds, TrainConfig(**BASE, quantize="int8"), world_size=2)
    complete_ds_config(ds, TrainConfig(**BASE), world_size=2)
    stage2 = {**ds, "zero_optimization": {**ds["zero_optimization"], "stage": 2}}  # DeepSpeed reads none there
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)  # the stage-3 names below stage 3
        complete_ds_config(stage2, TrainConfig(**BASE, quantize="int8"), world_size=2)


def test_selective_checkpointing_turns_deepspeeds_linear_off_under_zero3():
    """DeepSpeed's memory_efficient_linear (ZeRO-3, on by default) replaces F.linear with a version that adds a
    bias in place into the matmul output the selective policy keeps (tests/test_checkpointing.py shows the
    wrong gradients): the trainer turns it off for that policy, and refuses a config that sets it."""
    cfg = TrainConfig(**{**BASE, "activation_checkpointing": True, "activation_checkpointing_policy": "selective"})
    out = complete_ds_config({"zero_optimization": {"stage": 3}}, cfg, world_size=1)
    assert out["zero_optimization"]["memory_efficient_linear"] is False
    for value in (True, "true"):
        with pytest.raises(ValueError, match=r"sets zero_optimization.memory_efficient_linear, which replaces "
                                             r"torch.nn.functional.linear .* --activation-checkpointing-policy full"):
            complete_ds_config({"zero_optimization": {"stage": 3, "memory_efficient_linear": value}}, cfg, 1)
    for off in (False, "false", 0):  # as DeepSpeed's config model reads a bool
        explicit_off = {"zero_optimization": {"stage": 3, "memory_efficient_linear": off}}
        assert complete_ds_config(explicit_off, cfg, 1)["zero_optimization"]["memory_efficient_linear"] is False
    # other stages, and the full policy, are left as they were
    assert "memory_efficient_linear" not in complete_ds_config({"zero_optimization": {"stage": 2}}, cfg,
                                                               1)["zero_optimization"]
    full = TrainConfig(**{**BASE, "activation_checkpointing": True})
    assert "memory_efficient_linear" not in complete_ds_config({"zero_optimization": {"stage": 3}}, full,
                                                               1)["zero_optimization"]


def test_checkpoint_writers_that_break_the_trainers_save_are_refused():
    """The trainer takes a checkpoint for complete (config.json, `latest`, older ones deleted) once
    save_checkpoint has returned on every rank. DeepSpeed's decoupled writer and DataStates engine write after
    that; its writer section failed here at the start (KeyError 'CROSS_SIZE'); node-local storage writes one
    model-states file from each node into the shared output_dir. Each was accepted without a word. The oracle for
    "on": DeepSpeed's own parsing of the same sections; what it reads as off is accepted."""
    from deepspeed.datastates.config import DeepSpeedDataStatesConfig
    from deepspeed.runtime.model_checkpointing.config import get_checkpoint_config

    for writer in ({"type": "fast"}, {"type": "mock"}, {"decoupled": True}, {}):
        # DeepSpeed builds another writer for each
        assert get_checkpoint_config({"checkpoint": {"writer": writer}})["writer"] is not None
        with pytest.raises(ValueError, match=r"checkpoint.writer selects DeepSpeed's fast, python, mock or decoupled "
                                             r"checkpoint writers .* remove it"):
            complete_ds_config({"checkpoint": {"writer": writer}}, TrainConfig(**BASE), world_size=2)
    with pytest.raises(ValueError, match=r"checkpoint.use_node_local_storage has the first rank of each node write"):
        complete_ds_config({"checkpoint": {"use_node_local_storage": True}}, TrainConfig(**BASE), world_size=2)
    for value in ({}, None, True, {"x": 1}):
        assert DeepSpeedDataStatesConfig({"datastates_ckpt": value}).enabled
        with pytest.raises(ValueError, match=r"datastates_ckpt switches on DeepSpeed's DataStates engine"):
            complete_ds_config({"datastates_ckpt": value}, TrainConfig(**BASE), world_size=2)
    assert not DeepSpeedDataStatesConfig({"datastates_ckpt": False}).enabled
    assert get_checkpoint_config({"checkpoint": {"writer": None}})["writer"] is None
    complete_ds_config({"checkpoint": {"writer": None, "use_node_local_storage": False}, "datastates_ckpt": False},
                       TrainConfig(**BASE), world_size=2)


def test_edges_of_the_checks_that_read_the_recipe_and_the_zero_stage():
    """Mutations a trial ran that no test saw.

    - merge_residual's fp32 warning is for mode=relora: mode=lora never merges, and TrainConfig already names
      the setting as ignored there; complete_ds_config adds nothing.
    - memory_efficient_linear is refused or turned off only where the selective policy runs: with
      activation_checkpointing off (the policy ignored, TrainConfig says so) a ZeRO-3 JSON keeps it.
    - the int8 refusals of ZeRO-3 settings read the stage as DeepSpeed does ("3" is stage 3).
    - a stage that is none of 0-3 is named with the valid ones."""
    with pytest.warns(ConfigWarning, match="merge_residual=True is ignored: mode='lora' never merges"):
        lora = TrainConfig(**{**BASE, "mode": "lora", "cycle_length": None, "restart_warmup_steps": 100,
                               "merge_residual": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        complete_ds_config({"zero_optimization": {"stage": 1}}, lora, world_size=1)
    relora = TrainConfig(**{**BASE, "merge_residual": True})
    with pytest.warns(ConfigWarning, match="merge_residual=True is ignored: the weights are fp32"):
        complete_ds_config({"zero_optimization": {"stage": 1}}, relora, world_size=1)

    with pytest.warns(ConfigWarning, match="activation_checkpointing_policy='selective' is ignored"):
        off = TrainConfig(**{**BASE, "activation_checkpointing_policy": "selective"})
    ds = complete_ds_config({"zero_optimization": {"stage": 3, "memory_efficient_linear": True}}, off, world_size=1)
    assert ds["zero_optimization"]["memory_efficient_linear"] is True

    with pytest.raises(ValueError, match=r"zero_optimization.zero_quantized_weights with quantize='int8'"):
        complete_ds_config({"bf16": {"enabled": True}, "zero_optimization": {"stage": "3", "zero_quantized_weights": True}},
                           TrainConfig(**BASE, quantize="int8"), world_size=1)

    with pytest.raises(ValueError, match=r"zero_optimization.stage=4 is not a ZeRO stage: valid stages are 0, 1, 2 "
                                         r"and 3"):
        complete_ds_config({"zero_optimization": {"stage": 4}}, TrainConfig(**BASE), world_size=1)


def test_string_flags_and_bare_sections_are_read_as_deepspeed_reads_them():
    """Found by a review: DeepSpeed's pydantic models read "false"/"off"/0 as False, but these flags were read by
    truthiness: cpu_offload "false" counted as an offloaded optimizer (the default optimizer section then left
    out torch_adam: DeepSpeed built FusedAdam, not torch AdamW; stage 0 was refused), and reduce_scatter,
    cpu_offload_param, the int8-breaking ZeRO-3 flags and compile.deepcompile "false" were refused as on.
    Oracle: DeepSpeed's own config models. And a bare true for a section DeepSpeed parses as an object (compile,
    timers, pipeline, ...) or a non-string communication dtype passed every check and failed inside
    deepspeed.initialize with a TypeError/AttributeError."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from relora_ds.ds_config import adam_parameters, engine_layout
    from relora_ds.ds_schema import optimizer_offload

    cfg, int8 = TrainConfig(**BASE), TrainConfig(**BASE, quantize="int8")
    for flag, offloaded in (("false", False), ("off", False), (0, False), ("true", True), ("yes", True)):
        zero = {"stage": 2, "cpu_offload": flag}
        assert (DeepSpeedZeroConfig(**zero).offload_optimizer is not None) is offloaded  # the oracle
        assert optimizer_offload({"zero_optimization": zero}) == ("cpu" if offloaded else None)
        ds = complete_ds_config({"zero_optimization": zero}, cfg, world_size=2)
        assert ds["optimizer"]["params"].get("torch_adam") is (None if offloaded else True), flag
        assert (adam_parameters(ds)[0] is DeepSpeedCPUAdam) is offloaded
        assert engine_layout(ds)["offload_optimizer"] == ("cpu" if offloaded else "none")
    complete_ds_config({"zero_optimization": {"stage": 0, "cpu_offload": "false"}}, cfg, world_size=2)
    with pytest.raises(ValueError, match="needs ZeRO stage 1 or higher"):
        complete_ds_config({"zero_optimization": {"stage": 0, "cpu_offload": "true"}}, cfg, world_size=2)
    accepted = [({"zero_optimization": {"stage": 2, "reduce_scatter": "false"}, "gradient_predivide_factor": 2.0}, cfg),
                ({"zero_optimization": {"stage": 2, "cpu_offload_param": "false"}}, cfg),
                ({"zero_optimization": {"stage": 3, "zero_quantized_weights": "false",
                                        "zero_quantized_nontrainable_weights": "off"}}, int8),
                ({"compile": {"deepcompile": "false"}}, cfg)]
    for ds, c in accepted:
        assert DeepSpeedZeroConfig(**ds.get("zero_optimization", {})).reduce_scatter is not None  # parses
        complete_ds_config(ds, c, world_size=2)
    assert not DeepSpeedZeroConfig(stage=2, reduce_scatter="false").reduce_scatter
    for ds, c, match in (
            ({"zero_optimization": {"stage": 2, "reduce_scatter": "true"}, "gradient_predivide_factor": 2.0}, cfg,
             "not supported by DeepSpeed at ZeRO stage 2 with reduce_scatter"),
            ({"zero_optimization": {"stage": 2, "cpu_offload_param": "on"}}, cfg, "acts only at ZeRO stage 3"),
            ({"zero_optimization": {"stage": 3, "zero_quantized_weights": "true"}}, int8,
             "zero_quantized_weights with quantize='int8'"),
            ({"compile": {"deepcompile": "true"}}, cfg, r"never calls engine.compile\(\)")):
        with pytest.raises(ValueError, match=match):
            complete_ds_config(ds, c, world_size=2)
    for key in ("compile", "activation_checkpointing"):  # DeepSpeed sections and recipe settings both
        with pytest.raises(ValueError, match=rf"'{key}' must be an object, not True .* the recipe setting '{key}' "
                                             rf"goes in the recipe \(or --{key.replace('_', '-')}\)"):
            complete_ds_config({key: True}, cfg, world_size=2)
    for key in ("timers", "pipeline", "tensor_parallel", "autotuning", "weight_quantization", "hybrid_engine",
                "expert_parallel"):
        with pytest.raises(ValueError, match=rf"'{key}' must be an object, not True"):
            complete_ds_config({key: True}, cfg, world_size=2)
    for key in ("communication_data_type", "seq_parallel_communication_data_type"):
        with pytest.raises(ValueError, match=rf"'{key}' must name a dtype \(\"fp32\", \"fp16\" or \"bf16\"\), not 1"):
            complete_ds_config({key: 1}, cfg, world_size=2)
        complete_ds_config({key: "fp32"}, cfg, world_size=2)


def test_round_robin_gradients_is_refused_by_the_trainer_and_the_python_api():
    """Found by a review (2 ranks, ZeRO-2 fp32): with round_robin_gradients the losses left the plain run's at
    the first step after the warm-start switch (6.2253 vs 6.2508) and after each reset, while mode=full stayed
    bit-identical. DeepSpeed 0.19.8 links each parameter to another one's slice of the fp32 masters under it
    (safe_get_full_fp32_param(p) != p for 4 of 6 parameters of 3 Linear layers on 2 ranks), which the switch,
    merge, prune and export read and write. Refused in a config (DeepSpeed's bool reading: "false" is off) and
    by the engine check the merge and prune start with."""
    from types import SimpleNamespace

    from relora_ds.zero_reset import check_engine_supported

    cfg = TrainConfig(**BASE)
    for stage in (1, 2):
        for on in (True, "true"):
            with pytest.raises(ValueError, match=r"zero_optimization.round_robin_gradients is not supported: "
                                                 r"DeepSpeed 0.19.8 then links each parameter to another "
                                                 r"parameter's slice"):
                complete_ds_config({"zero_optimization": {"stage": stage, "round_robin_gradients": on}}, cfg, 2)
        complete_ds_config({"zero_optimization": {"stage": stage, "round_robin_gradients": "false"}}, cfg, 2)
    engine = SimpleNamespace(optimizer=SimpleNamespace(round_robin_gradients=True), bfloat16_enabled=lambda: False,
                             fp16_enabled=lambda: False, zero_optimization_stage=lambda: 2)
    with pytest.raises(ValueError, match=r"merge_and_reinit: the engine's zero_optimization.round_robin_gradients "
                                         r"is not supported"):
        check_engine_supported(engine, "merge_and_reinit")
