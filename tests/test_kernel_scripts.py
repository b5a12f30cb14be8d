"""The kernel scripts run end to end on CPU (interpreter, tiny shapes): launch/bench_kernels.py,
launch/tune_kernels.py, launch/gpu_check.sh. Not performance numbers; those live in BENCHMARKS.md."""
from __future__ import annotations

import datetime
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from kernel_utils import HAS_CUDA, ROOT


def test_bench_script_smoke(tmp_path):
    """launch/bench_kernels.py runs end to end (CPU interpreter, tiny shapes), writes keyed rows and prints the
    fused lines' ratios to the baselines."""
    out = tmp_path / "bench.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "bench_kernels.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "NOT performance numbers" in proc.stdout
    import csv
    rows = list(csv.DictReader(out.open()))
    assert {(r["op"], r["provider"]) for r in rows} >= {("linear", p) for p in
                                                       ("full", "frozen", "peft", "torch_fused", "fused",
                                                                            "fused_splitdb", "fused_det",
                                                                            "fused_tma", "fused_blas_lr",
                                                                            "fused_tma_blas_lr")}
    assert {r["provider"] for r in rows if r["op"] == "merge"} == {"merge", "merge_fp32ab", "torch", "copy"}
    assert rows[0]["op"] == "merge"  # first: a run cut at its limit still has the merge rows
    assert {"op", "provider", "mode", "M", "d_in", "d_out", "r", "dtype", "device", "torch", "triton", "date",
            "ms"} <= set(rows[0])
    assert all(float(r["max_rel_err"]) < 1e-4 for r in rows if "fused" in r["provider"])
    # merge GB/s: W read and written, A and B read (fp32 for merge_fp32ab; the copy reads and writes W only)
    for r in (r for r in rows if r["op"] == "merge"):
        elem = {"float32": 4, "bfloat16": 2, "float16": 2}[r["dtype"]]
        d_in, d_out, rank = int(r["d_in"]), int(r["d_out"]), int(r["r"])
        factor = {"copy": 0, "merge_fp32ab": 4}.get(r["provider"], elem)
        want = 2 * d_out * d_in * elem + rank * (d_in + d_out) * factor
        assert math.isclose(float(r["gbps"]) * float(r["ms"]) * 1e6, want, rel_tol=1e-9), r
    assert all(float(r["host_ms"]) > 0 for r in rows if r["op"] == "linear")  # the launch-bound check's column
    # The table's ratio columns on each fused line, the docstring's (d)/(a), (d)/(c), (d)/(b): /full=, /peft=,
    # /frozen=, each the fused time over that baseline's in the same mode (oracle: the CSV's ms, one pass).
    ms = {(r["mode"], r["provider"]): float(r["ms"]) for r in rows if r["op"] == "linear"}
    table = [line.split() for line in proc.stdout.splitlines() if line.startswith("linear")]
    fused = [f for f in table if f[6] == "fused"]  # op, mode, M, d_in, d_out, r, provider, ...
    assert sorted(f[1] for f in fused) == ["bwd", "fwd", "fwd+bwd"], proc.stdout
    for f in fused:
        ratios = dict(t[1:].split("=") for t in f if t.startswith("/"))
        assert ratios.keys() == {"full", "peft", "frozen"}, f
        for base, value in ratios.items():
            assert math.isclose(float(value), ms[(f[1], "fused")] / ms[(f[1], base)], rel_tol=1e-3, abs_tol=1e-3), f
    if not HAS_CUDA:
        proc = subprocess.run([sys.executable, str(ROOT / "launch" / "bench_kernels.py"), "--out",
                               str(tmp_path / "x.csv")], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr


def test_row_sink_keeps_every_column_and_what_the_file_held(tmp_path):
    """Rows of different kinds (bench_int8.py: kernel timings, drift, memory) each keep their own columns in
    a CSV; a second run appends to the first's rows; the file is complete after every row (a stage killed
    at its limit keeps what it measured)."""
    import csv
    import json
    sys.path.insert(0, str(ROOT / "launch"))
    from bench_common import RowSink

    for name in ("rows.csv", "rows.json"):
        path = tmp_path / name
        sink = RowSink(path, {"date": "d1"})
        sink.append({"op": "Y", "ms": 1.5})
        sink += [{"op": "drift", "k": 3, "err": 0.25}]
        read = (lambda: json.loads(path.read_text())) if name.endswith(".json") else \
            (lambda: list(csv.DictReader(path.open(newline=""))))
        first = read()
        RowSink(path, {"date": "d2"}).append({"op": "merge", "gbps": 900})
        rows = read()
        assert len(first) == 2 and len(rows) == 3 and not list(tmp_path.glob("*.tmp"))
        if name.endswith(".csv"):
            assert rows[0] == {"op": "Y", "ms": "1.5", "date": "d1", "k": "", "err": "", "gbps": ""}
            assert rows[1]["k"] == "3" and rows[1]["err"] == "0.25" and rows[1]["ms"] == ""
            assert rows[2]["gbps"] == "900" and rows[2]["date"] == "d2"
        else:
            assert rows == [{"op": "Y", "ms": 1.5, "date": "d1"}, {"op": "drift", "k": 3, "err": 0.25, "date": "d1"},
                            {"op": "merge", "gbps": 900, "date": "d2"}]


def test_tune_script_smoke(tmp_path):
    """launch/tune_kernels.py: every launch of the breakdown and every sweep candidate runs and matches torch
    (its own check, recorded per row); a candidate that computes wrong values is reported, never timed."""
    out = tmp_path / "tune.json"
    # Sizes given with --smoke are honoured (it sets the defaults), the sweep runs at its own shapes.
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "tune_kernels.py"), "--device", "cpu", "--smoke",
                           "--M", "80", "--rank", "4", "--shapes", "40x24", "--sweep-shapes", "24x40",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    import json
    rows = json.loads(out.read_text())
    assert {(r["M"], r["r"]) for r in rows} == {(80, 4)}
    assert {(r["d_in"], r["d_out"]) for r in rows if r["section"] == "breakdown"} == {(40, 24)}
    assert {(r["d_in"], r["d_out"]) for r in rows if r["section"] == "sweep"} == {(24, 40)}
    kernel_rows = [r for r in rows if r["provider"] != "torch"]
    assert {r["op"] for r in kernel_rows if r["section"] == "breakdown"} == {"S", "Y", "Y_tma", "dSdB", "dS", "dB",
                                                                             "dA", "dX", "dX_tma", "merge",
                                                                             "merge32"}
    assert {r["op"] for r in kernel_rows if r["section"] == "sweep"} == {"S", "dS", "dB", "dA", "dSdB", "merge",
                                                                         "merge32", "Y_tma"}
    # fp32 factors: each tile with both product precisions (the launcher's choice, and exact fp32).
    assert {r["config"].split("DOT_PRECISION=")[1] for r in kernel_rows if r["op"] == "merge32"
            and r["section"] == "sweep"} == {"tf32x3", "ieee"}
    assert all(r["status"] == "ok" and r["err"] < 1e-4 for r in kernel_rows), [r for r in kernel_rows
                                                                               if r["status"] != "ok"]
    assert "sweep merge  best" in proc.stdout
    # The correctness gate works: a candidate whose values are wrong is flagged, not timed.
    sys.path.insert(0, str(ROOT / "launch"))
    import tune_kernels
    assert tune_kernels.max_rel_err(torch.ones(3), lambda: torch.ones(3)) == 0.0
    assert tune_kernels.max_rel_err(torch.zeros(3), lambda: torch.ones(3)) == 1.0
    # A NaN in a later output (a review: Python's max() kept the first output's error and the gate passed it)
    nan = torch.tensor([float("nan"), 1.0, 1.0])
    assert math.isnan(tune_kernels.max_rel_err((torch.ones(3), nan), lambda: (torch.ones(3), torch.ones(3))))


