"""ReLoRA's reset under each precision layout DeepSpeed runs on CPU (2 ranks: fp32; bf16 accumulating in bf16 or
fp32, the BF16_Optimizer, ZeRO-3; bf16 master weights; fp16 with dynamic loss scaling, its CPU flag forced on),
on a reset step DeepSpeed skipped for an infinite gradient, against single-process oracles; gradient clipping
over the LoRA and full-rank groups; and the bf16-master layout whose checkpoints lose the Adam moments, refused.
The worker: tests/dist/precision_review_worker.py (~8 s a layout after the launch)."""
import json

import pytest

from launch_utils import ROOT, run_ranks

# The worker's layouts run here (its bf16acc32_z2, bf16mwoff_z2 and fp16_z3 too, by name, ~8 s each; all 11
# passed on 2026-12-07): every optimizer class and master dtype the others take.
LAYOUTS = ["fp32_z2", "bf16_z2", "bf16opt_z1", "bf16_z3", "bf16mw_z2", "bf16mwoff16_z2", "bf16mwoff32_z2", "fp16_z2"]
RESUMES_EXACTLY = [layout for layout in LAYOUTS if layout != "bf16mwoff32_z2"]  # the refused one: see below


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision")
    # bf16mwoff* build DeepSpeedCPUAdam (a compiled op: ~100 s once, cached in TORCH_EXTENSIONS_DIR)
    run_ranks(ROOT / "tests/dist/precision_review_worker.py", "--out", out, "--layouts", ",".join(LAYOUTS),
              timeout=900)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_reset_on_a_skipped_step_merges_and_prunes_once_as_one_process_would(results, layout):
    """Step 4 (a reset step) gets an inf gradient: DeepSpeed skips it (masters and moments untouched, lr held,
    skipped_steps 1) and the reset still happens once: W = W0 + s·B·A of the masters, rounded once to W's dtype
    (float64 oracle); A's master and model copy the seeded draw in their dtypes, B zero in both; the moments
    pruned as the sort oracle prunes those read before the skipped step; every rank the same W. The next step
    applies and the model copies follow the masters."""
    for r in results:
        res = r[layout]
        assert res["skipped"] and res["skipped_steps"] == 1 and res["lr_held"] and res["unchanged_by_skip"], res
        assert res["event"] == {"event": "reset", "step": 4, "layers": 14, "reset": True, "prune_skipped": None}
        # fp32: the sum's own rounding at its r + 1 = 4 terms; 16-bit: rounded once (fp32 sums add < 1e-3)
        assert res["merge_rounding"] <= (4.0 if layout.startswith("fp32") else 0.501), res["merge_rounding"]
        assert res["masters_reset"] and res["copies_reset"] and res["prune_exact"] and res["ranks_agree"], res
        assert res["step5_applied"] and res["copies_follow_masters"], res
        assert res["master_dtype"] == ("torch.bfloat16" if layout.startswith("bf16mw") else "torch.float32")


@pytest.mark.parametrize("layout", RESUMES_EXACTLY)
def test_a_checkpoint_of_the_reset_resumes_exactly(results, layout):
    """Written after the reset: the loaded engine holds the pruned moments, the loss scale (fp16: 2^8 kept, the
    overflow used up hysteresis), the skipped-step count and the lr, and its next step equals the saved engine's."""
    for r in results:
        res = r[layout]
        assert res["loaded_state"] == res["saved_state"], res
        assert res["saved_state"]["loss_scale"] == (256.0 if layout.startswith("fp16") else 1.0)
        assert res["saved_state"]["skipped_steps"] == 1 and res["saved_state"]["global_steps"] == 4
        assert res["loaded_moments_exact"] and res["resumed_step_exact"], res


def test_bf16_master_weights_with_fp32_moments_are_refused_as_their_checkpoints_round_the_moments(results):
    """bf16 master weights with an offloaded DeepSpeedCPUAdam keeping its moments in fp32 (its default): a
    checkpoint load rounds every moment to bf16 (torch's Optimizer.load_state_dict casts state to the bf16
    master's dtype), and the resumed run's next step differs (the worker, bf16mwoff32_z2: if DeepSpeed comes to
    keep them, the refusal can go). complete_ds_config refuses that layout, naming the two that resume exactly
    (moments in bf16: bf16_optimizer_states, or the CPU Adam's fp32_optimizer_states false; fp32 masters)."""
    from relora_ds.ds_config import complete_ds_config
    from relora_ds.train_config import TrainConfig

    for r in results:
        assert not r["bf16mwoff32_z2"]["loaded_moments_exact"] and not r["bf16mwoff32_z2"]["resumed_step_exact"]
    cfg = TrainConfig(cycle_length=10, restart_warmup_steps=5, total_steps=100, micro_batch_size=2, global_batch_size=8)
    offload = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    for zero in (offload, {**offload, "stage": 1}, {**offload, "stage": 3}):
        with pytest.raises(ValueError, match=r"bf16.bf16_master_weights_and_grads with Adam moments in fp32: a "
                           r"checkpoint load rounds the moments .* Add \"bf16_optimizer_states\": true .* or remove "
                           r"bf16_master_weights_and_grads"):
            complete_ds_config({"zero_optimization": zero, "bf16": {"enabled": True,
                                                                    "bf16_master_weights_and_grads": True}}, cfg, 1)
    masters = {"enabled": True, "bf16_master_weights_and_grads": True}
    for ds in ({"zero_optimization": offload, "bf16": {**masters, "bf16_optimizer_states": True}},  # bf16mwoff_z2
               {"zero_optimization": offload, "bf16": masters,  # bf16mwoff16_z2
                "optimizer": {"type": "AdamW", "params": {"fp32_optimizer_states": False}}},
               {"zero_optimization": {"stage": 2}, "bf16": {**masters, "bf16_optimizer_states": True}},  # bf16mw_z2
               {"zero_optimization": offload, "bf16": {**masters, "enabled": False}},  # fp32: DeepSpeed ignores it
               {"zero_optimization": offload, "bf16": {"enabled": True, "bf16_master_weights_and_grads": "false"}}):
        complete_ds_config(ds, cfg, 1)


def test_gradient_clipping_spans_the_lora_and_full_rank_groups_as_torch_clips(results):
    """fp32 ZeRO-2, clip 0.05 (every step clipped), LoRA factors and full-rank weights in separate groups, a batch
    per rank: the norms DeepSpeed reports and the masters after 3 steps equal one process's mean loss of both
    batches with torch.nn.utils.clip_grad_norm_ over every trainable parameter and torch's AdamW."""
    for r in results:
        res = r["clipping"]
        assert min(res["want_norms"]) > 0.05 * 10  # clipped hard: a per-group clip would change the update
        assert res["norms"] == pytest.approx(res["want_norms"], rel=1e-6)
        assert res["max_diff"] < 1e-6, res
