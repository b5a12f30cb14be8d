"""Check a training command line for a given world size before any rank starts.

    python launch/preflight.py --world-size 16 --config launch/configs/paper_1b.yaml --deepspeed ds_configs/zero2.json

Reads the arguments as launch/train.py does (recipe, CLI overrides, DeepSpeed JSON) and completes the
DeepSpeed config for that world size with the trainer's own code, so the same batch arithmetic and
one-home-per-value checks run, once, on the launching node: a bad recipe fails in seconds with one
message instead of once per rank after every node has imported torch. It also checks what fails every
rank at start-up: the model preset (or Hugging Face directory), a given data dir, target_modules, the LR
schedule, the kernels setting, a prepared training split too small for one window or one global batch at
this world size (and validation that cannot run), an output_dir holding another run without --resume or
--overwrite, and with --resume whether the run can load its checkpoint (settings a resume cannot change,
another model, tokenizer or training data, a ZeRO stage or world-size change DeepSpeed cannot make). With DS_ACCELERATOR set (as
scripts/setup_env.sh does), what the ranks will run on is known here too: kernels=triton without CUDA and
fp16 on DeepSpeed's CPU accelerator are refused; without it the launching node may lack the compute nodes'
GPUs, so those two are left to the ranks. It prints the estimated peak memory per GPU of each phase left (warm
start, ReLoRA; relora_ds/memory.py's model on the run's own model, counted on a meta-device copy) and, with
--gpu-memory-gb, refuses a run that exceeds it, naming the largest micro_batch_size that fits; without it, a
GPU on this node is compared with, as a warning only. Prints a summary on stderr and the resolved output directory on stdout (the sbatch scripts read it to
find metrics.jsonl); exit 2 on error.
"""
import contextlib
import math
import os
import sys
import warnings
from pathlib import Path

from relora_ds.data import builtin_data_dir, load_manifest
from relora_ds.data.mixture import check_members, is_mixture
from relora_ds.data.manifest import read_manifest_file
from relora_ds.ds_config import complete_ds_config, load_ds_config, zero_stage
from relora_ds.ds_machine import check_nvme_swap_buffers, check_offload_on_device, check_precision_on_device
from relora_ds.output_dir import check_output_dir
from relora_ds.resume_plan import nothing_to_resume, plan_resume, resume_progress
from relora_ds.schedule import total_steps_for
from relora_ds.shm_comm import check_op_build_dir
from relora_ds.startup import (apply_kernels_setting, build_schedule, check_compile, check_data_use,
                               check_document_masking, check_kernels, check_model_and_data, train_data_record,
                               unused_vocab_size)
from relora_ds.train_args import build_launch_parser, config_from_args
from relora_ds.train_config import BUILTIN_VOCAB_SIZE, ConfigWarning, show_config_warnings_plainly

from cli_types import tolerant_stdout  # launch/, the script's directory


def main(argv=None) -> int:
    # stdout carries the output dir alone (the sbatch scripts read it); DeepSpeed, imported on the way by the
    # config checks, logs to stdout: its logger, created inside this block, writes to stderr instead.
    with contextlib.redirect_stdout(sys.stderr):
        out = _check(argv)
    print(out)
    return 0