def test_tune_script_arguments():
    """--smoke sets small defaults, and --device cpu implies it (the interpreter ran the GPU sizes for hours,
    found by a user trial on 2026-12-05); a rank above a layer's width is refused at parse time."""
    sys.path.insert(0, str(ROOT / "launch"))
    import tune_kernels
    for argv in (["--device", "cpu", "--smoke"], ["--device", "cpu"]):
        args = tune_kernels.parse_args(argv)
        assert (args.M, args.rank, args.shapes, args.sweep_shapes, args.smoke) == (96, 8, [(48, 40)], [(48, 40)],
                                                                                   True)
    assert tune_kernels.parse_args(["--device", "cpu", "--M", "64"]).M == 64  # given sizes are honoured
    args = tune_kernels.parse_args([])
    assert (args.M, args.rank, args.shapes, args.sweep_shapes) == (16384, 128, [(2048, 2048), (4096, 4096)],
                                                                   [(2048, 2048)])
    with pytest.raises(SystemExit):
        tune_kernels.parse_args(["--shapes", "64x32", "--rank", "128"])


def test_tune_sweep_skips_the_candidates_that_cannot_fit(monkeypatch):
    """On Hopper (227 KB of shared memory), bf16, r=128: of the S candidates only the two 128x128 tiles with
    BLOCK_K=128 at 4 stages overflow (4 * (128 + 128) * 128 * 2 B = 256 KB; the next largest, 192 KB, fits);
    of the TMA ones the 128x256 and 256x128 tiles at 4 stages (192 KB of pipeline + 64 KB of store buffer).
    Those are skipped without a compile; merge and fused dS+dB candidates are not judged by the formula."""
    import torch
    sys.path.insert(0, str(ROOT / "launch"))
    import tune_kernels
    from relora_kernels import _runtime
    monkeypatch.setattr(_runtime, "shared_memory_limit", lambda: _runtime.HOPPER_SHARED_MEMORY)
    assert _runtime.HOPPER_SHARED_MEMORY == 232448
    over = [c for c in tune_kernels.gemm_candidates(128, False) if not tune_kernels.gemm_fits("S", c, torch.bfloat16)]
    assert [(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_stages"]) for c in over] == [(128, 128, 128, 4)] * 2
    over = [c for c in tune_kernels.tma_candidates(False) if not tune_kernels.gemm_fits("Y_tma", c, torch.bfloat16)]
    assert [(c["BLOCK_M"], c["BLOCK_N"], c["num_stages"]) for c in over] == [(128, 256, 4), (256, 128, 4)]
    assert all(tune_kernels.gemm_fits("merge", c, torch.float32) for c in tune_kernels.merge_candidates(128, False))


def test_gpu_check_script_parses_and_names_its_stages(tmp_path):
    """launch/gpu_check.sh is run only on a lent GPU: here, at least, it must parse, and a wrong stage name
    must fail at once with the valid ones (a typo must not burn a device call), which are exactly the stages
    its header names and its case statement runs (ckpt was run but not accepted, found on 2026-12-05)."""
    script = ROOT / "launch" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(["bash", str(script), "benhc"], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path)}, timeout=60)
    valid = re.search(r"\(valid: ([a-z0-9 ]+) \)", proc.stderr)
    assert proc.returncode == 2 and valid, proc.stderr
    text = script.read_text()
    arms = re.findall(r"^ +([a-z0-9]+)\) ", text + " ", re.MULTILINE) + re.findall(r"^ +([a-z0-9]+)\)$", text,
                                                                                   re.MULTILINE)
    header = re.search(r"^#   stages: ([a-z0-9 ]+) \(default", text, re.MULTILINE).group(1).split()
    assert sorted(valid.group(1).split()) == sorted(arms) == sorted(header) and "ckpt" in arms
    assert not any(tmp_path.iterdir())  # nothing ran


