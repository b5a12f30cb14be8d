"""DeepSpeed's universal checkpoint: how a checkpoint resumes on another number of ranks or engine layout.

A checkpoint whose optimizer state is sharded (ZeRO, or DeepSpeed's bf16 optimizer) is converted once by
DeepSpeed's ``ds_to_universal`` into ``step_<N>/universal/`` and loaded with ``load_universal``; a fp32
checkpoint without ZeRO, resumed under ZeRO, is written in the same layout by relora_ds (ds_to_universal reads
only ZeRO's files). DeepSpeed restores the trainable parameters, their optimizer state and the scheduler from
it, but not frozen parameters or buffers (the ReLoRA base weights, int8 weights and buffers, merge counts): the
conversion adds any the converter leaves out (ZeRO-3's) and ``restore_frozen_from_universal`` copies them in.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import full_state_dict, globbable, is_sharded
from .durable import fsync_path, fsync_tree, replace_durably
from .distributed import on_rank_zero

UNIVERSAL = "universal"
# DeepSpeed's converter needs this key in the checkpoint (Megatron-DeepSpeed sets it); set on the model.
UNIVERSAL_INFO = {"universal_checkpoint_version": 0.4}
# In a conversion of a checkpoint without ZeRO: each optimizer param group's Adam step (check_zero3_load).
GROUP_STEPS = "relora_group_steps"


def make_universal(ckpt_dir: Path, tag: str, param_groups: list[list[str]] | None = None) -> str:
    """Convert ``<tag>`` for any number of ranks (once; rank 0 converts, every rank waits) and return the tag
    to load it by. The conversion is written beside the checkpoint and renamed into it when complete.
    ``param_groups``: for a checkpoint without ZeRO, the parameter names in each optimizer param group of the
    engine that wrote it (its optimizer state names parameters only by their position there)."""
    src = Path(ckpt_dir) / tag
    out = src / UNIVERSAL

    def convert():
        if out.is_dir():
            return
        tmp = Path(ckpt_dir) / f".{tag}_{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if is_sharded(ckpt_dir, tag):
            with globbable(ckpt_dir) as plain:  # the converter globs in its input and output folders
                _ds_to_universal(plain / tag, plain / tmp.name)
        else:
            assert param_groups is not None, "a checkpoint without ZeRO converts only with its param groups' names"
            _unsharded_to_universal(src, tmp, param_groups)
        _add_frozen_tensors(Path(ckpt_dir), tag, tmp / "zero")
        fsync_tree(tmp)  # on disk before the rename says complete: a resume loads what is there
        os.replace(tmp, out)
        fsync_path(src)
        # DeepSpeed's converter named its output folder (the temporary one) in latest_universal, which
        # load_checkpoint(dir, load_universal=True) without a tag reads: name where it now is
        if (Path(ckpt_dir) / "latest_universal").exists():
            replace_durably(f"{tag}/{UNIVERSAL}", Path(ckpt_dir) / "latest_universal")

    if dist.is_initialized():
        on_rank_zero(convert)  # a failed conversion stops every rank, not only rank 0
    else:
        convert()
    return f"{tag}/{UNIVERSAL}"


# Python code that runs module argv[1] with the rest of argv, ignoring the stop signals a run turns into
# "finish, save, exit 0" (trainer.py). SLURM's `scancel --signal` reaches every process of the job step and a
# terminal's Ctrl-C the whole foreground group: a converter dying of it failed the resume, with no "preempted"
# record for the SLURM scripts to requeue on, where the trainer notes the signal and stops after the load.
# Ignored signals stay ignored in the converter's worker processes (fork and exec keep SIG_IGN). The converter
# leads its own process group, which it kills, workers included, once the trainer that started it is gone (a
# worker outliving its converter would block for ever on the work queue). ds_to_universal's ProcessPoolExecutor
# ends its workers with sentinels; a multiprocessing.Pool's terminate() relies on SIGTERM and can hang here.
_SHIELDED = ("import os, runpy, signal, sys, threading, time\n"
             "for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):\n"
             "    signal.signal(s, signal.SIG_IGN)\n"
             "parent = os.getppid()\n"
             "def watch():\n"
             "    while os.getppid() == parent:\n"
             "        time.sleep(0.5)\n"
             "    os.killpg(0, signal.SIGKILL)\n"
             "threading.Thread(target=watch, daemon=True).start()\n"
             "module = sys.argv.pop(1)\n"
             "runpy.run_module(module, run_name='__main__', alter_sys=True)\n")


def run_module_shielded(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module *args`` in a child that ignores SIGTERM, SIGUSR1 and SIGINT, in a process group of
    its own; output captured. An error here (a second Ctrl-C: KeyboardInterrupt) kills that group, the
    child's workers too; so does the child itself once this process is gone (killed by the OOM killer)."""
    proc = subprocess.Popen([sys.executable, "-c", _SHIELDED, module, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _ds_to_universal(src: Path, out: Path) -> None:
    proc = run_module_shielded("deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
                               "--output_folder", str(out))
    if proc.returncode != 0 or not (out / "zero").is_dir():
        hint = (" (written before relora_ds recorded universal_checkpoint_info: resume it with its own "
                "number of ranks)") if "universal_checkpoint_info" in proc.stderr else ""
        how = f"exit status {proc.returncode}"
        if proc.returncode < 0:
            how = f"killed by signal {-proc.returncode}"
            if -proc.returncode in {s.value for s in signal.Signals}:
                how = f"killed by {signal.Signals(-proc.returncode).name}"
        raise RuntimeError(f"converting {src} with deepspeed.checkpoint.ds_to_universal failed ({how}){hint}:\n"
                           f"{proc.stderr[-3000:]}")


def _unsharded_to_universal(src: Path, out: Path, param_groups: list[list[str]]) -> None:
    """Write a checkpoint without ZeRO (fp32: its parameters are the masters, and its torch optimizer's state
    lies whole in the module states file) in the layout ds_to_universal writes, which DeepSpeed's universal
    load reads into ZeRO-1/2 and ZeRO-3 engines alike: ``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`` per
    trainable parameter and ``zero/optimizer_state.pt`` with the param groups, in both the ZeRO-1/2 and the
    ZeRO-3 loader's form; and the module states without the optimizer, under both loaders' file names.
    ZeRO keeps one Adam step per param group; torch's AdamW one per parameter, equal within a group whenever
    every parameter had a gradient at every step (checked)."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM

    states = torch.load(src / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    optimizer, module = states.pop("optimizer"), states["module"]
    saved = [len(g["params"]) for g in optimizer["param_groups"]]
    if saved != [len(names) for names in param_groups]:
        raise ValueError(f"checkpoint {src}: its optimizer's param groups hold {saved} parameters, this run's model "
                         f"{[len(names) for names in param_groups]}: not a checkpoint of this model and phase")
    zero = out / "zero"
    groups, steps = [], []
    for names, group in zip(param_groups, optimizer["param_groups"]):
        group_steps = {float(optimizer["state"][i]["step"]) for i in group["params"] if i in optimizer["state"]}
        if len(group_steps) > 1:
            raise ValueError(f"checkpoint {src}: the Adam step counts within one param group differ "
                             f"({sorted(group_steps)}), which a ZeRO optimizer (one count per group) cannot hold")
        step = torch.tensor(group_steps.pop() if group_steps else 0.0)
        for name, index in zip(names, group["params"]):
            weight = module[name]
            # A parameter that never had a gradient has no state: zero moments, as Adam starts them.
            state = optimizer["state"].get(index) or {"exp_avg": torch.zeros_like(weight),
                                                       "exp_avg_sq": torch.zeros_like(weight)}
            if state["exp_avg"].shape != weight.shape:
                raise ValueError(f"checkpoint {src}: the optimizer state at {name}'s place has shape "
                                 f"{tuple(state['exp_avg'].shape)}, the parameter {tuple(weight.shape)}")
            (zero / name).mkdir(parents=True)
            for key, value in (("fp32", weight), ("exp_avg", state["exp_avg"]), ("exp_avg_sq", state["exp_avg_sq"])):
                torch.save({PARAM: value.float().contiguous()}, zero / name / f"{key}.pt")
            torch.save(step.clone(), zero / name / "step.pt")
        groups.append({k: v for k, v in group.items() if k != "params"})
        steps.append(step)
    # The ZeRO-1/2 loader reads each group's step from its parameters' step.pt; the ZeRO-3 loader takes this
    # one step and the first group's settings for every group (the trainer re-applies its settings on resume;
    # zero_reset.unshare_optimizer_steps gives each group its own counter), so GROUP_STEPS records them all
    # for check_zero3_load to refuse a ZeRO-3 load of groups whose counts differ.
    torch.save({"ds_version": states.get("ds_version"), "param_groups": groups, GROUP_STEPS: [float(s) for s in steps],
                OPTIMIZER_STATE_DICT: {"state": {0: {"step": steps[0].clone()}}, "param_groups": groups}},
               zero / "optimizer_state.pt")
    torch.save(states, out / "mp_rank_00_model_states.pt")
    os.link(out / "mp_rank_00_model_states.pt", out / "zero_pp_rank_0_mp_rank_00_model_states.pt")


def check_zero3_load(universal_dir: Path) -> None:
    """Refuse loading a conversion of a checkpoint without ZeRO (``_unsharded_to_universal``) into ZeRO-3 when
    its param groups' Adam steps differ: DeepSpeed's ZeRO-3 loader gives every group the first group's, which
    would bias-correct the others' moments by another step count. ZeRO-1/2 load each group's own."""
    optimizer_state = Path(universal_dir) / "zero" / "optimizer_state.pt"
    steps = torch.load(optimizer_state, map_location="cpu", weights_only=False).get(GROUP_STEPS, [])
    if len(set(steps)) > 1:
        raise ValueError(f"{universal_dir}: the checkpoint's optimizer param groups hold different Adam step counts "
                         f"({steps}); DeepSpeed's ZeRO-3 load gives every group one count, so it would bias-correct "
                         "the others' moments wrongly. Resume it with ZeRO stage 1 or 2 (or stage 0 as it was written)")


def _add_frozen_tensors(ckpt_dir: Path, tag: str, zero: Path) -> None:
    """ds_to_universal writes frozen parameters and buffers for ZeRO-1/2 but not for ZeRO-3 (where frozen
    parameters are saved as per-rank fragments): add whatever it left out."""
    for name, value in full_state_dict(ckpt_dir, tag).items():
        path = zero / name / "fp32.pt"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"param": value.contiguous()}, path)


@torch.no_grad()
def restore_frozen_from_universal(module: torch.nn.Module, universal_dir: Path) -> int:
    """Copy every frozen parameter and persistent buffer of ``module`` from a universal checkpoint's
    ``zero/<name>/fp32.pt``; returns how many tensors were restored. Under ZeRO-3 a partitioned parameter
    is gathered, written by rank 0 and re-partitioned."""
    zero = Path(universal_dir) / "zero"
    persistent = set(module.state_dict(keep_vars=True))
    frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
    buffers = [(n, b) for n, b in module.named_buffers() if n in persistent]
    missing = [n for n, _ in frozen + buffers if not (zero / n / "fp32.pt").is_file()]
    if missing:
        raise RuntimeError(f"universal checkpoint {universal_dir} lacks {len(missing)} frozen tensor(s), e.g. "
                           f"{missing[:3]}: convert it again (delete the folder) or resume with the original ranks")
    for name, tensor in frozen + buffers:
        value = torch.load(zero / name / "fp32.pt", weights_only=False)["param"]
        if hasattr(tensor, "ds_id"):  # ZeRO-3 partitioned parameter
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
                if (dist.get_rank() if dist.is_initialized() else 0) == 0:
                    tensor.copy_(value.view(tensor.shape))
        else:
            tensor.copy_(value.view(tensor.shape))
    return len(frozen) + len(buffers)
