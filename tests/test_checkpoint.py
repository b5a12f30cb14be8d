"""Checkpoint logic without an engine: the catch-up of a merge older code skipped, keep_last, the save's order
and failures, latest and an incomplete checkpoint under it (what --resume plans: tests/test_resume_plan.py;
what a checkpoint holds: tests/test_checkpoint_contents.py)."""
import pytest


def test_a_checkpoint_missing_its_last_merge_gets_it_once_on_resume():
    """Older relora_ds skipped the reset at a run's last step; resuming such a final checkpoint (merge_count
    one short at a merge step) does it once, and nothing else is ever merged twice."""
    from types import SimpleNamespace

    import relora_ds
    from relora_ds.train_config import TrainConfig
    from relora_ds.trainer import Trainer

    model = relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("debug"))
    relora_ds.wrap(model, rank=4)
    calls = []
    cfg = TrainConfig(cycle_length=4, restart_warmup_steps=2, total_steps=20, warm_start_steps=2, warm_start_lr=1e-3)
    t = SimpleNamespace(cfg=cfg, relora_start=2, cycle_start=2, engine_phase="lowrank",
                        engine=SimpleNamespace(module=model),
                        _after_step_events=lambda: calls.append(t.step))
    for step, merges, want in ((10, 1, [10]), (10, 2, []), (9, 1, []), (6, 0, [6]), (6, 1, []), (2, 0, [])):
        for _, layer in relora_ds.relora_layers(model):
            layer.merge_count.fill_(merges)
        t.step, calls[:] = step, []
        Trainer._catch_up_missed_merge(t, {})  # a checkpoint from before step_events_done
        assert calls == want, (step, merges)
    # What the merge count cannot tell: the cycle halved on resume (4 -> 2) on the step-6 checkpoint, whose
    # reset (the first, at cycle 4) is done. Today's checkpoints say so, and nothing is merged again; an old
    # one is refused (its cycles now count from 6, schedule.cycle_anchor, which assumes that reset done).
    t.cfg = TrainConfig(cycle_length=2, restart_warmup_steps=2, total_steps=20, warm_start_steps=2, warm_start_lr=1e-3)
    for _, layer in relora_ds.relora_layers(model):
        layer.merge_count.fill_(1)
    t.step, t.cycle_start, calls[:] = 6, 6, []
    Trainer._catch_up_missed_merge(t, {"step_events_done": True})
    assert calls == []
    with pytest.raises(ValueError, match=r"step 6 was written before relora_ds recorded whether its step's merge "
                                         r"and reset were done .* resume it with its own cycle_length first"):
        Trainer._catch_up_missed_merge(t, {})


def test_keep_last_deletes_the_oldest_by_step_number_and_spares_the_kept_tag(tmp_path):
    """_prune_old after a save: the newest keep_last checkpoints by step number (step_10 after step_4, not
    before it as by name), never the tag just saved (a rewound run saves a step older than the rewound
    tags'), nothing at keep_last 0."""
    from relora_ds import checkpoint

    for s in (2, 4, 10, 12):
        (tmp_path / f"step_{s}").mkdir()
        (tmp_path / f"step_{s}" / "config.json").write_text("{}")
    (tmp_path / "latest").write_text("step_12")
    checkpoint._prune_old(tmp_path, keep_last=0, keep="step_12")
    assert {p.name for p in tmp_path.iterdir()} == {"step_2", "step_4", "step_10", "step_12", "latest"}
    checkpoint._prune_old(tmp_path, keep_last=3, keep="step_12")
    assert {p.name for p in tmp_path.iterdir()} == {"step_4", "step_10", "step_12", "latest"}
    checkpoint._prune_old(tmp_path, keep_last=1, keep="step_4")  # complete ones past the saved tag: left
    assert {p.name for p in tmp_path.iterdir()} == {"step_4", "step_10", "step_12", "latest"}


