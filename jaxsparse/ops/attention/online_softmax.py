"""The online softmax: fold key blocks one at a time into a running softmax-weighted sum.

Milakov & Gimelshein (2018), as used by FlashAttention (Dao et al. 2022): the state per query
row is the running maximum logit (``peak``), the sum of ``exp(logit - peak)`` (``denom``) and
the matching weighted sum of values (``acc``); a new block rescales the old sums by
``exp(old_peak - new_peak)``. Shared by the XLA block-skipping path and ring attention, so
both mask, rescale and finish rows with nothing to attend to in exactly one way.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxsparse.ops.attention.reference import MASK_VALUE


class SoftmaxState(NamedTuple):
    peak: jax.Array   # [..., rows] running maximum of the allowed logits (MASK_VALUE if none)
    denom: jax.Array  # [..., rows] sum of exp(logit - peak) over the allowed logits so far
    acc: jax.Array    # [..., rows, head_dim] the same weights applied to the values


def empty_state(rows_shape: tuple[int, ...], head_dim: int) -> SoftmaxState:
    """The float32 state of rows that have seen no keys yet."""
    return SoftmaxState(jnp.full(rows_shape, MASK_VALUE, jnp.float32),
                        jnp.zeros(rows_shape, jnp.float32),
                        jnp.zeros(rows_shape + (head_dim,), jnp.float32))


def fold_block(state: SoftmaxState, logits: jax.Array, allowed: jax.Array,
               weigh_values: Callable[[jax.Array], jax.Array]) -> SoftmaxState:
    """Fold one key block: ``logits [..., rows, keys]`` (float32), ``allowed`` broadcastable
    to them; ``weigh_values(weights [..., rows, keys]) -> [..., rows, head_dim]`` contracts the
    weights with the block's values (the caller knows the layout of its values)."""
    logits = jnp.where(allowed, logits, MASK_VALUE)
    # the peak only keeps exp() in range; its gradient cancels exactly, so don't compute it
    peak = jnp.maximum(state.peak, jax.lax.stop_gradient(jnp.max(logits, axis=-1)))
    # masked weights are set to 0, not left to underflow: a row whose every key so far is
    # masked has peak == MASK_VALUE, where exp(logit - peak) would be 1
    weights = jnp.where(allowed, jnp.exp(logits - peak[..., None]), 0.0)
    correction = jnp.exp(state.peak - peak)
    return SoftmaxState(peak,
                        state.denom * correction + jnp.sum(weights, axis=-1),
                        state.acc * correction[..., None] + weigh_values(weights))


def finish(state: SoftmaxState) -> tuple[jax.Array, jax.Array]:
    """``(out [..., rows, head_dim], logsumexp [..., rows])`` in float32; rows that attended
    to nothing get zeros in both (never NaN)."""
    seen = state.denom > 0.0
    denom = jnp.where(seen, state.denom, 1.0)
    return state.acc / denom[..., None], jnp.where(seen, state.peak + jnp.log(denom), 0.0)


def merge_finished(parts) -> jax.Array:
    """One softmax over disjoint key sets that were attended to apart: ``parts`` is a list of
    ``(out [..., rows, head_dim], lse [..., rows], nonempty [..., rows] or None)`` — each
    part's output and row log-sum-exp as :func:`finish` or
    ``dot_product_attention(..., return_lse=True)`` give them, and which rows saw a key at
    all (``None``: every row) — merged as ``Σ_p exp(lse_p - lse) out_p``, ``lse`` the
    log-sum-exp over the parts. float32; a row empty in every part gets zeros."""
    # an empty part's lse (0 by convention) must weigh nothing: MASK_VALUE for the peak, and
    # its weight set to 0, not left to underflow (a row empty everywhere has peak MASK_VALUE)
    lses = [lse if nonempty is None else jnp.where(nonempty, lse, MASK_VALUE)
            for _, lse, nonempty in parts]
    # the peak only keeps exp() in range; its gradient cancels exactly
    peak = jax.lax.stop_gradient(jnp.max(jnp.stack(lses), axis=0))
    weights = [jnp.exp(lse - peak) if nonempty is None
               else jnp.where(nonempty, jnp.exp(lse - peak), 0.0)
               for lse, (_, _, nonempty) in zip(lses, parts)]
    total = sum(w[..., None] * out.astype(jnp.float32) for w, (out, _, _) in zip(weights, parts))
    denom = sum(weights)  # >= 1 where any part saw a key (the peak's part weighs exp(0))
    # an empty row divides by 1: a floor of 1e-30 squares to 0 in the second derivative (NaN)
    return total / jnp.where(denom > 0, denom, 1.0)[..., None]


__all__ = ["SoftmaxState", "empty_state", "finish", "fold_block", "merge_finished"]
