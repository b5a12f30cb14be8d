"""Review of the session's later diff (2026-12-07): the trainer's SIGINT handler (relora_ds/trainer.py,
``Trainer._request_stop``, commit 540bd26).

That commit took a SIGINT within a second of the first for torchrun's copy of the terminal's Ctrl-C
(torch.distributed.elastic passes the SIGINT it gets on to each rank, which the terminal's reached too). But
Python runs a signal handler only between bytecodes of the main thread: a copy that arrives while the rank
waits in a collective (a gloo barrier here, a gradient all-reduce or a CUDA sync in a step) is handled when
that call returns, seconds later, and was taken for a second Ctrl-C: the run aborted without its checkpoint.
Found here with 2 gloo ranks, rank 1 two seconds late to a barrier: the copy, sent 50 ms after the first SIGINT,
was handled after 2.0 s and raised KeyboardInterrupt. And without torchrun (python or the deepspeed launcher,
where no SIGINT comes twice) a user's real double Ctrl-C within a second was ignored.

The handler now counts the SIGINTs: two for the first Ctrl-C under torchrun (TORCHELASTIC_RUN_ID), one
elsewhere."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from launch_utils import ROOT, free_port

WORKER = textwrap.dedent("""
    import os, signal, sys, threading, time
    import torch.distributed as dist
    from relora_ds.trainer import Trainer

    rank, port = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    if rank == 0:
        t = Trainer.__new__(Trainer)
        t.rank, t._stop_signal, t._interrupted = 1, 0, False
        signal.signal(signal.SIGINT, t._request_stop)
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C, handled at once
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()  # torchrun's copy, 50 ms later
        try:
            dist.barrier()  # a step's collective, waiting on a slower rank
        except KeyboardInterrupt:
            print("aborted unsaved", flush=True)
            os._exit(3)
        print(f"stopping after the step with a checkpoint, signal {t._stop_signal}", flush=True)
        os._exit(0)
    time.sleep(2.0)
    dist.barrier()
    os._exit(0)
""")


def _trainer():
    from relora_ds.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.rank, t._stop_signal, t._interrupted = 1, 0, False
    return t


def test_torchruns_copy_of_the_first_ctrl_c_handled_late_does_not_abort(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(free_port())
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "review"}  # torchrun's workers have it
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), port], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    out, err = ranks[1].communicate(timeout=120)
    ranks[0].communicate(timeout=60)
    assert ranks[1].returncode == 0 and f"signal {int(signal.SIGINT)}" in out, out + err[-2000:]


def test_a_users_double_ctrl_c_aborts_where_no_launcher_copies_it(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)  # python launch/train.py, the deepspeed launcher
    t = _trainer()
    t._request_stop(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        t._request_stop(signal.SIGINT, None)  # at once: Python's own handler aborts on it too


def test_under_torchrun_the_users_second_ctrl_c_aborts_and_the_copy_does_not(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "review")
    clock = [100.0]
    monkeypatch.setattr("relora_ds.trainer.time.monotonic", lambda: clock[0])
    t = _trainer()
    t._request_stop(signal.SIGINT, None)  # the terminal's
    t._request_stop(signal.SIGINT, None)  # torchrun's copy
    assert t._stop_signal == signal.SIGINT
    clock[0] += 3.0
    with pytest.raises(KeyboardInterrupt):
        t._request_stop(signal.SIGINT, None)  # the user's second Ctrl-C
