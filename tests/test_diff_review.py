"""Review of 2026-12-07's changes (6202d32..056a6e4) in the cases their own tests leave out. Both tests fail until
the fixes the review describes are applied:

- relora_ds/model.py compile_layers refuses compile_backend='cudagraphs' for a model on the CPU, and the trainer
  compiles the model before deepspeed.initialize moves it to the GPU (relora_ds/engines.py, _build_engine): on a
  GPU host the start-up check (relora_ds/startup.py, cuda=True) accepts it and the engine build then refuses it.
- relora_ds/ds_config.py refuses bf16 master weights with fp32 Adam moments (a checkpoint load rounds the
  moments), and accepts fp16.fp16_master_weights_and_grads with them: the load rounds the moments to fp16, where
  the small exp_avg_sq values flush to zero (measured: 39% of them; the resumed step 1.5e4 times the update)."""
import textwrap

import pytest
import torch

from launch_utils import ROOT, run_ranks


def test_compile_layers_takes_cudagraphs_as_the_start_up_check_does_on_a_gpu_host(monkeypatch):
    """The oracle: the start-up check's own answer for a run with a GPU (compile_problem(True, ...), None). The
    trainer's model is on the CPU when compile_layers runs (deepspeed.initialize moves it afterwards)."""
    from relora_ds import LlamaConfig, LlamaForCausalLM
    from relora_ds.compiling import compile_problem

    assert compile_problem(True, "cudagraphs") is None
    model = LlamaForCausalLM(LlamaConfig.preset("debug", vocab_size=61))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU host; the model not yet moved to it
    model.compile_layers(backend="cudagraphs")  # no forward: torch.compile builds nothing until then


_FP16_MASTERS_RESUME = """
    import sys
    sys.path.insert(0, {dist!r})
    import torch
    import precision_review_worker as w
    from relora_ds.distributed import init_distributed

    init_distributed()
    from deepspeed.accelerator import get_accelerator
    type(get_accelerator()).is_fp16_supported = lambda self: True  # (the CPU accelerator refuses fp16; it runs)
    w.LAYOUTS["fp16mwoff32_z2"] = {{"zero_optimization": {{"stage": 2, "offload_optimizer": w.OFFLOAD}},
                                   "fp16": {{**w.FP16, "fp16_master_weights_and_grads": True}}}}
    engine = w.build("fp16mwoff32_z2")
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(100))
    for _ in range(3):
        w.train_step(engine, x)
    saved = w.moments(engine)
    engine.save_checkpoint({ckpt!r}, tag="t")
    engine.destroy()
    loaded = w.build("fp16mwoff32_z2")
    loaded.load_checkpoint({ckpt!r}, tag="t")
    got = w.moments(loaded)
    flushed = sum(int(((saved[n]["exp_avg_sq"] != 0) & (a["exp_avg_sq"] == 0)).sum()) for n, a in got.items())
    exact = all(torch.equal(a[k].float(), saved[n][k]) for n, a in got.items() for k in w.MOMENTS)
    print(f"moments exact {{exact}} flushed {{flushed}}", flush=True)
"""


def test_fp16_master_weights_with_fp32_moments_are_refused_as_their_checkpoints_lose_the_moments(tmp_path):
    """The oracle: the moments DeepSpeed itself held before saving, against those it holds after loading the
    checkpoint (fp16 masters, offloaded DeepSpeedCPUAdam with its default fp32 moments, 1 rank). They differ, and
    some exp_avg_sq flush to zero: complete_ds_config must refuse the layout as it refuses the bf16 one."""
    script = tmp_path / "fp16_masters_resume.py"
    script.write_text(textwrap.dedent(_FP16_MASTERS_RESUME.format(dist=str(ROOT / "tests/dist"),
                                                                  ckpt=str(tmp_path / "ckpt"))))
    out = run_ranks(script, nprocs=1, timeout=600).stdout
    assert "moments exact False" in out and "flushed 0" not in out, out[-2000:]

    from relora_ds.ds_config import complete_ds_config
    from relora_ds.train_config import TrainConfig

    cfg = TrainConfig(cycle_length=10, restart_warmup_steps=5, total_steps=100, micro_batch_size=2, global_batch_size=8)
    with pytest.raises(ValueError, match=r"fp16.fp16_master_weights_and_grads"):
        complete_ds_config({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                            "fp16": {"enabled": True, "fp16_master_weights_and_grads": True}}, cfg, 1)
