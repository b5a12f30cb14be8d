"""Check a training command line for a given world size before any rank starts.

    python launch/preflight.py --world-size 16 --config launch/configs/paper_1b.yaml --deepspeed ds_configs/zero2.json

Reads the arguments as launch/train.py does (recipe, CLI overrides, DeepSpeed JSON) and completes the
DeepSpeed config for that world size with the trainer's own code, so the same batch arithmetic and
one-home-per-value checks run, once, on the launching node: a bad recipe fails in seconds with one
message instead of once per rank after every node has imported torch. It also checks what fails every
rank at start-up: the model preset (or Hugging Face directory), a given data dir, target_modules, the LR
schedule, the kernels setting, and an output_dir holding another run without --resume or --overwrite.
Prints a summary on stderr and the resolved output directory on stdout (the sbatch scripts read it to
find metrics.jsonl); exit 2 on error.
"""
import sys

from relora_ds.data import load_manifest
from relora_ds.ds_config import complete_ds_config, load_ds_config, zero_stage
from relora_ds.startup import (apply_kernels_setting, build_schedule, check_model_and_data, check_output_dir,
                               total_steps_for)
from relora_ds.train_config import (BUILTIN_VOCAB_SIZE, build_launch_parser, config_from_args,
                                   show_config_warnings_plainly)


def main(argv=None) -> int:
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
        check_model_and_data(cfg, cfg.data_dir, vocab)
        build_schedule(cfg, total_steps_for(cfg))
        apply_kernels_setting(cfg.kernels)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    stage = zero_stage(ds)
    print(f"preflight: {args.world_size} rank(s) x micro_batch_size {cfg.micro_batch_size} x "
          f"{ds['gradient_accumulation_steps']} accumulation step(s) = global_batch_size {cfg.global_batch_size}; "
          f"model {cfg.hf_model or cfg.model}, ZeRO stage {stage}, {total_steps_for(cfg)} steps, data "
          f"{cfg.data_dir or 'the built-in demo corpus'}, output_dir {cfg.output_dir}", file=sys.stderr)
    print(cfg.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
