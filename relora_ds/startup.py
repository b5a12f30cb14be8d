"""Start-up checks shared by the trainer and launch/preflight.py: what would fail every rank, checked before
any engine exists (ValueError naming the problem)."""
from __future__ import annotations

import functools
import os
import shlex
import warnings
from pathlib import Path

import relora_kernels
import torch

from .compiling import compile_problem
from .data import check_tokenizer_matches
from .data.manifest import document_ends_problem, tokenizer_sha256, train_data_fingerprint
from .data.tokenizer import tokenizer_difference
from .data.mixture import evaluation_windows, split_windows, starved_members
from .data.packed import num_windows
from .hf import load_hf_config
from .model import LlamaForCausalLM
from .model_config import LlamaConfig
from .relora import wrap
from .schedule import cosine_with_warmup, jagged_cosine, restarted_at
from .train_config import ConfigWarning, TrainConfig


def model_config_for(cfg: TrainConfig, vocab_size: int) -> LlamaConfig:
    """The run's model: a Hugging Face directory's (hf_model / warm_start_from), else the preset."""
    source = cfg.hf_model or cfg.warm_start_from
    if source:
        try:
            return load_hf_config(source)
        except ValueError as e:
            if cfg.resume and not Path(source).exists():  # the checkpoint holds the weights, not the shape
                flag = "--hf-model" if cfg.hf_model else "--warm-start-from"
                raise ValueError(f"{e}. A resumed run reads its model's architecture and tokenizer from {flag} "
                                 f"{source} as its first start did (the checkpoint holds the weights): restore "
                                 "that directory") from None
            raise
    return LlamaConfig.preset(cfg.model, vocab_size=vocab_size, max_position_embeddings=cfg.seq_len + 1)


def check_model_and_data(cfg: TrainConfig, data_dir: str | Path | None,
                         vocab_size: int) -> tuple[LlamaConfig, dict | None]:
    """(model config, data manifest or None without data_dir): preset or HF directory, tokenizer vs model
    vocab, and the ReLoRA layers: ``wrap`` runs on a meta-device copy of the model (0.1-0.2 s for 7b), so a
    bad target name, a rank above a layer's size or a bad dropout fails here, not at the switch after the
    warm start."""
    model_config = model_config_for(cfg, vocab_size)
    source = cfg.hf_model or cfg.warm_start_from
    manifest = None
    if data_dir is not None:
        manifest = check_tokenizer_matches(data_dir, None if source else model_config.vocab_size)
    if source and manifest is not None:
        own_tokenizer = check_model_tokenizer(source, manifest, data_dir)
        if model_config.vocab_size < manifest["vocab_size"] and own_tokenizer:
            raise ValueError(f"the model in {source} has {model_config.vocab_size} embedding rows, fewer than the "
                             f"{manifest['vocab_size']} ids of its own tokenizer (which {data_dir} was prepared "
                             "with): the model directory is inconsistent. Give it an embedding row per id (e.g. "
                             f"transformers' model.resize_token_embeddings({manifest['vocab_size']}), then "
                             "save_pretrained), or use the tokenizer it was trained with")
        if model_config.vocab_size < manifest["vocab_size"]:
            raise ValueError(f"the model in {source} has {model_config.vocab_size} embedding rows, fewer than the "
                             f"{manifest['vocab_size']} pieces of the tokenizer {data_dir} was prepared with: prepare "
                             "the data with the model's own tokenizer (launch/prepare_data.py --tokenizer "
                             f"{shlex.quote(str(source))})")
    if source and cfg.seq_len > model_config.max_position_embeddings:
        warnings.warn(f"seq_len={cfg.seq_len} is longer than the max_position_embeddings="
                      f"{model_config.max_position_embeddings} of the model in {source}: it trains on positions "
                      "it was not built for (the export keeps the model's own limit)", ConfigWarning, stacklevel=3)
    layers = cfg.activation_checkpointing_layers
    if cfg.activation_checkpointing and layers is not None and layers > model_config.num_hidden_layers:
        raise ValueError(f"activation_checkpointing_layers={layers} is more than the model's "
                         f"{model_config.num_hidden_layers} decoder layers; give at most "
                         f"{model_config.num_hidden_layers}, or leave it unset to recompute every layer")
    if cfg.mode != "full":
        meta_model(cfg, model_config)
    return model_config, manifest


