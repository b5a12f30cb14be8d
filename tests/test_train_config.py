"""Bad run configurations fail before any training step, with messages naming what is wrong. (What a valid
configuration derives: batch arithmetic, token budgets, defaults, accepted edges: test_train_config_derived.py.)"""
import warnings

import pytest

from relora_ds.ds_config import complete_ds_config, load_ds_config
from relora_ds.train_args import build_parser, config_from_args
from relora_ds.train_config import TrainConfig

BASE = dict(cycle_length=10, restart_warmup_steps=2, total_steps=100, micro_batch_size=2, global_batch_size=8)


def test_ds_config_missing_and_invalid_json(tmp_path):
    with pytest.raises(ValueError, match=r"--deepspeed .*nope.json: no such file"):
        load_ds_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ValueError, match=r"bad.json: invalid JSON: .*line 1"):
        load_ds_config(bad)


@pytest.mark.parametrize("ds, match", [
    ({"train_batch_size": 16}, r"sets \['train_batch_size'\]"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, r"optimizer.params.lr"),
    ({"gradient_clipping": 1.0}, "gradient_clipping"),
    ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' section"),
])
def test_values_in_two_places_are_errors(ds, match):
    with pytest.raises(ValueError, match=match):
        complete_ds_config(ds, TrainConfig(**BASE), world_size=2)


@pytest.mark.parametrize("kw, match", [
    (dict(mode="relora", cycle_length=None), "mode=relora needs cycle_length"),
    (dict(mode="relora", cycle_length=0), "cycle_length=0 must be positive"),
    (dict(merge_every=3), "merge_every=3 must be a positive divisor of cycle_length=10"),
    (dict(token_budget=1000), "exactly one of total_steps and token_budget"),
    (dict(prune_ratio=1.2), r"prune_ratio=1.2 must be in \[0, 1\]"),
    (dict(warm_start_steps=5, warm_start_from="x"), "not both"),
    (dict(hf_model="a", warm_start_from="b"), "give hf_model or warm_start_from, not both .*hf_model='a', "
                                              "warm_start_from='b'"),
    (dict(resume_from="200"), "resume_from='200' is not a checkpoint tag: give one of the form step_N"),
    (dict(resume_from="step_200", overwrite=True), "give resume or overwrite, not both"),
    # choices hold for recipes and direct construction too, not only for CLI flags (argparse)
    (dict(prune_method="l1"), "prune_method='l1' is not valid; valid values: 'magnitude', 'random', 'reset'"),
    (dict(mode="qlora"), "mode='qlora' is not valid; valid values: 'relora', 'lora', 'full'"),
    (dict(kernels="fast"), "kernels='fast' is not valid; valid values: 'auto', 'triton', 'torch', 'reference'"),
    (dict(activation_checkpointing=True, activation_checkpointing_policy="op"),
     "activation_checkpointing_policy='op' is not valid; valid values: 'full', 'selective'"),
    # numbers that used to pass validation and fail later (a torch error at the first step, a TypeError)
    (dict(lr=-1.0), "lr=-1.0 must be positive"),
    (dict(alpha=float("nan")), "alpha=nan must be a finite number"),  # nan passes every comparison
    (dict(lr=float("inf")), "lr=inf must be a finite number"),
    (dict(grad_clip=float("nan")), "grad_clip=nan must be a finite number"),
    (dict(total_steps=0), "total_steps=0 must be positive"),
    (dict(activation_checkpointing=True, activation_checkpointing_layers=0),
     "activation_checkpointing_layers=0 must be positive"),
    (dict(warmup_steps=-5), "warmup_steps=-5 must be >= 0"),
    (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
    (dict(adam_beta2=1.5), r"adam_beta2=1.5 must be in \[0, 1\)"),
    (dict(min_lr_ratio=2.0), r"min_lr_ratio=2.0 must be in \[0, 1\]"),
    # found by a review: refused only after the output dir's lock and the data preparation, and a timeout that
    # overflowed datetime.timedelta (OverflowError traceback at start-up)
    (dict(model="130M"), r"model='130M' is not a preset; valid presets: debug, tiny, 60m, 130m"),
    (dict(collective_timeout_min=10**13), r"collective_timeout_min=10000000000000 is over a year \(527040 minutes"),
])
def test_invalid_train_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**BASE, **kw})


