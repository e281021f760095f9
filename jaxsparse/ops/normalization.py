"""Normalisation ops (statistics always in float32)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxsparse.ops.concrete import concrete_values


def check_eps(eps) -> None:
    """RMSNorm's epsilon: a finite real number >= 0 (a negative one can make the root NaN); a
    traced one cannot be checked here."""
    value = concrete_values(eps)
    if value is None:  # traced
        return
    if (isinstance(eps, bool) or value.shape != ()
            or value.dtype.kind not in "iuf" or not (math.isfinite(value) and value >= 0)):
        raise ValueError(f"eps={eps!r}: must be a finite number >= 0 (e.g. 1e-6)")


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
    """RMSNorm (Zhang & Sennrich 2019): ``x / sqrt(mean(x^2) + eps) * scale`` over the last axis."""
    if not jnp.issubdtype(x.dtype, jnp.floating):  # the result would be truncated
        raise ValueError(f"x has dtype {x.dtype}; RMSNorm needs floating-point inputs")
    if scale.shape != x.shape[-1:]:
        raise ValueError(f"scale of shape {scale.shape}: must be [{x.shape[-1]}], x's last "
                         f"dimension (x {x.shape})")
    check_eps(eps)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    scale = jnp.expand_dims(scale.astype(jnp.float32), tuple(range(x.ndim - 1)))
    return (normed * scale).astype(x.dtype)
