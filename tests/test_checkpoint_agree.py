"""A checkpoint save that fails on one rank stops every rank at once (checkpoint._agreed), leaving `latest` on
the last complete checkpoint: two real ranks (gloo) with a DeepSpeed engine, the failure put on one of them at
each part of the save (tests/dist/checkpoint_agree_worker.py)."""
import os
import re
import signal
import tempfile
import time

import pytest

from launch_utils import ROOT, free_port, launch_env, start_python

WORKER = ROOT / "tests/dist/checkpoint_agree_worker.py"
TIMEOUT = 30  # the process group's: a rank left waiting in a collective raises after it
PROMPT = 10  # seconds a save may take to stop every rank; on 2 cores the tiny engine's save takes under 1


def _run_two_ranks(*args, timeout: int = 120) -> list[tuple[int, str]]:
    """(exit status, stdout + stderr) of each of 2 ranks started as the deepspeed launcher starts them, each
    waited for on its own (tests/launch_utils.run_ranks ends the run at the first rank to fail)."""
    port = free_port()
    base = {**launch_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
            "LOCAL_SIZE": "2", "CROSS_RANK": "0", "CROSS_SIZE": "1"}
    outs = [tempfile.TemporaryFile("w+") for _ in range(2)]
    procs = [start_python(WORKER, list(map(str, args)), cwd=ROOT, stdout=outs[r], stderr=outs[r],
                          env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, start_new_session=True)
             for r in range(2)]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
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


# The failure, the rank it strikes, the part of the save it fails (the other rank's error names it) and that
# rank's own error.
CASES = {
    "stale": (0, "preparing the folder", r"RuntimeError: saving checkpoint \S+step_2: the folder of that name, left "
                                          r"by a save that did not complete, cannot be removed \(PermissionError"),
    "shard": (1, "writing the checkpoint's files", r"RuntimeError: rank 1: saving checkpoint \S+step_2 failed "
                                                    r"\(OSError: \[Errno 28\] No space left on device\)"),
    "scripts": (0, "writing the checkpoint's files", r"RuntimeError: rank 0: saving checkpoint \S+step_2 failed "
                                                      r"\(OSError: \[Errno 28\] No space left on device\)"),
    "rng": (1, "writing the checkpoint's files", r"RuntimeError: rank 1: saving checkpoint \S+step_2 failed "
                                                  r"\(OSError: \[Errno 28\] No space left on device\)"),
    "config": (0, "marking the checkpoint complete", r"OSError: \[Errno 28\] No space left on device"),
}


@pytest.mark.parametrize("failure", list(CASES))
def test_a_save_failing_on_one_rank_stops_every_rank_at_once_and_latest_stays(tmp_path, failure):
    """Rank 1's optimizer shard or RNG state that cannot be written, rank 0's copy of DeepSpeed's recovery scripts
    (shutil's, not DeepSpeed's checkpoint writer: a review), rank 0's crashed-save folder that cannot be
    removed or its config.json that cannot be written: the failing rank raised alone and the other waited in
    the next barrier (DeepSpeed's closing one, or the save's own) until the process group's timeout (NCCL's on
    GPUs: 10-30 min), saying nothing of why. Now the failing rank raises its own error and the other, within
    seconds, a RuntimeError naming that rank and the checkpoint `latest` still names; `latest` and the folder
    of the failed step are as before the save (step_2 has no config.json)."""
    from relora_ds import checkpoint

    ckpt_dir = tmp_path / "checkpoints"
    failing, part, own_error = CASES[failure]
    results = _run_two_ranks(ckpt_dir, failure, TIMEOUT)
    for rank, (status, output) in enumerate(results):
        assert status == 1, f"rank {rank} exited {status}\n{output[-4000:]}"
        stopped = re.search(r"^rank (\d) stopped after ([\d.]+) s: (.*)$", output, re.MULTILINE)
        assert stopped and stopped[1] == str(rank), output[-4000:]
        assert float(stopped[2]) < PROMPT, output[-4000:]  # not the process group's timeout
        if rank == failing:
            assert re.match(own_error, stopped[3]), output[-4000:]
        else:
            assert stopped[3] == (f"RuntimeError: rank {rank}: saving checkpoint {ckpt_dir / 'step_2'} stopped: "
                                  f"rank {failing} failed while {part} (its error is in its output). `latest` still "
                                  "names the last complete checkpoint (step_1), which --resume loads"), output[-4000:]
    assert checkpoint.latest_tag(ckpt_dir) == "step_1"
    assert checkpoint.complete_tags(ckpt_dir) == ["step_1"]
    assert not (ckpt_dir / "step_2" / "config.json").exists()


def test_the_other_ranks_name_every_rank_that_failed(tmp_path, monkeypatch):
    """Several ranks failing (a full disk every rank writes to) are named together, in rank order; the folder's
    `latest` as it is. Rank 0 of a stand-in 4-rank group whose ranks 1 and 3 failed to write their files."""
    from types import SimpleNamespace

    from relora_ds import checkpoint

    (tmp_path / "latest").write_text("step_2")
    agreements = iter([[], [1, 3]])
    monkeypatch.setattr(checkpoint.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(checkpoint.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(checkpoint, "failed_ranks", lambda failed: next(agreements))
    with pytest.raises(RuntimeError, match=r"^rank 0: saving checkpoint \S+step_4 stopped: ranks 1, 3 failed while "
                                           r"writing the checkpoint's files \(their errors are in their output\). "
                                           r"`latest` still names the last complete checkpoint \(step_2\)"):
        checkpoint.save(SimpleNamespace(save_checkpoint=lambda path, tag, **k: (tmp_path / tag).mkdir()), tmp_path, 4,
                        {}, {}, keep_last=0)
    assert checkpoint.latest_tag(tmp_path) == "step_2" and not (tmp_path / "step_4" / "config.json").exists()