def meta_model(cfg: TrainConfig, model_config: LlamaConfig) -> LlamaForCausalLM:
    """The run's model on the meta device (no memory, no init), wrapped as the trainer wraps it for its
    low-rank phase (mode relora/lora): what the start-up checks validate and count."""
    with torch.device("meta"):
        model = LlamaForCausalLM(model_config)
        if cfg.mode != "full":
            wrap(model, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules,
                 seed=cfg.seed, quantize=cfg.quantize, merge_residual=cfg.merge_residual)
    return model


def check_model_tokenizer(source: str | Path, manifest: dict, data_dir: str | Path) -> bool:
    """A Hugging Face model must train on token ids from its own tokenizer: compare its tokenizer (the file
    of the kind the data was prepared with: ``tokenizer.model`` or ``tokenizer.json``) with the data's. Equal
    vocab sizes prove nothing (prepare_data trains its own 32000-piece BPE by default, LLaMA has 32000).
    Where the model holds only the other kind (a relora_ds export re-saved by transformers keeps only its
    tokenizer.json), the .model converted as an export converts it must equal the json.
    Returns whether the data's tokenizer is the model's (False: the model holds none, with a warning)."""
    from .hf_tokenizer import converted_difference

    data_tokenizer = Path(manifest["tokenizer_path"])
    own = Path(source) / data_tokenizer.name
    if not own.is_file():
        other = Path(source) / ("tokenizer.model" if data_tokenizer.suffix == ".json" else "tokenizer.json")
        if other.is_file():
            sp_model, as_json = (other, data_tokenizer) if other.suffix == ".model" else (data_tokenizer, other)
            difference = converted_difference(sp_model, as_json)
            if difference is None:
                return True
            raise ValueError(f"{data_dir} was prepared with a {data_tokenizer.name}, {source} holds only a "
                             f"{other.name}, and they are different tokenizers ({difference}): the model's token "
                             f"ids would mean other pieces. Prepare the data with the model's own tokenizer "
                             f"(launch/prepare_data.py --tokenizer {shlex.quote(str(source))})")
        warnings.warn(f"{source} has no tokenizer.model or tokenizer.json, so relora_ds cannot check that "
                      f"{data_dir} was tokenized with this model's tokenizer; if it was not, every token id means "
                      "another piece to the model (prepare the data with launch/prepare_data.py --tokenizer "
                      "<the model's tokenizer>)", ConfigWarning, stacklevel=3)
        return False
    difference = tokenizer_difference(own, data_tokenizer)
    if difference is not None:
        raise ValueError(f"{own} (sha256 {tokenizer_sha256(own)[:12]}...) is not the tokenizer {data_dir} was "
                         f"prepared with (sha256 {manifest['tokenizer_sha256'][:12]}...; {difference}): its token "
                         f"ids would mean other things to the model. Prepare the data with launch/prepare_data.py "
                         f"--tokenizer {source}")
    return True


def unused_vocab_size(cfg: TrainConfig, data_vocab: int) -> str | None:
    """Why the recipe's ``vocab_size`` does not size the model (a Hugging Face model brings its own, a data
    dir's tokenizer sets it), or None where it does or is unset: the trainer and preflight warn with it."""
    if cfg.vocab_size in (None, data_vocab):
        return None
    source = cfg.hf_model or cfg.warm_start_from
    if source:
        return f"vocab_size={cfg.vocab_size} is not used: the model in {source} brings its own vocabulary"
    if cfg.data_dir is not None:
        return (f"vocab_size={cfg.vocab_size} is not used: the tokenizer of data_dir {cfg.data_dir} has "
                f"{data_vocab} pieces, which the model takes")
    return None


