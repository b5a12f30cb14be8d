"""Corpus sources: the resolved inputs (:mod:`relora_ds.data.inputs`) read into one ``datasets`` dataset with
a single "text" column.

Accepted inputs: local ``.txt``, ``.jsonl``, ``.json`` (optionally gzipped) and ``.parquet`` files, given
as files, directories (searched recursively) or globs (the paper's C4 comes as ``c4-train.*.json.gz``),
or one Hugging Face hub dataset name (``allenai/c4`` with ``hf_config="en"``) when the machine is online.
``None`` means the built-in corpus (:mod:`relora_ds.data.builtin_corpus`).

Reading, decompression, JSON/Parquet parsing and streaming are ``datasets``' job. What is ours: running
the text repair pass (:mod:`relora_ds.data.repair`) on each text and JSON file (and its
invalid-UTF-8 half on the text column of each Parquet and Arrow file), grouping files datasets can
read as one schema, and the text-column check.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from relora_ds.data.builtin_corpus import builtin_documents
from relora_ds.data.inputs import DataWarning, builder_for, plain_names
from relora_ds.data.repair import _ESCAPED_BYTES, repair_utf8

TXT_UNITS = ("document", "paragraph", "line")
_STRING_DTYPES = ("string", "large_string")


@dataclass
class Corpus:
    """A corpus ready to tokenize."""

    dataset: datasets.Dataset | datasets.IterableDataset
    """One "text" column; an ``IterableDataset`` when streaming."""
    description: str
    """What was read, for the manifest and log lines."""
    invalid_utf8: dict[str, int] = field(default_factory=dict)
    """file -> number of invalid UTF-8 bytes replaced by U+FFFD."""
    lone_surrogates: dict[str, int] = field(default_factory=dict)
    """JSON file -> number of lone surrogate escapes replaced by ``\\ufffd``."""
    empty_files: list[str] = field(default_factory=list)
    """Files holding no record, skipped."""

    @property
    def streaming(self) -> bool:
        return isinstance(self.dataset, datasets.IterableDataset)


def _repair_job(args: tuple[str, str, str | list[str]]) -> tuple[int, int]:
    src, dest, text_column = args
    if builder_for(src) in ("parquet", "arrow"):
        return _repair_columnar(src, dest, text_column), 0
    return repair_utf8(src, dest, json=builder_for(src) == "json")


def _repair_columnar(path: str, dest: str, text_column: str | list[str]) -> int:
    """Write a copy of the Parquet or Arrow file `path` to `dest` with each invalid UTF-8 byte of its text
    column replaced by U+FFFD; returns how many there were (0: clean, nothing written). Arrow's string
    columns are meant to be UTF-8, but writers other than pyarrow do not all check it, and decoding one
    such value failed the whole prepare with a bare UnicodeDecodeError that named no file (a review)."""
    column = _invalid_utf8_column(path, text_column)
    if column is None:
        return 0
    schema = pq.read_schema(path) if builder_for(path) == "parquet" else _arrow_schema(path)
    at, bad = schema.get_field_index(column), 0
    with pq.ParquetWriter(dest, schema) if builder_for(path) == "parquet" else pa.ipc.new_stream(dest, schema) as out:
        for batch in _record_batches(path):
            texts = [None if raw is None else raw.decode("utf-8", "surrogateescape")
                     for raw in batch.column(at).cast(pa.large_binary()).to_pylist()]
            bad += sum(len(_ESCAPED_BYTES.findall(t)) for t in texts if t is not None)
            texts = [None if t is None else _ESCAPED_BYTES.sub("\ufffd", t) for t in texts]
            out.write_batch(batch.set_column(at, schema.field(column), pa.array(texts, schema.field(column).type)))
    return bad


def _invalid_utf8_column(path: str, text_column: str | list[str]) -> str | None:
    """The text column of a Parquet or Arrow file where it holds invalid UTF-8; None where it holds none, or
    where the file or its text column cannot be read here (the load names the problem)."""
    try:
        schema = pq.read_schema(path) if builder_for(path) == "parquet" else _arrow_schema(path)
        column = _text_column_of(schema.names, text_column)
        if column is None or str(schema.field(column).type) not in _STRING_DTYPES:
            return None
        for batch in _record_batches(path, [column]):
            try:
                batch.column(column).validate(full=True)
            except pa.ArrowInvalid:
                return column
    except (OSError, pa.ArrowException):
        pass
    return None


def _record_batches(path: str, columns: list[str] | None = None):
    """The record batches of a Parquet file (only `columns`, where given) or of an Arrow stream (all)."""
    if builder_for(path) == "parquet":
        # 1024 rows a batch: ~100 MB at 100 KB documents (the repair holds a batch as Python strings).
        # pre_buffer (pyarrow's default) keeps every column chunk read until the file is done: the check held
        # a whole file's text column (582 MB of a 613 MB file, pyarrow 26); without it, one row group.
        yield from pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=1 << 10, columns=columns)
    else:
        with pa.memory_map(path) as source:
            yield from pa.ipc.open_stream(source)


def _arrow_schema(path: str) -> pa.Schema:
    with pa.memory_map(path) as source:
        return pa.ipc.open_stream(source).schema


def _repair_files(files: list[str], work_dir: Path, num_proc: int, text_column: str | list[str] = "text"
                  ) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """Replace files holding invalid UTF-8 (or lone surrogate escapes) by repaired copies in `work_dir`;
    warn once per such file. Returns the files to read and the counts of both repairs per file. Of a
    Parquet or Arrow file, only the text column (`text_column`, as in :func:`load_corpus`) is checked and
    repaired: the others are dropped when it is read."""
    checked = [f for f in files if builder_for(f) in ("text", "json", "parquet", "arrow")]
    if not checked:
        return files, {}, {}
    repair_dir = work_dir / "utf8-repaired"
    repair_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i, f in enumerate(checked):
        name = Path(f).name
        name = name[:-3] if name.lower().endswith(".gz") else name
        jobs.append((f, str(repair_dir / f"{i:06d}-{name}"), text_column))
        Path(jobs[-1][1]).unlink(missing_ok=True)  # written below only for a file that needs repair
    # Threads suffice: the cost is gzip inflation and the strict decode, which run outside the GIL
    # for large buffers; the slow repairing pass is only for the rare bad file.
    with ThreadPoolExecutor(max_workers=max(1, min(num_proc, len(jobs)))) as pool:
        counts = list(pool.map(_repair_job, jobs))
    replaced = {src: dest for src, dest, _ in jobs if os.path.exists(dest)}  # invalid bytes or a BOM
    invalid = {src: n for (src, _, _), (n, _) in zip(jobs, counts, strict=True) if n}
    lone = {src: n for (src, _, _), (_, n) in zip(jobs, counts, strict=True) if n}
    for src, n in invalid.items():
        warnings.warn(f"{src}: replaced {n} invalid UTF-8 bytes with U+FFFD", DataWarning, stacklevel=3)
    for src, n in lone.items():
        warnings.warn(f"{src}: replaced {n} lone UTF-16 surrogate escapes (such as \\ud800, which no text "
                      f"can hold) with \\ufffd", DataWarning, stacklevel=3)
    return [replaced.get(f, f) for f in files], invalid, lone


def _text_column_of(columns, text_column: str | list[str]) -> str | None:
    """The text column of a file with `columns`: `text_column`, or the first of a list that it has."""
    names = [text_column] if isinstance(text_column, str) else text_column
    return next((name for name in names if name in columns), None)


def _select_text(ds, text_column: str | list[str], origin: str, files: dict[str, str] | None = None):
    """`ds` reduced to one column named "text"; a clear error when `text_column` (each of a list) is missing
    or holds no text. ``files`` (path read: name to give) of a JSON group: where a record's value is not text,
    the error names the first such record."""
    if ds.features is not None:
        kinds = {name: f.dtype if isinstance(f, datasets.Value) else type(f).__name__
                 for name, f in ds.features.items()}
    else:  # streaming JSON learns its columns from the first record
        first = next(iter(ds), None)
        if first is None:
            kinds = {_text_column_of([], text_column) or "text": "string"}  # no records: the empty-corpus check
        else:
            kinds = {name: "string" if value is None or isinstance(value, str) else type(value).__name__
                     for name, value in first.items()}
    wanted, text_column = text_column, _text_column_of(kinds, text_column)
    if text_column is None:
        several = not isinstance(wanted, str)
        raise ValueError(f"{'none of the text columns' if several else 'text column'} "
                         f"{wanted if several else repr(wanted)} {'' if several else 'not '}found in {origin}; its "
                         f"columns are {list(kinds)} "
                         f"(choose {'them' if several else 'one'} with --text-column; several names: each file "
                         f"takes the first it has)")
    if kinds[text_column] not in _STRING_DTYPES:
        # Otherwise every value is skipped as a non-text and the corpus looks empty.
        bad = _first_non_text(files or {}, text_column)
        if bad:  # text in most records (datasets then reads the column as JSON values), not in this one
            raise ValueError(f"text column {text_column!r} of {origin} holds a value that is not text at {bad}: "
                             "fix or drop that record (a null value is skipped)")
        strings = [name for name, kind in kinds.items() if kind in _STRING_DTYPES]
        raise ValueError(f"text column {text_column!r} of {origin} holds {kinds[text_column]} values, not text; "
                         + (f"its string columns are {strings} (choose one with --text-column)" if strings
                            else f"it has no string column (its columns are {list(kinds)})"))
    ds = ds.select_columns([text_column])
    return ds.rename_column(text_column, "text") if text_column != "text" else ds


def _first_non_text(files: dict[str, str], column: str) -> str | None:
    """``"<file> line N: 12345 (int)"``: in JSON Lines files whose ``column`` holds text in some records, the
    first record whose value there is neither text nor null; None where the column holds no text at all
    (another column is meant), a file is not JSON Lines (a .json array), or the first 100,000 records do not
    show both (an error path: a large corpus is not read through)."""
    first, text, read = None, False, 0
    for path, name in files.items():
        try:
            with (gzip.open if path.lower().endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    read += 1
                    if read > 100_000:
                        return None
                    record = json.loads(line) if line.strip() else {}
                    value = record.get(column) if isinstance(record, dict) else None
                    text = text or isinstance(value, str)
                    if first is None and value is not None and not isinstance(value, str):
                        shown = json.dumps(value)
                        first = f"{name} line {n}: {shown[:60]}{'...' if len(shown) > 60 else ''} " \
                                f"({type(value).__name__})"
                    if first and text:
                        return first
        except (OSError, ValueError):  # not JSON Lines (a .json array, a record over lines): not located
            continue
    return None


# datasets splits paragraphs on "\n\n" only; a line of spaces or tabs between two paragraphs also ends one.
_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")
# Lines of only whitespace at a piece's start (a file's first lines) or end (its last, with no newline after).
_EDGE_BLANK_LINES = re.compile(r"\A(?:[^\S\n]*\n)+|(?:\n[^\S\n]*)+\Z")


def _split_paragraphs(batch: dict) -> dict:
    """Each of `batch`'s paragraphs split again at lines holding only whitespace; the separators go."""
    # A third newline after a paragraph, the file's last one, or a line of whitespace before the first paragraph
    # or after the last, stays on a paragraph otherwise: the same paragraph would then hash differently (the
    # split) and a duplicate could land in both splits.
    return {"text": [_EDGE_BLANK_LINES.sub("", p) for text in batch["text"] for p in _BLANK_LINES.split(text)
                     if p.strip()]}


