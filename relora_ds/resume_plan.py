"""Planning a resume, before any engine exists: which checkpoint ``--resume`` (or ``--resume-from``) loads, whether
this run may load it (the settings, model, tokenizer and training data it was written with), and how
(directly, or through DeepSpeed's universal checkpoint for another number of ranks, ZeRO stage or engine
layout). Every refusal is a ValueError saying what to do instead.

Writing, pruning and reading checkpoints is ``relora_ds/checkpoint.py``; the load itself ``relora_ds/resume.py``.
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import (OPTIMIZER_GROUPS, check_complete, checkpoint_folders, complete_tags, is_sharded, latest_tag,
                         load_config, tag_step)
from .ds_config import _zero_config, engine_layout, zero_stage


# Settings a resume cannot change: they decide the saved module structure, the phase and reset positions,
# or the data order.
FIXED_ON_RESUME = ("seq_len", "rank", "alpha", "target_modules", "quantize", "warm_start_steps", "seed",
                   "lowrank_schedule", "merge_residual")
# What a checkpoint written before a setting existed ran with.
DEFAULTS_OF_OLDER_CHECKPOINTS = {"lowrank_schedule": "continue", "merge_residual": False}
# The same for the model config's fields from before the Qwen2/Mistral/LLaMA-3 options (head_dim: below).
MODEL_DEFAULTS_OF_OLDER_CHECKPOINTS = {"model_type": "llama", "attention_bias": False, "qkv_bias": False,
                                       "mlp_bias": False, "tie_word_embeddings": False, "rope_scaling": None,
                                       "sliding_window": None, "layer_types": None,
                                       "qk_norm": False}


def _model_with_older_defaults(model: dict) -> dict:
    """A checkpoint's model config with the fields added since it was written, at the values they had then."""
    older = dict(MODEL_DEFAULTS_OF_OLDER_CHECKPOINTS)
    if "hidden_size" in model and "num_attention_heads" in model:
        older["head_dim"] = model["hidden_size"] // model["num_attention_heads"]
    return {**older, **model}


