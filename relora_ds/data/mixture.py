"""Weighted mixtures of prepared data dirs (Megatron-LM's blended datasets, at the level of training windows).

A mixture dir (``launch/prepare_data.py --mix DIR:WEIGHT DIR:WEIGHT ... --out MIX``) holds no tokens: its
manifest names its members (prepared data dirs, one tokenizer among them), their weights and the fingerprint
each member's training split had, and a copy of their tokenizer. Training on it (``--data-dir MIX``) reads
windows of every member in the weights' proportions. Its evaluation (:class:`MemberSplits`) reads each member's
own validation windows, spread evenly over them as for one prepared dir, and weights the members' losses by
the mixture's weights.

One epoch of a mixture holds as many windows as its members together (``N``, counted in windows at the run's
seq_len); member ``i`` (``n_i`` windows) fills ``q_i`` of them, ``w_i · N`` rounded by largest remainder, so
weights proportional to the members' window counts read each window once per epoch, as one prepared dir of all
of them would. A member with a larger share (``q_i >= n_i``) is read ``floor(q_i / n_i)`` whole shuffles per
epoch and ``q_i mod n_i`` windows of one more: each of its windows ``floor`` or ``ceil(q_i / n_i)`` times in
every epoch. One with a smaller share walks on through its windows from epoch to epoch: epoch ``e`` takes
windows ``e·q_i .. (e+1)·q_i - 1`` of an endless stream of shuffles of all its windows, so over the epochs it
covers every window before repeating one; and no epoch reads one of its windows twice: where an epoch runs from
the end of one shuffle into the next, the next one starts with windows that epoch has not read yet (the others
follow in its drawn order; as drawn, such an epoch read about ``t·h/n`` windows twice, ``t`` and ``h`` its
windows on either side, up to a quarter of them, and an optimizer step could hold a window twice). The sampler
(:class:`relora_ds.data.ShardedBatches`) shuffles the epoch's ``N`` positions as for one dir: ranks, resume and
re-sharding work unchanged; the mapping from (epoch, position) to a member's window is a pure function of the
members' window counts, the weights and the seed (each shuffle drawn from them), so an exact resume stays exact.
Each epoch's mapping is built once, as one array of ``N`` window ids (the size of the sampler's own epoch order),
and shared by the reading threads.
"""
from __future__ import annotations

import math
import os
import shutil
import threading
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from relora_ds.data import manifest as mf
from relora_ds.data.inputs import DataWarning
from relora_ds.data.packed import PackedTokens, num_windows

KIND = "mixture"


def parse_member(spec: str) -> tuple[str, float]:
    """``"DIR:WEIGHT"`` -> (DIR, WEIGHT); the weight is the text after the last colon, a finite number > 0."""
    path, sep, weight = str(spec).rpartition(":")
    try:
        value = float(weight) if sep and path else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"mixture member {spec!r} is not DIR:WEIGHT with a weight > 0 (e.g. data/c4:0.8)")
    return path, value


def is_mixture(manifest: dict) -> bool:
    return manifest.get("kind") == KIND


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to ``total`` in the proportions ``shares`` (which sum to 1): floors, then one more for
    the largest fractional parts (ties: the earlier member)."""
    exact = shares * total
    counts = np.floor(exact).astype(np.int64)
    left = total - int(counts.sum())
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    counts[order[:left]] += 1
    return counts


def _split_counts(manifest: dict) -> dict:
    """Tokens and documents of each split: what a mixture records of a member, and checks again."""
    return {s: {k: int(manifest["splits"][s].get(k, 0)) for k in ("tokens", "documents")} for s in mf.SPLITS}


def member_dirs(data_dir: str | Path, manifest: dict) -> list[Path]:
    """The members' directories (stored relative to the mixture dir, or absolute)."""
    return [(Path(data_dir) / m["path"]).resolve() for m in manifest["members"]]


