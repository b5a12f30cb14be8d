"""resume_plan.plan_resume without an engine, on fabricated checkpoint folders: what --resume would load (directly
or through the universal checkpoint), what it refuses and why (another model, tokenizer, data, fixed
setting, layout), and --resume-from's rewind."""
import json
import re
import shutil

import pytest
import torch


TRAIN = {"mode": "relora", "seq_len": 32, "rank": 4, "alpha": 8.0, "target_modules": ["q_proj"], "quantize": None,
         "warm_start_steps": 2, "seed": 0, "lr": 1e-3, "lowrank_schedule": "continue", "merge_residual": False}


def _fake_checkpoint(ckpt_dir, *, world, stage, sharded, model=None, sha="a" * 64, train=None, data=None):
    tag = ckpt_dir / "step_8"
    tag.mkdir(parents=True)
    (ckpt_dir / "latest").write_text("step_8")
    (tag / "config.json").write_text(json.dumps({"model": model or {"hidden_size": 64}, "world_size": world,
                                                 "deepspeed": {"zero_optimization": {"stage": stage}},
                                                 "tokenizer_sha256": sha, "train": train or TRAIN,
                                                 "optimizer_groups": ["lora", "matrices", "vectors"],
                                                 **({"data": data} if data else {})}))
    if sharded:
        torch.save({}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")  # a whole file (check_complete reads it)


@pytest.mark.parametrize("saved, now, expect", [
    ((2, 2, True), (2, 2), {"universal": False}),                 # same ranks, same stage
    ((2, 2, True), (1, 2), {"universal": True}),                  # fewer ranks: through ds_to_universal
    ((2, 1, True), (4, 2), {"universal": True}),                  # ZeRO-1 -> ZeRO-2 on more ranks
    ((1, 0, False), (1, 0), {"universal": False}),                # no ZeRO, same ranks
    ((2, 0, False), (1, 0), {"universal": False}),                # unsharded: any ranks, no conversion
    ((2, 3, True), (2, 2), "between ZeRO-3 and ZeRO-1/2"),
    ((2, 2, True), (2, 3), "between ZeRO-3 and ZeRO-1/2"),
    ((1, 0, False), (2, 2), {"universal": True}),                 # no ZeRO -> ZeRO: relora_ds writes it universal
    ((2, 0, False), (1, 3), {"universal": True}),                 # ... into ZeRO-3 too
    ((2, 2, True), (1, 0), "only into a ZeRO-1/2/3 engine"),
])
def test_plan_resume_decides_how_to_load_or_says_why_not(tmp_path, saved, now, expect):
    from relora_ds import resume_plan

    _fake_checkpoint(tmp_path, world=saved[0], stage=saved[1], sharded=saved[2])
    kw = dict(model={"hidden_size": 64}, train=TRAIN, ds={"zero_optimization": {"stage": now[1]}}, world=now[0],
              data_dir=tmp_path / "data", total_steps=12, tokenizer_sha256="a" * 64)
    if isinstance(expect, str):
        with pytest.raises(ValueError, match=expect):
            resume_plan.plan_resume(tmp_path, **kw)
    else:
        plan = resume_plan.plan_resume(tmp_path, **kw)
        assert plan["tag"] == "step_8" and plan["universal"] == expect["universal"]
        assert plan["stages"] == (saved[1], now[1])


def test_plan_resume_refuses_another_model_or_tokenizer(tmp_path):
    from relora_ds import resume_plan

    kw = dict(train=TRAIN, ds={"zero_optimization": {"stage": 2}}, world=2, data_dir=tmp_path / "data", total_steps=12)
    assert resume_plan.plan_resume(tmp_path, model={}, tokenizer_sha256="a" * 64, **kw) is None  # nothing saved
    _fake_checkpoint(tmp_path, world=2, stage=2, sharded=True)
    with pytest.raises(ValueError, match=r"another model: field \(now, checkpoint\): \{'hidden_size': \(128, 64\)\}"):
        resume_plan.plan_resume(tmp_path, model={"hidden_size": 128}, tokenizer_sha256="a" * 64, **kw)
    with pytest.raises(ValueError, match=r"tokenizer sha256 aaaaaaaaaaaa\.\.\., but .*data uses bbbbbbbbbbbb"):
        resume_plan.plan_resume(tmp_path, model={"hidden_size": 64}, tokenizer_sha256="b" * 64, **kw)


def test_plan_resume_refuses_a_checkpoint_of_the_older_param_group_layout(tmp_path):
    """Before 2026-12-04 the engines had one param group fewer (the norms and biases shared the embeddings'
    group); such a checkpoint's optimizer state does not fit this version's groups, and DeepSpeed's loader
    would fail inside load_checkpoint: refused before any engine, with the way out. The current layout,
    written by the trainer itself (Trainer._run_config), loads."""
    import json

    from relora_ds import checkpoint, resume_plan

    _fake_checkpoint(tmp_path, world=2, stage=2, sharded=True)
    kw = dict(model={"hidden_size": 64}, train=TRAIN, ds={"zero_optimization": {"stage": 2}}, world=2,
              data_dir=tmp_path / "data", total_steps=12, tokenizer_sha256="a" * 64)
    config = tmp_path / "step_8" / "config.json"
    saved = json.loads(config.read_text())
    assert saved["optimizer_groups"] == list(checkpoint.OPTIMIZER_GROUPS) == ["lora", "matrices", "vectors"]
    assert resume_plan.plan_resume(tmp_path, **kw)["tag"] == "step_8"
    config.write_text(json.dumps({k: v for k, v in saved.items() if k != "optimizer_groups"}))
    with pytest.raises(ValueError, match=r"step_8 was written by relora_ds before 2026-12-04, whose optimizer kept the "
                                         r"norms and biases in one param group .*start a new run from its export"):
        resume_plan.plan_resume(tmp_path, **kw)


def test_plan_resume_loads_another_precision_or_optimizer_place_as_universal(tmp_path):
    """Same ranks and stage, but bf16 instead of fp32 or the optimizer offloaded: DeepSpeed's own loader
    fails on those (other file names, DeepSpeedCPUAdam's param groups), so they go through the universal
    checkpoint too; the plan says which layouts differ."""
    from relora_ds import resume_plan

    _fake_checkpoint(tmp_path, world=2, stage=2, sharded=True)
    kw = dict(model={"hidden_size": 64}, train=TRAIN, world=2, data_dir=tmp_path / "data", total_steps=12,
              tokenizer_sha256="a" * 64)
    for ds, universal in (({"zero_optimization": {"stage": 2}}, False),
                          ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, True),
                          ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, True)):
        plan = resume_plan.plan_resume(tmp_path, ds=ds, **kw)
        assert plan["universal"] is universal, ds
        assert (plan["layouts"][0] != plan["layouts"][1]) is universal


