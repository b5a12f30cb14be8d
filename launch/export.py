"""Export any training checkpoint to a merged Hugging Face directory of its model's family (LLaMA, Qwen2, Qwen3,
Mistral; offline, CPU, any world size).

    python launch/export.py runs/tiny/checkpoints [--tag step_400] --out runs/tiny/hf-step400
    python launch/export.py runs/tiny/checkpoints/step_400 --out runs/tiny/hf-step400   # the same

Reads DeepSpeed's ZeRO checkpoint whole (relora_ds.checkpoint.full_state_dict: fp32 masters of trainable
parameters, frozen base weights as saved), rebuilds the model from the checkpoint's config.json, folds every
ReLoRA layer's scale·B·A into its weight and writes config.json + model.safetensors, plus the run's
tokenizer (a SentencePiece model also in Hugging Face form; found through the run's data dir, or --tokenizer;
it must be the one the checkpoint was trained with).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from relora_ds import LlamaConfig, LlamaForCausalLM, wrap
from relora_ds.checkpoint import checkpoint_folders, full_state_dict, latest_tag, load_config, tag_step
from relora_ds.data import load_manifest
from relora_ds.data.manifest import tokenizer_sha256
from relora_ds.data.tokenizer import resolve_tokenizer
from relora_ds.hf import export_run, merge_record
from relora_ds.relora import relora_layers
from relora_ds.train_args import ArgumentParser
from cli_types import DefaultsHelpFormatter, check_writable, tolerant_stdout, user_path  # launch/


def _refuse_hf_trainer_checkpoint(path: Path, ap: argparse.ArgumentParser) -> None:
    if (path / "trainer_state.json").is_file():
        ap.error(f"{path} is a Hugging Face Trainer checkpoint (trainer_state.json), not a relora_ds trainer's: its "
                 "weights are the wrapped model's (LoRA unmerged), which from_pretrained loads without scale·B·A. "
                 "Export it with trainer.save_model(out) under relora_ds.hf_trainer.enable_relora, or under "
                 "DeepSpeed as its zero_to_fp32.py prints (relora_ds/recovery.py)")


def _is_run_config(config) -> bool:
    """A relora_ds checkpoint's config.json: the run's 'train' and 'model' sections."""
    return isinstance(config, dict) and {"train", "model"} <= set(config)


def _is_checkpoint(folder: Path) -> bool:
    try:
        return _is_run_config(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError):
        return False


def main(argv=None) -> Path:
    ap = ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter, allow_abbrev=False)
    ap.add_argument("checkpoints", type=user_path, help="the run's output_dir, its checkpoints/ directory, or one "
                                                    "checkpoint's step_N/ directory")
    ap.add_argument("--tag", help="checkpoint tag, e.g. step_400 (default: latest)")
    ap.add_argument("--out", type=user_path, required=True, help="output Hugging Face directory")
    tok = ap.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", type=user_path, help="SentencePiece .model, Hugging Face tokenizer.json or a model "
                     "directory holding one (default: the run's data dir's)")
    tok.add_argument("--no-tokenizer", action="store_true", help="write the model only (its BOS/EOS ids from the "
                     "run's data manifest where it is still there)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="dtype of the exported weights (default: the run's export_dtype, else the dtype of the "
                         "Hugging Face model it started from, else float32)")
    args = ap.parse_args(argv)
    if not args.checkpoints.is_dir():
        ap.error(f"{args.checkpoints} " + ("is a file" if args.checkpoints.exists() else "does not exist")
                 + ": give a run's output_dir, its checkpoints/ folder, or one checkpoint's step_N/ folder")
    _refuse_hf_trainer_checkpoint(args.checkpoints, ap)
    if (args.checkpoints / "checkpoints").is_dir() and not (args.checkpoints / "latest").is_file():
        args.checkpoints = args.checkpoints / "checkpoints"  # the run's output_dir: its checkpoints/ is meant
    elif (args.checkpoints / "config.json").is_file() and args.tag in (None, args.checkpoints.name):
        args.checkpoints, args.tag = args.checkpoints.parent, args.checkpoints.name  # one checkpoint: step_N/
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} exists and is not a directory")
    check_writable(ap, "--out", args.out)
    tag = args.tag or latest_tag(args.checkpoints)
    if _is_checkpoint(args.checkpoints) and args.tag not in (None, args.checkpoints.name):
        found = sorted((p.name for p in checkpoint_folders(args.checkpoints.parent)), key=tag_step)
        ap.error(f"{args.checkpoints} is one checkpoint, {args.checkpoints.name}, and --tag {args.tag} another: give "
                 f"their checkpoints/ folder {args.checkpoints.parent} with --tag (found there: {found or 'none'})")
    if tag is None or not (args.checkpoints / tag).is_dir():
        found = sorted((p.name for p in checkpoint_folders(args.checkpoints)), key=tag_step)
        ap.error(f"no checkpoint {tag or '(latest)'} in {args.checkpoints}; found: {found or 'none'}" + (
            "" if found else " (give a run's output_dir, its checkpoints/ folder, or one checkpoint's step_N/ folder)"))
    _refuse_hf_trainer_checkpoint(args.checkpoints / tag, ap)
    if not (args.checkpoints / tag / "config.json").is_file():
        ap.error(f"{args.checkpoints / tag} has no config.json: an incomplete checkpoint (its save did not finish?); "
                 "export another with --tag")
    try:
        run = load_config(args.checkpoints, tag)
    except ValueError as e:
        ap.error(f"{args.checkpoints / tag / 'config.json'} is damaged: {e}")
    # e.g. a run's hf/ export, whose config.json is transformers'
    if not _is_run_config(run):
        kind = f"a Hugging Face model directory ({run['model_type']})" if "model_type" in run else \
            "not a relora_ds checkpoint"
        ap.error(f"{args.checkpoints / tag} is {kind}: its config.json has no 'train' and 'model' sections of a "
                 "relora_ds checkpoint; give a run's output_dir, its checkpoints/ folder or one step_N/ folder (an "
                 "export needs no second one: transformers loads it with from_pretrained)")
    out, ckpts = args.out.resolve(), args.checkpoints.resolve()
    if out == ckpts or ckpts in out.parents or (out / "latest").is_file() or (out / "checkpoints").is_dir() \
            or _is_checkpoint(out):
        ap.error(f"--out {args.out} is a run's output_dir, its checkpoints/ folder or a checkpoint in it: the export "
                 "would replace a checkpoint's config.json (no resume could load it again); export into a folder "
                 f"of its own, e.g. {ckpts.parent / 'export'}")
    tokenizer = None if args.no_tokenizer else args.tokenizer or _run_tokenizer(run, ap)
    try:
        tokenizer = tokenizer and resolve_tokenizer(tokenizer)
    except ValueError as e:
        ap.error(f"--tokenizer: {e}")
    if tokenizer is not None and run.get("tokenizer_sha256") not in (None, tokenizer_sha256(tokenizer)):
        ap.error(f"{tokenizer} is not the tokenizer {args.checkpoints / tag} was trained with (sha256 "
                 f"{run['tokenizer_sha256'][:12]}...); pass that one with --tokenizer, or --no-tokenizer")
    try:
        state = full_state_dict(args.checkpoints, tag)
    except (ValueError, FileNotFoundError, AssertionError, RuntimeError) as e:  # DeepSpeed's readers on damaged files
        ap.error(f"cannot read {args.checkpoints / tag}: {type(e).__name__}: {e} (a file missing or cut short? "
                 "every rank's *_model_states.pt and *_optim_states.pt must be there); export another with --tag")
    model = LlamaForCausalLM(LlamaConfig(**run["model"]))
    if any(".lora_A" in k for k in state):  # saved in the ReLoRA phase (after any warm start)
        t = run["train"]
        wrap(model, rank=t["rank"], alpha=t["alpha"], target_modules=t["target_modules"],
             quantize=t.get("quantize"), merge_residual=t.get("merge_residual", False))  # their buffers
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    # merge_count buffers may be absent: they do not affect the exported weights.
    if unexpected or [k for k in missing if not k.endswith("merge_count")]:
        ap.error(f"checkpoint does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        with torch.no_grad():
            # Checkpoints since 2026-12-04 record the sampler: a run from the export reads on in the data.
            progress = run.get("progress") if "sampler" in run.get("progress", {}) else None
            if progress is not None:  # recorded in progress since 2026-12-05, in the run's config always
                progress = {**progress, "document_masking": bool(run["train"].get("document_masking"))}
            layers = [name for name, _ in relora_layers(model)]
            if progress is not None and layers:  # what its merges were (launch/update_rank.py), with the base's
                saved = state.get(f"{layers[0]}.weight")  # dtype as saved (this copy holds it in fp32); a
                base = None if saved is None else str(saved.dtype).removeprefix("torch.")  # None: int8's own
                known = any(k.endswith("merge_count") for k in state)  # older checkpoints: unknown
                progress = {**progress, "relora": merge_record(model, base) if known else None}
            out, notes = export_run(model, args.out, run["train"], tokenizer, dtype=args.dtype,
                                    token_ids=None if tokenizer else _run_token_ids(run), progress=progress)
    except ValueError as e:  # e.g. --out is the Hugging Face directory the run started from
        ap.error(str(e))
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    print(f"exported {args.checkpoints / tag} to {out}")
    return out


def _run_data_dir(run: dict) -> Path:
    """The run's data dir (absolute since 2026-12-03). A relative one is taken from the directory the run
    started in (run_info's cwd, where recorded), else from this one."""
    data_dir = Path(run["data_dir"])
    cwd = (run.get("environment") or {}).get("cwd")
    return data_dir if data_dir.is_absolute() or not cwd else Path(cwd) / data_dir


def _run_tokenizer(run: dict, ap: argparse.ArgumentParser) -> Path:
    try:
        return Path(load_manifest(_run_data_dir(run))["tokenizer_path"])
    except (KeyError, OSError, ValueError) as e:
        cwd = (run.get("environment") or {}).get("cwd")
        where = "" if Path(run.get("data_dir") or "/").is_absolute() else f", from {cwd or Path.cwd()}"
        gone = "data_dir" in run and not (_run_data_dir(run) / "manifest.json").is_file()
        ap.error(f"cannot find the run's tokenizer through its data dir {run.get('data_dir')!r}{where} "
                 f"({'no prepared data (manifest.json) there' if gone else str(e).rstrip()}); pass --tokenizer PATH "
                 "(the data dir's tokenizer.model or tokenizer.json), or --no-tokenizer")


def _run_token_ids(run: dict) -> dict | None:
    """--no-tokenizer: the BOS/EOS ids of the run's tokenizer from its data manifest (None where it is gone:
    the export then says null)."""
    try:
        manifest = load_manifest(_run_data_dir(run))
        return {"bos_token_id": manifest["bos_id"], "eos_token_id": manifest["eos_id"]}
    except (KeyError, OSError, ValueError, TypeError):
        return None


if __name__ == "__main__":
    tolerant_stdout()
    sys.exit(0 if main() else 1)
