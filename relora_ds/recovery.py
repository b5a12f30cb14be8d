"""DeepSpeed's recovery scripts beside ReLoRA checkpoints, replaced by one that names the export that works.

At every ZeRO save DeepSpeed's rank 0 copies ``zero_to_fp32.py`` and ``zero_to_torch.py`` into the checkpoints
folder (``engine._copy_recovery_script``), next to ``latest``. On a model with ReLoRA layers they exit 0 with a
state dict that is not the trained model (DeepSpeed 0.19.8, the tiny recipe on 2 ranks: fp32 at ZeRO-1/2/3,
bf16 at ZeRO-1/3): the LoRA factors come unmerged, so a model without ReLoRA layers loaded from it with
``strict=False`` drops scale·B·A (max |Δlogit| 0.33, of max |logit| 1.3, 3 steps into ReLoRA at ZeRO-2/3); at
ZeRO-1 the frozen bases are not in it at all (zero_to_fp32 reads them from ZeRO-2/3's frozen fragments only),
so such a load keeps a fresh model's random ones (max |Δlogit| 1.75); an int8 base comes as
``weight_q``/``weight_scale``, which only relora_ds's layers read. ``launch/export.py`` gives the trained model
(``relora_ds.checkpoint.full_state_dict``, merged).

So after each save of a model with ReLoRA layers, rank 0 writes in their place a short script that exits 1
with what DeepSpeed's would have lost and the export command to run instead; running the right tool under the
old name would write a Hugging Face folder where a ``pytorch_model.bin`` was expected. A full-rank model (a
warm start, ``mode: full``) keeps DeepSpeed's scripts: their output is then the whole model (checked against
the export at ZeRO-1/2/3). ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` cannot be
replaced: the README and the script's message name what it leaves out.

The Hugging Face Trainer's ``checkpoint-N/`` folders (``relora_ds.hf_trainer``) get the same script, whose
message gives what exports them (``hf_trainer=True``): launch/export.py reads only relora_ds's own checkpoints
(a model of its families, rebuilt from the run's config), and at ZeRO-3 such a folder has no model.safetensors
(transformers' log then names zero_to_fp32.py); so ``full_state_dict`` of ``global_stepN`` loaded into the model
wrapped as for training, then ``relora_ds.unwrap(model).save_pretrained``. Checked on 1 rank against
``trainer.save_model`` at the same step: the same logits for a LLaMA at ZeRO-1/2/3 and a GPT-2 with int8 bases at
ZeRO-2; bf16 at ZeRO-1 within bf16's rounding (the export merges the fp32 masters, save_model bf16 weights).
"""
from __future__ import annotations

import stat
import sys
from pathlib import Path

from .durable import replace_durably
from .relora import relora_layers

SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
EXPORT = Path(__file__).resolve().parents[1] / "launch" / "export.py"  # a source checkout's (pip install -e)

_STUB = '''#!/usr/bin/env python
"""Written by relora_ds (relora_ds/recovery.py) in place of DeepSpeed's {name}: run as DeepSpeed's would be, it
exits 1 and prints what exports these ReLoRA checkpoints."""
import sys
from pathlib import Path

LOST = {lost!r}
VALUED = ("-t", "--tag", "--dtype", "--max_shard_size")  # DeepSpeed's options that take a value

args, tag, i = [], None, 1
while i < len(sys.argv):
    arg = sys.argv[i]
    if arg in VALUED:
        if arg in ("-t", "--tag") and i + 1 < len(sys.argv):
            tag = sys.argv[i + 1]
        i += 1
    elif arg.startswith("--tag="):
        tag = arg.split("=", 1)[1]
    elif not arg.startswith("-"):
        args.append(arg)
    i += 1
here = Path(__file__).resolve().parent
ckpts = Path(args[0]).resolve() if args else here
out = Path(args[1]).resolve() if len(args) > 1 else here.parent / "export"
{how}
sys.exit(f"{name}: relora_ds put this in place of DeepSpeed's script: for these ReLoRA checkpoints DeepSpeed's "
         "(and deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint) returns, without an error, a "
         "state dict that is not the trained model:\\n" + "".join(f"  - {{line}}\\n" for line in LOST) + HOW)
'''
# The stub's last part, for launch/train.py's checkpoints (the folder holding step_N/ and `latest`)
_EXPORT_HOW = '''import shlex

EXPORT = {export!r}
command = ["python", EXPORT, str(ckpts), *(["--tag", tag] if tag else []), "--out", str(out)]
HOW = ("Export the trained model (LoRA merged into its weights: config.json and model.safetensors, which "
       "transformers' from_pretrained loads) with:\\n  " + shlex.join(command) + "\\nEvery tensor as saved "
       "(LoRA unmerged), in Python: relora_ds.checkpoint.full_state_dict(checkpoints_dir, tag).")'''
