"""A training run's memory per GPU: launch/preflight.py's estimate (relora_ds.memory.run_phases, on the run's own
model and DeepSpeed config) and launch/bench_memory_ds.py, which measures it under a DeepSpeed engine and
records the estimate beside the measured peak. The formulas themselves: tests/test_memory_table.py."""
import json
import subprocess
import sys

import pytest
import torch

from launch_utils import ROOT
from relora_ds import LlamaConfig, LlamaForCausalLM, wrap

sys.path.insert(0, str(ROOT / "launch"))
import memory_table  # noqa: E402
from relora_ds import memory  # noqa: E402


def test_bench_memory_ds_runs_full_rank_and_relora_and_counts_their_trained_parameters(tmp_path):
    """launch/bench_memory_ds.py (the measured side of the paper's memory and speed claims: full-rank training
    vs ReLoRA under a DeepSpeed engine), smoke run on CPU: one engine per base in its own process, the
    trained parameters counted by hand from the debug preset (full rank: every weight; ReLoRA: embeddings,
    head, norms and the factors of the 7 projections per layer), every step's loss finite."""
    import math
    import os

    from launch_utils import launch_env

    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "launch/bench_memory_ds.py"), "--device", "cpu", "--preset",
                           "debug", "--rank", "4", "--steps", "1", "--micro-batch", "2", "--seq-len", "16",
                           "--deepspeed", str(ROOT / "ds_configs/zero2_fp32.json"), "--bases", "full", "bf16",
                           "--out", str(out)], env={**launch_env(), **os.environ}, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {row["base"]: row for row in json.loads(out.read_text())}
    cfg = LlamaConfig.preset("debug")
    h, i, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out): q k v o gate up down
    head = 0 if cfg.tie_word_embeddings else v * h
    norms = (2 * L + 1) * h
    full = v * h + head + norms + L * sum(a * b for a, b in shapes)
    lora = L * sum(4 * (a + b) for a, b in shapes)
    assert rows["full"]["trainable_params"] == full
    assert rows["bf16"]["trainable_params"] == v * h + head + norms + lora
    assert all(math.isfinite(row["loss"]) and row["step_ms"] > 0 for row in rows.values())
    assert "debug  full ZeRO-2" in proc.stdout and "debug  bf16 ZeRO-2" in proc.stdout
    assert all(row["estimated_peak_gib"] is None for row in rows.values())  # fp32: not estimated
    # --compile under ZeRO-3 (the trainer's compile_for_engine): the layers in one graph, gathered around it
    zero3 = tmp_path / "zero3_fp32.json"
    zero3.write_text(json.dumps({**json.loads((ROOT / "ds_configs/zero2_fp32.json").read_text()),
                                 "zero_optimization": {"stage": 3}}))
    proc = subprocess.run([sys.executable, str(ROOT / "launch/bench_memory_ds.py"), "--device", "cpu", "--preset",
                           "debug", "--rank", "4", "--steps", "1", "--micro-batch", "2", "--seq-len", "16",
                           "--deepspeed", str(zero3), "--bases", "bf16", "--compile", "--out", str(out)],
                          env={**launch_env(), **os.environ}, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert (row["compile"], row["zero_stage"], row["graphs"], row["graph_breaks"], row["recompile_limit_hits"],
            row["cache_entries"]) == (True, 3, 1, 0, 0, 1), row
    assert math.isfinite(row["loss"]) and "debug  bf16 ZeRO-3 compiled" in proc.stdout


@pytest.mark.parametrize("base", ["full", "int8"])
def test_bench_memory_ds_rows_carry_preflights_estimate(base):
    """The GPU row's estimate beside its measured peak (launch/bench_memory_ds.py): memory.run_phases on
    the script's own run (world size 1, bf16 ZeRO-2), its one phase's states + activations."""
    sys.path.insert(0, str(ROOT / "launch"))
    import bench_memory_ds

    from relora_ds.ds_config import complete_ds_config, load_ds_config
    from relora_ds.train_config import TrainConfig

    lowrank = base != "full"
    cfg = TrainConfig(model="debug", mode="relora" if lowrank else "full", rank=4, cycle_length=1000 if lowrank else None,
                      micro_batch_size=2, global_batch_size=2, seq_len=16, total_steps=5,
                      quantize="int8" if lowrank else None)
    ds = complete_ds_config(load_ds_config(ROOT / "ds_configs/zero2.json"), cfg, world_size=1)
    model_cfg = LlamaConfig.preset("debug", max_position_embeddings=17)
    (phase,) = memory.run_phases(model_cfg, cfg, ds, 1)
    assert phase["phase"] == ("ReLoRA" if lowrank else "full-rank")
    got = bench_memory_ds.estimated_peak_gib(model_cfg, cfg, ds)
    assert got == (phase["states"] + phase["activations"]) / 2**30 > 0


@pytest.mark.parametrize("case", ["relora_warm_start_int8_subset", "full", "lora_from_warm_start_offload",
                                  "relora_zero1_bf16_optimizer", "relora_int8_triton_dropout"])
def test_run_phases_count_the_runs_own_model(case):
    """memory.run_phases (launch/preflight.py's estimate): parameters counted on a real model built and
    wrapped as the run asks (the oracle: its parameters and buffers on CPU, in bf16 as the engine holds them;
    target_modules a subset, tied embeddings, an int8 base), the states by ZeRO's bytes per parameter by hand,
    the phases the run has, and the activations of the run's micro-batch, checkpointing and chunked loss."""
    from relora_ds.train_config import TrainConfig

    model_config = LlamaConfig.preset("tiny", vocab_size=512, tie_word_embeddings=True)
    base = dict(model="tiny", total_steps=100, rank=8, micro_batch_size=3, seq_len=64)
    cfg, ds, n = {
        "relora_warm_start_int8_subset": lambda: (
            TrainConfig(**base, cycle_length=50, restart_warmup_steps=10, warm_start_steps=10, warm_start_lr=5e-4,
                        quantize="int8", target_modules=["q_proj", "down_proj"], activation_checkpointing=True,
                        activation_checkpointing_policy="selective", dropout=0.1),
            {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}, 2),
        "full": lambda: (TrainConfig(**{**base, "rank": 128}, mode="full", loss_chunk_size=32),
                         {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}, 4),
        "lora_from_warm_start_offload": lambda: (
            TrainConfig(**base, mode="lora", warm_start_from="/x"),
            {"fp16": {"enabled": True}, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
            2),
        "relora_zero1_bf16_optimizer": lambda: (  # DeepSpeed's BF16_Optimizer: a whole fp32 gradient buffer too
            TrainConfig(**base, cycle_length=50, restart_warmup_steps=10, dropout=0.1),
            {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"},
             "gradient_accumulation_steps": 1}, 4),
        "relora_int8_triton_dropout": lambda: (  # the Triton kernels apply an int8 base's dropout themselves
            TrainConfig(**base, cycle_length=50, restart_warmup_steps=10, quantize="int8", kernels="triton",
                        dropout=0.1),
            {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}, 2)}[case]()
    phases = memory.run_phases(model_config, cfg, ds, n)

    model = LlamaForCausalLM(model_config).to(torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())  # tied: the head is the embedding
    assert total == model.num_parameters() < memory.param_counts(model_config, 8)["other"] + \
        memory.param_counts(model_config, 8)["projections"]
    if cfg.mode != "full":
        wrap(model, rank=8, target_modules=cfg.target_modules, quantize=cfg.quantize)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(t.untyped_storage().nbytes() for n_, t in [*model.named_parameters(), *model.named_buffers()]
                 if not t.requires_grad and n_.endswith((".weight", ".weight_q", ".weight_scale")))  # no host residual
    ckpt = cfg.activation_checkpointing
    if case == "relora_warm_start_int8_subset":  # ZeRO-2 over 2: bf16 weight and grad 2 + 2, fp32 master, m, v 12 / N
        want = [("warm start", 2 * total + 14 * total / n, None),
                ("ReLoRA", 2 * trainable + 14 * trainable / n + frozen, 8)]
    elif case == "full":  # ZeRO-3 over 4: all 16 bytes per parameter partitioned
        want = [("full-rank", 16 * total / n, None)]
    elif case == "lora_from_warm_start_offload":  # the warm start is loaded; the optimizer offloaded: the bf16
        want = [("LoRA", 2 * trainable + frozen, 8)]  # weight and grad stay (ZeRO-2)
    elif case == "relora_int8_triton_dropout":  # ZeRO-2 over 2
        want = [("ReLoRA", 2 * trainable + 14 * trainable / n + frozen, 8)]
    else:  # ZeRO-1 over 4: bf16 weight and grad 2 + 2, the fp32 gradient buffer 4, master, m, v 12 / N
        want = [("ReLoRA", 8 * trainable + 12 * trainable / n + frozen, 8)]
    # LoRA dropout: a keep-mask of each adapted projection's input, 1 byte per element (3 with an int8 base on
    # the default path, which falls back to the twin under dropout; 1 with the Triton kernels): q_proj's h and
    # down_proj's i, or all seven
    h, i = model_config.hidden_size, model_config.intermediate_size
    masks = {"relora_warm_start_int8_subset": 3 * 64 * (h + i), "relora_zero1_bf16_optimizer": 64 * (6 * h + i),
             "relora_int8_triton_dropout": 64 * (6 * h + i)}
    masks = masks.get(case, 0)
    assert [p["phase"] for p in phases] == [name for name, _, _ in want]
    if case == "relora_warm_start_int8_subset":
        # resumed at step 9 the warm start has a step left; from step_10 (its last checkpoint) the full-rank
        # engine is loaded and switched before a step (relora_ds/resume.py): its states, no activations; at 11
        # ReLoRA only
        resumed = {s: memory.run_phases(model_config, cfg, ds, n, start_step=s) for s in (9, 10, 11)}
        assert [p["phase"] for p in resumed[9]] == ["warm start", "ReLoRA"]
        assert [(p["phase"], p["activations"]) for p in resumed[10]] == [
            ("warm start (loaded, no step)", 0), ("ReLoRA", phases[1]["activations"])]
        assert resumed[10][0]["states"] == phases[0]["states"]
        assert [p["phase"] for p in resumed[11]] == ["ReLoRA"]
    for p, (name, states, rank) in zip(phases, want):
        assert p["states"] == pytest.approx(states, rel=1e-12), name
        assert p["activations"] == memory.activation_peak_bytes(
            model_config, 64, rank, 3, ckpt, cfg.loss_chunk_size, cfg.activation_checkpointing_policy,
            masks if rank else 0)
        assert p["fits"](3, p["states"] + p["activations"]) and not p["fits"](3, p["states"] + p["activations"] - 1)
    assert memory.run_phases(model_config, cfg, {"zero_optimization": {"stage": 2}}, n) == \
        "fp32 training (the memory model counts bf16/fp16 weights and activations)"
    if case == "full":  # ZeRO-3 offloading optimizer and parameters, in DeepSpeed's legacy spelling too: no states
        for zero in ({"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "nvme", "nvme_path": "/x"}},
                     {"cpu_offload": True, "cpu_offload_param": True}):
            ds3 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, **zero}}
            assert [p["states"] for p in memory.run_phases(model_config, cfg, ds3, n)] == [0], zero
        # the parameters alone: ZeRO-3's optimizer partitions stay (counted as none offloaded, a review)
        for zero in ({"offload_param": {"device": "cpu"}}, {"cpu_offload_param": True}):
            ds3 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, **zero}}
            assert [p["states"] for p in memory.run_phases(model_config, cfg, ds3, n)] == \
                [pytest.approx(14 * want[0][1] / 16)], zero


