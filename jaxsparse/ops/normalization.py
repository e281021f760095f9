"""Normalisation ops (statistics always in float32)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxsparse.ops.checks import check_integer
from jaxsparse.ops.concrete import concrete_values


def check_eps(eps) -> None:
    """RMSNorm's epsilon: a finite real number > 0 (a negative one can make the root NaN, and
    0 makes an all-zero row 0/0 = NaN); a traced one cannot be checked here."""
    value = concrete_values(eps)
    if value is None:  # traced
        return
    if (isinstance(eps, bool) or value.shape != ()
            or value.dtype.kind not in "iuf" or not (math.isfinite(value) and value > 0)):
        raise ValueError(f"eps={eps!r}: must be a finite number > 0 (e.g. 1e-6)")


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6, *, groups: int = 1) -> jax.Array:
    """RMSNorm (Zhang & Sennrich 2019): ``x / sqrt(mean(x^2) + eps) * scale`` over the last axis.

    ``groups > 1`` normalises each of that many equal slices of the last axis on its own
    (the statistics per group, the scale per channel): Mamba-2's gated norm, which
    state-spaces/mamba computes with ``group_size = d_inner // ngroups``."""
    if not jnp.issubdtype(x.dtype, jnp.floating):  # the result would be truncated
        raise ValueError(f"x has dtype {x.dtype}; RMSNorm needs floating-point inputs")
    if scale.shape != x.shape[-1:]:
        raise ValueError(f"scale of shape {scale.shape}: must be [{x.shape[-1]}], x's last "
                         f"dimension (x {x.shape})")
    check_integer("groups", groups, 1)
    if x.shape[-1] % groups:
        raise ValueError(f"groups={groups} must divide x's last dimension {x.shape[-1]}")
    check_eps(eps)
    x32 = x.astype(jnp.float32)
    grouped = x32.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    normed = grouped * jax.lax.rsqrt(jnp.mean(jnp.square(grouped), axis=-1, keepdims=True) + eps)
    scale = jnp.expand_dims(scale.astype(jnp.float32), tuple(range(x.ndim - 1)))
    return (normed.reshape(x.shape) * scale).astype(x.dtype)
