"""launch/train.py's command line: a YAML recipe (``--config``) and one flag per TrainConfig field, read into
a TrainConfig (defaults < recipe < flags). launch/preflight.py and the benchmarks read the same flags."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import typing
import warnings
from pathlib import Path

import yaml

from .schedule import total_steps_for
from .config_values import bare_type, coerce_value
from .train_config import ConfigWarning, TrainConfig


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a hint for each unrecognized flag: the recipe key spelled as a flag (``--total_steps``
    for ``--total-steps``) or the closest flag (``--totl-steps``), as the recipe's YAML keys get; and an
    option given more than once with different values is said (a ConfigWarning): the last counts, as
    argparse and wrapper scripts' overrides have it (the sbatch scripts' TRAIN_ARGS after their own
    ``--deepspeed``), but no longer silently. A list option (``--target-modules``, ``prepare_data.py
    --input``) collects the values of each use instead (it kept the last use's alone).

    The uses are read from the command line as these parsers' options are written (long options, one value,
    a list, or a switch); short options with an attached value, fixed counts of values and subcommands are
    not looked at."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        self._args = args  # for error()'s hints
        self._warn_repeats(args)
        return super().parse_known_args(args, namespace)

    def _warn_repeats(self, args: list[str]) -> None:
        given: dict[str, list[tuple[str, object]]] = {}  # dest -> (as written, what it sets) per use
        i = 0
        while i < len(args) and args[i] != "--":
            name, eq, inline = args[i].partition("=")
            action = self._option_string_actions.get(name) if args[i].startswith("-") else None
            i += 1
            if action is None or isinstance(action, (argparse._HelpAction, argparse._AppendAction,
                                                     argparse._CountAction)):  # help; a flag meant to repeat
                continue  # (extend, the list options', is an append)
            if action.nargs == 0:  # a switch: what it sets (--no-x: False)
                written = name
                stored = not name.startswith("--no-") if isinstance(action, argparse.BooleanOptionalAction) \
                    else action.const
            else:
                values = [inline] if eq else []
                while not eq and i < len(args) and not self._is_option(args[i]) and \
                        (not values or action.nargs in ("+", "*")):
                    values.append(args[i])
                    i += 1
                written, stored = " ".join([name, *values]), self._stored(action, values)
            given.setdefault(action.dest, []).append((written, stored))
        for uses in given.values():
            if len({stored for _, stored in uses}) > 1:
                warnings.warn(f"{' and '.join(written for written, _ in uses)}: the same option given {len(uses)} "
                              f"times with different values; the last, {uses[-1][0]}, counts", ConfigWarning,
                              stacklevel=4)

    @staticmethod
    def _stored(action: argparse.Action, values: list[str]):
        """What argparse stores for these values (``--lr 1e-3`` and ``--lr 0.001`` are one value), or the text
        where its type refuses them (argparse says why once it parses)."""
        try:
            converted = tuple(action.type(v) if action.type else v for v in values)
            hash(converted)
            return converted
        except Exception:  # noqa: BLE001 (the type's own error is argparse's to report)
            return tuple(values)

    def _is_option(self, arg: str) -> bool:
        """An argument that starts another option rather than being a value (``-1`` is a value)."""
        return arg == "--" or arg.startswith("--") or (arg.startswith("-") and
                                                       arg.partition("=")[0] in self._option_string_actions)

    def error(self, message: str):
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            hints = []
            args = getattr(self, "_args", [])
            for arg in message[len(prefix):].split():
                name = arg.split("=", 1)[0]
                if not name.startswith("--"):  # a value after a switch: `--export false`
                    switches = [args[i - 1] for i in range(1, len(args)) if args[i] == arg and
                                getattr(self._option_string_actions.get(args[i - 1]), "nargs", None) == 0]
                    if switches:
                        action = self._option_string_actions[switches[0]]
                        ways = " or ".join(action.option_strings) if isinstance(
                            action, argparse.BooleanOptionalAction) else switches[0]
                        hints.append(f"{arg}: {switches[0]} is a switch and takes no value ({ways})")
                    continue
                dashed = "--" + name[2:].replace("_", "-")
                match = [dashed] if dashed in flags else difflib.get_close_matches(dashed, flags, n=1, cutoff=0.75)
                if match:
                    hints.append(f"{name}: did you mean {match[0]}?")
            if hints:
                message += f" ({'; '.join(hints)})"
        super().error(message)


def build_launch_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The parser of launch/train.py: the recipe's flags plus ``--deepspeed PATH`` and the launcher's
    ``--local_rank``. launch/preflight.py extends it, so both read a command line identically."""
    # allow_abbrev=False: --total-step must not silently mean --total-steps (nor a future flag's prefix)
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False)
    # Our own --deepspeed PATH: deepspeed.add_config_arguments would make it a boolean flag.
    parser.add_argument("--deepspeed", metavar="PATH", help="DeepSpeed JSON (ds_configs/); default: ZeRO off, fp32")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    return build_parser(parser)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or ArgumentParser(allow_abbrev=False)
    parser.add_argument("--config", help="YAML recipe; CLI flags override its values")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help_ = f.metadata["help"]
        if default is not None or "default" not in help_:  # a None default the text explains is not repeated
            help_ += f" (default: {default})"
        tp = bare_type(hints[f.name])
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(tp) is list:  # given twice: both lists
            parser.add_argument(flag, dest=f.name, nargs="+", action="extend", default=None, help=help_)
        else:
            optional = type(None) in typing.get_args(hints[f.name])
            choices = f.metadata.get("choices")
            if choices:  # checked by TrainConfig.validate, so that 'none' can pass argparse
                help_ += f"; one of {', '.join(choices)}"
            if optional:
                help_ += "; 'none' clears a value the recipe sets"
            parser.add_argument(flag, dest=f.name, type=_cli_type(f.name, hints[f.name]), default=None, help=help_,
                                metavar=f"{{{','.join(choices)}}}" if choices else None)
    return parser


