"""What the benchmark scripts share: the kernel package's loader, GPU timing (clocks up, CUDA-event medians,
host issue time, peak memory), the ``D_INxD_OUT`` argument and the rows sink that writes each result the moment
it is measured (a run cut at its time limit keeps what it measured). Used by bench_kernels.py, bench_int8.py,
bench_merge_rounding.py, tune_kernels.py, bench_host_overhead.py and compile_kernels.py."""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shape_arg(text: str) -> tuple[int, int]:
    """argparse type for ``D_INxD_OUT`` (e.g. ``4096x4096``)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; expected D_INxD_OUT with positive integers, "
                                         "e.g. 4096x4096 or 2048x5461")
    return int(parts[0]), int(parts[1])


def load_relora_kernels():
    """``import relora_kernels``, or, when it is not pip-installed (a bare GPU image), kernels/ under that name."""
    try:
        import relora_kernels
    except ImportError:
        import importlib.util
        spec = importlib.util.spec_from_file_location("relora_kernels", ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        relora_kernels = importlib.util.module_from_spec(spec)
        sys.modules["relora_kernels"] = relora_kernels
        spec.loader.exec_module(relora_kernels)
    return relora_kernels


# ---------------------------------------------------------------------------------------------------
# Timing: one shared utility
# ---------------------------------------------------------------------------------------------------
def spin_up(device, seconds):
    """Keep the GPU busy with bf16 matrix products for ``seconds``, so its clocks have ramped before a timing.
    The H100 of 2026-11-22 idled at 345 MHz, and a GPU waits while Triton compiles on the host; that run's
    first-timed fused forward read 0.498 ms where the same code, timed next under another provider name,
    read 0.277 ms (cause not established; clocks are the likely one)."""
    if device != "cuda":
        return
    import torch
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(8):
            a @ a
        torch.cuda.synchronize()


def bench(fn, device, rep=200, warmup=100):
    """(median, p20, p80) in ms. CUDA: triton.testing.do_bench (events, ``warmup`` and ``rep`` ms)."""
    t0 = time.perf_counter()
    fn()  # compile / autotune outside the timed region
    if device == "cuda":
        import torch
        import triton
        torch.cuda.synchronize()
        if time.perf_counter() - t0 > 0.5:  # it compiled or autotuned: the GPU sat idle meanwhile
            spin_up(device, 0.3)
        ms = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=(0.5, 0.2, 0.8))
        return tuple(ms)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[0], times[-1]


def hold_gpu(device, cycles=200_000_000):
    """On CUDA, queue a sleep kernel (~0.1 s of cycles by default) after the work so far: calls issued next
    never wait for the GPU, so their host time is Python, autograd and launch overhead alone."""
    if device == "cuda":
        import torch
        torch.cuda.synchronize()
        torch.cuda._sleep(cycles)


def host_ms(fn, device, calls=None):
    """Host (CPU) milliseconds to issue one call of ``fn``, the GPU held by :func:`hold_gpu` meanwhile: an op
    whose ``host_ms`` comes near its event-timed ``ms`` is launch-bound, and do_bench's number is then the
    CPU's. (The H200 run of 2026-12-04 timed the fused layer's fwd+bwd at d=2048 at 1.34 ms against 0.38 +
    0.63 ms for fwd and bwd timed apart.) 20 calls of ~10 launches stay far below CUDA's queue of pending
    launches, past which a launch would block. On CPU (the interpreter) one call: the column then only
    shows the script runs."""
    calls = calls or (20 if device == "cuda" else 1)
    hold_gpu(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = time.perf_counter() - t0
    if device == "cuda":
        import torch
        torch.cuda.synchronize()
    return dt / calls * 1e3


def peak_mib(fn, device):
    if device != "cuda":
        return float("nan")
    import torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


class RowSink(list):
    """The rows of a run, appended to what ``path`` already holds (CSV, or a JSON list for ``.json``) and
    written out with ``stamp`` the moment each is made: a run killed at its time limit (the one scarce GPU
    call) keeps every row it measured. Each write replaces the file whole (a temporary file renamed over
    it, so a kill mid-write leaves the previous version), and a CSV's header is the union of every row's
    keys, so rows of different kinds (kernels, drift, memory) keep their columns."""

    def __init__(self, path: Path, stamp: dict | None = None):
        super().__init__()
        self.path, self.stamp = Path(path), stamp or {}
        self.previous = read_rows(self.path)

    def append(self, row):
        super().append({**row, **self.stamp})
        write_rows(self.previous + list(self), self.path)

    def extend(self, rows):
        for row in rows:
            self.append(row)

    def __iadd__(self, rows):
        self.extend(rows)
        return self


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    if path.suffix == ".json":
        return json.loads(path.read_text())
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_rows(rows: list[dict], path: Path) -> None:
    """``rows`` as the whole content of ``path`` (CSV, or JSON for ``.json``), replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".json":
        tmp.write_text(json.dumps(rows, indent=1))
    else:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
    os.replace(tmp, path)
