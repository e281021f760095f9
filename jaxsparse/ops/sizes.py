"""Integer size arithmetic shared by the ops that pad to whole blocks or chunks (Python ints,
or elementwise on integer arrays such as per-expert group sizes)."""

from __future__ import annotations


def ceil_div(n: int, m: int) -> int:
    """How many blocks of ``m`` cover ``n`` items (``n >= 0``, ``m >= 1``)."""
    return -(-n // m)


def round_up(n: int, m: int) -> int:
    """``n`` rounded up to a whole number of blocks of ``m``."""
    return ceil_div(n, m) * m
