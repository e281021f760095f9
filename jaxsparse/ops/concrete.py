"""Argument checks that look at values: possible only outside a trace."""

from __future__ import annotations

import jax
import numpy as np


def concrete_values(x) -> np.ndarray | None:
    """``x`` as numpy if it holds concrete values (an eager call), else None (inside ``jit``,
    ``grad``, ``shard_map``, …, where a value check has to wait for the data)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
