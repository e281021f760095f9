"""Scaled dot-product attention: one public entry point, several implementations.

Layout follows ``jax.nn.dot_product_attention``: ``q [B, S, Hq, D]``, ``k, v [B, T, Hkv, D]``
with ``Hq % Hkv == 0`` (multi-head, grouped-query and multi-query attention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.ops.masks import Mask

IMPLEMENTATIONS = (None, "xla")

# Finite stand-in for -inf: keeps exp() and its gradient free of NaN on fully masked rows.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _check_shapes(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be [batch, seq, heads, head_dim]; got q{q.shape}, k{k.shape}, v{v.shape}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k{k.shape}, v{v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q{q.shape} and k{k.shape} must agree on batch (dim 0) and head_dim (dim 3)"
        )
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})"
        )


def _dense_mask(mask, segment_ids, batch, heads, q_len, kv_len):
    """Combine ``mask`` and ``segment_ids`` into a boolean array broadcastable to [B, H, S, T]."""
    allowed = None
    if isinstance(mask, Mask):
        allowed = jnp.asarray(mask.to_dense(q_len, kv_len))[None, None]
    elif mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise ValueError(f"mask must be a Mask object or a boolean array, got dtype {mask.dtype}")
        if mask.ndim == 2:
            mask = mask[None, None]
        elif mask.ndim == 3:
            mask = mask[:, None]
        try:
            np.broadcast_shapes(mask.shape, (batch, heads, q_len, kv_len))
        except ValueError:
            raise ValueError(
                f"mask of shape {mask.shape} does not broadcast to [B, H, S, T]="
                f"{(batch, heads, q_len, kv_len)}"
            ) from None
        allowed = mask
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            q_seg, kv_seg = segment_ids
        else:
            if q_len != kv_len:
                raise ValueError(
                    f"a single segment_ids array needs S == T (got S={q_len}, T={kv_len}); "
                    "pass a (q_segment_ids, kv_segment_ids) pair"
                )
            q_seg = kv_seg = segment_ids
        if q_seg.shape != (batch, q_len) or kv_seg.shape != (batch, kv_len):
            raise ValueError(
                f"segment_ids must be [B, S] and [B, T] = {(batch, q_len)}, {(batch, kv_len)}; "
                f"got {q_seg.shape}, {kv_seg.shape}"
            )
        same = q_seg[:, None, :, None] == kv_seg[:, None, None, :]
        allowed = same if allowed is None else allowed & same
    return allowed


def _xla_attention(q, k, v, allowed, scale, logits_soft_cap):
    """Dense reference: float32 logits and softmax, masked rows give zeros."""
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = q_heads // kv_heads
    q_grouped = q.reshape(batch, q_len, kv_heads, groups, head_dim)
    logits = jnp.einsum(
        "bshgd,bthd->bhgst", q_grouped, k,
        preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST,
    )
    logits = logits * scale
    if logits_soft_cap is not None:
        logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
    if allowed is not None:
        # [B or 1, H or 1, S, T] -> [B, Hkv, G, S, T] to match the grouped logits.
        allowed = jnp.broadcast_to(allowed, (allowed.shape[0], q_heads, q_len, k.shape[1]))
        allowed = allowed.reshape(allowed.shape[0], kv_heads, groups, q_len, k.shape[1])
        logits = jnp.where(allowed, logits, _MASK_VALUE)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - jax.lax.stop_gradient(peak))
    if allowed is not None:
        weights = jnp.where(allowed, weights, 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum(
        "bhgst,bthd->bshgd", probs, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return out.reshape(batch, q_len, q_heads, head_dim).astype(q.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: Mask | jax.Array | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """softmax(q k^T * scale [soft-capped] [masked]) v, per head, with GQA.

    Args:
      q: ``[B, S, Hq, D]`` queries. k, v: ``[B, T, Hkv, D]``; ``Hq`` a multiple of ``Hkv``.
      mask: a :class:`~jaxsparse.ops.masks.Mask`, or a boolean array broadcastable to
        ``[B, Hq, S, T]`` (``[S, T]`` and ``[B, S, T]`` are accepted), True = may attend.
      segment_ids: ``[B, S]`` (needs ``S == T``) or a pair ``([B, S], [B, T])``; tokens attend
        only within their segment. ANDed with ``mask``.
      scale: multiplies the logits; default ``D ** -0.5``.
      logits_soft_cap: if set, logits become ``cap * tanh(logits / cap)`` (Gemma-2 style).
      implementation: ``None`` (best available) or ``"xla"`` (the dense reference).

    Returns:
      ``[B, S, Hq, D]`` in ``q.dtype``. Rows with nothing to attend to are zero.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not available; allowed: {IMPLEMENTATIONS}"
        )
    _check_shapes(q, k, v)
    if logits_soft_cap is not None and logits_soft_cap <= 0:
        raise ValueError(f"logits_soft_cap={logits_soft_cap}: must be > 0")
    batch, q_len, q_heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    allowed = _dense_mask(mask, segment_ids, batch, q_heads, q_len, k.shape[1])
    return _xla_attention(q, k, v, allowed, scale, logits_soft_cap)