def test_run_phases_count_document_masking_sdpa_masks():
    """Document masking under SDPA holds an additive mask per sliding-window length for the step: run_phases
    adds exactly the bytes of the masks relora_ds.documents builds for a micro-batch of packed windows (the
    oracle: their storage), and none where the model is set to flash-attn (which builds no mask)."""
    from relora_ds.documents import Documents
    from relora_ds.train_config import TrainConfig

    windowed = dict(vocab_size=512, model_type="qwen3", sliding_window=16,
                    layer_types=["full_attention", "sliding_attention"] * 2,
                    num_hidden_layers=4)
    ds = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    base = dict(model="tiny", total_steps=100, rank=8, micro_batch_size=3, seq_len=61, cycle_length=50,
                restart_warmup_steps=10)
    ids = torch.randint(3, 512, (3, 62))
    documents = Documents(ids, eos_token_id=2).prepare({None, 16}, torch.bfloat16, flash=False)
    want = sum(m.untyped_storage().nbytes() for m in documents._masks.values())
    assert want == 2 * 3 * 62 * 64 * 2  # two windows; rows padded to 64
    for attn, extra in (("auto", want), ("flash", 0)):
        model_config = LlamaConfig.preset("tiny", attn_implementation=attn, **windowed)
        plain, masked = (memory.run_phases(model_config, TrainConfig(**base, document_masking=on), ds, 2)
                         for on in (False, True))
        assert [p["phase"] for p in masked] == ["ReLoRA"]
        assert masked[0]["activations"] - plain[0]["activations"] == extra, attn
        assert masked[0]["states"] == plain[0]["states"]