def _check(argv) -> str:
    show_config_warnings_plainly()
    parser = build_launch_parser(__doc__)  # exactly launch/train.py's flags, plus the world size
    parser.add_argument("--world-size", type=int, required=True, help="ranks the launcher will start")
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="memory per GPU (GB, 1e9 bytes): refuse a run whose estimated peak per GPU exceeds it "
                             "less a reserve of 10%% + 2 GiB (relora_ds/memory.py's model); without it the "
                             "estimate is printed, and compared with this node's first GPU where it has one")
    args = parser.parse_args(argv)
    if args.world_size < 1:
        parser.exit(2, f"error: --world-size must be >= 1, got {args.world_size}\n")
    if args.gpu_memory_gb is not None and not 0 < args.gpu_memory_gb < math.inf:  # inf: "nan GB usable"
        parser.exit(2, f"error: --gpu-memory-gb must be a positive finite number, got {args.gpu_memory_gb:g}\n")
    try:
        cfg = config_from_args(args)
        check_output_dir(cfg)
        ds = complete_ds_config(load_ds_config(args.deepspeed), cfg, args.world_size,
                                source=f"--deepspeed {args.deepspeed}" if args.deepspeed else "default")
        vocab = load_manifest(cfg.data_dir)["vocab_size"] if cfg.data_dir else cfg.vocab_size or BUILTIN_VOCAB_SIZE
        if unused := unused_vocab_size(cfg, vocab):
            warnings.warn(unused, ConfigWarning, stacklevel=1)
        # The built-in corpus is checked as the trainer will once it is prepared (the ranks prepare it).
        data_dir = Path(cfg.data_dir) if cfg.data_dir else builtin_data_dir(vocab)
        prepared = cfg.data_dir or read_manifest_file(data_dir) is not None
        model_config, _ = check_model_and_data(cfg, data_dir if prepared else None, vocab)
        check_nvme_swap_buffers(cfg, ds, model_config, args.world_size)
        progress = resume_progress(Path(cfg.output_dir) / "checkpoints", cfg.resume_from) \
            if cfg.resume else None
        total_steps = total_steps_for(cfg, progress if cfg.token_budget else None)
        if not cfg.resume:  # a resume's once its checkpoint's cycles are known (below), as the trainer builds it
            build_schedule(cfg, total_steps)
        apply_kernels_setting(cfg.kernels)
        if os.environ.get("DS_ACCELERATOR"):  # what the ranks will run on (see above)
            check_kernels(cfg, os.environ["DS_ACCELERATOR"] == "cuda")
            check_compile(cfg, os.environ["DS_ACCELERATOR"] == "cuda")
            from deepspeed.accelerator import get_accelerator
            check_precision_on_device(ds, get_accelerator())
            check_offload_on_device(ds, get_accelerator(), cfg.quantize)
            check_op_build_dir(get_accelerator())
        # The built-in corpus may not be prepared yet: then its size, tokenizer and fingerprint are not checked.
        manifest = read_manifest_file(data_dir)
        if manifest is not None:  # a split too small for a window or a global batch at this world size
            if is_mixture(manifest):  # its members still hold the data it was made of
                check_members(data_dir, manifest)
            check_data_use(cfg, total_steps, manifest["splits"], str(data_dir), args.world_size)
            check_document_masking(cfg, manifest, data_dir)
        if cfg.resume:  # as the trainer plans it
            cfg.vocab_size = vocab
            ckpt_dir = Path(cfg.output_dir) / "checkpoints"
            plan = plan_resume(ckpt_dir, model=model_config.to_dict(), train=cfg.to_dict(), ds=ds,
                               world=args.world_size, data_dir=data_dir, total_steps=total_steps,
                               tokenizer_sha256=manifest["tokenizer_sha256"] if manifest else None,
                               data=train_data_record(manifest, cfg.seq_len) if manifest else None)
            if plan is None:
                warnings.warn(nothing_to_resume(ckpt_dir), ConfigWarning, stacklevel=1)
            from relora_ds.resume import resumed_cycles

            build_schedule(cfg, total_steps, cfg.warm_start_steps if plan is None else
                           resumed_cycles(plan, cfg, cfg.warm_start_steps)[0])
        memory = memory_summary(model_config, cfg, ds, args.world_size, args.gpu_memory_gb,
                                progress["step"] if progress else 0)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    stage = zero_stage(ds)
    print(f"preflight: {args.world_size} rank(s) x micro_batch_size {cfg.micro_batch_size} x "
          f"{ds['gradient_accumulation_steps']} accumulation step(s) = global_batch_size {cfg.global_batch_size}; "
          f"model {cfg.hf_model or cfg.warm_start_from or cfg.model}, ZeRO stage {stage}, {total_steps} steps, data "
          f"{cfg.data_dir or 'the built-in demo corpus'}, output_dir {cfg.output_dir}", file=sys.stderr)
    print(f"preflight: {memory}", file=sys.stderr)
    return cfg.output_dir


