"""What enable_relora (relora_ds/hf_trainer.py) refuses or names, each with the reason and the way out: misuse
of the callback, DeepSpeed configs it cannot honour (a scheduler section, one weight-decay group), accelerate's
FSDP1, transformers' inference engine, optimizers without Adam moments or built before the wrap. The
Trainer runs against their oracles: tests/test_hf_trainer.py."""
import json
import sys
import warnings

import pytest
import torch

import relora_ds
from launch_utils import ROOT, run_ranks

sys.path.insert(0, str(ROOT / "tests" / "dist"))
import hf_trainer_worker as w  # noqa: E402


def test_misuse_is_named(tmp_path):
    from transformers import TrainingArguments

    from relora_ds.hf_trainer import enable_relora
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2)
    plain = relora_ds.unwrap(w.model())
    with pytest.raises(ValueError, match="no ReLoRA layers; call relora_ds.wrap"):
        enable_relora(w.InOrder(model=plain, args=args, train_dataset=w.Windows()), cycle_length=3)
    trainer = w.InOrder(model=w.model(), args=args, train_dataset=w.Windows())
    for bad, match in ((dict(cycle_length=0), "cycle_length=0 must be a positive"),
                       (dict(cycle_length=4, merge_every=3), "merge_every=3 must divide cycle_length=4"),
                       (dict(cycle_length=4, restart_warmup_steps=5), r"restart_warmup_steps=5 must be in \[0, "),
                       (dict(cycle_length=4, restart_warmup_steps=1.5), "restart_warmup_steps=1.5 must be a whole"),
                       (dict(cycle_length=200, prune_ratio=2.0), "ratio")):
        with pytest.raises(ValueError, match=match):
            enable_relora(trainer, **bad)
    enable_relora(trainer, cycle_length=3, restart_warmup_steps=1)
    # transformers 4.x's create_optimizer_and_scheduler passes its optimizer: the schedule still becomes the
    # trainer's (the Trainer then steps trainer.lr_scheduler), and is the jagged cosine.
    trainer.create_optimizer()
    sched = trainer.create_scheduler(num_training_steps=7, optimizer=trainer.optimizer)
    assert trainer.lr_scheduler is sched and sched.lr_lambdas[0].func is relora_ds.jagged_cosine
    # a cycle as long as the run: no reset, said (it was silent, a user trial)
    short = w.InOrder(model=w.model(), args=args, train_dataset=w.Windows())
    enable_relora(short, cycle_length=3, restart_warmup_steps=1)
    short.create_optimizer()
    with pytest.warns(UserWarning, match="cycle_length=3 but the run is 3 optimizer steps: no reset happens before"):
        short.create_scheduler(num_training_steps=3)
    with pytest.raises(ValueError, match="already a ReLoRA run"):
        enable_relora(trainer, cycle_length=3, restart_warmup_steps=1)
    # Trainer settings the jagged cosine replaces, and checkpoint uploads of the wrapped state: said (silent)
    other = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2,
                              lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-3})
    hub = w.InOrder(model=w.model(), args=other, train_dataset=w.Windows())
    hub.args.push_to_hub = True  # set after the Trainer is built: building it would create the hub repo
    with pytest.warns(UserWarning) as said:
        enable_relora(hub, cycle_length=3, restart_warmup_steps=1)
    said = [str(m.message) for m in said]
    assert any(m.startswith("enable_relora: lr_scheduler_type='cosine_with_min_lr' and lr_scheduler_kwargs="
                            "{'min_lr': 0.001} are not used: ReLoRA's jagged cosine replaces") for m in said), said
    assert any(m.startswith("enable_relora: push_to_hub with hub_strategy='every_save' uploads each checkpoint's "
                            "model files, the wrapped state") for m in said), said
    defaults = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2)
    quiet = w.InOrder(model=w.model(), args=defaults, train_dataset=w.Windows())  # nothing to say
    quiet.args.push_to_hub, quiet.args.hub_strategy = True, "end"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        enable_relora(quiet, cycle_length=3, restart_warmup_steps=1)
    model = w.model()
    opt = torch.optim.AdamW(model.parameters())
    own = w.InOrder(model=model, args=args, train_dataset=w.Windows(),
                    optimizers=(opt, torch.optim.lr_scheduler.ConstantLR(opt)))
    with pytest.raises(ValueError, match="already has its lr scheduler"):
        enable_relora(own, cycle_length=3, restart_warmup_steps=1)
    # A scheduler that takes the jagged cosine's place after enable_relora is refused before the first step.
    late = w.InOrder(model=w.model(), args=args, train_dataset=w.Windows())
    enable_relora(late, cycle_length=3, restart_warmup_steps=1)
    late.create_optimizer()
    late.lr_scheduler = torch.optim.lr_scheduler.ConstantLR(late.optimizer)
    with pytest.raises(ValueError, match="the run steps a ConstantLR, not ReLoRA's jagged cosine"):
        late.train()
    assert late.state.global_step == 0


