"""argparse types the launch scripts share: a bad number is a parse error naming the flag and the value."""
import argparse
import math
import os
import sys
from pathlib import Path


def positive_int(text: str) -> int:
    value = int(text)  # argparse turns a ValueError into "invalid positive_int value: 'x'"
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def user_path(text: str) -> Path:
    """A path argument; a leading ~ is the home directory, as in the trainer's and prepare_data.py's paths (the
    shell expands no ~ after '=', as in --out=~/x, nor in a quoted or scripted argument)."""
    return Path(text).expanduser()


def check_writable(ap: argparse.ArgumentParser, flag: str, path: Path) -> None:
    """An output ``path`` this user cannot write (or create, with its missing folders) is a parse error naming
    the folder, before any work: it was a PermissionError traceback after the checkpoint was read or the
    evaluation done (whose result was then lost)."""
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | (os.X_OK if existing.is_dir() else 0)):
        ap.error(f"{flag} {path}: {existing} is not writable by this user; give another {flag}")


def tolerant_stdout() -> None:
    """stdout writes a character its encoding lacks as a backslash escape, as Python's stderr does: under
    LC_ALL=C with PYTHONUTF8=0, PYTHONIOENCODING=ascii or a Latin-1 locale, a '·' in a --help text or a
    non-ASCII path in a progress line raised UnicodeEncodeError (a run died at its first evaluation)."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; each option's help ends with its default, unless the default is None or
    False (nothing to say), the help already names one, or the option is a switch taking no value (a
    store_false's True is not its destination's default: ``--no-streaming`` said "default: True" beside
    ``--streaming``'s automatic default)."""

    def _get_help_string(self, action):
        help_ = action.help or ""
        default = action.default
        if (action.option_strings and action.nargs != 0 and default is not None and default is not False
                and default != argparse.SUPPRESS and "default" not in help_):
            help_ += " (default: %(default)s)"
        return help_