# ... and for a Hugging Face Trainer's checkpoint-N/ (holding global_stepN/ and `latest`)
_HF_TRAINER_HOW = '''latest = ckpts / "latest"
tag = tag or (latest.read_text().strip() if latest.is_file() else "global_stepN")
HOW = ("This is a Hugging Face Trainer checkpoint (relora_ds.hf_trainer.enable_relora), which relora_ds's "
       "launch/export.py does not read. The trained model (LoRA merged into its weights, as transformers' "
       "from_pretrained loads it) is what trainer.save_model(out) writes; from this checkpoint, in Python:\\n"
       "  from relora_ds import unwrap\\n  from relora_ds.checkpoint import full_state_dict\\n"
       "  model = ...  # the model built and relora_ds.wrap-ped as for training (same rank, targets, quantize)\\n"
       f"  model.load_state_dict(full_state_dict({str(ckpts)!r}, {tag!r}))\\n"
       f"  unwrap(model).save_pretrained({str(out)!r})\\n"
       "(every tensor as saved, LoRA unmerged: full_state_dict alone).")'''


def _export_script() -> str:
    """launch/export.py of the checkout relora_ds is imported from (pip install -e), else the one beside the
    running script (a checkout's launch/train.py, relora_ds installed with pip install .), else its place in a
    relora_ds checkout, so named: a bare "launch/export.py" ran only from the checkout's root."""
    beside = Path(sys.argv[0]).resolve().parent / "export.py" if sys.argv and sys.argv[0] else None
    for path in (EXPORT, beside):
        if path is not None and path.is_file() and path.parent.name == "launch":
            return str(path)
    return "<relora_ds checkout>/launch/export.py"


def replace_recovery_scripts(ckpt_dir: Path, engine, hf_trainer: bool = False) -> list[Path]:
    """Rank 0, after ``engine.save_checkpoint`` into ``ckpt_dir``: replace the recovery scripts DeepSpeed copied
    there (none without ZeRO) by the stub, if the engine's model has ReLoRA layers. ``hf_trainer``: ``ckpt_dir``
    is a Hugging Face Trainer's checkpoint-N/, which the stub tells how to export. Returns the files written."""
    found = [Path(ckpt_dir) / name for name in SCRIPTS if (Path(ckpt_dir) / name).is_file()]
    layers = [layer for _, layer in relora_layers(engine.module)] if found else []
    if not layers:
        return []
    stage = engine.zero_optimization_stage()
    int8 = any(layer.quantize for layer in layers)
    lost = [f"the LoRA factors (lora_A, lora_B) of the {len(layers)} ReLoRA layers come unmerged: a model without "
            "ReLoRA layers (transformers', relora_ds's own) loaded from it with strict=False ignores them, and "
            "lacks scale·B·A in every one of those weights"]
    if stage < 2:  # DeepSpeed saves frozen-parameter fragments only where it partitions gradients
        lost.append(f"at ZeRO stage {stage} the frozen base {'weight_q' if int8 else 'weight'} of those layers is "
                    "left out: a model loaded from it with strict=False keeps its random initial ones")
    elif int8:
        lost.append("their int8 bases come as weight_q (int8) and weight_scale, which only relora_ds's int8 layers "
                    "read: no model's weight holds them")
    how = _HF_TRAINER_HOW if hf_trainer else _EXPORT_HOW.format(export=_export_script())
    for path in found:
        replace_durably(_STUB.format(name=path.name, lost=lost, how=how), path)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)  # as DeepSpeed leaves its own
    return found
