"""Causal depthwise 1-D convolution with a carry-over state (Mamba's short convolution)."""

from __future__ import annotations

import jax.numpy as jnp


def causal_depthwise_conv1d(x_BLD, w_KD, b_D=None, state_BKD=None):
    """``y_t = sum_k w[k] * x[t - K + 1 + k] (+ b)`` per channel, with ``K - 1`` past inputs.

    ``state`` holds the last ``K - 1`` inputs before ``x`` (zeros at the start of a
    sequence). Returns ``(y [B, L, D], new_state [B, K-1, D])``.
    """
    width = w_KD.shape[0]
    batch, length, channels = x_BLD.shape
    if w_KD.shape != (width, channels):
        raise ValueError(f"w must be [width, channels={channels}], got {w_KD.shape}")
    if state_BKD is None:
        state_BKD = jnp.zeros((batch, width - 1, channels), x_BLD.dtype)
    if state_BKD.shape != (batch, width - 1, channels):
        raise ValueError(f"state must be {(batch, width - 1, channels)}, got {state_BKD.shape}")
    full = jnp.concatenate([state_BKD.astype(x_BLD.dtype), x_BLD], axis=1)
    w = w_KD.astype(x_BLD.dtype)
    y = sum(full[:, k:k + length] * w[k][None, None, :] for k in range(width))
    if b_D is not None:
        y = y + b_D.astype(x_BLD.dtype)[None, None, :]
    return y, full[:, length:]


__all__ = ["causal_depthwise_conv1d"]
