r"""Tokenize a corpus once into a data dir that training reads by random access.

    python launch/prepare_data.py --out data/builtin --vocab-size 2048     # the built-in corpus, as tiny.yaml
    python launch/prepare_data.py --input 'c4/en/c4-train.*.json.gz' --out data/c4 --num-proc 16
    python launch/prepare_data.py --input allenai/c4 --hf-config en --out data/c4 --tokenizer t.model
    python launch/prepare_data.py --input 'c4/en/c4-train.*.json.gz' --out data/c4-llama3 --tokenizer Meta-Llama-3-8B
    python launch/prepare_data.py --input 'c4/en/c4-train.*.json.gz' --val-input 'c4/en/c4-validation.*.json.gz' \
        --out data/c4   # C4's own validation set (the paper's numbers), not a hash split of the training files
    python launch/prepare_data.py --mix data/c4:0.8 data/code:0.2 --out data/c4-code   # a weighted mixture
        # of prepared dirs (one tokenizer among them): no tokens copied; train with --data-dir data/c4-code

Re-running with the same inputs and options is a no-op; data from other inputs or options is replaced only
with --overwrite. See relora_ds.data.prepare.PrepareConfig.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

try:
    from relora_ds.data import PrepareConfig, prepare_data
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from relora_ds.data import PrepareConfig, prepare_data
from relora_ds.train_args import ArgumentParser  # noqa: E402  (argparse with hints for misspelled flags)
from relora_ds.train_config import show_config_warnings_plainly  # noqa: E402
from cli_types import DefaultsHelpFormatter, tolerant_stdout  # noqa: E402  (launch/, the script's directory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = {f.name: f.default for f in dataclasses.fields(PrepareConfig)}
    p = ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--input", nargs="+", action="extend", default=None,
                   help="files, directories, globs (.txt/.jsonl/.json[.gz], .parquet) or one hub dataset "
                        "name (given twice: both lists); default: the built-in corpus (Wikipedia summaries + "
                        "Shakespeare)")
    p.add_argument("--mix", nargs="+", action="extend", default=None, metavar="DIR:WEIGHT",
                   help="write a mixture of these prepared data dirs (at least two, one tokenizer) instead of "
                        "tokenizing: training reads their windows in the weights' proportions (relora_ds.data."
                        "mixture); takes only --out and --overwrite")
    p.add_argument("--out", required=True, help="data dir to write")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", default=None, help="existing tokenizer to use: a SentencePiece .model, a Hugging "
                     "Face tokenizer.json (its tokenizer_config.json beside it) or a model directory holding one")
    tok.add_argument("--vocab-size", type=int, default=None, help="vocab of the BPE tokenizer to train (32000)")
    p.add_argument("--seq-len", type=int, default=None, help="report windows per split for this length")
    p.add_argument("--text-column", nargs="+", action="extend", default=None,
                   help="column holding the text in JSON/Parquet/hub inputs; several: each file takes the first "
                        "it has, e.g. --text-column text content (default: text)")
    p.add_argument("--num-proc", type=int, default=defaults["num_proc"],
                   help="tokenizer processes (threads when streaming); the output does not depend on it (default: 1)")
    p.add_argument("--hf-config", default=None, help="config of a hub dataset (e.g. 'en' for allenai/c4)")
    p.add_argument("--hf-revision", default=None, help="branch, tag or commit of a hub dataset (default: its "
                   "default branch); the resolved commit is recorded in the manifest")
    p.add_argument("--val-fraction", type=float, default=defaults["val_fraction"],
                   help="share of the input documents in the validation split (a hash of each text)")
    p.add_argument("--val-input", dest="val_inputs", nargs="+", action="extend", default=None,
                   help="a separate validation corpus (files, directories, globs or one hub dataset name); every "
                        "--input document then trains")
    p.add_argument("--hf-split", default=defaults["hf_split"], help="split of a hub dataset --input")
    p.add_argument("--hf-val-split", default=None, help="split of a hub dataset --val-input (default: validation)")
    stream = p.add_mutually_exclusive_group()
    stream.add_argument("--streaming", dest="streaming", action="store_true", default=None,
                        help="read local files with datasets' streaming (default: for corpora larger than a quarter "
                             "of RAM; hub datasets always stream)")
    stream.add_argument("--no-streaming", dest="streaming", action="store_false",
                        help="never stream local files (hub datasets always stream)")
    p.add_argument("--txt-unit", choices=["document", "paragraph", "line"], default=defaults["txt_unit"],
                   help="one document per .txt file, per paragraph (text between blank lines; a line of only "
                        "spaces or tabs is blank), or per line")
    p.add_argument("--max-docs", type=int, default=None, help="only the first N documents")
    p.add_argument("--tokenizer-train-chars", type=int, default=defaults["tokenizer_train_chars"],
                   help="characters of the training documents the BPE tokenizer learns from (default: 100M); "
                        "ignored, with a warning, with --tokenizer")
    p.add_argument("--overwrite", action="store_true",
                   help="replace data --out holds from another recipe (runs trained on it cannot resume after)")
    args = p.parse_args(argv)
    if args.text_column is None:  # a list default would be extended by the flag, not replaced
        args.text_column = [defaults["text_column"]]
    return args


def main(argv: list[str] | None = None) -> None:
    show_config_warnings_plainly()  # DataWarnings as one "warning: ..." line
    args = vars(parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    inputs, out, mix = args.pop("input"), args.pop("out"), args.pop("mix")
    try:
        if mix is not None:
            defaults = vars(parse_args(["--out", out]))
            other = sorted(f"--{k.replace('_', '-')}" for k, v in args.items()
                           if k != "overwrite" and v != defaults.get(k)) + (["--input"] if inputs else [])
            if other:
                raise ValueError(f"--mix combines prepared data dirs and takes only --out and --overwrite; also "
                                 f"given: {', '.join(other)} (prepare each member with those first)")
            from relora_ds.data.mixture import make_mixture, parse_member
            make_mixture([parse_member(m) for m in mix], out, overwrite=args["overwrite"])
            logging.info("wrote the mixture %s of %s", out, ", ".join(mix))
            return
        prepare_data(inputs, out, **args)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    tolerant_stdout()
    main()