_CLEAR = "__none__"  # a CLI `none` for an optional field: overrides the recipe's value with None


def _cli_type(name: str, hint):
    def parse(text: str):
        if text.strip().lower() in ("none", "null") and type(None) in typing.get_args(hint):
            return _CLEAR
        try:
            return coerce_value(name, text, hint)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = bare_type(hint).__name__  # argparse names the type in its error message
    return parse


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key twice in one mapping is an error (PyYAML keeps the last
    silently: `lr: 0.5` appended to a recipe would win without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"found the key {key!r} twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        """YAML 1.1's ints, except the two forms that read as another number than they show: a leading 0
        (`seed: 017` is octal, 15) and base 60 (`total_steps: 1:30` is 90)."""
        text = self.construct_scalar(node)
        value = super().construct_yaml_int(node)
        if ":" in text:
            raise yaml.constructor.ConstructorError(None, None, f"{text} reads as {value} in YAML 1.1 (base 60): "
                                                    "write the number, or quote it", node.start_mark)
        if re.fullmatch(r"[-+]?0[0-7_]+", text) and value != 0:
            raise yaml.constructor.ConstructorError(
                None, None, f"{text} reads as {value} in YAML 1.1 (octal): write the number without a leading 0 "
                f"(or {value} if that is what you mean), or quote it", node.start_mark)
        return value

    def construct_yaml_float(self, node):
        """YAML 1.1's floats, except base 60 (`lr: 1:30.5` is 90.5)."""
        text = self.construct_scalar(node)
        value = super().construct_yaml_float(node)
        if ":" in text:
            raise yaml.constructor.ConstructorError(None, None, f"{text} reads as {value} in YAML 1.1 (base 60): "
                                                    "write the number, or quote it", node.start_mark)
        return value


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _UniqueKeyLoader.construct_yaml_float)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < YAML recipe < CLI flags. Unknown recipe keys are an error (a typo is never ignored)."""
    values: dict = {}
    if getattr(args, "config", None):
        path = Path(args.config).expanduser()  # (the shell expands no ~ after "=" or from a script's list)
        if not path.is_file():
            raise ValueError(f"--config {path}: no such file")
        try:
            with path.open(encoding="utf-8") as f:  # a file object: YAML's errors name the file
                values = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path}: not valid YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"--config {path}: not UTF-8 text ({e}); save the recipe as UTF-8") from None
        if not isinstance(values, dict):
            raise ValueError(f"--config {path}: a recipe is a mapping of keys to values (key: value lines), "
                             f"not a {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        not_names = [k for k in values if not isinstance(k, str)]
        if not_names:  # YAML 1.1 reads on/off/yes/no as booleans, 1 as a number
            raise ValueError(f"--config {path}: keys must be setting names, got {not_names} (YAML reads on, off, yes, "
                             f"no, true and false as booleans and digits as numbers); valid keys: {sorted(names)}")
        unknown = sorted(set(values) - names)
        if unknown:
            close = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            hints = "; ".join(f"{k!r}: did you mean {c[0]!r}?" for k, c in close.items() if c)
            raise ValueError(f"{path}: unknown keys {unknown}{f' ({hints})' if hints else ''}; valid keys: "
                             f"{sorted(names)}")
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = None if v == _CLEAR else v
    source = values.get("hf_model") or values.get("warm_start_from")
    if getattr(args, "model", None) not in (None, _CLEAR) and source:  # `--model none` clears a recipe's
        raise ValueError(f"--model {args.model} contradicts {'hf_model' if values.get('hf_model') else 'warm_start_from'}"
                         f"={source!r}, whose config.json decides the model: give one of the two")
    if values.get("resume") is False and values.get("resume_from") is not None:
        which = "--no-resume" if getattr(args, "resume", None) is False else "the recipe's resume: false"
        raise ValueError(f"{which} contradicts resume_from={values['resume_from']!r}, which resumes: give one "
                         "(--resume-from none clears a recipe's)")
    cfg = TrainConfig(**values)
    if not (cfg.resume and cfg.token_budget):  # before any process group (a resumed budget's rest: its checkpoint's)
        cfg.check_schedule(total_steps_for(cfg), warn=False)  # its warnings: once, from the trainer's build_schedule
    return cfg


def check_local_rank_arg(local_rank: int) -> None:
    """``--local_rank`` is the deepspeed launcher's, which also sets ``LOCAL_RANK``, the variable the trainer
    reads (every launcher sets it): a value that disagrees with it, or given without it, would be ignored."""
    if local_rank < 0:
        return
    env = os.environ.get("LOCAL_RANK")
    if env != str(local_rank):
        raise ValueError(f"--local_rank {local_rank} but LOCAL_RANK={env if env is not None else 'unset'}: the trainer "
                         "reads LOCAL_RANK, which launchers set (deepspeed passes both); started by hand, one process "
                         "is rank 0 on the first visible GPU: choose the GPU with CUDA_VISIBLE_DEVICES instead")
