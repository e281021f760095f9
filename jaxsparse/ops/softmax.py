"""Softmax over the entries a mask allows, for attention that gathers its own keys or masks
its logits."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def _forward(logits, mask, axis):
    logits = jnp.where(mask, logits, NEG_INF)
    peak = jnp.max(logits, axis=axis, keepdims=True)
    weights = jnp.exp(logits - peak) * mask
    # a row with an allowed entry sums to >= 1 (its peak contributes exp(0)); 0 only when empty.
    # An empty row divides by 1, not by a tiny floor: the division's second derivative has the
    # divisor squared, and 1e-30 squared is 0 in float32 (NaN Hessian products on empty rows).
    total = jnp.sum(weights, axis=axis, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _masked_softmax(logits, mask, axis):
    return _forward(logits, mask, axis)


def _fwd(logits, mask, axis):
    probs = _forward(logits, mask, axis)
    return probs, probs


def _bwd(axis, probs, g):
    # The softmax Jacobian-vector product p ⊙ (g − Σ g·p): masked entries and empty rows have
    # p = 0 and get 0. Written out because autodiff of the forward (through the max shift, the
    # mask selects and the guarded division) made attention's backward 2-3x slower on CPU: the
    # shift's exact gradient is zero, but autodiff routes one through the max's argmax.
    return probs * (g - jnp.sum(g * probs, axis=axis, keepdims=True)), None


_masked_softmax.defvjp(_fwd, _bwd)


def masked_softmax(logits, mask=None, axis: int = -1):
    """Softmax of float32 ``logits`` over ``axis`` where ``mask`` (boolean, broadcastable to
    ``logits``; None allows everything) is True; masked entries get weight 0, and a row with
    nothing allowed gets all zeros (never NaN), forward and backward."""
    mask = jnp.ones((), bool) if mask is None else jnp.asarray(mask, bool)
    if mask.ndim > logits.ndim:
        raise ValueError(f"mask {mask.shape} has more dimensions than logits {logits.shape}")
    mask = mask.reshape((1,) * (logits.ndim - mask.ndim) + mask.shape)  # numpy-style leading 1s
    return _masked_softmax(logits, mask, axis)
