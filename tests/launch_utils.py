"""Run a script on N CPU ranks (gloo) from a test: under the deepspeed launcher, or started directly with the
environment that launcher gives its ranks (run_ranks: the same ranks, without the launcher's ~5 s)."""
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import forked_python

ROOT = Path(__file__).resolve().parents[1]


_LOWEST_PORT = 10000


def free_port() -> int:
    """A port free now that nothing else in the test run is likely to take before a rank binds it (seconds
    later, after its start-up). ``bind(0)`` picked from the kernel's ephemeral range, where every outgoing
    connection (the other xdist worker's gloo pairs, a hundred per run) takes its local port: one could take
    a picked port before rank 0's store bound it. So: a random port below that range, in a block of its own
    per xdist worker (the workers never pick the same), checked bindable now."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    index, count = (int(worker) if worker.isdigit() else 0), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    span = (low - _LOWEST_PORT) // max(count, 1)
    if span < 100:  # an unusual ephemeral range: the kernel's pick
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    pick = random.SystemRandom()  # not the global generator, which tests seed
    for _ in range(200):
        port = _LOWEST_PORT + index % max(count, 1) * span + pick.randrange(span)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port among 200 tried in [{_LOWEST_PORT + index * span}, "
                       f"{_LOWEST_PORT + (index + 1) * span})")


def launch_env() -> dict:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


forked_python.use_environment(launch_env())  # this session's, as the tests import this module


def clean_env(**extra) -> dict:
    """This process's environment without a launcher's or SLURM's variables (a run here is nobody's rank),
    with ``extra`` set."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                      "MASTER_PORT")}
    return {**env, **extra}


def run_tool(*cmd, env=None) -> subprocess.CompletedProcess:
    """``cmd`` from the repository root, in ``env`` (default clean_env()), its output captured."""
    return subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env or clean_env(), capture_output=True, text=True,
                          timeout=120)


def _check(cmd, proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def run_each_rank(script, *args, nprocs: int = 2, timeout: int = 120) -> list[tuple[int, str]]:
    """(exit status, stdout + stderr) of each of ``nprocs`` ranks started in ``run_ranks``' environment (RANK,
    LOCAL_RANK, ... set; no --local_rank argument), each waited for on its own (run_ranks ends the run at the
    first rank to fail): what every rank says when one fails. Ranks still running at ``timeout`` are killed
    (exit status -9)."""
    port = free_port()
    base = {**launch_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nprocs),
            "LOCAL_SIZE": str(nprocs), "CROSS_RANK": "0", "CROSS_SIZE": "1"}
    outs = [tempfile.TemporaryFile("w+") for _ in range(nprocs)]
    procs = [start_python(script, list(map(str, args)), cwd=ROOT, stdout=outs[r], stderr=outs[r],
                          env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, start_new_session=True)
             for r in range(nprocs)]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    results = []
    for p, out in zip(procs, outs):
        out.seek(0)
        results.append((p.returncode, out.read()))
        out.close()
    return results


def run_ranks(script, *args, nprocs: int = 2, timeout: int = 600, cwd=ROOT, master_port: int | None = None,
              env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus nprocs script args`` without the launcher: each rank is started as
    deepspeed/launcher/launch.py starts it (``python -u script --local_rank=N args``, with RANK, LOCAL_RANK,
    WORLD_SIZE, LOCAL_SIZE, CROSS_RANK/SIZE, MASTER_ADDR/PORT set), the ranks share one stdout and one stderr
    as they share the launcher's, and the first rank to fail ends the run with its exit status after the
    others are terminated, as the launcher does (it polls once a second: they get that second to report).
    Each rank is a fork of this process's preloaded interpreter where the environment allows
    (start_python: tests/forked_python.py), ~3 s of imports less a rank.
    The launcher's two Python start-ups and its polling cost ~5 s a run; the tests of the launchers
    themselves (tests/test_distributed.py, tests/test_cluster_*.py, the conftest reference run) use them."""
    port = master_port or free_port()
    base = {**launch_env(), **(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": str(nprocs), "LOCAL_SIZE": str(nprocs), "CROSS_RANK": "0", "CROSS_SIZE": "1",
            "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(nprocs)))}
    cmd = [sys.executable, "-u", str(script), *map(str, args)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        procs = [start_python(script, [f"--local_rank={r}", *cmd[3:]], cwd=cwd, stdout=out, stderr=err,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, start_new_session=True)
                 for r in range(nprocs)]
        deadline, failed = time.monotonic() + timeout, None
        try:
            # Poll every rank each time: any() over a generator stopped at the first live rank, so a rank 1
            # that died went unseen while rank 0 waited for it in a collective (until its 60-min timeout).
            while [p.poll() for p in procs].count(None):
                failed = failed or next((p for p in procs if p.returncode not in (None, 0)), None)
                if failed is not None:
                    time.sleep(1.0)  # the launcher's poll interval: the other ranks may report too
                    break
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(cmd, timeout)
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        failed = failed or next((p for p in procs if p.returncode != 0), None)
        out.seek(0), err.seek(0)
        proc = subprocess.CompletedProcess(cmd, failed.returncode if failed else 0, out.read(), err.read())
    return _check(cmd, proc) if check else proc


def start_python(script, args, *, env: dict, **kwargs):
    """``python -u script args`` started: as a fork of the tests' preloaded interpreter where its environment
    allows (tests/forked_python.py), else as a subprocess. kwargs: subprocess.Popen's cwd, stdout, stderr
    (files) and start_new_session."""
    if forked_python.forkable(env):
        return forked_python.ForkedPython(script, args, env=env, **kwargs)
    return subprocess.Popen([sys.executable, "-u", str(script), *map(str, args)], env=env, **kwargs)


def run_python(script, *args, env: dict, cwd=ROOT, timeout: int = 600, check: bool = False
               ) -> subprocess.CompletedProcess:
    """``subprocess.run([python, -u, script, *args], capture_output=True, text=True)`` through start_python;
    a timeout kills its whole session, as run_group's does; ``check``: a failure raises with its output."""
    cmd = [sys.executable, "-u", str(script), *map(str, args)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = start_python(script, args, env=env, cwd=cwd, stdout=out, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.seek(0), err.seek(0)
        done = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    return _check(cmd, done) if check else done


def run_group(cmd, timeout: int, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)``, but a timeout kills
    the command's whole process group: subprocess.run kills only the launcher, leaving its ranks to load the
    machine (and push later tests past their limits)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C)
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_deepspeed(script, *args, nprocs: int = 2, timeout: int = 600, cwd=ROOT,
                  master_port: int | None = None) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).with_name("deepspeed")
    port = master_port or free_port()
    cmd = [str(launcher), "--num_gpus", str(nprocs), "--master_port", str(port), str(script), *map(str, args)]
    return _check(cmd, run_group(cmd, timeout, cwd=cwd, env=launch_env()))