def test_every_problem_of_a_configuration_is_named_at_once():
    """A recipe with several mistakes fails once, naming each (not one per attempt); a check that reads a wrong
    value is skipped, not reported as a second consequence of it; warnings wait until the settings are valid."""
    with warnings.catch_warnings(record=True) as warned, pytest.raises(ValueError) as e:
        warnings.simplefilter("always")
        TrainConfig(**{**BASE, "lr": -1.0, "quantize": "int4", "merge_every": 0, "prune_ratio": 2.0,
                       "cycle_length": 10, "restart_warmup_steps": 50, "mode": "relora", "resume_from": "x"})
    lines = str(e.value).splitlines()
    assert lines[0] == "5 problems with the settings:"
    assert sorted(lines[1:]) == sorted([
        "  - quantize='int4' is not valid; valid values: 'int8' (or none, the default)",
        "  - lr=-1.0 must be positive",
        "  - merge_every=0 must be positive",  # and not also "must be a positive divisor of cycle_length=10"
        "  - prune_ratio=2.0 must be in [0, 1]",
        "  - resume_from='x' is not a checkpoint tag: give one of the form step_N (the folders in "
        "output_dir/checkpoints)",
    ])
    assert [str(w.message) for w in warned] == []  # not restart_warmup_steps >= cycle_length's warning
    # Values of the wrong type are named together too (before the checks that compare them).
    with pytest.raises(ValueError, match=r"^2 problems with the settings:\n  - rank='x' must be a number\n"
                                         r"  - total_steps=1.5 must be a whole number$"):
        TrainConfig(**{**BASE, "rank": "x", "total_steps": 1.5})
    # The same settings without the errors warn as before.
    with pytest.warns(UserWarning, match="restart_warmup_steps=50 is not shorter than a cycle"):
        TrainConfig(**{**BASE, "restart_warmup_steps": 50})


@pytest.mark.parametrize("low", ["bf16", "fp16"])
def test_low_precision_without_zero_is_refused_for_relora(low):
    """DeepSpeed wraps a bf16/fp16 ZeRO-0 optimizer in its FP16 optimizer, out of the reset's reach: refused
    for relora/lora with the way out named; full-rank training and ZeRO-1 are fine."""
    ds = {low: {"enabled": True}, "zero_optimization": {"stage": 0}}
    for mode in ("relora", "lora"):
        with pytest.raises(ValueError, match=rf"enables {low} with ZeRO stage 0, which mode='{mode}' .*zero1.json"):
            complete_ds_config(ds, TrainConfig(**BASE, mode=mode), world_size=1)
    complete_ds_config(ds, TrainConfig(**BASE, mode="full"), world_size=1)
    complete_ds_config({**ds, "zero_optimization": {"stage": 1}}, TrainConfig(**BASE), world_size=1)
    complete_ds_config({"zero_optimization": {"stage": 0}}, TrainConfig(**BASE), world_size=1)  # fp32


def test_kernels_setting_sets_the_env_and_refuses_a_conflict(monkeypatch):
    from relora_ds.startup import apply_kernels_setting
    monkeypatch.setenv("RELORA_KERNELS", "auto")  # records the outer value, restored after the test
    monkeypatch.delenv("RELORA_KERNELS")
    apply_kernels_setting("torch")
    import os
    assert os.environ["RELORA_KERNELS"] == "torch"
    apply_kernels_setting("torch")  # the same value in both places is fine
    with pytest.raises(ValueError, match="kernels='reference' .* but RELORA_KERNELS='torch'"):
        apply_kernels_setting("reference")
    monkeypatch.setenv("RELORA_KERNELS", "fast")
    with pytest.raises(ValueError, match="RELORA_KERNELS='fast' is not valid"):
        apply_kernels_setting(None)


