"""What a run ran on, appended to ``output_dir/run_info.jsonl`` at each start (a resume, a requeue): the
command line, the code (git commit and whether the tree was dirty), library versions, devices and the
scheduler's job, so that a result can be traced to what produced it. Each checkpoint's config.json holds
the same record."""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "deepspeed", "triton", "transformers", "datasets", "sentencepiece", "numpy", "wandb")
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_RESTART_COUNT", "SLURM_JOB_NODELIST", "SLURM_NNODES",
              "SLURM_NTASKS")


def _git(root: Path) -> dict | None:
    """The commit of the relora_ds checkout and whether it had uncommitted changes (None outside git).
    A checkout another user owns (installed once on a shared file system) is one git refuses as of "dubious
    ownership" (git >= 2.35.2), which left every run's commit null: it is marked safe for these commands only.
    That adds no trust: this process already runs that checkout's code."""
    git = ["git", "-c", f"safe.directory={root.resolve()}", "-C", str(root)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        top = subprocess.run([*git, "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=10)
        # Installed into a venv inside another repository, root is not a checkout's top: no commit of ours.
        if commit.returncode != 0 or Path(top.stdout.strip()).resolve() != root.resolve():
            return None
        status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _nccl() -> str | None:
    try:
        v = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
    except Exception:  # a build without NCCL
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def environment(world_size: int) -> dict:
    cuda = torch.cuda.is_available()
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "cwd": os.getcwd(),  # what relative paths in argv were relative to
        "git": _git(Path(__file__).resolve().parents[1]),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in PACKAGES},
        "cuda": torch.version.cuda if cuda else None,
        "nccl": _nccl() if cuda else None,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "host": socket.gethostname(),
        "world_size": world_size,
        "master_addr": os.environ.get("MASTER_ADDR"),
        "slurm": {k: os.environ[k] for k in SLURM_VARS if k in os.environ},
    }


def append(output_dir: Path, record: dict) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "run_info.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
