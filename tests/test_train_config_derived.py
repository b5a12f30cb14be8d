"""What a valid run configuration derives and accepts: the batch arithmetic, a token budget's steps (resumed too),
the closed ends of each range, the documented defaults, the schedule's warnings about resets, paths with a leading
tilde. (Refusals: test_train_config.py.)"""
import json
import warnings

import pytest

from relora_ds.ds_config import complete_ds_config, load_ds_config
from relora_ds.train_args import build_parser, config_from_args
from relora_ds.train_config import TrainConfig
from test_train_config import BASE


def test_batch_arithmetic():
    ds = complete_ds_config({"zero_optimization": {"stage": 2}}, TrainConfig(**BASE), world_size=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 2, 8)
    assert ds["optimizer"]["params"]["lr"] == 1e-3
    with pytest.raises(ValueError, match=r"global_batch_size=8 is not divisible by .* = 6; valid .* multiples of 6"):
        complete_ds_config({}, TrainConfig(**BASE), world_size=3)


def test_shipped_ds_configs_complete_cleanly():
    from launch_utils import ROOT

    shipped = sorted(p.stem for p in (ROOT / "ds_configs").glob("*.json"))
    assert shipped == ["zero1", "zero2", "zero2_fp32", "zero2_offload", "zero3", "zero3_nvme",
                       "zero3_offload"]  # README lists these
    readme = (ROOT / "README.md").read_text()
    for name in shipped:
        assert f"`{name}`" in readme, name
        ds = complete_ds_config(load_ds_config(ROOT / f"ds_configs/{name}.json"), TrainConfig(**BASE), world_size=2)
        assert ds["zero_optimization"]["stage"] == int(name[4])
        assert ("offload_optimizer" in ds["zero_optimization"]) == name.endswith(("offload", "nvme"))
        assert ds["bf16"]["enabled"] == (name != "zero2_fp32")
        json.dumps(ds)


def test_resume_from_implies_resume():
    cfg = TrainConfig(**BASE, resume_from="step_200")
    assert cfg.resume and cfg.resume_from == "step_200"
    args = build_parser().parse_args(["--total-steps", "20", "--cycle-length", "10", "--warmup-steps", "5",
                                      "--resume-from", "step_20"])
    cfg = config_from_args(args)
    assert cfg.resume and cfg.resume_from == "step_20"


def test_boundary_values_are_accepted():
    """The closed ends of each range: a cosine down to 0 or held flat, no pruning or a full reset."""
    for kw in (dict(min_lr_ratio=0.0), dict(min_lr_ratio=1.0), dict(prune_ratio=0.0), dict(prune_ratio=1.0),
               dict(dropout=0.0), dict(warmup_steps=0, restart_warmup_steps=0), dict(grad_clip=0.0),
               dict(merge_every=10), dict(merge_every=1)):
        cfg = TrainConfig(**{**BASE, **kw})
        assert all(getattr(cfg, k) == v for k, v in kw.items())


def test_token_budget_sets_total_steps_rounded_up():
    """total_steps = ceil(token_budget / (global_batch_size x seq_len)): 8 sequences of 4 predicted tokens
    (windows of 5) are 32 tokens per optimizer step."""
    from relora_ds.schedule import total_steps_for

    kw = {**BASE, "total_steps": None, "seq_len": 4}
    assert total_steps_for(TrainConfig(**kw, token_budget=320)) == 10
    assert total_steps_for(TrainConfig(**kw, token_budget=321)) == 11
    assert total_steps_for(TrainConfig(**kw, token_budget=1)) == 1
    assert total_steps_for(TrainConfig(**{**BASE, "seq_len": 4})) == 100  # total_steps given: used as is


def test_a_resumed_token_budget_trains_what_is_left_at_the_new_batch(tmp_path):
    """The checkpoint at step 10 saw 10 x 16 x 64 = 10,240 of 20,480 tokens; resumed at a global batch of 32
    (2,048 tokens a step) the run ends at 10 + 10,240 / 2,048 = 15, not at ceil(20,480 / 2,048) = 10. The
    checkpoint's progress comes from its config.json, or, for one written before it recorded it, from its
    steps at its own batch."""
    import json

    from relora_ds.resume_plan import resume_progress
    from relora_ds.schedule import total_steps_for

    cfg = TrainConfig(**{**BASE, "total_steps": None, "token_budget": 20480, "seq_len": 64,
                         "global_batch_size": 32, "micro_batch_size": 4})
    assert total_steps_for(cfg) == 10
    assert total_steps_for(cfg, {"step": 10, "tokens_seen": 10240}) == 15
    assert total_steps_for(cfg, {"step": 10, "tokens_seen": 10241}) == 15  # a part step still runs
    assert total_steps_for(cfg, {"step": 20, "tokens_seen": 20480}) == 20  # spent: nothing left
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_10").mkdir(parents=True)
    (ckpts / "latest").write_text("step_10")
    saved = {"train": {"global_batch_size": 16, "seq_len": 64}}
    (ckpts / "step_10" / "config.json").write_text(json.dumps(saved))
    assert resume_progress(ckpts, None) == {"step": 10, "tokens_seen": 10240}
    (ckpts / "step_10" / "config.json").write_text(json.dumps({**saved, "progress": {"step": 10, "tokens_seen": 9000}}))
    assert resume_progress(ckpts, "step_10") == {"step": 10, "tokens_seen": 9000}
    assert resume_progress(tmp_path / "none", None) is None


