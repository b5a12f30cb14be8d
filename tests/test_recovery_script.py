"""DeepSpeed's recovery scripts beside ReLoRA checkpoints (relora_ds/recovery.py): in their place a script that
exits 1, names what DeepSpeed's would lose and the export command, which gives the trained model."""
import json
import shlex
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from launch_utils import ROOT, launch_env, run_each_rank, run_python, run_ranks
from trainer_utils import train1

ZERO1_FP32 = {"zero_optimization": {"stage": 1}, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}


def test_the_recovery_scripts_refuse_a_relora_checkpoint_and_name_the_export_that_works(tmp_path, small_data_dir):
    """ZeRO-1, 3 steps into the ReLoRA phase (warm start 2, no reset yet): DeepSpeed's zero_to_fp32 would have
    returned the LoRA factors unmerged and no frozen base at all, with exit status 0. The oracle is the
    trainer's own export of its model in memory (run_dir/hf)."""
    (tmp_path / "zero1.json").write_text(json.dumps(ZERO1_FP32))
    train1(tmp_path, small_data_dir, ds=tmp_path / "zero1.json", total_steps=5, export=True)
    ckpts = tmp_path / "run" / "checkpoints"
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    theirs = get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag="step_5")  # what the copied script wrote
    bases = [k.removesuffix(".lora_A") + ".weight" for k in theirs if k.endswith(".lora_A")]
    assert bases and not set(bases) & set(theirs), "the ZeRO-1 premise: DeepSpeed leaves the frozen bases out"
    assert max(theirs[k.replace(".weight", ".lora_B")].abs().max() for k in bases) > 0, "LoRA must change the model"

    for script in ("zero_to_fp32.py", "zero_to_torch.py"):
        proc = run_python(ckpts / script, ckpts, tmp_path / "fp32", "-t", "step_5", env=launch_env())
        assert proc.returncode == 1 and not (tmp_path / "fp32").exists(), (proc.returncode, proc.stderr[-2000:])
        assert "lora_A, lora_B" in proc.stderr and "at ZeRO stage 1 the frozen base weight" in proc.stderr
        command = shlex.split(next(line for line in proc.stderr.splitlines() if "export.py" in line))
        assert command == ["python", str(ROOT / "launch/export.py"), str(ckpts.resolve()), "--tag", "step_5",
                           "--out", str((tmp_path / "fp32").resolve())], command

    proc = run_python(*command[1:], env=launch_env(), cwd=tmp_path)  # as printed, from another folder
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported, live = load_file(tmp_path / "fp32" / "model.safetensors"), load_file(tmp_path / "run/hf/model.safetensors")
    assert exported.keys() == live.keys() and all(torch.equal(exported[k], v) for k, v in live.items())


def test_an_installed_relora_ds_names_the_export_script_of_the_checkout_that_runs(tmp_path, monkeypatch):
    """relora_ds installed with pip install . (no launch/ beside the package): the stub named a bare
    launch/export.py, which ran only from the checkout's root. It names the export.py beside the running
    launch/train.py, else its place in a checkout, said so."""
    from relora_ds import LlamaConfig, LlamaForCausalLM, recovery, wrap

    model = wrap(LlamaForCausalLM(LlamaConfig.preset("debug")), rank=4)
    engine = SimpleNamespace(module=model, zero_optimization_stage=lambda: 2)
    monkeypatch.setattr(recovery, "EXPORT", tmp_path / "site-packages" / "launch" / "export.py")  # not there
    checkout = tmp_path / "my checkout" / "launch"
    checkout.mkdir(parents=True)
    (checkout / "export.py").write_text("")
    for argv0, want in ((checkout / "train.py", str(checkout / "export.py")),
                        (tmp_path / "elsewhere.py", "<relora_ds checkout>/launch/export.py")):
        monkeypatch.setattr(sys, "argv", [str(argv0)])
        (tmp_path / "zero_to_fp32.py").write_text("# DeepSpeed's")
        recovery.replace_recovery_scripts(tmp_path, engine)
        proc = run_python(tmp_path / "zero_to_fp32.py", env=launch_env())
        command = shlex.split(next(line for line in proc.stderr.splitlines() if "export.py" in line))
        assert proc.returncode == 1 and command[:2] == ["python", want], proc.stderr[-2000:]


def test_a_full_rank_model_keeps_deepspeeds_scripts(tmp_path):
    """A warm start's (or mode: full's) checkpoint is the whole model to zero_to_fp32: its script stays. Only the
    scripts DeepSpeed wrote are replaced (none without ZeRO)."""
    from relora_ds import LlamaConfig, LlamaForCausalLM, wrap
    from relora_ds.recovery import replace_recovery_scripts

    (tmp_path / "zero_to_fp32.py").write_text("# DeepSpeed's")
    model = LlamaForCausalLM(LlamaConfig.preset("debug"))
    engine = SimpleNamespace(module=model, zero_optimization_stage=lambda: 2)
    assert replace_recovery_scripts(tmp_path, engine) == []
    assert (tmp_path / "zero_to_fp32.py").read_text() == "# DeepSpeed's"
    wrap(model, rank=4, quantize="int8")
    assert replace_recovery_scripts(tmp_path, engine) == [tmp_path / "zero_to_fp32.py"]
    assert not (tmp_path / "zero_to_torch.py").exists()
    proc = run_python(tmp_path / "zero_to_fp32.py", env=launch_env())
    assert proc.returncode == 1 and "weight_q (int8)" in proc.stderr and "left out" not in proc.stderr, proc.stderr
    assert f"--out {tmp_path.parent / 'export'}" in proc.stderr  # the run's output_dir's export/