def test_gpu_tests_groups_hold_every_cuda_case_once():
    """launch/gpu_tests.sh splits the compiled kernel tests into ordered groups (a run cut at its limit loses the
    last ones): together they must hold every CUDA case of tests/test_kernels.py, none twice, and the int8 and
    dispatch files."""
    proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_tests.sh"), "--collect-only", "-qq"],  # -v -qq: ids
                          capture_output=True, text=True, cwd=ROOT, timeout=900)  # 8 pytest start-ups
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = [line for line in proc.stdout.splitlines() if "::" in line]
    kernels = [t for t in got if t.startswith("tests/test_kernels.py::")]
    want = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-k", "cuda", "tests/test_kernels.py"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300).stdout
    want = [line for line in want.splitlines() if "::" in line]
    assert len(want) > 100 and sorted(kernels) == sorted(want)  # each once
    assert any(t.startswith("tests/test_int8_quant.py::") for t in got)
    assert any(t.startswith("tests/test_kernel_dispatch.py::") for t in got)
    assert any(t.startswith("tests/test_kernel_args.py::") for t in got)
    order = [t.split("::")[1].split("[")[0] for t in kernels]
    # what the H200 run of 2026-12-04 did not reach first: the layer's cases, then (one group) the TMA ones,
    # both before the merges and the other cases that passed there
    assert order[0] == "test_lora_linear_matches_reference" and "tma" not in kernels[0]
    tma = [i for i, t in enumerate(kernels) if "tma" in t.split("::")[1]]
    assert tma == list(range(tma[0], tma[-1] + 1)), "the TMA group holds other cases, or misses some"
    assert tma[-1] < order.index("test_lora_merge_matches_reference")
    # pytest 9.1.1 (the GPU image's) also matches -k words against each test's `pytestmark`: on 2026-12-04 the
    # word "tma" there selected every case for the TMA group and none for the group before it.
    script = "\n".join(line for line in (ROOT / "launch" / "gpu_tests.sh").read_text().splitlines()
                       if not line.lstrip().startswith("#"))
    expressions = " ".join(re.findall(r'"([^"$]*(?: or | and )[^"]*)"', script))
    words = set(re.findall(r"[\w\]]+", re.sub(r"\$\w+", " ", expressions)))  # $first, $tma: variables
    assert words and not [w for w in words - {"and", "or", "not"} if w.lower() in "pytestmark"], words