def test_one_group_weight_decay_under_a_deepspeed_optimizer_section_is_named(tmp_path, monkeypatch):
    """A DeepSpeed optimizer section makes transformers pass DeepSpeed every trainable parameter in one group
    (DummyOptim), so a weight decay > 0 decays the norms too; enable_relora says so once, naming the fix. No
    warning without the section, without decay, or with an explicit 0 in it. A section without lr or
    weight_decay is refused (a review found DeepSpeed then running torch AdamW's defaults)."""
    import warnings

    from transformers import TrainingArguments

    from relora_ds import hf_trainer
    from relora_ds.hf_trainer import _one_group_decay

    auto = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}}
    assert "weight_decay=0.1 decays the norms' gains and biases too" in _one_group_decay(auto, 0.1)
    assert "weight_decay=0.05" in _one_group_decay({"optimizer": {"params": {"weight_decay": 0.05}}}, 0.0)
    for ds, decay in ((auto, 0.0), ({}, 0.1), ({"optimizer": {"params": {"weight_decay": 0}}}, 0.1)):
        assert _one_group_decay(ds, decay) is None, (ds, decay)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2, weight_decay=0.1)
    config = {}
    monkeypatch.setattr(hf_trainer, "_deepspeed_config", lambda trainer: config)

    def enable():
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            hf_trainer.enable_relora(w.InOrder(model=w.model(), args=args, train_dataset=w.Windows()), cycle_length=3,
                                     restart_warmup_steps=1)
        return [str(x.message) for x in seen if "one group" in str(x.message)]
    config.update(auto)
    assert enable() == [_one_group_decay(auto, 0.1)]
    # An optimizer section without lr or weight_decay (relora_ds's own ds_configs/*.json, for launch/train.py):
    # DeepSpeed would run torch AdamW's lr 1e-3 and weight decay 0.01 on everything, whatever the arguments say.
    config.update(optimizer={"type": "AdamW", "params": {"torch_adam": True}})
    with pytest.raises(ValueError, match=r"'optimizer' section sets no lr and weight_decay, so DeepSpeed would take "
                                         r"its optimizer's defaults .*Remove the 'optimizer' section"):
        enable()
    config.update(optimizer={"type": "AdamW", "params": {"lr": "auto"}})
    with pytest.raises(ValueError, match="sets no weight_decay,"):
        enable()
    config.clear()  # no optimizer section: the Trainer's own AdamW, nothing to say
    assert enable() == []