def test_a_deletion_cut_short_leaves_no_folder_that_says_complete(tmp_path, monkeypatch):
    """_prune_old removes an old checkpoint's config.json before its shards: killed mid-deletion (here the
    deletion stops after one file, as a SIGKILL would leave it), the folder is one no resume takes for
    complete (complete_tags), which the next prune removes; config.json last would leave one that says
    complete with its shards gone."""
    from relora_ds import checkpoint

    for s in (2, 4):
        (tmp_path / f"step_{s}").mkdir()
        (tmp_path / f"step_{s}" / "mp_rank_00_model_states.pt").write_bytes(b"shard")
        (tmp_path / f"step_{s}" / "config.json").write_text("{}")

    def killed_after_one_file(path, ignore_errors=False):
        (path / "mp_rank_00_model_states.pt").unlink(missing_ok=True)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_after_one_file)
    checkpoint._prune_old(tmp_path, keep_last=1, keep="step_4")
    assert checkpoint.complete_tags(tmp_path) == ["step_4"]
    monkeypatch.undo()
    checkpoint._prune_old(tmp_path, keep_last=1, keep="step_4")
    assert {p.name for p in tmp_path.iterdir()} == {"step_4"}


def test_keep_last_does_not_count_a_save_that_crashed(tmp_path):
    """From a review: a folder a crashed save left (no config.json; no resume can load it) above the latest
    took one of the keep_last places, so a complete checkpoint went instead (after a resume with another
    save_every, the crashed step is never saved again). Oracle, by hand: keep_last 2 after saving step_250
    keeps step_200 and step_250; the stale step_300 goes."""
    from relora_ds import checkpoint

    for s in (100, 200, 250, 300):
        (tmp_path / f"step_{s}").mkdir()
        if s != 300:
            (tmp_path / f"step_{s}" / "config.json").write_text("{}")
    (tmp_path / "step_300" / "mp_rank_00_model_states.pt").write_text("partial")
    (tmp_path / "latest").write_text("step_250")
    checkpoint._prune_old(tmp_path, keep_last=0, keep="step_250")  # 0 keeps everything, the crashed one too
    assert {p.name for p in tmp_path.iterdir()} == {"step_100", "step_200", "step_250", "step_300", "latest"}
    checkpoint._prune_old(tmp_path, keep_last=2, keep="step_250")
    assert {p.name for p in tmp_path.iterdir()} == {"step_200", "step_250", "latest"}
    assert checkpoint.complete_tags(tmp_path) == ["step_200", "step_250"]


def test_keep_last_neither_counts_nor_deletes_a_complete_checkpoint_past_the_saved_one(tmp_path):
    """A review's case: a run died after writing step_300 complete but before moving `latest` (250), and the
    resumed run saved step_250 again. step_300 took a keep_last place, so step_200 went. Oracle, by hand:
    keep_last 2 keeps step_200 and step_250, and leaves step_300 (loadable by --resume-from; replaced when
    the run saves step 300)."""
    from relora_ds import checkpoint

    for s in (100, 200, 250, 300):
        (tmp_path / f"step_{s}").mkdir()
        (tmp_path / f"step_{s}" / "config.json").write_text("{}")
    (tmp_path / "latest").write_text("step_250")
    checkpoint._prune_old(tmp_path, keep_last=2, keep="step_250")
    assert {p.name for p in tmp_path.iterdir()} == {"step_200", "step_250", "step_300", "latest"}