def test_a_hf_trainer_checkpoint_gets_the_script_with_what_exports_it(tmp_path):
    """A Hugging Face Trainer run with enable_relora under DeepSpeed ZeRO-1 (1 rank), its checkpoint-5 (two steps
    after the reset at 3): DeepSpeed's copied zero_to_fp32 returned, with exit status 0, the LoRA factors
    unmerged and no frozen base (a plain model loaded from it: max |Δlogit| 1.0 of 1.2). In its place a script
    that exits 1 and prints Python that exports the checkpoint (launch/export.py reads only relora_ds's own);
    that code, run as printed, writes a plain transformers model whose loss on step 6's batch is the loss the run
    logged there (the oracle: the trained model's forward, with the weights checkpoint-5 holds)."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tests" / "dist"))
    import hf_trainer_worker as w

    run_ranks(ROOT / "tests/dist/hf_trainer_worker.py", "--out", tmp_path, "--stage", 1, "--save-steps", 5,
              "--push", nprocs=1, timeout=300)
    ckpt = tmp_path / "checkpoint-5"
    # push_to_hub (hub_strategy 'checkpoint') uploads the folder before the callbacks hear of the save: the
    # script was replaced as DeepSpeed copied it, so the Hub gets ours too
    pushed = json.loads((tmp_path / "run.json").read_text())["pushed"]
    assert [p["folder"] for p in pushed] == ["checkpoint-5", "checkpoint-7"], pushed  # 7: the run's last step
    for push in pushed:
        assert push["zero_to_fp32.py"].startswith('#!/usr/bin/env python\n"""Written by relora_ds'), push
        assert push["zero_to_fp32.py"] == (tmp_path / push["folder"] / "zero_to_fp32.py").read_text()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    theirs = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))  # what the copied script wrote
    bases = [k.removesuffix(".lora_A") + ".weight" for k in theirs if k.endswith(".lora_A")]
    assert bases and not set(bases) & set(theirs), "the ZeRO-1 premise: DeepSpeed leaves the frozen bases out"
    assert max(theirs[k.replace(".weight", ".lora_B")].abs().max() for k in bases) > 0, "LoRA must change the model"

    for script in ("zero_to_fp32.py", "zero_to_torch.py"):
        proc = run_python(ckpt / script, ckpt, tmp_path / "fp32", env=launch_env())
        assert proc.returncode == 1 and not (tmp_path / "fp32").exists(), (proc.returncode, proc.stderr[-2000:])
        assert "lora_A, lora_B" in proc.stderr and "at ZeRO stage 1 the frozen base weight" in proc.stderr
        assert "Hugging Face Trainer checkpoint" in proc.stderr and "export.py does not read" in proc.stderr
    lines = proc.stderr.split("in Python:\n", 1)[1].splitlines()
    code = [line.strip() for line in lines[:next(i for i, line in enumerate(lines) if "save_pretrained" in line) + 1]]
    assert code[2].startswith("model = ...") and f"full_state_dict({str(ckpt.resolve())!r}, 'global_step5')" in code[3]
    exec("\n".join(code[:2] + ["model = w.model()"] + code[3:]), {"w": w})  # the model built as for training
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32").eval()
    assert not any("lora" in k for k in exported.state_dict())
    ids = torch.stack([w.Windows()[i]["input_ids"] for i in (10, 11)])  # step 6's batch: 2 a step, in order
    logged = [r["loss"] for r in json.loads((tmp_path / "run.json").read_text())["log"] if "loss" in r]
    with torch.no_grad():
        assert exported(input_ids=ids, labels=ids).loss.item() == pytest.approx(logged[5], rel=1e-5)


def test_a_hf_trainer_recovery_script_write_failing_on_rank_0_stops_every_rank(tmp_path):
    """2 ranks, ZeRO-1, a Trainer checkpoint at step 5 whose recovery scripts rank 0 cannot write (a full disk):
    rank 0 raised alone (at on_save) and rank 1 trained on into step 6's collectives, where it read "Connection
    closed by peer" once rank 0's process ended (gloo; NCCL on another node waits out the process group's
    timeout), saying nothing of why. Now rank 0 raises its error and rank 1 one naming rank 0, both at the save."""
    timeout = 90  # the process group's: rank 1 left waiting in a collective raises after it
    results = run_each_rank(ROOT / "tests/dist/hf_trainer_worker.py", "--out", tmp_path, "--stage", 1,
                            "--save-steps", 5, "--fail-recovery", "--ddp-timeout", timeout, timeout=timeout + 60)
    (status0, out0), (status1, out1) = results
    assert status0 == 1 and "RuntimeError: enable_relora: saving checkpoint-5: writing its recovery scripts " \
        "(zero_to_fp32.py, zero_to_torch.py) failed: [Errno 28] No space left on device" in out0, out0[-4000:]
    assert status1 == 1 and "RuntimeError: enable_relora: saving checkpoint-5: rank 0 failed writing its " \
        "recovery scripts (its error is in its output)" in out1, out1[-4000:]
