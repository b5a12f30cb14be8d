"""DeepSpeed JSON checks: misspelt keys are errors naming the intended key, and the bf16 + fp32-accumulation
optimizer counts every micro-batch once.

Run as a script (``python tests/test_ds_config.py OUT``) it is the one-rank engine worker of
test_bf16_optimizer_accumulates_like_one_big_micro_batch.
"""
import json
import re
import subprocess
import sys
import warnings

import pytest

from relora_ds.ds_config import complete_ds_config, load_ds_config
from relora_ds.ds_schema import adam_parameters, check_deepspeed_keys, deepspeed_top_level_keys
from relora_ds.train_config import ConfigWarning, TrainConfig

BASE = dict(cycle_length=10, restart_warmup_steps=5, total_steps=100, micro_batch_size=2, global_batch_size=8)
# bf16 weights, fp32 gradient accumulation, ZeRO-1: DeepSpeed's BF16_Optimizer
BF16_FP32_ACCUM = {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
                   "zero_optimization": {"stage": 1}, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}


@pytest.mark.parametrize("ds, match", [
    # DeepSpeed ignores these silently ("bf_16": fp32 training) or reports something unrelated
    ({"bf_16": {"enabled": True}}, r"top-level key 'bf_16' is unknown .*did you mean 'bf16'\?"),
    ({"zero_optimisation": {"stage": 2}}, r"'zero_optimisation' is unknown .*did you mean 'zero_optimization'\?"),
    ({"zero_optimization": {"stag": 2}}, r"zero_optimization: key 'stag' is unknown; did you mean 'stage'\?"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"devise": "cpu"}}},
     r"zero_optimization.offload_optimizer: key 'devise' is unknown; did you mean 'device'\?.* 'nvme_path'"),
    ({"bf16": {"enabled": True, "immediate_grad_updates": True}}, r"did you mean 'immediate_grad_update'\?"),
    ({"aio": {"thread_count": 2}},  # the name before DeepSpeed 0.15; 0.19's get_aio_config ignores it
     r"aio: key 'thread_count' is unknown \(DeepSpeed would silently ignore it\); valid keys: .*'intra_op_parallelism'"),
    ({"fp16": {"enable": True}}, r"fp16: key 'enable' is unknown; did you mean 'enabled'\?"),
    ({"no_such_setting": 1}, r"top-level key 'no_such_setting' is unknown .*; valid keys: \[.*'zero_optimization'"),
    ({"seed": 1}, r"'seed' is not a DeepSpeed key but a recipe setting: set it in the recipe \(or --seed\)"),
    ({"elasticity": {}}, r"Elastic training has been removed"),  # DeepSpeed's own message, before any engine
    ({"zero_optimization": {"stage": 3, "mics_shard_size": 8}}, r"MiCS ZeRO-3 sharding has been removed"),
    ({"bf16": {"enabled": True}, "bfloat16": {"enabled": True}}, r"both 'bf16' and 'bfloat16'"),
    # A TypeError from the optimizer's constructor at deepspeed.initialize otherwise
    ({"optimizer": {"type": "AdamW", "params": {"torch_adam": True, "weight_decy": 0.1}}},
     r"optimizer.params key 'weight_decy' is unknown to torch.optim.adamw.AdamW.*did you mean 'weight_decay'\?"
     r" valid keys: \['adam_w_mode', 'amsgrad', 'betas', .*'torch_adam', 'weight_decay'\]"),
    ({"optimizer": {"type": "AdamW", "params": {"fused": True}}},  # torch's flag; FusedAdam has no such argument
     r"'fused' is unknown to deepspeed.ops.adam.fused_adam.FusedAdam"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
      "optimizer": {"type": "AdamW", "params": {"adamw_mode": False}}},  # DeepSpeed passes adamw_mode itself
     r"'adamw_mode' is unknown to deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam.*did you mean 'adam_w_mode'\?"),
    ({"optimizer": {"type": "SGD", "params": {}}}, r"optimizer.type='SGD' is not supported; valid types: \['AdamW'"),
    ({"optimizer": {"params": {"torch_adam": True}}}, r"optimizer.type=None is not supported"),
    ({"optimizer": {"type": "AdamW", "param": {}}}, r"optimizer key 'param' is unknown; did you mean 'params'\?"),
])
def test_misspelt_and_unknown_keys_are_named(ds, match):
    with pytest.raises(ValueError, match=match):
        complete_ds_config(ds, TrainConfig(**BASE), world_size=2)


