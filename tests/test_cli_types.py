"""launch/cli_types.py: the launch tools' shared argparse types and help format."""
import argparse
import sys

import pytest

from launch_utils import ROOT

sys.path.insert(0, str(ROOT / "launch"))
from cli_types import DefaultsHelpFormatter, positive_float, positive_int  # noqa: E402


def test_help_shows_each_default_once_and_no_none():
    """An option's help ends with its default unless the default is None or False, or the text names one
    already (the trainer-style "(default: None)" after a help saying "default 2048" was the audit's find)."""
    p = argparse.ArgumentParser(prog="tool", formatter_class=DefaultsHelpFormatter, description="Line one.\n  kept")
    p.add_argument("--gpus", type=positive_int, default=8, help="ranks")
    p.add_argument("--reserve", default=None, help="GiB kept free")
    p.add_argument("--vocab", default=None, help="rows (default 2048 with the built-in corpus)")
    p.add_argument("--chunk", type=int, default=0, help="tokens per chunk (0: off)")
    p.add_argument("--flag", action="store_true", help="a switch")
    p.add_argument("--no-flag", dest="flag", action="store_false", help="the switch off")  # no "default: True"
    p.add_argument("--presets", nargs="+", default=["tiny", "60m"], help="models")
    p.add_argument("--rank", type=int, default=128, help="LoRA rank (default 128; 32 for tiny)")
    text = " ".join(p.format_help().split())
    assert "ranks (default: 8)" in text and "(0: off) (default: 0)" in text
    assert "models (default: ['tiny', '60m'])" in text
    assert "default: None" not in text and "default: False" not in text and "default: True" not in text
    assert "(default 128; 32 for tiny)" in text and "(default: 128)" not in text
    assert text.count("default") == 5  # gpus, chunk, presets, and vocab's and rank's own words
    assert "Line one.\n  kept" in p.format_help()  # the description as written


@pytest.mark.parametrize("parse, text, error", [(positive_int, "0", "must be a positive whole number, got 0"),
                                                (positive_int, "-3", "must be a positive whole number, got -3"),
                                                (positive_float, "nan", "must be a positive finite number, got nan"),
                                                (positive_float, "inf", "must be a positive finite number, got inf"),
                                                (positive_float, "0.0", "must be a positive finite number, got 0.0")])
def test_positive_types_name_the_bad_value(parse, text, error):
    with pytest.raises(argparse.ArgumentTypeError, match=error):
        parse(text)
    assert parse("2") == 2