def test_config_json_marks_a_checkpoint_complete_only_after_every_ranks_files(tmp_path, monkeypatch):
    """config.json is what makes a folder a complete checkpoint (_prune_old, complete_tags): rank 0 wrote it
    right after its own files, while other ranks could still be writing theirs (a review's find; a kill
    then left a 'complete' folder without rank 1's RNG state). Now the ranks' agreement that every rank's
    part succeeded (a collective, which waits for every rank as a barrier does) comes first. Rank 0 of a
    stand-in 2-rank group records the order."""
    import json
    from pathlib import Path

    from relora_ds import checkpoint

    order = []
    monkeypatch.setattr(checkpoint.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(checkpoint.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(checkpoint, "failed_ranks", lambda failed: order.append("agree") or [])

    class Engine:
        def save_checkpoint(self, path, tag, client_state, save_latest):
            (tmp_path / tag).mkdir()
            order.append("engine")

    real_save = checkpoint.torch.save
    monkeypatch.setattr(checkpoint.torch, "save", lambda obj, f: (real_save(obj, f), order.append("rng")))
    real_replace = checkpoint.os.replace
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: (real_replace(a, b), order.append(Path(b).name)))
    checkpoint.save(Engine(), tmp_path, 5, {}, {"x": 1}, keep_last=0)
    assert order[order.index("rng") + 1] == "agree" and order.index("config.json") > order.index("rng") + 1
    assert order.index("latest") > order.index("config.json") and order[-1] == "agree"
    assert json.loads((tmp_path / "step_5" / "config.json").read_text()) == {"x": 1}


def test_a_checkpoint_deleted_or_incomplete_under_latest_is_named(tmp_path):
    """`latest` names a folder deleted by hand, or one without DeepSpeed's model states, or one with a shard cut
    short (a full disk, a node lost mid-write) or a damaged config.json: a clear error naming the file and the
    complete checkpoints there, not a FileNotFoundError/AssertionError from the loader or torch's "failed
    finding central directory" on one rank while the others went on."""
    import json as _json

    import torch

    from relora_ds import checkpoint as ck
    from relora_ds.resume_plan import resume_progress
    ckpts = tmp_path / "checkpoints"
    for step in (5, 10):
        (ckpts / f"step_{step}").mkdir(parents=True)
        (ckpts / f"step_{step}" / "config.json").write_text(_json.dumps({"train": {}}))
        torch.save({"module": {"w": torch.randn(64, 64)}}, ckpts / f"step_{step}" / "mp_rank_00_model_states.pt")
        (ckpts / f"step_{step}" / "universal" / "zero" / "w").mkdir(parents=True)
        torch.save(torch.randn(64, 64), ckpts / f"step_{step}" / "universal" / "zero" / "w" / "fp32.pt")
    shard = ckpts / "step_10" / "universal" / "zero" / "w" / "fp32.pt"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"step_10 \(the one to resume from\) has 1 damaged file\(s\), cut short: "
                                         r"universal/zero/w/fp32.pt; complete checkpoints "
                                         r"in .*: \['step_5'\]: resume from one with --resume-from"):
        ck.check_complete(ckpts, "step_10")
    shard.write_bytes(b"")
    assert ck.cut_short(ckpts / "step_10") == ["universal/zero/w/fp32.pt"]
    shard.write_bytes(whole)
    ck.check_complete(ckpts, "step_10")  # whole again: no error
    # DeepSpeed's "checkpoint_serialization": false writes torch's legacy format (a pickle, no zip): it passes
    torch.save(torch.randn(64, 64), shard, _use_new_zipfile_serialization=False)
    ck.check_complete(ckpts, "step_10")
    (ckpts / "step_10" / "config.json").write_text('{"train": {')
    with pytest.raises(ValueError, match=r"step_10 \(the one to resume from\) has a damaged config.json \(Expecting"):
        ck.check_complete(ckpts, "step_10")
    (ckpts / "step_10" / "config.json").write_text(_json.dumps({"train": {}}))
    (ckpts / "latest").write_text("step_12")
    with pytest.raises(ValueError, match=r"step_12 \(the one to resume from\) lacks its folder; complete checkpoints "
                                         r"in .*: \['step_5', 'step_10'\]: resume from one with --resume-from"):
        ck.check_complete(ckpts, ck.latest_tag(ckpts))
    (ckpts / "latest").write_text("step_10")
    (ckpts / "step_10" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"step_10 \(the one to resume from\) lacks config.json; complete checkpoints "
                                         r"in .*: \['step_5'\]"):
        resume_progress(ckpts, None)
    ck.check_complete(ckpts, "step_5")  # complete: no error


