"""Data pipeline throughput: tokenizing the built-in corpus, assembling batches from the memory-mapped
token file, and how long a training step waits for its batch with and without data_prefetch.

    python launch/bench_data.py                      # vocab 32000, seq_len 1024, micro-batch 8
    python launch/bench_data.py --vocab-size 2048 --num-proc 2
    python launch/bench_data.py --tokenizer path/to/model_dir     # an existing .model or tokenizer.json

Batch assembly runs on one thread (torch and numpy), with the token file in the page cache (as after
the first epoch) and, as a worst case, evicted from it before every batch (with the trainer's
access="random" and the kernel's default read-around); the target is >= 1M tokens/s. The stall rows time
steps of --step-ms (a sleep, as the host waits on a GPU) that each take one batch read from storage.
Results go to stdout as one JSON line per measurement (see BENCHMARKS.md for recorded runs).
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from cli_types import DefaultsHelpFormatter, positive_float, positive_int

try:
    from relora_ds.data import MixedWindows, PackedTokens, ShardedBatches, load_manifest, prepare_data
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from relora_ds.data import MixedWindows, PackedTokens, ShardedBatches, load_manifest, prepare_data


def bench_tokenize(out_dir: Path, vocab_size: int | None, num_proc: int, tokenizer: str | None = None) -> dict:
    start = time.perf_counter()
    prepare_data(None, out_dir, vocab_size=vocab_size, num_proc=num_proc, tokenizer=tokenizer)
    total = time.perf_counter() - start
    m = load_manifest(out_dir)
    tokens = sum(s["tokens"] for s in m["splits"].values())
    return {"what": "tokenize built-in corpus", "tokenizer": tokenizer or "trained SentencePiece BPE",
            "vocab_size": m["vocab_size"], "num_proc": num_proc,
            "documents": sum(s["documents"] for s in m["splits"].values()), "tokens": tokens,
            "train_tokens": m["splits"]["train"]["tokens"], "val_tokens": m["splits"]["validation"]["tokens"],
            "tokenize_tokens_per_s": m["stats"]["tokens_per_second"],
            "prepare_seconds_incl_tokenizer_training": round(total, 2)}


REPEATS = 5


def _time(fn, steps: int, repeats: int = REPEATS) -> float:
    """Seconds for `steps` calls: the best of `repeats` runs (the machine is shared; the best run is
    the one least disturbed by other processes)."""
    fn()  # first touch of the memmap pages and the epoch permutation
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, time.perf_counter() - start)
    return best


_MAPPED: list[PackedTokens] = []  # every mapping of the token file this process opened


def _open(data_dir: Path, seq_len: int, access: str) -> PackedTokens:
    ds = PackedTokens(data_dir, "train", seq_len=seq_len, access=access)
    ds.tokens  # noqa: B018  map the file
    _MAPPED.append(ds)
    return ds


def _evict(path: Path) -> None:
    """Drop the token file from the page cache, so the next reads come from storage. The kernel keeps a page
    cached while a process maps it: first unmap this process's pages of each of its mappings (MADV_DONTNEED on
    a read-only file mapping drops the page-table entries, not the data), then drop the file's cached pages.
    The rows' major page faults show whether storage was read."""
    for ds in _MAPPED:
        ds._mmap.madvise(mmap.MADV_DONTNEED)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_batches(data_dir: Path, seq_len: int, micro_batch_size: int, steps: int) -> list[dict]:
    ds = _open(data_dir, seq_len, "random")  # as the trainer reads it
    sampler = ShardedBatches(ds, micro_batch_size, rank=0, world_size=1, seed=0)
    rng = np.random.default_rng(0)
    tokens = ds.tokens

    def row_slices():  # the alternative PackedTokens.get_batch does not use; kept to show why
        out = np.empty((micro_batch_size, seq_len + 1), dtype=np.int64)
        for row, i in enumerate(rng.integers(0, len(ds), micro_batch_size)):
            out[row] = tokens[i * seq_len:i * seq_len + seq_len + 1]
        return torch.from_numpy(out)

    def cold(access: str):  # every batch read from storage: the file evicted from the page cache first
        data = _open(data_dir, seq_len, access)
        batches = ShardedBatches(data, micro_batch_size, rank=0, world_size=1, seed=0)

        def fn():
            _evict(data.path)
            return next(batches)
        return fn

    # A mixture (relora_ds.data.mixture) of two members, here the same token file twice at 0.7 / 0.3: the
    # epoch's position -> window table lookup and one gather per member on top of the plain read.
    mix = MixedWindows([ds, _open(data_dir, seq_len, "random")], [0.7, 0.3], seed=0)
    mixed = ShardedBatches(mix, micro_batch_size, rank=0, world_size=1, seed=0)
    rows = [("ShardedBatches (fancy-index gather)", lambda: next(sampler)),
            ("ShardedBatches over a 2-member mixture (0.7 / 0.3)", lambda: next(mixed)),
            ("a slice copy per row", row_slices),
            ("ShardedBatches, file evicted from page cache before each batch (access='random', as trained)",
             cold("random")),
            ("ShardedBatches, file evicted before each batch, the kernel's default read-around "
             "(access='normal')", cold("normal"))]
    results = []
    for name, fn in rows:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        seconds = _time(fn, steps)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults
        results.append({"what": f"batch assembly: {name}", "seq_len": seq_len,
                        "micro_batch_size": micro_batch_size, "steps": steps,
                        "tokens_per_s": round(steps * micro_batch_size * seq_len / seconds),
                        "us_per_batch": round(1e6 * seconds / steps, 1),
                        "major_faults_per_batch": round(faults / (REPEATS * steps + 1), 2)})
    return results


