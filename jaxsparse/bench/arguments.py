"""Argument types for the benchmark and study scripts' command lines: a size of 0 or less (a length,
a head count, repeats) is refused by argparse with the flag's name, instead of failing deep
inside XLA (``--lengths -4`` was an MLIR "invalid tensor dimension size")."""

from __future__ import annotations

import argparse
import inspect
import math
import re


def description(doc: str | None) -> str:
    """``description=`` for a benchmark script's parser: its docstring's first paragraph (up
    to the first blank line) on one line -- its first line alone cut wrapped sentences
    mid-way. A paragraph that introduces a list (ends with ``:``) ends with a full stop."""
    paragraph = re.split(r"\n\s*\n", inspect.cleandoc(doc or ""), maxsplit=1)[0]
    text = " ".join(paragraph.split())
    return text[:-1] + "." if text.endswith(":") else text


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
    return value


def positive_int(text: str) -> int:
    """``type=`` for a flag that takes a size: an integer >= 1."""
    return _int_at_least(text, 1)


def size_tuple(text: str) -> tuple[int, ...]:
    """``type=`` for an ``AxBxC`` shape of positive integers."""
    parts = text.split("x")
    if not all(part.isdigit() and int(part) >= 1 for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be integers >= 1 joined by "
                                         "'x', e.g. 8x4096x512")
    return tuple(int(part) for part in parts)


def non_negative_int(text: str) -> int:
    """``type=`` for a count where 0 means none: an integer >= 0."""
    return _int_at_least(text, 0)


def seed(text: str) -> int:
    """``type=`` for a random seed: an integer in [0, 2**32) (``train.seed`` / ``data.seed``'s
    range), refused before any run trains rather than when its turn comes."""
    value = _int_at_least(text, 0)
    if value >= 2 ** 32:
        raise argparse.ArgumentTypeError(f"{value} must be < 2**32")
    return value


def positive_float(text: str) -> float:
    """``type=`` for a duration or other amount that must be a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{value:g} must be a finite number > 0")
    return value


def positive_int_list(text: str) -> list[int]:
    """``type=`` for comma-separated sizes (``1024,2048``), each an integer >= 1."""
    items = [item.strip() for item in text.split(",")]
    values = []
    for item in items:
        try:
            values.append(positive_int(item))
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: item {err}") from None
    return values