def make_mixture(members: Sequence[tuple[str | Path, float]], out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the mixture dir ``out_dir`` of ``members`` ((data dir, weight), at least two); returns it. A no-op
    when it already holds this mixture of these members as they are now; another mixture or prepared data
    there is replaced only with ``overwrite``."""
    out_dir = Path(out_dir)
    if len(members) < 2:
        raise ValueError(f"a mixture needs at least two members (DIR:WEIGHT), got {len(members)}")
    dirs = [Path(d).resolve() for d, _ in members]
    if len(set(dirs)) < len(dirs):
        raise ValueError(f"a mixture names a data dir twice: {[str(d) for d in dirs]}; give each once, with the "
                         "sum of its weights")
    if out_dir.resolve() in dirs:
        raise ValueError(f"--out {out_dir} is one of the mixture's members: write the mixture to a dir of its own")
    weights = np.array([float(w) for _, w in members])
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"mixture weights must be finite and > 0, got {weights.tolist()}")
    manifests = []
    for d in dirs:
        if not (d / mf.MANIFEST).is_file():
            raise ValueError(f"mixture member {d} is not a prepared data dir (no {mf.MANIFEST}); prepare it first "
                             "with python launch/prepare_data.py --input ... --out DIR")
        m = mf.load_manifest(d)
        if is_mixture(m):
            raise ValueError(f"mixture member {d} is itself a mixture: name its members, with their weights "
                             "multiplied out, instead")
        manifests.append(m)
    keys = ("tokenizer_sha256", "vocab_size", "dtype", "bos_id", "eos_id", "pad_id", "unk_id")
    differ = [k for k in keys if len({repr(m.get(k)) for m in manifests}) > 1]
    if differ:
        listing = "; ".join(f"{d}: " + ", ".join(f"{k}={str(m.get(k))[:12]}" for k in differ)
                            for d, m in zip(dirs, manifests))
        raise ValueError(f"the mixture's members were tokenized differently ({', '.join(differ)} differ: {listing}): "
                         "training reads one tokenizer's ids; prepare every member with the same --tokenizer "
                         "(e.g. the first member's tokenizer file)")
    shares = weights / weights.sum()
    recorded = [{"path": os.path.relpath(d, out_dir.resolve()), "weight": float(w),
                 "fingerprint": mf.train_data_fingerprint(m),
                 "splits": _split_counts(m)}
                for d, w, m in zip(dirs, shares, manifests)]
    recipe = {"mixture": [{"fingerprint": r["fingerprint"], "weight": r["weight"]} for r in recorded]}
    try:
        old = mf.read_manifest_file(out_dir)
    except mf.DamagedManifest as e:  # written anew below, with --overwrite (it may be a prepared dir's)
        if not overwrite:
            raise ValueError(f"{e}; pass --overwrite to write the mixture there, or another --out") from None
        old = None
    if old is not None and old.get("recipe") == recipe:
        # The same members' data and weights: runs trained on it resume on it whatever else is rewritten (a
        # member moved, named here at its new place; a tokenizer copy lost).
        if mf.files_intact(out_dir, old) and old.get("members") == recorded:
            return out_dir
    elif old is not None and not overwrite:
        raise ValueError(f"{out_dir} holds {'another mixture' if is_mixture(old) else 'prepared data'}; runs trained "
                         "on it could not resume once it is replaced. Pass --overwrite to replace it, or another --out")
    first, tok = dirs[0], Path(manifests[0]["tokenizer_path"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / mf.MANIFEST).unlink(missing_ok=True)
    for name in (*mf.TOKENIZER_FILES, *(f"{s}.bin" for s in mf.SPLITS)):
        (out_dir / name).unlink(missing_ok=True)  # another recipe's tokenizer and token files
    names = [tok.name] if tok.suffix != ".json" else [n for n in (*mf.HF_TOKENIZER_FILES, *mf.HF_CHAT_TEMPLATE_FILES)
                                                      if (first / n).is_file()]
    for name in names:
        shutil.copyfile(tok.parent / name, out_dir / name)
    base = manifests[0]
    manifest = {
        "format": mf.FORMAT, "kind": KIND, "recipe": recipe,
        **{k: base.get(k) for k in ("vocab_size", "bos_id", "eos_id", "pad_id", "unk_id", "dtype")},
        "tokenizer_path": tok.name, "tokenizer_sha256": base["tokenizer_sha256"],
        "members": recorded,
        "splits": {s: {"tokens": sum(r["splits"][s]["tokens"] for r in recorded),
                       "documents": sum(r["splits"][s]["documents"] for r in recorded),
                       "members": [{"path": r["path"], "tokens": r["splits"][s]["tokens"], "weight": r["weight"]}
                                   for r in recorded]}
                   for s in mf.SPLITS},
        "corpus": {"description": "mixture of " + ", ".join(f"{r['path']} ({r['weight']:.3g})" for r in recorded)},
        # What the members' own manifests warned of (counted there): document masking reads both.
        "warnings": {key: sum(int(m.get("warnings", {}).get(key, 0)) for m in manifests)
                     for key in ("unk_tokens", "documents_holding_eos")},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    mf.write_manifest(out_dir, manifest)
    return out_dir


def check_members(data_dir: str | Path, manifest: dict) -> list[Path]:
    """The members' directories, each checked to hold the training data the mixture was made of (its
    fingerprint) and its tokenizer; a member prepared again since is a ValueError naming the fix."""
    dirs = member_dirs(data_dir, manifest)
    for d, m in zip(dirs, manifest["members"]):
        if not (d / mf.MANIFEST).is_file():
            raise ValueError(f"mixture {data_dir}: its member {m['path']} ({d}) is not a prepared data dir (moved or "
                             "deleted?); the mixture stores its members' paths relative to itself: keep them where "
                             "they were, or make the mixture again (launch/prepare_data.py --mix)")
        now = mf.load_manifest(d)
        if (mf.train_data_fingerprint(now) != m["fingerprint"] or _split_counts(now) != m["splits"]
                or now["tokenizer_sha256"] != manifest["tokenizer_sha256"]):
            raise ValueError(f"mixture {data_dir}: its member {d} was prepared again since the mixture was made (its "
                             "training or validation data or its tokenizer changed): make the mixture again "
                             "(launch/prepare_data.py --mix ... --overwrite); a run trained on the old mixture "
                             "cannot resume on it")
    return dirs


def _manifest_quotas(split: dict, seq_len: int) -> np.ndarray | None:
    """Each member's positions in an epoch of a mixture's split entry at ``seq_len`` (MixedWindows.quotas,
    from the manifest); None for a plain split or a member without a window."""
    members = split.get("members", [])
    sizes = [num_windows(m["tokens"], seq_len) for m in members]
    if not members or not all(sizes):
        return None
    shares = np.array([m["weight"] for m in members], dtype=float)
    return _largest_remainder(shares / shares.sum(), sum(sizes))


def _label(member: dict) -> str:
    return f"{member['path']} (weight {member['weight']:.3g})"


def starved_members(split: dict, seq_len: int) -> list[str]:
    """The members of a mixture's split entry that hold windows at ``seq_len`` but whose weight gives them no
    position of an epoch (``w_i · N`` rounds to 0); [] for a plain split."""
    quotas = _manifest_quotas(split, seq_len)
    return [] if quotas is None else [_label(m) for m, q in zip(split["members"], quotas) if q == 0]


def evaluation_windows(shares, sizes, windows: int | None) -> np.ndarray:
    """How many windows an evaluation reads of each member of a mixture (``sizes``: their windows): all of
    them (``windows`` None), else ``windows`` shared out in the weights' proportions (largest remainder), at
    least one per member, so that every member's loss is measured, and at most its own count."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if windows is None:
        return sizes.copy()
    shares = np.asarray(shares, dtype=float)
    return np.minimum(np.maximum(_largest_remainder(shares / shares.sum(), int(windows)), 1), sizes)


