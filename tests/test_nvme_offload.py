"""ZeRO-3 with the optimizer and the parameters swapped to NVMe files (ZeRO-Infinity), 2 CPU ranks, bf16,
through a ReLoRA reset and a checkpoint's load, against the same run with both in host memory
(tests/dist/nvme_worker.py).

Needs DeepSpeed's async_io op, i.e. libaio: scripts/test.sh installs libaio-dev. The first run compiles
the op (~3 min on 2 cores, cached in TORCH_EXTENSIONS_DIR).

The `nvme` mode runs with relora_ds.patch_deepspeed_nvme (relora_ds/ds_patches.py). Without it, DeepSpeed
0.19.8 reads the lm_head's gradient, at an offset that is no multiple of the I/O alignment, into a buffer
O_DIRECT leaves unwritten: the second loss was > 0.5 above host offload's (a mode of the worker showed it
until 2026-12-02, dropped for CI time; test_gradient_pieces_start_aligned_and_cover_each_gradient checks
the fix's split)."""
import json
import re

import pytest

from launch_utils import ROOT, run_ranks


def test_gradient_pieces_start_aligned_and_cover_each_gradient():
    """The fix's split, against a hand-made case: every piece DeepSpeed may swap (>= its 1 MiB threshold)
    starts at a multiple of the alignment and has an aligned length; the pieces tile each gradient in
    order, as views of it; small gradients pass whole."""
    import torch

    from relora_ds.ds_patches import _aligned_gradient_pieces

    class Swapper:  # DeepSpeed's OptimizerSwapper fields the split reads: fp32, 1 KiB alignment, 1 MiB minimum
        numel_alignment = 256

        def is_swappable_tensor(self, tensor):
            return tensor.numel() * 4 >= 2 ** 20

    grads = [torch.arange(300_000.0), torch.arange(100.0), torch.arange(524_411.0)]
    offsets = [2751, 302_751, 302_851]
    pieces, starts = _aligned_gradient_pieces(Swapper(), grads, offsets)
    # 2751 = 10 x 256 + 191: head 65 to 2816, body 1171 x 256, tail 159; 100 whole;
    # 302_851 = 1183 x 256 + 3: head 253 to 303_104, body 2047 x 256, tail 126
    assert [(s, p.numel()) for s, p in zip(starts, pieces)] == [
        (2751, 65), (2816, 299_776), (302_592, 159), (302_751, 100), (302_851, 253), (303_104, 524_032),
        (827_136, 126)]
    for s, p in zip(starts, pieces):
        if Swapper().is_swappable_tensor(p):
            assert s % 256 == 0 and p.numel() % 256 == 0
    for g, off in zip(grads, offsets):
        mine = [(s, p) for s, p in zip(starts, pieces) if off <= s < off + g.numel()]
        assert torch.equal(torch.cat([p for _, p in mine]), g)
        assert all(p.untyped_storage().data_ptr() == g.untyped_storage().data_ptr() for _, p in mine)