def test_gpu_check_returns_few_files_and_keeps_to_its_budget(tmp_path):
    """The device tool returns at most 8 files from $OUT: every stage's logs and results travel in one
    tarball (re-packed after each stage) beside stages.txt. A stage the budget cannot fit is skipped, named.
    Here, on CPU, `env` fails (no nvidia-smi): the script then stops, exit 1, without running the later stages
    (each would fail the same way); a stage that fails exits the script 1 after the others have run."""
    import tarfile

    script = ROOT / "launch" / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script), "env", "tests"], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path), "GPU_CHECK_BUDGET": "40"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.tar.gz", "stages.txt"]
    stages = (tmp_path / "stages.txt").read_text().splitlines()
    assert [re.sub(r"\d+s of", "Ns of", line) for line in stages] == \
        [f"{st} skipped: Ns of GPU_CHECK_BUDGET=40s left" for st in ("env", "tests")]  # N: 40, or 39 after a slow pack
    proc = subprocess.run(["bash", str(script), "env", "tests"], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path)}, timeout=120)
    stages = (tmp_path / "stages.txt").read_text().splitlines()
    assert proc.returncode == 1 and len(stages) == 2 and stages[0].startswith("env rc=") and \
        stages[1].startswith("stopped: env failed"), (proc.returncode, stages)
    with tarfile.open(tmp_path / "gpu_check.tar.gz") as tar:
        assert {"./env.log", "./stages.txt"} <= set(tar.getnames())


