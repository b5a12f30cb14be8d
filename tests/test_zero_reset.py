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
        # Each tensor's two fp32 moments gathered whole once (4 bytes an entry), on every rank alike.
        assert res["prune_comm_bytes"] == res["expected_prune_comm_bytes"] > 0


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
        assert res["module_copies_new_init"], "the module's A/B (what the next step computes with) kept old values"
        assert res["no_resurrection"], "the next step restored pre-merge LoRA values (DeepSpeed #2424)"
        # Outputs unchanged up to W's dtype rounding (bf16 has 8 mantissa bits).
        assert res["merge_max_logit_diff"] < (1e-5 if case.endswith("fp32") else 0.05)
        # The bytes its gathers moved: A's and B's fp32 masters, and under ZeRO-3 the base in its dtype.
        assert res["merge_comm_bytes"] == res["expected_merge_comm_bytes"] > 0
    # The merge's record (‖s·B·A‖_F of the fp32 masters; relative to ‖W‖_F): on every rank under ZeRO-1/2, on
    # the rank that merged (rank 0) under ZeRO-3, where the other has no norms to report.
    for rank, r in enumerate(results):
        got = r[case]["merge_update_stats"]
        if case.startswith("3") and rank == 1:
            assert got == {}, got
        else:
            assert got == pytest.approx(r[case]["expected_update_stats"], rel=1e-6)
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


def test_full_state_reads_and_writes_refuse_what_zero_does_not_hold():
    """get_full of a parameter ZeRO keeps no fp32 state of (frozen, or never in the engine) is a ValueError
    naming it, not a None the prune would index later; a ZeRO-3 set-full of a value of another size than the
    parameter's is refused before anything is read or written (DeepSpeed's narrow would zero-fill a short one)."""
    from types import SimpleNamespace

    import torch

    from relora_ds.zero_reset import get_full, set_full

    p = torch.nn.Parameter(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"shape \(2, 3\) has no ZeRO-managed fp32 state \(master\); is it trainable"):
        get_full(p)
    with pytest.raises(ValueError, match=r"has no ZeRO-managed fp32 state \(exp_avg_sq\)"):
        get_full(p, "exp_avg_sq")
    z3 = SimpleNamespace(ds_id=7, ds_numel=6, ds_shape=torch.Size([2, 3]))  # no optimizer: nothing may be touched
    for key in (None, "exp_avg"):
        with pytest.raises(ValueError, match=r"ZeRO-3 set-full: 5 values for a parameter of 6 \(shape \(2, 3\)\)"):
            set_full(z3, torch.zeros(5), key)


class _Stage0Engine:
    """The surface of a DeepSpeed engine at ZeRO stage 0 in fp32 (no DeepSpeed optimizer wrapper: the model
    copies are the masters, the torch optimizer's state the moments) that merge and prune read."""

    def __init__(self, module, optimizer, accumulation=1, micro_steps=0):
        self.module, self.optimizer = module, optimizer
        self.accumulation, self.micro_steps = accumulation, micro_steps

    def gradient_accumulation_steps(self):
        return self.accumulation

    def zero_optimization_stage(self):
        return 0

    def bfloat16_enabled(self):
        return False

    def fp16_enabled(self):
        return False


def _stage0_engine(**kw):
    import torch
    import transformers

    import relora_ds

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = relora_ds.wrap(transformers.LlamaForCausalLM(cfg), rank=3, seed=5)
    opt = torch.optim.AdamW(relora_ds.lora_parameters(model), **kw)
    return _Stage0Engine(model, opt)


def test_a_stage_0_engine_merges_s_B_A_into_W_and_draws_the_new_A():
    """ZeRO stage 0 in fp32 (the model's copies are the masters): the merge adds s·B·A of live factors into
    W, computed as the ZeRO workers' oracle computes it (fp32, rounded once), draws A from the layer's reinit
    seed and zeroes B. Only multi-rank runs checked this path's values before (a review's mutant that merged
    B = 0 passed every single-process test, whose fresh B was 0 anyway)."""
    import torch

    import relora_ds
    from relora_ds.relora import kaiming_uniform_A, reinit_seed

    engine = _stage0_engine()
    layers = list(relora_ds.relora_layers(engine.module))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, l in layers:
            l.lora_B.copy_(torch.randn(l.lora_B.shape, generator=g))
    want = [(l.weight.detach().float() + (l.lora_B.detach().float() @ l.lora_A.detach().float()) * l.scale
             ).to(l.weight.dtype) for _, l in layers]
    assert relora_ds.merge_and_reinit(engine)["layers"] == len(layers) == 7
    for (name, l), w in zip(layers, want):
        assert torch.equal(l.weight, w), name
        assert torch.equal(l.lora_A, kaiming_uniform_A(tuple(l.lora_A.shape), reinit_seed(5, name, 1))), name
        assert int(torch.count_nonzero(l.lora_B)) == 0 and int(l.merge_count) == 1, name