def split_windows(split: dict, seq_len: int) -> int:
    """Windows of a manifest's split entry at ``seq_len``: a mixture's are its members' (each cut on its own)."""
    if "members" in split:
        return sum(num_windows(m["tokens"], seq_len) for m in split["members"])
    return num_windows(split["tokens"], seq_len)


def open_eval_split(data_dir: str | Path, split: str = "validation", *, seq_len: int):
    """What an evaluation reads of ``split``: a prepared dir's windows (:class:`PackedTokens`), or a mixture's
    members' own (:class:`MemberSplits`). A member without a window at ``seq_len`` in the split (an empty
    validation split, or one shorter than a window) is left out with a DataWarning, the others' weights
    renormalized; a ValueError where no member has one."""
    manifest = mf.load_manifest(data_dir)
    if not is_mixture(manifest):
        return PackedTokens(data_dir, split, seq_len=seq_len)
    members = [(m, PackedTokens(d, split, seq_len=seq_len)) for d, m in zip(check_members(data_dir, manifest),
                                                                             manifest["members"])]
    kept = [(m, s) for m, s in members if len(s)]
    left_out = [f"{m['path']} ({m['splits'][split]['tokens']:,} tokens)" for m, s in members if not len(s)]
    if not kept:
        raise ValueError(f"mixture {data_dir}: no member's {split} split holds a window of seq_len={seq_len} "
                         f"(seq_len + 1 tokens): {', '.join(left_out)}; use a smaller seq_len, or prepare the "
                         "members with a larger --val-fraction (launch/prepare_data.py)")
    if left_out:
        warnings.warn(f"mixture {data_dir}: member(s) {', '.join(left_out)} hold no window of seq_len={seq_len} "
                      f"in their {split} split, so evaluation leaves them out: its loss is the mixture of the other "
                      "members (their weights renormalized)", DataWarning, stacklevel=2)
    return MemberSplits([s for _, s in kept], [m["weight"] for m, _ in kept], [m["path"] for m, _ in kept])