def test_a_save_that_fails_names_the_free_space_and_what_resume_loads(tmp_path, monkeypatch):
    """A full disk fails torch.save with "basic_ios::clear: iostream error", naming neither the file system nor
    what is left: the error names the checkpoint, the free space (here a stand-in file system with 5 MiB free)
    and the checkpoint `latest` still names."""
    from types import SimpleNamespace

    from relora_ds import checkpoint

    (tmp_path / "step_2").mkdir()
    (tmp_path / "latest").write_text("step_2")

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 256 vs 128; "
                           "basic_ios::clear: iostream error")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(free=5 * 2**20))
    with pytest.raises(RuntimeError, match=r"rank 0: saving checkpoint .*step_4 failed \(RuntimeError: .*iostream "
                                           r"error\); its file system has 5 MiB free \(full\?\). `latest` still "
                                           r"names the last complete checkpoint \(step_2\), which --resume loads"):
        checkpoint.save(SimpleNamespace(save_checkpoint=full), tmp_path, 4, {}, {}, keep_last=0)
    assert (tmp_path / "latest").read_text() == "step_2"
    # The first save of a run, whose checkpoints folder DeepSpeed's makedirs failed to create on a full disk: the
    # handler's own disk_usage raised FileNotFoundError (a review); it measures the nearest existing folder.
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match=r"saving checkpoint .*checkpoints/step_1 failed \(OSError: \[Errno 28\] No "
                                           r"space left on device\); its file system has [\d,]+ MiB free"):
        checkpoint.save(SimpleNamespace(save_checkpoint=lambda *a, **k: _raise(OSError(28, "No space left on device"))),
                        tmp_path / "checkpoints", 1, {}, {}, keep_last=0)
    # A crashed save's folder of the same step that cannot be removed (read-only): named, not a bare PermissionError
    # (a review: the run trained every step and lost its last checkpoint and export to it).
    (tmp_path / "step_4").mkdir()
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda path: _raise(PermissionError(1, "Operation not permitted",
                                                                                        "rng_rank0.pt")))
    with pytest.raises(RuntimeError, match=r"saving checkpoint .*step_4: the folder of that name, left by a save that "
                                           r"did not complete, cannot be removed \(PermissionError: .*\); remove it .* "
                                           r"`latest` still names step_2"):
        checkpoint.save(SimpleNamespace(save_checkpoint=full), tmp_path, 4, {}, {}, keep_last=0)


def _raise(error):
    raise error


# Cases a mutation trial of the checkpoint/resume modules found unpinned (each checked to fail with its mutant).

class _Engine:
    """A stand-in DeepSpeed engine: save_checkpoint writes one shard file into the tag's folder (or fails)."""

    def __init__(self, fail=False):
        self.fail = fail

    def save_checkpoint(self, path, tag, client_state, save_latest):
        if self.fail:
            raise OSError("No space left on device")
        from pathlib import Path

        (Path(path) / tag).mkdir(parents=True, exist_ok=True)
        (Path(path) / tag / "mp_rank_00_model_states.pt").write_bytes(b"new")


def test_a_save_clears_what_a_crashed_save_of_that_step_left_but_not_the_checkpoint_latest_names(tmp_path):
    """A folder of the step being saved that `latest` does not name is a crashed save's (maybe of another
    number of ranks): its stale shards go before the new ones are written, or ds_to_universal would read them
    beside the new. The folder `latest` names is the last complete checkpoint: a save of that step again that
    fails leaves it whole."""
    from relora_ds import checkpoint

    (tmp_path / "step_5").mkdir()
    (tmp_path / "step_5" / "zero_pp_rank_3_mp_rank_00_optim_states.pt").write_bytes(b"stale, of 4 ranks")
    (tmp_path / "latest").write_text("step_2")
    checkpoint.save(_Engine(), tmp_path, 5, {}, {"x": 1}, keep_last=0)
    assert sorted(p.name for p in (tmp_path / "step_5").iterdir()) == ["config.json", "mp_rank_00_model_states.pt",
                                                                       "rng_rank0.pt"]
    with pytest.raises(RuntimeError, match="saving checkpoint"):
        checkpoint.save(_Engine(fail=True), tmp_path, 5, {}, {"x": 1}, keep_last=0)
    assert checkpoint.latest_tag(tmp_path) == "step_5" and checkpoint.complete_tags(tmp_path) == ["step_5"]
    assert (tmp_path / "step_5" / "mp_rank_00_model_states.pt").read_bytes() == b"new"