def bench_stall(data_dir: Path, seq_len: int, micro_batch_size: int, steps: int, step_ms: float) -> list[dict]:
    """How long a training step waits for its batch (the time in next()), each batch read from storage (the
    file evicted after every batch), when the step itself takes `step_ms` off the host (a sleep: the trainer
    waits on the device without the GIL): the data_prefetch setting's effect. Median of 3 runs."""
    results = []
    for prefetch in (0, 2):
        runs = []
        for _ in range(3):
            data = _open(data_dir, seq_len, "random")
            batches = ShardedBatches(data, micro_batch_size, rank=0, world_size=1, seed=0, prefetch=prefetch)
            faults, waited = resource.getrusage(resource.RUSAGE_SELF).ru_majflt, 0.0
            for _ in range(steps):
                _evict(data.path)
                start = time.perf_counter()
                next(batches)
                waited += time.perf_counter() - start
                time.sleep(step_ms / 1e3)
            batches.close()
            runs.append((waited, resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults))
        waited, faults = sorted(runs)[1]
        results.append({"what": f"data stall per step, data_prefetch={prefetch}, every batch read from storage",
                        "seq_len": seq_len, "micro_batch_size": micro_batch_size, "steps": steps,
                        "step_ms": step_ms, "wait_us_per_step": round(1e6 * waited / steps, 1),
                        "major_faults_per_batch": round(faults / steps, 2)})
    return results


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=DefaultsHelpFormatter)
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--vocab-size", type=int, default=None, help="of the BPE trained on the corpus (32000)")
    tok.add_argument("--tokenizer", default=None, help="an existing SentencePiece .model, tokenizer.json or model dir")
    p.add_argument("--num-proc", type=positive_int, default=1)
    p.add_argument("--seq-len", type=positive_int, default=1024)
    p.add_argument("--micro-batch-size", type=positive_int, default=8)
    p.add_argument("--steps", type=positive_int, default=1000, help="batches per timed run (best of 5)")
    p.add_argument("--step-ms", type=positive_float, default=5.0,
                   help="the simulated training step of the data-stall rows, in ms (default 5)")
    args = p.parse_args()
    torch.set_num_threads(1)
    env = {"device": f"{_cpu_name()}, 1 thread", "python":
           platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "date": date.today().isoformat()}
    print(json.dumps({"what": "environment", **env}))
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "builtin"
        print(json.dumps(bench_tokenize(data_dir, args.vocab_size, args.num_proc, args.tokenizer)), flush=True)
        for row in bench_batches(data_dir, args.seq_len, args.micro_batch_size, args.steps):
            print(json.dumps(row), flush=True)
        stall_steps = max(1, min(args.steps, 200))  # each step sleeps step_ms
        for row in bench_stall(data_dir, args.seq_len, args.micro_batch_size, stall_steps, args.step_ms):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
