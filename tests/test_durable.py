"""Checkpoints on stable storage (relora_ds/durable.py, used by checkpoint.save and the universal conversion):
every file flushed before config.json or `latest` names it, each rank its own, the renames flushed too; and
metrics, exports and prepared data dirs before what relies on them."""
import pytest


def _recorded(monkeypatch, unlink: bool = False) -> list:
    """The calls of os.fsync (by the path its descriptor names), os.replace (by its target) and, with
    ``unlink``, os.unlink from here on, in order, as ("fsync" | "replace" | "unlink", Path)."""
    import os
    from pathlib import Path

    events = []
    real = {name: getattr(os, name) for name in ("fsync", "replace", "unlink")}
    monkeypatch.setattr(os, "fsync", lambda fd: (real["fsync"](fd), events.append(
        ("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))))
    monkeypatch.setattr(os, "replace", lambda a, b, **k: (real["replace"](a, b, **k), events.append(
        ("replace", Path(b)))))
    if unlink:
        monkeypatch.setattr(os, "unlink", lambda a, **k: (real["unlink"](a, **k), events.append(("unlink", Path(a)))))
    return events


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


def test_only_a_ranks_own_files_are_flushed_before_the_agreement_and_the_writer_is_restored(tmp_path, monkeypatch):
    """Rank 1 of a stand-in 2-rank group flushes the files its engine's writer wrote and its RNG state, not rank
    0's nor the folder (rank 0's work, after the ranks agree all wrote theirs); the engine's writer is its own
    again afterwards, as it is when the save fails."""
    from pathlib import Path

    from relora_ds import checkpoint

    events = _recorded(monkeypatch)
    monkeypatch.setattr(checkpoint.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(checkpoint.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(checkpoint, "failed_ranks", lambda failed: [])  # every rank's part succeeded

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
    flushed = [path for kind, path in events if kind == "fsync"]
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
    from relora_ds import universal

    events = _recorded(monkeypatch)

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


def test_metrics_up_to_a_checkpoint_are_on_disk_before_the_checkpoint_is_saved(tmp_path, monkeypatch):
    """metrics.jsonl was left in the page cache: after a power loss, a run resumed from the checkpoint at step N
    found the records before N missing, a gap no later start fills (it rewinds only the later ones). The
    trainer's save now flushes metrics.jsonl and TensorBoard's events before checkpoint.save runs."""
    from types import SimpleNamespace

    from relora_ds import resume
    from relora_ds.metrics import MetricsLogger

    events = _recorded(monkeypatch)
    metrics = MetricsLogger(tmp_path, enabled=True)
    metrics.log({"step": 1, "loss": 3.5})
    monkeypatch.setattr(resume.checkpoint, "save", lambda *a, **k: events.append(("checkpoint.save", a[2])) or
                        tmp_path / "checkpoints" / "step_2")
    trainer = SimpleNamespace(engine=None, ckpt_dir=tmp_path / "checkpoints", step=2, metrics=metrics,
                              state_dict=dict, _run_config=dict, progress=dict, cfg=SimpleNamespace(keep_last=1),
                              _protected_checkpoints=tuple)
    resume.CheckpointsMixin.save(trainer)
    save = events.index(("checkpoint.save", 2))
    flushed = {path for _, path in events[:save]}
    tb_files = {p.resolve() for p in (tmp_path / "tensorboard").rglob("events.out.tfevents.*")}
    assert (tmp_path / "metrics.jsonl").resolve() in flushed and tb_files and tb_files <= flushed, events
    metrics.close()


def test_a_rewind_keeps_the_moved_records_on_disk_before_metrics_jsonl_loses_them(tmp_path, monkeypatch):
    """A resume moves the records after its step to metrics.rewound.jsonl: that file and its folder entry are
    flushed first, then metrics.jsonl is replaced through a flushed temporary file and its folder flushed, so a
    crash at any point leaves each record in one of the two files."""
    import json

    from relora_ds.metrics import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    events = _recorded(monkeypatch)
    logger = MetricsLogger(tmp_path, enabled=True, resume_step=2)
    root = tmp_path.resolve()
    assert events[:5] == [("fsync", root / "metrics.rewound.jsonl"), ("fsync", root),
                          ("fsync", root / ".metrics.jsonl.tmp"), ("replace", tmp_path / "metrics.jsonl"),
                          ("fsync", root)]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.rewound.jsonl").read_text().splitlines()] == [3]
    logger.close()


def test_an_export_is_on_disk_before_its_files_are_renamed_into_place(tmp_path, monkeypatch):
    """export_hf stages the export and renames each file into the output folder: a power loss after a rename of
    data still in the page cache could leave an empty or partial model.safetensors under its final name. Every
    staged file is flushed before an earlier export's weights are deleted (a flush of gigabytes takes a while:
    a crash in it leaves the old export whole) and before the first rename, the output folder's entries after
    the last."""
    import os

    import relora_ds

    events = _recorded(monkeypatch, unlink=True)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"an earlier export")
    model = relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("debug", vocab_size=64))
    relora_ds.export_hf(model, tmp_path / "hf", token_ids={"bos_token_id": 1, "eos_token_id": 2})
    renamed = [path for kind, path in events if kind == "replace"]
    first = min(i for i, (kind, path) in enumerate(events) if kind == "replace" or
                (kind == "unlink" and os.path.dirname(path) == str(tmp_path / "hf")))
    assert events[first] == ("unlink", tmp_path / "hf" / "model.safetensors"), events
    before = [path for kind, path in events[:first] if kind == "fsync"]
    assert sorted(p.name for p in renamed) == sorted(os.listdir(tmp_path / "hf"))
    assert {p.name for p in renamed} <= {p.name for p in before}
    assert events[-1] == ("fsync", (tmp_path / "hf").resolve()) and events[-2][0] == "replace"


def test_a_prepared_data_dir_is_on_disk_before_its_manifest_calls_it_complete(tmp_path, monkeypatch):
    """A prepared dir with a manifest is complete: the token files and the tokenizer are flushed before their
    renames, the renames before the manifest, written through a flushed temporary file, the folder's entries
    after (a power loss right after prepare_data could otherwise leave a manifest naming a train.bin of zeros,
    the size it says)."""
    import json
    import os

    from relora_ds.data import load_manifest, prepare_data

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Line {i} of a small corpus about item {i * 7}."}) + "\n"
                              for i in range(40)))
    events = _recorded(monkeypatch)
    out = (tmp_path / "out").resolve()
    prepare_data([corpus], out, vocab_size=300, val_fraction=0.2)
    m = load_manifest(out)
    kept = {os.path.basename(m["tokenizer_path"]), "train.bin", "validation.bin"}
    replaced = [os.path.basename(b) for kind, b in events if kind == "replace"]
    assert kept <= set(replaced) and replaced[-1] == "manifest.json", replaced
    first = next(i for i, (kind, b) in enumerate(events) if kind == "replace" and os.path.basename(b) in kept)
    flushed = {p.name for kind, p in events[:first] if kind == "fsync"}
    assert {".train.bin.tmp", ".validation.bin.tmp", os.path.basename(m["tokenizer_path"])} <= flushed, events
    manifest = events.index(("replace", out / "manifest.json"))
    assert events[manifest - 1] == ("fsync", out / ".manifest.json.tmp") and events[manifest + 1] == ("fsync", out)
    last_bin = max(i for i, (kind, b) in enumerate(events) if kind == "replace" and b.suffix == ".bin")
    assert ("fsync", out) in events[last_bin:manifest - 1]  # the renames' entries before the manifest names them


def test_rank_0_flushes_the_rest_of_the_folder_and_its_entries_before_config_json(tmp_path, monkeypatch):
    """Rank 0 (here without a process group) flushes, before config.json says complete, also what the engine
    wrote past its checkpoint writer (DeepSpeed's zero_to_fp32.py recovery script), the checkpoint folder's
    entries and its entry in the checkpoints folder: a power loss after `latest` moved must not lose a name."""
    from pathlib import Path

    from relora_ds import checkpoint

    events = _recorded(monkeypatch)

    class Engine:
        def save_checkpoint(self, path, tag, client_state, save_latest):
            (Path(path) / tag).mkdir(parents=True)
            (Path(path) / tag / "zero_to_fp32.py").write_text("# recovery script")

    checkpoint.save(Engine(), tmp_path / "checkpoints", 3, {}, {}, keep_last=0)
    root = (tmp_path / "checkpoints").resolve()
    config = events.index(("replace", tmp_path / "checkpoints" / "step_3" / "config.json"))
    flushed = [path for kind, path in events[:config] if kind == "fsync"]
    assert {root / "step_3" / "zero_to_fp32.py", root / "step_3" / "rng_rank0.pt", root / "step_3", root} <= set(flushed)
    assert flushed.index(root / "step_3") < flushed.index(root)  # the folder's entries, then its own name


def test_fsync_passes_over_only_a_directory_the_file_system_cannot_sync(tmp_path, monkeypatch):
    """A file system that cannot fsync a directory (EINVAL, ENOTSUP) keeps its entries by its own rules: passed
    over. The same error on a file's data, or another error on a directory, is raised. Every descriptor is
    closed either way."""
    import errno
    import os

    from relora_ds import durable

    (tmp_path / "f").write_text("x")
    opened, closed = [], []
    real_open, real_close = os.open, os.close
    monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(real_open(*a, **k)) or opened[-1])
    monkeypatch.setattr(os, "close", lambda fd: (closed.append(fd), real_close(fd)))
    for code in (errno.EINVAL, errno.ENOTSUP):
        monkeypatch.setattr(os, "fsync", lambda fd, code=code: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
        durable.fsync_path(tmp_path)
        with pytest.raises(OSError) as e:
            durable.fsync_path(tmp_path / "f")
        assert e.value.errno == code
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        durable.fsync_path(tmp_path)
    assert opened and closed == opened