def member_labels(names: Sequence[str]) -> list[str]:
    """What metrics call each member: its dir's name where those are unique, else its path as given."""
    short = [Path(n).name or n for n in names]
    return short if len(set(short)) == len(short) else list(names)


class MemberSplits:
    """A mixture's split as an evaluation reads it: each member's own windows (``sources``) and its share of
    the weights (``shares``); relora_ds.evaluate reads ``evaluation_windows`` of each member, spread over its
    windows as for one prepared dir, and weights the members' losses by ``shares``."""

    def __init__(self, sources: Sequence, weights: Sequence[float], names: Sequence[str]):
        if not len(sources) == len(weights) == len(names) or not sources:
            raise ValueError(f"{len(sources)} sources, {len(weights)} weights and {len(names)} names")
        w = np.array([float(x) for x in weights])
        self.sources, self.shares, self.names = list(sources), w / w.sum(), list(names)
        self.labels = member_labels(self.names)
        self.sizes = np.array([len(s) for s in sources], dtype=np.int64)
        self.seq_len = sources[0].seq_len

    def __len__(self) -> int:
        return int(self.sizes.sum())


def open_split(data_dir: str | Path, split: str = "train", *, seq_len: int, access: str = "normal",
               seed: int = 0):
    """The windows of ``split`` of a prepared dir (:class:`PackedTokens`) or of a mixture dir
    (:class:`MixedWindows`, ``seed`` drawing its members' shuffles)."""
    manifest = mf.load_manifest(data_dir)
    if not is_mixture(manifest):
        return PackedTokens(data_dir, split, seq_len=seq_len, access=access)
    dirs = check_members(data_dir, manifest)
    sources = [PackedTokens(d, split, seq_len=seq_len, access=access) for d in dirs]
    return MixedWindows(sources, [m["weight"] for m in manifest["members"]], seed=seed,
                        names=[m["path"] for m in manifest["members"]])


