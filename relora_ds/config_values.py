"""Reading a setting's value as its field's type (TrainConfig's fields, from a recipe or the command line): one
rule for both, so a value the command line refuses is refused in a recipe too; and the problems found in a
configuration, collected to be raised together."""
from __future__ import annotations

import contextlib
import decimal
import math
import typing


def coerce_value(name: str, value, tp):
    """`value` as the field's type, or a ValueError naming the field. YAML 1.1 reads ``1e-3`` (no dot) as a
    string, so numeric strings become numbers; a bool is never a number, a float never an int."""
    optional = type(None) in typing.get_args(tp)
    tp = bare_type(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name}=None: a value is required")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name}={value!r} must be true or false")
    if tp in (int, float):
        text = None
        if isinstance(value, str):
            text = value
            try:
                value = int(text) if tp is int else float(text)  # int first: exact past 2**53
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    raise ValueError(f"{name}={text!r} must be a number") from None
                if tp is int and math.isfinite(value):  # "1e30" is 10**30 exactly, not float(1e30)'s 10**30 + 2e13
                    with contextlib.suppress(decimal.InvalidOperation):
                        exact = decimal.Decimal(text.strip())
                        value = int(exact) if exact == exact.to_integral_value() else value
        shown = text if isinstance(text, str) else value  # "1e400", not the inf it reads as
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}={shown!r} must be a {'whole' if tp is int else 'finite'} number")
        if tp is float:
            return float(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name}={shown!r} must be a whole number")
        return int(value)
    if typing.get_origin(tp) is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name}={value!r} must be a list of strings")
        return value
    if not isinstance(value, tp):
        raise ValueError(f"{name}={value!r} must be a {tp.__name__}")
    return value


def bare_type(tp):
    """``X | None`` -> X; anything else unchanged (``list[str]`` stays a list type)."""
    args = typing.get_args(tp)
    if type(None) in args:
        return next(a for a in args if a is not type(None))
    return tp


class Problems:
    """The problems found in a configuration, raised together: one ValueError, a line each."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.fields: set[str] = set()

    def add(self, message: str, *fields: str) -> None:
        self.messages.append(message)
        self.fields.update(fields)

    def ok(self, *fields: str) -> bool:
        """No problem found yet with any of these fields (a check that reads a field skips a bad one)."""
        return not self.fields.intersection(fields)

    def raise_if_any(self) -> None:
        if len(self.messages) == 1:
            raise ValueError(self.messages[0])
        if self.messages:
            raise ValueError(f"{len(self.messages)} problems with the settings:\n" +
                             "\n".join(f"  - {m}" for m in self.messages))