def _same_text(batch: dict) -> dict:
    return {"text": batch["text"]}


def _concatenate(parts: list):
    """concatenate_datasets, after giving every part one string type where they differ: pyarrow and
    polars write parquet text as large_string, datasets' JSON reader gives string, and
    concatenate_datasets refuses to mix them (the cast is a pass over the data, so only when needed)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], datasets.IterableDataset):
        # Streaming: cast_column does not make the Arrow batches of the parts one type (iteration then
        # fails on "Schema at index 1 was different"), and a streaming .txt part has no features to compare;
        # a batched identity map with explicit features does.
        string = datasets.Features({"text": datasets.Value("string")})
        return datasets.concatenate_datasets([p.map(_same_text, batched=True, features=string) for p in parts])
    types = {None if p.features is None else p.features["text"].dtype for p in parts}
    if len(types) > 1 and "large_string" in types:
        parts = [p.cast_column("text", datasets.Value("large_string"))
                 if p.features is not None and p.features["text"] == datasets.Value("string") else p for p in parts]
    return datasets.concatenate_datasets(parts)


def _default_streaming(files: list[str]) -> bool:
    """Stream when the corpus is unlikely to fit in memory (gzip text counted at 4x its size)."""
    size = sum(os.path.getsize(f) * (4 if f.lower().endswith(".gz") else 1) for f in files)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return size > ram // 4


def load_corpus(
    resolved: tuple[list[str], str | None] | None,
    *,
    work_dir: Path,
    hub_revision: str | None = None,
    text_column: str | list[str] = "text",
    hf_config: str | None = None,
    txt_unit: str = "document",
    streaming: bool | None = None,
    num_proc: int = 1,
    hf_split: str = "train",
) -> Corpus:
    """Open the corpus :func:`resolve_inputs` found (None: the built-in one). `work_dir` holds datasets'
    cache. The inputs are resolved once by the caller: resolving warns about skipped files, and the
    fingerprint and the loading must see the same files. `hf_split`: the split of a hub dataset to read."""
    if txt_unit not in TXT_UNITS:
        raise ValueError(f"txt_unit={txt_unit!r} is not one of {TXT_UNITS}")
    if resolved is None:
        # The built-in corpus is documents of text: options about other inputs would do nothing (yet be
        # recorded in the manifest's recipe, so that a later run with the defaults is refused).
        given = {k: v for k, v, default in (("hf_config", hf_config, None), ("hf_split", hf_split, "train"),
                                            ("hub_revision", hub_revision, None),
                                            ("text_column", text_column, "text"),
                                            ("txt_unit", txt_unit, "document")) if v != default}
        if given:
            raise ValueError(f"{', '.join(f'{k}={v!r}' for k, v in given.items())}: only for given inputs (a hub "
                             f"dataset, files); the built-in corpus (no inputs) takes none of hf_config, "
                             f"hf_split, hub_revision, text_column, txt_unit")
        docs = builtin_documents()
        ds = datasets.Dataset.from_dict({"text": [d["text"] for d in docs]})
        if streaming:  # 10 MB fit in memory; streaming it only exercises the streaming path
            ds = ds.to_iterable_dataset()
        return Corpus(ds, f"built-in corpus ({len(docs)} documents)")

    files, hub = resolved
    if hub is not None:
        return _load_hub(hub, hf_config, text_column, hub_revision, hf_split)
    if hf_split != "train":
        raise ValueError(f"hf_split={hf_split!r} only applies to a hub dataset input, not local files")
    if hf_config is not None:
        raise ValueError(f"hf_config={hf_config!r} only applies to a hub dataset input, not local files")
    if streaming is None:
        streaming = _default_streaming(files)
    originals = files
    files, invalid, lone = _repair_files(files, work_dir, num_proc, text_column)
    originals = dict(zip(files, originals, strict=True))  # repaired copy -> the file it repairs
    # Empty shards are common in real corpora: skipped, not the whole prepare failed (datasets fails on one).
    empty = [originals[f] for f in files if _holds_no_records(f, builder_for(f))]
    skipped = set(empty)
    shown = f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}"
    if len(empty) == len(files):
        raise ValueError(f"empty corpus: {'the' if len(files) == 1 else 'all'} {len(files)} input files hold no "
                         f"records: {shown}")
    if empty:
        warnings.warn(f"skipped {len(empty)} empty input files (no records): {shown}", DataWarning, stacklevel=2)
    description = f"{len(files)} local files" + (f" ({len(empty)} empty)" if empty else "")
    files = [f for f in files if originals[f] not in skipped]

    parts = []
    # Consecutive files with the same builder and columns are read together (datasets reads a group as one
    # schema: Parquet files with other metadata columns beside the text failed); order is the resolved order.
    # JSON files are read one by one, each with its own schema: datasets fixes a JSON group's schema from its
    # first file, so a later file whose records add a key failed when streaming (a CastError), and one whose
    # text column holds a number was cast to the first file's strings and trained as its digits (a review).
    groups: list[tuple[tuple, list[str]]] = []
    for f in files:
        key = (builder_for(f), _columns(f, builder_for(f), text_column))
        alone = key[0] == "json"
        if groups and groups[-1][0] == key and not alone:
            groups[-1][1].append(f)
        else:
            groups.append((key, [f]))
    for (builder, _), group in groups:
        kwargs = {"sample_by": txt_unit} if builder == "text" else {}
        retry = len(group) > 1 and not streaming
        try:
            # datasets logs "Failed to read file ..." before raising; a failure here is retried file by file
            # below (a file it cannot read is named there), so the log would only alarm
            with _datasets_quiet() if retry else contextlib.nullcontext():
                parts.append(_load_group(builder, group, text_column, txt_unit, streaming, work_dir, kwargs,
                                         originals))
        except ValueError:
            if len(group) == 1 or streaming:
                raise
            # A schema the first records did not show (a later record with more keys): file by file, so
            # that each keeps its own columns and an unreadable one is named.
            parts += [_load_group(builder, [f], text_column, txt_unit, streaming, work_dir, kwargs, originals)
                      for f in group]
    ds = _concatenate(parts)
    return Corpus(ds, description, invalid, lone, empty)


@contextlib.contextmanager
def _datasets_quiet():
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


@contextlib.contextmanager
def _no_download_counts():
    """datasets sends an HTTP HEAD per load_dataset call to count downloads of its builder ("json"): a JSON file
    is loaded alone, so 1,000 local files cost 1,000 requests (half of prepare's time, 0.05 s each). Off while
    we load local files (the loads are sequential), as it was."""
    before, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS, False
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = before


def _load_group(builder, group, text_column, txt_unit, streaming, work_dir, kwargs, originals=None):
    named = [(originals or {}).get(f, f) for f in group]  # a repaired copy is named by its original file
    origin = named[0] if len(group) == 1 else f"{len(group)} {builder} files ({named[0]}, ...)"
    try:
        with _no_download_counts():
            ds = datasets.load_dataset(builder, data_files=plain_names(group), split="train", streaming=streaming,
                                       cache_dir=str(work_dir / "hf-cache"), **kwargs)
    except datasets.exceptions.DatasetGenerationError as e:
        raise ValueError(f"could not read {origin}: {e.__cause__ or e}") from e
    except (pa.ArrowInvalid, OSError) as e:  # a corrupt Parquet or Arrow file: Arrow's message names none
        raise ValueError(f"could not read {origin}: {type(e).__name__}: {e}") from e
    except StopIteration as e:  # datasets' JSON reader on a file with no records
        raise ValueError(f"could not read {origin}: no records (an empty file?)") from e
    ds = _select_text(ds, "text" if builder == "text" else text_column, origin,
                      dict(zip(group, named)) if builder == "json" else None)
    if builder == "text" and txt_unit == "paragraph":
        ds = ds.map(_split_paragraphs, batched=True)
    return ds


def _holds_no_records(path: str, builder: str | None) -> bool:
    """Whether a file holds no record: no byte of text (.txt; a blank one is a blank document), nothing but
    whitespace or an empty array (.jsonl, .json), no row (.parquet, .arrow). datasets fails on such a file
    ("no records", Arrow's "BatchSize must be greater than 0"). Unreadable here: False (the load names why)."""
    try:
        if builder == "parquet":
            return pq.read_metadata(path).num_rows == 0
        if builder == "arrow":  # datasets writes Arrow streams; reading one memory-mapped copies nothing
            with pa.memory_map(path) as source:
                return all(batch.num_rows == 0 for batch in pa.ipc.open_stream(source))
        with (gzip.open if path.lower().endswith(".gz") else open)(path, "rb") as f:
            if builder == "text":
                return not f.read(1)
            seen = b""
            while len(seen) <= 2 and (chunk := f.read(1 << 16)):
                seen += b"".join(chunk.split())
            return seen in (b"", b"[]")
    except (OSError, EOFError, ValueError, pa.ArrowException):
        return False


def _columns(path: str, builder: str | None, text_column: str | list[str] = "text") -> tuple | None:
    """A file's column names, sorted, and its text column's type, read cheaply: a Parquet schema, or the
    first record of a JSON Lines file (what datasets infers its columns from); None where that cannot tell
    (a .json array, .txt). datasets casts each file of a group to the first one's types: a file whose text
    column holds numbers, grouped after one of strings, would be read as the strings "0", "1", ..."""
    try:
        if builder == "parquet":
            schema = pq.read_schema(path)
            column = _text_column_of(schema.names, text_column)
            kind = str(schema.field(column).type) if column is not None else None
            return (*sorted(schema.names), kind)
        if builder != "json":
            return None
        opener = gzip.open if str(path).lower().endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            while line := f.readline(1 << 20):  # at most 1 MB: a .json array can be one huge line
                if line.strip():
                    record = json.loads(line)  # a cut line fails here: None
                    if not isinstance(record, dict):
                        return None
                    return (*sorted(record), type(record.get(_text_column_of(record, text_column))).__name__)
    except (OSError, ValueError, EOFError):  # unreadable here: the load names the problem
        return None
    return None


def _load_hub(name: str, hf_config: str | None, text_column: str | list[str], revision: str | None,
              split: str = "train") -> Corpus:
    try:
        # Streaming: the paper's C4 is hundreds of GB; nothing is downloaded ahead of tokenization.
        ds = datasets.load_dataset(name, hf_config, split=split, streaming=True, revision=revision)
    except Exception as e:  # offline, unknown name, bad config or split: all surface as different types
        raise ValueError(
            f"could not open Hugging Face hub dataset {name!r} (config {hf_config!r}, split {split!r}): "
            f"{type(e).__name__}: {e}. Hub datasets need network access; a local path by this name "
            f"does not exist either."
        ) from e
    return Corpus(_select_text(ds, text_column, f"hub dataset {name!r}"),
                  f"hub dataset {name} ({hf_config}, {split}) at {revision}")
