"""`mpirun -np 2 python launch/train.py ...`: ranks found through mpi4py by
deepspeed.init_distributed(auto_mpi_discovery=True), with no RANK/WORLD_SIZE in the environment.
Set RELORA_SKIP_MPI=1 to skip; without it, a missing mpirun or mpi4py fails here with the reason. fp32
(ds_configs/zero2_fp32.json), as the SLURM jobs: the subject is the launch."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch_utils import ROOT, free_port, launch_env

DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _mpirun() -> list[str]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which("mpirun", path=path)
    if exe is None:
        pytest.fail("mpirun not found: pip install -e '.[mpich]' (mpi4py and the mpich wheel; '.[mpi]' is mpi4py "
                    "alone, for a machine's own MPI) or set RELORA_SKIP_MPI=1")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    # Open MPI refuses root without these flags; MPICH's hydra needs none.
    extra = ["--allow-run-as-root", "--oversubscribe"] if "Open MPI" in version and os.geteuid() == 0 else []
    return [exe, *extra]


def test_mpirun_two_ranks(tmp_path):
    if os.environ.get("RELORA_SKIP_MPI") == "1":
        pytest.skip("RELORA_SKIP_MPI=1")
    try:
        import mpi4py  # noqa: F401
    except ImportError as e:
        pytest.fail(f"mpi4py not importable ({e}): pip install -e '.[mpi]' or set RELORA_SKIP_MPI=1")
    env = {k: v for k, v in launch_env().items() if k not in DIST_VARS and not k.startswith(("SLURM_", "PMI_"))}
    # DeepSpeed's MPI discovery sets MASTER_ADDR from rank 0's `hostname -I` and MASTER_PORT to
    # init_distributed's distributed_port, which each rank read from its own environment: here each rank has
    # another MASTER_PORT (as remote ranks have under an mpirun that does not forward the environment), and
    # they must all take rank 0's (relora_ds.distributed.agree_on_master_port; rank 1 waited on its own).
    out = tmp_path / "run"
    port = free_port()
    per_rank_port = f'MASTER_PORT=$(({port} + ${{PMI_RANK:-${{OMPI_COMM_WORLD_RANK:-0}}}})) exec "$0" "$@"'
    cmd = [*_mpirun(), "-np", "2", "bash", "-c", per_rank_port, sys.executable, str(ROOT / "launch/train.py"),
           "--collective-timeout-min", "5",
           "--config", str(ROOT / "launch/configs/tiny.yaml"), "--deepspeed", str(ROOT / "ds_configs/zero2_fp32.json"),
           "--total-steps", "12", "--warm-start-steps", "4", "--cycle-length", "4", "--restart-warmup-steps", "2",
           "--warmup-steps", "2", "--eval-every", "12", "--eval-windows", "16", "--micro-batch-size", "4",
           "--global-batch-size", "8", "--seq-len", "64", "--no-export", "--output-dir", str(out)]
    shm_before = set(Path("/dev/shm").glob("mpich_shm_*"))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    # The ranks finalized MPI (exit_process skips mpi4py's Py_AtExit hook): unfinalized, mpich leaves its
    # shared-memory segment in /dev/shm.
    assert set(Path("/dev/shm").glob("mpich_shm_*")) <= shm_before
    assert "2 rank(s), bf16=False, ZeRO stage 2, offload: none, 12 steps" in log
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in recs if r.get("event") == "reset"] == [8, 12]  # the last step resets too
    assert (out / "checkpoints/latest").read_text() == "step_12"


def test_a_rank_that_fails_under_mpirun_stops_the_job_with_its_status(tmp_path):
    """Found by a review: a rank leaving with an error went through MPI_Finalize, which under MPICH waits for every
    other rank: the others trained on (into their next collective, on GPUs until its timeout) and mpirun often
    reported 0. It aborts the job with its status (rank 0 here would sleep 60 s, then exit 0)."""
    if os.environ.get("RELORA_SKIP_MPI") == "1":
        pytest.skip("RELORA_SKIP_MPI=1")
    script = tmp_path / "rank.py"
    script.write_text("import time\nfrom mpi4py import MPI\nfrom relora_ds.distributed import exit_process\n"
                      "if MPI.COMM_WORLD.Get_rank() == 1:\n    exit_process(3)\ntime.sleep(60)\nexit_process(0)\n")
    env = {k: v for k, v in launch_env().items() if k not in DIST_VARS and not k.startswith(("SLURM_", "PMI_"))}
    import time

    start = time.monotonic()
    proc = subprocess.run([*_mpirun(), "-np", "2", sys.executable, str(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert time.monotonic() - start < 30
