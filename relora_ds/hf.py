"""Hugging Face checkpoints of LLaMA, Qwen2, Qwen3 and Mistral: export (merged, plain weights; here) and load
(continued pre-training; hf_load.py, its names public here too).

Our module names equal Hugging Face's, so the state dict maps one to one; ReLoRA layers are merged into
plain weights (dequantized when stored in int8) and their LoRA tensors and counters are dropped. The export
also holds the run's tokenizer for ``AutoTokenizer``: a SentencePiece model converted and checked to encode
as training did (``save_hf_tokenizer``), a Hugging Face tokenizer.json copied as it is.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import sharded
from .data.tokenizer import open_tokenizer, tokenizer_difference
from .durable import fsync_path, fsync_tree
from .hf_load import CONFIG_KEYS, config_from_hf, hf_tensors, load_hf, load_hf_config
from .hf_tokenizer import (TokenizerNotConvertible, auto_tokenizer_difference, save_hf_tokenizer,
                           sentencepiece_special_ids)
from .model import LlamaForCausalLM
from .model_config import LlamaConfig
from .relora import _gathered, is_deepspeed_engine, relora_layers

# relora_ds.hf: export (here) and load (hf_load.py) under one name.
__all__ = ["TOKENIZER_FILES", "config_from_hf", "export_dtype", "export_hf", "export_run", "hf_config_dict",
           "hf_tensors", "load_hf", "load_hf_config", "merged_state_dict", "model_from_engine"]

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "mistral": "MistralForCausalLM"}


def hf_config_dict(config: LlamaConfig, dtype: torch.dtype, bos_token_id: int | None = 1,
                   eos_token_id: int = 2) -> dict:
    """config.json for transformers' class of ``config.model_type``. RoPE scaling goes in as ``rope_scaling``
    beside ``rope_theta``, which transformers 4.x reads as it is and 5.x converts to its rope_parameters."""
    out = {
        "architectures": [_ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        **{k: getattr(config, k) for k in CONFIG_KEYS},
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }
    if config.rope_scaling is not None:
        out["rope_scaling"] = dict(config.rope_scaling)
    if config.model_type == "llama":
        out.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
    elif config.model_type == "mistral":  # written even when None: MistralConfig's default is 4096
        out["sliding_window"] = config.sliding_window
    else:  # qwen2, qwen3 (Qwen2's q/k/v biases and Qwen3's q/k norms are fixed by the architecture)
        if config.model_type == "qwen3":
            out["attention_bias"] = config.attention_bias
        out.update(_qwen_window(config))
    return out


def _qwen_window(config: LlamaConfig) -> dict:
    """Qwen2/Qwen3's window keys: layer_types (transformers 5) and max_window_layers (earlier: the first
    sliding layer, where all after it slide too, Qwen's own pattern)."""
    layers = config.layer_types or ["sliding_attention"] * config.num_hidden_layers
    if config.sliding_window is None or "sliding_attention" not in layers:  # (a window no layer uses)
        return {"use_sliding_window": False}
    first = layers.index("sliding_attention")
    suffix = all(t == "sliding_attention" for t in layers[first:])
    return {"use_sliding_window": True, "sliding_window": config.sliding_window, "layer_types": layers,
            "max_window_layers": first if suffix else config.num_hidden_layers}


