"""How ranks find each other (relora_ds.distributed), a launch review's finds: a MASTER_PORT another process holds,
and a MASTER_ADDR that DeepSpeed's MPI discovery replaces without a word.

Oracles: torch's own TCPStore (the port really is taken), DeepSpeed's own ``mpi_discovery`` (it really replaces
MASTER_ADDR)."""
import os
import socket
import subprocess
import sys
import types
import warnings
from types import SimpleNamespace

import pytest

from launch_utils import ROOT, launch_env

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "PMIX_SIZE", "MV2_COMM_WORLD_RANK",
                "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID")


def test_a_master_port_in_use_is_one_line_naming_the_port(tmp_path):
    """A second run on a node with the same MASTER_PORT (two `deepspeed` runs on the default 29500, or a
    second process started as RANK=0): rank 0 died with torch's DistNetworkError traceback and status 1, not
    the one-line error and status 2 of every other start-up problem."""
    import torch.distributed as dist

    with socket.socket() as holder:  # another process's listener on the port
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        # the premise, from torch itself: rank 0's store cannot listen there
        with pytest.raises(dist.DistNetworkError, match="EADDRINUSE"):
            dist.TCPStore("127.0.0.1", port, 1, True)
        env = {k: v for k, v in launch_env().items() if k not in _LAUNCH_VARS and not k.startswith("SLURM_")}
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        proc = subprocess.run(
            [sys.executable, "launch/train.py", "--config", "launch/configs/tiny.yaml", "--deepspeed",
             "ds_configs/zero2_fp32.json", "--output-dir", str(tmp_path / "run"), "--total-steps", "4",
             "--warm-start-steps", "2", "--cycle-length", "2", "--restart-warmup-steps", "1", "--warmup-steps", "1",
             "--eval-every", "0", "--micro-batch-size", "4", "--global-batch-size", "4", "--seq-len", "64"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: MASTER_PORT={port} is already in use on this host ({socket.gethostname()})" in proc.stderr
    assert "deepspeed --master_port N, torchrun --master-port N" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.fixture
def fake_mpi(monkeypatch):
    """mpi4py standing in for a 2-rank mpirun seen from rank 0 (CI has no mpi4py; MPI_Init in the test process
    would stay for the session)."""
    world = SimpleNamespace(Get_rank=lambda: 0, Get_size=lambda: 2, bcast=lambda value, root: value,
                            allgather=lambda value: [value, value])
    module = types.ModuleType("mpi4py")
    module.MPI = SimpleNamespace(COMM_WORLD=world, Get_processor_name=lambda: "node1")
    monkeypatch.setitem(sys.modules, "mpi4py", module)
    for var in _LAUNCH_VARS:
        monkeypatch.setenv(var, "x")  # recorded, so that what DeepSpeed sets is undone after the test
        monkeypatch.delenv(var)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")


def test_deepspeeds_mpi_discovery_replaces_a_given_master_addr(fake_mpi, monkeypatch):
    """The oracle of the next test: DeepSpeed 0.19.8's own discovery drops the MASTER_ADDR mpirun passed."""
    from deepspeed.comm import comm

    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    comm.mpi_discovery(distributed_port=29512, verbose=False)
    first = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()[0]
    assert (os.environ["MASTER_ADDR"], os.environ["RANK"], os.environ["WORLD_SIZE"]) == (first, "0", "2")
    assert first != "10.1.2.3"


def test_a_master_addr_that_mpi_discovery_replaces_is_warned_before_the_rendezvous(fake_mpi, monkeypatch):
    """`MASTER_ADDR=<training network> mpirun -np 2 python launch/train.py`: the ranks met on rank 0's first
    `hostname -I` address instead, without a word (and where that address is unreachable they waited in the
    rendezvous until the timeout). The warning comes before DeepSpeed's init, which may never return; a
    launcher's full environment, or none given, is not warned about."""
    import deepspeed

    from relora_ds import distributed
    from relora_ds.train_config import ConfigWarning

    seen_at_init = []
    monkeypatch.setattr(distributed, "release_shm_segment", lambda: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen_at_init.append(len(caught)))
        monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
        monkeypatch.setenv("MASTER_PORT", "29512")
        distributed.init_distributed(auto_mpi_discovery=True, distributed_port=29512)
        said = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
        assert seen_at_init == [1] and len(said) == 1, said
        assert said[0].startswith("MASTER_ADDR=10.1.2.3 is not used: without RANK, WORLD_SIZE and LOCAL_RANK")
        assert "rank 0's first `hostname -I` address" in said[0] and "all five of RANK" in said[0]
        caught.clear()
        distributed.init_distributed(auto_mpi_discovery=False)  # no discovery: nothing replaces it
        monkeypatch.delenv("MASTER_ADDR")
        distributed.init_distributed(auto_mpi_discovery=True)  # none given: nothing to warn about
        for var, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="10.1.2.3").items():
            monkeypatch.setenv(var, value)
        distributed.init_distributed(auto_mpi_discovery=True)  # a launcher's five: DeepSpeed takes them
        assert not [w for w in caught if issubclass(w.category, ConfigWarning)]
    assert len(seen_at_init) == 4