def test_keys_deepspeed_reads_pass():
    """The known set is what DeepSpeed 0.19 reads: nothing DeepSpeed accepts is refused."""
    common = ["bf16", "fp16", "zero_optimization", "optimizer", "gradient_clipping", "steps_per_print",
              "wall_clock_breakdown", "communication_data_type", "data_types", "activation_checkpointing",
              "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comms_logger", "zero_allow_untested_optimizer",
              "checkpoint", "aio", "bfloat16", "prescale_gradients", "memory_breakdown", "dump_state",
              "sequence_parallel_size", "tensor_parallel", "compile"]
    assert set(common) <= deepspeed_top_level_keys()
    assert "seed" not in deepspeed_top_level_keys() and "bf_16" not in deepspeed_top_level_keys()
    from launch_utils import ROOT

    shipped = sorted((ROOT / "ds_configs").glob("*.json"))
    assert len(shipped) >= 4
    for path in shipped:
        check_deepspeed_keys(load_ds_config(path), str(path))
    check_deepspeed_keys({
        "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 5e7, "prefetch_bucket_size": 5e7,
                              "offload_param": {"device": "cpu", "pin_memory": True},
                              "offload_optimizer": {"device": "cpu", "buffer_count": 4}},
        "bf16": {"enabled": True, "immediate_grad_update": True}, "fp16": {"enabled": False, "loss_scale": 0},
        "activation_checkpointing": {"partition_activations": True}, "tensorboard": {"enabled": False},
        "optimizer": {"type": "Adam", "params": {"bias_correction": True, "amsgrad": False, "adam_w_mode": True,
                                                 "fp32_optimizer_states": True}}})
    check_deepspeed_keys({"optimizer": {"type": "adamw", "params": {
        "torch_adam": True, "foreach": False, "fused": False, "amsgrad": False, "maximize": False}}})


def test_adam_parameters_follow_the_class_deepspeed_builds():
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    torch_adam = {"type": "Adam", "params": {"torch_adam": True}}
    assert adam_parameters({"optimizer": torch_adam})[0] is torch.optim.AdamW  # adam_w_mode defaults to true
    torch_adam["params"]["adam_w_mode"] = False
    ctor, valid = adam_parameters({"optimizer": torch_adam})
    assert ctor is torch.optim.Adam and "decoupled_weight_decay" in valid
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}},
               "optimizer": {"type": "AdamW", "params": {}}}
    ctor, valid = adam_parameters(offload)
    assert ctor is DeepSpeedCPUAdam and "adamw_mode" not in valid and "bias_correction" in valid
    assert adam_parameters({"optimizer": {"type": "AdamW"}})[0] is FusedAdam


