"""A checkpoint save that fails on one rank stops every rank at once (checkpoint._agreed), leaving `latest` on
the last complete checkpoint: two real ranks (gloo) with a DeepSpeed engine, the failure put on one of them at
each part of the save (tests/dist/checkpoint_agree_worker.py)."""
import re

import pytest

from launch_utils import ROOT, run_each_rank

WORKER = ROOT / "tests/dist/checkpoint_agree_worker.py"
TIMEOUT = 30  # the process group's: a rank left waiting in a collective raises after it
PROMPT = 10  # seconds a save may take to stop every rank; on 2 cores the tiny engine's save takes under 1


# The failure, the rank it strikes, the part of the save it fails (the other rank's error names it) and that
# rank's own error.
CASES = {
    "stale": (0, "preparing the folder", r"RuntimeError: saving checkpoint \S+step_2: the folder of that name, left "
                                          r"by a save that did not complete, cannot be removed \(PermissionError"),
    "shard": (1, "writing the checkpoint's files", r"RuntimeError: rank 1: saving checkpoint \S+step_2 failed "
                                                    r"\(OSError: \[Errno 28\] No space left on device\)"),
    "optimizer": (1, "writing the checkpoint's files", r"RuntimeError: rank 1: saving checkpoint \S+step_2 failed "
                                                        r"\(RuntimeError: \[enforce fail at alloc_cpu.cpp:117\] .*not "
                                                        r"enough memory"),
    "nvme": (1, "writing the checkpoint's files", r"RuntimeError: rank 1: saving checkpoint \S+step_2 failed "
                                                   r"\(OSError: \[Errno 28\] No space left on device\)"),
    "scripts": (0, "writing the checkpoint's files", r"RuntimeError: rank 0: saving checkpoint \S+step_2 failed "
                                                      r"\(OSError: \[Errno 28\] No space left on device\)"),
    "rng": (1, "writing the checkpoint's files", r"RuntimeError: rank 1: saving checkpoint \S+step_2 failed "
                                                  r"\(OSError: \[Errno 28\] No space left on device\)"),
    "config": (0, "marking the checkpoint complete", r"OSError: \[Errno 28\] No space left on device"),
}


@pytest.mark.parametrize("failure", list(CASES))
def test_a_save_failing_on_one_rank_stops_every_rank_at_once_and_latest_stays(tmp_path, failure):
    """Rank 1's optimizer shard or RNG state that cannot be written, its optimizer state dict out of host memory
    or its NVMe swap files' copy on a full disk, rank 0's copy of DeepSpeed's recovery scripts
    (shutil's, not DeepSpeed's checkpoint writer: a review), rank 0's crashed-save folder that cannot be
    removed or its config.json that cannot be written: the failing rank raised alone and the other waited in
    the next barrier (DeepSpeed's closing one, or the save's own) until the process group's timeout (NCCL's on
    GPUs: 10-30 min), saying nothing of why. Now the failing rank raises its own error and the other, within
    seconds, a RuntimeError naming that rank and the checkpoint `latest` still names; `latest` and the folder
    of the failed step are as before the save (step_2 has no config.json)."""
    from relora_ds import checkpoint

    ckpt_dir = tmp_path / "checkpoints"
    failing, part, own_error = CASES[failure]
    results = run_each_rank(WORKER, ckpt_dir, failure, TIMEOUT)
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