@pytest.mark.parametrize("name", ["RELORA_DETERMINISTIC", "RELORA_MERGED_WEIGHT", "RELORA_KERNELS_POISON"])
def test_every_kernel_switch_is_checked_at_start_up(monkeypatch, name):
    """From a review: RELORA_DETERMINISTIC was read only by the Triton path (a typo on CPU, or on a GPU under
    `auto`, went unnoticed) and RELORA_MERGED_WEIGHT only where the merged variant may run (with LoRA dropout:
    at the first evaluation). Both fail at start-up now, with the valid values; valid ones pass."""
    from relora_ds.startup import apply_kernels_setting
    monkeypatch.delenv("RELORA_KERNELS", raising=False)
    monkeypatch.setenv(name, "bogus")
    with pytest.raises(ValueError, match=f"{name}='bogus' is not valid; use one of 1, true, yes, on or 0, false"):
        apply_kernels_setting(None)
    with pytest.raises(ValueError, match=f"{name}='bogus' is not valid"):
        apply_kernels_setting("reference")
    monkeypatch.setenv(name, "off")
    apply_kernels_setting(None)


def test_warm_start_lr_without_a_warm_start_is_named_not_fatal():
    """tiny.yaml sets warm_start_lr; `--mode full --warm-start-steps 0` (the full-rank baseline of
    BENCHMARKS.md) must still run, and say the setting is ignored."""
    from launch_utils import ROOT

    args = ["--config", str(ROOT / "launch/configs/tiny.yaml"), "--mode", "full", "--warm-start-steps", "0"]
    with pytest.warns(UserWarning, match=r"warm_start_lr=0.001 is ignored: this run has no full-rank warm start"):
        cfg = config_from_args(build_parser().parse_args(args))
    assert cfg.mode == "full" and cfg.warm_start_lr == 0.001
    with pytest.raises(ValueError, match="warm_start_lr=-1.0 must be positive"):
        TrainConfig(**BASE, warm_start_steps=5, warm_start_lr=-1)


def test_a_resumed_runs_schedule_is_checked_at_parse_time_unless_a_token_budget_counts_its_steps():
    """config_from_args checks the schedule before any process group, also for --resume (its total_steps are
    this run's): a warm start as long as the run is refused there. A resumed token_budget run's step count
    needs its checkpoint's tokens (the trainer checks it then), so parsing does not refuse it."""
    from launch_utils import ROOT

    tiny = ["--config", str(ROOT / "launch/configs/tiny.yaml"), "--warm-start-steps", "50"]
    for resume in ([], ["--resume"]):
        with pytest.raises(ValueError, match=r"warm_start_steps=50 leaves no low-rank steps of total_steps=50"):
            config_from_args(build_parser().parse_args([*tiny, "--total-steps", "50", *resume]))
    budget = [*tiny, "--total-steps", "none", "--token-budget", "16384"]  # 8 steps of 16 x 128 tokens
    with pytest.raises(ValueError, match=r"warm_start_steps=50 leaves no low-rank steps"):
        config_from_args(build_parser().parse_args(budget))
    cfg = config_from_args(build_parser().parse_args([*budget, "--resume"]))
    assert cfg.resume and cfg.token_budget == 16384


