"""An option given twice on a command line (relora_ds.train_args.ArgumentParser, the parser of launch/train.py,
preflight.py, prepare_data.py, export.py and scripts/demo_plan.py): argparse keeps the last value silently,
so ``--lr 0.001 ... --lr 0.005`` trained at 0.005 and ``--target-modules q_proj k_proj --target-modules
v_proj`` wrapped v_proj alone, without a word. Different values are an error naming both; the same value
twice passes (a wrapper's own flag repeated by its user); a flag meant to repeat collects every value."""
import subprocess
import sys

import pytest

from launch_utils import ROOT

from relora_ds.train_args import build_launch_parser, config_from_args


def _refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_launch_parser().parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("argv, named", [
    (["--lr", "0.001", "--total-steps", "4", "--lr", "0.005"], "--lr 0.001 and --lr 0.005"),
    (["--lr=0.001", "--lr", "0.005"], "--lr 0.001 and --lr 0.005"),
    (["--resume", "--no-resume"], "--resume and --no-resume"),
    (["--config", "a.yaml", "--config", "b.yaml"], "--config a.yaml and --config b.yaml"),
    (["--local_rank", "0", "--local-rank", "1"], "--local_rank 0 and --local-rank 1"),  # one option, two spellings
    (["--seed", "1", "--seed", "2", "--seed", "3"], "--seed 1 and --seed 2 and --seed 3"),
])
def test_different_values_are_refused_naming_each(argv, named, capsys):
    err = _refused(argv, capsys)
    assert f"error: {named}: " in err, err
    assert "only the last would count: give it once" in err


def test_a_list_given_twice_says_a_list_takes_its_values_after_one_flag(capsys):
    err = _refused(["--target-modules", "q_proj", "k_proj", "--target-modules", "v_proj"], capsys)
    assert "--target-modules q_proj k_proj and --target-modules v_proj" in err
    assert "a list takes all its values after one flag, e.g. --target-modules a b" in err


@pytest.mark.parametrize("argv", [
    ["--lr", "0.001", "--lr", "0.001"],
    ["--lr=0.001", "--lr", "0.001"],
    ["--resume", "--resume"],
    ["--target-modules", "q_proj", "v_proj", "--seed", "3", "--target-modules", "q_proj", "v_proj"],
])
def test_the_same_value_twice_passes(argv):
    args = build_launch_parser().parse_args(argv)
    assert args.lr in (None, 0.001) and args.resume in (None, True)


def test_values_are_read_as_argparse_reads_them():
    """A negative number is a value, not an option; a list ends at the next option."""
    args = build_launch_parser().parse_args(["--adam-eps", "-1", "--target-modules", "q_proj", "--lr", "2"])
    assert (args.adam_eps, args.target_modules, args.lr) == (-1.0, ["q_proj"], 2.0)
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
    with pytest.raises(SystemExit):  # one output: a second --out is still refused
        prepare_data.parse_args(["--input", "a.txt", "--out", "o", "--out", "p"])


def test_demo_passes_the_users_recipe_once():
    """scripts/demo.sh adds its own --config, --deepspeed: the user's, where given (the same value twice is
    allowed), so a user's recipe is not refused as a second --config."""
    proc = subprocess.run([sys.executable, "scripts/demo_plan.py", "--config", "launch/configs/paper_60m.yaml",
                           "--deepspeed", "ds_configs/zero3.json"], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    assert proc.stdout.split("\n")[:4] == ["runs/paper-60m", "", "ds_configs/zero3.json",
                                           "launch/configs/paper_60m.yaml"]
    proc = subprocess.run([sys.executable, "scripts/demo_plan.py", "--total-steps", "500"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert proc.stdout.split("\n")[3] == "launch/configs/tiny.yaml"
