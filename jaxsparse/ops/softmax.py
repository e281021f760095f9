"""Softmax over the entries a mask allows, for attention that gathers its own keys."""

from __future__ import annotations

import jax.numpy as jnp

NEG_INF = -1e30


def masked_softmax(logits, mask, axis: int = -1):
    """Softmax of float32 ``logits`` over ``axis`` where ``mask`` is True; masked entries get
    weight 0, and a row with nothing allowed gets all zeros (never NaN)."""
    logits = jnp.where(mask, logits, NEG_INF)
    weights = jnp.exp(logits - jnp.max(logits, axis=axis, keepdims=True)) * mask
    return weights / jnp.maximum(jnp.sum(weights, axis=axis, keepdims=True), 1e-30)