def test_the_fixes_refuse_a_deepspeed_without_the_methods_they_replace(monkeypatch):
    """Where another DeepSpeed version renamed a method a fix replaces, assigning the fix would succeed, nothing
    would call it, and the bug would come back silently (a review's find): refused, naming the method, before
    any fix is installed."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.swap_tensor.optimizer_utils import OptimizerSwapper

    from relora_ds.ds_patches import patch_deepspeed_nvme

    loader = DeepSpeedEngine.load_module_state_dict
    monkeypatch.delattr(OptimizerSwapper, "_adjust_for_misaligned_lengths")
    with pytest.raises(RuntimeError, match=r"DeepSpeed \S+ has no OptimizerSwapper._adjust_for_misaligned_lengths: "
                                           r"relora_ds's NVMe-offload fixes"):
        patch_deepspeed_nvme()
    assert DeepSpeedEngine.load_module_state_dict is loader and not hasattr(OptimizerSwapper,
                                                                            "_adjust_for_misaligned_lengths")


def test_releasing_a_zero3_engine_warns_where_deepspeeds_cache_is_not_found(monkeypatch):
    from types import SimpleNamespace

    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    from relora_ds.ds_patches import release_engine

    monkeypatch.setattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release",
                        lambda self, *a: None)  # a version without the lru_cache 0.19.8 keeps the model in
    engine = SimpleNamespace(destroy=lambda: None, module=object(), zero_optimization_stage=lambda: 3)
    with pytest.warns(RuntimeWarning, match="found no cache of PartitionedParameterCoordinator.__params_to_release"):
        release_engine(engine)
    # A ZeRO-1/2 engine is freed without that cache (only ZeRO-3's coordinator holds one): nothing to say (a
    # mutation trial's survivor warned at every stage)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        release_engine(SimpleNamespace(destroy=lambda: None, module=object(), zero_optimization_stage=lambda: 2))


def test_a_checkpoint_from_deepspeeds_own_nvme_save_is_named_not_loaded():
    """DeepSpeed's own save of an optimizer on NVMe leaves its swapped sub-groups out of the ZeRO files
    (empty placeholders; the data went to offloaded_tensors/ under ds_ids that a new process renumbers): a
    load with relora_ds's fix says so before it changes anything, instead of a size error half-way."""
    from types import SimpleNamespace

    import torch
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS

    from relora_ds.ds_patches import _load_swapping_in

    engine_optimizer = SimpleNamespace(swap_optimizer=True, fp16_partitioned_groups_flat_numel=[10, 4])
    with pytest.raises(ValueError, match=r"holds fp32 partitions of \[0, 4\] elements, this engine's optimizer "
                                         r"sub-groups have \[10, 4\]: written by DeepSpeed's own save"):
        _load_swapping_in(None)(engine_optimizer, {FP32_FLAT_GROUPS: [torch.zeros(0), torch.zeros(4)]})
    assert not hasattr(engine_optimizer, "loss_scaler")  # nothing restored before the refusal
    # A checkpoint whose ranks held other sub-groups of parameters, even of the same sizes, is not loaded into
    # this engine's.
    placed = SimpleNamespace(swap_optimizer=True, _zero3_partition_group_metadata=lambda: [[0, 1], [2]])
    with pytest.raises(RuntimeError, match=r"parameter placement differs from this engine's"):
        _load_swapping_in(None)(placed, {"ds_zero_partition_groups": [[1, 0], [2]]})
    assert not hasattr(placed, "loss_scaler")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("AsyncIOBuilder")
    assert builder is not None and builder.is_compatible(verbose=False), \
        "DeepSpeed's async_io op cannot be built here: install libaio-dev (scripts/test.sh does)"
    out = tmp_path_factory.mktemp("nvme")
    run_ranks(ROOT / "tests/dist/nvme_worker.py", "--out", out, timeout=1200)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_nvme_offload_trains_and_resets_exactly_as_host_offload(results):
    """Oracle: the same run with the optimizer and the parameters in host memory (DeepSpeedCPUAdam on the same
    fp32 partitions): every loss, the fp32 masters, the pruned LoRA moments and the merged base weights equal
    bit for bit, before and after the reset."""
    for r in results:
        cpu, nvme = r["cpu"], r["nvme"]
        assert cpu["offloaded"] == nvme["offloaded"] == "optimizer+parameters"
        assert nvme["losses"] == cpu["losses"]
        assert nvme["losses"][-1] < nvme["losses"][0] - 1  # it trained
        for key in ("masters", "moments", "base", "pruned"):
            assert nvme[key] == cpu[key], key
        assert nvme["pruned"]["exp_avg_sq"] == pytest.approx(0.9, abs=1e-3)
        # Not vacuous: optimizer subgroups and parameter partitions really lived in files on disk.
        assert nvme["swapped_subgroups"] >= 2
        assert nvme["swap_bytes"]["optimizer"] > 8 * 2 ** 20 and nvme["swap_bytes"]["bfloat16params"] > 4 * 2 ** 20
    assert results[0]["nvme"]["base"] == results[1]["nvme"]["base"], "merged base weights differ across ranks"


def test_the_optimizer_on_nvme_resumes_from_a_checkpoint_as_host_offload_does(results):
    """A new engine (its parameters with other ds_ids, the names of the optimizer's swap files) loading the
    `nvme` run's checkpoint has every parameter as saved and takes the next 2 steps exactly as host offload's
    resumed engine does. DeepSpeed alone copied the swap files back under the old ids and skipped the ZeRO
    files: every trainable parameter differed after the load, the next loss was 2.57 where the run had 0.094
    (relora_ds/ds_patches.py item 6)."""
    for r in results:
        nvme, cpu = r["nvme"], r["cpu"]
        assert nvme["swapped_subgroups"] >= 2  # sub-groups that lived in files were saved and loaded
        assert nvme["changed_by_load"] == []
        assert nvme["resumed"] == cpu["resumed"] and nvme["resumed"][0] == nvme["continued"][0]
        assert nvme["master_rel_err"] < 1e-5
        # Through DeepSpeed's universal checkpoint (another number of ranks): the masters and moments as saved.
        assert nvme["universal_restores_optimizer"]


def test_parameters_on_nvme_train_reset_and_resume_from_a_checkpoint(results):
    """The layout the trainer accepts (ds_configs/zero3_nvme.json): parameters on NVMe, optimizer in host
    memory. Training and the reset equal host offload bit for bit, and a new engine loading the checkpoint
    has every parameter as saved and continues the run exactly as host offload's does (its first update to
    fp32's last bits: after a load DeepSpeedCPUAdam computes beta^t with pow where the running one multiplied).
    DeepSpeed alone saved and loaded the frozen partitions through their in-memory placeholders, not the swap
    files: the resumed engine had exactly the swapped MLP base weights wrong (first loss 0.165 where the run
    had 0.091); relora_ds/ds_patches.py reads and writes those through the swapper."""
    for r in results:
        params, cpu = r["params"], r["cpu"]
        assert params["losses"] == cpu["losses"]
        for key in ("masters", "moments", "base", "pruned"):
            assert params[key] == cpu[key], key
        assert params["swapped_subgroups"] == 0 and "optimizer" not in params["swap_bytes"]
        assert params["swap_bytes"]["bfloat16params"] > 4 * 2 ** 20
        assert len(params["swapped_frozen"]) == 6  # gate/up/down of both layers: the merged base weights
        for run in (cpu, params):
            assert run["changed_by_load"] == []
            assert run["resumed"][0] == run["continued"][0]
            # The update after the load, in the fp32 masters: measured <= 1.9e-6 relative per tensor (the lora_B,
            # 3 updates from 0); with the moments zeroed after the load, 0.30. (Not the bf16 loss after it: the
            # CPU's bf16 matmuls amplify those last bits, 3.8e-4 at loss 0.017 on an AVX512/AMX CPU.)
            assert run["master_rel_err"] < 1e-5
        assert params["resumed"] == cpu["resumed"]


def test_nvme_prefetch_queues_each_parameter_once(results):
    """DeepSpeed 0.19.8's NVMe parameter prefetch walks a trace that lists each parameter for the forward and
    again for the backward, and queued both entries of the last layer's parameters: the second step stopped
    with 'param N already assigned swap buffer id M'. Measured in the `nvme` run: the calls where DeepSpeed's
    own loop would have queued a parameter twice (the fixed one queues it once, and the run trains on)."""
    for r in results:
        prefetch = r["nvme"]["prefetch"]
        assert prefetch["calls"] > 0 and prefetch["duplicates"] > 0
        assert len(r["nvme"]["losses"]) == 5


def test_nvme_swap_buffers_last_a_relora_step(tmp_path):
    """The parameters on NVMe with ds_configs/zero3_nvme.json's 5 swap buffers, a ReLoRA model as wide as 130m
    (7 swapped weights a layer), 1 rank (tests/dist/nvme_layers_worker.py, one process per mode). Oracle:
    DeepSpeed's own buffer accounting, which asserts when a swap-in finds too few free buffers.
    - As the trainer completes the config (stage3_max_reuse_distance 0): 3 steps train.
    - With DeepSpeed's default reuse distance put back, the frozen weights stay swapped in for their reuse in
      backward, and the second step's forward runs out of buffers: the setting is what makes it train.
    - --compile's leaf layers swap a whole layer in at once: 5 buffers fail on exactly the 7 weights
      check_nvme_swap_buffers counts (it refuses that config, naming 7), and 7 buffers train, with the eager
      run's losses (bf16), also with full activation checkpointing (each layer gathered again in backward).
    - A persistence threshold of 1e6 elements makes 10 swapped weights persistent (q/k/v/o, the embedding and
      the head): the check refuses it, counting those 10, and DeepSpeed fails asking for 8 of them at once.
    The embedding and the head swap too (vocabulary 1024)."""
    out = {}
    for args in (["eager"], ["eager_retain"], ["compiled", "5"], ["compiled", "7"], ["compiled_checkpointed", "7"],
                 ["persistent"]):
        proc = run_ranks(ROOT / "tests/dist/nvme_layers_worker.py", tmp_path, *args, nprocs=1, timeout=300)
        (line,) = [line for line in proc.stdout.splitlines() if line.startswith("swap ")]
        out[" ".join(args)] = line
    assert out["eager"].startswith("swap ok") and out["eager"].endswith("refused: None"), out
    assert out["eager_retain"].startswith("swap failed: Not enough buffers 0 for swapping 1"), out
    assert out["compiled 5"].startswith("swap failed: Not enough buffers 5 for swapping 7"), out
    assert "7 of them swap in together" in out["compiled 5"] and "buffer_count to at least 7" in out["compiled 5"]
    assert out["compiled 7"].startswith("swap ok") and out["compiled 7"].endswith("refused: None"), out
    eager, *compiled = (json.loads(out[k].split("swap ok ")[1].split(" |")[0])
                        for k in ("eager", "compiled 7", "compiled_checkpointed 7"))
    assert eager[-1] < eager[0] - 1 and compiled == [pytest.approx(eager, rel=1e-2)] * 2, (eager, compiled)
    counted = re.search(r"keeps (\d+) parameters gathered for good", out["persistent"])
    failed = re.match(r"swap failed: Not enough buffers (\d+) for swapping (\d+)", out["persistent"])
    assert counted and failed, out["persistent"]
    assert int(failed.group(1)) < int(failed.group(2)) <= int(counted.group(1)) == 10, out["persistent"]


def test_patching_twice_installs_each_fix_once_and_a_release_drops_only_its_engines_model(monkeypatch):
    """patch_deepspeed_nvme is idempotent (the trainer calls it for each engine it builds: a second call must
    not wrap a fix around the fix), and release_engine destroys the engine and takes its model, and no other,
    off DeepSpeed's FWD_MODULE_STACK (item 4). A mutation trial's survivors: wrapping on every call, and a
    release that left the stack alone, passed every test."""
    from types import SimpleNamespace

    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.swap_tensor.optimizer_utils import OptimizerSwapper
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    from relora_ds.ds_patches import patch_deepspeed_nvme, release_engine

    wrapped = [(DeepSpeedEngine, "_get_param_fragment_func"), (DeepSpeedEngine, "load_module_state_dict"),
               (DeepSpeedZeroOptimizer_Stage3, "_rigid_state_dict"),
               (DeepSpeedZeroOptimizer_Stage3, "_rigid_load_state_dict"),
               (DeepSpeedZeroOptimizer_Stage3, "load_hp_checkpoint_state_from_checkpoint_dir_stage3")]
    replaced = [(OptimizerSwapper, "_adjust_for_misaligned_lengths"), (DeepSpeedEngine, "zero_nvme_offload_optimizer"),
                (PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__prefetch_nvme_param_partitions")]
    for cls, name in wrapped + replaced:
        monkeypatch.setattr(cls, name, cls.__dict__[name])  # put back after the test
    assert patch_deepspeed_nvme() and patch_deepspeed_nvme()
    for cls, name in wrapped:
        fix = getattr(cls, name)
        inner = [c.cell_contents for c in fix.__closure__ if callable(c.cell_contents)]
        assert fix._relora_nvme and len(inner) == 1 and not getattr(inner[0], "_relora_nvme", False), name

    kept, released, destroyed = object(), object(), []
    monkeypatch.setattr(parameter_offload, "FWD_MODULE_STACK", [kept, released, kept])
    release_engine(SimpleNamespace(destroy=lambda: destroyed.append(True), module=released,
                                   zero_optimization_stage=lambda: 3))
    assert destroyed == [True] and parameter_offload.FWD_MODULE_STACK == [kept, kept]