def _local_gpu_gb() -> float | None:
    """This node's first GPU's memory (GB) from nvidia-smi (no CUDA context in this process), or None: no
    NVIDIA GPU or driver here (the launching node may have none), or DS_ACCELERATOR=cpu."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if os.environ.get("DS_ACCELERATOR") == "cpu" or smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits", "--id=0"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return float(out.split()[0]) * 2**20 / 1e9  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _advice(cfg, ds: dict, low_rank: bool, states_only: bool = False) -> str:
    """What else would lower the peak, among what the run does not do yet (``states_only``: of the states)."""
    from relora_ds.ds_schema import optimizer_offload
    steps = []
    if not states_only:
        if not cfg.activation_checkpointing:
            steps.append("--activation-checkpointing (selective or full)")
        elif cfg.activation_checkpointing_policy == "selective" or cfg.activation_checkpointing_layers:
            steps.append("--activation-checkpointing-policy full on every layer")
        if not cfg.loss_chunk_size:
            steps.append("--loss-chunk-size 1024")
    if zero_stage(ds) < 3:
        steps.append("a higher ZeRO stage")
    if low_rank and not cfg.quantize:
        steps.append("--quantize int8")
    if not optimizer_offload(ds):
        steps.append("optimizer offload (ds_configs/zero2_offload.json, zero3_offload.json)")
    steps.append("more GPUs")
    return ", ".join(steps)


def memory_summary(model_config, cfg, ds: dict, world_size: int, gpu_memory_gb: float | None,
                   start_step: int = 0) -> str:
    """The estimated peak memory per GPU of each phase the run has left from ``start_step`` (a resume's), as a
    line. Over ``gpu_memory_gb`` (less the reserve) a ValueError naming the largest micro_batch_size that fits;
    over the memory of this node's GPU (no ``gpu_memory_gb`` given) a warning line only: the launching node's
    GPU may not be the ranks'."""
    from relora_ds import memory

    phases = memory.run_phases(model_config, cfg, ds, world_size, start_step)
    if isinstance(phases, str):
        unchecked = "; warning: --gpu-memory-gb is not checked" if gpu_memory_gb is not None else ""
        return f"memory per GPU not estimated: {phases}{unchecked}"

    def size(b):
        return f"{b / 1e9:.1f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"

    parts = [f"{p['phase']} {size(p['states'] + p['activations'])} (states {size(p['states'])} + activations "
             f"{size(p['activations'])})" for p in phases]
    line = (f"estimated peak memory per GPU at micro_batch_size {cfg.micro_batch_size}: {', '.join(parts)} "
            "(relora_ds/memory.py's model, without the CUDA context and buffers)")
    memory_gb, given = (gpu_memory_gb, True) if gpu_memory_gb is not None else (_local_gpu_gb(), False)
    if memory_gb is None:
        return line
    flag = "--gpu-memory-gb" if given else "this node's GPU of"
    try:
        budget = memory.usable_bytes(memory_gb, flag=flag)
    except ValueError as e:
        if given:
            raise
        return f"{line}; warning: not compared with this node's GPU ({e})"
    over = [p for p in phases if not p["fits"](cfg.micro_batch_size, budget)]
    if not over:
        return f"{line}; fits {flag} {memory_gb:g} ({budget / 1e9:.1f} GB usable)"
    per_rank = cfg.global_batch_size // world_size
    fitting = memory.largest_fitting_micro_batch(per_rank, lambda m: all(p["fits"](m, budget) for p in phases))
    names = " and ".join(p["phase"] for p in over)
    states_only = all(p["activations"] == 0 for p in over)  # a phase loaded and left without a step
    advice = (f"the largest micro_batch_size that fits is {fitting} (a divisor of global_batch_size "
              f"{cfg.global_batch_size} / {world_size} ranks; gradient accumulation keeps the global batch)"
              if fitting else "no micro_batch_size helps: the phase holds its states only" if states_only
              else "no micro_batch_size fits")
    low_rank = any(p["phase"] in ("ReLoRA", "LoRA") for p in over)
    message = (f"{line}: the {names} phase{'s exceed' if len(over) > 1 else ' exceeds'} {flag} {memory_gb:g} "
               f"({budget / 1e9:.1f} GB usable after a reserve of 10% + 2 GiB); {advice}; other ways down: "
               f"{_advice(cfg, ds, low_rank, states_only)}")
    if given:
        raise ValueError(message)
    return f"warning: {message}"


if __name__ == "__main__":
    tolerant_stdout()
    sys.exit(main())