def test_keep_last_spares_the_protected_checkpoints_without_counting_them(tmp_path):
    """--keep-warm-start: the warm start's last step (step_2, in `protect`) is neither deleted nor counted among
    keep_last. Oracle, by hand: keep_last 2 after saving step_10 keeps step_2, step_8 and step_10; the save
    passes its protect on to the pruning."""
    from relora_ds import checkpoint

    for s in (2, 4, 6, 8):
        (tmp_path / f"step_{s}").mkdir()
        (tmp_path / f"step_{s}" / "config.json").write_text("{}")
    (tmp_path / "latest").write_text("step_8")
    checkpoint.save(_Engine(), tmp_path, 10, {}, {}, keep_last=2, protect=("step_2",))
    assert checkpoint.complete_tags(tmp_path) == ["step_2", "step_8", "step_10"]
    checkpoint._prune_old(tmp_path, keep_last=1, keep="step_10")  # not protected any more: it goes
    assert checkpoint.complete_tags(tmp_path) == ["step_10"]


def test_keep_last_leaves_a_folder_whose_config_json_cannot_be_deleted(tmp_path, monkeypatch):
    """A checkpoint made read-only to keep it: its config.json cannot be unlinked, and the rest of it stays
    too (not emptied by rmtree while it still says complete)."""
    from pathlib import Path

    from relora_ds import checkpoint

    for s in (2, 4):
        (tmp_path / f"step_{s}" / "universal").mkdir(parents=True)
        (tmp_path / f"step_{s}" / "universal" / "w.pt").write_bytes(b"w")
        (tmp_path / f"step_{s}" / "config.json").write_text("{}")
    real = Path.unlink

    def unlink(self, missing_ok=False):
        if self == tmp_path / "step_2" / "config.json":
            raise PermissionError(13, "Permission denied")
        return real(self, missing_ok=missing_ok)
    monkeypatch.setattr(Path, "unlink", unlink)
    checkpoint._prune_old(tmp_path, keep_last=1, keep="step_4")
    assert (tmp_path / "step_2" / "universal" / "w.pt").read_bytes() == b"w"
    assert checkpoint.complete_tags(tmp_path) == ["step_2", "step_4"]


def test_latest_written_by_hand_with_a_newline_and_tags_not_of_the_form_step_n(tmp_path):
    """`echo step_8 > latest` (a hand-made rewind) names step_8; tag_step reads only step_N tags."""
    from relora_ds import checkpoint

    assert checkpoint.latest_tag(tmp_path) is None
    (tmp_path / "latest").write_text("step_8\n")
    assert checkpoint.latest_tag(tmp_path) == "step_8"
    assert checkpoint.tag_step("step_12") == 12
    for bad in ("stage_8", "step_", "step_8a", "global_step8"):
        with pytest.raises(ValueError, match=rf"checkpoint tag '{bad}' is not of the form step_N"):
            checkpoint.tag_step(bad)


def test_a_rewind_points_latest_back_before_it_moves_anything_and_keeps_every_rewound_copy(tmp_path, monkeypatch):
    """checkpoint.rewind moves `latest` first: killed after the first move (here the second os.replace fails),
    `latest` names the rewind point, not a folder that moved into rewound/. Rewound three times past the same
    step, all three copies are kept (step_8, step_8.1, step_8.2)."""
    from relora_ds import checkpoint

    for s in (4, 8, 12):
        (tmp_path / f"step_{s}").mkdir()
        (tmp_path / f"step_{s}" / "config.json").write_text(f'{{"step": {s}}}')
    (tmp_path / "latest").write_text("step_12")
    real, moves = checkpoint.os.replace, []

    def replace(a, b):
        if "rewound" in str(b):
            moves.append(b)
            if len(moves) == 2:
                raise OSError("killed")
        return real(a, b)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError, match="killed"):
        checkpoint.rewind(tmp_path, "step_4", ["step_8", "step_12"])
    assert checkpoint.latest_tag(tmp_path) == "step_4"
    monkeypatch.undo()
    for n in (1, 2):  # the rewound run saves step_8 again, and is rewound again
        (tmp_path / "step_8").mkdir()
        (tmp_path / "step_8" / "config.json").write_text(f'{{"again": {n}}}')
        checkpoint.rewind(tmp_path, "step_4", ["step_8"])
    assert sorted(p.name for p in (tmp_path / "rewound").iterdir()) == ["step_8", "step_8.1", "step_8.2"]
    assert [(tmp_path / "rewound" / name / "config.json").read_text() for name in ("step_8", "step_8.1", "step_8.2")] \
        == ['{"step": 8}', '{"again": 1}', '{"again": 2}']


