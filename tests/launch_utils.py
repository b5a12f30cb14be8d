"""Run a script under the deepspeed launcher with N CPU ranks (gloo) from a test."""
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_deepspeed(script, *args, nprocs: int = 2, timeout: int = 600, cwd=ROOT,
                  master_port: int | None = None) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).with_name("deepspeed")
    port = master_port or free_port()
    cmd = [str(launcher), "--num_gpus", str(nprocs), "--master_port", str(port), str(script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc
