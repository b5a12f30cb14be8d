"""What a checkpoint holds, read back without an engine: each rank's RNG state, the bf16 optimizer's fp32
masters, and full_state_dict's tensors (the folder's life, keep_last and latest: tests/test_checkpoint.py)."""
import pytest


def test_a_missing_rng_file_is_named_on_resume(tmp_path):
    from relora_ds import checkpoint

    (tmp_path / "step_5").mkdir()
    with pytest.warns(RuntimeWarning, match=r"rng_rank0.pt is missing: rank 0 resumes without its saved RNG state"):
        assert checkpoint.load_rng(tmp_path, "step_5") is False  # the caller seeds the stream of that step


def test_rng_state_restores_every_generator():
    """rng_state/set_rng_state: python, numpy and torch draw the same numbers after a restore (dropout masks
    and anything else a resumed run draws)."""
    import random

    import numpy as np
    import torch

    from relora_ds.checkpoint import rng_state, set_rng_state

    def draw():
        return random.random(), np.random.rand(), torch.rand(3).tolist()

    state = rng_state()
    first = draw()
    draw()
    set_rng_state(state)
    assert draw() == first


def test_rng_state_keeps_only_this_ranks_cuda_generator(monkeypatch):
    """On CUDA a rank saves and restores its own device's generator only: restoring every visible device's
    (torch.cuda.set_rng_state_all) fails with an IndexError on a node that shows fewer GPUs than the one that
    saved (8 x 1 GPU resumed as 4 x 2), and restores a never-advanced state when ranks map to other local
    devices. A stand-in torch.cuda with per-device generator states (no GPU here); checkpoints saved before
    held every device's list, of which the current device's entry is restored."""
    import torch

    from relora_ds import checkpoint

    states = {0: torch.tensor([10]), 1: torch.tensor([11])}
    current = {"device": 1}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[current["device"]].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda new, device="cuda": states.__setitem__(current["device"], new.clone()))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saves every device's state"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("restores every device's state"))

    saved = checkpoint.rng_state()
    assert saved["cuda_device"].tolist() == [11] and "cuda" not in saved
    states[1] = torch.tensor([99])  # device 1's generator advanced
    current["device"] = 0  # resumed on a node where this rank is on device 0
    checkpoint.set_rng_state(saved)
    assert states[0].tolist() == [11] and states[1].tolist() == [99]
    old = {**saved, "cuda": [torch.tensor([20]), torch.tensor([21])]}
    del old["cuda_device"]
    current["device"] = 1
    checkpoint.set_rng_state(old)  # the old format: the current device's entry
    assert states[1].tolist() == [21] and states[0].tolist() == [11]
    current["device"] = 3  # more devices than the saving node showed: nothing to restore, no IndexError
    checkpoint.set_rng_state(old)


