"""What scripts/demo.sh launches, from its extra flags: prints the run's output_dir, then `--overwrite` when
the demo should start over in it (no --resume/--resume-from, no --overwrite/--no-overwrite and no
--output-dir of the user's: a run there is never deleted without an explicit --overwrite)."""
import sys
import warnings

from relora_ds.train_config import build_launch_parser, config_from_args

RECIPE = "launch/configs/tiny.yaml"


def plan(argv: list[str], recipe: str = RECIPE) -> tuple[str, list[str]]:
    """(output_dir, the flags demo.sh adds) for ``launch/train.py --config recipe *argv``."""
    parser = build_launch_parser()
    args, _ = parser.parse_known_args(["--config", recipe, *argv])  # unknown flags: train.py names them
    with warnings.catch_warnings():  # train.py warns about the recipe; once is enough
        warnings.simplefilter("ignore")
        cfg = config_from_args(args)
    extra = [] if cfg.resume or args.overwrite is not None or args.output_dir is not None else ["--overwrite"]
    return cfg.output_dir, extra


if __name__ == "__main__":
    try:
        out, extra = plan(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(out)
    print(" ".join(extra))