def test_a_warm_start_without_its_own_lr_is_named():
    """The full-rank warm start at ReLoRA's (2x) lr measured worse (BENCHMARKS.md): say so, go on."""
    with pytest.warns(UserWarning, match=r"the full-rank warm start runs at ReLoRA's lr=0.002.*set warm_start_lr"):
        TrainConfig(**{**BASE, "lr": 0.002}, warm_start_steps=5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig(**{**BASE, "lr": 0.002}, warm_start_steps=5, warm_start_lr=0.001)  # given: no warning


def test_settings_a_mode_does_not_use_are_named():
    with pytest.warns(UserWarning) as record:  # each setting the recipe gives, by its own name
        # merge_every=3 divides no cycle: an error for relora, ignored (named) for lora (a review found it refused)
        TrainConfig(**{**BASE, "mode": "lora", "merge_every": 3, "prune_ratio": 0.9})
    assert sorted(str(r.message) for r in record) == [
        "cycle_length=10 is ignored: mode='lora' has no merges or resets",
        "merge_every=3 is ignored: mode='lora' has no merges or resets",
        "prune_ratio=0.9 is ignored: mode='lora' has no optimizer resets",
        "restart_warmup_steps=2 is ignored: mode='lora' has no resets (mode='lora' re-warms only at the switch "
        "after an in-run warm start, with lowrank_schedule='continue')"]
    # The schedule cuts the ramp to the cycle (startup.build_schedule): 9 of 10 steps up at most (a user trial
    # found the warning dividing by the 100 steps given: "at most 9%")
    with pytest.warns(UserWarning, match=r"restart_warmup_steps=100 is not shorter than a cycle \(cycle_length=10\): "
                                         r"the ramp is cut to the cycle's 10 steps.* never reaches the cosine \(at "
                                         r"most 90% of it\)"):
        TrainConfig(**{**BASE, "restart_warmup_steps": 100})
    # A reset every step: every low-rank step at lr 0 (found by a test-drive: it trained at 0 with a warning).
    with pytest.raises(ValueError, match=r"cycle_length=1 resets at every step.*no low-rank step would train"):
        TrainConfig(**{**BASE, "cycle_length": 1, "restart_warmup_steps": 1})
    # Without a restart warmup every step trains (a user trial: it was refused for a reason that did not hold)
    with pytest.warns(UserWarning, match=r"cycle_length=1 resets at every step: the LoRA factors' Adam moments are "
                                         r"pruned after every update"):
        TrainConfig(**{**BASE, "cycle_length": 1, "restart_warmup_steps": 0})
    with pytest.warns(UserWarning, match=r"prune_joint=True is ignored: prune_method='random' draws no magnitude"):
        TrainConfig(**{**BASE, "prune_joint": True, "prune_method": "random"})
    with pytest.raises(ValueError, match="give resume or overwrite, not both"):
        TrainConfig(**BASE, resume=True, overwrite=True)
    for kw, match in (
            (dict(lowrank_schedule="restart"), r"lowrank_schedule='restart' is ignored: .*\(warm_start_steps=0"),
            (dict(warm_start_data="restart"), r"warm_start_data='restart' is ignored: .*warm_start_from export"),
            (dict(mode="full", dropout=0.1), r"dropout=0.1 is ignored: mode='full' has no LoRA layers"),
            (dict(mode="full", prune_joint=True), r"prune_joint=True is ignored: mode='full'"),
            (dict(mode="full", merge_residual=True), r"merge_residual=True is ignored: mode='full'"),
            (dict(mode="lora", cycle_length=None, merge_residual=True), r"merge_residual=True is ignored: mode='lora' "
                                                                        "never merges"),
            (dict(mode="lora", cycle_length=None, prune_joint=True), r"prune_joint=True is ignored: mode='lora'"),
            (dict(prune_method="reset", prune_ratio=0.5), r"prune_ratio=0.5 is ignored: prune_method='reset'"),
            (dict(eval_every=0, final_eval_windows=100), r"final_eval_windows=100 is ignored: eval_every=0 runs no "
                                                         "evaluation"),
            (dict(export=False, export_dtype="bfloat16"), r"export_dtype='bfloat16' is ignored: export=False"),
            (dict(eval_every=0, eval_windows=64), r"eval_windows=64 is ignored: eval_every=0 runs no evaluation"),
            (dict(mode="full", kernels="torch"), r"kernels='torch' is ignored: mode='full' has no LoRA layers"),
            (dict(activation_checkpointing_layers=2), r"activation_checkpointing_layers=2 is ignored: "
                                                      r"activation_checkpointing is off \(--activation-checkpointing"),
            (dict(activation_checkpointing_policy="selective"), r"activation_checkpointing_policy='selective' is "
                                                                r"ignored: activation_checkpointing is off"),
            (dict(compile_backend="aot_eager"), r"compile_backend='aot_eager' is ignored: compile is off \(--compile"),
            (dict(mode="full", restart_warmup_steps=5), r"restart_warmup_steps=5 is ignored: mode='full' has no "
                                                        "resets"),
            (dict(mode="lora", restart_warmup_steps=5), r"restart_warmup_steps=5 is ignored: mode='lora' has no "
                                                        r"resets \(mode='lora' re-warms only at the switch"),
            (dict(mode="lora", restart_warmup_steps=5, warm_start_steps=5, warm_start_lr=1e-3,
                  lowrank_schedule="restart"), r"restart_warmup_steps=5 is ignored: mode='lora'")):
        with pytest.warns(UserWarning, match=match):
            TrainConfig(**{**BASE, **kw})
    import warnings

    with warnings.catch_warnings():  # the same settings where they take effect: no warning
        warnings.simplefilter("error")
        for kw in (dict(lowrank_schedule="restart", warm_start_steps=5, warm_start_lr=1e-3), dict(dropout=0.1),
                   dict(prune_joint=True), dict(merge_residual=True), dict(prune_method="reset"),
                   dict(activation_checkpointing=True, activation_checkpointing_layers=2),
                   dict(activation_checkpointing=True, activation_checkpointing_policy="selective"),
                   dict(prune_method="random", prune_ratio=0.5), dict(restart_warmup_steps=5),
                   dict(mode="lora", cycle_length=None, restart_warmup_steps=5, warm_start_steps=5,
                        warm_start_lr=1e-3)):
            TrainConfig(**{**BASE, **kw})


@pytest.mark.parametrize("kw, match", [
    (dict(micro_batch_size=0), "micro_batch_size=0 must be positive"),
    (dict(global_batch_size=0), "global_batch_size=0 must be positive"),
    (dict(seq_len=0), "seq_len=0 must be positive"),
    (dict(rank=0), "rank=0 must be positive"),
    (dict(merge_every=0), "merge_every=0 must be positive"),
    (dict(min_lr_ratio=-0.1), r"min_lr_ratio=-0.1 must be in \[0, 1\]"),
    (dict(prune_ratio=-0.1), r"prune_ratio=-0.1 must be in \[0, 1\]"),
    (dict(seed=-1), "seed=-1 must be >= 0"),  # was accepted, then failed every rank in the data sampler
    # a user trial: 2**64 started, then failed after the engine with "Overflow when unpacking long long"
    (dict(seed=2**64), r"seed=18446744073709551616 must be below 2\*\*62"),
    (dict(seed=2**62), r"seed=4611686018427387904 must be below 2\*\*62"),  # the bound itself
    (dict(data_prefetch=-1), "data_prefetch=-1 must be >= 0"),
    (dict(vocab_size=10), r"vocab_size=10 is too small: the built-in corpus's tokenizer takes 338 pieces"),
    # (was accepted by preflight, then failed every rank)
])
def test_zero_and_negative_values_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**BASE, **kw})


