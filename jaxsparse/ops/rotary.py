"""Rotary position embeddings (Su et al. 2021, "RoFormer"), half-split (GPT-NeoX) layout."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from jaxsparse.ops.concrete import concrete_values


def check_rope_theta(theta, name: str = "theta") -> None:
    """The rotary base: a finite real number > 0 (``theta ** (-2i/D)`` is NaN or infinite
    otherwise); a traced one cannot be checked here."""
    value = concrete_values(theta)
    if value is None:  # traced
        return
    if (isinstance(theta, bool) or value.shape != ()
            or value.dtype.kind not in "iuf" or not (math.isfinite(value) and value > 0)):
        raise ValueError(f"{name}={theta!r}: must be a finite number > 0 (e.g. 10000)")


def check_rotary_head_dim(head_dim) -> None:
    """Rotary embeddings rotate pairs of a head's channels: its dim must be even. For the layers'
    constructors, so an odd one is refused when the layer is built, not at its first call."""
    integer = isinstance(head_dim, numbers.Integral) and not isinstance(head_dim, bool)
    if integer and head_dim % 2:  # (numpy integers too: a config's sizes may be np.int64)
        raise ValueError(f"head_dim={head_dim}: rotary embeddings need an even head dim")


def apply_rotary(x_BLHD: jax.Array, positions_BL: jax.Array, theta: float = 10_000.0) -> jax.Array:
    """Rotate each pair (x[i], x[i + D/2]) by angle ``position / theta ** (2i / D)``.

    Computed in float32 and cast back, so that long positions keep their precision in bf16.
    """
    if x_BLHD.ndim != 4:
        raise ValueError(f"x of shape {x_BLHD.shape}: expected [batch, length, heads, head_dim]")
    if not jnp.issubdtype(x_BLHD.dtype, jnp.floating):  # the rotation would be truncated
        raise ValueError(f"x has dtype {x_BLHD.dtype}; rotary embeddings need floating point")
    check_rope_theta(theta)
    head_dim = x_BLHD.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}")
    if positions_BL.ndim != 2 or positions_BL.shape[1] != x_BLHD.shape[1] or (
            positions_BL.shape[0] not in (1, x_BLHD.shape[0])):
        raise ValueError(f"positions of shape {positions_BL.shape}: expected [batch, length] = "
                         f"{x_BLHD.shape[:2]} (or batch 1, shared by every row)")
    half = head_dim // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions_BL.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # [B, L, D/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x = x_BLHD.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BLHD.dtype)
