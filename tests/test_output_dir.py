"""relora_ds/output_dir.py: the checks of output_dir before a run writes there (what it is, whether this user
can write it, another run in it, --overwrite and the run's own inputs) and that every rank shares it."""
import pytest

from relora_ds.train_config import TrainConfig

BASE = dict(cycle_length=10, restart_warmup_steps=2, total_steps=100, micro_batch_size=2, global_batch_size=8)


def test_an_output_dir_that_cannot_be_one_is_named(tmp_path):
    """A file, or a path under a file, as output_dir was accepted by preflight and then a FileExistsError
    traceback on every rank; an unwritable place, a PermissionError traceback."""
    from relora_ds.output_dir import check_output_dir, lock_output_dir

    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        with pytest.raises(ValueError, match=rf"output_dir {out}: {tmp_path / 'afile'} exists and is not a directory"):
            check_output_dir(TrainConfig(**BASE, output_dir=str(out)))
        with pytest.raises(ValueError, match=rf"output_dir {out}: cannot create"):
            lock_output_dir(out)
    check_output_dir(TrainConfig(**BASE, output_dir=str(tmp_path / "new" / "run")))  # to be created: fine
    # A symlink to a folder not made yet is made as a plain path is (a user trial: "cannot create .lock (File
    # exists)", the link itself being what existed)
    from relora_ds.output_dir import LOCK_FILE, unlock_output_dir

    link = tmp_path / "link"
    link.symlink_to(tmp_path / "later" / "run")
    check_output_dir(TrainConfig(**BASE, output_dir=str(link)))
    lock_output_dir(link)
    assert (tmp_path / "later" / "run" / LOCK_FILE).is_file()
    unlock_output_dir(link)
    # Unwritable (root, who runs CI, is never refused by chmod: os.access answers instead).
    from relora_ds import output_dir
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(output_dir.os, "access", lambda path, mode: False)
        with pytest.raises(ValueError, match=rf"output_dir {tmp_path / 'new'}: {tmp_path} is not writable by this user"):
            check_output_dir(TrainConfig(**BASE, output_dir=str(tmp_path / "new")))


def test_a_rank_reading_another_lock_file_is_not_sharing_the_output_dir(tmp_path, monkeypatch):
    """Every rank reads rank 0's lock file: a rank on a node-local disk holding a stale .lock of a crashed run
    (it reads one, another) is refused as one that reads none is, after every try; ranks that all read the same
    one pass at once. The ranks' comparison (a collective) stands in: its answers are (missing, differ)."""
    from relora_ds import distributed
    from relora_ds.output_dir import LOCK_FILE, check_shared_output_dir

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text("host n1, pid 7, since 2026-12-05T10:00:00\n")
    asked = []
    for answer, refused in (((False, True), True), ((True, False), True), ((False, False), False)):
        asked.clear()
        monkeypatch.setattr(distributed, "agreement", lambda text: asked.append(text) or answer)
        if refused:
            with pytest.raises(ValueError, match=r"is not one directory shared by every rank \(another rank cannot "
                                                 r"see rank 0's .lock there, or reads another; waited 0 s"):
                check_shared_output_dir(tmp_path / "run", 0, 2, tries=3, pause_s=0)
        else:
            check_shared_output_dir(tmp_path / "run", 0, 2, tries=3, pause_s=0)
        assert asked == ["host n1, pid 7, since 2026-12-05T10:00:00\n"] * (3 if refused else 1)


def test_overwrite_refuses_to_delete_the_runs_own_prepared_data(tmp_path):
    """--overwrite deletes output_dir: a data_dir prepared inside it (output_dir/data, a common layout) is the
    run's input and is refused, as a warm-start source inside it is; beside it, accepted."""
    from relora_ds.output_dir import check_output_dir

    out = tmp_path / "run"
    for inside in (out / "data", out):
        with pytest.raises(ValueError, match=rf"data_dir={inside} lies inside output_dir {out}, which --overwrite"):
            check_output_dir(TrainConfig(**BASE, output_dir=str(out), data_dir=str(inside), overwrite=True))
    check_output_dir(TrainConfig(**BASE, output_dir=str(out), data_dir=str(tmp_path / "data"), overwrite=True))
    check_output_dir(TrainConfig(**BASE, output_dir=str(out), data_dir=str(out / "data")))  # nothing deleted


# Cases a mutation trial of the checkpoint/resume modules found unpinned (each checked to fail with its mutant).

def test_a_run_with_checkpoints_alone_is_another_run(tmp_path):
    """checkpoints/latest without metrics.jsonl (deleted, or never written) is a run there too: a new run
    without --resume is refused, naming it; with --resume or --overwrite it goes on."""
    from relora_ds.output_dir import check_output_dir

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_4")
    with pytest.raises(ValueError, match=rf"output_dir {out} holds a run \(latest\): pass --resume to continue it"):
        check_output_dir(TrainConfig(**BASE, output_dir=str(out)))
    check_output_dir(TrainConfig(**BASE, output_dir=str(out), resume=True))
    check_output_dir(TrainConfig(**BASE, output_dir=str(out), overwrite=True))


def test_the_lock_names_this_process_alone_and_a_second_holder_is_refused(tmp_path):
    """lock_output_dir replaces a crashed run's holder line with this process's one line; a lock held through
    another open file (another run) is refused naming its holder, and not taken; unlock_output_dir empties the
    line (a pid left there would name a run that is gone) and lets the other holder in."""
    import fcntl
    import os
    import socket

    from relora_ds.output_dir import LOCK_FILE, lock_output_dir, unlock_output_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("host gone, pid 1, since 2026-01-01T00:00:00\nhost older, pid 2\n")
    lock_output_dir(out)
    lines = (out / LOCK_FILE).read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"host {socket.gethostname()}, pid {os.getpid()}, since "), lines
    unlock_output_dir(out)
    assert (out / LOCK_FILE).read_text() == ""
    with open(out / LOCK_FILE, "a+") as other:  # another run's lock (flock: per open file)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("host n7, pid 4242, since 2026-12-05T10:00:00\n")
        other.flush()
        with pytest.raises(ValueError, match=rf"output_dir {out} is in use by a run still going \(host n7, pid 4242, "
                                             r"since 2026-12-05T10:00:00\)"):
            lock_output_dir(out)
        fcntl.flock(other, fcntl.LOCK_UN)
    lock_output_dir(out)  # free again
    unlock_output_dir(out)


def test_an_empty_lock_file_is_one_a_rank_cannot_see_and_the_last_try_is_not_waited_for(tmp_path, monkeypatch):
    """An empty .lock (one unlock_output_dir left, not rank 0's line) is compared as none at all; refused after
    the tries, with a pause between tries only (3 tries: 2 pauses)."""
    from relora_ds import distributed, output_dir
    from relora_ds.output_dir import LOCK_FILE, check_shared_output_dir

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text("")
    asked, pauses = [], []
    monkeypatch.setattr(distributed, "agreement", lambda text: asked.append(text) or (text is None, False))
    monkeypatch.setattr(output_dir.time, "sleep", pauses.append)
    with pytest.raises(ValueError, match=r"cannot see rank 0's .lock there; waited 10 s"):
        check_shared_output_dir(tmp_path / "run", 1, 2, tries=3, pause_s=5)
    assert asked == [None] * 3 and pauses == [5, 5]
