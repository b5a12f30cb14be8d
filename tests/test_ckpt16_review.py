"""ZeRO stage 0 with bf16/fp16 (``mode: full``), 1 CPU rank: launch/export.py on the last checkpoint gives the
weights the trainer exported from its live engine, bit for bit: both read the fp32 masters of DeepSpeed's FP16
optimizer (the export from the checkpoint's saved optimizer state, ``checkpoint._stage0_masters``).

Found by a review (2026-12-07): ``checkpoint.full_state_dict`` returned the checkpoint's 16-bit module states for
such a run, so an export from the checkpoint differed from the trainer's by up to half a 16-bit step."""
import json

import pytest
import torch

from relora_ds.checkpoint import full_state_dict
from relora_ds.engines import param_groups
from relora_ds.model import LlamaForCausalLM
from relora_ds.model_config import LlamaConfig
from test_trainer_steps import _train1_patched
from trainer_utils import export_equals_the_trainers, write

FULL = dict(mode="full", cycle_length=None, warm_start_steps=0, total_steps=4, eval_every=0, global_batch_size=4,
            export=True)
FUSED, TORCH = {"type": "AdamW", "params": {}}, {"type": "AdamW", "params": {"torch_adam": True}}
# torch's AdamW gives FP16_UnfusedOptimizer (an fp32 copy per parameter), DeepSpeed's FusedAdam FP16_Optimizer (a
# flat fp32 copy per param group). fp16: this CPU's fp16 support flag forced on (DeepSpeed's CPU accelerator
# reports none; it runs).
# (bf16 with FusedAdam passed too; the hand-written checkpoints below take both optimizers' layouts)
CASES = {"bf16_unfused": (TORCH, {"bf16": {"enabled": True}}),
         "fp16_fused": (FUSED, {"fp16": {"enabled": True, "initial_scale_power": 8}})}
FORCE_FP16 = "from deepspeed.accelerator import get_accelerator\n" \
             "type(get_accelerator()).is_fp16_supported = lambda self: True"


@pytest.mark.parametrize("case", CASES)
def test_stage0_16bit_export_from_the_checkpoint_equals_the_trainers(tmp_path, small_data_dir, case):
    optimizer, precision = CASES[case]
    recipe, ds = write(tmp_path, small_data_dir, **FULL)
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0}, "optimizer": optimizer, **precision}))
    _train1_patched(tmp_path, FORCE_FP16, recipe, ds)
    export_equals_the_trainers(tmp_path / "run", tmp_path)


def _stage0_checkpoint(tmp_path, fused: bool):
    """A stage-0 bf16 checkpoint written by hand, as DeepSpeed's FP16 optimizers save one, of a tied model
    (Qwen2 with bias, lm_head.weight the embedding): fp32 masters off the bf16 grid, the module states their
    bf16 rounding. Returns (ckpt_dir, the masters by name)."""
    config = LlamaConfig.preset("debug", model_type="qwen2", qkv_bias=True, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    masters = {n: p.detach() + 1e-3 * torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
    groups = [[masters[n] for n, _ in group] for _, group in param_groups(model)]
    optimizer = {"fp32_groups_flat": [torch.cat([t.flatten() for t in g]) for g in groups]} if fused else \
        {"fp32_groups": groups}
    module = {n: masters.get(n, masters["model.embed_tokens.weight"]).bfloat16() for n in model.state_dict()}
    folder = tmp_path / "checkpoints" / "step_1"
    folder.mkdir(parents=True)
    torch.save({"module": module, "optimizer": optimizer, "buffer_names": []}, folder / "mp_rank_00_model_states.pt")
    (folder / "config.json").write_text(json.dumps({"train": {"mode": "full"}, "model": config.to_dict()}))
    return folder.parent, masters


@pytest.mark.parametrize("fused", [False, True])
def test_stage0_masters_by_name_tied_head_included(tmp_path, fused):
    ckpts, masters = _stage0_checkpoint(tmp_path, fused)
    state = full_state_dict(ckpts, "step_1")
    assert "lm_head.weight" in state and "model.layers.0.self_attn.q_proj.bias" in state
    masters["lm_head.weight"] = masters["model.embed_tokens.weight"]
    assert state.keys() == masters.keys() and all(torch.equal(state[k], v) for k, v in masters.items())


def test_stage0_masters_that_do_not_fit_the_weights_are_refused(tmp_path):
    ckpts, _ = _stage0_checkpoint(tmp_path, fused=False)
    path = ckpts / "step_1" / "mp_rank_00_model_states.pt"
    states = torch.load(path, weights_only=False)
    matrices = states["optimizer"]["fp32_groups"][0]  # embedding, q_proj, k_proj, ...: q and k swapped
    matrices[1], matrices[2] = matrices[2], matrices[1]
    torch.save(states, path)
    with pytest.raises(ValueError, match=r"master taken for model.layers.0.self_attn.q_proj.weight does not round"):
        full_state_dict(ckpts, "step_1")
    config = json.loads((ckpts / "step_1" / "config.json").read_text())
    (ckpts / "step_1" / "config.json").write_text(json.dumps({**config, "model": {**config["model"],
                                                                                 "num_hidden_layers": 1}}))
    with pytest.raises(ValueError, match=r"param group"):
        full_state_dict(ckpts, "step_1")