def test_bf16_optimizer_gets_immediate_grad_update_under_accumulation():
    """The rewrite, and only where DeepSpeed's BF16_Optimizer runs with more than one micro-step."""
    full = dict(BASE, mode="full", cycle_length=None)
    ds = complete_ds_config(BF16_FP32_ACCUM, TrainConfig(**full), world_size=2)  # 2 micro-steps
    assert ds["gradient_accumulation_steps"] == 2 and ds["bf16"]["immediate_grad_update"] is True
    assert "immediate_grad_update" not in BF16_FP32_ACCUM["bf16"]  # the caller's dict is not edited
    alias = {**BF16_FP32_ACCUM, "bfloat16": BF16_FP32_ACCUM["bf16"]}
    del alias["bf16"]
    assert complete_ds_config(alias, TrainConfig(**full), world_size=2)["bfloat16"]["immediate_grad_update"]
    untouched = [
        (BF16_FP32_ACCUM, 4),                                               # one micro-step per optimizer step
        ({**BF16_FP32_ACCUM, "zero_optimization": {"stage": 2}}, 2),         # the ZeRO optimizer accumulates
        ({**BF16_FP32_ACCUM, "data_types": {}}, 2),                          # bf16 accumulation: ZeRO optimizer
        ({**BF16_FP32_ACCUM, "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}, 2),
    ]
    for src, world in untouched:
        assert "immediate_grad_update" not in complete_ds_config(src, TrainConfig(**full), world)["bf16"], src
    with pytest.raises(ValueError, match=r"immediate_grad_update=False .*gradient_accumulation_steps=2: "
                                         r"DeepSpeed's BF16_Optimizer then adds micro-batch i of k"):
        complete_ds_config({**BF16_FP32_ACCUM, "bf16": {"enabled": True, "immediate_grad_update": False}},
                           TrainConfig(**full), world_size=2)
    with pytest.raises(ValueError, match=r"grad_accum_dtype='fp32' with bf16 weights at ZeRO stage 0, which "
                                         r"DeepSpeed does not support"):
        complete_ds_config({**BF16_FP32_ACCUM, "zero_optimization": {"stage": 0}}, TrainConfig(**full), 2)
    # fp16 weights alike: accumulating in fp16 is their own dtype (accepted), fp32 is the unsupported mix.
    fp16 = {"fp16": {"enabled": True}, "zero_optimization": {"stage": 0}}
    complete_ds_config({**fp16, "data_types": {"grad_accum_dtype": "fp16"}}, TrainConfig(**full), 2)
    with pytest.raises(ValueError, match=r"grad_accum_dtype='fp32' with fp16 weights at ZeRO stage 0"):
        complete_ds_config({**fp16, "data_types": {"grad_accum_dtype": "fp32"}}, TrainConfig(**full), 2)
    with pytest.raises(ValueError, match=r"grad_accum_dtype='fp33' is not a dtype DeepSpeed knows; valid "
                                         r"values: \[.*'fp32'"):
        complete_ds_config({**BF16_FP32_ACCUM, "data_types": {"grad_accum_dtype": "fp33"}}, TrainConfig(**full), 2)


def test_bf16_optimizer_accumulates_like_one_big_micro_batch(tmp_path):
    """One rank, bf16 + fp32 accumulation at ZeRO-1: 4 micro-batches of 1 give the update 1 micro-batch of 4
    gives. Adam with eps=1 makes the first update ~ -lr * gradient, so the update compares the gradients.
    DeepSpeed's default (immediate_grad_update=False) weights the micro-batches 4, 3, 2, 1."""
    import torch
    from launch_utils import ROOT, free_port, launch_env

    out = tmp_path / "updates.pt"
    env = {**launch_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    u = torch.load(out)

    def rel(a, b):
        return ((u[a] - u[b]).norm() / u[b].norm()).item()

    assert u["gas1"].norm() > 0
    assert rel("gas4", "gas1") < 0.02, rel("gas4", "gas1")
    # Fails once DeepSpeed counts each micro-batch once by itself: then the rewrite is no longer needed.
    assert rel("gas4_deepspeed_default", "gas1") > 0.5, rel("gas4_deepspeed_default", "gas1")


def _bf16_accumulation_worker(out: str) -> None:
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    from relora_ds import LlamaConfig, LlamaForCausalLM
    from relora_ds.distributed import init_distributed

    init_distributed()
    model_cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64)
    xs = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(1))
    updates = {}
    for name, micro in (("gas4", 1), ("gas1", 4), ("gas4_deepspeed_default", 1)):
        cfg = TrainConfig(mode="full", total_steps=1, micro_batch_size=micro, global_batch_size=4, lr=1.0,
                          adam_eps=1.0, grad_clip=0.0)
        ds = complete_ds_config(BF16_FP32_ACCUM, cfg, world_size=1)
        if name == "gas4_deepspeed_default":
            ds["bf16"]["immediate_grad_update"] = False  # bypass the rewrite: DeepSpeed's default
        torch.manual_seed(0)
        model = LlamaForCausalLM(model_cfg)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        assert type(engine.optimizer).__name__ == "BF16_Optimizer", type(engine.optimizer)
        params = list(engine.module.parameters())
        before = [safe_get_full_fp32_param(p).clone() for p in params]
        for x in xs.split(micro):
            engine.backward(engine(x, labels=x).loss)
            engine.step()
        assert engine.global_steps == 1
        updates[name] = torch.cat([(safe_get_full_fp32_param(p) - b).reshape(-1) for p, b in zip(params, before)])
    torch.save(updates, out)
    print(json.dumps({k: v.norm().item() for k, v in updates.items()}))


if __name__ == "__main__":
    _bf16_accumulation_worker(sys.argv[1])


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


def test_completed_config_carries_every_recipe_value():
    """Each recipe value lands in its DeepSpeed key (hand-written expectations), the batch split included:
    gradient_accumulation_steps = global / (micro x world)."""
    cfg = TrainConfig(**{**BASE, "micro_batch_size": 1, "global_batch_size": 12}, lr=3e-4, adam_beta1=0.8,
                      adam_beta2=0.95, adam_eps=1e-6, weight_decay=0.05, grad_clip=0.5)
    for world, accumulation in ((1, 12), (2, 6), (3, 4), (12, 1)):
        ds = complete_ds_config({"zero_optimization": {"stage": 1}}, cfg, world_size=world)
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
                ds["train_batch_size"]) == (1, accumulation, 12)
        assert ds["optimizer"] == {"type": "AdamW", "params": {"torch_adam": True, "lr": 3e-4, "betas": [0.8, 0.95],
                                                              "eps": 1e-6, "weight_decay": 0.05}}
        assert ds["gradient_clipping"] == 0.5