def test_a_stage_0_engine_prunes_its_torch_optimizers_moments_in_place_as_the_sort_oracle():
    """ZeRO stage 0 in fp32: the engine's torch optimizer holds the moments; the prune zeroes them in that
    state, exactly as the sort-based oracle of tests/dist/zero_reset_worker.py masks them (a prune of a copy
    of the state left the optimizer's moments as they were, and no test saw it)."""
    import torch

    import relora_ds

    def sort_mask(t, ratio):  # the worker's oracle: the round(ratio * n) smallest |t|, by a stable sort
        mask = torch.zeros(t.numel(), dtype=torch.bool)
        mask[torch.sort(t.reshape(-1).abs(), stable=True).indices[:round(ratio * t.numel())]] = True
        return mask.view(t.shape)

    engine = _stage0_engine()
    lora = relora_ds.lora_parameters(engine.module)
    g = torch.Generator().manual_seed(3)
    for p in lora:  # live moments: every entry non-zero, no ties
        engine.optimizer.state[p] = {"step": torch.tensor(2.0), "exp_avg": torch.randn(p.shape, generator=g),
                                     "exp_avg_sq": torch.rand(p.shape, generator=g) + 0.1}
    before = [{k: engine.optimizer.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for p in lora]
    stats = relora_ds.prune_optimizer_state(engine, lora, "magnitude", 0.9)
    for p, b in zip(lora, before):
        sq = sort_mask(b["exp_avg_sq"], 0.9)
        assert torch.equal(engine.optimizer.state[p]["exp_avg_sq"], b["exp_avg_sq"].masked_fill(sq, 0.0))
        assert torch.equal(engine.optimizer.state[p]["exp_avg"],
                           b["exp_avg"].masked_fill(sort_mask(b["exp_avg"], 0.9) | sq, 0.0))
    numel = sum(p.numel() for p in lora)
    assert stats["exp_avg_sq"] == sum(int(sort_mask(b["exp_avg_sq"], 0.9).sum()) for b in before) / numel
    assert stats["prune_comm_bytes"] == 0  # one process: nothing gathered


@pytest.mark.parametrize("setting", ["amsgrad", "muon"])
def test_an_engine_optimizer_without_plain_adam_moments_is_refused_before_any_change(setting):
    """amsgrad (its running max of exp_avg_sq would keep every pruned entry) and a Muon group (no Adam moments)
    are refused naming the setting, with the moments left as they were."""
    import torch

    import relora_ds

    engine = _stage0_engine(amsgrad=setting == "amsgrad")
    if setting == "muon":
        engine.optimizer.param_groups[0]["use_muon"] = True
    lora = relora_ds.lora_parameters(engine.module)
    for p in lora:
        engine.optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.ones(p.shape),
                                     "exp_avg_sq": torch.ones(p.shape), "max_exp_avg_sq": torch.ones(p.shape)}
    message = {"amsgrad": r"runs amsgrad, whose running max of exp_avg_sq would keep every pruned entry",
               "muon": r"keeps no Adam moments \(exp_avg, exp_avg_sq\) in every param group"}[setting]
    with pytest.raises(ValueError, match=message):
        relora_ds.prune_optimizer_state(engine, lora, "magnitude", 0.9)
    assert all(bool((engine.optimizer.state[p][k] == 1).all()) for p in lora for k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("micro_steps, boundary, warns", [
    (1, None, "1 of 2 micro-steps done"), (2, None, None), (4, None, None),
    (1, False, "of 2 micro-steps"), (1, True, None)])
def test_a_merge_inside_a_gradient_accumulation_warns_and_one_at_its_boundary_does_not(micro_steps, boundary,
                                                                                        warns):
    """A driver of its own steps the engine every micro-batch (micro_steps counts them: a merge is inside an
    accumulation unless micro_steps is a multiple of gradient_accumulation_steps); accelerate sets the
    engine's boundary flag, which then decides alone. A warning at every merge would hide the real one."""
    import warnings

    import relora_ds

    engine = _stage0_engine()
    engine.accumulation, engine.micro_steps = 2, micro_steps
    if boundary is not None:
        engine._is_gradient_accumulation_boundary = boundary
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert relora_ds.merge_and_reinit(engine)["layers"] == 7
    found = [str(w.message) for w in seen if "inside a gradient accumulation" in str(w.message)]
    if warns is None:
        assert not found, found
    else:
        assert len(found) == 1 and f"({warns})" in found[0], found