def test_merges_only_at_the_last_step_are_no_online_merges():
    """cycle_length = merge_every = the low-rank phase's 20 steps: the one merge (and reset) comes at the last
    step, so the warning says the run trains as plain LoRA, not that its merges "are never followed by an
    optimizer prune" (the merge at the last step is the reset). Boundary of `merge_every < lowrank`, which a
    mutation audit found could be `<=` with every test passing."""
    import warnings as w

    from relora_ds.startup import build_schedule
    from relora_ds.train_config import ConfigWarning

    kw = {**BASE, "total_steps": 30, "warm_start_steps": 10, "restart_warmup_steps": 3, "warmup_steps": 5,
          "warm_start_lr": 5e-4, "cycle_length": 20, "merge_every": 20}
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        build_schedule(TrainConfig(**kw), 30)
    said = [str(c.message) for c in caught if issubclass(c.category, ConfigWarning)]
    assert any("no ReLoRA reset happens before the last step, so this run trains as plain LoRA" in m for m in said), said
    assert not any("are never followed by an optimizer prune" in m for m in said), said


def test_a_reset_interval_longer_than_the_low_rank_phase_is_named():
    import warnings as w

    from relora_ds.startup import build_schedule
    from relora_ds.train_config import ConfigWarning

    kw = {**BASE, "total_steps": 30, "warm_start_steps": 10, "restart_warmup_steps": 3, "warmup_steps": 5,
          "warm_start_lr": 5e-4}
    with pytest.warns(ConfigWarning, match=r"cycle_length=20 is not shorter than the low-rank phase \(20 steps: "
                                           r"total_steps=30 - warm_start_steps=10\): no ReLoRA reset happens"):
        build_schedule(TrainConfig(**{**kw, "cycle_length": 20}), 30)
    # with online merges it is not plain LoRA (a user trial: the warning advised mode lora, which drops them)
    with pytest.warns(ConfigWarning, match=r"no reset happens before the last step, so the merges every "
                                           r"merge_every=5 steps are never followed by an optimizer prune"):
        build_schedule(TrainConfig(**{**kw, "cycle_length": 20, "merge_every": 5}), 30)
    with w.catch_warnings():
        w.simplefilter("error")
        build_schedule(TrainConfig(**{**kw, "cycle_length": 19}), 30)  # one reset at step 29: no warning
        build_schedule(TrainConfig(**{**kw, "cycle_length": None, "mode": "lora"}), 30)  # lora never resets


def test_a_leading_tilde_in_a_path_is_expanded(tmp_path, monkeypatch):
    """`--output-dir=~/runs/x` (no shell expands that ~) or `output_dir: ~/runs/x` in a recipe: the run went to
    a directory literally named "~" in the working directory (a review's find)."""
    import os

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = TrainConfig(**BASE, output_dir="~/runs/x", data_dir="~/data", warm_start_from="~/hf", warm_start_steps=0)
    assert (cfg.output_dir, cfg.data_dir, cfg.warm_start_from) == tuple(
        os.path.join(str(tmp_path), p) for p in ("runs/x", "data", "hf"))
    # --config=~/... and --deepspeed=~/... too (a README check: they were "no such file")
    from launch_utils import ROOT
    from relora_ds.ds_config import load_ds_config
    from relora_ds.train_args import build_parser, config_from_args

    (tmp_path / "r.yaml").write_text("model: debug\nmode: lora\ntotal_steps: 10\nwarmup_steps: 2\n")
    (tmp_path / "ds.json").write_text((ROOT / "ds_configs" / "zero2.json").read_text())
    assert config_from_args(build_parser().parse_args(["--config=~/r.yaml"])).model == "debug"
    assert load_ds_config("~/ds.json") == load_ds_config(ROOT / "ds_configs" / "zero2.json")


def test_documented_defaults_and_the_smallest_builtin_vocab():
    """Mutations a trial ran that no test saw, each against its source: the Adam defaults are torch's AdamW's
    (the help says AdamW); collective_timeout_min is 60 (README); rank 128 and a 100-step restart warmup are
    the paper's (README, the paper recipes); the defaults train on one rank without gradient accumulation
    (the plain `python launch/train.py` run); a merge_residual with an int8 base is refused; and the built-in
    corpus's vocab can be as small as its tokenizer's 338 pieces, not below (the oracle, SentencePiece's own
    minimum: tests/test_preflight.py)."""
    import inspect

    import torch

    cfg = TrainConfig(cycle_length=1000, total_steps=100)
    adamw = inspect.signature(torch.optim.AdamW).parameters
    assert (cfg.adam_beta1, cfg.adam_beta2) == adamw["betas"].default
    assert cfg.adam_eps == adamw["eps"].default
    assert cfg.collective_timeout_min == 60
    assert (cfg.rank, cfg.restart_warmup_steps) == (128, 100)
    ds = complete_ds_config(load_ds_config(None), cfg, world_size=1)
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["train_micro_batch_size_per_gpu"] == ds["train_batch_size"] == cfg.micro_batch_size

    with pytest.raises(ValueError, match=r"merge_residual is for float bases: quantize=int8 already merges"):
        TrainConfig(**BASE, quantize="int8", merge_residual=True)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TrainConfig(**BASE, vocab_size=338).vocab_size == 338
    with pytest.raises(ValueError, match=r"vocab_size=337 is too small"):
        TrainConfig(**BASE, vocab_size=337)