def plan_resume(ckpt_dir: Path, *, model: dict, train: dict, ds: dict, world: int, data_dir: Path,
                tokenizer_sha256: str | None, total_steps: int, data: dict | None = None) -> dict | None:
    """What ``--resume`` will load from ``ckpt_dir`` into a run of ``model`` (its config dict) trained with
    ``train`` (the TrainConfig dict) and DeepSpeed config ``ds`` on ``world`` ranks for ``total_steps`` steps,
    reading ``data_dir`` (tokenized by ``tokenizer_sha256``; None: not known yet, not checked; its training
    split described by ``data``, ``{"fingerprint", "train_tokens", "train_windows"}`` as the trainer records it
    in each checkpoint, see :func:`check_same_data`; None: not checked), checked before any engine exists:
    None without a checkpoint, else ``{"tag", "saved" (its config.json), "universal" (load through
    ds_to_universal), "stages" (saved, now), "layouts" (saved, now: ds_config.engine_layout), "rewind" (the
    later tags ``resume_from`` moves aside: checkpoint.rewind)}``.
    A checkpoint this run cannot load is a ValueError saying what to do instead."""
    ckpt_dir = Path(ckpt_dir)
    tag, rewind = latest_tag(ckpt_dir), []
    if train.get("resume_from"):
        tag, rewind = _resume_point(ckpt_dir, train["resume_from"], tag)
    if tag is None:
        return None
    check_complete(ckpt_dir, tag)
    if tag_step(tag) > total_steps:
        raise ValueError(f"checkpoint {ckpt_dir / tag} is at step {tag_step(tag)}, past this run's total_steps="
                         f"{total_steps}: resume with total_steps of at least {tag_step(tag)} (equal: nothing left "
                         "to train), or go back to an earlier checkpoint with --resume-from step_N")
    saved = load_config(ckpt_dir, tag)
    if saved.get("optimizer_groups") != list(OPTIMIZER_GROUPS):
        raise ValueError(f"checkpoint {ckpt_dir / tag} was written by relora_ds before 2026-12-04, whose optimizer "
                         "kept the norms and biases in one param group with the embeddings and head; this version "
                         "keeps them in a group of their own (no weight decay on them unless "
                         "--decay-norms-and-biases), so DeepSpeed cannot load its optimizer state. Resume it with the "
                         "relora_ds version that wrote it, or start a new run from its export (launch/export.py, "
                         "then --warm-start-from)")
    before = {**DEFAULTS_OF_OLDER_CHECKPOINTS, **saved["train"]}
    fixed = {k: (train[k], before[k]) for k in FIXED_ON_RESUME if k in before and before[k] != train[k]}
    if (train["mode"] == "full") != (saved["train"].get("mode", train["mode"]) == "full"):
        fixed["mode"] = (train["mode"], saved["train"]["mode"])
    if fixed:
        raise ValueError(f"checkpoint {ckpt_dir / tag} was trained with settings a resume cannot change, field "
                         f"(now, checkpoint): {fixed}. Resume with the checkpoint's values, or start a new run "
                         "from its export (launch/export.py, then --warm-start-from or --hf-model)")
    saved_model = _model_with_older_defaults(saved["model"])
    mismatch = {k: (v, saved_model.get(k)) for k, v in model.items() if saved_model.get(k) != v}
    if mismatch:
        source = {k: saved["train"].get(k) for k in ("hf_model", "warm_start_from")
                  if saved["train"].get(k) and saved["train"].get(k) != train.get(k)}
        hint = "".join(f"; its run started from --{k.replace('_', '-')} {v}: pass that again" for k, v in source.items())
        raise ValueError(f"checkpoint {ckpt_dir / tag} is of another model: field (now, checkpoint): {mismatch}{hint}")
    if tokenizer_sha256 is not None and saved.get("tokenizer_sha256") not in (None, tokenizer_sha256):
        raise ValueError(f"checkpoint {ckpt_dir / tag} was trained with tokenizer sha256 "
                         f"{saved['tokenizer_sha256'][:12]}..., but {data_dir} uses "
                         f"{tokenizer_sha256[:12]}...: resume on the data it was trained on")
    if data is not None:
        check_same_data(saved.get("data"), data, ckpt_dir / tag, data_dir, train["seq_len"])
    # Another number of ranks or ZeRO stage: a sharded optimizer state goes through DeepSpeed's universal
    # checkpoint, which DeepSpeed loads into ZeRO-1/2/3 engines only.
    # So does a change of weight precision or of the optimizer's place (offloaded: DeepSpeedCPUAdam, whose
    # param groups and file names differ): DeepSpeed's own loader fails on those, at the first step.
    # A checkpoint without ZeRO goes into a ZeRO engine the same way: relora_ds writes its whole optimizer
    # state in the universal layout itself (make_universal), for ZeRO-1/2 and ZeRO-3 alike.
    stages = (zero_stage(saved["deepspeed"]), zero_stage(ds))
    layouts = (engine_layout(saved["deepspeed"]), engine_layout(ds))
    unsharded_into_zero = stages[0] == 0 and stages[1] != 0
    # ZeRO-3 keeps each rank's fp32 masters and Adam moments in sub-groups of at most sub_group_size elements:
    # DeepSpeed's own load into sub-groups of another size failed at the resume in torch's optimizer load
    # ("loaded state dict contains a parameter group that doesn't match the size of optimizer's group").
    regrouped = stages == (3, 3) and sub_group_size(saved["deepspeed"]) != sub_group_size(ds)
    universal = unsharded_into_zero or \
        (saved["world_size"] != world or layouts[0] != layouts[1] or regrouped) and is_sharded(ckpt_dir, tag)
    if universal and stages[0] != stages[1] and 3 in stages and not unsharded_into_zero:
        raise ValueError(f"checkpoint {ckpt_dir / tag} was written with ZeRO stage {stages[0]}, this run uses "
                         f"stage {stages[1]}: DeepSpeed 0.19's universal checkpoint cannot move a checkpoint "
                         f"between ZeRO-3 and ZeRO-1/2. Resume with a ZeRO-{stages[0]} config (any number of "
                         "ranks), or export it (launch/export.py) and start from it with --warm-start-from")
    if unsharded_into_zero and layouts[0]["precision"] != "fp32":
        raise ValueError(f"checkpoint {ckpt_dir / tag} was written without ZeRO (stage 0) in "
                         f"{layouts[0]['precision']}; this run uses ZeRO stage {stages[1]}. DeepSpeed's "
                         f"{layouts[0]['precision']} optimizer at stage 0 keeps its fp32 masters and Adam moments in "
                         "its own layout, which relora_ds converts only from fp32 runs. Resume it without ZeRO (its "
                         "own --deepspeed config), or export it (launch/export.py) and start from it with "
                         "--warm-start-from")
    if stages == (0, 0) and layouts[0] != layouts[1]:
        then, now = ({k: v for k, v in layout.items() if layouts[0][k] != layouts[1][k]} for layout in layouts)
        raise ValueError(f"checkpoint {ckpt_dir / tag} was written without ZeRO with {then}; this run has {now}. "
                         "A stage-0 checkpoint holds the optimizer's own state, which loads only into the same "
                         "optimizer and precision: resume with the checkpoint's --deepspeed settings, or export "
                         "it (launch/export.py) and start from it with --warm-start-from")
    if universal and stages[1] == 0:
        raise ValueError(f"checkpoint {ckpt_dir / tag} was written by {saved['world_size']} rank(s) with ZeRO "
                         f"stage {stages[0]}; this run has {world} rank(s) and ZeRO stage 0. Its sharded "
                         "optimizer state, loaded through DeepSpeed's universal checkpoint, goes only into a "
                         f"ZeRO-1/2/3 engine: pass --deepspeed with a ZeRO stage (e.g. "
                         f"ds_configs/zero{stages[0] or 2}.json)")
    return {"tag": tag, "saved": saved, "universal": universal, "stages": stages, "layouts": layouts,
            "rewind": rewind}


