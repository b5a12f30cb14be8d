"""Rank-0 metrics: one JSON object per line in metrics.jsonl, the same scalars to TensorBoard."""
from __future__ import annotations

import json
import resource
from pathlib import Path

import torch


def peak_memory_mb() -> float:
    """Peak accelerator memory on CUDA, else this process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLogger:
    """``resume_step``: this run continues a previous one from that step (``--resume``; 0 when there was no
    checkpoint). What the previous run logged for later steps -- the steps between its last checkpoint and
    its end, which this run trains again -- moves from metrics.jsonl to metrics.rewound.jsonl (kept, not
    lost), with any line a crash cut short, and TensorBoard hides its events from those steps on
    (``purge_step``), so each step is logged once."""

    REWOUND = "metrics.rewound.jsonl"

    def __init__(self, output_dir: str | Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        self.rewound = 0
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                self.rewound = self._rewind(resume_step)
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=purge)
            except ImportError:  # tensorboard is a dependency; keep JSONL logging if it is missing
                self._tb = None

    def _rewind(self, step: int) -> int:
        if not self.path.is_file():
            return 0
        keep, later = [], []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                rec_step = json.loads(line).get("step")
            except ValueError:  # a line cut by a crash mid-write: the dead run's, and no JSON reader's
                later.append(line if line.endswith("\n") else line + "\n")
                continue
            (later if isinstance(rec_step, int) and rec_step > step else keep).append(line)
        if later:
            with (self.path.parent / self.REWOUND).open("a") as f:
                f.writelines(later)
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(keep))
            tmp.replace(self.path)
        return len(later)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        """Flush TensorBoard's events; idempotent (launch/train.py also calls it on every exit path)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
