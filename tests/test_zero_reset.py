"""Merge and prune under ZeRO-1/2/3 (2 CPU ranks, fp32 and bf16) against single-process oracles."""
import json

import pytest

from launch_utils import ROOT, run_ranks

# 2off: CPU offload (fp32, and bf16 as ds_configs/zero2_offload.json ships it); 3off: ZeRO-3 with the optimizer
# and the parameters on the host (ds_configs/zero3_offload.json), every parameter split; 3t0: ZeRO-3 with
# stage3_param_persistence_threshold 0, every parameter split across the ranks (the plain ZeRO-3 cases keep
# this model's tensors whole, all below the default threshold 1e5); 2rnd: ZeRO-2 with the LoRA tensors in the
# second param group, pruned `random`ly first with nothing relinked before; 1ld/2ld: the checks continue on a
# fresh engine that loaded a checkpoint of the stepped one, pruned first thing. ~3 s a case after the launch.
CASES = ["1:fp32", "2:fp32", "3:fp32", "1:bf16", "2:bf16", "3:bf16", "2off:fp32", "2off:bf16", "3t0:fp32",
         "3t0:bf16", "3off:fp32", "3off:bf16", "2rnd:fp32", "1ld:fp32", "2ld:bf16"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero_reset")
    # The first offload case compiles DeepSpeedCPUAdam (~100 s once, cached in TORCH_EXTENSIONS_DIR).
    run_ranks(ROOT / "tests/dist/zero_reset_worker.py", "--out", out, "--cases", ",".join(CASES), timeout=900)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", CASES)
def test_prune_equals_single_process_oracle(results, case):
    for r in results:
        res = r[case]
        assert res["refuses_before_first_step"], "prune before the first step must be a clear error"
        assert res["prune_exact"], "pruned moments differ from the sort-based single-process oracle"
        assert res["momentum_without_second_moment"] == 0, "an entry kept exp_avg while exp_avg_sq was zeroed"
        assert res["joint_prune_exact"], "joint pruning (one mask from exp_avg) differs from the oracle"
        assert res["others_untouched"]
        assert res["odd_numel"] >= 1  # a LoRA tensor whose numel is not divisible by the world size
        if not case.startswith("3"):
            assert res["straddles"] >= 1  # a LoRA tensor split across the two ranks' flat partitions
        # The engine's optimizer really offloaded what the case asked for (its own flags, not the JSON).
        assert res["offloaded"] == {"2off": "optimizer", "3off": "optimizer+parameters"}.get(case.split(":")[0], "none")
        if case.startswith(("3t0", "3off")):
            assert res["split_params"] >= 1  # parameters really partitioned, not kept whole on each rank
        # The fractions zeroed: exp_avg_sq's own 90%; exp_avg's 90% united with exp_avg_sq's mask.
        assert res["stats"] == pytest.approx(res["expected_stats"], abs=1e-12)
        assert res["stats"]["exp_avg_sq"] == pytest.approx(0.9, abs=1e-3)
        assert res["stats"]["exp_avg"] > res["stats"]["exp_avg_sq"]  # the masks differ: the union is tested


def test_random_prune_of_a_second_param_group_equals_the_single_process_oracle(results):
    """`random` pruning under ZeRO-2 draws each tensor's masks from its own documented seed (run seed +
    1000003·index, one mask for both moments) exactly as one process does, and relinks DeepSpeed's optimizer-state fragments
    itself: the LoRA tensors sit in the second param group, whose fragments DeepSpeed 0.19 leaves empty, and
    nothing relinked them before (oracles in tests/dist/zero_reset_worker.py: random_prune_without_relink).
    Without that relink the prune fails on a rank holding an unlinked fragment while the other waits in a
    collective: the worker run then fails as a whole (the launcher output names the error)."""
    for r in results:
        res = r["2rnd:fp32"]
        assert res["lora_unlinked_before_prune"], "the case must start with the LoRA group unlinked"
        assert res["random_prune_error"] is None, res["random_prune_error"]
        assert res["random_prune_exact"], "random masks differ from the hand-written per-tensor seed derivation"
        assert res["random_prune_single_process"], "ZeRO random pruning differs from the single-process path"
        assert res["random_kept_nonzero"] > 0.99  # the moments were live: a wrong mask cannot hide among zeros
        assert res["random_pruned_fraction"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("case", ["1ld:fp32", "2ld:bf16"])
def test_prune_right_after_a_checkpoint_load_equals_the_oracle(results, case):
    """A reset right after a resume (the trainer's catch-up merge of an old final checkpoint; the Python API's
    load then reset): ZeRO-1/2 load the Adam moments but link no per-tensor fragments until the next step, and
    the prune refused such an engine ("no state fragments yet") until a review found it. Now it prunes the
    loaded moments exactly as the sort-based single-process oracle prunes the moments the saved engine held."""
    for r in results:
        res = r[case]
        assert res["ready_after_load"] and res["loaded_prune_error"] is None, res["loaded_prune_error"]
        assert res["loaded_prune_exact"], "pruned loaded moments differ from the oracle on the saved ones"
        assert res["loaded_prune_stats_exact"]
        assert res["saved_moments_live"] > 0.99  # live moments: a wrong mask cannot hide among zeros


def test_prune_refuses_an_optimizer_without_adam_moments_on_every_rank(results):
    """ZeRO-2 with an SGD client optimizer: both ranks get the same clear error before any collective (a
    review found the ranks holding a piece of a tensor raising inside the gather while the others waited)."""
    for r in results:
        assert r["non_adam"]["non_adam_error"] is not None
        assert "optimizer (SGD) keeps no Adam moments (exp_avg, exp_avg_sq)" in r["non_adam"]["non_adam_error"]


@pytest.mark.parametrize("case", CASES)
def test_merge_writes_masters_keeps_outputs_and_ranks_agree(results, case):
    for r in results:
        res = r[case]
        assert res["merge_exact"], "merged W != W0 + scale * B_master @ A_master (fp32, rounded once)"
        assert res["masters_A_new_init"] and res["masters_B_zero"]
        assert res["no_resurrection"], "the next step restored pre-merge LoRA values (DeepSpeed #2424)"
        # Outputs unchanged up to W's dtype rounding (bf16 has 8 mantissa bits).
        assert res["merge_max_logit_diff"] < (1e-5 if case.endswith("fp32") else 0.05)
    assert results[0][case]["base_hash"] == results[1][case]["base_hash"], "base weights diverged across ranks"


@pytest.mark.parametrize("case", ["3t0:fp32", "2:bf16"])
def test_export_of_an_engine_writes_the_masters_merged(results, case):
    """relora_ds.export_hf(engine) on every rank: the file rank 0 writes holds each ReLoRA layer's gathered base
    + scale * B @ A of the fp32 masters and every other parameter's fp32 master, exactly (oracle: DeepSpeed's
    safe_get_full_fp32_param). A review found export_hf(engine) refused and export_hf(engine.module) under
    ZeRO-3 writing a model of empty tensors without a word: the module is now refused there. Its merge record
    (relora_ds_progress.json) names the engine's base dtype (a review found the fp32 copy's recorded)."""
    for r in results:
        res = r[case]
        assert res["export_exact"] and res["export_delta_nonzero"]
        assert res["module_export_refused"]  # ZeRO-3's module refused; at ZeRO-2 written (nothing to refuse)
        assert res["export_record"]["base_dtype"] == ("bfloat16" if case.endswith("bf16") else "float32"), res


def test_optimizer_steps_after_a_universal_load_are_separate_tensors():
    """After a universal load torch's Adam must get its own singleton-tensor ``step`` per state: DeepSpeed's
    ZeRO-3 load shares one tensor between sub-groups (each group then counts every step twice), and a
    checkpoint of an offloaded optimizer (DeepSpeedCPUAdam) holds ints, which torch's Adam refuses. The
    oracle: torch's own Adam steps from the fixed state as from a freshly loaded state dict."""
    from types import SimpleNamespace

    import torch

    from relora_ds.zero_reset import unshare_optimizer_steps

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b]}], lr=0.1)
    shared = torch.tensor(5.0)
    opt.state[a] = {"step": shared, "exp_avg": torch.full((3,), 0.1), "exp_avg_sq": torch.full((3,), 0.01)}
    opt.state[b] = {"step": shared, "exp_avg": torch.full((2,), 0.1), "exp_avg_sq": torch.full((2,), 0.01)}
    engine = SimpleNamespace(optimizer=SimpleNamespace(optimizer=opt))
    assert unshare_optimizer_steps(engine) == 1
    assert opt.state[a]["step"] is not opt.state[b]["step"] and float(opt.state[b]["step"]) == 5.0
    opt.state[a]["step"] += 1  # each counts its own steps now (a mutation not cloning went unseen here)
    assert float(opt.state[b]["step"]) == 5.0
    opt.state[a]["step"] -= 1
    opt.state[b]["step"] = 5  # as DeepSpeedCPUAdam saves it
    unshare_optimizer_steps(engine)
    assert torch.is_tensor(opt.state[b]["step"]) and opt.state[b]["step"].dtype == torch.float32
    ref = torch.optim.AdamW([{"params": [a2 := torch.nn.Parameter(torch.ones(3))]},
                             {"params": [b2 := torch.nn.Parameter(torch.ones(2))]}], lr=0.1)
    ref.load_state_dict({"state": {0: {"step": 5, "exp_avg": torch.full((3,), 0.1), "exp_avg_sq": torch.full((3,), 0.01)},
                                   1: {"step": 5, "exp_avg": torch.full((2,), 0.1), "exp_avg_sq": torch.full((2,), 0.01)}},
                         "param_groups": ref.state_dict()["param_groups"]})
    for p in (a, b, a2, b2):
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    ref.step()
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert opt.state[a]["step"].item() == opt.state[b]["step"].item() == 6