def test_a_cycle_as_long_as_the_run_is_named_on_both_ways_the_schedule_is_built(tmp_path):
    """cycle_length >= the run's optimizer steps: no reset before the last step (plain LoRA). Named when the
    Trainer builds the schedule and when transformers asks for one over DeepSpeed's optimizer (an optimizer
    section: deepspeed_init's callable, with trainer.lr_scheduler already its DummyScheduler); the second
    said nothing. Not named for a run longer than the cycle."""
    from transformers import TrainingArguments

    from relora_ds.hf_trainer import enable_relora

    def named(steps, ds_section):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2)
        trainer = w.InOrder(model=w.model(), args=args, train_dataset=w.Windows())
        enable_relora(trainer, cycle_length=6, restart_warmup_steps=1)
        trainer.create_optimizer()
        if ds_section:  # what transformers' deepspeed_init has set by then (a stand-in object)
            trainer.lr_scheduler = object()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            sched = trainer.create_scheduler(num_training_steps=steps, optimizer=trainer.optimizer)
        assert sched.lr_lambdas[0].func is relora_ds.jagged_cosine
        return [str(x.message) for x in seen if "no reset happens" in str(x.message)]
    for ds_section in (False, True):
        assert named(6, ds_section) == ["enable_relora: cycle_length=6 but the run is 6 optimizer steps: no reset "
                                        "happens before its last step (LoRA, not ReLoRA); use a cycle_length below it"]
        assert named(7, ds_section) == []


def test_accelerates_fsdp1_is_refused_before_the_first_step(tmp_path):
    """A Trainer under accelerate's FSDP1 (fsdp_version 1, its default; GPU only, so a bare instance of its class
    wraps the model here, as in tests/test_fsdp.py) is refused when training begins, naming FSDP2, rather than
    at the first merge cycle_length steps in; the weights are untouched."""
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel
    from transformers import TrainingArguments

    from relora_ds.hf_trainer import enable_relora
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2)
    trainer = w.InOrder(model=w.model(), args=args, train_dataset=w.Windows())
    callback = enable_relora(trainer, cycle_length=3, restart_warmup_steps=1)
    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(wrapper)
    wrapper._modules["_fsdp_wrapped_module"] = trainer.model
    trainer.model_wrapped = wrapper
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"enable_relora: the model is wrapped in FSDP1.* shard it with FSDP2 "
                                         r"instead \(fsdp_config=\{'fsdp_version': 2\} in TrainingArguments, or "
                                         r"fsdp_version: 2 in the accelerate config\)"):
        callback.on_train_begin(args, trainer.state, trainer.control)
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_transformers_inference_engine_is_named_not_blamed_on_a_late_wrap(tmp_path):
    """evaluate() before train() under ZeRO-3: transformers builds an inference engine, whose optimizer is
    DeepSpeed's parameter offload object in transformers 5 (a user trial: the message then blamed a wrap after
    deepspeed.initialize, which had not happened). Its real class, built without __init__, stands in."""
    from types import SimpleNamespace

    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from transformers import TrainingArguments

    from relora_ds.hf_trainer import enable_relora
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2)
    trainer = w.InOrder(model=w.model(), args=args, train_dataset=w.Windows())
    callback = enable_relora(trainer, cycle_length=3, restart_warmup_steps=1)
    for optimizer in (None, DeepSpeedZeRoOffload.__new__(DeepSpeedZeRoOffload)):
        trainer.is_deepspeed_enabled = True
        trainer.model_wrapped = SimpleNamespace(optimizer=optimizer, module=trainer.model)
        with pytest.raises(ValueError, match=r"enable_relora: the DeepSpeed engine has no optimizer: it is the "
                                             r"inference engine transformers builds for evaluate\(\)"):
            callback.on_train_begin(args, trainer.state, trainer.control)