class MixedWindows:
    """``len(ds)`` windows of ``seq_len + 1`` token ids drawn from ``sources`` in the proportions ``weights``
    (see the module docstring). Positions index epoch 0; :meth:`epoch_view` gives epoch ``e``'s (the sampler
    asks for it). ``ds[i]``/``get_batch`` read like :class:`PackedTokens`'."""

    def __init__(self, sources: Sequence, weights: Sequence[float], *, seed: int = 0,
                 names: Sequence[str] | None = None):
        names = list(names) if names is not None else [f"member {i}" for i in range(len(sources))]
        if len(sources) != len(weights) or len(names) != len(sources) or not sources:
            raise ValueError(f"{len(sources)} sources, {len(weights)} weights and {len(names)} names")
        seq_lens = {getattr(s, "seq_len", None) for s in sources}
        if len(seq_lens) != 1:
            raise ValueError(f"the mixture's sources have windows of different seq_len: {sorted(map(str, seq_lens))}")
        self.sizes = np.array([len(s) for s in sources], dtype=np.int64)
        empty = [n for n, size in zip(names, self.sizes) if size == 0]
        split = getattr(sources[0], "split", None)
        self.seq_len, self.split = seq_lens.pop(), split
        if empty:
            raise ValueError(f"mixture member(s) {empty} hold no window of seq_len={self.seq_len} in their "
                             f"{split or ''} split: use a smaller seq_len, or leave them out of the mixture")
        w = np.array([float(x) for x in weights])
        if not all(math.isfinite(x) and x > 0 for x in w):
            raise ValueError(f"mixture weights must be finite and > 0, got {w.tolist()}")
        self.shares = w / w.sum()
        self.length = int(self.sizes.sum())
        self.quotas = _largest_remainder(self.shares, self.length)
        starved = [f"{n} (weight {s:.3g})" for n, s, q in zip(names, self.shares, self.quotas) if q == 0]
        if starved:
            raise ValueError(f"mixture member(s) {starved} get no window of the {self.length:,} in an epoch of the "
                             f"mixture at seq_len={self.seq_len}: raise their weights, or leave them out")
        self.sources, self.names, self.seed, self.epoch = list(sources), names, int(seed), 0
        self.labels = member_labels(names)
        self.num_tokens = sum(int(getattr(s, "num_tokens", 0)) for s in sources)
        self.offsets = np.cumsum(self.sizes) - self.sizes  # member i's windows are ids offsets[i] + w
        # Epoch -> the id of the window at each position (shared by the views and the reading threads; built
        # once under the lock; the newest two epochs' are kept).
        self._tables: dict[int, np.ndarray] = {}
        # Member -> {c: its shuffle c as read} (_walk), the newest two kept, built under the same lock.
        self._walks: dict[int, dict[int, np.ndarray]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.length

    def epoch_view(self, epoch: int) -> "MixedWindows":
        """The same mixture with positions indexing epoch ``epoch`` (sharing the members and shuffles)."""
        if epoch == self.epoch:
            return self
        view = object.__new__(MixedWindows)
        view.__dict__.update(self.__dict__)
        view.epoch = int(epoch)
        return view

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tables": {}, "_walks": {}, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _shuffle(self, member: int, key: tuple[int, ...]) -> np.ndarray:
        size = int(self.sizes[member])
        order = np.arange(size, dtype=np.uint32 if size < 2**32 else np.int64)
        np.random.default_rng([self.seed, member, *key, 0x6D6978]).shuffle(order)
        return order

    def _member_windows(self, member: int, epoch: int) -> np.ndarray:
        """The windows member ``member`` fills its ``q`` positions of ``epoch`` with, in position order."""
        q, n = int(self.quotas[member]), int(self.sizes[member])
        if q >= n:  # whole shuffles of this epoch, and part of one more
            parts = [self._shuffle(member, (1, epoch, c)) for c in range(-(-q // n))]
            return np.concatenate(parts)[:q]
        first, last = epoch * q, (epoch + 1) * q  # a slice of the member's endless stream of shuffles
        parts = [self._walk(member, c) for c in range(first // n, (last - 1) // n + 1)]
        return np.concatenate(parts)[first - first // n * n:][:q]

    def _walk(self, member: int, c: int) -> np.ndarray:
        """Shuffle ``c`` of a down-weighted member's stream (``q < n``) as read: the one drawn for it, but where an
        epoch crosses into it from shuffle ``c - 1`` (``t`` windows there, ``q - t`` here), its first ``q - t``
        are the first drawn that the epoch's ``t`` did not read. That depends on shuffle ``c - 1`` as read, so the
        walk goes from the last one kept (the newest two per member), from shuffle 0 after a resume."""
        q, n = int(self.quotas[member]), int(self.sizes[member])
        kept = self._walks.setdefault(member, {})
        start = max((k for k in kept if k <= c), default=None)
        walk = kept[start] if start is not None else self._shuffle(member, (0, 0))
        for k in range(0 if start is None else start + 1, c + 1):
            if k:
                drawn, t = self._shuffle(member, (0, k)), k * n % q  # t: the crossing epoch's windows before it
                if t:
                    read = np.zeros(n, dtype=bool)
                    read[walk[n - t:]] = True
                    first = np.flatnonzero(~read[drawn])[:q - t]
                    rest = np.ones(n, dtype=bool)
                    rest[first] = False
                    drawn = np.concatenate([drawn[first], drawn[rest]])
                walk = drawn
            kept[k] = walk
            for old in sorted(kept)[:-2]:
                del kept[old]
        return walk

    def _table(self) -> np.ndarray:
        table = self._tables.get(self.epoch)
        if table is None:
            with self._lock:
                table = self._tables.get(self.epoch)
                if table is None:  # filled in place: no int64 copies of the whole table on the way
                    dtype = np.dtype(np.uint32 if self.length < 2**32 else np.int64)
                    table = np.empty(self.length, dtype=dtype)
                    for m, (lo, q) in enumerate(zip(self.quotas.cumsum() - self.quotas, self.quotas)):
                        part = table[lo:lo + q]
                        part[:] = self._member_windows(m, self.epoch)
                        part += dtype.type(self.offsets[m])
                    self._tables[self.epoch] = table
                    # the newest two epochs (a read of the one before may still run in another thread) and this
                    for old in sorted(self._tables)[:-2]:
                        if old != self.epoch:
                            del self._tables[old]
        return table

    def locate(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """(member, window within that member) of each position of this view's epoch."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if pos.size and (pos.min() < 0 or pos.max() >= self.length):
            bad = pos[(pos < 0) | (pos >= self.length)][0]
            raise IndexError(f"window {bad} out of range for {self.length} windows (a mixture, seq_len={self.seq_len})")
        ids = self._table()[pos].astype(np.int64)
        member = np.searchsorted(self.offsets, ids, side="right") - 1
        return member, ids - self.offsets[member]

    def get_batch(self, indices) -> torch.Tensor:
        """Windows at positions ``indices`` of this view's epoch, stacked: LongTensor (len(indices), seq_len + 1)."""
        member, window = self.locate(indices)
        out = torch.empty((member.size, self.seq_len + 1), dtype=torch.long)
        for m in np.unique(member).tolist():
            rows = np.nonzero(member == m)[0]
            out[torch.from_numpy(rows)] = self.sources[m].get_batch(window[rows])
        return out

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.get_batch([int(i)])[0]
