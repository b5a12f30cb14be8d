"""relora_ds.distributed: the DeepSpeed CPU shared-memory allreduce segments are released, and still work.

Oracle: DeepSpeed itself. The worker checks our predicted segment names exist right after its init (so a new
naming scheme fails here rather than leaking silently) and runs its shm allreduce kernel after the release."""
import glob
import json
import os
from pathlib import Path

import pytest

from launch_utils import ROOT, free_port, run_deepspeed


@pytest.fixture(scope="module")
def shm_run(tmp_path_factory):
    out, port = tmp_path_factory.mktemp("shm"), free_port()
    run_deepspeed(ROOT / "tests/dist/shm_worker.py", "--out", out, master_port=port, timeout=300)
    return port, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_predicted_segment_names_are_deepspeeds(shm_run):
    port, res = shm_run
    for r in res:
        assert r["exist_after_init"] == [True, True], r["paths"]
        assert all(p.endswith(f"_{port}_{i}") for i, p in enumerate(r["paths"]))


def test_each_rank_releases_its_own_segment_and_none_is_left(shm_run):
    port, res = shm_run
    assert [r["released"] for r in res] == res[0]["paths"]
    assert all(r["exist_after_release"] == [False, False] for r in res)


def test_shm_allreduce_still_works_after_release(shm_run):
    _, res = shm_run
    assert all(r["shm_kernel"] for r in res)  # DeepSpeed's kernel ran, not a gloo fallback
    assert all(r["allreduce_ok"] == [True, True] for r in res)


