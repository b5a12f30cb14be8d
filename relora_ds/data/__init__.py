"""Data pipeline: corpus -> tokenizer (SentencePiece, trained or given, or a
Hugging Face tokenizer.json) -> packed token files -> sharded, resumable batches.

``prepare_data`` tokenizes once into a data dir (``launch/prepare_data.py`` is its command line);
training reads fixed windows from it with ``PackedTokens`` and ``ShardedBatches``. ``make_mixture`` writes a
weighted mixture of prepared dirs (``prepare_data.py --mix``), whose windows ``MixedWindows`` reads;
``open_split`` opens either kind for training, ``open_eval_split`` for an evaluation (a mixture's members
each on their own: ``MemberSplits``). Nothing here
imports ``torch.distributed`` or DeepSpeed: the caller passes its rank and world size.

Preparing imports Hugging Face ``datasets`` (with pandas and pyarrow, ~1.5 s); training only reads prepared
files, so ``prepare_data``, ``PrepareConfig`` and ``in_validation`` load on first use: every rank of a run
starts without them.
"""
import importlib

from relora_ds.data.manifest import builtin_data_dir, load_manifest
from relora_ds.data.mixture import MemberSplits, MixedWindows, make_mixture, open_eval_split, open_split
from relora_ds.data.packed import PackedTokens
from relora_ds.data.sampler import ShardedBatches, epoch_order, eval_batches
from relora_ds.data.inputs import SUPPORTED_SUFFIXES, DataWarning
from relora_ds.data.tokenizer import Tokenizer, check_tokenizer_matches, load_tokenizer, open_tokenizer

__all__ = [
    "DataWarning", "MemberSplits", "MixedWindows", "PackedTokens", "PrepareConfig", "SUPPORTED_SUFFIXES", "ShardedBatches", "Tokenizer",
    "builtin_data_dir", "check_tokenizer_matches", "epoch_order", "eval_batches", "in_validation",
    "load_manifest", "load_tokenizer", "make_mixture", "open_eval_split", "open_split", "open_tokenizer", "prepare_data",
]

_ON_FIRST_USE = {"PrepareConfig": "prepare", "prepare_data": "prepare", "in_validation": "encode"}


def __getattr__(name: str):
    if name in _ON_FIRST_USE:
        return getattr(importlib.import_module(f"relora_ds.data.{_ON_FIRST_USE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
