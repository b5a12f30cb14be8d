"""Validation loss and perplexity of a Hugging Face model directory (a run's export, or any LLaMA, Qwen2, Qwen3
or Mistral model relora_ds loads) on a prepared data dir or a mixture of them: the windows the trainer's
evaluation reads (``--windows N`` spread evenly over the split, as ``eval_windows``), one process.

    python launch/evaluate.py runs/tiny/hf --data-dir ~/.cache/relora_ds/builtin-vocab2048 --seq-len 128 --windows 256
    python launch/evaluate.py runs/c4/hf --data-dir data/c4 --seq-len 1024 --windows 10240 --out eval.json

Compare models only on one tokenizer's data (perplexity is per token): the model's tokenizer must be the one
the data was prepared with (checked where the model directory holds one). On a mixture each member's windows
are read on their own (``--windows`` shared out by the weights, at least one each): the output has each
member's loss, what that dir alone gives, and the mixture's, the members' weighted by the mixture's weights.
A run trained with --document-masking is evaluated with it (its export records it; ``--document-masking``
overrides). Prints one JSON line (and writes it to ``--out``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))
from cli_types import DefaultsHelpFormatter, check_writable, positive_int, tolerant_stdout, user_path  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Model:
    """What relora_ds.evaluate.validation_losses calls: ``(batch, labels) -> .loss`` on ``device``."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device

    def eval(self):
        self.model.eval()

    def train(self):
        self.model.eval()  # one evaluation: stays in eval mode

    def __call__(self, batch, labels):
        return self.model(batch, labels=labels)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("model", type=user_path, help="Hugging Face model directory (e.g. RUN/hf, a run's export)")
    ap.add_argument("--data-dir", type=user_path, required=True, help="prepared data dir or mixture dir")
    ap.add_argument("--seq-len", type=positive_int, required=True, help="tokens per window (the run's seq_len)")
    ap.add_argument("--split", choices=("validation", "train"), default="validation",
                    help="the split to read (on a mixture each member's own)")
    ap.add_argument("--windows", type=positive_int, default=None,
                    help="windows spread evenly over the split (default: all of them); on a mixture shared out "
                         "by the weights, at least one per member")
    ap.add_argument("--document-masking", choices=("auto", "on", "off"), default="auto",
                    help="attention within each document, as the trainer's --document-masking (auto: as the "
                         "export's run trained, from its relora_ds_progress.json; off where it records nothing)")
    ap.add_argument("--micro-batch-size", type=positive_int, default=8, help="windows per forward (default: 8)")
    ap.add_argument("--device", type=_device, default=None,
                    help="a torch device: cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="weights and activations (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--out", type=user_path, default=None, help="also write the JSON result here")
    args = ap.parse_args(argv)
    if args.out is not None and args.out.is_dir():  # named now, not after the evaluation
        ap.error(f"--out {args.out} is a directory: give a file to write the JSON result to")
    if args.out is not None:
        check_writable(ap, "--out", args.out)
    device = args.device
    if device is not None and device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
            ap.error(f"--device {device}: torch here has no {device.type} device (torch {torch.__version__}); "
                     "use --device cpu")
        if device.index is not None and device.index >= backend.device_count():
            ap.error(f"--device {device}: this machine has {backend.device_count()} {device.type} device(s)")
    return args


def _device(text: str) -> torch.device:
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None


def evaluate(args: argparse.Namespace) -> dict:
    from relora_ds.data import load_manifest, open_eval_split
    from relora_ds.data.manifest import document_ends_problem
    from relora_ds.hf import PROGRESS_FILE
    from relora_ds.evaluate import validation_losses
    from relora_ds.hf_load import load_hf, load_hf_config
    from relora_ds.startup import check_model_tokenizer, windows_shortfall

    config = load_hf_config(args.model)  # first: a run's directory or checkpoint is named, with its export
    manifest = load_manifest(args.data_dir)
    own_tokenizer = check_model_tokenizer(args.model, manifest, args.data_dir)
    if config.vocab_size < manifest["vocab_size"]:
        what = ("the model directory is inconsistent: its own tokenizer (the data's) has more ids than its "
                "embedding" if own_tokenizer else "not the model's data")
        raise ValueError(f"{args.data_dir}'s tokenizer has {manifest['vocab_size']} ids, {args.model} embeds "
                         f"{config.vocab_size}: {what}")
    if args.seq_len > config.max_position_embeddings:  # (a window's last position predicts nothing scored)
        warnings.warn(f"--seq-len {args.seq_len} is longer than {args.model}'s max_position_embeddings "
                      f"{config.max_position_embeddings}: positions it was not built for", UserWarning, stacklevel=2)
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    data = open_eval_split(args.data_dir, args.split, seq_len=args.seq_len)
    if len(data) == 0:
        raise ValueError(f"the {args.split} split of {args.data_dir} holds no window of --seq-len {args.seq_len} "
                         "(seq_len + 1 tokens): use a smaller --seq-len")
    if args.windows and (short := windows_shortfall(manifest["splits"][args.split], args.seq_len, args.windows,
                                                    str(args.data_dir), f"--windows {args.windows}",
                                                    "the evaluation", args.split)):
        warnings.warn(short, UserWarning, stacklevel=2)
    masking = args.document_masking == "on"
    if args.document_masking == "auto" and (args.model / PROGRESS_FILE).is_file():
        progress = _progress(args.model / PROGRESS_FILE)
        masking = bool(progress.get("document_masking"))
        if "document_masking" not in progress:
            warnings.warn(f"{args.model / PROGRESS_FILE} predates the record of --document-masking (2026-12-05): "
                          "evaluated without it; pass --document-masking on if the run trained with it",
                          UserWarning, stacklevel=2)
    if masking and (problem := document_ends_problem(manifest, args.data_dir)):
        raise ValueError(f"document masking: {problem}; evaluate with --document-masking off")
    model = load_hf(args.model, dtype=dtype).to(device)
    if masking:
        model.document_masking_enable(int(manifest["eos_id"]))
    start = time.perf_counter()
    loss, tokens, members = validation_losses(_Model(model, device), data, args.micro_batch_size, 0, 1,
                                              args.windows)
    return {"model": str(args.model), "data_dir": str(args.data_dir), "split": args.split, "seq_len": args.seq_len,
            "windows": tokens // args.seq_len, "tokens": tokens, "loss": loss,
            "ppl": math.exp(min(loss, 50.0)), **{f"loss/{k}": v for k, v in members.items()},
            "document_masking": masking, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "seconds": round(time.perf_counter() - start, 2)}


def _progress(path: Path) -> dict:
    try:
        progress = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        progress = e
    if not isinstance(progress, dict):
        raise ValueError(f"{path} is not the JSON object an export writes ({progress}): --document-masking auto "
                         "cannot read how the run trained; pass --document-masking on or off")
    return progress


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = evaluate(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from relora_ds.metrics import json_finite

    if not math.isfinite(result["loss"]):  # a diverged model: JSON has no NaN/Infinity, metrics.jsonl's null
        print(f"launch/evaluate.py: the loss is {result['loss']} (the model's outputs are not finite); written as "
              "null", file=sys.stderr)
    line = json.dumps(json_finite(result), allow_nan=False)
    print(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    tolerant_stdout()
    sys.exit(main())