def build_schedule(cfg: TrainConfig, total_steps: int, cycle_start: int | None = None):
    """The run's LR multiplier as a function of the global step (0-based): a bad combination of the schedule
    settings is a ValueError here (all of them, TrainConfig.check_schedule), before any engine exists.
    ``cycle_start``: the reset the cycles count from (schedule.cycle_anchor; default: the switch to ReLoRA),
    which a resume gives: its checkpoint's (or the switch, where it found none)."""
    start = cfg.warm_start_steps
    anchor = start if cycle_start is None else cycle_start
    cfg.check_schedule(total_steps, cycle_start=anchor)
    kw = dict(total_steps=total_steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio)
    if cfg.mode == "full":
        schedule = functools.partial(cosine_with_warmup, **kw)
    else:
        # lora: one "cycle" spanning the run, so the only LR drop is at the warm-start switch (if any)
        cycle = cfg.cycle_length if cfg.mode == "relora" else total_steps
        jagged = functools.partial(jagged_cosine, cycle_length=cycle,
                                   restart_warmup_steps=min(cfg.restart_warmup_steps, cycle), **kw)
        if cfg.lowrank_schedule == "restart" and start:
            schedule = functools.partial(restarted_at, start_step=start,
                                         first=functools.partial(cosine_with_warmup, **kw),
                                         second=functools.partial(jagged, total_steps=total_steps - start,
                                                                  cycle_start=anchor - start))
        else:
            schedule = functools.partial(jagged, start_step=start, cycle_start=anchor)
    for step in (0, start):  # the functions' own checks, which check_schedule has named in recipe terms
        schedule(step)
    return schedule


def apply_kernels_setting(kernels: str | None) -> None:
    """``--kernels`` / the recipe's ``kernels`` becomes RELORA_KERNELS, which relora_kernels reads at every
    call. Both given and different is an error naming both: no value is silently preferred. Every kernel
    switch in the environment is parsed here: an invalid one fails before any rank starts work."""
    relora_kernels.check_environment()
    if kernels is None:
        return
    env = os.environ.get("RELORA_KERNELS", "").strip().lower()
    if env and env != kernels:
        raise ValueError(f"kernels={kernels!r} (recipe or --kernels) but RELORA_KERNELS={env!r} in the environment; "
                         "set only one of them")
    os.environ["RELORA_KERNELS"] = kernels


def check_kernels(cfg: TrainConfig, cuda: bool) -> None:
    """RELORA_KERNELS=triton on a machine without CUDA (and without Triton's interpreter) would fail only
    at the first ReLoRA layer, after the whole warm start: fail now."""
    if cfg.mode != "full" and relora_kernels.kernel_mode() == "triton" and not cuda \
            and not relora_kernels.interpret_env():
        raise ValueError("kernels=triton (recipe, --kernels or RELORA_KERNELS) needs CUDA tensors, and this run "
                         "has no GPU (or set TRITON_INTERPRET=1 for Triton's CPU interpreter, for tests): use "
                         "kernels auto, torch or reference")


def check_compile(cfg: TrainConfig, cuda: bool) -> None:
    """--compile where torch.compile cannot build code, or with a backend torch does not have, would fail at
    the first step, after the data and the engine: fail now."""
    if not cfg.compile:
        return
    if problem := compile_problem(cuda, cfg.compile_backend):
        raise ValueError(f"compile: {problem}; or train without --compile")


def check_document_masking(cfg: TrainConfig, manifest: dict, data_dir: str | Path) -> None:
    """--document-masking needs data whose EOS id ends documents and nothing else (data.manifest)."""
    if cfg.document_masking and (problem := document_ends_problem(manifest, data_dir)):
        raise ValueError(f"document_masking: {problem}; train without --document-masking, or prepare the data "
                         "with a tokenizer whose EOS is its own token")