def test_an_optimizer_without_adam_moments_is_refused_after_the_first_step(tmp_path):
    """SGD, Adafactor, RMSprop keep no Adam moments to prune: the first reset failed, cycle_length steps in
    (5000 in the paper) and after its merge. Now state other than the moments ends the run at the first step;
    no state at all (SGD without momentum; it passed the check, a user trial found on 2026-12-05) is waited
    out, as the skipped first steps of an fp16 run keep none, but ends the run before the first merge."""
    from transformers import TrainingArguments

    from relora_ds.hf_trainer import enable_relora

    for optim_args, kept, stop in (("momentum=0.9", r"\['momentum_buffer'\]", 1), ("momentum=0.0", "no state", 3)):
        args = TrainingArguments(**{**w.arguments(tmp_path / optim_args, 4), "optim": "sgd",
                                    "optim_args": optim_args})
        trainer = w.InOrder(model=w.model(), args=args, train_dataset=w.Windows())
        enable_relora(trainer, **w.RELORA)
        with pytest.raises(ValueError, match=rf"the optimizer \(SGD\) keeps {kept} for the LoRA factors, not the "
                                             r"Adam moments"):
            trainer.train()
        assert trainer.state.global_step == stop  # (cycle_length 3: the first merge is due at step 3)
        assert all(int(layer.merge_count) == 0 for _, layer in relora_ds.relora_layers(trainer.model))


def test_an_optimizer_built_before_the_wrap_is_refused_before_the_first_step(tmp_path):
    """optimizers=(opt, None) with opt built on the plain model's parameters: the LoRA factors are in no
    group, so they never trained, and the first reset (cycle_length steps in) refused it (a user trial)."""
    plain = w.plain()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    trainer = _training_refused(tmp_path, relora_ds.wrap(plain, rank=4), opt,
                                r"enable_relora: \d+ LoRA parameters \(model\.layers\.0\.self_attn\.q_proj"
                                r"\.lora_A, \.\.\.\) are not in the Trainer's optimizer")
    assert trainer.state.global_step == 0


def _training_refused(tmp_path, model, opt, match):
    """A Trainer given optimizers=(opt, None), enable_relora'd: its train() raises ValueError matching `match`.
    Returns the Trainer (its step shows when)."""
    from transformers import TrainingArguments

    from relora_ds.hf_trainer import enable_relora

    trainer = w.InOrder(model=model, args=TrainingArguments(**w.arguments(tmp_path, 4)), train_dataset=w.Windows(),
                        optimizers=(opt, None))
    enable_relora(trainer, **w.RELORA)
    with pytest.raises(ValueError, match=match):
        trainer.train()
    return trainer


def test_a_deepspeed_config_with_a_scheduler_is_refused(tmp_path):
    """A DeepSpeed config's 'scheduler' section would replace the jagged cosine: refused when given as
    deepspeed=, and when given through accelerate (accelerate launch --use_deepspeed), where it replaced it
    silently (a review: lr 0.02 through both resets). Each in a process of its own: accelerate's state, once
    DeepSpeed's, stays so for every later Trainer of the process."""
    config = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "zero_optimization":
              {"stage": 2}, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    for via in ("accelerate", "deepspeed="):
        proc = run_ranks(ROOT / "tests/dist/hf_trainer_worker.py", "--out", tmp_path, "--refuse-config",
                         tmp_path / "ds.json", "--via", via, nprocs=1, timeout=300)
        assert f"{via} refused: enable_relora: the DeepSpeed config has a 'scheduler' section" in proc.stdout, \
            proc.stdout


def test_the_edges_of_enable_reloras_ranges_are_accepted_and_past_them_refused(tmp_path):
    """What enable_relora's docstring allows, at its edges (a mutation trial's survivors: the misuse test only
    tried values well outside): merge_every a proper divisor of cycle_length, a restart warmup as long as the
    cycle, min_lr_ratio 0 and 1; and a min_lr_ratio past 1 or below 0 is refused naming the range."""
    from transformers import TrainingArguments

    from relora_ds.hf_trainer import enable_relora
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2)
    for good in (dict(cycle_length=4, merge_every=2, restart_warmup_steps=1),
                 dict(cycle_length=4, merge_every=4, restart_warmup_steps=1),
                 dict(cycle_length=4, restart_warmup_steps=4), dict(cycle_length=4, restart_warmup_steps=0),
                 dict(cycle_length=4, restart_warmup_steps=1, min_lr_ratio=0.0),
                 dict(cycle_length=4, restart_warmup_steps=1, min_lr_ratio=1.0)):
        trainer = w.InOrder(model=w.model(), args=args, train_dataset=w.Windows())
        callback = enable_relora(trainer, **good)
        assert (callback.cycle_length, callback.merge_every) == (4, good.get("merge_every", 4)), good
    trainer = w.InOrder(model=w.model(), args=args, train_dataset=w.Windows())
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=rf"min_lr_ratio={bad} must be in \[0, 1\]"):
            enable_relora(trainer, cycle_length=4, restart_warmup_steps=1, min_lr_ratio=bad)
    with pytest.raises(ValueError, match=r"merge_every=8 must divide cycle_length=4"):
        enable_relora(trainer, cycle_length=4, merge_every=8, restart_warmup_steps=1)