def test_plan_resume_loads_another_optimizer_class_as_universal_and_refuses_it_at_stage_0(tmp_path):
    """torch's AdamW, FusedAdam and DeepSpeedCPUAdam keep other param-group keys: loaded directly into
    another class, the first step failed (KeyError 'bias_correction', found by a review), so a change of
    class goes through the universal checkpoint; a stage-0 checkpoint (the optimizer's own state_dict) cannot
    move to another class or precision and is refused before any engine (it was a KeyError traceback)."""
    from relora_ds import resume_plan

    offload = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    torch_adam = {"type": "AdamW", "params": {"torch_adam": True}}
    _fake_checkpoint(tmp_path / "a", world=2, stage=2, sharded=True)
    config = json.loads((tmp_path / "a" / "step_8" / "config.json").read_text())
    config["deepspeed"] = {"zero_optimization": offload, "optimizer": torch_adam}
    (tmp_path / "a" / "step_8" / "config.json").write_text(json.dumps(config))
    kw = dict(model={"hidden_size": 64}, train=TRAIN, world=2, data_dir=tmp_path / "data", total_steps=12,
              tokenizer_sha256="a" * 64)
    same = resume_plan.plan_resume(tmp_path / "a", ds={"zero_optimization": offload, "optimizer": torch_adam}, **kw)
    assert same["universal"] is False
    plan = resume_plan.plan_resume(tmp_path / "a", ds={"zero_optimization": offload, "optimizer": {"type": "AdamW"}},
                                   **kw)
    assert plan["universal"] is True
    assert (plan["layouts"][0]["optimizer"], plan["layouts"][1]["optimizer"]) == ("AdamW", "DeepSpeedCPUAdam")

    _fake_checkpoint(tmp_path / "b", world=1, stage=0, sharded=False)
    kw["world"] = 1
    for ds, named in (({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, "'precision': 'bf16'"),
                      ({"zero_optimization": {"stage": 0}, "optimizer": {"type": "AdamW"}}, "'optimizer': 'FusedAdam'")):
        with pytest.raises(ValueError, match=rf"written without ZeRO with .*; this run has .*{named}.*loads only "
                                             r"into the same optimizer and precision"):
            resume_plan.plan_resume(tmp_path / "b", ds=ds, **kw)
    assert resume_plan.plan_resume(tmp_path / "b", ds={"zero_optimization": {"stage": 0}}, **kw)["universal"] is False


def test_plan_resume_takes_a_checkpoint_without_zero_into_zero_in_fp32_only(tmp_path):
    """A stage-0 run in bf16 (mode full) kept its fp32 masters and moments in DeepSpeed's bf16 optimizer's own
    layout, which the conversion does not read: refused before any engine, naming the ways out."""
    from relora_ds import resume_plan

    _fake_checkpoint(tmp_path, world=1, stage=0, sharded=False)
    config = json.loads((tmp_path / "step_8" / "config.json").read_text())
    config["deepspeed"]["bf16"] = {"enabled": True}
    (tmp_path / "step_8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"written without ZeRO \(stage 0\) in bf16; this run uses ZeRO stage 2\. .*"
                                         r"converts only from fp32 runs\. Resume it without ZeRO .*--warm-start-from"):
        resume_plan.plan_resume(tmp_path, model={"hidden_size": 64}, train=TRAIN, world=2, data_dir=tmp_path / "data",
                                ds={"zero_optimization": {"stage": 2}}, total_steps=12, tokenizer_sha256="a" * 64)


def test_plan_resume_names_the_hf_model_a_run_started_from(tmp_path):
    from relora_ds import resume_plan

    _fake_checkpoint(tmp_path, world=1, stage=2, sharded=True, train={**TRAIN, "hf_model": "/models/llama"})
    with pytest.raises(ValueError, match=r"another model: .*; its run started from --hf-model /models/llama: pass "
                                         r"that again"):
        resume_plan.plan_resume(tmp_path, model={"hidden_size": 128}, train=TRAIN, ds={"zero_optimization": {"stage": 2}},
                                world=1, data_dir=tmp_path / "data", total_steps=12, tokenizer_sha256="a" * 64)
    # The same --hf-model passed again: no hint to pass it (the model differs for another reason).
    with pytest.raises(ValueError) as e:
        resume_plan.plan_resume(tmp_path, model={"hidden_size": 128}, train={**TRAIN, "hf_model": "/models/llama"},
                                ds={"zero_optimization": {"stage": 2}}, world=1, data_dir=tmp_path / "data",
                                total_steps=12, tokenizer_sha256="a" * 64)
    assert "another model" in str(e.value) and "pass that again" not in str(e.value)


def test_plan_resume_takes_checkpoints_written_before_the_model_families(tmp_path):
    """A checkpoint whose model config has only the fields LlamaConfig had before head_dim, the biases, tied
    embeddings, rope_scaling, sliding_window and model_type (the debug preset as saved then) is today's debug
    preset; the same shape tied is another model."""
    from relora_ds import LlamaConfig, resume_plan

    now = LlamaConfig.preset("debug").to_dict()
    then = {k: now[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                "rms_norm_eps", "rope_theta", "initializer_range", "attn_implementation")}
    _fake_checkpoint(tmp_path, world=1, stage=2, sharded=True, model=then)
    kw = dict(train=TRAIN, ds={"zero_optimization": {"stage": 2}}, world=1, data_dir=tmp_path / "data",
              total_steps=12, tokenizer_sha256="a" * 64)
    assert resume_plan.plan_resume(tmp_path, model=now, **kw)["tag"] == "step_8"
    with pytest.raises(ValueError, match=r"another model: field \(now, checkpoint\): \{'tie_word_embeddings': \(True, False\)\}"):
        resume_plan.plan_resume(tmp_path, model=LlamaConfig.preset("debug", tie_word_embeddings=True).to_dict(), **kw)


def test_plan_resume_refuses_other_training_data(tmp_path):
    """The checkpoint's recorded training data against the data dir's now (fingerprint and windows at the run's
    seq_len): any difference is refused, naming both sizes; a checkpoint without the record, or a caller that
    knows no data yet (data=None), is not checked."""
    from relora_ds import resume_plan

    was = {"fingerprint": "f" * 64, "train_tokens": 4_000, "train_windows": 124}
    _fake_checkpoint(tmp_path, world=2, stage=2, sharded=True, data=was)
    kw = dict(model={"hidden_size": 64}, train=TRAIN, ds={"zero_optimization": {"stage": 2}}, world=2,
              data_dir=tmp_path / "data", total_steps=12, tokenizer_sha256="a" * 64)
    assert resume_plan.plan_resume(tmp_path, data=dict(was), **kw)["tag"] == "step_8"
    assert resume_plan.plan_resume(tmp_path, data=None, **kw)["tag"] == "step_8"
    with pytest.raises(ValueError, match=re.escape(
            f"checkpoint {tmp_path / 'step_8'} was trained on other data than {tmp_path / 'data'} holds now: its "
            "training split had 4,000 tokens, 124 windows of seq_len 32, now 3,000 tokens, 93 windows (data "
            "fingerprint ffffffffffff... vs 000000000000...")):
        resume_plan.plan_resume(tmp_path, data={"fingerprint": "0" * 64, "train_tokens": 3_000, "train_windows": 93}, **kw)
    with pytest.raises(ValueError, match="; the same size, but prepared from other inputs or options"):
        resume_plan.plan_resume(tmp_path, data={**was, "fingerprint": "0" * 64}, **kw)
    # The tokenizer is named first: another tokenizer is other data, but that is the plainer reason.
    with pytest.raises(ValueError, match="tokenizer sha256"):
        resume_plan.plan_resume(tmp_path, data={**was, "fingerprint": "0" * 64}, **{**kw, "tokenizer_sha256": "b" * 64})
    (tmp_path / "old").mkdir()
    _fake_checkpoint(tmp_path / "old", world=2, stage=2, sharded=True)  # written before the record existed
    assert resume_plan.plan_resume(tmp_path / "old", data={**was, "fingerprint": "0" * 64}, **kw)["tag"] == "step_8"


def test_the_training_data_fingerprint_follows_what_decides_the_training_tokens():
    """train_data_fingerprint reads the manifest alone. It changes with the recipe (input files, tokenizer,
    options), the tokenizer's hash and the training split's counts; not with the validation corpus, the
    validation split, the paths (a moved or copied data dir), the timing stats or the creation time."""
    from relora_ds.data.manifest import train_data_fingerprint

    m = {"recipe": {"corpus_fingerprint": "c1", "tokenizer": {"train_bpe": {"vocab_size": 512}}, "val_fraction": 0.01,
                    "max_docs": None, "validation_corpus": {"fingerprint": "v1"}},
         "tokenizer_sha256": "t1", "dtype": "uint16", "created": "2026-01-01T00:00:00+00:00",
         "stats": {"tokenize_seconds": 1.0},
         "splits": {"train": {"path": "/a/train.bin", "tokens": 1000, "documents": 10},
                    "validation": {"path": "/a/validation.bin", "tokens": 50, "documents": 1}}}
    fp = train_data_fingerprint(m)
    assert len(fp) == 64
    same = [{**m, "recipe": {**m["recipe"], "validation_corpus": {"fingerprint": "v2"}}},
            {**m, "splits": {"train": {**m["splits"]["train"], "path": "/b/train.bin"},
                             "validation": {"path": "/b/validation.bin", "tokens": 70, "documents": 2}}},
            {**m, "created": "2027-01-01T00:00:00+00:00", "stats": {"tokenize_seconds": 2.0}}]
    assert all(train_data_fingerprint(x) == fp for x in same)
    other = [{**m, "recipe": {**m["recipe"], "corpus_fingerprint": "c2"}},
             {**m, "recipe": {**m["recipe"], "val_fraction": 0.02}},
             {**m, "recipe": {**m["recipe"], "max_docs": 100}},
             {**m, "tokenizer_sha256": "t2"},
             {**m, "dtype": "uint32"},
             {**m, "splits": {**m["splits"], "train": {**m["splits"]["train"], "tokens": 1001}}},
             {**m, "splits": {**m["splits"], "train": {**m["splits"]["train"], "documents": 11}}}]
    assert len({train_data_fingerprint(x) for x in other} | {fp}) == len(other) + 1


# One changed value for every field of resume_plan.FIXED_ON_RESUME (TRAIN holds the checkpoint's): written out
# here, not read from FIXED_ON_RESUME, so that a field dropped from it fails its case, and a field added to it
# fails test_every_fixed_field_has_a_refusal_case until it gets one.
FIXED_CHANGES = {"seq_len": 64, "rank": 8, "alpha": 16.0, "target_modules": ["v_proj"], "quantize": "int8",
                 "warm_start_steps": 5, "seed": 1, "lowrank_schedule": "restart", "merge_residual": True}


def test_every_fixed_field_has_a_refusal_case():
    from relora_ds import resume_plan

    assert set(FIXED_CHANGES) == set(resume_plan.FIXED_ON_RESUME)
    assert all(FIXED_CHANGES[k] != TRAIN[k] for k in FIXED_CHANGES)


@pytest.mark.parametrize("change, named", [
    *[({k: v}, f"{k!r}: ({v!r}, {TRAIN[k]!r})") for k, v in FIXED_CHANGES.items()],
    ({"mode": "full"}, "'mode': ('full', 'relora')"),
], ids=[*FIXED_CHANGES, "mode"])
def test_plan_resume_refuses_settings_that_shape_the_checkpoint(tmp_path, change, named):
    from relora_ds import resume_plan

    _fake_checkpoint(tmp_path, world=2, stage=2, sharded=True)
    kw = dict(model={"hidden_size": 64}, ds={"zero_optimization": {"stage": 2}}, world=2,
              data_dir=tmp_path / "data", total_steps=12, tokenizer_sha256="a" * 64)
    with pytest.raises(ValueError, match=r"settings a resume cannot change, field \(now, checkpoint\): .*" +
                       re.escape(named)):
        resume_plan.plan_resume(tmp_path, train={**TRAIN, **change}, **kw)
    for free in ({"lr": 5e-4}, {"mode": "lora"}):  # an lr (after a divergence), or no more resets: allowed
        assert resume_plan.plan_resume(tmp_path, train={**TRAIN, **free}, **kw)["tag"] == "step_8"
    # A checkpoint from before lowrank_schedule existed ran `continue`: a recipe now saying `restart` (the
    # paper recipes) must not silently reshape the lr of a run in flight.
    (tmp_path / "old").mkdir()
    _fake_checkpoint(tmp_path / "old", world=2, stage=2, sharded=True,
                     train={k: v for k, v in TRAIN.items() if k != "lowrank_schedule"})
    assert resume_plan.plan_resume(tmp_path / "old", train=TRAIN, **kw)["tag"] == "step_8"
    with pytest.raises(ValueError, match=r"'lowrank_schedule': \('restart', 'continue'\)"):
        resume_plan.plan_resume(tmp_path / "old", train={**TRAIN, "lowrank_schedule": "restart"}, **kw)


def test_a_checkpoint_past_total_steps_is_refused(tmp_path):
    from relora_ds import resume_plan

    _fake_checkpoint(tmp_path, world=2, stage=2, sharded=True)
    kw = dict(model={"hidden_size": 64}, train=TRAIN, ds={"zero_optimization": {"stage": 2}}, world=2,
              data_dir=tmp_path / "data", tokenizer_sha256="a" * 64)
    assert resume_plan.plan_resume(tmp_path, total_steps=8, **kw)["tag"] == "step_8"  # equal: nothing to train
    with pytest.raises(ValueError, match=r"step_8 is at step 8, past this run's total_steps=7: resume with "
                                         r"total_steps of at least 8"):
        resume_plan.plan_resume(tmp_path, total_steps=7, **kw)


def _tag(ckpt_dir, step, train=TRAIN):
    (ckpt_dir / f"step_{step}").mkdir(exist_ok=True)
    (ckpt_dir / f"step_{step}" / "config.json").write_text(json.dumps(
        {"model": {"hidden_size": 64}, "world_size": 2, "deepspeed": {"zero_optimization": {"stage": 2}},
         "tokenizer_sha256": "a" * 64, "train": train, "optimizer_groups": ["lora", "matrices", "vectors"]}))


def test_resume_from_picks_the_tag_moves_later_ones_aside_once(tmp_path):
    """plan_resume with resume_from: that tag, and the later ones to move aside; once a checkpoint of the rewound
    run exists (its config names the same resume_from), the latest again (a requeued job). rewind() moves them
    under rewound/ (a second rewind past the same step keeps both) and points latest at the tag."""
    from relora_ds import checkpoint, resume_plan

    for step in (4, 8, 12):
        _tag(tmp_path, step)
    _tag(tmp_path, 14)  # a save that died after its config.json (every rank's files written), before `latest` moved
    (tmp_path / "step_16").mkdir()  # a save that crashed earlier: no config.json
    (tmp_path / "latest").write_text("step_12")
    kw = dict(model={"hidden_size": 64}, ds={"zero_optimization": {"stage": 2}}, world=2,
              data_dir=tmp_path / "data", tokenizer_sha256="a" * 64, total_steps=12)
    back = {**TRAIN, "resume_from": "step_4"}
    plan = resume_plan.plan_resume(tmp_path, train=back, **kw)
    assert plan["tag"] == "step_4" and plan["rewind"] == ["step_8", "step_12", "step_14", "step_16"]
    for bad in ("step_6", "step_16"):
        with pytest.raises(ValueError, match=rf"--resume-from {bad}: no complete checkpoint .*{bad}; there: "
                                             r"\['step_4', 'step_8', 'step_12', 'step_14'\]"):
            resume_plan.plan_resume(tmp_path, train={**TRAIN, "resume_from": bad}, **kw)
    # step_14 is complete (a review: a damaged `latest`'s refusal named it as the way out, and --resume-from
    # refused it): it loads, the crashed step_16 moved aside.
    past = resume_plan.plan_resume(tmp_path, train={**TRAIN, "resume_from": "step_14"}, **{**kw, "total_steps": 16})
    assert past["tag"] == "step_14" and past["rewind"] == ["step_16"]
    # A crash after the first move: latest already names step_4, and the next --resume-from moves the rest.
    checkpoint.rewind(tmp_path, "step_4", plan["rewind"][:1])
    assert checkpoint.latest_tag(tmp_path) == "step_4"
    assert resume_plan.plan_resume(tmp_path, train=TRAIN, **kw)["tag"] == "step_4"  # a plain --resume loads it
    plan = resume_plan.plan_resume(tmp_path, train=back, **kw)
    assert plan["tag"] == "step_4" and plan["rewind"] == ["step_12", "step_14", "step_16"]
    moved = checkpoint.rewind(tmp_path, "step_4", plan["rewind"])
    assert [p.relative_to(tmp_path).as_posix() for p in moved] == ["rewound/step_12", "rewound/step_14",
                                                                    "rewound/step_16"]
    assert checkpoint.latest_tag(tmp_path) == "step_4" and checkpoint.complete_tags(tmp_path) == ["step_4"]
    assert resume_plan.plan_resume(tmp_path, train=back, **kw) == {**plan, "rewind": []}  # nothing left to move
    # The rewound run saves step_8 (its config records resume_from): the same command continues from it.
    _tag(tmp_path, 8, train=back)
    (tmp_path / "latest").write_text("step_8")
    plan = resume_plan.plan_resume(tmp_path, train=back, **kw)
    assert plan["tag"] == "step_8" and plan["rewind"] == []
    shutil.copytree(tmp_path / "step_4", tmp_path / "kept_4")  # keep_last deleted the rewind point: still so
    shutil.rmtree(tmp_path / "step_4")
    assert resume_plan.plan_resume(tmp_path, train=back, **kw) == plan
    (tmp_path / "kept_4").rename(tmp_path / "step_4")
    # Going back to step_4 again with another command (a plain run's config, e.g. a new resume_from) moves
    # the new step_8 beside the old one.
    again = resume_plan.plan_resume(tmp_path, train={**TRAIN, "resume_from": "step_8"}, **kw)
    assert again["tag"] == "step_8" and again["rewind"] == []
    (tmp_path / "step_8" / "config.json").write_text(json.dumps(
        {"model": {"hidden_size": 64}, "world_size": 2, "deepspeed": {"zero_optimization": {"stage": 2}},
         "tokenizer_sha256": "a" * 64, "train": TRAIN}))
    plan = resume_plan.plan_resume(tmp_path, train=back, **kw)
    assert plan["tag"] == "step_4" and plan["rewind"] == ["step_8"]
    checkpoint.rewind(tmp_path, "step_4", plan["rewind"])
    assert sorted(p.name for p in (tmp_path / "rewound").iterdir()) == ["step_12", "step_14", "step_16", "step_8",
                                                                        "step_8.1"]


# Cases a mutation trial of the checkpoint/resume modules found unpinned (each checked to fail with its mutant).

def _plan_kw(tmp_path, **over):
    return {**dict(model={"hidden_size": 64}, train=TRAIN, ds={"zero_optimization": {"stage": 2}}, world=2,
                   data_dir=tmp_path / "data", total_steps=12, tokenizer_sha256="a" * 64), **over}


def test_plan_resume_refuses_a_checkpoint_with_a_shard_cut_short(tmp_path):
    """plan_resume itself reads the files' ends (check_complete): a shard cut short in half (a disk that filled
    mid-write) is refused before any engine, naming the file, not left to torch inside DeepSpeed's load."""
    from relora_ds import resume_plan

    _fake_checkpoint(tmp_path, world=2, stage=2, sharded=True)
    shard = tmp_path / "step_8" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    whole = shard.read_bytes()
    assert resume_plan.plan_resume(tmp_path, **_plan_kw(tmp_path))["tag"] == "step_8"
    shard.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"step_8 \(the one to resume from\) has 1 damaged file\(s\), cut short: "
                                         r"zero_pp_rank_0_mp_rank_00_optim_states.pt; complete checkpoints in .*: "
                                         r"none: start over with --overwrite"):
        resume_plan.plan_resume(tmp_path, **_plan_kw(tmp_path))