def test_a_checkpoint_of_this_version_records_its_steps_merge_done_and_loads_back():
    """Trainer.state_dict records step_events_done: resumed with another cycle_length (cycles counted from a
    moved anchor), _catch_up_missed_merge neither refuses it (the refusal is for checkpoints from before the
    record) nor merges again. load_state_dict reads back the step, the tokens seen and the sampler's state."""
    from types import SimpleNamespace

    from relora_ds.resume import CheckpointsMixin
    from relora_ds.train_config import TrainConfig

    sampler = {"epoch": 1, "position": 5, "samples_consumed": 37, "num_samples": 32}
    saved = SimpleNamespace(step=6, engine_phase="lowrank", relora_start=2, world=2, tokens_seen=6_144,
                            batches=SimpleNamespace(state_dict=lambda: dict(sampler)))
    client = CheckpointsMixin.state_dict(saved)
    loaded = []
    t = SimpleNamespace(cfg=TrainConfig(cycle_length=2, restart_warmup_steps=2, total_steps=20, warm_start_steps=2,
                                        warm_start_lr=1e-3),
                        relora_start=2, cycle_start=6, engine_phase="lowrank", step=0, tokens_seen=0,
                        batches=SimpleNamespace(load_state_dict=loaded.append),
                        _after_step_events=lambda: pytest.fail("merged again"))
    CheckpointsMixin.load_state_dict(t, client)
    assert (t.step, t.tokens_seen, loaded) == (6, 6_144, [sampler])
    CheckpointsMixin._catch_up_missed_merge(t, client)


def test_a_missed_merge_of_online_relora_is_counted_in_merges_not_resets():
    """With merge_every 2 and cycle_length 4 from the switch at step 2, a checkpoint of step 8 from before
    step_events_done has had merges at steps 4 and 6 (merge_count 2) and misses the one at 8: caught up once;
    with merge_count 3 it is done. (Counted in cycles, 8 would expect 0 merges before it.)"""
    from types import SimpleNamespace

    import relora_ds
    from relora_ds.resume import CheckpointsMixin
    from relora_ds.train_config import TrainConfig

    model = relora_ds.wrap(relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("debug")), rank=4)
    calls = []
    cfg = TrainConfig(cycle_length=4, merge_every=2, restart_warmup_steps=2, total_steps=20, warm_start_steps=2,
                      warm_start_lr=1e-3)
    t = SimpleNamespace(cfg=cfg, relora_start=2, cycle_start=2, engine_phase="lowrank", step=8,
                        engine=SimpleNamespace(module=model), _after_step_events=lambda: calls.append(t.step))
    for merges, want in ((2, [8]), (3, []), (0, [])):
        for _, layer in relora_ds.relora_layers(model):
            layer.merge_count.fill_(merges)
        calls.clear()
        CheckpointsMixin._catch_up_missed_merge(t, {})
        assert calls == want, merges




def test_keep_last_removes_latest_universal_with_the_conversion_it_names(tmp_path):
    """latest_universal (DeepSpeed's load_checkpoint(dir, load_universal=True) without a tag loads the folder it
    names, engine.py) named the conversion of a step keep_last then deleted: it goes with it, and stays while
    the step it names stays."""
    from relora_ds import checkpoint

    for s in (2, 4, 6):
        (tmp_path / f"step_{s}" / "universal").mkdir(parents=True)
        (tmp_path / f"step_{s}" / "config.json").write_text("{}")
    (tmp_path / "latest_universal").write_text("step_4/universal")
    checkpoint._prune_old(tmp_path, keep_last=2, keep="step_6")
    assert (tmp_path / "latest_universal").read_text() == "step_4/universal"
    checkpoint._prune_old(tmp_path, keep_last=1, keep="step_6")
    assert not (tmp_path / "step_4").exists() and not (tmp_path / "latest_universal").exists()
