"""DeepSpeed JSON checks: misspelt keys are errors naming the intended key, the recipe's values fill the
config, the optimizer class is the one DeepSpeed builds, and the bf16 + fp32-accumulation optimizer counts
every micro-batch once. (Settings refused or warned about: test_ds_config_refusals.py.)

Run as a script (``python tests/test_ds_config.py OUT``) it is the one-rank engine worker of
test_bf16_optimizer_accumulates_like_one_big_micro_batch.
"""
import json
import subprocess
import sys

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
     r"aio: key 'thread_count' is unknown \(DeepSpeed would silently ignore it; DeepSpeed 0.15 renamed it "
     r"'intra_op_parallelism'\); valid keys: .*'intra_op_parallelism'"),
    ({"aio": {"block_sise": 2}}, r"aio: key 'block_sise' is unknown \(DeepSpeed would silently ignore it\); did you "
                                 r"mean 'block_size'\?"),
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
    explicit = complete_ds_config({**BF16_FP32_ACCUM, "bf16": {"enabled": True, "immediate_grad_update": False}},
                                  TrainConfig(**full), world_size=2)
    assert explicit["bf16"]["immediate_grad_update"] is False  # the config's own choice is kept (correct too)
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
    gives, with immediate_grad_update (relora_ds's default) and without it (DeepSpeed's). Adam with eps=1
    makes the first update ~ -lr * gradient, so the update compares the gradients. Without it, while the
    model's output was a dataclass, DeepSpeed's backward prologue (run from hooks on the output's tensors)
    never zeroed the bf16 gradient between micro-steps: micro-batches weighted 4, 3, 2, 1 (rel. 0.5+)."""
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
    assert rel("gas4_deepspeed_default", "gas1") < 0.02, rel("gas4_deepspeed_default", "gas1")


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
            ds["bf16"]["immediate_grad_update"] = False  # DeepSpeed's default
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
    from relora_ds.distributed import run_and_exit  # a normal exit can abort in gloo's teardown (exit -6)
    run_and_exit(lambda: _bf16_accumulation_worker(sys.argv[1]))


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


def test_bf16_on_a_cpu_without_native_bf16_is_named_with_the_fp32_config(monkeypatch):
    """Without AVX512/AMX PyTorch takes a scalar fallback for every bf16 matmul (the demo ran 12x slower than
    fp32): bf16 on DeepSpeed's CPU accelerator there is a warning naming ds_configs/zero2_fp32.json; on a CPU
    with native bf16, or a GPU, nothing. Oracle for the shipped fp32 config: zero2.json with bf16 off."""
    import warnings
    from types import SimpleNamespace

    from launch_utils import ROOT

    from relora_ds import ds_machine

    fp32 = load_ds_config(ROOT / "ds_configs/zero2_fp32.json")
    bf16 = load_ds_config(ROOT / "ds_configs/zero2.json")
    assert bf16["bf16"] == {"enabled": True} and fp32 == {**bf16, "bf16": {"enabled": False}}
    device = lambda name: SimpleNamespace(device_name=lambda: name, is_fp16_supported=lambda: False)  # noqa: E731
    monkeypatch.setattr(ds_machine, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match=r"no native bf16 matmul .* ds_configs/zero2_fp32\.json"):
        ds_machine.check_precision_on_device(bf16, device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds_machine.check_precision_on_device(fp32, device("cpu"))
        ds_machine.check_precision_on_device(bf16, device("cuda"))
        monkeypatch.setattr(ds_machine, "cpu_has_native_bf16", lambda: True)
        ds_machine.check_precision_on_device(bf16, device("cpu"))


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


def test_parameters_on_nvme_are_released_after_use_and_compiled_layers_need_their_swap_buffers(tmp_path):
    """ZeRO-3 with the parameters on nvme (tests/test_nvme_offload.py runs both failures): complete_ds_config
    sets stage3_max_reuse_distance 0 where it is unset (DeepSpeed's 1e9 kept a ReLoRA step's frozen weights
    swapped in until the buffers ran out), keeps a value given, with a warning; and --compile's leaf layers
    need a swap buffer per swapped weight of a layer. Hand count for the 130m preset in bf16 (hidden 768, MLP
    2048): on 1 rank all 7 projections are >= 1 MiB; on 2 ranks q/k/v/o hold 768*768/2*2 bytes < 1 MiB and
    only the 3 MLP weights swap; with aio.block_size 4 MiB none does. A parameter both persistent and swapped
    is refused in any mode."""
    import relora_ds
    from launch_utils import ROOT
    from relora_ds.ds_machine import check_nvme_swap_buffers

    shipped = json.loads((ROOT / "ds_configs" / "zero3_nvme.json").read_text())
    cfg = TrainConfig(model="130m", rank=8, cycle_length=10, restart_warmup_steps=2, total_steps=100,
                      micro_batch_size=2, global_batch_size=4, compile=True)
    ds = complete_ds_config(shipped, cfg, world_size=2)
    assert ds["zero_optimization"]["stage3_max_reuse_distance"] == 0
    assert "stage3_max_reuse_distance" not in shipped["zero_optimization"]  # the file itself is untouched
    given = {**shipped, "zero_optimization": {**shipped["zero_optimization"], "stage3_max_reuse_distance": 10**8}}
    with pytest.warns(ConfigWarning, match=r"stage3_max_reuse_distance=100000000 with the parameters on nvme"):
        assert complete_ds_config(given, cfg, world_size=2)["zero_optimization"]["stage3_max_reuse_distance"] == 10**8
    cpu = {**shipped, "zero_optimization": {**shipped["zero_optimization"], "offload_param": {"device": "cpu"}}}
    assert "stage3_max_reuse_distance" not in complete_ds_config(cpu, cfg, world_size=2)["zero_optimization"]

    model_config = relora_ds.LlamaConfig.preset("130m", vocab_size=512)

    def buffers(n, **aio):
        zero = {**ds["zero_optimization"], "offload_param": {**ds["zero_optimization"]["offload_param"],
                                                             "buffer_count": n}}
        return {**ds, "zero_optimization": zero, "aio": {**ds["aio"], **aio}}
    for world, swapped in ((1, 7), (2, 3)):
        check_nvme_swap_buffers(cfg, buffers(swapped), model_config, world)
        with pytest.raises(ValueError, match=rf"nvme {swapped} of them swap in together on each of {world} rank\(s\), "
                                             rf"more than zero_optimization.offload_param.buffer_count={swapped - 1}: "
                                             rf"set buffer_count to at least {swapped}"):
            check_nvme_swap_buffers(cfg, buffers(swapped - 1), model_config, world)
    check_nvme_swap_buffers(cfg, buffers(0, block_size=4 * 2**20), model_config, 1)
    check_nvme_swap_buffers(TrainConfig(**{**cfg.to_dict(), "compile": False}), buffers(0), model_config, 1)  # eager
    # A persistence threshold of 1e6: on 1 rank q/k/v/o (589,824 elements, 1.18 MB) are persistent and swapped,
    # 48 in 130m's 12 layers; on 2 ranks their halves stay under 1 MiB and nothing is both.
    sticky = {**ds, "zero_optimization": {**ds["zero_optimization"], "stage3_param_persistence_threshold": 10**6}}
    with pytest.raises(ValueError, match=r"stage3_param_persistence_threshold=1e\+06 keeps 48 parameters gathered "
                                         r"for good that DeepSpeed also swaps to nvme \(>= 1,048,576 bytes a rank on 1 "
                                         r"rank\(s\); e.g. model.layers.0.self_attn.q_proj.weight\).*at most 524,287"):
        check_nvme_swap_buffers(TrainConfig(**{**cfg.to_dict(), "compile": False}), sticky, model_config, 1)
    check_nvme_swap_buffers(cfg, {**sticky, "zero_optimization": {**sticky["zero_optimization"], "offload_param": {
        **sticky["zero_optimization"]["offload_param"], "buffer_count": 3}}}, model_config, 2)


def test_the_nvme_persistence_refusal_counts_what_deepspeed_keeps_and_swaps(monkeypatch):
    """The parameters refused as both persistent and swapped are those DeepSpeed's own mark_persistent_parameters
    keeps (up to stage3_param_persistence_threshold elements each, while their sum stays within
    stage3_model_persistence_threshold, in the module's order: a capped model threshold keeps fewer) and its
    swapper swaps (at least max(1 MiB, aio.block_size) bytes a rank). Both bounds inclusive, as DeepSpeed's:
    130m's q/k/v/o hold 589,824 elements, 1,179,648 bf16 bytes on 1 rank."""
    import re
    from types import SimpleNamespace

    import relora_ds
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import AsyncPartitionedParameterSwapper
    from deepspeed.runtime.swap_tensor.utils import MIN_AIO_BYTES
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from launch_utils import ROOT
    from relora_ds.ds_machine import check_nvme_swap_buffers
    from relora_ds.startup import meta_model

    cfg = TrainConfig(model="130m", rank=8, cycle_length=10, restart_warmup_steps=2, total_steps=100,
                      micro_batch_size=2, global_batch_size=4)
    shipped = json.loads((ROOT / "ds_configs" / "zero3_nvme.json").read_text())
    model_config = relora_ds.LlamaConfig.preset("130m", vocab_size=512)
    oracle_model = meta_model(cfg, model_config)
    monkeypatch.setattr(parameter_offload, "print_rank_0", lambda *a, **k: None)  # (asks a process group's rank)
    for p in oracle_model.parameters():
        p.ds_numel = p.numel()

    def refused(threshold, model_threshold, block_size):
        ds = complete_ds_config(shipped, cfg, world_size=1)
        ds["zero_optimization"].update(stage3_param_persistence_threshold=threshold,
                                       stage3_model_persistence_threshold=model_threshold)
        ds["aio"] = {**ds["aio"], "block_size": block_size}
        try:
            check_nvme_swap_buffers(cfg, ds, model_config, 1)
        except ValueError as e:
            return int(re.search(r"keeps (\d+) parameters", str(e))[1])
        return 0

    def deepspeed_keeps(threshold, model_threshold, block_size):
        kept = DeepSpeedZeRoOffload.mark_persistent_parameters(SimpleNamespace(module=oracle_model), threshold,
                                                               model_threshold)
        swapper = SimpleNamespace(min_aio_bytes=max(MIN_AIO_BYTES, block_size), swap_element_size=2)  # as its init
        return sum(AsyncPartitionedParameterSwapper.swappable_tensor(swapper, numel=p.numel()) for p in kept)

    q = 768 * 768
    # A model threshold of exactly the persistent parameters up to the first swapped one: inclusive, that one is
    # kept (a mutation trial's survivor compared strictly and kept none that swaps)
    kept = DeepSpeedZeRoOffload.mark_persistent_parameters(SimpleNamespace(module=oracle_model), 10**6, 2**62)
    first = next(i for i, p in enumerate(kept) if 2 * p.numel() >= 2**20)
    exact = sum(p.numel() for p in kept[:first + 1])
    cases = [(q, 2**62, 2 * q), (q - 1, 2**62, 2 * q), (q, 2**62, 2 * q + 1), (10**6, 2**62, 2**20),
             (10**6, 10 * q, 2**20), (10**6, 0, 2**20), (10**6, exact, 2**20)]
    got = [refused(*case) for case in cases]
    assert got == [deepspeed_keeps(*case) for case in cases]
    assert got[0] == 48 and got[1:3] == [0, 0] and 0 < got[4] < got[3] == 48 and got[5] == 0, got
    assert got[6] == 1, got


def test_a_config_without_a_zero_stage_is_deepspeeds_stage_0_and_deepspeed_prints_nothing_of_its_own():
    """No zero_optimization section, or one without `stage`, is what DeepSpeed reads as stage 0 (its own config
    model is the oracle): the trainer then logs its own gradient norm and plans a resume for stage 0.
    steps_per_print is set past the run's end: DeepSpeed's own loss/lr lines (every 10 steps by default) would
    interleave with the trainer's."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from relora_ds.ds_config import zero_stage

    assert zero_stage({}) == zero_stage({"zero_optimization": {}}) == DeepSpeedZeroConfig().stage == 0
    cfg = TrainConfig(**BASE)
    assert complete_ds_config({"zero_optimization": {"stage": 2}}, cfg, world_size=2)["steps_per_print"] > \
        cfg.total_steps


def test_a_steps_per_print_in_the_json_is_kept_and_the_layout_of_a_json_without_an_optimizer_is_its_completions():
    """Mutations a trial ran that no test saw. complete_ds_config only defaults steps_per_print (DeepSpeed's own
    log, which our logging replaces): a JSON that sets it keeps its value. engine_layout of a JSON without an
    optimizer section names the optimizer completion gives it (torch's AdamW; DeepSpeedCPUAdam offloaded), as
    plan_resume compares layouts of such JSONs: not FusedAdam, which DeepSpeed would build for an empty section."""
    from relora_ds.ds_config import engine_layout

    cfg = TrainConfig(**BASE)
    assert complete_ds_config({"steps_per_print": 5}, cfg, world_size=1)["steps_per_print"] == 5
    assert complete_ds_config({}, cfg, world_size=1)["steps_per_print"] == 10**9
    for zero, name in (({"stage": 1}, "AdamW"), ({"stage": 2, "offload_optimizer": {"device": "cpu"}},
                                                  "DeepSpeedCPUAdam")):
        ds = {"zero_optimization": zero}
        assert engine_layout(ds)["optimizer"] == name, zero
        assert engine_layout(ds) == engine_layout(complete_ds_config(ds, cfg, world_size=1)), zero
