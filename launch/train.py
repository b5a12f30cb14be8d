"""ReLoRA pre-training. Runs under `deepspeed`, `torchrun`, `mpirun` or plain `python` (one process).

    deepspeed --num_gpus 2 launch/train.py --config launch/configs/tiny.yaml --deepspeed ds_configs/zero2.json
"""
import signal
import sys
import warnings

# SIGTERM/SIGUSR1 (SLURM's time-limit warning, preemption, scancel) from the first line on: until the
# Trainer installs its own handler (the imports, data preparation, the process group, the model), a signal
# is recorded here and the run stops before its first step (Trainer(early_stop=...)), logging the
# "preempted" record after which the SLURM scripts requeue the job, instead of dying of TERM or dropping
# USR1 (which the SLURM scripts ignore until Python runs): either way the job ended without a requeue.
_early_stop = [0]


def catch_early_stops() -> None:
    def record(signum, frame):
        _early_stop[0] = signum
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, record)


if __name__ == "__main__":  # not when imported: a test process keeps its own handlers
    catch_early_stops()
    # A non-ASCII path in a progress line under an ASCII or Latin-1 stdout: a backslash escape, as stderr
    # writes it, not a UnicodeEncodeError at the first evaluation (launch/cli_types.tolerant_stdout)
    if sys.stdout is not None:  # None: started with stdout closed (>&-), where print() writes nothing
        sys.stdout.reconfigure(errors="backslashreplace")

import torch  # noqa: E402  (after the handlers: importing torch and DeepSpeed takes seconds)

from relora_ds.distributed import launch_rank, run_and_exit
from relora_ds.ds_config import load_ds_config
from relora_ds.train_args import build_launch_parser, check_local_rank_arg, config_from_args
from relora_ds.train_config import ConfigWarning, show_config_warnings_plainly
from relora_ds.trainer import Trainer


def _error(e: Exception) -> None:
    """One write per message (print's separate newline let two ranks' errors share a line), naming the rank
    when there are several (each rank reports what it hit)."""
    rank, world = launch_rank()
    sys.stderr.write(f"{f'[rank {rank}] ' if world > 1 else ''}error: {e}\n")
    sys.stderr.flush()


def main(argv=None) -> int:
    show_config_warnings_plainly()
    if launch_rank()[0] != 0:  # the recipe's warnings are every rank's: rank 0 says them (mpirun sets no RANK)
        warnings.filterwarnings("ignore", category=ConfigWarning)
    parser = build_launch_parser(__doc__)
    args = parser.parse_args(argv)
    trainer, status = None, 1  # an exception leaves with 1 (run_and_exit)
    try:
        try:
            cfg = config_from_args(args)
            check_local_rank_arg(args.local_rank)
            load_ds_config(args.deepspeed)  # a wrong path or bad JSON before the process group starts
            trainer = Trainer(cfg, args.deepspeed, early_stop=lambda: _early_stop[0])
            # The engine, or the checkpoint --resume loads into it: what it refuses is a one-line error too.
            trainer.start()
        except ValueError as e:
            _error(e)
            status = 2
            return status
        try:
            trainer.train()
        except FloatingPointError as e:  # NaN/inf loss: the message names the step and the last good checkpoint
            _error(e)
            status = 3
            return status
        status = 0
        return status
    finally:
        if trainer is not None:  # a NaN stop or any exception: the last TensorBoard events are written too,
            trainer.metrics.close(exit_code=status)  # and W&B marks the run failed
            trainer.close()  # the output_dir lock and the signal handlers (main() may run in-process)
        # Shut the process group down on every exit path, also when main() is called in-process: through
        # DeepSpeed when it started it, which also drops its groups (the world group's clone with the run's
        # timeout, which a later in-process run would otherwise find made and use, destroyed).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ds_comm = sys.modules.get("deepspeed.comm.comm")
            if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
                ds_comm.destroy_process_group()
            else:
                torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_and_exit(main)  # no interpreter teardown: there gloo's threads can abort a finished rank (-6)
