"""The dense masked reference: softmax(q k^T) v written for clarity, float32 inside."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Finite stand-in for -inf: keeps exp() and its gradient free of NaN on fully masked rows.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def soft_cap(logits, cap):
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def xla_attention(q, k, v, allowed, scale, logits_soft_cap):
    """``allowed``: boolean broadcastable to ``[B, Hq, S, T]`` or None. Masked rows give 0."""
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads, kv_len = k.shape[2], k.shape[1]
    groups = q_heads // kv_heads
    q_grouped = q.reshape(batch, q_len, kv_heads, groups, head_dim)
    logits = jnp.einsum("bshgd,bthd->bhgst", q_grouped, k, preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST)
    logits = soft_cap(logits * scale, logits_soft_cap)
    if allowed is not None:
        # [B or 1, H or 1, S, T] -> [B or 1, Hkv, G, S, T] to line up with the grouped logits
        allowed = jnp.broadcast_to(allowed, (allowed.shape[0], q_heads, q_len, kv_len))
        allowed = allowed.reshape(allowed.shape[0], kv_heads, groups, q_len, kv_len)
        logits = jnp.where(allowed, logits, MASK_VALUE)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - jax.lax.stop_gradient(peak))
    if allowed is not None:
        weights = jnp.where(allowed, weights, 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bhgst,bthd->bshgd", probs, v.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.reshape(batch, q_len, q_heads, head_dim).astype(q.dtype)
