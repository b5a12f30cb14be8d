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
GPUs, so those two are left to the ranks. Prints a summary on stderr and the resolved output directory on stdout (the sbatch scripts read it to
find metrics.jsonl); exit 2 on error.
"""
import contextlib
import os
import sys
from pathlib import Path

from relora_ds import checkpoint
from relora_ds.data import builtin_data_dir, load_manifest
from relora_ds.data.mixture import check_members, is_mixture
from relora_ds.data.manifest import read_manifest_file
from relora_ds.ds_config import complete_ds_config, load_ds_config, zero_stage
from relora_ds.startup import (apply_kernels_setting, build_schedule, check_compile, check_data_use, check_kernels,
                               check_model_and_data, check_offload_on_device, check_output_dir,
                               check_precision_on_device, total_steps_for, train_data_record)
from relora_ds.train_args import build_launch_parser, config_from_args
from relora_ds.train_config import BUILTIN_VOCAB_SIZE, show_config_warnings_plainly


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
    args = parser.parse_args(argv)
    if args.world_size < 1:
        parser.exit(2, f"error: --world-size must be >= 1, got {args.world_size}\n")
    try:
        cfg = config_from_args(args)
        check_output_dir(cfg)
        ds = complete_ds_config(load_ds_config(args.deepspeed), cfg, args.world_size,
                                source=f"--deepspeed {args.deepspeed}" if args.deepspeed else "default")
        vocab = load_manifest(cfg.data_dir)["vocab_size"] if cfg.data_dir else cfg.vocab_size or BUILTIN_VOCAB_SIZE
        # The built-in corpus is checked as the trainer will once it is prepared (the ranks prepare it).
        data_dir = Path(cfg.data_dir) if cfg.data_dir else builtin_data_dir(vocab)
        prepared = cfg.data_dir or read_manifest_file(data_dir) is not None
        model_config, _ = check_model_and_data(cfg, data_dir if prepared else None, vocab)
        total_steps = total_steps_for(cfg, checkpoint.resume_progress(Path(cfg.output_dir) / "checkpoints",
                                                                      cfg.resume_from)
                                      if cfg.resume and cfg.token_budget else None)
        build_schedule(cfg, total_steps)
        apply_kernels_setting(cfg.kernels)
        if os.environ.get("DS_ACCELERATOR"):  # what the ranks will run on (see above)
            check_kernels(cfg, os.environ["DS_ACCELERATOR"] == "cuda")
            check_compile(cfg, os.environ["DS_ACCELERATOR"] == "cuda")
            from deepspeed.accelerator import get_accelerator
            check_precision_on_device(ds, get_accelerator())
            check_offload_on_device(ds, get_accelerator(), cfg.quantize)
        # The built-in corpus may not be prepared yet: then its size, tokenizer and fingerprint are not checked.
        manifest = read_manifest_file(data_dir)
        if manifest is not None:  # a split too small for a window or a global batch at this world size
            if is_mixture(manifest):  # its members still hold the data it was made of
                check_members(data_dir, manifest)
            check_data_use(cfg, total_steps, manifest["splits"], str(data_dir), args.world_size)
        if cfg.resume:  # as the trainer plans it
            cfg.vocab_size = vocab
            checkpoint.plan_resume(Path(cfg.output_dir) / "checkpoints", model=model_config.to_dict(),
                                   train=cfg.to_dict(), ds=ds, world=args.world_size, data_dir=data_dir,
                                   tokenizer_sha256=manifest["tokenizer_sha256"] if manifest else None,
                                   total_steps=total_steps,
                                   data=train_data_record(manifest, cfg.seq_len) if manifest else None)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    stage = zero_stage(ds)
    print(f"preflight: {args.world_size} rank(s) x micro_batch_size {cfg.micro_batch_size} x "
          f"{ds['gradient_accumulation_steps']} accumulation step(s) = global_batch_size {cfg.global_batch_size}; "
          f"model {cfg.hf_model or cfg.warm_start_from or cfg.model}, ZeRO stage {stage}, {total_steps} steps, data "
          f"{cfg.data_dir or 'the built-in demo corpus'}, output_dir {cfg.output_dir}", file=sys.stderr)
    return cfg.output_dir


if __name__ == "__main__":
    sys.exit(main())