@pytest.mark.parametrize("recipe", ["paper_250m", "paper_350m", "paper_1b"])
def test_the_readme_tables_micro_batches_are_those_preflight_allows_for_the_paper_recipes(capsys, recipe):
    """The sizing table (memory_table.py, defaults: the 250m-1b recipes' r, seq_len, vocab, batch and dropout)
    against preflight's estimate for the recipe itself (run_phases on its model, DeepSpeed config and 8
    ranks): the largest micro-batch each phase fits in an 80 GB GPU at ZeRO-2 is the table's. A review found
    the table's 1b ReLoRA cell (48, counted without the recipe's dropout masks) refused by preflight (36)."""
    from relora_ds.ds_config import complete_ds_config, load_ds_config
    from relora_ds.train_args import build_launch_parser, config_from_args

    cfg = config_from_args(build_launch_parser().parse_args(["--config", str(ROOT / f"launch/configs/{recipe}.yaml")]))
    model_config = LlamaConfig.preset(cfg.model, vocab_size=cfg.vocab_size)
    ds = complete_ds_config(load_ds_config(ROOT / "ds_configs/zero2.json"), cfg, 8)
    phases = {p["phase"]: p for p in memory.run_phases(model_config, cfg, ds, 8)}
    assert set(phases) == {"warm start", "ReLoRA"}
    budget, per_rank = memory.usable_bytes(80.0), cfg.global_batch_size // 8
    assert memory_table.main(["--presets", cfg.model]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    row = dict(zip(*([c.strip() for c in line.strip("|").split("|")] for line in (lines[0], lines[1]))))
    for phase, column, z2 in (("warm start", "micro-batch warm start Z0 / Z1 / Z2 / Z3", 2),
                              ("ReLoRA", "micro-batch ReLoRA Z0 / Z2 / Z3", 1)):
        fits = memory.largest_fitting_micro_batch(per_rank, lambda m: phases[phase]["fits"](m, budget))
        assert row[column].split(" / ")[z2] == str(fits), (recipe, phase, row[column], fits)
