"""The universal checkpoint (relora_ds/universal.py) without an engine: DeepSpeed's converter, its errors and
its stop signals, the conversion of a checkpoint without ZeRO, the frozen tensors it leaves out, and a
conversion cut short (the engines' resumes through it: tests/test_trainer_resume_layouts.py)."""
import pytest


def test_a_checkpoint_the_converter_cannot_read_is_a_clear_error(tmp_path):
    from relora_ds import checkpoint, universal

    (tmp_path / "step_5").mkdir()
    (tmp_path / "step_5" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
    assert checkpoint.is_sharded(tmp_path, "step_5")
    with pytest.raises(RuntimeError, match=r"converting .*step_5 with deepspeed.checkpoint.ds_to_universal failed "
                                           r"\(exit status 1\)"):
        universal.make_universal(tmp_path, "step_5")
    assert not (tmp_path / "step_5" / "universal").exists()  # nothing half-written is left to be loaded


def test_a_second_resume_loads_the_conversion_it_finds_and_an_empty_one_is_an_error(tmp_path, monkeypatch):
    """A checkpoint converted for another layout once is loaded as it is by a second resume from it (after a crash
    before the next save, say): converting again would fail renaming onto the existing universal/ folder. A
    conversion killed before its rename left .step_2_universal.tmp behind: the first one here starts it afresh,
    so no stale tensor of it is renamed into universal/. A converter that exits 0 but writes no zero/ folder is
    an error, not a conversion."""
    import subprocess

    from relora_ds import universal

    calls = []

    def convert(src, out):
        calls.append(out)
        (out / "zero" / "w").mkdir(parents=True)
        (out / "zero" / "w" / "fp32.pt").write_bytes(b"w")
    monkeypatch.setattr(universal, "is_sharded", lambda ckpt_dir, tag: True)
    monkeypatch.setattr(universal, "_ds_to_universal", convert)
    monkeypatch.setattr(universal, "_add_frozen_tensors", lambda ckpt_dir, tag, zero: None)
    (tmp_path / "step_2").mkdir()
    (tmp_path / ".step_2_universal.tmp" / "zero" / "stale").mkdir(parents=True)
    (tmp_path / ".step_2_universal.tmp" / "zero" / "stale" / "fp32.pt").write_bytes(b"old")
    assert universal.make_universal(tmp_path, "step_2") == universal.make_universal(tmp_path, "step_2") == \
        "step_2/universal"
    assert len(calls) == 1 and (tmp_path / "step_2" / "universal" / "zero" / "w" / "fp32.pt").read_bytes() == b"w"
    assert sorted(p.name for p in (tmp_path / "step_2" / "universal" / "zero").iterdir()) == ["w"]
    assert not (tmp_path / ".step_2_universal.tmp").exists()

    monkeypatch.undo()
    monkeypatch.setattr(universal, "run_module_shielded", lambda *a: subprocess.CompletedProcess(a, 0, "", ""))
    with pytest.raises(RuntimeError, match=r"ds_to_universal failed \(exit status 0\)"):
        universal._ds_to_universal(tmp_path / "step_2", tmp_path / "out")


def test_a_checkpoint_without_zero_whose_adam_steps_differ_in_a_group_is_refused(tmp_path):
    """A ZeRO optimizer holds one step count per param group: an fp32 checkpoint without ZeRO (torch's Adam, a
    count per parameter) whose counts differ within a group is refused, not loaded with one of them (set.pop:
    any) and every other parameter's bias correction wrong."""
    import torch

    from relora_ds import universal

    def state(step):
        return {"step": torch.tensor(float(step)), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}
    (tmp_path / "src").mkdir()
    torch.save({"module": {"a": torch.zeros(3), "b": torch.zeros(3)},
                "optimizer": {"state": {0: state(3), 1: state(5)}, "param_groups": [{"params": [0, 1], "lr": 1e-3}]}},
               tmp_path / "src" / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match=r"the Adam step counts within one param group differ \(\[3.0, 5.0\]\)"):
        universal._unsharded_to_universal(tmp_path / "src", tmp_path / "out", [["a", "b"]])


def test_param_groups_at_different_adam_steps_convert_and_only_a_zero3_load_is_refused(tmp_path):
    """A checkpoint without ZeRO whose param groups stepped different numbers of times (a group without
    gradients at some steps) stopped the conversion with a bare assert, also for a ZeRO-1/2 resume, whose
    loader reads each group's step from its parameters' step.pt. It converts (each parameter's step.pt holds
    its group's count); a ZeRO-3 load, which gives every group the first group's count, is refused by name."""
    import torch

    from relora_ds import universal

    def state(step):
        return {"step": torch.tensor(float(step)), "exp_avg": torch.ones(3), "exp_avg_sq": torch.ones(3)}
    for name, steps in (("differ", (7, 5)), ("same", (7, 7))):
        src = tmp_path / name / "src"
        src.mkdir(parents=True)
        torch.save({"module": {"a": torch.zeros(3), "b": torch.zeros(3)},
                    "optimizer": {"state": {0: state(steps[0]), 1: state(steps[1])},
                                  "param_groups": [{"params": [0], "lr": 1e-3}, {"params": [1], "lr": 1e-3}]}},
                   src / "mp_rank_00_model_states.pt")
        universal._unsharded_to_universal(src, tmp_path / name / "out", [["a"], ["b"]])
        zero = tmp_path / name / "out" / "zero"
        assert [float(torch.load(zero / p / "step.pt", weights_only=False)) for p in "ab"] == list(steps)
    universal.check_zero3_load(tmp_path / "same" / "out")
    with pytest.raises(ValueError, match=r"different Adam step counts \(\[7.0, 5.0\]\).*ZeRO stage 1 or 2"):
        universal.check_zero3_load(tmp_path / "differ" / "out")


def test_a_killed_conversions_folder_goes_with_its_checkpoint(tmp_path, monkeypatch):
    """A conversion cut short leaves its temporary folder beside the checkpoints, started afresh only when the
    same step converts again: once keep_last prunes that step it stayed for ever (a whole model's masters and
    moments). The prune now takes it with the step; one of a step still there stays (a resume converts it)."""
    from relora_ds import checkpoint, universal

    def killed(src, out):
        (out / "zero").mkdir(parents=True)
        raise RuntimeError("converter killed")
    monkeypatch.setattr(universal, "is_sharded", lambda ckpt_dir, tag: True)
    monkeypatch.setattr(universal, "_ds_to_universal", killed)
    for s in (2, 4, 6):
        (tmp_path / f"step_{s}").mkdir()
        (tmp_path / f"step_{s}" / "config.json").write_text("{}")
    for tag in ("step_2", "step_6"):
        with pytest.raises(RuntimeError, match="converter killed"):
            universal.make_universal(tmp_path, tag)
    left = {p.name for p in tmp_path.iterdir()} - {"step_2", "step_4", "step_6"}
    assert len(left) == 2
    checkpoint._prune_old(tmp_path, keep_last=1, keep="step_6")
    assert {p.name for p in tmp_path.iterdir()} == {"step_6", f".step_6_{universal.UNIVERSAL}.tmp"}
    assert f".step_6_{universal.UNIVERSAL}.tmp" in left


def test_the_converter_outlives_the_stop_signals_a_run_stops_cleanly_on(tmp_path, monkeypatch):
    """SLURM's `scancel --signal` reaches every process of the job step, a terminal's Ctrl-C the foreground
    group: the checkpoint converter (minutes at scale) ran in the trainer's group and died of USR1, failing
    the resume with no "preempted" record to requeue on. It now ignores TERM, USR1 and INT, as do the workers
    it forks, and finishes while the trainer notes the signal. Oracle: the signals are delivered to the child
    and to its forked worker, whose default action would kill them, and both complete; a SIGKILL is named.
    The worker pool is ds_to_universal's (a ProcessPoolExecutor): a `with multiprocessing.Pool` ends in
    terminate(), which can hang for ever on workers that ignore SIGTERM (it hung once in CI, and within 300 pools in a loop)."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    from relora_ds import universal

    (tmp_path / "slow_module.py").write_text(
        "import multiprocessing as mp, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "def work(d):\n"
        "    open(os.path.join(d, 'worker.pid'), 'w').write(str(os.getpid()))\n"
        "    while not os.path.exists(os.path.join(d, 'go')):\n"
        "        time.sleep(0.05)\n"
        "    return 7\n"
        "if __name__ == '__main__':\n"
        "    d = sys.argv[1]\n"
        "    open(os.path.join(d, 'child.pid'), 'w').write(str(os.getpid()))\n"
        "    with ProcessPoolExecutor(1, mp_context=mp.get_context('fork')) as pool:\n"
        "        print(pool.submit(work, d).result(), sys.argv[1:])\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = {}
    thread = threading.Thread(target=lambda: result.update(proc=universal.run_module_shielded(
        "slow_module", str(tmp_path), "x")))
    thread.start()
    pids = [tmp_path / "child.pid", tmp_path / "worker.pid"]
    deadline = time.time() + 300  # a loaded CI machine: start-ups take seconds to tens of seconds
    while not all(p.exists() and p.read_text() for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    if not all(p.exists() for p in pids):
        (tmp_path / "go").touch()  # let whatever started finish
        thread.join(60)
        pytest.fail("the converter or its worker did not start within 300 s")
    child = int(pids[0].read_text())
    for pid in (int(p.read_text()) for p in pids):
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            os.kill(pid, sig)
    time.sleep(0.3)
    (tmp_path / "go").touch()
    thread.join(60)
    if thread.is_alive():
        os.killpg(child, signal.SIGKILL)  # the converter's group: its worker too
        pytest.fail("the shielded converter did not finish within 60 s of its go-ahead")
    assert result["proc"].returncode == 0, result["proc"].stderr
    assert result["proc"].stdout.strip() == f"7 [{str(tmp_path)!r}, 'x']"

    # The trainer killed outright (the OOM killer) while its converter works: the converter, in a process group
    # of its own, kills that group, its worker included (which would otherwise block for ever on its queue).
    run = tmp_path / "second"
    run.mkdir()
    for p in pids:
        p.unlink()
    trainer = subprocess.Popen([sys.executable, "-c", "import sys; from relora_ds import universal; "
                                f"universal.run_module_shielded('slow_module', {str(run)!r})"], env=os.environ)
    pids = [run / "child.pid", run / "worker.pid"]
    deadline = time.time() + 300  # a loaded CI machine: start-ups take seconds to tens of seconds
    while not all(p.exists() and p.read_text() for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    trainer.kill()
    trainer.wait()
    assert all(p.exists() for p in pids), "the converter or its worker did not start within 300 s"

    def alive(pid):  # a zombie (killed, not yet reaped by whoever inherited it) is dead
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    deadline = time.time() + 60
    while any(alive(int(p.read_text())) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(int(p.read_text())) for p in pids)

    monkeypatch.setattr(universal, "run_module_shielded",
                        lambda *a: subprocess.CompletedProcess(a, -signal.SIGKILL, "", "partial output"))
    with pytest.raises(RuntimeError, match=r"ds_to_universal failed \(killed by SIGKILL\):\npartial output"):
        universal._ds_to_universal(tmp_path / "step_5", tmp_path / "out")


def test_a_checkpoint_without_zero_is_written_parameter_by_parameter_in_the_universal_layout(tmp_path):
    """_unsharded_to_universal against the input it reads: each trainable parameter's fp32 weight and Adam
    moments under zero/<name>/ by its place in its param group, zero moments for one that never had a
    gradient, its group's Adam step; the param groups without their params; the module states without the
    optimizer under both loaders' names. Param groups that do not match the model, by count or by shape, are
    refused."""
    import torch
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM

    from relora_ds import universal

    module = {"a": torch.arange(3.0), "b": torch.arange(4.0).view(2, 2) + 10, "c": torch.arange(2.0) + 20,
              "d": torch.arange(3.0) + 30, "base": torch.ones(5)}

    def adam(value, shape):
        return {"step": torch.tensor(7.0), "exp_avg": torch.full(shape, value), "exp_avg_sq": torch.full(shape, value / 10)}
    optimizer = {"state": {0: adam(0.1, (3,)), 1: adam(0.2, (2, 2)), 2: adam(0.3, (2,))},  # d (3): no gradient yet
                 "param_groups": [{"params": [0, 1], "lr": 1e-3, "weight_decay": 0.1},
                                  {"params": [2, 3], "lr": 1e-3, "weight_decay": 0.0}]}
    (tmp_path / "src").mkdir()
    torch.save({"module": module, "optimizer": optimizer, "ds_version": "0.x"},
               tmp_path / "src" / "mp_rank_00_model_states.pt")
    out = tmp_path / "out"
    universal._unsharded_to_universal(tmp_path / "src", out, [["a", "b"], ["c", "d"]])
    zero = out / "zero"

    def load(name, key):
        return torch.load(zero / name / f"{key}.pt", weights_only=False)
    assert sorted(p.name for p in zero.iterdir()) == ["a", "b", "c", "d", "optimizer_state.pt"]
    for name, value in (("a", 0.1), ("b", 0.2), ("c", 0.3), ("d", 0.0)):
        assert torch.equal(load(name, "fp32")[PARAM], module[name])
        assert torch.equal(load(name, "exp_avg")[PARAM], torch.full(module[name].shape, value))
        assert torch.equal(load(name, "exp_avg_sq")[PARAM], torch.full(module[name].shape, value / 10))
        assert float(load(name, "step")) == 7.0
    opt = torch.load(zero / "optimizer_state.pt", weights_only=False)
    groups = [{"lr": 1e-3, "weight_decay": 0.1}, {"lr": 1e-3, "weight_decay": 0.0}]
    assert opt["param_groups"] == groups and opt[OPTIMIZER_STATE_DICT]["param_groups"] == groups
    assert float(opt[OPTIMIZER_STATE_DICT]["state"][0]["step"]) == 7.0
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        states = torch.load(out / name, weights_only=False)
        assert "optimizer" not in states and set(states["module"]) == set(module)
    with pytest.raises(ValueError, match=r"its optimizer's param groups hold \[2, 2\] parameters, this run's model "
                                         r"\[3, 1\]: not a checkpoint of this model and phase"):
        universal._unsharded_to_universal(tmp_path / "src", tmp_path / "out2", [["a", "b", "c"], ["d"]])
    with pytest.raises(ValueError, match=r"the optimizer state at b's place has shape \(3,\), the parameter \(2, 2\)"):
        universal._unsharded_to_universal(tmp_path / "src", tmp_path / "out3", [["b", "a"], ["c", "d"]])


def test_the_frozen_tensors_added_to_a_conversion_leave_what_the_converter_wrote(tmp_path, monkeypatch):
    """_add_frozen_tensors writes the tensors ds_to_universal left out (ZeRO-3's frozen ones) and leaves its
    files as it wrote them (a trainable weight's fp32 master with its merge metadata)."""
    import torch

    from relora_ds import universal

    monkeypatch.setattr(universal, "full_state_dict", lambda ckpt_dir, tag: {"w": torch.zeros(2), "base": torch.ones(2)})
    (tmp_path / "zero" / "w").mkdir(parents=True)
    torch.save({"param": torch.full((2,), 3.0), "cat_dim": 0}, tmp_path / "zero" / "w" / "fp32.pt")
    universal._add_frozen_tensors(tmp_path, "step_2", tmp_path / "zero")
    w = torch.load(tmp_path / "zero" / "w" / "fp32.pt", weights_only=False)
    assert w["cat_dim"] == 0 and torch.equal(w["param"], torch.full((2,), 3.0))
    assert torch.equal(torch.load(tmp_path / "zero" / "base" / "fp32.pt", weights_only=False)["param"], torch.ones(2))


def test_restore_frozen_copies_the_frozen_parameters_and_persistent_buffers_only(tmp_path):
    """restore_frozen_from_universal: a frozen base (saved flat, as the converter does) and a persistent buffer
    come from zero/<name>/fp32.pt; the trainable weights (DeepSpeed's own load) and a non-persistent buffer
    (rotary tables, rebuilt) are not read, nor required. One missing is named."""
    import torch

    from relora_ds import universal

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.base = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)
            self.register_buffer("count", torch.zeros((), dtype=torch.long))
            self.register_buffer("table", torch.zeros(3), persistent=False)
    model = Model()
    before = model.lin.weight.detach().clone()
    for name, value in (("base", torch.arange(4.0)), ("count", torch.tensor(3)), ("lin.weight", torch.full((2, 2), 9.0))):
        (tmp_path / "zero" / name).mkdir(parents=True)
        torch.save({"param": value}, tmp_path / "zero" / name / "fp32.pt")
    assert universal.restore_frozen_from_universal(model, tmp_path) == 2
    assert torch.equal(model.base, torch.arange(4.0).view(2, 2)) and int(model.count) == 3
    assert torch.equal(model.lin.weight, before) and torch.equal(model.table, torch.zeros(3))
    (tmp_path / "zero" / "count" / "fp32.pt").unlink()
    with pytest.raises(RuntimeError, match=r"lacks 1 frozen tensor\(s\), e.g. \['count'\]: convert it again"):
        universal.restore_frozen_from_universal(model, tmp_path)
