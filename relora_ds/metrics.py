"""Rank-0 metrics: one JSON object per line in metrics.jsonl, the same scalars to TensorBoard.

metrics.jsonl is strict JSON: a non-finite number (a skipped step's gradient norm) is written as null, which
every JSON reader takes (Python's json would write NaN/Infinity, which jq, JavaScript and strict parsers
refuse); TensorBoard and W&B get the value itself."""
from __future__ import annotations

import datetime
import json
import math
import re
import resource
from pathlib import Path

import torch

from .durable import fsync_path, fsync_tree, replace_durably


def json_finite(value):
    """``value`` with every non-finite float (also in nested dicts and lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_finite(v) for v in value]
    return value


def peak_memory_mb() -> float:
    """Peak accelerator memory on CUDA, else this process's peak RSS (also on a GPU host whose run uses
    DeepSpeed's CPU accelerator: CUDA is then never initialized), in MiB (2**20 bytes)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLogger:
    """``resume_step``: this run continues a previous one from that step (``--resume``; 0 when there was no
    checkpoint). What the previous run logged for later steps -- the steps between its last checkpoint and
    its end, which this run trains again -- moves from metrics.jsonl to metrics.rewound.jsonl (kept, not
    lost), with any line a crash cut short, and TensorBoard hides its events from those steps on
    (``purge_step``), so each step is logged once. Where a record of the checkpoint's own step moves too (one
    logged after the checkpoint: AFTER_CHECKPOINT_EVENTS, an overdue reset), TensorBoard hides that step as
    well and gets the step's kept records again: it shows what metrics.jsonl holds."""

    REWOUND = "metrics.rewound.jsonl"
    # Events logged with step N after step N's checkpoint (the warm-start switch runs at the start of step
    # N + 1; a resumed start's settings changes, logged at its resume step): a run resumed from that
    # checkpoint logs them again (its own), so the earlier record is rewound too.
    AFTER_CHECKPOINT_EVENTS = ("switch_to_relora", "resume_settings_changed")
    # So is the reset a resume with a shorter cycle_length does at its resume step N ("overdue": the checkpoint's
    # step became a missed reset, done after the load): a later resume from N does it again where its own
    # cycle_length still makes N overdue, and logs it again; with another cycle_length, no reset at N happens,
    # and the record left behind showed one (in metrics.jsonl, the plot's reset lines and TensorBoard).

    WANDB_ID = "wandb_run_id"

    def __init__(self, output_dir: str | Path, enabled: bool, resume_step: int | None = None,
                 wandb_project: str | None = None, run_config: dict | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = self._wandb = None
        self.rewound = 0
        if enabled and wandb_project:
            self._wandb = _start_wandb(Path(output_dir), wandb_project, run_config)
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            replay = None  # the kept records of the resume step, where TensorBoard hides it (see above)
            if resume_step is not None:
                self.rewound, replay = self._rewind(resume_step)
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + (replay is None)
                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=purge)
            except ImportError:  # tensorboard is a dependency; keep JSONL logging if it is missing
                self._tb = None
            for rec in replay or ():
                self._log_tensorboard(rec)

    def _after_checkpoint(self, rec: dict) -> bool:
        """Whether `rec`, a record of a checkpoint's own step, was logged after that checkpoint was saved (or
        loaded): a run resumed from it logs its own."""
        return rec.get("event") in self.AFTER_CHECKPOINT_EVENTS or (
            rec.get("event") == "reset" and rec.get("overdue") is True)

    def _rewind(self, step: int) -> tuple[int, list[dict] | None]:
        """Moves the records logged after checkpoint `step` aside: (how many lines moved, the records of `step`
        kept where one of `step` moved too, else None)."""
        if not self.path.is_file():
            return 0, None
        keep, later, text = [], [], self.path.read_text()
        at_step, step_moved = [], False
        for line in text.splitlines(keepends=True):
            line = line if line.endswith("\n") else line + "\n"  # a last line cut before its newline: the next
            # append would continue it, and the two records read as one broken line
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a crash mid-write: the dead run's, and no JSON reader's
                rec = None
            if not isinstance(rec, dict):  # (or JSON but no record: a hand edit, blocks a power loss left)
                later.append(line)
                continue
            rec_step = rec.get("step")
            redone = isinstance(rec_step, int) and (
                rec_step > step or (rec_step == step and self._after_checkpoint(rec)))
            (later if redone else keep).append(line)
            if rec_step == step:
                step_moved = step_moved or redone
                if not redone:
                    at_step.append(rec)
        if later:  # the moved records on disk before metrics.jsonl loses them, whatever stops this start
            rewound = self.path.parent / self.REWOUND
            moved = "".join(later)
            if not (rewound.is_file() and rewound.read_text().endswith(moved)):  # moved there by a start that
                with rewound.open("a") as f:  # then died before rewriting metrics.jsonl: not twice
                    f.write(moved)
            fsync_path(rewound)
            fsync_path(self.path.parent)  # (its entry, where this start made the file)
        if later or not text.endswith("\n") and text:
            replace_durably("".join(keep), self.path)
        return len(later), at_step if step_moved else None

    def sync(self) -> None:
        """Flush what was logged so far to stable storage (before a checkpoint is saved): a run resumed from
        that checkpoint after a power loss or a node crash finds every record logged before the save (the
        save's own ``checkpoint`` record is flushed with the next one), instead of a gap no later start fills."""
        if not self.enabled:
            return
        if self.path.is_file():
            fsync_path(self.path)
        if self._tb is not None:
            self._tb.flush()
            fsync_tree(Path(self._tb.log_dir))
        fsync_path(self.path.parent)  # their entries, where this run made them

    def logged(self, step: int, key: str) -> bool:
        """Whether metrics.jsonl holds a record of `step` with `key` (False where this logger is disabled)."""
        if not self.enabled or not self.path.is_file():
            return False
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a crash mid-write
                continue
            if isinstance(rec, dict) and rec.get("step") == step and key in rec:
                return True
        return False

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(json_finite(record), allow_nan=False)
        with self.path.open("a") as f:
            f.write(line + "\n")
        self._log_tensorboard(record)
        scalars = _scalars(record)
        if self._wandb is not None and "step" in record and scalars:  # (an event without numbers: no empty row)
            self._wandb.log({**scalars, "step": record["step"]})

    def _log_tensorboard(self, record: dict) -> None:
        if self._tb is not None and "step" in record:
            for k, v in _scalars(record).items():
                self._tb.add_scalar(k, v, record["step"])

    def preempting(self) -> None:
        """The job stops to be resumed: W&B marks its run preempted rather than finished."""
        if self._wandb is not None:
            self._wandb.mark_preempting()

    def close(self, exit_code: int = 0) -> None:
        """Flush TensorBoard's events and end the W&B run (``exit_code`` != 0 marks it failed); idempotent
        (launch/train.py also calls it on every exit path)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish(exit_code=exit_code)
            self._wandb = None


def _scalars(record: dict) -> dict:
    """A record's numbers for TensorBoard and W&B; an event's (a reset's pruned fractions, a checkpoint's
    seconds...) under the event's name: "reset/exp_avg", not an "exp_avg" chart beside the training curves."""
    prefix = f"{record['event']}/" if "event" in record else ""
    return {f"{prefix}{k}": v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _start_wandb(output_dir: Path, project: str, run_config: dict | None):
    """A W&B run that a resumed or requeued job continues: its id is kept in output_dir. The x axis is our
    step (a metric), not W&B's own counter, so the steps a resumed run trains again are plotted at their
    step rather than dropped as out of order."""
    import uuid

    import wandb

    from .durable import replace_durably

    id_file = output_dir / MetricsLogger.WANDB_ID
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not re.fullmatch(r"[\w-]+", run_id):  # none yet, or a file a crash left empty (W&B ids: letters, digits, -_)
        run_id = uuid.uuid4().hex[:12]
    output_dir.mkdir(parents=True, exist_ok=True)
    replace_durably(run_id, id_file)
    run = wandb.init(project=project, id=run_id, resume="allow", config=run_config, dir=str(output_dir))
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def cycle_position(step: int, cycle_start: int, cycle_length: int, total_steps: int, cycles_before: int = 0) -> dict:
    """Where step `step` (1-based, just done) lies among ReLoRA's cycles, for the progress bar:
    {"cycle": "k/of", "in_cycle": "j/cycle_length"}, the reset closing cycle k at j == cycle_length; empty
    in the warm start. A last cycle cut short by total_steps counts as one. The cycles count from
    `cycle_start` (the switch to ReLoRA, or the reset a resume with another cycle_length re-counted from), after
    `cycles_before` cycles."""
    since = step - cycle_start
    if since <= 0:
        return {}
    cycles = cycles_before + math.ceil((total_steps - cycle_start) / cycle_length)
    k, j = divmod(since - 1, cycle_length)
    return {"cycle": f"{cycles_before + k + 1}/{cycles}", "in_cycle": f"{j + 1}/{cycle_length}"}


def progress_line(rec: dict, total_steps: int, elapsed_s: float, steps_done: int, cycle: dict) -> str:
    """One plain log line for a metrics record, where no terminal shows the progress bar (a SLURM .out
    file): step, loss, lr, throughput, ReLoRA cycle, elapsed and estimated time left (from this process's
    steps so far, evaluations and checkpoints included)."""
    left = (total_steps - rec["step"]) * elapsed_s / max(steps_done, 1)
    hms = lambda s: str(datetime.timedelta(seconds=round(s)))  # noqa: E731
    parts = [f"step {rec['step']}/{total_steps}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.3e}",
             f"{rec['tokens_per_s']:,.0f} tok/s", _tflops(rec["tflops_per_gpu"]) + " TFLOP/s/GPU"]
    if "mfu" in rec:
        parts.append(f"MFU {rec['mfu']:.1%}")
    if cycle:
        parts.append(f"cycle {cycle['cycle']} step {cycle['in_cycle']}")
    parts += [f"elapsed {hms(elapsed_s)}", f"left ~{hms(left)}"]
    return " | ".join(parts)


def _tflops(value: float) -> str:
    """101.2, or 0.0043 where one decimal would print a CPU's rate as 0.0."""
    return f"{value:.1f}" if value >= 0.1 else f"{value:.2g}"
