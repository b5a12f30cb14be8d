"""Random access to fixed training windows of a packed token file (memory-mapped, nothing loaded).

Window ``i`` is tokens ``[i*seq_len, i*seq_len + seq_len + 1)``: inputs are its first ``seq_len``
tokens, targets its last ``seq_len``. Consecutive windows share one token, so every token of the split
except the first is a target exactly once. The last ``(tokens - 1) % seq_len`` tokens of a split fill no
whole window and are not trained on (fewer than ``seq_len`` per split, whatever the corpus size).
"""
from __future__ import annotations

import mmap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from relora_ds.data.manifest import load_manifest


# How the split's pages are read from storage (madvise). The default read-around fetches ~128 KiB or more
# around each page fault: for shuffled training windows of a few KiB that is mostly wasted, and reading
# windows evicted from the page cache was 9x slower with it at 8 x 1025 and 4.7x at 64 x 257
# (launch/bench_data.py on this project's CPU VM; BENCHMARKS.md).
_MADVISE = {"random": "MADV_RANDOM", "normal": "MADV_NORMAL", "sequential": "MADV_SEQUENTIAL"}


def num_windows(tokens: int, seq_len: int) -> int:
    """Windows of ``seq_len + 1`` tokens in a split of ``tokens`` (0 when it holds ``seq_len`` or fewer)."""
    return max(0, (int(tokens) - 1) // seq_len)


class PackedTokens:
    """``len(ds)`` windows of ``seq_len + 1`` token ids; ``ds[i]`` is a LongTensor of that shape."""

    def __init__(self, data_dir: str | Path, split: str = "train", *, seq_len: int, access: str = "normal"):
        """`access`: how windows will be read, the kernel's read-ahead policy for the mapping (madvise):
        "random" (shuffled training windows: read only the pages a window covers), "sequential" or
        "normal" (the kernel's default read-around)."""
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r} must be a positive int")
        if access not in _MADVISE:
            raise ValueError(f"access={access!r} is not one of {sorted(_MADVISE)}: 'random' for shuffled windows, "
                             "'sequential' for one pass in order, 'normal' for the kernel's default read-ahead")
        manifest = load_manifest(data_dir)
        if split not in manifest["splits"]:
            raise ValueError(f"split={split!r} is not in {str(data_dir)!r}; its splits are "
                             f"{sorted(manifest['splits'])}")
        info = manifest["splits"][split]
        if "path" not in info:
            raise ValueError(f"{str(data_dir)!r} is a mixture of prepared data dirs, not one: open it with "
                             "relora_ds.data.open_split, which reads its members")
        self.path = Path(info["path"])
        self.dtype = np.dtype(manifest["dtype"])
        self.num_tokens = int(info["tokens"])
        size = self.path.stat().st_size if self.path.is_file() else None
        if size != self.num_tokens * self.dtype.itemsize:
            raise ValueError(f"{str(self.path)!r} has {size} bytes, but the manifest says "
                             f"{self.num_tokens} {self.dtype} tokens; re-run prepare_data")
        self.split, self.seq_len, self.manifest, self.access = split, seq_len, manifest, access
        self._num_windows = num_windows(self.num_tokens, seq_len)
        self._tokens: np.ndarray | None = None
        self._mmap: mmap.mmap | None = None

    @property
    def tokens(self) -> np.ndarray:
        """The whole split as a read-only array over a memory map, opened on first use (also after pickling)."""
        if self._tokens is None:
            if not self.num_tokens:  # an empty file cannot be mapped; an empty split has no windows to read anyway
                self._tokens = np.zeros(0, dtype=self.dtype)
            else:
                with open(self.path, "rb") as f:
                    self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                advice = getattr(mmap, _MADVISE[self.access], None)  # madvise is POSIX-only
                if advice is not None and hasattr(self._mmap, "madvise"):
                    self._mmap.madvise(advice)
                self._tokens = np.frombuffer(self._mmap, dtype=self.dtype)
        return self._tokens

    def __getstate__(self) -> dict:
        # A memory map does not pickle (and copying its data would load the split): a copy maps the file anew.
        return {**self.__dict__, "_tokens": None, "_mmap": None}

    def __len__(self) -> int:
        return self._num_windows

    def _check(self, i: int) -> int:
        if not 0 <= i < self._num_windows:
            raise IndexError(f"window {i} out of range for {self._num_windows} windows "
                             f"({self.split}, seq_len={self.seq_len})")
        return i * self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        start = self._check(int(i))
        return torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Windows `indices` stacked: a LongTensor (len(indices), seq_len + 1)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._num_windows):
            bad = idx[(idx < 0) | (idx >= self._num_windows)][0]
            raise IndexError(f"window {bad} out of range for {self._num_windows} windows "
                             f"({self.split}, seq_len={self.seq_len})")
        # One fancy-index gather: 3.3x faster than a slice copy per row at 64 x 257, 9% slower at 8 x 1025
        # (launch/bench_data.py, one core, 2026-11-22; BENCHMARKS.md "Batch assembly": both far above need).
        offsets = idx[:, None] * self.seq_len + np.arange(self.seq_len + 1)  # (B, seq_len + 1)
        return torch.from_numpy(self.tokens[offsets].astype(np.int64))
