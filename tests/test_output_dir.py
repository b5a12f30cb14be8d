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