def merged_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None,
                      keep: bool = True) -> dict[str, torch.Tensor]:
    """The plain model's state dict (ours, or a transformers model's): every ReLoRA layer's weight = base +
    scale·B·A (fp32 sum, cast once to ``dtype``, default the weight's as `unwrap` keeps it, and in the replaced
    layer's layout). A tied model's lm_head.weight is left out, as transformers saves it (safetensors refuses
    a tensor under two names, and loading ties it back). A model sharded by FSDP2 is gathered a tensor at a
    time (a collective: every rank calls this); a rank with ``keep`` False drops what it gathers and gets {}
    (the Trainer's save_model: only the saving rank holds the whole model). So is a model zero.Init built
    partitioned (DeepSpeed ZeRO-3, no engine yet), a module's parameters at a time (its tensors copied out
    before the gather is released)."""
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    gathered = zero3 or bool(sharded.fsdp2_modules(model)) or any(map(sharded.is_sharded, model.parameters()))
    if not keep and not gathered:
        return {}
    sharded.reshard_(model)  # FSDP2's whole copies after a forward that did not reshard may be stale
    # torch's checkpoint_wrapper (accelerate's FSDP activation_checkpointing) leaves its wrapped module's name out
    # of state_dict's keys: merged weights under the module names were not found by from_pretrained, which then
    # loaded the unmerged bases (and ignored lora_A/B as unexpected keys)
    # (its level alone: a module of the model's own named like 'x_checkpoint_wrapped_module' keeps its name)
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_WRAPPED_MODULE as WRAPPED

    def unwrapped(name: str) -> str:
        return ".".join(part for part in name.split(".") if part != WRAPPED)

    merged: dict[str, torch.Tensor] = {}
    layer_names = set()
    for name, layer in relora_layers(model):
        name = unwrapped(name)
        layer_names.add(name)
        with _gathered(list(layer.parameters(recurse=False))):
            weight = layer.merged_weight(dtype)  # a new tensor
            bias = None if layer.bias is None else sharded.whole(layer.bias).detach().to(dtype or layer.bias.dtype)
            if keep:
                merged[f"{name}.weight"] = weight.contiguous().cpu()  # each on the host at once: one whole
                if bias is not None:  # tensor at a time on the device
                    merged[f"{name}.bias"] = _copied_out(bias, zero3)
    params = {unwrapped(n): p for n, p in model.named_parameters(remove_duplicate=False)}
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in layer_names:
            continue  # weight/bias written above; lora_A/B, merge_count and quantization buffers dropped
        p = params.get(key)
        with _gathered([] if p is None else [p]):
            t = sharded.whole(t if p is None else p).detach()
            if keep:
                merged[key] = _copied_out(t.to(dtype) if dtype is not None and t.is_floating_point() else t, zero3)
    if not keep:
        return {}
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):  # (BERT's tied head has another
        merged.pop("lm_head.weight", None)  # name: transformers' save_pretrained drops the tied copy itself)
    return merged


def _copied_out(t: torch.Tensor, zero3: bool) -> torch.Tensor:
    """``t`` on the host, contiguous; under a ZeRO-3 gather a copy of its own (the gathered storage is freed
    when the gather ends, and on the host .cpu() would return that very storage)."""
    out = t.contiguous().cpu()
    return out.clone() if zero3 and out.data_ptr() == t.data_ptr() else out


def merge_record(model, base_dtype: str | None = None) -> dict | None:
    """What the ReLoRA layers of ``model`` folded into its weights (PROGRESS_FILE's ``relora``, which
    launch/update_rank.py reads): the ReLoRA ``layers`` (names), ``rank``, ``merges`` (the most any layer
    made), ``live`` (a factor B not zero: the export adds one more rank-``rank`` term), the frozen base's
    ``base_dtype`` (each merge into a bf16/fp16 or int8 base rounds the whole matrix; ``base_dtype`` gives
    it for a copy built for export, which holds a bf16 base in fp32) and ``merge_residual`` (error feedback:
    the roundings do not add up; an int8 base always has it). None for a model without ReLoRA layers."""
    named = list(relora_layers(model))
    if not named:
        return None
    layers = [layer for _, layer in named]
    return {"layers": sorted(name for name, _ in named), "rank": max(layer.rank for layer in layers),
            "merges": max(int(layer.merge_count) for layer in layers),
            "live": any(bool(layer.lora_B.detach().ne(0).any()) for layer in layers),
            "base_dtype": "int8" if layers[0].quantize else base_dtype or frozen_dtype(model),
            "merge_residual": any(layer.merge_residual is not None for layer in layers)}


def with_merge_record(progress: dict, copy, module) -> dict:
    """``progress`` with the merge record of ``copy`` (model_from_engine's, which holds a bf16 base in fp32)
    in the base dtype of ``module`` (the engine's model); as it is for a model without ReLoRA layers."""
    base = frozen_dtype(module)
    return {**progress, "relora": merge_record(copy, base)} if base else progress


def frozen_dtype(model) -> str | None:
    """The dtype the ReLoRA layers of ``model`` keep their frozen base in ("int8": quantized); None: none."""
    layer = next((layer for _, layer in relora_layers(model)), None)
    if layer is None:
        return None
    return "int8" if layer.quantize else str(layer.weight.dtype).removeprefix("torch.")