def test_bf16_optimizer_masters_join_pieces_in_rank_number_order(tmp_path):
    """DeepSpeed's bf16 optimizer files of 12 ranks (rank_10 sorts before rank_2 by name): w (6x10) is split
    into 12 consecutive pieces of arange(60), one per rank, each after a 2-value piece of v in the rank's
    partition (so w's pieces start at 2, not 0); the joined masters are arange(60) and arange(24) again."""
    import torch
    from deepspeed.utils.tensor_fragment import fragment_address

    from relora_ds.zero_reset import bf16_optimizer_masters

    w, v = torch.arange(60.0), torch.arange(100.0, 124.0)
    for r in range(12):
        flat = torch.cat([v[2 * r: 2 * r + 2], w[5 * r: 5 * r + 5], torch.full((1,), -1.0)])  # -1: padding
        mapping = {"v": fragment_address(numel=2, start=0), "w": fragment_address(numel=5, start=2)}
        torch.save({"optimizer_state_dict": {"single_partition_of_fp32_groups": [flat],
                                             "param_slice_mappings": [mapping]}},
                   tmp_path / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    out = bf16_optimizer_masters(tmp_path, {"w": (6, 10), "v": (4, 6)})
    assert torch.equal(out["w"], w.view(6, 10)) and torch.equal(out["v"], v.view(4, 6))
    with pytest.raises(ValueError, match="pieces of w hold 60 values, the module states' shape is \\(6, 11\\)"):
        bf16_optimizer_masters(tmp_path, {"w": (6, 11), "v": (4, 6)})


def test_load_rng_restores_the_saved_generators(tmp_path):
    """load_rng puts the state saved in rng_rank0.pt back: the draws after it repeat those after the save."""
    import random

    import torch

    from relora_ds import checkpoint

    (tmp_path / "step_5").mkdir()
    torch.save(checkpoint.rng_state(), tmp_path / "step_5" / "rng_rank0.pt")
    first = (random.random(), torch.rand(3).tolist())
    assert checkpoint.load_rng(tmp_path, "step_5") is True
    assert (random.random(), torch.rand(3).tolist()) == first


def test_the_bf16_optimizers_files_are_sharded_optimizer_state(tmp_path):
    """DeepSpeed's bf16 optimizer writes bf16_zero_pp_rank_<r>_mp_rank_00_optim_states.pt: a sharded optimizer
    state (resumed on other ranks through the universal checkpoint), as ZeRO's zero_pp_rank_* files are; the
    model states alone are not."""
    from relora_ds import checkpoint

    for name, sharded in (("a", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                          ("b", "zero_pp_rank_1_mp_rank_00_optim_states.pt"), ("c", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mp_rank_00_model_states.pt").write_bytes(b"m")
        if sharded:
            (tmp_path / name / sharded).write_bytes(b"o")
        assert checkpoint.is_sharded(tmp_path, name) is bool(sharded)


def test_an_old_rng_state_of_fewer_devices_than_this_ranks_index_is_skipped(monkeypatch):
    """A checkpoint from before 2026-12-01 saved every visible device's CUDA state: resumed on device 2 of a
    node where the saving one showed 2 devices (indices 0 and 1), nothing is restored, no IndexError."""
    import torch

    from relora_ds import checkpoint

    state = {k: v for k, v in checkpoint.rng_state().items() if k != "cuda_device"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new, device="cuda": pytest.fail("restored a state"))
    checkpoint.set_rng_state({**state, "cuda": [torch.tensor([20]), torch.tensor([21])]})


def test_full_state_dict_keeps_zeros_fp32_masters_over_the_16_bit_module_states(tmp_path, monkeypatch):
    """A sharded checkpoint: the trainable weights are zero_to_fp32's fp32 masters, not the module states'
    fp16 copies; what zero_to_fp32 leaves out (a frozen base at ZeRO-1) comes from the module states. A folder
    holding neither DeepSpeed file is named, not read as an empty model."""
    import deepspeed.utils.zero_to_fp32 as z2f
    import torch

    from relora_ds import checkpoint, zero_reset

    src = tmp_path / "step_3"
    src.mkdir()
    master = torch.tensor([1.0001, 2.0002])
    torch.save({"module": {"w": master.half(), "base": torch.ones(2)}}, src / "mp_rank_00_model_states.pt")
    (src / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o")
    monkeypatch.setattr(zero_reset, "bf16_optimizer_masters", lambda folder, shapes: None)
    monkeypatch.setattr(z2f, "get_fp32_state_dict_from_zero_checkpoint", lambda d, tag: {"w": master.clone()})
    state = checkpoint.full_state_dict(tmp_path, "step_3")
    assert state["w"].dtype == torch.float32 and torch.equal(state["w"], master)
    assert torch.equal(state["base"], torch.ones(2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds neither ZeRO optimizer files nor "
                                                r"mp_rank_00_model_states.pt: not a DeepSpeed checkpoint folder"):
        checkpoint.full_state_dict(tmp_path, "empty")


def test_bf16_optimizer_masters_of_a_folder_without_the_bf16_optimizers_files_are_none(tmp_path):
    """None, not {}, where ``src`` holds no bf16 optimizer files or files of another layout: the caller
    (checkpoint.full_state_dict) then reads the module states instead of finding no masters at all."""
    import torch

    from relora_ds.zero_reset import bf16_optimizer_masters

    assert bf16_optimizer_masters(tmp_path, {"w": (2, 3)}) is None
    torch.save({"optimizer_state_dict": {"state": {}}}, tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert bf16_optimizer_masters(tmp_path, {"w": (2, 3)}) is None


def test_full_state_dict_of_the_bf16_optimizer_keeps_its_fp32_masters_over_the_bf16_module_states(tmp_path):
    """DeepSpeed's bf16 optimizer (ZeRO-1, bf16, fp32 gradient accumulation) keeps the fp32 masters in its own
    files: full_state_dict takes them over the bf16 module copies (an export of such a run otherwise writes
    bf16-rounded weights; a mutation audit found only a 2-rank end-to-end test pinning it); a frozen weight
    (no master) is the module state's."""
    import torch
    from deepspeed.utils.tensor_fragment import fragment_address

    from relora_ds import checkpoint

    src = tmp_path / "step_3"
    src.mkdir()
    master = torch.tensor([1.0001, 2.0002, 3.0003])
    torch.save({"module": {"w": master.bfloat16(), "base": torch.ones(2, dtype=torch.bfloat16)}},
               src / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"single_partition_of_fp32_groups": [master.clone()],
                                         "param_slice_mappings": [{"w": fragment_address(numel=3, start=0)}]}},
               src / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    state = checkpoint.full_state_dict(tmp_path, "step_3")
    assert state["w"].dtype == torch.float32 and torch.equal(state["w"], master)
    assert torch.equal(state["base"], torch.ones(2, dtype=torch.bfloat16))