def test_the_defaults_of_older_checkpoints_fill_only_what_a_checkpoint_lacks(tmp_path):
    """DEFAULTS_OF_OLDER_CHECKPOINTS stand in for a setting the checkpoint does not record, never over one it
    does: a checkpoint of a `restart` run with merge_residual resumes with the same settings, and is refused
    with `continue` (the refusal names the checkpoint's own value)."""
    from relora_ds import resume_plan

    saved = {**TRAIN, "lowrank_schedule": "restart", "merge_residual": True}
    _fake_checkpoint(tmp_path, world=2, stage=2, sharded=True, train=saved)
    assert resume_plan.plan_resume(tmp_path, **_plan_kw(tmp_path, train=saved))["tag"] == "step_8"
    with pytest.raises(ValueError, match=r"'lowrank_schedule': \('continue', 'restart'\)"):
        resume_plan.plan_resume(tmp_path, **_plan_kw(tmp_path, train={**saved, "lowrank_schedule": "continue"}))


def test_an_older_model_config_gets_the_defaults_of_its_time_for_missing_fields_only(tmp_path):
    """A checkpoint's model config without head_dim had head_dim = hidden_size / num_attention_heads (64 / 4 = 16
    here, with 2 key-value heads: not 64 / 2); the fields it does record (a Qwen2 model with tied embeddings)
    are its own, not the older defaults; a field the run has that the checkpoint neither records nor has a
    default for is a mismatch, not passed over."""
    from relora_ds import resume_plan

    saved = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "model_type": "qwen2",
             "tie_word_embeddings": True, "qkv_bias": True}
    _fake_checkpoint(tmp_path, world=2, stage=2, sharded=True, model=saved)
    now = {**saved, "head_dim": 16, "attention_bias": False, "rope_scaling": None}
    assert resume_plan.plan_resume(tmp_path, **_plan_kw(tmp_path, model=now))["tag"] == "step_8"
    with pytest.raises(ValueError, match=r"another model: field \(now, checkpoint\): \{'head_dim': \(32, 16\)\}"):
        resume_plan.plan_resume(tmp_path, **_plan_kw(tmp_path, model={**now, "head_dim": 32}))
    with pytest.raises(ValueError, match=r"another model: field \(now, checkpoint\): \{'num_hidden_layers': \(2, None\)\}"):
        resume_plan.plan_resume(tmp_path, **_plan_kw(tmp_path, model={**now, "num_hidden_layers": 2}))