def test_negative_grad_clip_is_refused():
    """DeepSpeed clips only when gradient_clipping > 0: a negative value would silently train unclipped."""
    with pytest.raises(ValueError, match="grad_clip=-1.0 must be >= 0"):
        TrainConfig(**{**BASE, "grad_clip": -1.0})
    assert TrainConfig(**{**BASE, "grad_clip": 0.0}).grad_clip == 0.0  # 0 disables clipping on purpose


def test_int8_base_with_full_mode_is_refused():
    with pytest.raises(ValueError, match="quantize=int8 applies to the frozen base of mode=relora or lora"):
        TrainConfig(**{**BASE, "mode": "full", "cycle_length": None, "quantize": "int8"})


@pytest.mark.parametrize("interpret, refused", [(None, True), ("0", True), ("1", False), ("true", False),
                                                ("yes", False)])
def test_triton_kernels_without_cuda_need_the_interpreter_as_triton_reads_its_switch(monkeypatch, interpret,
                                                                                     refused):
    """kernels=triton on a machine without CUDA is refused at start-up unless TRITON_INTERPRET asks for
    Triton's CPU interpreter; the check read only "1", and refused `true`/`yes`, which Triton honours (found
    by a review)."""
    from relora_ds.startup import check_kernels
    from relora_ds.train_config import TrainConfig
    monkeypatch.setenv("RELORA_KERNELS", "triton")
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    if refused:
        with pytest.raises(ValueError, match=r"kernels=triton \(recipe, --kernels or RELORA_KERNELS\) needs CUDA"):
            check_kernels(TrainConfig(mode="lora", total_steps=10), cuda=False)
    else:
        check_kernels(TrainConfig(mode="lora", total_steps=10), cuda=False)
    check_kernels(TrainConfig(mode="lora", total_steps=10), cuda=True)  # with a GPU: no interpreter needed