@pytest.mark.parametrize("launcher", ["deepspeed", "plain"])
def test_a_single_rank_leaves_no_segment_either(tmp_path, launcher):
    """One rank started by the deepspeed launcher (a resume on fewer ranks, a 1-GPU run) creates its
    segment too; a plain `python` process with the launcher's variables is checked the same way."""
    import subprocess
    import sys

    from launch_utils import launch_env
    port = free_port()
    if launcher == "deepspeed":
        run_deepspeed(ROOT / "tests/dist/shm_worker.py", "--out", tmp_path, nprocs=1, master_port=port, timeout=300)
    else:
        env = {**launch_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        proc = subprocess.run([sys.executable, str(ROOT / "tests/dist/shm_worker.py"), "--out", str(tmp_path)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "rank0.json").read_text())
    assert res["exist_after_init"] == [launcher == "deepspeed"]  # the launcher's LOCAL_SIZE makes DeepSpeed build it
    assert res["exist_after_release"] == [False] and res["allreduce_ok"] == [True, True]
    assert not list(Path("/dev/shm").glob(f"*allreduce_buffer_*_{port}_*"))


def test_single_process_has_nothing_to_release():
    from relora_ds.shm_comm import release_shm_segment
    assert release_shm_segment() is None  # no process group: no collective, no error


def test_a_single_process_without_a_launcher_gets_a_free_port_and_a_one_rank_world(monkeypatch):
    """Two plain `python launch/train.py` runs on one machine must not both take DeepSpeed's 29500, and such a
    run gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR, so DeepSpeed does not try MPI discovery (mpi4py)."""
    import socket

    from relora_ds.distributed import _LAUNCHER_VARS, single_process_environment

    for var in (*_LAUNCHER_VARS, "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.setenv(var, "x")  # recorded, so that what the function sets is undone after the test
        monkeypatch.delenv(var)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = single_process_environment()
        assert port != busy.getsockname()[1] and os.environ["MASTER_PORT"] == str(port)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")] == ["0", "1", "0", "127.0.0.1"]
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("MASTER_PORT", "29611")
    assert single_process_environment() is None and os.environ["MASTER_PORT"] == "29611"  # a user's choice
    assert os.environ["WORLD_SIZE"] == "1"
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")  # one of several srun tasks: MPI discovery (or rank_env.sh)
    assert single_process_environment() is None and "RANK" not in os.environ
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # an mpirun rank
    assert single_process_environment() is None and "RANK" not in os.environ
    # One process after all (found by a review: each needed mpi4py): python in a salloc/sbatch shell of 2 tasks
    # (SLURM_NTASKS is the allocation's), and a one-task srun step whose pmi2/pmix plugin sets PMI variables.
    for one in (dict(SLURM_NTASKS="2"), dict(PMI_RANK="0", PMI_SIZE="1", SLURM_STEP_NUM_TASKS="1"),
                dict(PMIX_RANK="0", SLURM_STEP_NUM_TASKS="1"), dict(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="1")):
        for var in (*_LAUNCHER_VARS, "LOCAL_RANK", "MASTER_ADDR", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
            monkeypatch.delenv(var, raising=False)
        for k, v in one.items():
            monkeypatch.setenv(k, v)
        single_process_environment()
        assert os.environ.get("WORLD_SIZE") == "1" and os.environ.get("RANK") == "0", one
    for var in (*_LAUNCHER_VARS, "LOCAL_RANK", "MASTER_ADDR", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PMIX_RANK", "0")  # PMIx outside Slurm: the MPI library knows the size, not us
    assert single_process_environment() is None and "RANK" not in os.environ


def test_local_rank_without_a_launcher_is_refused_as_the_local_rank_flag_is(monkeypatch, tmp_path):
    """`LOCAL_RANK=3 python launch/train.py` (one process, no launcher) ran as local rank 0 without a word:
    single_process_environment overwrote the variable, where `--local_rank 3` in the same case is an error
    (train_args.check_local_rank_arg; a user trial's find). The variable is refused the same way, naming it and
    CUDA_VISIBLE_DEVICES; 0, what such a process is, is accepted, and a launcher's LOCAL_RANK is its own."""
    import subprocess
    import sys

    from launch_utils import launch_env
    from relora_ds.distributed import _LAUNCHER_VARS, single_process_environment

    cleared = (*_LAUNCHER_VARS, "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS")
    for var in cleared:
        monkeypatch.setenv(var, "x")  # recorded, so that what the function sets is undone after the test
        monkeypatch.delenv(var)
    monkeypatch.setenv("MASTER_PORT", "29611")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ValueError, match=r"^LOCAL_RANK=3 but no launcher started this process \(no RANK/WORLD_SIZE\): "
                                         r"started by hand, one process is rank 0 on the first visible GPU; choose "
                                         r"the GPU with CUDA_VISIBLE_DEVICES instead"):
        single_process_environment()
    assert "RANK" not in os.environ and os.environ["LOCAL_RANK"] == "3"
    monkeypatch.setenv("LOCAL_RANK", "0")
    single_process_environment()
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")] == ["0", "1", "0"]
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert single_process_environment() is None and os.environ["LOCAL_RANK"] == "3"  # the launcher's
    # The command line: one line and exit 2 before any process group, as for --local_rank.
    env = {k: v for k, v in launch_env().items() if k not in cleared}
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", "launch/configs/tiny.yaml", "--output-dir",
                           str(tmp_path / "run")], cwd=ROOT, env={**env, "LOCAL_RANK": "3"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "error: LOCAL_RANK=3 but no launcher started this process" in proc.stderr, \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_without_mpi4py_a_single_process_starts_and_several_ranks_get_one_line(tmp_path):
    """A review's find: plain `python launch/train.py` died in DeepSpeed's MPI discovery with a traceback
    (No module named 'mpi4py', an optional extra). Now one process starts a 1-rank group without it; where MPI
    discovery is the only way left (an srun task of several, no rank_env.sh), the error names the ways."""
    code = ("import os, sys\nsys.modules['mpi4py'] = None  # not installed\n"
            "from relora_ds.distributed import init_distributed, single_process_environment\n"
            "single_process_environment()\n"
            "try:\n"
            "    init_distributed(auto_mpi_discovery=True, distributed_port=int(os.environ.get('MASTER_PORT', 29500)))\n"
            "except ValueError as e:\n"
            "    print('error:', e); sys.exit(2)\n"
            "import torch.distributed as dist\nprint('world', dist.get_world_size(), dist.get_rank())\n"
            "from relora_ds.distributed import exit_process\nexit_process(0)  # a plain exit can abort in gloo\n")
    from relora_ds.distributed import _LAUNCHER_VARS
    import subprocess
    import sys

    from launch_utils import launch_env
    env = {k: v for k, v in launch_env().items() if k not in (*_LAUNCHER_VARS, "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS")}
    (tmp_path / "child.py").write_text(code)
    run = lambda **extra: subprocess.run([sys.executable, str(tmp_path / "child.py")], env={**env, **extra},  # noqa
                                         capture_output=True, text=True, timeout=120)
    proc = run()
    assert proc.returncode == 0 and "world 1 0" in proc.stdout, proc.stderr[-3000:]
    proc = run(SLURM_STEP_NUM_TASKS="2")
    assert proc.returncode == 2 and "mpi4py is not installed for DeepSpeed's MPI discovery" in proc.stdout, \
        proc.stdout + proc.stderr[-3000:]
    # With mpi4py, a task of a 2-task srun step that no MPI plugin connects (srun --mpi=none, no rank_env.sh)
    # is MPI's singleton: a world of 1 that trained alone (a review's find, on a local Slurm). Now an error.
    (tmp_path / "child.py").write_text(code.replace("sys.modules['mpi4py'] = None  # not installed\n", ""))
    proc = run(SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1")
    assert proc.returncode == 2 and "the launcher started 2 processes but this one joined a world of 1" in \
        proc.stdout, proc.stdout + proc.stderr[-3000:]


def _run_child(tmp_path, code: str):
    import subprocess
    import sys

    from launch_utils import launch_env
    script = tmp_path / "child.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], env=launch_env(), capture_output=True, text=True,
                          timeout=120)


def test_exit_process_destroys_the_group_joins_threads_runs_atexit_and_flushes(tmp_path):
    """exit_process skips the interpreter's teardown (where gloo's threads abort a finished rank, -6), so it
    must do by hand what a normal exit would, in its order: the group is gone before the atexit handlers
    run; a non-daemon thread still writing is joined first (as Python's exit does: an async checkpoint
    writer must not be cut off); buffered output (stdout is a pipe here) reaches the reader; and the code
    given is the exit status."""
    out = tmp_path / "late.txt"
    proc = _run_child(tmp_path,
                      "import atexit, sys, threading, time\n"
                      "import torch.distributed as dist\n"
                      "from relora_ds.distributed import exit_process\n"
                      f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{free_port()}', rank=0, "
                      "world_size=1)\n"
                      "dist.barrier()\n"
                      "atexit.register(lambda: print('atexit: initialized', dist.is_initialized(), "
                      f"'late file', open({str(out)!r}).read()))\n"
                      f"threading.Thread(target=lambda: (time.sleep(0.5), open({str(out)!r}, 'w').write('written'))"
                      ").start()\n"
                      "sys.stdout.write('buffered, no newline')\n"
                      "exit_process(5)\n"
                      "print('not reached')\n")
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert proc.stdout == "buffered, no newlineatexit: initialized False late file written\n"


@pytest.mark.parametrize("body, status, stderr", [
    ("return 3", 3, ""),
    ("return None", 0, ""),
    ("raise RuntimeError('boom')", 1, "RuntimeError: boom"),
    ("raise SystemExit(2)", 2, ""),
    ("import sys; sys.exit()", 0, ""),  # SystemExit(None): a success, as at a normal exit
    ("raise SystemExit('usage: bad flag')", 1, "usage: bad flag"),
])
def test_run_and_exit_keeps_the_status_and_the_traceback(tmp_path, body, status, stderr):
    """A main that raises still leaves through exit_process: the traceback is printed and the status is 1
    (SystemExit keeps its code), where the interpreter's teardown could turn it into an abort."""
    proc = _run_child(tmp_path,
                      "import atexit\n"
                      "from relora_ds.distributed import run_and_exit\n"
                      "atexit.register(lambda: print('atexit ran'))\n"
                      f"def main():\n    {body}\n"
                      "run_and_exit(main)\n")
    assert proc.returncode == status, proc.stderr[-3000:]
    assert proc.stdout == "atexit ran\n"
    assert stderr in proc.stderr and ("Traceback" in proc.stderr) == (status == 1 and "boom" in stderr)


def test_exit_process_finalizes_mpi(tmp_path):
    """Under mpirun, DeepSpeed initializes MPI through mpi4py, which finalizes it from Py_AtExit: a step
    os._exit skips, so exit_process must call MPI_Finalize itself (Open MPI fails the job otherwise)."""
    import subprocess
    import sys

    from launch_utils import launch_env
    script = tmp_path / "child.py"
    script.write_text(
        "from mpi4py import MPI\n"
        "from relora_ds.distributed import exit_process\n"
        "real = MPI.Finalize\n"
        "def finalize():\n"
        "    real()\n"
        "    print('finalized', MPI.Is_finalized())\n"
        "MPI.Finalize = finalize\n"
        "print('initialized', MPI.Is_initialized(), 'size', MPI.COMM_WORLD.Get_size())\n"
        "exit_process(0)\n")
    proc = subprocess.run([sys.executable, str(script)], env=launch_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "initialized True size 1\nfinalized True\n"


def test_a_failing_shutdown_step_makes_a_zero_status_one():
    """MPI_Finalize (or the process group's destruction) failing after the work is done is printed and the rank
    exits 1, so the launcher or SLURM does not count the job a success; a status that already says failure
    keeps its own value (a mutation trial's survivor made every such exit 1)."""
    import subprocess
    import sys

    code = ("import sys, types\n"
            "def boom():\n"
            "    raise RuntimeError('finalize failed')\n"
            "sys.modules['mpi4py.MPI'] = types.SimpleNamespace(Is_initialized=lambda: True, "
            "Is_finalized=lambda: False, Finalize=boom)\n"
            "from relora_ds.distributed import exit_process\n"
            "exit_process(int(sys.argv[1]))\n")
    for status, want in ((0, 1), (3, 3)):
        proc = subprocess.run([sys.executable, "-c", code, str(status)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == want and "RuntimeError: finalize failed" in proc.stderr, proc.stderr[-2000:]


def test_an_error_on_rank_zero_stops_every_rank_and_max_over_ranks(tmp_path):
    """on_rank_zero: rank 0's work succeeds for all, or its error reaches every rank (rank 0 raises it, the
    others a RuntimeError naming it) instead of leaving them blocked at the next collective. max_over_ranks
    gives every rank the largest value (peak memory is the busiest rank's); agreement tells every rank
    whether some rank lacks a value and whether the ranks' values differ (each node's view of the data)."""
    worker = tmp_path / "worker.py"
    worker.write_text(f"""
import json, sys
import torch.distributed as dist
from relora_ds.distributed import agreement, init_distributed, max_over_ranks, on_rank_zero, run_and_exit


def main():
    init_distributed()  # releases DeepSpeed's shared-memory segment (deepspeed.init_distributed leaks it)
    done, out = [], {{}}
    on_rank_zero(lambda: done.append(dist.get_rank()))
    out["ran_on"] = done
    def fail():
        raise OSError("disk full")
    try:
        on_rank_zero(fail)
        out["error"] = None
    except Exception as e:
        out["error"] = f"{{type(e).__name__}}: {{e}}"
    def refuse():
        raise ValueError("output_dir is in use")
    try:
        on_rank_zero(refuse)
    except Exception as e:  # bad input on rank 0: a ValueError (a clean "error:" line) on every rank
        out["refused"] = f"{{type(e).__name__}}: {{e}}"
    out["max"] = max_over_ranks([1234.5, 5678.25][dist.get_rank()])
    r = dist.get_rank()
    out["agreement"] = [agreement("same data"), agreement(["data A", "data B"][r]),
                        agreement(["data A", None][r]), agreement(None)]
    dist.barrier()  # both ranks got here: nobody hangs
    with open(r"{tmp_path}/rank%d.json" % dist.get_rank(), "w") as f:
        json.dump(out, f)

run_and_exit(main)
""")
    port = free_port()
    run_deepspeed(worker, timeout=300, master_port=port)
    assert not glob.glob(f"/dev/shm/*allreduce_buffer_*_{port}_*")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["ran_on"] == [0] and r1["ran_on"] == []
    assert r0["error"] == "OSError: disk full"
    assert r1["error"].startswith("RuntimeError: rank 0 failed in fail") and "rank 1 stops too" in r1["error"]
    assert r0["refused"] == "ValueError: output_dir is in use"
    assert r1["refused"].startswith("ValueError: rank 0 failed in refuse")
    assert r0["max"] == r1["max"] == 5678.25  # rank 1's, on both
    # agreement: (some rank has none, the ranks differ), the same answer on every rank
    assert r0["agreement"] == r1["agreement"] == [[False, False], [False, True], [True, True], [True, False]]


def test_the_launch_rank_is_read_from_every_launchers_environment(monkeypatch):
    """launch/train.py shows recipe warnings on rank 0 only and labels errors by rank before any process
    group exists: under mpirun (no RANK) every rank said them, unlabeled (a review's find)."""
    from relora_ds.distributed import launch_rank

    names = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
             "PMIX_RANK", "PMIX_SIZE", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "SLURM_PROCID",
             "SLURM_STEP_NUM_TASKS")
    for var in names:
        monkeypatch.delenv(var, raising=False)
    assert launch_rank() == (0, 1)
    for rank, size in (("SLURM_PROCID", "SLURM_STEP_NUM_TASKS"), ("PMI_RANK", "PMI_SIZE"),
                       ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("RANK", "WORLD_SIZE")):
        monkeypatch.setenv(rank, "3")
        monkeypatch.setenv(size, "4")
        assert launch_rank() == (3, 4), rank
        monkeypatch.setenv(rank, "1")  # the more specific launcher's variable wins over those set before
        assert launch_rank() == (1, 4), rank
    for var in names:
        monkeypatch.delenv(var, raising=False)
    # srun --mpi=pmix: PMIx gives the rank and no size (PMIX_SIZE is not a PMIx variable); the step's task count
    monkeypatch.setenv("PMIX_RANK", "2")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "3")
    assert launch_rank() == (2, 3)


def test_more_ranks_on_a_node_than_gpus_is_one_line(monkeypatch):
    """LOCAL_RANK past the GPUs this process sees (a site's --gpus-per-task, --ntasks-per-node above the GPUs)
    was a CUDA 'invalid device ordinal' traceback on each extra rank. DeepSpeed's CUDA accelerator stands in."""
    import deepspeed
    import deepspeed.accelerator

    from relora_ds import distributed

    chosen = []

    class Cuda:
        def device_name(self):
            return "cuda"

        def device_count(self):
            return 2

        def set_device(self, i):
            chosen.append(i)

    inits = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: inits.append(kw))
    monkeypatch.setattr(distributed, "release_shm_segment", lambda: None)
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Cuda())
    monkeypatch.setenv("LOCAL_RANK", "1")
    distributed.init_distributed()
    assert chosen == [1] and len(inits) == 1
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=2 but this process sees 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES=4,5\)"):
        distributed.init_distributed()
    # before DeepSpeed's init, which hands torch device_id=cuda:LOCAL_RANK (torch's own error first otherwise)
    assert len(inits) == 1


_TIMEOUT_CHECK = """
import datetime, json, sys
import torch
from deepspeed.utils import groups
from relora_ds.distributed import init_distributed, run_and_exit


def main():
    init_distributed(timeout=datetime.timedelta(minutes=47))
    dp = groups._get_data_parallel_group()  # the group ZeRO reduces gradients and gathers parameters on
    print(json.dumps({"dp": dp._get_backend(torch.device("cpu")).options._timeout.total_seconds()}))

run_and_exit(main)
"""


def test_zeros_collectives_wait_the_runs_timeout():
    """DeepSpeed cloned the world group for ZeRO with torch's default timeout (gloo 30 min, NCCL 10), not the
    run's collective_timeout_min (found by a review: a straggler past 10 min killed an NCCL run)."""
    import subprocess
    import sys

    from launch_utils import launch_env
    env = {**launch_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", _TIMEOUT_CHECK], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"dp": 47 * 60}


def test_a_launcher_that_sets_rank_and_world_size_but_not_local_rank_is_named(monkeypatch):
    """Kubeflow's PyTorchJob without torchrun: DeepSpeed's MPI discovery would have replaced RANK/WORLD_SIZE
    with a world of one and blamed srun and mpirun."""
    from relora_ds.distributed import init_distributed

    for var, value in dict(RANK="1", WORLD_SIZE="4", MASTER_ADDR="10.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ValueError, match=r"the launcher set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT but not "
                                         r"LOCAL_RANK: DeepSpeed needs all of"):
        init_distributed()
    # RANK without WORLD_SIZE (a mutation trial's find): it fell to DeepSpeed's MPI discovery, which with mpi4py
    # made the process rank 0 of a world of one, training alone, and without it blamed the missing mpi4py
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match=r"the launcher set RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT but not "
                                         r"WORLD_SIZE: DeepSpeed needs all of"):
        init_distributed()


def test_a_stale_world_size_under_mpirun_or_srun_is_named(monkeypatch):
    """RANK=0 WORLD_SIZE=1 (and the rest) left exported in the shell, then mpirun -np 4 or srun -n 4: DeepSpeed
    took the stale five and every process was rank 0 of a world of one (on one host: all but one failing on
    MASTER_PORT; across hosts: each training alone into the same output dir). More processes than ranks is
    refused; fewer (a torchrun or deepspeed launcher on each node) is how it should be."""
    from relora_ds.distributed import _LAUNCHER_VARS, _check_launcher_env

    for var in (*_LAUNCHER_VARS, "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="10.0.0.1",
                           MASTER_PORT="29500").items():
        monkeypatch.setenv(var, value)
    _check_launcher_env()
    for size in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.setenv(size, "4")
        with pytest.raises(ValueError, match=rf"WORLD_SIZE=1 \(RANK=0\) but the launcher started 4 processes "
                                             rf"\({size}=4\): some would share a rank.* unset RANK, WORLD_SIZE"):
            _check_launcher_env()
        monkeypatch.setenv("WORLD_SIZE", "8")  # srun -n 4 starting torchrun --nproc-per-node 2 on each task
        _check_launcher_env()
        monkeypatch.setenv("WORLD_SIZE", "1")
        monkeypatch.delenv(size)


def test_a_single_process_keeps_a_users_master_addr_and_rank_without_world_size_is_a_launch_of_unknown_size(
        monkeypatch):
    """single_process_environment fills in MASTER_ADDR only where none is set (a user's address, e.g. the
    interface a one-rank run binds, stays), and launched_ranks reads RANK without WORLD_SIZE as a launcher's
    process of unknown size (0), not a world of one (a mutation trial's survivors)."""
    from relora_ds.distributed import _LAUNCHER_VARS, launched_ranks, single_process_environment

    for var in (*_LAUNCHER_VARS, "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.setenv(var, "x")  # recorded, so that what the function sets is undone after the test
        monkeypatch.delenv(var)
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("MASTER_PORT", "29611")
    assert single_process_environment() is None
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], os.environ["WORLD_SIZE"]) == ("10.1.2.3", "29611", "1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("RANK", "3")
    assert launched_ranks() == 0
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_ranks() == 4


def test_under_mpirun_every_rank_takes_rank_zeros_master_port(monkeypatch):
    """agree_on_master_port, mpi4py standing in (its broadcast hands every rank rank 0's value; CI has no
    mpi4py, so tests/test_cluster_mpi.py cannot run it there): an mpirun rank without RANK takes rank 0's
    MASTER_PORT over its own, or none where rank 0 has none; a launcher's rank (RANK set) and a process without
    MPI variables keep their environment and broadcast nothing. A mutation trial's survivors."""
    import sys
    import types
    from types import SimpleNamespace

    from relora_ds.distributed import _LAUNCHER_VARS, agree_on_master_port

    for var in (*_LAUNCHER_VARS, "MASTER_PORT"):
        monkeypatch.setenv(var, "x")  # recorded, so that what the function sets is undone after the test
        monkeypatch.delenv(var)
    rank0, roots = {"port": "29777"}, []

    def bcast(value, root):
        roots.append(root)
        return rank0["port"]
    mpi4py = types.ModuleType("mpi4py")
    mpi4py.MPI = SimpleNamespace(COMM_WORLD=SimpleNamespace(bcast=bcast))
    monkeypatch.setitem(sys.modules, "mpi4py", mpi4py)
    monkeypatch.setenv("MASTER_PORT", "29500")  # this rank's own
    assert agree_on_master_port() is None and roots == [] and os.environ["MASTER_PORT"] == "29500"
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert agree_on_master_port() == "29777" and os.environ["MASTER_PORT"] == "29777" and roots == [0]
    rank0["port"] = None  # rank 0 has none: DeepSpeed's default on every rank
    assert agree_on_master_port() is None and "MASTER_PORT" not in os.environ
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert agree_on_master_port() is None and os.environ["MASTER_PORT"] == "29500" and roots == [0, 0]