def test_a_tokenizer_not_known_yet_is_not_checked(tmp_path):
    """tokenizer_sha256=None (the caller does not know the data's tokenizer yet) skips the check; a checkpoint
    that recorded none is not refused for it either."""
    from relora_ds import resume_plan

    _fake_checkpoint(tmp_path / "a", world=2, stage=2, sharded=True)
    assert resume_plan.plan_resume(tmp_path / "a", **_plan_kw(tmp_path, tokenizer_sha256=None))["tag"] == "step_8"
    _fake_checkpoint(tmp_path / "b", world=2, stage=2, sharded=True, sha=None)
    assert resume_plan.plan_resume(tmp_path / "b", **_plan_kw(tmp_path))["tag"] == "step_8"


def test_check_same_data_compares_the_window_count_too_and_says_same_size_only_when_it_is():
    """The sampler's position indexes windows: the same fingerprint with another window count is other data;
    "the same size" is said only when both the tokens and the windows agree."""
    from pathlib import Path

    from relora_ds.resume_plan import check_same_data

    was = {"fingerprint": "f" * 64, "train_tokens": 4_000, "train_windows": 124}
    check_same_data(was, dict(was), Path("ckpt"), Path("data"), 32)
    with pytest.raises(ValueError, match=r"now 4,000 tokens, 93 windows \(data fingerprint"):
        check_same_data(was, {**was, "train_windows": 93}, Path("ckpt"), Path("data"), 32)
    with pytest.raises(ValueError) as e:
        check_same_data(was, {**was, "fingerprint": "0" * 64, "train_tokens": 4_001}, Path("ckpt"), Path("data"), 32)
    assert "the same size" not in str(e.value) and "now 4,001 tokens, 124 windows" in str(e.value)


