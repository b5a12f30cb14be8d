"""The trainer with ``--quantize int8``: 2 ranks, ZeRO-2 bf16 (the shipped config), warm-start switch,
two resets, checkpoints holding the int8 buffers, and an export that loads in transformers."""
import json

import torch
import yaml

import relora_kernels as rk

from launch_utils import ROOT, launch_env, run_python, run_ranks

RECIPE = dict(model="debug", seq_len=32, mode="relora", rank=4, alpha=8, warm_start_steps=2, cycle_length=4,
              restart_warmup_steps=2, warmup_steps=2, total_steps=12, lr=3e-3, micro_batch_size=4,
              global_batch_size=8, eval_every=6, eval_windows=16, save_every=6, keep_last=5, export=True,
              quantize="int8")


def test_int8_trainer_zero2_resets_checkpoint_export(tmp_path, small_data_dir):
    import transformers

    recipe = {**RECIPE, "data_dir": str(small_data_dir), "output_dir": str(tmp_path / "run")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run_ranks(ROOT / "launch/train.py", "--config", tmp_path / "recipe.yaml",
                  "--deepspeed", ROOT / "ds_configs/zero2.json")
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r.get("event") == "reset"] == [6, 10]
    losses = {r["step"]: r["loss"] for r in recs if "loss" in r}
    states = sorted((tmp_path / "run").rglob("mp_rank_00_model_states.pt"), key=lambda p: p.stat().st_mtime)
    assert states, "no DeepSpeed model checkpoint written"
    module = torch.load(states[-1], map_location="cpu", weights_only=False)["module"]
    q = {k: v for k, v in module.items() if k.endswith(("weight_q", "weight_residual"))}
    assert q and all(v.dtype == torch.int8 for v in q.values())
    assert all(v.dtype == torch.bfloat16 for k, v in module.items() if k.endswith("weight_scale"))
    assert not any(k.endswith("proj.weight") for k in module)  # no float copy of the base
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    assert not any("weight_q" in k or "lora" in k for k in hf.state_dict())
    # The export is the dequantized int8 base plus s·B·A (fp32 masters; the checkpoint's module copy is bf16).
    pre = "model.layers.0.self_attn.q_proj."
    want = rk.int8_dequantize_reference(module[pre + "weight_q"], module[pre + "weight_scale"]) + \
        (RECIPE["alpha"] / RECIPE["rank"]) * module[pre + "lora_B"].float() @ module[pre + "lora_A"].float()
    got = hf.state_dict()[pre + "weight"].float()
    assert (got - want).abs().max() < 2e-3 * want.abs().max()
    assert losses[12] < losses[1]
    # launch/export.py rebuilds the int8 layers from the checkpoint alone: the same weights as the trainer's.
    run_python(ROOT / "launch/export.py", tmp_path / "run" / "checkpoints", "--out", tmp_path / "exported",
               env=launch_env(), check=True)
    offline = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported").state_dict()
    assert offline.keys() == hf.state_dict().keys()
    assert all(torch.equal(offline[k], v) for k, v in hf.state_dict().items())
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")  # the run's tokenizer, found
    assert tok("a b")["input_ids"][0] == 1 and len(tok) == 512               # through its data dir


def test_int8_trainer_zero3_partitions_the_int8_base_and_exports(tmp_path, small_data_dir):
    """ZeRO-3 partitions the int8 weight like a bf16 base (tests/test_int8_zero.py checks the shards): a run
    through the warm-start switch and two resets, whose export equals the int8 base plus s·B·A of its
    checkpoint (gathered from the partitions by the exporter)."""
    import transformers

    recipe = {**RECIPE, "data_dir": str(small_data_dir), "output_dir": str(tmp_path / "run")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    ds = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even these small layers
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    run_ranks(ROOT / "launch/train.py", "--config", tmp_path / "recipe.yaml",
                  "--deepspeed", tmp_path / "zero3.json")
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r.get("event") == "reset"] == [6, 10]
    assert not [r for r in recs if r.get("event") == "warning"]
    losses = {r["step"]: r["loss"] for r in recs if "loss" in r}
    assert losses[12] < losses[1]
    run_python(ROOT / "launch/export.py", tmp_path / "run" / "checkpoints", "--out", tmp_path / "exported",
               env=launch_env(), check=True)
    offline = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported").state_dict()
    trainer_export = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "run" / "hf").state_dict()
    assert all(torch.equal(offline[k], v) for k, v in trainer_export.items())
