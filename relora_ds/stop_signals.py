"""How a run stops on a signal: SIGTERM/SIGUSR1 (SLURM preemption, its time limit, the deepspeed launcher
passing on a Ctrl-C) and Ctrl-C itself are recorded by the handler and acted on between steps, once every rank
agrees (the steps carry the flag in their loss all-reduce; start-up and evaluations ask with one of their own):
the step finishes, a checkpoint is saved, the "preempted" record written. A Trainer's mixin (relora_ds/trainer.py)."""
from __future__ import annotations

import os
import signal
from typing import Callable

import torch
import torch.distributed as dist


class StopSignalsMixin:
    def _install_stop_handlers(self, early_stop: Callable[[], int] | None) -> None:
        """SIGTERM/SIGUSR1 (SLURM preemption or time limit) and a first Ctrl-C (SIGINT): finish the step,
        checkpoint, exit cleanly. A second Ctrl-C aborts at once, without saving. ``early_stop``: see Trainer."""
        self._stop_signal, self._interrupted = 0, 0
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            self._signal_handlers[sig] = signal.signal(sig, self._request_stop)
        self._stop_signal = self._stop_signal or (early_stop() if early_stop else 0)  # read once ours are in

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._signal_handlers.items():
            signal.signal(sig, handler)
        self._signal_handlers = {}

    def _request_stop(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            # Ctrl-C twice: abort now, as Python's own handler does. Under torchrun the first Ctrl-C comes twice: the
            # terminal's SIGINT and torchrun's copy of it (torch.distributed.elastic passes it on to each rank). No
            # time window tells the copy apart: Python runs a handler between bytecodes only, so a copy that arrives
            # while the rank waits in a collective is handled when it returns, seconds later. Counted instead.
            self._interrupted += 1
            if self._interrupted > (2 if "TORCHELASTIC_RUN_ID" in os.environ else 1):
                raise KeyboardInterrupt
            if self._interrupted > 1:
                return
            if self.rank == 0:  # a terminal's Ctrl-C reaches every rank of the node; os.write: no buffered
                os.write(2, b"interrupted: finishing the step, saving a checkpoint, then stopping (resume with "
                            b"--resume); Ctrl-C again to abort without saving\n")  # stream to re-enter
        # The first signal names the stop (the deepspeed launcher TERMs its ranks after the terminal's SIGINT).
        self._stop_signal = self._stop_signal or signum

    def _any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank: every rank learns it from one all-reduce."""
        flags = torch.tensor(float(flag), device=self.engine.device)
        dist.all_reduce(flags)
        return flags.item() > 0

    def _stop_agreed_now(self) -> bool:
        """Whether any rank got a stop signal (during start-up, or an evaluation); the steps carry the same
        flag in their loss all-reduce."""
        return self._any_rank(self._stop_signal > 0)

    def _stopped(self, bar, saved: bool) -> dict:
        """End a run stopped by a signal: the "preempted" record (after which the SLURM scripts requeue)."""
        bar.close()
        self.metrics.preempting()
        who = self._stop_signal or "on another rank"
        if saved:
            self._print(f"stopped by signal {who} after step {self.step}; checkpoint saved, resume with --resume")
        else:
            since = f"the checkpoint of step {self.step}" if self.step else "the start"
            self._print(f"stopped by signal {who} during start-up, before training a step: nothing to save "
                        f"(nothing trained since {since}); resume with --resume")
        self.metrics.log({"event": "preempted", "step": self.step})
        self.metrics.close()
        return {"preempted": True, "step": self.step}
