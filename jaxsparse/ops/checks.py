"""Argument checks shared by the ops and the layers."""

from __future__ import annotations

import math

import numpy as np


def is_integer(value) -> bool:
    """A Python or numpy integer: not a bool (a flag passed by mistake), not a float (``2.5``
    would be rounded silently or fail deep inside a trace, ``2.0`` fail as a shape)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_integer(name: str, value, low: int = 1, high: float = math.inf,
                  allowed: str = "") -> None:
    """``value`` an integer in ``[low, high]``, else a ``ValueError`` naming ``name``, the value
    and what is ``allowed`` (default ``>= low``)."""
    if not is_integer(value) or not low <= value <= high:
        raise ValueError(f"{name}={value!r}: must be an integer {allowed or f'>= {low}'}")