# A Hugging Face model directory's tokenizer: what `export_hf(like=...)` carries over.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
# transformers 5 saves a tokenizer's named chat templates (other than the default) as files in this folder
CHAT_TEMPLATES_DIR = "additional_chat_templates"


def export_hf(model, out_dir: str | Path, dtype: torch.dtype | None = None,
              tokenizer: str | Path | None = None, *, hf_tokenizer: bool = True,
              like: str | Path | None = None, token_ids: dict | None = None, progress: dict | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the Hugging Face format of the model's model_type
    (LLaMA, Qwen2, Qwen3, Mistral); returns out_dir.

    `model`: a relora_ds ``LlamaForCausalLM`` (wrapped or not), or the DeepSpeed engine training one: then
    every rank calls (the weights are gathered: fp32 masters, ZeRO-3 partitions) and rank 0 writes. An engine
    training a transformers model (the HF Trainer path, hf_trainer.save_merged) is written merged by its own
    ``save_pretrained``; `tokenizer`, `like`, `token_ids` and `progress` are refused for it.

    `tokenizer`: the tokenizer the model was trained with (a data dir's ``tokenizer.model`` or
    ``tokenizer.json``). Its BOS/EOS ids go into the configs and its files are copied; a SentencePiece model's
    Hugging Face form is written too with `hf_tokenizer` (``save_hf_tokenizer``: a ValueError for a model
    transformers cannot reproduce exactly, the directory left as it was; ``hf_tokenizer=False`` then exports
    without it).

    `like`: the Hugging Face directory the model was loaded from (continued pre-training). Its config's
    other keys (pad_token_id, dropout, ...) are kept, and where its tokenizer is `tokenizer` (or no
    tokenizer is given) its BOS/EOS ids, tokenizer files and generation config are taken as they are: added
    tokens, pad token and chat template stay the model's own.

    `token_ids`: ``{"bos_token_id", "eos_token_id"}`` for an export without `tokenizer` or `like` (say, from
    the run's data manifest); without them the configs say null rather than guess.

    `progress`: how far the training of these weights got in its data (a run's ``progress()``), written as
    PROGRESS_FILE, where a run started from the export reads on (--warm-start-data), with what its ReLoRA
    layers merged (``merge_record``, unless `progress` has a ``relora`` entry, None where unknown:
    launch/update_rank.py); without it an earlier export's file goes, so that none describes other weights.

    Everything is written into a staging directory inside `out_dir` first and moved into place at the end:
    an error on the way (a tokenizer refused, a full disk) leaves an earlier export there as it was.

    `dtype`: of the written weights; None: with `like`, the dtype it was stored in (its config's torch_dtype
    or dtype; float32 where it names none or "auto"), as the trainer's export does; without, the model's own
    (fp32 masters under an engine).
    """
    if dtype is None and like is not None:
        dtype = export_dtype(None, like)
    if is_deepspeed_engine(model):
        return _export_engine(model, out_dir, dtype, tokenizer, hf_tokenizer=hf_tokenizer, like=like,
                              token_ids=token_ids, progress=progress)
    config = getattr(model, "config", None)
    if not isinstance(config, LlamaConfig):
        raise ValueError(f"export_hf expects a relora_ds.LlamaForCausalLM or a DeepSpeed engine training one, got "
                         f"{type(model).__name__} (for a Hugging Face model: relora_ds.unwrap(model).save_pretrained(dir))")
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError("export_hf: this model's parameters are partitioned by DeepSpeed ZeRO-3 (each rank holds "
                         "a slice, the module empty placeholders): pass the engine itself, export_hf(engine, out_dir), "
                         "on every rank")
    # One process writes the export; merged_state_dict would gather a sharded model, a collective the other
    # ranks do not join (a hang where the caller is rank 0 alone, each rank writing out_dir where every rank is).
    sharded.check_not_sharded(model, "export_hf")
    out = Path(out_dir)
    if like is not None and out.resolve() == Path(like).resolve():
        raise ValueError(f"export_hf: {out} is the directory the model was loaded from; export to another one")
    if tokenizer is not None and (size := open_tokenizer(tokenizer).vocab_size) > config.vocab_size:
        raise ValueError(f"export_hf: the tokenizer {tokenizer} has {size:,} ids, more than the model's vocab_size="
                         f"{config.vocab_size:,}: ids past it have no embedding; pass the tokenizer the model was "
                         "trained with")
    source = _source_config(like)
    # The source model's ids (and tokenizer files, where it has some) unless another tokenizer is given.
    from_source = like is not None and (tokenizer is None or _same_tokenizer(Path(like), tokenizer))
    source_files = [n for n in TOKENIZER_FILES if from_source and (Path(like) / n).is_file()]
    if from_source:
        special = {k: source[k] for k in ("bos_token_id", "eos_token_id") if k in source}
    elif tokenizer is None:
        special = {"bos_token_id": None, "eos_token_id": None, **(token_ids or {})}
        if token_ids is None:
            warnings.warn("export_hf without a tokenizer or token_ids: config.json says bos_token_id and "
                          "eos_token_id null (transformers would otherwise assume LLaMA-2's 1 and 2); pass the "
                          "training tokenizer, or token_ids", stacklevel=2)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".export-"))
    try:
        if from_source:  # its tokenizer files, if it has any
            for name in source_files:
                shutil.copyfile(Path(like) / name, staging / name)
            if (Path(like) / CHAT_TEMPLATES_DIR).is_dir():  # its named chat templates (transformers 5)
                shutil.copytree(Path(like) / CHAT_TEMPLATES_DIR, staging / CHAT_TEMPLATES_DIR,
                                copy_function=shutil.copyfile)
        elif tokenizer is not None and Path(tokenizer).suffix == ".json":  # a Hugging Face tokenizer: as it is
            tok = open_tokenizer(tokenizer)
            tok.copy_to(staging)
            special = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
        elif tokenizer is not None and hf_tokenizer:
            special = save_hf_tokenizer(tokenizer, staging, model_max_length=config.max_position_embeddings)
        elif tokenizer is not None:
            special = sentencepiece_special_ids(tokenizer)
            shutil.copyfile(tokenizer, staging / "tokenizer.model")
        state = merged_state_dict(model, dtype)
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        _readable_as_umask_allows(staging / "model.safetensors")
        ours = hf_config_dict(config, state["model.embed_tokens.weight"].dtype, **special)
        del state
        for key in ("bos_token_id", "eos_token_id"):
            if key not in special:  # the source's special ids as they are, absent ones absent
                del ours[key]
        if "dtype" in source:  # transformers 5's name for torch_dtype
            ours["dtype"] = ours["torch_dtype"]
        (staging / "config.json").write_text(json.dumps({**source, **ours}, indent=2))
        if not from_source and (staging / "tokenizer.json").is_file() and \
                (difference := auto_tokenizer_difference(staging)):  # the model's own files: as they are
            warnings.warn(f"export_hf: {difference}: load the export's tokenizer with transformers."
                          f"PreTrainedTokenizerFast.from_pretrained({str(out)!r}), which reads tokenizer.json as "
                          "written (SentencePiece: its tokenizer.model)", stacklevel=2)
        generation = Path(like) / "generation_config.json" if from_source else None
        if generation is not None and generation.is_file():
            shutil.copyfile(generation, staging / "generation_config.json")
        else:
            (staging / "generation_config.json").write_text(json.dumps(special, indent=2))
        if progress is not None:  # with what the ReLoRA layers merged, unless the caller knows it better
            record = progress if "relora" in progress else {**progress, "relora": merge_record(model)}
            if "relora" not in progress and record["relora"] is None:  # no ReLoRA layers (a full-rank model)
                del record["relora"]
            (staging / PROGRESS_FILE).write_text(json.dumps(record, indent=1) + "\n")
        _replace_export(out, staging, writes_tokenizer=tokenizer is not None or bool(source_files))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _replace_export(out: Path, staging: Path, writes_tokenizer: bool) -> None:
    """Move the staged export into `out`. An earlier export's (or model's) weights go first (an old shard
    index would win over model.safetensors), and, when this export writes a tokenizer, its tokenizer files
    too, so that no old tokenizer.json stays beside a new tokenizer.model; tokenizer files an export without
    a tokenizer finds are named. Other files are the user's. The staged files are flushed to disk first (a
    power loss leaves no empty model.safetensors under its name), before anything of the old export goes.
    A crash in the moment between leaves no weights (an error at load), never old weights beside a new config.
    (Swapping the folder whole instead, rename aside and rename in, took the directory from under any process
    working in it, a shell or the exporting process's own `--out .`: not done.)"""
    fsync_tree(staging)
    old = [name for name in TOKENIZER_FILES if (out / name).is_file()]
    if writes_tokenizer:
        for name in old:
            (out / name).unlink()
        named = out / CHAT_TEMPLATES_DIR  # an earlier tokenizer's named templates
        if named.is_symlink() or named.is_file():
            named.unlink()
        elif named.is_dir():
            shutil.rmtree(named)
    elif old:
        warnings.warn(f"export_hf: {out} holds tokenizer files this export did not write ({', '.join(old)}); they "
                      "stay beside the new weights: remove them unless they are this model's tokenizer", stacklevel=3)
    for stale in (*out.glob("model*.safetensors"), *out.glob("pytorch_model*.bin"), *out.glob("*.index.json")):
        stale.unlink()
    (out / PROGRESS_FILE).unlink(missing_ok=True)  # an earlier export's: it described other weights
    for f in sorted(staging.iterdir()):
        os.replace(f, out / f.name)
    fsync_path(out)


def model_from_engine(engine, keep: bool = True) -> torch.nn.Module | None:
    """A host copy of the model an engine trains (a relora_ds LlamaForCausalLM or a transformers model), with
    its fp32 masters (ZeRO-3 partitions gathered) and the same ReLoRA layers; every rank calls (the gathers),
    and ``keep=False`` ranks get None instead of holding a full copy each. A transformers model's copy is
    saved with ``relora_ds.unwrap(copy).save_pretrained(dir)`` (merged, plain nn.Linear or Conv1D layers)."""
    from .engine_state import full_fp32_state_dict
    from .relora import wrap

    module = engine.module
    ours = isinstance(getattr(module, "config", None), LlamaConfig)
    if not ours and not hasattr(getattr(module, "config", None), "to_dict"):
        raise ValueError(f"model_from_engine: the engine trains a {type(module).__module__}.{type(module).__name__}, "
                         "neither relora_ds's LlamaForCausalLM nor a transformers model (built from its config); "
                         "take relora_ds.engine_state.full_fp32_state_dict(engine) into a model of your own")
    state = full_fp32_state_dict(engine, keep=keep)
    if not keep:
        return None
    layers = list(relora_layers(module))
    with torch.device("meta"):  # then takes the gathered tensors themselves: no second full copy
        model = LlamaForCausalLM(module.config) if ours else type(module)(module.config)
        if layers:
            first = layers[0][1]
            wrap(model, rank=first.rank, alpha=first.alpha, dropout=first.dropout, seed=first.seed,
                 target_modules=[name for name, _ in layers], quantize=first.quantize,
                 merge_residual=first.merge_residual is not None)
    model.load_state_dict(state, assign=True, strict=ours)
    model.tie_weights()  # assign=True gave a tied lm_head a Parameter of its own
    # What no state dict holds (a transformers model's non-persistent buffers: the rotary inv_freq): the
    # engine's own, in the dtype a fresh model has (DeepSpeed's bf16 cast rounded them: recomputed ones may
    # differ in the last bits; an export does not save them).
    own = dict(module.named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = own[name].detach().to("cpu", buf.dtype).clone()
    still = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still:
        raise ValueError(f"model_from_engine: {len(still)} tensors of the copy found no value ({still[:3]}, ...)")
    return model


def _export_engine(engine, out_dir, dtype, tokenizer, **kw) -> Path:
    import torch.distributed as dist

    from .distributed import on_rank_zero

    ours = isinstance(getattr(engine.module, "config", None), LlamaConfig)
    given = [k for k, v in (("tokenizer", tokenizer), *kw.items()) if v is not None and k != "hf_tokenizer"]
    if not ours and given:  # before the gathers, on every rank alike
        raise ValueError(f"export_hf: {', '.join(given)} apply to relora_ds's own model; this engine trains a "
                         f"transformers {type(engine.module).__name__}, written with its own save_pretrained (save "
                         "its tokenizer with the tokenizer's save_pretrained)")
    model = model_from_engine(engine, keep=dist.get_rank() == 0)

    def write():
        if ours:
            if kw.get("progress") is not None and "relora" not in kw["progress"]:
                kw["progress"] = with_merge_record(kw["progress"], model, engine.module)
            export_hf(model, out_dir, dtype, tokenizer, **kw)
        else:  # merged, plain nn.Linear (Conv1D) layers, in the dtype asked for (default: the fp32 masters)
            from .relora import unwrap

            unwrap(model).to(dtype or torch.float32).save_pretrained(out_dir)
            (Path(out_dir) / PROGRESS_FILE).unlink(missing_ok=True)  # an earlier export's: other weights
    on_rank_zero(write)
    return Path(out_dir)


def export_run(model: torch.nn.Module, out_dir: str | Path, train: dict, tokenizer: str | Path | None,
               dtype: str | None = None, token_ids: dict | None = None,
               progress: dict | None = None) -> tuple[Path, list[str]]:
    """A run's export (the trainer's and launch/export.py's): ``export_hf`` like the Hugging Face model the
    run started from (`train`: its TrainConfig dict, hf_model / warm_start_from), in `dtype` (None: the
    run's export_dtype, else that model's, else float32). Where transformers cannot convert `tokenizer`
    exactly, the export carries tokenizer.model alone. `token_ids`: BOS/EOS ids for an export without a
    tokenizer (export_hf). `progress` (the trainer's ``progress()``: step, tokens, sampler state, seed and
    data) goes to PROGRESS_FILE, where a run started from the export reads on in the data. Returns
    (out_dir, warnings to show)."""
    notes = []
    # A killed export's staged copy of the model (its finally never ran). Here, not in export_hf: one process
    # writes a run's export (rank 0 under the run's lock, or launch/export.py), where ranks of a script may call
    # export_hf into one directory at once.
    for stale in Path(out_dir).glob(".export-*"):
        shutil.rmtree(stale, ignore_errors=True)
    source = train.get("hf_model") or train.get("warm_start_from")
    if source and not (Path(source) / "config.json").is_file():
        notes.append(f"{source}, the Hugging Face model the run started from, is gone: its config keys, "
                     "tokenizer files and dtype are not carried over")
        source = None
    kw = dict(dtype=export_dtype(dtype or train.get("export_dtype"), source), like=source, tokenizer=tokenizer,
              token_ids=token_ids, progress=progress)
    try:
        return export_hf(model, out_dir, **kw), notes
    except TokenizerNotConvertible as e:  # transformers cannot reproduce it exactly (e.g. a unigram model)
        notes.append(f"{e}; exported with tokenizer.model but without a Hugging Face tokenizer.json")
        return export_hf(model, out_dir, hf_tokenizer=False, **kw), notes


# Written next to an export of a run: how far its training got in which data (export_run).
PROGRESS_FILE = "relora_ds_progress.json"


def export_dtype(name: str | None, source: str | Path | None = None) -> torch.dtype:
    """The export's dtype: `name` ("float32", "bfloat16", "float16"), else the dtype the Hugging Face model
    in `source` was stored in (its config's torch_dtype, or dtype in transformers 5), else float32."""
    if name is None and source is not None:
        hf = json.loads((Path(source) / "config.json").read_text())
        name = hf.get("torch_dtype") or hf.get("dtype")
    if name in (None, "auto"):
        return torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"export dtype {name!r} is not supported; valid: 'float32', 'bfloat16', 'float16'")
    return getattr(torch, name)


def _source_config(like: str | Path | None) -> dict:
    """The keys of `like`'s config.json other than those the export writes itself ({} without `like`)."""
    if like is None:
        return {}
    source = json.loads((Path(like) / "config.json").read_text())
    return {k: v for k, v in source.items() if k not in ("transformers_version", "rope_scaling", "rope_parameters")}


def _same_tokenizer(like: Path, tokenizer: str | Path | None) -> bool:
    """Whether `like` holds a tokenizer, and (given `tokenizer`, the training data's ``tokenizer.model`` or
    ``tokenizer.json``) it is that one (``tokenizer_difference``)."""
    if tokenizer is None:
        return any((like / name).is_file() for name in TOKENIZER_FILES)
    own = like / Path(tokenizer).name
    return own.is_file() and tokenizer_difference(own, tokenizer) is None


def _readable_as_umask_allows(path: Path) -> None:
    """safetensors writes its file with mode 0600 (a temporary file renamed); give it the mode every other
    file gets (0666 less the umask), so that a group sharing a cluster directory can read the export."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process umask, read without setting it (os.umask would change it for every thread meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)  # no /proc: the brief set-and-restore
    os.umask(umask)
    return umask