def test_without_an_optimizer_section_an_offloaded_optimizer_is_deepspeeds_cpu_adam():
    """No optimizer section: torch's AdamW, except for an offloaded optimizer, which gets DeepSpeedCPUAdam as
    ds_configs/zero*_offload.json choose (found by a review: torch's AdamW ran on the host without a word)."""
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    cfg = TrainConfig(**BASE)
    for zero, ctor in (({"stage": 2}, torch.optim.AdamW),
                       ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, DeepSpeedCPUAdam),
                       ({"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}, DeepSpeedCPUAdam)):
        ds = complete_ds_config({"zero_optimization": zero}, cfg, world_size=2)
        assert adam_parameters(ds)[0] is ctor, zero


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
    ("compile", {"deepcompile": True}, "never calls engine.compile"),
    ("comms_logger", {"enabled": True}, "communication summary"),
    ("tensorboard", {"enabled": True, "output_path": "tb"}, "output_dir/metrics.jsonl and output_dir/tensorboard"),
    ("wandb", {"enabled": True, "project": "p"}, "restarts its sample axis at the warm-start switch"),
    ("csv_monitor", {"enabled": True}, "DeepSpeed's monitor sees only its own lr"),
    ("flops_profiler", {"enabled": True}, "AssertionError: timer is not started"),
])
def test_sections_this_trainer_would_leave_without_effect_are_refused(section, value, why):
    """DeepSpeed accepts them, and here they would do nothing or log a fragment: an error, not silence;
    the same sections switched off pass."""
    with pytest.raises(ValueError, match=rf"the '{section}' section has no effect here \(.*{re.escape(why)}"):
        complete_ds_config({section: value}, TrainConfig(**BASE), world_size=2)
    off = {"activation_checkpointing": {}, "compile": {"deepcompile": False}}.get(section, {**value, "enabled": False})
    complete_ds_config({section: off}, TrainConfig(**BASE), world_size=2)


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
           # found by a review of the DeepSpeed integration: DeepSpeed maps the legacy flag to offload_param and
           # ignores it below stage 3; ZenFlow builds an optimizer the resets do not reach; DeepSpeed reads these
           # data_types and would cast the int8 base's buffers (they were refused as unknown keys)
           ({"zero_optimization": {"stage": 2, "cpu_offload_param": True}},
            r"offload_param \(device 'cpu \(cpu_offload_param\)'\) acts only at ZeRO stage 3"),
           ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}, "zenflow": {"topk_ratio": 0.1}}},
            r"zero_optimization.zenflow is not supported: ZenFlow's optimizer \(ZenFlowCPUAdam\)"),
           ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}, "zenflow": {}}},
            r"zero_optimization.zenflow is not supported"),  # DeepSpeed fills in its defaults
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

    from relora_ds.startup import check_offload_on_device

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
    with pytest.raises(ValueError, match=r"offload_param offloads to nvme, which needs DeepSpeed's async_io op"):
        check_offload_on_device(nvme(), acc(aio=False))
    (tmp_path / "a_file").write_text("")
    for path, what in ((None, "is not set"), (str(tmp_path / "missing"), "is not a writable directory"),
                       (str(tmp_path / "a_file"), "is not a writable directory")):
        with pytest.raises(ValueError, match=rf"offload_param.nvme_path .*{what}.*local NVMe"):
            check_offload_on_device(nvme(path), acc())
    with pytest.raises(ValueError, match=r"CPU accelerator, where DeepSpeed 0.19.8 swaps parameters only in bf16, "
                                         r"and this config trains in fp32: enable bf16, or offload the parameters"):
        check_offload_on_device(nvme(bf16=False), acc("cpu"))
    with pytest.raises(ValueError, match=r"quantize='int8' with zero_optimization.offload_param on nvme: DeepSpeed's "
                                         r"parameter swapper holds every partition in the model's dtype"):
        check_offload_on_device(nvme(), acc(), "int8")
    check_offload_on_device({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, acc(), "int8")
    real = get_accelerator().create_op_builder("AsyncIOBuilder")  # scripts/test.sh installs libaio-dev
    assert real is not None and real.is_compatible(verbose=False), "install libaio-dev"
    check_offload_on_device(nvme(), get_accelerator())


def test_bf16_on_a_cpu_without_native_bf16_is_named_with_the_fp32_config(monkeypatch):
    """Without AVX512/AMX PyTorch takes a scalar fallback for every bf16 matmul (the demo ran 12x slower than
    fp32): bf16 on DeepSpeed's CPU accelerator there is a warning naming ds_configs/zero2_fp32.json; on a CPU
    with native bf16, or a GPU, nothing. Oracle for the shipped fp32 config: zero2.json with bf16 off."""
    import warnings
    from types import SimpleNamespace

    from launch_utils import ROOT

    from relora_ds import startup

    fp32 = load_ds_config(ROOT / "ds_configs/zero2_fp32.json")
    bf16 = load_ds_config(ROOT / "ds_configs/zero2.json")
    assert bf16["bf16"] == {"enabled": True} and fp32 == {**bf16, "bf16": {"enabled": False}}
    device = lambda name: SimpleNamespace(device_name=lambda: name, is_fp16_supported=lambda: False)  # noqa: E731
    monkeypatch.setattr(startup, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match=r"no native bf16 matmul .* ds_configs/zero2_fp32\.json"):
        startup.check_precision_on_device(bf16, device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        startup.check_precision_on_device(fp32, device("cpu"))
        startup.check_precision_on_device(bf16, device("cuda"))
        monkeypatch.setattr(startup, "cpu_has_native_bf16", lambda: True)
        startup.check_precision_on_device(bf16, device("cpu"))


def test_legacy_cpu_offload_flag_gets_deepspeeds_cpu_adam():
    """DeepSpeed 0.19 still reads zero_optimization.cpu_offload (as offload_optimizer cpu): the default
    optimizer must then be DeepSpeedCPUAdam, as for offload_optimizer. Oracle: DeepSpeed's own config model."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from relora_ds.ds_config import adam_parameters, complete_ds_config
    from relora_ds.train_config import TrainConfig
    zero = {"stage": 2, "cpu_offload": True}
    assert str(getattr(DeepSpeedZeroConfig(**zero).offload_optimizer.device, "value",
                       DeepSpeedZeroConfig(**zero).offload_optimizer.device)) == "cpu"
    cfg = TrainConfig(cycle_length=10, restart_warmup_steps=5, total_steps=100, micro_batch_size=2, global_batch_size=8)
    ds = complete_ds_config({"zero_optimization": zero}, cfg, world_size=2)
    assert adam_parameters(ds)[0] is DeepSpeedCPUAdam


def test_fp16_layout_is_not_fp32():
    """Hand value: an fp16 config's layout says fp16 (a resume between fp16 and fp32 changes the layout)."""
    from relora_ds.ds_config import engine_layout
    assert engine_layout({"fp16": {"enabled": True}, "zero_optimization": {"stage": 1}})["precision"] == "fp16"
    assert engine_layout({"fp16": {"enabled": True}, "zero_optimization": {"stage": 1}}) != \
        engine_layout({"zero_optimization": {"stage": 1}})


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
