"""argparse types the launch scripts share: a bad number is a parse error naming the flag and the value."""
import argparse


def positive_int(text: str) -> int:
    value = int(text)  # argparse turns a ValueError into "invalid positive_int value: 'x'"
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value
