"""Where ReLoRA's merges and resets fall in a run (relora_ds/reset_hook.py through the trainer), on stubs."""
import pytest


@pytest.mark.parametrize("merge_every, merges, resets", [
    (2, [4, 6, 8, 10, 12], [6, 10]),
    (None, [6, 10], [6, 10]),
], ids=["merge_every=2", "merge_every=None"])
def test_merge_every_and_cycle_length_place_merges_resets_and_prune_seeds(monkeypatch, merge_every, merges, resets):
    """Trainer._after_step_events (relora_ds/reset_hook.py) over steps 1-12 (warm start 2, cycle_length 4),
    merge and prune recorded by stubs. Expected by hand from the config docs: merges every `merge_every` steps
    (default cycle_length) and resets (merge + prune) every cycle_length steps, both counted from the switch
    to ReLoRA at step 2, none at the switch itself: merges at 4, 6, 8, 10, 12 with merge_every 2, resets at 6 and 10. Each reset
    prunes with its own seed, run seed + step (a `random` prune must not reuse one mask at every reset, and
    a resumed run must draw the one an uninterrupted run draws at that step)."""
    from types import SimpleNamespace

    from relora_ds import reset_hook
    from relora_ds.train_config import TrainConfig
    from relora_ds.trainer import Trainer

    calls, events = [], []
    monkeypatch.setattr(reset_hook, "merge_and_reinit", lambda engine: calls.append(("merge", t.step)) or {"layers": 1})
    monkeypatch.setattr(reset_hook, "prune_optimizer_state",
                        lambda engine, params, **kw: calls.append(("prune", t.step, {**kw, "params": params}))
                        or {"exp_avg_sq": 0.5})
    monkeypatch.setattr(reset_hook, "lora_parameters", lambda module: ["lora params"])
    cfg = TrainConfig(cycle_length=4, merge_every=merge_every, restart_warmup_steps=2, total_steps=12,
                      warm_start_steps=2, warm_start_lr=1e-3, prune_method="random", prune_ratio=0.5, seed=5,
                      prune_joint=merge_every is None)  # each setting in one case
    t = SimpleNamespace(cfg=cfg, relora_start=2, cycle_start=2, _event=events.append,
                        engine=SimpleNamespace(module=None, global_steps=0, skipped_steps=0))
    for step in range(1, 13):  # as Trainer.train: step += 1, then the events; the switch precedes step 3's training
        t.step, t.engine_phase = step, "full" if step <= 2 else "lowrank"
        t.engine.global_steps = step - 2 if step > 2 else step  # the low-rank engine counts from the switch
        Trainer._after_step_events(t)
    assert [s for kind, s, *_ in calls if kind == "merge"] == merges
    prunes = [(s, kw) for kind, s, *kw in calls if kind == "prune"]
    assert [s for s, _ in prunes] == resets
    assert [kw[0]["seed"] for _, kw in prunes] == [5 + s for s in resets]  # 11, 15: one seed per reset
    assert all(kw[0]["method"] == "random" and kw[0]["ratio"] == 0.5 for _, kw in prunes)
    assert all(kw[0]["joint"] is cfg.prune_joint and kw[0]["params"] == ["lora params"] for _, kw in prunes)
    # Every reset is also a merge, done before the prune (the new A's zeroed B and pruned moments go together).
    for s in resets:
        assert calls.index(("merge", s)) < next(i for i, c in enumerate(calls) if c[:2] == ("prune", s))
    assert [(e["event"], e["step"]) for e in events] == sorted(
        [("reset", s) for s in resets] + [("merge", s) for s in merges if s not in resets], key=lambda e: e[1])


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_the_baselines_never_merge_or_reset(monkeypatch, mode):
    """mode=lora (LoRA without restarts, the paper's baseline) and mode=full: no merge and no prune at any
    step, cycle_length given or not (a mutation that merged in mode=lora passed every test)."""
    from types import SimpleNamespace

    from relora_ds import reset_hook
    from relora_ds.train_config import TrainConfig

    monkeypatch.setattr(reset_hook, "merge_and_reinit", lambda engine: pytest.fail("merged"))
    monkeypatch.setattr(reset_hook, "prune_optimizer_state", lambda *a, **kw: pytest.fail("pruned"))
    with pytest.warns(UserWarning, match="cycle_length=4 is ignored"):
        cfg = TrainConfig(mode=mode, cycle_length=4, restart_warmup_steps=2, total_steps=12)
    engine = SimpleNamespace(module=None, global_steps=0, skipped_steps=0)
    assert all(reset_hook.after_step(engine, step, cfg, cycle_start=0) is None for step in range(1, 13))


def test_nothing_is_due_at_the_cycles_anchor_itself(monkeypatch):
    """after_step at step == cycle_start (the switch, or the checkpoint's last reset a resume counts from) does
    nothing: that step's reset, if any, was already done; the next merge is merge_every steps on."""
    from types import SimpleNamespace

    from relora_ds import reset_hook
    from relora_ds.train_config import TrainConfig

    monkeypatch.setattr(reset_hook, "merge_and_reinit", lambda engine: pytest.fail("merged"))
    monkeypatch.setattr(reset_hook, "prune_optimizer_state", lambda *a, **kw: pytest.fail("pruned"))
    cfg = TrainConfig(cycle_length=4, restart_warmup_steps=2, total_steps=12)
    engine = SimpleNamespace(module=None, global_steps=8, skipped_steps=0)
    assert [reset_hook.after_step(engine, s, cfg, cycle_start=s) for s in (0, 4, 8)] == [None] * 3
    assert reset_hook.events_due(0, 4, 2) == (False, False)


def test_a_reset_prunes_after_a_single_real_update(monkeypatch):
    """fp16 overflows left one real optimizer update since the switch (global_steps 3, skipped_steps 2): Adam
    holds moments, and the reset prunes them; only global_steps == skipped_steps means no update. (A mutation
    audit found `<= skipped + 1` passing: the moments would have survived into the new cycle.)"""
    from types import SimpleNamespace

    from relora_ds import reset_hook
    from relora_ds.train_config import TrainConfig

    pruned = []
    monkeypatch.setattr(reset_hook, "merge_and_reinit", lambda engine: {"layers": 1})
    monkeypatch.setattr(reset_hook, "prune_optimizer_state", lambda *a, **kw: pruned.append(kw) or {})
    monkeypatch.setattr(reset_hook, "lora_parameters", lambda module: [])
    cfg = TrainConfig(cycle_length=4, restart_warmup_steps=2, total_steps=12)
    rec = reset_hook.after_step(SimpleNamespace(module=None, global_steps=3, skipped_steps=2), 4, cfg, cycle_start=0)
    assert len(pruned) == 1 and "prune_skipped" not in rec, rec