def test_activation_checkpointing_layers_past_the_models_layers_fail_at_start_up():
    """More layers to recompute than the model has: named at start-up with the model's count (the model is
    known only there: a preset or a Hugging Face directory)."""
    from relora_ds.model_config import LlamaConfig
    from relora_ds.startup import check_model_and_data

    layers = LlamaConfig.preset("debug").num_hidden_layers
    cfg = TrainConfig(**{**BASE, "model": "debug", "rank": 4, "activation_checkpointing": True,
                         "activation_checkpointing_layers": layers})
    check_model_and_data(cfg, None, 512)
    cfg.activation_checkpointing_layers = layers + 1
    with pytest.raises(ValueError, match=rf"activation_checkpointing_layers={layers + 1} is more than the model's "
                                         rf"{layers} decoder layers; give at most {layers}, or leave it unset"):
        check_model_and_data(cfg, None, 512)


def test_the_edges_of_the_seed_vocab_and_restart_warmup_checks():
    """Mutations a trial ran that no test saw: the largest seed is 2**62 - 1 (its refusal above); a vocab
    below the built-in tokenizer's byte fallback is fine with a prepared data_dir (its own tokenizer); a restart
    warmup as long as the cycle is warned, as a longer one is."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TrainConfig(**{**BASE, "seed": 2**62 - 1}).seed == 2**62 - 1
        assert TrainConfig(**{**BASE, "vocab_size": 10, "data_dir": "/data/prepared"}).vocab_size == 10
    cycle = BASE["cycle_length"]
    with pytest.warns(UserWarning, match=rf"restart_warmup_steps={cycle} is not shorter than a cycle"):
        TrainConfig(**{**BASE, "restart_warmup_steps": cycle})


def test_data_read_many_times_over_and_fewer_validation_windows_than_asked_are_warned():
    """startup.check_data_use on a prepared dir's token counts: 100 training windows of 33 tokens (3,201 tokens),
    8 sequences a step: 50 steps read them 4.0 times (fine), 51 steps 4.1 times (warned, with the numbers); 10
    validation windows: eval_windows 10 reads them all, 11 is warned that evaluation uses all 10."""
    from relora_ds.startup import check_data_use
    from relora_ds.train_config import ConfigWarning

    splits = {"train": {"tokens": 32 * 100 + 1}, "validation": {"tokens": 32 * 10 + 1}}

    def warned(total_steps, eval_windows):
        cfg = TrainConfig(**{**BASE, "seq_len": 32, "global_batch_size": 8, "eval_every": 10,
                             "eval_windows": eval_windows, "total_steps": total_steps})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_data_use(cfg, total_steps, splits, "data", 1)
        return [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]

    assert warned(50, 10) == []
    assert warned(51, 10) == ["this run reads the training data of data 4.1 times (51 steps x 8 sequences, 100 "
                              "windows of 33 tokens): set data_dir to a larger prepared corpus "
                              "(launch/prepare_data.py)"]
    assert warned(50, 11) == ["eval_windows=11 but the validation split of data holds 10 windows: each evaluation "
                              "uses all 10"]


def test_more_edges_a_mutation_trial_found_unpinned():
    """keep_last=0 would delete every checkpoint, the last included: refused; final_eval_windows below 0 is
    refused as eval_windows is; a bool field takes true/false, not 1 (YAML's `compile: 1`); eval_windows'
    default is the one its help text states."""
    import dataclasses

    with pytest.raises(ValueError, match=r"keep_last=0 must be positive"):
        TrainConfig(**BASE, keep_last=0)
    with pytest.raises(ValueError, match=r"final_eval_windows=-1 must be >= 0"):
        TrainConfig(**BASE, final_eval_windows=-1)
    with pytest.raises(ValueError, match=r"compile=1 must be true or false"):
        TrainConfig(**BASE, compile=1)
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}["eval_windows"]
    assert "default 10240" in field.metadata["help"] and field.default == 10240