def sub_group_size(ds: dict) -> int:
    """ZeRO-3's optimizer sub-group size as DeepSpeed reads it (its default when the config has none)."""
    return int(_zero_config(ds, "the DeepSpeed config").sub_group_size)


def nothing_to_resume(ckpt_dir: Path) -> str:
    """The warning of a --resume that finds no checkpoint (the trainer's rank 0, launch/preflight.py). A
    complete checkpoint with no ``latest`` (a run killed between the two, or ``latest`` deleted) is named: this
    run would retrain its steps and replace it when it saves that step."""
    complete = complete_tags(ckpt_dir) if Path(ckpt_dir).is_dir() else []
    if complete:
        return (f"--resume: {ckpt_dir} has no `latest`, so nothing to resume; starting from step 0. It holds "
                f"complete checkpoint(s) {complete[-3:]}: to continue from one instead, stop this run and pass "
                f"--resume-from {complete[-1]}")
    return (f"--resume: no checkpoint in {ckpt_dir}; starting from step 0 (expected at a job's first start; "
            "otherwise check --output-dir)")


def check_same_data(saved: dict | None, now: dict, ckpt: Path, data_dir: Path, seq_len: int) -> None:
    """A checkpoint's sampler position is an index into the epoch order of its own training windows: on data
    prepared again from other inputs or options (another ``train_data_fingerprint`` of the manifest), or with
    another number of windows, it would name other samples, so the resume is refused here, before any engine
    exists. ``saved``/``now``: ``{"fingerprint", "train_tokens", "train_windows"}`` of the checkpoint's data
    and of ``data_dir``; a checkpoint written before they were recorded (``saved`` None) is not checked."""
    if not saved:
        return
    if (saved.get("fingerprint"), saved.get("train_windows")) == (now["fingerprint"], now["train_windows"]):
        return
    count = lambda d: (f"{d['train_tokens']:,} tokens, {d['train_windows']:,} windows"  # noqa: E731
                       if "train_tokens" in d and "train_windows" in d else "size not recorded")
    same = saved.get("train_windows") == now["train_windows"] and saved.get("train_tokens") == now["train_tokens"]
    raise ValueError(
        f"checkpoint {ckpt} was trained on other data than {data_dir} holds now: its training split had "
        f"{count(saved)} of seq_len {seq_len}, now {count(now)}"
        + ("; the same size, but prepared from other inputs or options" if same else "")
        + f" (data fingerprint {str(saved.get('fingerprint'))[:12]}... vs {now['fingerprint'][:12]}..., from the "
        "manifest's recipe and counts). Its sampler position would name other samples. Resume on the data it "
        "was trained on (restore that data dir, or pass --data-dir with a copy of it), or start a new run from "
        "its export (launch/export.py, then --warm-start-from or --hf-model)")


def resume_progress(ckpt_dir: Path, resume_from: str | None) -> dict | None:
    """``{"step", "tokens_seen"}`` of the checkpoint ``--resume`` (``resume_from``) will load, from its
    config.json, before any engine exists; None without a checkpoint. A token-budget run's length depends on
    it once the global batch changes. Checkpoints written before config.json recorded it: their steps at their
    own batch."""
    ckpt_dir = Path(ckpt_dir)
    tag = latest_tag(ckpt_dir)
    if resume_from:
        tag, _ = _resume_point(ckpt_dir, resume_from, tag)
    if tag is None:
        return None
    check_complete(ckpt_dir, tag, files=False)  # plan_resume reads the files' ends
    saved = load_config(ckpt_dir, tag)
    step = tag_step(tag)
    return saved.get("progress") or {
        "step": step, "tokens_seen": step * saved["train"]["global_batch_size"] * saved["train"]["seq_len"]}


def _resume_point(ckpt_dir: Path, resume_from: str, latest: str | None) -> tuple[str, list[str]]:
    """(tag to load, later tags to move aside) for ``--resume-from``. A checkpoint written after the rewind
    by the run that made it (its config says the same resume_from) is that run's progress: a requeued job
    repeating the command line continues from it instead of going back again."""
    step = tag_step(resume_from)
    # First: the rewound run's keep_last may have deleted resume_from since.
    if latest is not None and tag_step(latest) > step and (ckpt_dir / latest / "config.json").is_file() and \
            load_config(ckpt_dir, latest)["train"].get("resume_from") == resume_from:
        return latest, []
    # (a complete tag after `latest` too: its config.json is written once every rank's files are on disk, so
    # only `latest`'s move was lost; the refusal of a damaged `latest` names it as the way out)
    complete = complete_tags(ckpt_dir)
    if resume_from not in complete:
        raise ValueError(f"--resume-from {resume_from}: no complete checkpoint {ckpt_dir / resume_from}; there: "
                         f"{complete or 'none'}")
    later = [p.name for p in checkpoint_folders(ckpt_dir) if tag_step(p.name) > step]
    return resume_from, sorted(later, key=tag_step)