def test_resume_from_goes_back_even_when_latest_names_a_folder_deleted_by_hand(tmp_path):
    """--resume-from step_4 where `latest` names step_12, deleted by hand: step_4 is complete and the way back
    (the later step_8 moved aside), not a FileNotFoundError reading step_12's config."""
    from relora_ds import resume_plan

    for step in (4, 8):
        _tag(tmp_path, step)
    (tmp_path / "latest").write_text("step_12")
    plan = resume_plan.plan_resume(tmp_path, **_plan_kw(tmp_path, train={**TRAIN, "resume_from": "step_4"}))
    assert plan["tag"] == "step_4" and plan["rewind"] == ["step_8"]


def test_resume_progress_reads_the_checkpoint_resume_from_names(tmp_path):
    """resume_progress with --resume-from: the progress of that checkpoint (step_4: 4 steps, 3,000 tokens), not
    of `latest` (step_10)."""
    import json

    from relora_ds.resume_plan import resume_progress

    for step, tokens in ((4, 3_000), (10, 9_000)):
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / "config.json").write_text(json.dumps(
            {"train": TRAIN, "progress": {"step": step, "tokens_seen": tokens}}))
    (tmp_path / "latest").write_text("step_10")
    assert resume_progress(tmp_path, None) == {"step": 10, "tokens_seen": 9_000}
    assert resume_progress(tmp_path, "step_4") == {"step": 4, "tokens_seen": 3_000}