def train_data_record(manifest: dict, seq_len: int) -> dict:
    """What each checkpoint records of its training data and ``--resume`` compares before any engine exists
    (:func:`relora_ds.resume_plan.check_same_data`): the manifest's fingerprint of the training split
    (:func:`relora_ds.data.manifest.train_data_fingerprint`, no token file read), its tokens, and its windows
    at ``seq_len``."""
    train = manifest["splits"]["train"]
    return {"fingerprint": train_data_fingerprint(manifest), "train_tokens": int(train["tokens"]),
            "train_windows": split_windows(train, seq_len)}


def _tokens(n: int) -> str:
    return f"{n:,} token{'' if n == 1 else 's'}"


def check_data_use(cfg: TrainConfig, total_steps: int, splits: dict, data: str, world: int = 1) -> None:
    """The run's data use, from the token counts of the data dir's manifest (``splits``: its ``splits``
    entry) at ``world`` ranks, before any engine exists. A training split without one window of
    ``seq_len + 1`` tokens, or with fewer windows than one optimizer step's global batch, and validation
    that cannot run are errors naming the numbers and the flags that fix them; reading the data many times
    over, or fewer validation windows than asked for, is a named warning (e.g. a paper recipe left on the
    built-in demo corpus)."""
    seq, need = cfg.seq_len, cfg.seq_len + 1
    short = {split: [f"{m['path']} ({_tokens(m['tokens'])})" for m in splits[split].get("members", [])
                     if num_windows(m["tokens"], seq) == 0] for split in ("train", "validation")}
    if short["train"]:  # a mixture's members, each
        raise ValueError(f"mixture {data}: the train split of member(s) {', '.join(short['train'])} holds fewer "
                         f"tokens than one window of --seq-len {seq} needs (seq_len + 1 = {need:,}): use a smaller "
                         "--seq-len, or make the mixture without them (launch/prepare_data.py --mix)")
    if starved := starved_members(splits["train"], seq):
        raise ValueError(f"mixture {data}: in its train split, member(s) {', '.join(starved)} get no window of "
                         f"the {split_windows(splits['train'], seq):,} of an epoch at --seq-len {seq}: make the "
                         "mixture with larger weights for them, or without them")
    if cfg.eval_every and short["validation"] and split_windows(splits["validation"], seq):
        warnings.warn(f"mixture {data}: the validation split of member(s) {', '.join(short['validation'])} holds "
                      f"fewer tokens than one window of --seq-len {seq} needs (seq_len + 1 = {need:,}), so evaluation "
                      "leaves them out: val_loss is the mixture of the other members (their weights renormalized); "
                      "prepare them with a larger --val-fraction (launch/prepare_data.py) to evaluate them too",
                      ConfigWarning, stacklevel=2)
    train_tokens = int(splits["train"]["tokens"])
    train_windows = split_windows(splits["train"], seq)
    if train_windows == 0:
        raise ValueError(f"the training split of {data} holds {_tokens(train_tokens)}, fewer than one window of "
                         f"--seq-len {seq} needs (seq_len + 1 = {need:,} tokens): use a smaller --seq-len, or "
                         "prepare more data (launch/prepare_data.py)")
    if train_windows < cfg.global_batch_size:
        per_step = cfg.micro_batch_size * world  # the global batch is a multiple of this
        smaller = (f"a --global-batch-size of at most {train_windows // per_step * per_step} (a multiple of "
                   f"--micro-batch-size {cfg.micro_batch_size} x {world} rank(s))" if train_windows >= per_step else
                   f"a smaller --micro-batch-size and --global-batch-size (one micro-batch of {cfg.micro_batch_size} "
                   f"on each of {world} rank(s) is already {per_step} windows)")
        raise ValueError(f"the training split of {data} holds {train_windows:,} windows of --seq-len {seq} "
                         f"({_tokens(train_tokens)}), fewer than one optimizer step's --global-batch-size "
                         f"{cfg.global_batch_size}: use {smaller}, a smaller --seq-len (more windows from the same "
                         "tokens), or prepare more data (launch/prepare_data.py)")
    val_tokens = int(splits["validation"]["tokens"])
    val_windows = split_windows(splits["validation"], seq)
    if cfg.eval_every and val_tokens == 0:
        docs = int(splits["train"].get("documents", 0))
        more = (" or, as each document goes whole to one split, more and smaller documents (--txt-unit paragraph "
                "for .txt files) or a validation corpus (--val-input)" if docs < 1000 else "")
        raise ValueError(f"the validation split of {data} is empty (0 tokens, {docs:,} training documents): "
                         f"prepare the data (launch/prepare_data.py) with a larger --val-fraction{more}, or set "
                         "--eval-every 0 (no evaluation)")
    if cfg.eval_every and val_windows == 0 and short["validation"]:
        raise ValueError(f"mixture {data}: the validation split of every member holds fewer tokens than one window "
                         f"of --seq-len {seq} needs (seq_len + 1 = {need:,}): {', '.join(short['validation'])}; use a "
                         "smaller --seq-len, prepare them with a larger --val-fraction (launch/prepare_data.py), or "
                         "set --eval-every 0 (no evaluation)")
    if cfg.eval_every and val_windows == 0:
        raise ValueError(f"the validation split of {data} holds {_tokens(val_tokens)}, fewer than one window of "
                         f"--seq-len {seq} needs (seq_len + 1 = {need:,} tokens): use a smaller --seq-len, prepare "
                         "the data with a larger --val-fraction (launch/prepare_data.py), or set --eval-every 0 "
                         "(no evaluation)")
    epochs = total_steps * cfg.global_batch_size / train_windows
    if epochs > 4:
        warnings.warn(f"this run reads the training data of {data} {epochs:.1f} times ({total_steps} steps x "
                      f"{cfg.global_batch_size} sequences, {train_windows} windows of {need} tokens): "
                      "set data_dir to a larger prepared corpus (launch/prepare_data.py)", ConfigWarning,
                      stacklevel=2)
    for name in ("eval_windows", "final_eval_windows"):
        n = getattr(cfg, name) or 0
        if cfg.eval_every and n and (shortfall := windows_shortfall(
                splits["validation"], seq, n, data, f"{name}={n}",
                "each evaluation" if name == "eval_windows" else "the final evaluation")):
            warnings.warn(shortfall, ConfigWarning, stacklevel=2)


