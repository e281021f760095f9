"""Argument checks shared by the ops and the layers."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np


def is_integer(value) -> bool:
    """A Python or numpy integer: not a bool (a flag passed by mistake), not a float (``2.5``
    would be rounded silently or fail deep inside a trace, ``2.0`` fail as a shape)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A Python or numpy real number: not a bool (a flag passed by mistake), not a string or
    ``None`` (which fail comparisons with a bare ``TypeError``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_integer(name: str, value, low: int = 1, high: float = math.inf,
                  allowed: str = "") -> None:
    """``value`` an integer in ``[low, high]``, else a ``ValueError`` naming ``name``, the value
    and what is ``allowed`` (default ``>= low``)."""
    if not is_integer(value) or not low <= value <= high:
        raise ValueError(f"{name}={value!r}: must be an integer {allowed or f'>= {low}'}")


def check_nonnegative(name: str, value) -> None:
    """``value`` a finite real number >= 0 (a weight or an initialisation scale: NaN would
    spread through the loss or the weights, a negative scale fails in ``sqrt`` or flips a
    loss into a reward), else a ``ValueError`` naming ``name`` and the value."""
    if not is_real(value) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value!r}: must be a finite number >= 0")


def check_cache_request(batch, max_len=None, dtype=None) -> None:
    """The arguments of a layer's or model's ``init_cache``: ``batch`` and ``max_len`` integers
    >= 1 (a float, bool or negative size otherwise fails deep inside JAX, and a batch of 0
    at the first decode step), ``dtype`` a floating-point dtype (an integer or bool cache
    would silently truncate the keys and values written into it). ``None``: not checked."""
    check_integer("batch", batch)
    if max_len is not None:
        check_integer("max_len", max_len)
    if dtype is not None:
        try:
            resolved = jnp.dtype(dtype)
        except TypeError:  # not a dtype at all
            resolved = None
        if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
            shown = dtype if resolved is None else resolved.name
            raise ValueError(f"dtype={shown!r}: a decode cache must have a floating-point dtype "
                             "(e.g. float32, bfloat16)")


def check_cache_batch(cache, batch: int, keys: tuple[str, ...]) -> None:
    """``cache`` is the dict of a layer's ``init_cache`` holding ``keys``, each made for
    ``batch`` rows (its first axis): another batch fails inside ``dynamic_update_slice`` or a
    scan, or is reported as a wrong state shape, as if the cache and not the input were off."""
    for key in keys:
        if not isinstance(cache, Mapping) or key not in cache:
            found = sorted(cache) if isinstance(cache, Mapping) else type(cache).__name__
            raise ValueError(f"cache: expected the dict init_cache gives, with {list(keys)}; "
                             f"got {found}")
        shape = tuple(cache[key].shape)
        if not shape or shape[0] != batch:
            raise ValueError(f"cache[{key!r}] of shape {shape}: made for another batch size "
                             f"than the input's {batch} (init_cache(batch={batch}, ...))")


def checked_decode_cache(cache, cache_index, batch: int, keys: tuple[str, ...]):
    """``cache_index`` as an int32 scalar after checking a layer's decode inputs: ``cache``
    holds ``keys``, each made for ``batch`` rows (its first axis; another batch fails inside
    ``dynamic_update_slice`` or a scan otherwise), and ``cache_index`` is an integer scalar,
    >= 0 where concrete (``ops.attention.decode.checked_first_position``)."""
    # imported here: that module imports this one
    from jaxsparse.ops.attention.decode import checked_first_position

    check_cache_batch(cache, batch, keys)
    if cache_index is None:
        raise ValueError("cache_index=None: decoding with a cache needs the position of the "
                         "first new token")
    try:
        return checked_first_position(cache_index)
    except (TypeError, ValueError) as error:
        raise ValueError(f"cache_index: {error}") from None


def sequence_axis_of(mesh, axis: str, who: str) -> int:
    """The size of ``mesh``'s axis ``axis``, which ``who`` (e.g. "ring attention") splits the
    sequence over; a ValueError naming the mesh otherwise (``mesh=None`` was an
    AttributeError, a mesh without the axis a KeyError)."""
    from jax.sharding import Mesh

    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh={mesh!r}: {who} needs a jax.sharding.Mesh with an axis {axis!r} "
                         "to split the sequence over")
    size = mesh.shape.get(axis)
    if size is None:
        raise ValueError(f"mesh {dict(mesh.shape)} has no axis {axis!r} to split the sequence over")
    return size
