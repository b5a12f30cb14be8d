"""Checkpoints on stable storage (relora_ds/durable.py, used by checkpoint.save and the universal conversion):
every file flushed before config.json or `latest` names it, each rank its own, the renames flushed too."""
import pytest


def test_a_checkpoint_is_on_disk_before_config_json_or_latest_name_it(tmp_path):
    """A checkpoint's files were left in the page cache: a power loss (or a node's kernel crash) after `latest`
    moved, and after keep_last deleted the older checkpoints, could leave nothing to resume from. Each rank
    now fsyncs the files it wrote (those DeepSpeed's checkpoint engine writes, and its RNG state) before the
    barrier that lets rank 0 mark the folder complete; rank 0 then flushes the rest of the folder and the
    directory entries, and config.json and latest are flushed before their renames, their folders after.
    A real DeepSpeed engine at ZeRO-1 (model states and one optimizer shard) and ZeRO-3 (each rank's model
    states too), one rank; os.fsync recorded by the path each descriptor names."""
    import subprocess
    import sys

    from launch_utils import ROOT, free_port, launch_env
    env = {**launch_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(ROOT / "tests/dist/fsync_worker.py"), str(tmp_path)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("stage")]
    renames = "flushed before renames ['.config.json.tmp', '.latest.tmp']; after ['step_1', 'stage{}']"
    assert lines == [
        "stage 1: own ['mp_rank_00_model_states.pt', 'rng_rank0.pt', 'zero_pp_rank_0_mp_rank_00_optim_states.pt']; "
        "late []; " + renames.format(1),
        "stage 3: own ['rng_rank0.pt', 'zero_pp_rank_0_mp_rank_00_model_states.pt', "
        "'zero_pp_rank_0_mp_rank_00_optim_states.pt']; late []; " + renames.format(3)], proc.stdout[-3000:]


def test_only_a_ranks_own_files_are_flushed_before_the_barrier_and_the_writer_is_restored(tmp_path, monkeypatch):
    """Rank 1 of a stand-in 2-rank group flushes the files its engine's writer wrote and its RNG state, not rank
    0's nor the folder (rank 0's work, after the barrier); the engine's writer is its own again afterwards, as
    it is when the save fails."""
    from pathlib import Path

    from relora_ds import checkpoint

    flushed = []
    real_fsync = checkpoint.os.fsync
    monkeypatch.setattr(checkpoint.os, "fsync",
                        lambda fd: (real_fsync(fd), flushed.append(Path(checkpoint.os.readlink(f"/proc/self/fd/{fd}")))))
    monkeypatch.setattr(checkpoint.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(checkpoint.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(checkpoint.dist, "barrier", lambda: None)

    class Writer:
        def save(self, state_dict, path):
            checkpoint.torch.save(state_dict, path)

    class Engine:
        checkpoint_engine = Writer()

        def save_checkpoint(self, path, tag, client_state, save_latest):
            (Path(path) / tag).mkdir(parents=True)
            (Path(path) / tag / "zero_pp_rank_0_optim_states.pt").write_bytes(b"rank 0's")  # another rank's
            self.checkpoint_engine.save(state_dict={"w": 1}, path=str(Path(path) / tag / "mine_model.pt"))
            self.checkpoint_engine.save({"m": 2}, str(Path(path) / tag / "mine_optim.pt"))

    engine = Engine()
    checkpoint.save(engine, tmp_path, 3, {}, {}, keep_last=0)
    tag = (tmp_path / "step_3").resolve()
    assert flushed == [tag / "mine_model.pt", tag / "mine_optim.pt", tag / "rng_rank1.pt"]
    assert "save" not in vars(engine.checkpoint_engine)

    def fails(path, tag, client_state, save_latest):
        engine.checkpoint_engine.save({"w": 1}, str(tmp_path / "nowhere" / "x.pt"))
    engine.save_checkpoint = fails
    with pytest.raises(RuntimeError, match="saving checkpoint"):
        checkpoint.save(engine, tmp_path, 4, {}, {}, keep_last=0)
    assert "save" not in vars(engine.checkpoint_engine)


def test_a_universal_conversion_is_on_disk_before_its_rename_says_complete(tmp_path, monkeypatch):
    """The universal conversion is renamed into the checkpoint when complete, and a later resume loads a
    `universal/` folder it finds without converting again: each of its files is flushed before the rename,
    the checkpoint's entry for it after. The converter stands in (it writes two nested files)."""
    from pathlib import Path

    from relora_ds import checkpoint, universal

    events = []
    real_fsync, real_replace = checkpoint.os.fsync, universal.os.replace
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (real_fsync(fd), events.append(
        ("fsync", Path(checkpoint.os.readlink(f"/proc/self/fd/{fd}"))))))
    monkeypatch.setattr(universal.os, "replace", lambda a, b: (real_replace(a, b), events.append(("replace", b))))

    def convert(src, out):
        (out / "zero" / "w").mkdir(parents=True)
        (out / "zero" / "w" / "fp32.pt").write_bytes(b"w")
        (out / "zero" / "w" / "exp_avg.pt").write_bytes(b"m")
    monkeypatch.setattr(universal, "is_sharded", lambda ckpt_dir, tag: True)
    monkeypatch.setattr(universal, "_ds_to_universal", convert)
    monkeypatch.setattr(universal, "_add_frozen_tensors", lambda ckpt_dir, tag, zero: None)
    (tmp_path / "step_2").mkdir()
    assert universal.make_universal(tmp_path, "step_2") == "step_2/universal"
    root = tmp_path.resolve()
    tmp = root / ".step_2_universal.tmp"
    rename = events.index(("replace", tmp_path / "step_2" / "universal"))
    before = [path for kind, path in events[:rename] if kind == "fsync"]
    assert len(before) == rename and set(before) == {
        tmp / "zero" / "w" / "fp32.pt", tmp / "zero" / "w" / "exp_avg.pt", tmp / "zero" / "w", tmp / "zero", tmp}
    for path in before:  # each file and folder before the folder holding it (its entry names it)
        assert before.index(path) < before.index(path.parent) if path != tmp else before[-1] == tmp
    assert events[rename + 1:] == [("fsync", root / "step_2")]
