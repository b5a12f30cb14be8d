"""Checkpoints: DeepSpeed engine state + our client state, switched in atomically.

Layout: ``<output_dir>/checkpoints/step_<N>/`` (DeepSpeed's files, ``config.json`` with the run and model
configs, ``rng_rank<r>.pt`` per rank) and ``<output_dir>/checkpoints/latest`` holding the tag of the last
*complete* checkpoint. ``latest`` is written to a temporary file and renamed only after every rank has
finished writing, so a crash while saving leaves it pointing at the previous complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_tag(ckpt_dir: Path) -> str | None:
    path = Path(ckpt_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def save(engine, ckpt_dir: Path, step: int, client_state: dict, config: dict, keep_last: int) -> Path:
    """Every rank calls this. Returns the checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    tag = f"step_{step}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    if rank == 0:
        (ckpt_dir / tag / "config.json").write_text(json.dumps(config, indent=2))
    if os.environ.get("RELORA_TEST_CRASH_IN_SAVE") == str(step):
        os._exit(17)  # tests: die after the files, before `latest` moves (a crash mid-save)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
        _prune_old(ckpt_dir, keep_last, keep=tag)
    if dist.is_initialized():
        dist.barrier()
    return ckpt_dir / tag


def _prune_old(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    tags = sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
    for old in tags[:-keep_last] if keep_last > 0 else []:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_config(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((Path(ckpt_dir) / tag / "config.json").read_text())


def load_rng(ckpt_dir: Path, tag: str) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = Path(ckpt_dir) / tag / f"rng_rank{rank}.pt"
    if path.is_file():
        set_rng_state(torch.load(path, weights_only=False))