def test_bench_goes_on_when_a_provider_fails(tmp_path, monkeypatch, capsys):
    """One provider failing (e.g. a kernel over the GPU's shared memory) is reported, the others still run."""
    monkeypatch.setenv("RELORA_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(ROOT / "launch"))
    import bench_kernels
    real = bench_kernels.linear_setup

    def setup(provider, *a, **k):
        if provider == "fused_tma":
            raise RuntimeError("OutOfResources: shared memory, Required: 262144, Hardware limit: 232448")
        return real(provider, *a, **k)
    monkeypatch.setattr(bench_kernels, "linear_setup", setup)
    real_merges = bench_kernels.merge_setups

    def merges(*a, **k):  # a merge failing, which runs first, must not end the layers' timings either
        fns = real_merges(*a, **k)

        def fail():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return {**fns, "merge": fail}
    monkeypatch.setattr(bench_kernels, "merge_setups", merges)
    out = tmp_path / "b.csv"
    rc = bench_kernels.main(["--device", "cpu", "--quick", "--providers", "fused_tma", "full", "--ops", "merge",
                             "linear", "--modes", "fwd", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "provider fused_tma failed" in err and "provider merge failed at M=0" in err
    import csv
    rows = [(r["op"], r["provider"]) for r in csv.DictReader(out.open())]
    assert ("linear", "full") in rows and ("merge", "merge") not in rows and ("merge", "merge_fp32ab") in rows
    assert not any(p == "fused_tma" for _, p in rows)


def test_bench_repeat_times_every_point_per_pass_and_reports_the_spread(tmp_path, monkeypatch, capsys):
    """--repeat 2: each (provider, mode) is timed once per pass, the rows say which pass, and the table's
    value is the median over passes with spread (slowest - fastest) / median, checked by hand."""
    monkeypatch.setenv("RELORA_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(ROOT / "launch"))
    import csv

    import bench_kernels
    out = tmp_path / "b.csv"
    rc = bench_kernels.main(["--device", "cpu", "--quick", "--providers", "full", "fused", "--ops", "linear",
                             "--modes", "fwd", "--repeat", "2", "--out", str(out)])
    assert rc == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["provider"], r["repeat"]) for r in rows] == [("full", "1"), ("fused", "1"), ("full", "2"),
                                                            ("fused", "2")]
    assert "spread" in capsys.readouterr().out
    base = dict(op="linear", mode="fwd", M=64, d_in=48, d_out=40, r=8, tflops=1.0, gbps=2.0, max_rel_err=0.0)
    summary = bench_kernels.summarize([{**base, "provider": "fused", "ms": ms} for ms in (1.0, 3.0, 1.2)])
    row = summary[("linear", "fwd", 64, 48, 40, 8)]["fused"]
    assert row["ms"] == 1.2 and abs(row["spread"] - (3.0 - 1.0) / 1.2) < 1e-12 and row["passes"] == 3
    with pytest.raises(SystemExit):
        bench_kernels.parse_args(["--repeat", "0"])
    assert "--repeat must be >= 1" in capsys.readouterr().err


def test_torch_linear_crossover_script(tmp_path, monkeypatch, capsys):
    """launch/bench_torch_linear.py times both variants of the `torch` path at token counts set from the
    layer's harmonic mean (64 x 96: 76.8, so M = 38 and 154), each call on the variant it names."""
    monkeypatch.syspath_prepend(str(ROOT / "launch"))
    import bench_torch_linear
    from relora_kernels import torch_linear

    calls = []
    for cls in (torch_linear.MergedLoRALinearFunction, torch_linear.TorchLoRALinearFunction):
        monkeypatch.setattr(cls, "apply", (lambda real, name: lambda *a: calls.append(name) or real(*a))(
            cls.apply, cls.__name__[:6]))
    out = tmp_path / "x.json"
    assert bench_torch_linear.main(["--shapes", "64x96x8", "--multiples", "0.5", "2", "--reps", "2",
                                    "--out", str(out)]) == 0
    rows = __import__("json").loads(out.read_text())
    assert [(r["m"], r["d_in"], r["d_out"], r["rank"], r["dtype"]) for r in rows] == [(38, 64, 96, 8, "fp32"),
                                                                                    (154, 64, 96, 8, "fp32")]
    for r in rows:  # the row's ratio of the unrounded times: its 3 decimals, plus the 4-decimal times' rounding
        ratio = r["merged_ms"] / r["epilogue_ms"]
        bound = 5e-4 + ratio * 5e-5 * (1 / r["merged_ms"] + 1 / r["epilogue_ms"]) + 1e-9
        assert abs(r["merged_over_epilogue"] - ratio) <= bound, (r, bound)
    assert calls == ["TorchL", "Merged"] * 3 * 2  # warm-up + 2 reps, alternating, per point
    assert "merged/epi" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_torch_linear.main(["--shapes", "64x96"])
    assert "is not IN x OUT x RANK" in capsys.readouterr().err


def test_bench_e2e_fails_loudly_and_leaves_no_stale_rows(tmp_path):
    """launch/bench_e2e.py on CPU: a run that fails (rank 128 > the debug preset's width) makes the command
    fail and empties --out (rows of an earlier invocation must not pass for this one's); a good run's row
    holds its own settings and a finite loss near ln(vocab) for an untrained model."""
    import json
    out = tmp_path / "e2e.json"
    out.write_text('[{"stale": true}]')
    cmd = [sys.executable, str(ROOT / "launch" / "bench_e2e.py"), "--device", "cpu", "--presets", "debug",
           "--micro-batch", "1", "--seq-len", "16", "--steps", "1", "--paths", "reference", "--out", str(out)]
    bad = subprocess.run(cmd + ["--rank", "128"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 1 and "1 run(s) failed" in bad.stderr and "debug reference" in bad.stderr, bad.stderr
    assert json.loads(out.read_text()) == []
    good = subprocess.run(cmd + ["--rank", "4"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert good.returncode == 0, good.stderr
    (row,) = json.loads(out.read_text())
    assert (row["preset"], row["path"], row["rank"], row["seq_len"]) == ("debug", "reference", 4, 16)
    import math
    vocab = __import__("relora_ds").LlamaConfig.preset("debug").vocab_size
    assert abs(row["loss"] - math.log(vocab)) < 1.0 and row["tokens_per_s"] > 0 and row["compile"] is False
    # --compile: the same steps with each decoder layer compiled (in the warm-up steps), the same loss; with
    # AOTAutograd's graphs and no generated code (inductor's CPU compile, ~40 s on CI's cold cache, is the
    # compiled trainer test's)
    backend = "aot_eager_decomp_partition"
    compiled = subprocess.run(cmd + ["--rank", "4", "--compile", "--compile-backend", backend], capture_output=True,
                              text=True, timeout=300, cwd=ROOT)
    assert compiled.returncode == 0, compiled.stderr
    (crow,) = json.loads(out.read_text())
    assert (crow["compile"], crow["compile_backend"], row["compile_backend"]) == (True, backend, None), (row, crow)
    assert abs(crow["loss"] - row["loss"]) < 1e-5 * row["loss"], (row, crow)


def test_bench_e2e_paths_set_only_their_own_switches(monkeypatch):
    """Interleaved paths share one process: each must set its whole environment and Triton module switches,
    so `auto` after `torch_merged` does not run merged (RELORA_MERGED_WEIGHT left at 1), and the TMA/cuBLAS
    rank-r switches of `triton_tma_blas_lr` are off again for `triton`."""
    monkeypatch.syspath_prepend(str(ROOT / "launch"))
    import bench_e2e
    from relora_kernels import linear, matmul

    for var in ("RELORA_KERNELS", "RELORA_MERGED_WEIGHT"):
        monkeypatch.setenv(var, "x")  # recorded first (as unset, if it was), so undo removes use_path's value
        monkeypatch.delenv(var)
    monkeypatch.setattr(matmul, "TMA_GEMM", matmul.TMA_GEMM)
    monkeypatch.setattr(linear, "LOWRANK_BLAS", linear.LOWRANK_BLAS)
    bench_e2e.use_path("torch_merged")
    assert (os.environ["RELORA_KERNELS"], os.environ["RELORA_MERGED_WEIGHT"]) == ("torch", "1")
    bench_e2e.use_path("auto")
    assert os.environ["RELORA_KERNELS"] == "auto" and "RELORA_MERGED_WEIGHT" not in os.environ
    bench_e2e.use_path("triton_tma_blas_lr")
    assert os.environ["RELORA_KERNELS"] == "triton" and matmul.TMA_GEMM is True and linear.LOWRANK_BLAS is True
    bench_e2e.use_path("triton")
    assert os.environ["RELORA_KERNELS"] == "triton" and matmul.TMA_GEMM is False and linear.LOWRANK_BLAS is False


def test_bench_int8_summary_survives_a_failed_timing(capsys):
    """launch/bench_int8.py goes on past a failed timing (kernel_rows); its summary then says "failed" for the
    missing row instead of ending the GPU call before the drift and memory sections. A misspelt section is
    refused (it ran nothing and exited 0), and so are the CUDA sections without a GPU (they were skipped with
    exit 0, which gpu_check.sh recorded as a passing int8 stage)."""
    sys.path.insert(0, str(ROOT / "launch"))
    import bench_int8
    rows = [dict(provider=p, mode=m, d_in=64, d_out=32, ms=ms) for p, m, ms in
            (("bf16", "fwd", 1.0), ("int8_scratch", "fwd", 2.0), ("merge_bf16", "-", 0.5))]
    bench_int8.print_kernel_summary(rows)
    out = capsys.readouterr().out
    assert "64x32 fwd: bf16 1.000 ms, int8_scratch 2.000 ms, speed ratio 0.500" in out
    assert "dequant failed, merge bf16 0.500 ms, merge int8 (+host residual round trip) failed" in out
    with pytest.raises(SystemExit):
        bench_int8.main(["--device", "cpu", "--sections", "memroy"])
    capsys.readouterr()
    assert bench_int8.main(["--device", "cpu", "--sections", "kernels", "memory"]) == 2
    assert "section(s) kernels need --device cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench_int8.main(["--device", "cuda", "--sections", "drift"]) == 2
        assert "needs a CUDA GPU (none found)" in capsys.readouterr().err


def test_bench_kernels_bytes_and_arguments():
    """launch/bench_kernels.py's GB/s rows: the fewest bytes each pass moves, hand-counted at M=2, K=3, N=5
    (MN=10, MK=6, NK=15): a full-rank backward reads dY, X, W and writes dX, dW (dY was counted twice);
    the frozen backward reads dY, W and writes dX. Non-positive sizes are parse errors."""
    sys.path.insert(0, str(ROOT / "launch"))
    import bench_kernels
    assert bench_kernels.linear_work("full", "bwd", 2, 3, 5, 1, 2) == (4 * 30, 2 * (10 + 6 + 15 + 6 + 15))
    assert bench_kernels.linear_work("frozen", "bwd", 2, 3, 5, 1, 2) == (2 * 30, 2 * (10 + 15 + 6))
    assert bench_kernels.linear_work("full", "fwd", 2, 3, 5, 1, 2) == (2 * 30, 2 * (6 + 15 + 10))
    for bad in (["--ranks", "0"], ["--M", "-4"], ["--repeat", "x"]):
        with pytest.raises(SystemExit):
            bench_kernels.parse_args(["--device", "cpu", *bad])


def test_host_overhead_script_counts_the_fused_layers_launches(tmp_path):
    """launch/bench_host_overhead.py runs and counts the Triton launches of one fused fwd+bwd: five by hand
    (S and Y forward; fused dS+dB, dA and dX backward), each replaced by a no-op, in both CPU modes."""
    import json
    out = tmp_path / "host.json"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "bench_host_overhead.py"), "--calls", "3",
                           "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = {r["provider"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"fused", "torch", "peft"}
    assert rows["fused"]["triton_launches"] == 5 and all(r["us"] > 0 for r in rows.values())
    assert {(r["dtype"], r["date"]) for r in rows.values()} == {("float32", datetime.date.today().isoformat())}
    # Through Triton's own launch path (kernels compiled for a Hopper stand-in, the driver call counted):
    # the same five launches reach the driver.
    out = tmp_path / "host_triton.json"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "bench_host_overhead.py"), "--through-triton",
                           "--calls", "2", "--repeats", "1", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())
    assert row["provider"] == "fused" and row["triton_launches"] == 5 and row["us"] > 0
    assert row["dtype"] == "bfloat16"
