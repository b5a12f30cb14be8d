"""An option given twice on a command line (relora_ds.train_args.ArgumentParser, the parser of launch/train.py,
preflight.py, prepare_data.py, export.py and scripts/demo_plan.py): argparse keeps the last value silently,
so ``--lr 0.001 ... --lr 0.005`` trained at 0.005 without a word, and ``--target-modules q_proj k_proj
--target-modules v_proj`` wrapped v_proj alone. Different values are now said (a ConfigWarning naming each use;
the last still counts, as a wrapper script's override relies on); the same value twice is not; a list option
collects the values of each use."""
import subprocess
import sys
import warnings

import pytest

from launch_utils import ROOT

from relora_ds.train_args import build_launch_parser, config_from_args
from relora_ds.train_config import ConfigWarning


def _parse(argv):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        args = build_launch_parser().parse_args(argv)
    return args, [str(w.message) for w in seen if issubclass(w.category, ConfigWarning)]


@pytest.mark.parametrize("argv, dest, last, named", [
    (["--lr", "0.001", "--total-steps", "4", "--lr", "0.005"], "lr", 0.005, "--lr 0.001 and --lr 0.005"),
    (["--lr=0.001", "--lr", "0.005"], "lr", 0.005, "--lr 0.001 and --lr 0.005"),
    (["--resume", "--no-resume"], "resume", False, "--resume and --no-resume"),
    (["--config", "a.yaml", "--config", "b.yaml"], "config", "b.yaml", "--config a.yaml and --config b.yaml"),
    (["--local_rank", "0", "--local-rank", "1"], "local_rank", 1, "--local_rank 0 and --local-rank 1"),
    (["--seed", "1", "--seed", "2", "--seed", "3"], "seed", 3, "--seed 1 and --seed 2 and --seed 3"),
])
def test_different_values_are_said_naming_each_and_the_last_counts(argv, dest, last, named):
    args, said = _parse(argv)
    assert getattr(args, dest) == last
    assert said == [f"{named}: the same option given {named.count(' and ') + 1} times with different values; the "
                    f"last, {named.rpartition(' and ')[2]}, counts"], said


def test_a_list_option_given_twice_collects_both():
    args, said = _parse(["--target-modules", "q_proj", "k_proj", "--lr", "1", "--target-modules", "v_proj"])
    assert args.target_modules == ["q_proj", "k_proj", "v_proj"] and said == []


@pytest.mark.parametrize("argv", [
    ["--lr", "0.001", "--lr", "0.001"],
    ["--lr", "1e-3", "--lr", "0.001"],  # one value, as argparse stores it
    ["--lr=0.001", "--lr", "0.001"],
    ["--resume", "--resume"],
])
def test_the_same_value_twice_is_not_said(argv):
    args, said = _parse(argv)
    assert args.lr in (None, 0.001) and args.resume in (None, True) and said == []


def test_values_are_read_as_argparse_reads_them():
    """A negative number is a value, not an option; a list ends at the next option."""
    args, said = _parse(["--adam-eps", "-1", "--target-modules", "q_proj", "--lr", "2", "--adam-eps", "-1"])
    assert (args.adam_eps, args.target_modules, args.lr, said) == (-1.0, ["q_proj"], 2.0, [])
    with pytest.raises(ValueError, match="adam_eps"):  # refused by the config, not lost by the parser
        config_from_args(args)


def test_prepare_data_collects_every_input_given():
    """prepare_data.py's --input, --val-input and --mix collect the values of each use (--input a --input b
    read b alone)."""
    sys.path.insert(0, str(ROOT / "launch"))
    import prepare_data

    args = prepare_data.parse_args(["--input", "a.txt", "b.txt", "--out", "o", "--input", "c.txt",
                                    "--val-input", "v1.txt", "--val-input", "v2.txt"])
    assert args.input == ["a.txt", "b.txt", "c.txt"] and args.val_inputs == ["v1.txt", "v2.txt"]
    assert prepare_data.parse_args(["--mix", "x:1", "--mix", "y:2", "--out", "o"]).mix == ["x:1", "y:2"]
    assert prepare_data.parse_args(["--out", "o", "--text-column", "body", "--text-column", "title"]).text_column \
        == ["body", "title"]
    assert prepare_data.parse_args(["--out", "o"]).text_column == ["text"]  # the default, replaced when given
    assert prepare_data.parse_args(["--out", "o", "--text-column", "body"]).text_column == ["body"]
    with pytest.warns(ConfigWarning, match="--out o and --out p: the same option given 2 times"):
        assert prepare_data.parse_args(["--input", "a.txt", "--out", "o", "--out", "p"]).out == "p"


def test_demo_passes_the_users_recipe_once():
    """scripts/demo.sh adds its own --config, --deepspeed: the user's, where given (the same value twice is not
    said), rather than tiny.yaml followed by the user's recipe."""
    for config in (["--config", "launch/configs/paper_60m.yaml"], ["--config=launch/configs/paper_60m.yaml"]):
        proc = subprocess.run([sys.executable, "scripts/demo_plan.py", *config, "--deepspeed", "ds_configs/zero3.json"],
                              cwd=ROOT, capture_output=True, text=True, check=True)
        assert proc.stdout.split("\n")[:4] == ["runs/paper-60m", "", "ds_configs/zero3.json",
                                               "launch/configs/paper_60m.yaml"]
        assert "same option" not in proc.stderr, proc.stderr
    # a real repeat is train.py's to say once, not demo_plan's on each of its parses
    proc = subprocess.run([sys.executable, "scripts/demo_plan.py", "--seed", "1", "--seed", "2"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert "same option" not in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "scripts/demo_plan.py", "--total-steps", "500"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert proc.stdout.split("\n")[3] == "launch/configs/tiny.yaml"