def test_an_optimizer_with_one_of_the_two_moments_is_refused_after_the_first_step(tmp_path):
    """A Lion-like optimizer keeps exp_avg alone: every reset prunes both Adam moments, so it is refused at the
    first step, naming what it keeps (a mutation trial's survivor took any one moment as enough, and the run
    went on to its first reset)."""
    class OneMoment(torch.optim.Optimizer):  # Lion's state: one moment, under Adam's first moment's name
        def __init__(self, params, lr=1e-3):
            super().__init__(params, dict(lr=lr))

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                        p.add_(m.mul_(0.9).add_(p.grad, alpha=0.1).sign(), alpha=-group["lr"])

    model = w.model()
    opt = OneMoment([p for p in model.parameters() if p.requires_grad])
    trainer = _training_refused(tmp_path, model, opt, r"the optimizer \(OneMoment\) keeps \['exp_avg'\] for the LoRA "
                                                      r"factors, not the Adam moments \['exp_avg', 'exp_avg_sq'\]")
    assert trainer.state.global_step == 1


def test_a_deepspeed_optimizer_with_a_group_without_adam_moments_is_refused_at_the_first_step(tmp_path):
    """Found by a review: under DeepSpeed the check passed once any flat partition held Adam moments, so
    DeepSpeed's Muon (momentum_buffer for the 2-D LoRA factors, Adam moments for the norms' auxiliary groups)
    ran a whole cycle and was refused at the first reset, after its merge. Now refused at the first step, by the
    prune's own group test; an optimizer whose groups are all Adam ones passes. (An engine stand-in: the real
    engine's optimizer holds its state the same way, by flat partition.)"""
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from relora_ds.hf_trainer import enable_relora

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2)
    trainer = w.InOrder(model=w.model(), args=args, train_dataset=w.Windows())
    callback = enable_relora(trainer, cycle_length=3, restart_warmup_steps=1)
    norms, factors = torch.zeros(8, requires_grad=True), torch.zeros(16, requires_grad=True)  # flat partitions
    for muon in (True, False):
        opt = torch.optim.AdamW([norms])
        opt.param_groups.append({"params": [factors], "lr": 1e-3, **({"use_muon": True, "momentum": 0.95} if muon
                                                                      else {"betas": (0.9, 0.99), "eps": 1e-8})})
        opt.state[norms] = {"step": torch.tensor(1.0), "exp_avg": torch.ones(8), "exp_avg_sq": torch.ones(8)}
        opt.state[factors] = {"momentum_buffer": torch.ones(16)} if muon else dict(opt.state[norms])
        trainer.is_deepspeed_enabled = True
        trainer.model_wrapped = SimpleNamespace(optimizer=opt, module=trainer.model)
        callback.moments_checked = False
        if muon:
            with pytest.raises(ValueError, match=r"enable_relora: the engine's optimizer \(AdamW\) keeps no Adam "
                                                 r"moments \(exp_avg, exp_avg_sq\) in every param group"):
                callback._check_moments(merging=False)
        else:
            callback._check_moments(merging=False)
        assert callback.moments_checked is not muon