def windows_shortfall(split: dict, seq: int, n: int, data: str, asked: str, which: str,
                      split_name: str = "validation") -> str | None:
    """What ``asked`` (n evaluation windows of --seq-len ``seq``) gets short of in ``split`` (a manifest's, of
    ``data``), said of ``which`` evaluation; None when it gets all n. A mixture shares n out by its weights,
    each member read at most whole (evaluation_windows)."""
    members = [m for m in split.get("members", []) if num_windows(m["tokens"], seq)]
    if members:
        sizes, shares = [num_windows(m["tokens"], seq) for m in members], [m["weight"] for m in members]
        counts, wanted = evaluation_windows(shares, sizes, n), evaluation_windows(shares, [n] * len(sizes), n)
        short = [f"{m['path']} ({size:,} windows for its share of {want:,})"
                 for m, size, want, got in zip(members, sizes, wanted, counts) if got < want]
        return (f"{asked} shared out by the weights of mixture {data} asks more windows of member(s) "
                f"{', '.join(short)} than their {split_name} splits hold: {which} reads all of theirs, "
                f"{int(counts.sum()):,} windows in all") if short else None
    windows = split_windows(split, seq)
    return (f"{asked} but the {split_name} split of {data} holds {windows} windows: {which} uses all {windows}"
            if n > windows else None)
