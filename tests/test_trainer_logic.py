"""The trainer's start-up on stubs, no engine and no launcher: its checks and refusals (data, settings,
resumes on other data), the process group's timeout, the engine's layers and optimizer settings (what a
run writes: test_trainer_outputs.py; merges and resets: test_reset_hook.py; the validation loss:
test_evaluate.py). (Runs through DeepSpeed: tests/test_trainer.py.)"""
import json

import pytest


def test_collectives_wait_the_configured_time(monkeypatch, tmp_path):
    """The process group gets collective_timeout_min (default 60: DeepSpeed's 10 minutes can end a job while
    rank 0 alone converts a checkpoint or exports), not DeepSpeed's default; a DEEPSPEED_TIMEOUT in the
    environment gets a warning that it is ignored."""
    import datetime

    from relora_ds import trainer
    from relora_ds.train_config import ConfigWarning, TrainConfig

    seen = {}

    class Stop(Exception):
        pass

    def fake_init(**kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(trainer, "init_distributed", fake_init)
    # (its RANK/WORLD_SIZE/LOCAL_RANK would stay in this process's environment: a later Hugging Face Trainer
    # then wrapped its model in DDP, whose forward breaks a torch.compile graph)
    monkeypatch.setattr(trainer, "single_process_environment", lambda: None)
    for kw, minutes in (({}, 60), ({"collective_timeout_min": 180}, 180)):
        cfg = TrainConfig(cycle_length=4, total_steps=8, output_dir=str(tmp_path / "run"), **kw)
        with pytest.raises(Stop):
            trainer.Trainer(cfg)
        assert seen["timeout"] == datetime.timedelta(minutes=minutes)
    # DeepSpeed's own variable would be overridden by our timeout: said, not silently dropped.
    monkeypatch.setenv("DEEPSPEED_TIMEOUT", "30")
    cfg = TrainConfig(cycle_length=4, total_steps=8, output_dir=str(tmp_path / "run"))
    with pytest.warns(ConfigWarning, match="DEEPSPEED_TIMEOUT=30 is ignored: collective_timeout_min=60"), \
            pytest.raises(Stop):
        trainer.Trainer(cfg)
    assert seen["timeout"] == datetime.timedelta(minutes=60)
    with pytest.raises(ValueError, match="collective_timeout_min=0 must be positive"):
        TrainConfig(cycle_length=4, total_steps=8, collective_timeout_min=0)


def test_settings_without_effect_under_the_deepspeed_config_are_named(monkeypatch, tmp_path):
    """merge_residual keeps what rounding W to bf16/fp16 loses at a merge: with fp32 weights (no bf16/fp16
    in the DeepSpeed config) nothing is lost, so the setting is named as ignored; under bf16 it is not.
    (In process, no process group: the trainer stops right after reading the DeepSpeed config.)"""
    import warnings

    from relora_ds import trainer
    from relora_ds.output_dir import unlock_output_dir
    from relora_ds.train_config import ConfigWarning, TrainConfig

    class Stop(Exception):
        pass

    monkeypatch.setattr(trainer, "init_distributed", lambda **kw: None)
    monkeypatch.setattr(trainer, "single_process_environment", lambda: None)
    monkeypatch.setattr(trainer.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(trainer.dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(trainer, "on_rank_zero", lambda fn: fn())
    monkeypatch.setattr(trainer.Trainer, "_prepare_data", lambda self: (_ for _ in ()).throw(Stop()))
    from relora_ds import ds_machine  # a CPU's lack of native bf16 is another warning (tests/test_ds_config.py)
    monkeypatch.setattr(ds_machine, "cpu_has_native_bf16", lambda: True)
    bf16 = tmp_path / "bf16.json"
    bf16.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    cfg = dict(cycle_length=4, restart_warmup_steps=2, warmup_steps=2, total_steps=8, merge_residual=True)
    with pytest.warns(ConfigWarning, match="merge_residual=True is ignored: the weights are fp32"), pytest.raises(Stop):
        trainer.Trainer(TrainConfig(**cfg, output_dir=str(tmp_path / "fp32")))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        with pytest.raises(Stop):
            trainer.Trainer(TrainConfig(**cfg, output_dir=str(tmp_path / "bf16")), str(bf16))
    for run in ("fp32", "bf16"):  # the Trainers never finished building: release their locks here
        unlock_output_dir(tmp_path / run)


def _splits(train, val, train_documents=5_000):
    return {"train": {"tokens": train, "documents": train_documents}, "validation": {"tokens": val}}


def test_data_too_small_for_a_window_or_a_global_batch_is_named_with_its_numbers():
    """startup.check_data_use on the manifest's token counts (windows are seq_len + 1 tokens, consecutive ones
    sharing one: (tokens - 1) // seq_len of them): the numbers and the flags that fix it, by case. A training
    split without a window, or with fewer than one optimizer step's global batch, is an error (the sampler
    could not draw a step); validation that cannot run is one too, told apart: an empty split, or one too short
    for a window (1,989 tokens at --seq-len 2048) -- unless evaluation is off."""
    from relora_ds.startup import check_data_use
    from relora_ds.train_config import TrainConfig

    kw = dict(model="debug", seq_len=2048, cycle_length=4, restart_warmup_steps=2, warmup_steps=2, total_steps=8,
              micro_batch_size=2, global_batch_size=8, eval_every=4, eval_windows=1)
    cfg = TrainConfig(**kw)
    with pytest.raises(ValueError) as e:
        check_data_use(cfg, 8, _splits(1_500, 10_000), "data/x", 2)
    assert str(e.value) == ("the training split of data/x holds 1,500 tokens, fewer than one window of --seq-len 2048 "
                            "needs (seq_len + 1 = 2,049 tokens): use a smaller --seq-len, or prepare more data "
                            "(launch/prepare_data.py)")
    five = 5 * 2048 + 1  # 5 windows; 2 ranks x 2 = 4 per micro-step: a global batch of 4 fits
    with pytest.raises(ValueError) as e:
        check_data_use(cfg, 8, _splits(five, 10_000), "data/x", 2)
    assert str(e.value) == ("the training split of data/x holds 5 windows of --seq-len 2048 (10,241 tokens), fewer "
                            "than one optimizer step's --global-batch-size 8: use a --global-batch-size of at most 4 "
                            "(a multiple of --micro-batch-size 2 x 2 rank(s)), a smaller --seq-len (more windows "
                            "from the same tokens), or prepare more data (launch/prepare_data.py)")
    with pytest.raises(ValueError, match=r"holds 5 windows .* use a smaller --micro-batch-size and --global-batch-size "
                                         r"\(one micro-batch of 2 on each of 4 rank\(s\) is already 8 windows\)"):
        check_data_use(cfg, 8, _splits(five, 10_000), "data/x", 4)
    enough = 8 * 2048 + 1
    with pytest.raises(ValueError) as e:
        check_data_use(cfg, 8, _splits(enough, 0), "data/x", 2)
    assert str(e.value) == ("the validation split of data/x is empty (0 tokens, 5,000 training documents): prepare "
                            "the data (launch/prepare_data.py) with a larger --val-fraction, or set --eval-every 0 "
                            "(no evaluation)")
    with pytest.raises(ValueError) as e:  # one book as one .txt document: a larger --val-fraction cannot help
        check_data_use(cfg, 8, _splits(enough, 0, train_documents=1), "data/x", 2)
    assert str(e.value) == ("the validation split of data/x is empty (0 tokens, 1 training documents): prepare the "
                            "data (launch/prepare_data.py) with a larger --val-fraction or, as each document goes "
                            "whole to one split, more and smaller documents (--txt-unit paragraph for .txt files) or "
                            "a validation corpus (--val-input), or set --eval-every 0 (no evaluation)")
    with pytest.raises(ValueError) as e:
        check_data_use(cfg, 8, _splits(enough, 1_989), "data/x", 2)
    assert str(e.value) == ("the validation split of data/x holds 1,989 tokens, fewer than one window of --seq-len "
                            "2048 needs (seq_len + 1 = 2,049 tokens): use a smaller --seq-len, prepare the data with "
                            "a larger --val-fraction (launch/prepare_data.py), or set --eval-every 0 (no evaluation)")
    no_eval = TrainConfig(**{**kw, "eval_every": 0})
    for val in (0, 1_989):  # nothing evaluates: nothing to refuse
        check_data_use(no_eval, 1, _splits(enough, val), "data/x", 2)
    check_data_use(cfg, 1, _splits(enough, 2_049), "data/x", 2)  # exactly one window each way: fine


@pytest.mark.parametrize("train_tokens, message", [
    (1_500, "the training split of {data} holds 1,500 tokens, fewer than one window of --seq-len 2048 needs"),
    (3 * 2048 + 1, "the training split of {data} holds 3 windows of --seq-len 2048 (6,145 tokens), fewer than one "
                   "optimizer step's --global-batch-size 8: use a --global-batch-size of at most 2 (a multiple of "
                   "--micro-batch-size 1 x 2 rank(s))"),
], ids=["no-window", "fewer-windows-than-a-global-batch"])
def test_the_trainer_names_a_training_split_too_small_before_reading_it(tmp_path, monkeypatch, train_tokens, message):
    """Trainer.__init__ on 2 (stubbed) ranks: a data dir too small for --seq-len 2048 or --global-batch-size 8
    is refused naming the dir, before the windows are opened, the sampler is built or any engine exists (the
    sampler's own error knows no data dir or flag)."""
    from relora_ds.output_dir import unlock_output_dir
    from relora_ds.train_config import TrainConfig
    from trainer_utils import in_process_trainer, packed_data_dir

    trainer_mod = in_process_trainer(monkeypatch, world=2)
    for name in ("open_split", "ShardedBatches"):
        monkeypatch.setattr(trainer_mod, name, lambda *a, name=name, **kw: pytest.fail(f"{name} built before the check"))
    data = packed_data_dir(tmp_path / "data", train_tokens, 4_000)
    cfg = TrainConfig(model="debug", seq_len=2048, data_dir=str(data), output_dir=str(tmp_path / "run"), rank=4,
                      cycle_length=4, restart_warmup_steps=2, warmup_steps=2, total_steps=8, micro_batch_size=1,
                      global_batch_size=8, eval_every=0, export=False)
    with pytest.raises(ValueError) as e:
        trainer_mod.Trainer(cfg)
    unlock_output_dir(tmp_path / "run")
    assert str(e.value).startswith(message.format(data=data)), str(e.value)


def test_a_refused_trainer_releases_the_output_dir_lock_it_took_not_one_held_before(tmp_path, monkeypatch):
    """Trainer.__init__ refusing a recipe after it locked output_dir (a split too small) kept the lock until
    the process ended: a notebook's refused recipe refused a run started elsewhere in that dir. The lock it took
    is released; one this process held before (as a Trainer built earlier here holds it) stays held."""
    from relora_ds.output_dir import holds_output_dir_lock, lock_output_dir, unlock_output_dir
    from relora_ds.train_config import TrainConfig
    from trainer_utils import in_process_trainer, packed_data_dir

    trainer_mod = in_process_trainer(monkeypatch)
    run = tmp_path / "run"
    cfg = TrainConfig(model="debug", seq_len=2048, data_dir=str(packed_data_dir(tmp_path / "data", 1_500, 4_000)),
                      output_dir=str(run), rank=4, cycle_length=4, restart_warmup_steps=2, warmup_steps=2,
                      total_steps=8, micro_batch_size=1, global_batch_size=8, eval_every=0, export=False)
    with pytest.raises(ValueError, match="fewer than one window"):
        trainer_mod.Trainer(cfg)
    assert not holds_output_dir_lock(run)
    lock_output_dir(run)
    with pytest.raises(ValueError, match="fewer than one window"):
        trainer_mod.Trainer(cfg)
    assert holds_output_dir_lock(run)
    unlock_output_dir(run)


def test_resume_on_data_prepared_again_is_refused_before_any_engine(tmp_path, monkeypatch):
    """Each checkpoint's config.json records the training data (the manifest's fingerprint, tokens, windows at
    the run's seq_len); --resume on the data dir prepared again -- with more tokens, or as many from another
    corpus -- is refused in Trainer.__init__ naming both, before any engine is built (DeepSpeed's initialize
    fails this test). Unchanged data resumes; a checkpoint written before the record existed is not checked."""
    from relora_ds.data.manifest import load_manifest, train_data_fingerprint
    from relora_ds.output_dir import unlock_output_dir
    from relora_ds.train_config import TrainConfig
    from trainer_utils import in_process_trainer, packed_data_dir

    trainer_mod = in_process_trainer(monkeypatch)
    data = packed_data_dir(tmp_path / "data", 4_000, 400)
    run = tmp_path / "run"

    def trainer(**kw):
        cfg = TrainConfig(model="debug", seq_len=32, data_dir=str(data), output_dir=str(run), rank=4, cycle_length=4,
                          restart_warmup_steps=2, warmup_steps=2, total_steps=12, micro_batch_size=4,
                          global_batch_size=8, eval_every=0, export=False, **kw)
        try:
            t = trainer_mod.Trainer(cfg)
        finally:
            unlock_output_dir(run)
        t.metrics.close()
        t.close()
        return t

    saved = trainer()._run_config()  # what Trainer.save writes to the checkpoint's config.json
    assert saved["data"] == {"fingerprint": train_data_fingerprint(load_manifest(data)), "train_tokens": 4_000,
                             "train_windows": 124}  # (4000 - 1) // 32
    ckpt = run / "checkpoints"
    (ckpt / "step_4").mkdir(parents=True)
    (ckpt / "step_4" / "config.json").write_text(json.dumps(saved))
    (ckpt / "latest").write_text("step_4")
    assert trainer(resume=True).resume_plan["tag"] == "step_4"  # the same data

    packed_data_dir(data, 4_100, 400)  # prepared again from a larger corpus
    with pytest.raises(ValueError) as e:
        trainer(resume=True)
    new_fp = train_data_fingerprint(load_manifest(data))
    assert str(e.value) == (
        f"checkpoint {ckpt / 'step_4'} was trained on other data than {data} holds now: its training split had "
        f"4,000 tokens, 124 windows of seq_len 32, now 4,100 tokens, 128 windows (data fingerprint "
        f"{saved['data']['fingerprint'][:12]}... vs {new_fp[:12]}..., from the manifest's recipe and counts). Its "
        "sampler position would name other samples. Resume on the data it was trained on (restore that data dir, or "
        "pass --data-dir with a copy of it), or start a new run from its export (launch/export.py, then "
        "--warm-start-from or --hf-model)")
    packed_data_dir(data, 4_000, 400, corpus="corpus-b")  # as many tokens, from other input files
    with pytest.raises(ValueError, match=r"its training split had 4,000 tokens, 124 windows of seq_len 32, now 4,000 "
                                         r"tokens, 124 windows; the same size, but prepared from other inputs or "
                                         r"options \(data fingerprint"):
        trainer(resume=True)
    old = {k: v for k, v in saved.items() if k != "data"}  # written before checkpoints recorded their data
    (ckpt / "step_4" / "config.json").write_text(json.dumps(old))
    assert trainer(resume=True).resume_plan["tag"] == "step_4"


def test_train_py_reports_a_refused_start_or_resume_in_one_line(tmp_path, monkeypatch, capsys):
    """launch/train.py builds the engine or loads the checkpoint (Trainer.start) inside the same ValueError
    handler as the config and start-up checks: e.g. an old checkpoint whose sampler finds other data is one
    `error:` line and exit 2, not a traceback out of the training loop; the run's logs and lock are closed."""
    import importlib.util
    import warnings
    from types import SimpleNamespace

    from launch_utils import ROOT

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # train.py replaces it
    spec = importlib.util.spec_from_file_location("train_py_under_test", ROOT / "launch/train.py")
    train_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_py)
    closed = []

    class Refused:
        def __init__(self, cfg, ds_config_path, early_stop=None):
            self.metrics = SimpleNamespace(close=lambda exit_code: closed.append(("metrics", exit_code)))

        def start(self):
            raise ValueError("checkpoint run/checkpoints/step_4 was trained on 40 windows of training data")

        def train(self):
            pytest.fail("train() ran after a refused start")

        def close(self):
            closed.append("close")

    monkeypatch.setattr(train_py, "Trainer", Refused)
    status = train_py.main(["--model", "debug", "--cycle-length", "4", "--restart-warmup-steps", "2", "--total-steps",
                            "8", "--warmup-steps", "2", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2
    assert err == "error: checkpoint run/checkpoints/step_4 was trained on 40 windows of training data\n"
    assert closed == [("metrics", 2), "close"]


@pytest.mark.parametrize("mode, settings", [
    ("relora", dict(dropout=0.1, target_modules=["q_proj", "v_proj"], merge_residual=True, rank=4, alpha=8.0)),
    ("relora", dict(quantize="int8", rank=2)),
    ("relora", dict(rank=4, activation_checkpointing=True, activation_checkpointing_layers=1, compile=True,
                    activation_checkpointing_policy="selective")),
    ("lora", dict(rank=4)),
    ("full", {}),
])
def test_the_engine_is_built_on_the_recipes_layers(tmp_path, monkeypatch, mode, settings):
    """What deepspeed.initialize receives (captured in place of the engine): ReLoRA layers exactly on the
    recipe's target_modules with its rank, alpha, dropout, quantize and merge_residual, LoRA tensors in the
    first param group; mode=full wraps nothing. A mutation audit found a trainer wrapping with dropout=0 or
    the default targets passing every test (runs compared with runs of the same trainer)."""
    import deepspeed

    from relora_ds import relora_layers
    from relora_ds.output_dir import unlock_output_dir
    from relora_ds.train_config import TrainConfig
    from trainer_utils import in_process_trainer, packed_data_dir

    trainer_mod = in_process_trainer(monkeypatch)
    captured = {}

    class Built(Exception):
        pass

    def capture(model, model_parameters, config, lr_scheduler):
        captured.update(model=model, groups=model_parameters)
        raise Built
    monkeypatch.setattr(deepspeed, "initialize", capture)
    data = packed_data_dir(tmp_path / "data", 4_000, 400)
    cfg = TrainConfig(model="debug", seq_len=32, data_dir=str(data), output_dir=str(tmp_path / "run"),
                      mode=mode, cycle_length=4 if mode == "relora" else None, restart_warmup_steps=2, warmup_steps=2,
                      total_steps=12, micro_batch_size=4, global_batch_size=8, eval_every=0, export=False,
                      weight_decay=0.05, **settings)
    try:
        t = trainer_mod.Trainer(cfg)
        with pytest.raises(Built):
            t.start()
        t.close()
    finally:
        unlock_output_dir(tmp_path / "run")
    model = captured["model"]
    layers = dict(relora_layers(model))
    # activation_checkpointing(_layers) and compile reach the model: which layers recompute, which are compiled
    assert model.model.gradient_checkpointing == cfg.activation_checkpointing
    assert model.model.checkpoint_layers == (cfg.activation_checkpointing_layers or model.config.num_hidden_layers)
    assert model.model.checkpoint_policy == cfg.activation_checkpointing_policy
    assert ["forward" in vars(layer) for layer in model.model.layers] == [cfg.compile] * model.config.num_hidden_layers
    # The full-rank trained parameters: the embedding, the head and every linear no ReLoRA layer wraps in the
    # matrices' group; the norms in the vectors' group, without weight decay.
    names = {id(p): n for n, p in model.named_parameters()}
    got = [sorted(names[id(p)] for p in g["params"]) for g in captured["groups"]]
    norms = sorted(n for n, _ in model.named_parameters() if n.endswith("norm.weight"))
    assert got[-1] == norms and {n for n in norms if "layers" not in n} == {"model.norm.weight"}
    assert [g["weight_decay"] for g in captured["groups"]] == [0.05] * (len(got) - 1) + [0.0]
    if mode == "full":
        assert not layers and len(captured["groups"]) == 2
        assert got[0] == sorted(n for n, p in model.named_parameters() if n not in norms)
        return
    lora_names = {names[id(p)] for layer in layers.values() for p in (layer.lora_A, layer.lora_B)}
    assert got[1] == sorted(n for n, p in model.named_parameters()
                            if p.requires_grad and n not in lora_names and n not in norms)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(got[1])  # and the linears no target wraps
    where = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    targets = settings.get("target_modules", list(where))
    assert set(layers) == {f"model.layers.{i}.{where[t]}.{t}" for i in range(model.config.num_hidden_layers)
                           for t in targets}
    for layer in layers.values():
        assert (layer.rank, layer.alpha, layer.dropout) == (cfg.rank, cfg.alpha, cfg.dropout)
        assert (layer.quantize, layer.merge_residual is not None) == (cfg.quantize, cfg.merge_residual)
    lora = {id(p) for layer in layers.values() for p in (layer.lora_A, layer.lora_B)}
    assert {id(p) for p in captured["groups"][0]["params"]} == lora


def test_a_resume_puts_the_recipes_adam_settings_into_the_optimizer():
    """After DeepSpeed restored the checkpoint's param groups (lr 3e-3, betas (0.9, 0.999), eps 1e-8, weight
    decay 0), the recipe's lr, betas, eps and weight decay must be what Adam steps with: a mutation that
    re-applied the lr alone passed every test (the resume test read the settings' change from config files).
    The norms' and biases' group (the third) takes no weight decay unless decay_norms_and_biases."""
    from types import SimpleNamespace

    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from relora_ds.resume import CheckpointsMixin
    from relora_ds.train_config import TrainConfig

    groups = [{"params": [torch.nn.Parameter(torch.zeros(3))]} for _ in range(3)]
    opt = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = LambdaLR(opt, lambda step: 0.5)
    for decay_vectors in (False, True):
        cfg = TrainConfig(cycle_length=4, restart_warmup_steps=2, total_steps=12, lr=1e-3, adam_beta1=0.8,
                          adam_beta2=0.95, adam_eps=1e-6, weight_decay=0.1, grad_clip=0.25,
                          decay_norms_and_biases=decay_vectors)
        events = []
        t = SimpleNamespace(cfg=cfg, engine=SimpleNamespace(lr_scheduler=sched, optimizer=SimpleNamespace(clip_grad=1.0)),
                            engine_phase="lowrank", _phase_lr=lambda phase: cfg.lr, world=1, ds={}, step=6,
                            _event=events.append, _group_kinds=lambda: ["lora", "matrices", "vectors"])
        CheckpointsMixin._apply_optimizer_settings(t, {"train": {**cfg.to_dict(), "lr": 3e-3, "adam_beta2": 0.999},
                                                       "world_size": 1, "deepspeed": {}})
        for group, decay in zip(opt.param_groups, (0.1, 0.1, 0.1 if decay_vectors else 0.0)):
            assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.5e-3, (0.8, 0.95), 1e-6,
                                                                                          decay)
        assert sched.base_lrs == [1e-3] * 3 and t.engine.optimizer.clip_grad == 0.25
        assert sched.get_last_lr() == [0.5e-3] * 3  # what the first step's record logs (a mutation trial's find)
        assert events[0]["lr"] == "0.003 -> 0.001" and events[0]["adam_beta2"] == "0.999 -> 0.95"


def test_a_resume_refuses_adam_params_the_checkpoint_would_undo_and_takes_the_new_loss_scaler():
    """DeepSpeed restores the checkpoint's param groups and fp16 loss scaler. A changed optimizer.params key
    (amsgrad, here) was logged as changed and silently undone; a changed fp16 section (a static scale, a new
    window or minimum) too: both found by reviews, on real resumes. Oracles: DeepSpeed's own scaler classes."""
    from types import SimpleNamespace

    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from torch.optim.lr_scheduler import LambdaLR

    from relora_ds.resume import CheckpointsMixin
    from relora_ds.train_config import TrainConfig

    cfg = TrainConfig(cycle_length=4, restart_warmup_steps=2, total_steps=12)

    def resumed(restored_scaler, new_fp16, old_fp16, built_scaler, amsgrad_now=False):
        p = torch.nn.Parameter(torch.zeros(3))
        opt = torch.optim.AdamW([{"params": [p]}], amsgrad=amsgrad_now)  # as this run's config builds it
        sched = LambdaLR(opt, lambda step: 1.0)
        engine = SimpleNamespace(lr_scheduler=sched, optimizer=SimpleNamespace(
            clip_grad=1.0, loss_scaler=built_scaler, dynamic_loss_scale=built_scaler.dynamic))
        t = SimpleNamespace(cfg=cfg, engine=engine, engine_phase="lowrank", _phase_lr=lambda phase: cfg.lr, world=1,
                            ds={"fp16": new_fp16}, step=6, _event=lambda rec: None, _group_kinds=lambda: ["lora"])
        t._optimizer_as_built = lambda: CheckpointsMixin._optimizer_as_built(t)
        t._use_built_loss_scaler = lambda fresh: CheckpointsMixin._use_built_loss_scaler(t, fresh)
        t._REAPPLIED = CheckpointsMixin._REAPPLIED
        built = t._optimizer_as_built()
        opt.param_groups[0]["amsgrad"] = False  # what load_checkpoint restores
        engine.optimizer.loss_scaler, engine.optimizer.dynamic_loss_scale = restored_scaler, restored_scaler.dynamic
        CheckpointsMixin._apply_optimizer_settings(t, {"train": cfg.to_dict(), "world_size": 1,
                                                       "deepspeed": {"fp16": old_fp16}}, built)
        return engine.optimizer

    def dynamic(scale, **kw):
        s = DynamicLossScaler(init_scale=2.0 ** 16, scale_window=kw.get("window", 1000), min_scale=kw.get("min", 1),
                              delayed_shift=2, consecutive_hysteresis=False, raise_error_at_min_scale=True,
                              dtype=torch.float16)
        s.cur_scale, s.cur_iter, s.last_overflow_iter = scale, 6, 3
        return s

    old = {"enabled": True, "loss_scale": 0}
    # to a static scale: the new one, not the checkpoint's dynamic scaler
    opt = resumed(dynamic(256.0), {"enabled": True, "loss_scale": 64}, old, LossScaler(scale=64))
    assert isinstance(opt.loss_scaler, LossScaler) and opt.loss_scaler.cur_scale == 64 and not opt.dynamic_loss_scale
    # dynamic to dynamic with a new window and minimum: those apply, the scale reached carries over
    fresh = dynamic(2.0 ** 16, window=5, min=32)
    fresh.cur_iter, fresh.last_overflow_iter = 0, -1  # as DeepSpeed builds it (the counters: a mutation trial's find)
    opt = resumed(dynamic(256.0), {**old, "loss_scale_window": 5, "min_loss_scale": 32}, old, fresh)
    s = opt.loss_scaler
    assert (s.scale_window, s.min_scale, s.cur_scale, s.cur_iter, s.last_overflow_iter) == (5, 32, 256.0, 6, 3)
    # a new minimum above the scale reached: the scale rises to it (a mutation keeping 16 went unseen)
    opt = resumed(dynamic(16.0), {**old, "min_loss_scale": 32}, old, dynamic(2.0 ** 16, min=32))
    assert (opt.loss_scaler.min_scale, opt.loss_scaler.cur_scale) == (32, 32)
    # an unchanged fp16 section: the checkpoint's scaler as it was (an exact resume)
    restored = dynamic(256.0)
    assert resumed(restored, old, old, dynamic(2.0 ** 16)).loss_scaler is restored
    with pytest.raises(ValueError, match=r"optimizer.params change what the checkpoint's optimizer restores and keeps: "
                                         r"amsgrad: checkpoint False, now True"):
        resumed(restored, old, old, dynamic(2.0 ** 16), amsgrad_now=True)


def test_an_fp32_source_at_stage_0_in_16_bits_is_named_not_silently_rounded(tmp_path):
    """DeepSpeed's stage-0 16-bit optimizer (mode=full) takes no set-full: the fp32 masters of an fp32 hf_model
    start rounded to 16 bits, which the run says (a review's find: it claimed the source's values). Stubbed:
    no engine is built, and no source file is read."""
    from types import SimpleNamespace

    from relora_ds.engines import EnginesMixin

    fake = SimpleNamespace(cfg=SimpleNamespace(hf_model=str(tmp_path / "src"), warm_start_from=None),
                           ds={"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}, rank=0,
                           engine=SimpleNamespace(zero_optimization_stage=lambda: 0))
    with pytest.warns(RuntimeWarning, match=r"ZeRO stage 0 with bf16/fp16: the fp32 masters start from .*src's "
                                            r"weights rounded to 16 bits"):
        EnginesMixin._source_masters(fake)


def test_each_of_two_ranks_reads_its_share_of_the_global_batch_and_rank_0_alone_warns(tmp_path, monkeypatch):
    """Two ranks built in process (on stubs), micro-batches of 2 and a global batch of 8: each rank's sampler
    takes optimizer steps of the 8 windows (4 on each rank: 2 micro-steps of 2), a step trains 8 x seq_len
    tokens (the predicted ones, tokens_per_s's count), and a recipe's vocab_size that the data's tokenizer
    overrides is named once, by rank 0. Oracles: the recipe's numbers, by hand. A mutation trial's survivors:
    the accumulation steps not divided by the ranks (a step of 16 windows: epochs that end a step early), a
    step's tokens counted with the window's extra token, the vocab_size warning on every rank."""
    import warnings

    from relora_ds.output_dir import unlock_output_dir
    from relora_ds.train_config import ConfigWarning, TrainConfig
    from trainer_utils import in_process_trainer, packed_data_dir

    data = packed_data_dir(tmp_path / "data", 4_000, 400)  # a tokenizer of 512 pieces
    for rank in (0, 1):
        trainer_mod = in_process_trainer(monkeypatch, rank=rank, world=2)
        cfg = TrainConfig(model="debug", seq_len=32, data_dir=str(data), output_dir=str(tmp_path / "run"), rank=4,
                          cycle_length=4, restart_warmup_steps=2, warmup_steps=2, total_steps=12, vocab_size=1000,
                          micro_batch_size=2, global_batch_size=8, eval_every=0, export=False)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            t = trainer_mod.Trainer(cfg)
        t.metrics.close()
        t.close()
        unlock_output_dir(tmp_path / "run")
        assert (t.batches.rank, t.batches.world_size, t.batches.step_samples) == (rank, 2, 8)
        assert t.tokens_per_step == 8 * 32
        vocab = [str(w.message) for w in said if issubclass(w.category, ConfigWarning) and "vocab_size" in str(w.message)]
        assert vocab == ([f"vocab_size=1000 is not used: the tokenizer of data_dir {data} has 512 pieces, which the "
                          "model takes"] if rank == 0 else []), (rank, vocab)


def test_the_trainer_computes_the_grad_norm_only_where_deepspeed_records_none(tmp_path, monkeypatch):
    """DeepSpeed records the gradient norm under ZeRO and under its bf16/fp16 optimizers, not at stage 0 in
    fp32: the trainer computes its own there only (and skips a non-finite step itself: tests/test_trainer_steps.py).
    A mutation trial's survivor computed it at stage 0 in bf16 too, from gradients DeepSpeed's bf16 optimizer
    keeps elsewhere. In process, on stubs; each DeepSpeed config as a file."""
    from relora_ds import ds_machine
    from relora_ds.train_config import TrainConfig
    from trainer_utils import in_process_trainer, packed_data_dir

    monkeypatch.setattr(ds_machine, "cpu_has_native_bf16", lambda: True)  # (else a warning about this CPU)
    trainer_mod = in_process_trainer(monkeypatch)
    data = packed_data_dir(tmp_path / "data", 4_000, 400)
    for name, ds, own in (("fp32_stage0", {"zero_optimization": {"stage": 0}}, True),
                          ("bf16_stage0", {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, False),
                          ("fp32_stage2", {"zero_optimization": {"stage": 2}}, False)):
        (tmp_path / f"{name}.json").write_text(json.dumps(ds))
        cfg = TrainConfig(model="debug", seq_len=32, data_dir=str(data), output_dir=str(tmp_path / name), mode="full",
                          warmup_steps=2, total_steps=12, micro_batch_size=4, global_batch_size=8, eval_every=0,
                          export=False)  # (mode relora refuses bf16 at stage 0)
        t = trainer_mod.Trainer(cfg, str(tmp_path / f"{name}.json"))
        t.metrics.close()
        t.close()
        assert t.own_grad_norm == own, name


def test_mfus_peak_is_the_gpus_half_precision_one_in_bf16_and_fp16_only(tmp_path, monkeypatch):
    """On a GPU the mfu column divides by the table's dense bf16/fp16 peak when the run trains in bf16 or fp16
    (the same peak: tensor cores), none in fp32, and the recipe's peak_tflops wins. A stand-in H100 and CUDA
    accelerator, in process (trainer_utils.in_process_trainer). A mutation trial's survivor: fp16 runs without
    an mfu column."""
    from types import SimpleNamespace

    from relora_ds.train_config import TrainConfig
    from trainer_utils import in_process_trainer, packed_data_dir

    trainer_mod = in_process_trainer(monkeypatch)
    monkeypatch.setattr(trainer_mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trainer_mod.torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(trainer_mod, "get_accelerator", lambda: SimpleNamespace(device_name=lambda: "cuda",
                                                                               is_fp16_supported=lambda: True))
    monkeypatch.setattr(trainer_mod.run_info, "environment", lambda world: {})
    data = packed_data_dir(tmp_path / "data", 4_000, 400)
    for name, ds, recipe_peak, peak in (("fp16", {"fp16": {"enabled": True}}, None, 989.4),
                                        ("bf16", {"bf16": {"enabled": True}}, None, 989.4),
                                        ("fp32", {}, None, None), ("fp32_recipe", {}, 500.0, 500.0)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"zero_optimization": {"stage": 0}, **ds}))
        cfg = TrainConfig(model="debug", seq_len=32, data_dir=str(data), output_dir=str(tmp_path / name), mode="full",
                          warmup_steps=2, total_steps=12, micro_batch_size=4, global_batch_size=8, eval_every=0,
                          export=False, peak_tflops=recipe_peak)
        t = trainer_mod.Trainer(cfg, str(tmp_path / f"{name}.json"))
        t.metrics.close()
        t.close()
        assert t.peak_tflops == peak, name


def test_a_full_rank_run_trains_at_lr_not_warm_start_lr():
    """mode=full has no warm start: TrainConfig says warm_start_lr is ignored, and the full-rank engine's peak lr
    is lr (a mutation audit: dropping the mode check passed every test, and a baseline from a ReLoRA recipe
    would have trained at warm_start_lr)."""
    from types import SimpleNamespace

    from relora_ds.engines import EnginesMixin
    from relora_ds.train_config import TrainConfig

    with pytest.warns(UserWarning, match="warm_start_lr=0.0001 is ignored"):
        cfg = TrainConfig(mode="full", lr=1e-3, warm_start_lr=1e-4, warm_start_steps=0, total_steps=12)
    assert EnginesMixin._phase_lr(SimpleNamespace(cfg=cfg), "full") == 1e-3