def test_folders_not_named_step_n_are_not_the_runs_to_count_resume_from_move_or_delete(tmp_path):
    """From a helper's reading: a user's copy `cp -r step_8 step_8_backup` (complete) and a `step_2_old`
    folder without config.json sat beside the run's checkpoints. Every later save's prune raised "not of the
    form step_N" (the run crashed after moving latest), resume planning raised it too, and a prune would have
    deleted `step_2_old` as a crashed save. Oracle, by hand: only step_N folders are checkpoints; the other two
    are left as they are by prune, plain resume and --resume-from."""
    from relora_ds import checkpoint, resume_plan

    for step in (4, 8, 12):
        _tag(tmp_path, step)
    _tag(tmp_path, 8)
    (tmp_path / "step_8").rename(tmp_path / "step_8_backup")
    _tag(tmp_path, 8)
    (tmp_path / "step_2_old").mkdir()
    (tmp_path / "step_2_old" / "notes.txt").write_text("mine")
    (tmp_path / "latest").write_text("step_12")
    assert checkpoint.complete_tags(tmp_path) == ["step_4", "step_8", "step_12"]
    kw = dict(model={"hidden_size": 64}, ds={"zero_optimization": {"stage": 2}}, world=2,
              data_dir=tmp_path / "data", tokenizer_sha256="a" * 64, total_steps=12)
    assert resume_plan.plan_resume(tmp_path, train=TRAIN, **kw)["tag"] == "step_12"
    plan = resume_plan.plan_resume(tmp_path, train={**TRAIN, "resume_from": "step_4"}, **kw)
    assert plan["tag"] == "step_4" and plan["rewind"] == ["step_8", "step_12"]
    checkpoint._prune_old(tmp_path, keep_last=1, keep="step_12")
    assert {p.name for p in tmp_path.iterdir()} == {"step_12", "step_8_backup", "step_2_old", "latest"}
    assert (tmp_path / "step_2_old" / "notes.txt").read_text() == "mine"


def test_a_resume_with_nothing_to_load_names_complete_checkpoints_without_latest(tmp_path):
    """A review: a complete checkpoint without `latest` (a run killed between writing its config.json and moving
    `latest`) made --resume say "no checkpoint" and start from step 0, later replacing it. The warning names it
    and the --resume-from that continues from it; a folder without config.json (a save cut short) is not named."""
    from relora_ds.resume_plan import nothing_to_resume

    assert "no checkpoint in" in nothing_to_resume(tmp_path / "checkpoints")  # not made yet
    for step, complete in ((4, True), (8, True), (12, False)):
        (tmp_path / f"step_{step}").mkdir()
        if complete:
            (tmp_path / f"step_{step}" / "config.json").write_text("{}")
    assert nothing_to_resume(tmp_path) == (f"--resume: {tmp_path} has no `latest`, so nothing to resume; starting "
                                           "from step 0. It holds complete checkpoint(s) ['step_4', 'step_8']: to "
                                           "continue from one instead, stop this run and pass --resume-from step_8")
