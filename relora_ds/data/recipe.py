"""What a preparation is: its options (:class:`PrepareConfig`), the recipe recorded from them (everything that
decides the bytes of the token files), and how two recipes are compared and told apart. relora_ds/data/prepare.py
prepares a data dir only when its manifest's recipe is not this one."""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from relora_ds.data import manifest as mf
from relora_ds.data.inputs import DataWarning, builder_for, corpus_fingerprint, hub_commit
from relora_ds.data.sources import TXT_UNITS
from relora_ds.data.tokenizer import resolve_tokenizer

DEFAULT_VOCAB_SIZE = 32000


@dataclass(frozen=True)
class PrepareConfig:
    """How to turn a corpus into a prepared data dir (everything but the inputs and the dir)."""

    tokenizer: str | None = None
    """An existing tokenizer to use: a SentencePiece ``.model``, a Hugging Face ``tokenizer.json`` (with its
    tokenizer_config.json beside it) or a model directory holding either; None trains a SentencePiece BPE on
    the corpus's training split."""
    vocab_size: int | None = None
    """Vocabulary of the trained tokenizer (None: 32000). With `tokenizer`: None or its exact size."""
    seq_len: int | None = None
    """Only reported (windows per split, documents longer than a window): the files do not depend on it."""
    text_column: str | list[str] = "text"
    """Column holding the text in JSON/Parquet/hub corpora (``.txt`` files have none); a list: each file (or
    the hub dataset) takes the first of them it has."""
    num_proc: int = 1
    """Tokenizer processes (``datasets.map``) or threads (streaming); the output does not depend on it."""
    hf_config: str | None = None
    """Config name of a hub dataset input (``en`` for ``allenai/c4``)."""
    hf_revision: str | None = None
    """Branch, tag or commit of a hub dataset input (None: its default branch); the commit it resolves to is
    recorded, and the data is re-prepared when it moves."""
    val_fraction: float = 0.01
    """Share of documents in the validation split, chosen by a hash of each document's text."""
    val_inputs: tuple[str, ...] | None = None
    """A separate corpus for the validation split (files, directories, globs or a hub dataset name, read
    with the same text_column, hf_config, hf_revision and txt_unit), e.g. C4's own validation set, which the
    paper reports; every document of the inputs then trains (val_fraction is not used). None: the hash split."""
    hf_split: str = "train"
    """Split of a hub dataset input."""
    hf_val_split: str | None = None
    """Split of a hub dataset in val_inputs (None: "validation")."""
    streaming: bool | None = None
    """Read the corpus with ``datasets`` streaming; None: for hub datasets and corpora > RAM/4."""
    txt_unit: str = "document"
    """What one document is in a ``.txt`` file: the whole "document", a "paragraph" or a "line"."""
    max_docs: int | None = None
    """Use only the first N documents of the inputs (smoke tests; val_inputs are read whole); None: all."""
    tokenizer_train_chars: int = 100_000_000
    """Train the tokenizer on the first ~N characters of the training split (about 100 MB of text)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "max_docs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive int or None")
        if not isinstance(self.num_proc, int) or self.num_proc < 1:
            raise ValueError(f"num_proc={self.num_proc!r} must be a positive int")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction!r} must be in [0, 1)")
        if self.val_inputs is not None:
            if isinstance(self.val_inputs, (str, Path)) or not self.val_inputs:
                raise ValueError(f"val_inputs={self.val_inputs!r} must be a non-empty list of files, directories, "
                                 "globs or one hub dataset name")
            object.__setattr__(self, "val_inputs", tuple(str(v) for v in self.val_inputs))
            if self.val_fraction != PrepareConfig.val_fraction:
                raise ValueError(f"val_fraction={self.val_fraction} splits the inputs, val_inputs gives the "
                                 "validation split: give one of the two")
        if self.hf_val_split is not None and self.val_inputs is None:
            raise ValueError(f"hf_val_split={self.hf_val_split!r} is the split of a hub dataset in val_inputs; "
                             "there are no val_inputs")
        if self.txt_unit not in TXT_UNITS:
            raise ValueError(f"txt_unit={self.txt_unit!r} is not one of {TXT_UNITS}")
        names = [self.text_column] if isinstance(self.text_column, str) else self.text_column
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"text_column={self.text_column!r} must be a column name or a non-empty list of them")
        if not isinstance(self.text_column, str):  # one name: a str, as recipes recorded it; JSON-safe list
            object.__setattr__(self, "text_column", names[0] if len(names) == 1 else list(names))
        if self.tokenizer_train_chars < 1:
            raise ValueError(f"tokenizer_train_chars={self.tokenizer_train_chars!r} must be positive")


def current_commit(hub: str, revision: str | None, out_dir: Path, validation: bool = False) -> str:
    """The hub dataset's commit now; offline, the one `out_dir` was prepared at (with a warning), so that
    re-running on prepared data stays a no-op without network. `validation`: of the val_inputs dataset.
    A revision that is a commit sha is that commit, online or not. Offline with a branch or tag named, which
    the prepared data does not record, the data may be of another revision: an error (it kept the prepared
    commit, and the run was a no-op on data of another revision; a review)."""
    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        return hub_commit(hub, revision)
    except ValueError as e:
        recipe = (mf.read_manifest_file(out_dir) or {}).get("recipe", {})
        prepared = (recipe.get("validation_corpus", {}) if validation else recipe).get("hub_commit")
        if prepared is None:
            raise
        if revision is not None:
            raise ValueError(f"{e} The data in {out_dir} was prepared at commit {prepared}, but which commit "
                             f"revision {revision!r} names now cannot be checked offline: pin the commit sha as "
                             "hf_revision (--hf-revision), which needs no network") from e
        warnings.warn(f"cannot reach the hub to check whether {hub!r} moved; keeping the data prepared at "
                      f"commit {prepared}", DataWarning, stacklevel=4)
        return prepared


def recipe_of(resolved: tuple[list[str], str | None] | None, cfg: PrepareConfig, out_dir: Path,
            resolved_val: tuple[list[str], str | None] | None = None) -> dict:
    """Everything that decides the bytes of the token files, and nothing else: not num_proc, streaming
    or seq_len, nor how the inputs were spelled (the fingerprint covers the resolved files)."""
    if cfg.tokenizer is not None:
        tokenizer = {"given": mf.tokenizer_sha256(resolve_tokenizer(cfg.tokenizer))}
    else:
        tokenizer = {"train_bpe": {"vocab_size": cfg.vocab_size or DEFAULT_VOCAB_SIZE,
                                   "train_chars": cfg.tokenizer_train_chars}}
    hub = resolved[1] if resolved is not None else None
    if hub is None and (resolved_val is None or resolved_val[1] is None) and cfg.hf_revision is not None:
        raise ValueError(f"hf_revision={cfg.hf_revision!r} only applies to a hub dataset input")
    commit = current_commit(hub, cfg.hf_revision, out_dir) if hub is not None else None
    # Keys absent at their defaults: data prepared before they existed keeps its recipe (no re-prepare).
    val = {}
    if resolved_val is not None:
        val_hub = resolved_val[1]
        val_commit = current_commit(val_hub, cfg.hf_revision, out_dir, validation=True) if val_hub else None
        val = {"validation_corpus": {
            "fingerprint": corpus_fingerprint(resolved_val, cfg.hf_config, hub_revision=val_commit),
            **({"hub_commit": val_commit, "hf_split": cfg.hf_val_split or "validation"} if val_commit else {})}}
    return {
        "corpus_fingerprint": corpus_fingerprint(resolved, cfg.hf_config, hub_revision=commit),
        **({"hub_commit": commit} if commit else {}),  # absent for local corpora: their recipes are unchanged
        **({"hf_split": cfg.hf_split} if cfg.hf_split != "train" else {}),
        **val,
        "tokenizer": tokenizer,
        "text_column": cfg.text_column, "hf_config": cfg.hf_config, "txt_unit": cfg.txt_unit,
        "val_fraction": cfg.val_fraction, "max_docs": cfg.max_docs,
    }


_IGNORED_BECAUSE = {"txt_unit": "no input is a .txt file (it says what one document of a .txt file is)",
                    "text_column": ".txt files have no columns",
                    "tokenizer_train_chars": "a given tokenizer is used as it is (the text a tokenizer's training "
                                             "reads applies only where one is trained: no --tokenizer)"}


def inapplicable_options(resolved: tuple[list[str], str | None] | None,
                          resolved_val: tuple[list[str], str | None] | None,
                          tokenizer_given: bool = False) -> dict[str, object]:
    """The options that cannot change these inputs' documents (training and validation) or their tokens, with
    their defaults: txt_unit without a .txt file, text_column with .txt files alone (None for the built-in
    corpus, which refuses both: load_corpus), tokenizer_train_chars with a given tokenizer."""
    if resolved is None:
        return {"tokenizer_train_chars": PrepareConfig.tokenizer_train_chars} if tokenizer_given else {}
    sides = [r for r in (resolved, resolved_val) if r is not None]
    builders = {builder_for(f) for files, _ in sides for f in files}
    defaults = {}
    if "text" not in builders:
        defaults["txt_unit"] = PrepareConfig.txt_unit
    if builders == {"text"} and not any(hub for _, hub in sides):
        defaults["text_column"] = PrepareConfig.text_column
    if tokenizer_given:
        defaults["tokenizer_train_chars"] = PrepareConfig.tokenizer_train_chars
    return defaults


def at_defaults(cfg: PrepareConfig, inapplicable: dict[str, object]) -> PrepareConfig:
    """`cfg` with the `inapplicable` options at their defaults, each one given warned about. Recorded as given,
    an identical re-run without it was another recipe (refused), and the data's fingerprint changed with it, so
    checkpoints could not resume on the same bytes."""
    for name, default in inapplicable.items():
        if getattr(cfg, name) != default:
            warnings.warn(f"{name}={getattr(cfg, name)!r} is ignored: {_IGNORED_BECAUSE[name]}", DataWarning,
                          stacklevel=4)
    return replace(cfg, **inapplicable)


def same_recipe(old: dict | None, new: dict, inapplicable: dict[str, object]) -> bool:
    """Whether a manifest's recipe `old` is `new`, the `inapplicable` options aside: data prepared before they
    were recorded at their defaults holds them as given (txt_unit 'line' with .jsonl files alone), and is the
    same data when the rest, the input files' fingerprint included, is the same."""
    return old is not None and {**old, **{k: new[k] for k in inapplicable if k in old}} == new


_ABSENT = object()


def recipe_diff(old: dict, new: dict, prefix: str = "") -> str:
    """The recipe keys that differ, as ``key: old -> new`` (nested keys dotted; a key only one side has is
    "absent"; long values shown around where they first differ)."""
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            parts.append(recipe_diff(a, b, f"{prefix}{key}."))
        else:
            ta, tb = ("absent" if v is _ABSENT else json.dumps(v) for v in (a, b))
            parts.append(f"{prefix}{key}: {' -> '.join(_around_first_difference(ta, tb))}")
    return "; ".join(parts)


def _around_first_difference(a: str, b: str, width: int = 40) -> tuple[str, str]:
    """``a`` and ``b`` cut to about ``width`` characters each, keeping where they first differ in view."""
    if max(len(a), len(b)) <= width:
        return a, b
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, first - width // 2)
    return tuple(("..." if start else "") + t[start:start + width] + ("..." if len(t) > start + width else "")
                 for t in (a, b))
