"""What scripts/demo.sh launches, from its extra flags: prints the run's output_dir, then `--overwrite` when
the demo should start over in it (no --resume/--resume-from, no --overwrite/--no-overwrite, and the output_dir is the demo recipe's own:
a run elsewhere, named by --output-dir or by another --config, is never deleted without an explicit
--overwrite), then the DeepSpeed config: the one given by --deepspeed, else ds_configs/zero2.json (bf16), or
ds_configs/zero2_fp32.json on a machine without a GPU whose CPU has no native bf16 matmul (there PyTorch's
bf16 fallback made the demo 12x slower than fp32: 370 vs 4,500 tokens/s on 2 cores), then the recipe: the
one given by --config, else the demo's tiny.yaml. Recipe warnings (a flag given twice, ...) are train.py's to
say, once: not repeated here."""
import sys
import warnings
from pathlib import Path

from relora_ds.train_args import build_launch_parser, config_from_args

RECIPE = "launch/configs/tiny.yaml"


def recipe(argv: list[str]) -> str:
    """The recipe demo.sh passes: the user's --config, else the demo's own."""
    return build_launch_parser().parse_known_args(argv)[0].config or RECIPE


def plan(argv: list[str]) -> tuple[str, list[str]]:
    """(output_dir, the flags demo.sh adds) for ``launch/train.py --config recipe(argv) *argv``."""
    parser = build_launch_parser()
    args, _ = parser.parse_known_args(["--config", recipe(argv), *argv])  # unknown flags: train.py names them
    with warnings.catch_warnings():  # train.py warns about the recipe; once is enough
        warnings.simplefilter("ignore")
        cfg = config_from_args(args)
    own = _output_dir(RECIPE)  # the demo's own runs/tiny: the only run it may start over without being told
    mine = Path(cfg.output_dir).resolve() == own
    extra = ["--overwrite"] if mine and not cfg.resume and args.overwrite is None else []
    return cfg.output_dir, extra


def ds_config(argv: list[str]) -> str:
    """The DeepSpeed JSON for the demo: --deepspeed if given, else bf16 where this machine computes it natively."""
    args, _ = build_launch_parser().parse_known_args(argv)
    if args.deepspeed:
        return args.deepspeed
    import torch

    from relora_ds.ds_machine import cpu_has_native_bf16
    if torch.cuda.is_available() or cpu_has_native_bf16():
        return "ds_configs/zero2.json"
    print(f"demo: this machine has no GPU and its CPU no native bf16 matmul (PyTorch sees "
          f"{torch.backends.cpu.get_cpu_capability()}): the demo trains in fp32 (ds_configs/zero2_fp32.json); "
          "--deepspeed ds_configs/zero2.json forces bf16", file=sys.stderr)
    return "ds_configs/zero2_fp32.json"


def _output_dir(path: str) -> Path:
    parser = build_launch_parser()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Path(config_from_args(parser.parse_args(["--config", path])).output_dir).resolve()


if __name__ == "__main__":
    from relora_ds.train_config import ConfigWarning

    warnings.simplefilter("ignore", ConfigWarning)  # train.py says them; each parse here would repeat them
    try:
        out, extra = plan(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(out)
    print(" ".join(extra))
    print(ds_config(sys.argv[1:]))
    print(recipe(sys.argv[1:]))
