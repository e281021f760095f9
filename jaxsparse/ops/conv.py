"""Causal depthwise 1-D convolution with a carry-over state (Mamba's short convolution)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.segments import check_segment_ids, document_index


def causal_depthwise_conv1d(x_BLD, w_KD, b_D=None, state_BKD=None, segment_ids=None):
    """``y_t = sum_k w[k] * x[t - K + 1 + k] (+ b)`` per channel, with ``K - 1`` past inputs.

    ``state`` holds the last ``K - 1`` inputs before ``x`` (zeros at the start of a
    sequence). ``segment_ids`` (integer ``[B, L]``, packed documents): taps that reach into an
    earlier document read zeros, as at the start of a sequence; the state (the inputs before
    ``x``) belongs to the first document. Returns ``(y [B, L, D], new_state [B, K-1, D])``,
    the new state in the given state's dtype (x's without one): a decode loop carries it, and
    a ``lax.scan`` carry must keep its type.
    """
    if x_BLD.ndim != 3:
        raise ValueError(f"x must be [batch, length, channels]; got {x_BLD.shape}")
    if not jnp.issubdtype(x_BLD.dtype, jnp.floating):  # the weights would be cast to integers
        raise ValueError(f"x has dtype {x_BLD.dtype}; the convolution needs floating-point "
                         "inputs (e.g. float32, bfloat16)")
    batch, length, channels = x_BLD.shape
    if w_KD.ndim != 2 or w_KD.shape[0] < 1 or w_KD.shape[1] != channels:
        raise ValueError(f"w must be [width >= 1, channels={channels}], got {w_KD.shape}")
    width = w_KD.shape[0]
    if b_D is not None and b_D.shape != (channels,):
        raise ValueError(f"b must be [channels={channels}], got {b_D.shape}")
    if state_BKD is None:
        state_BKD = jnp.zeros((batch, width - 1, channels), x_BLD.dtype)
    state_dtype = state_BKD.dtype
    if state_BKD.shape != (batch, width - 1, channels):
        raise ValueError(f"state must be {(batch, width - 1, channels)}, got {state_BKD.shape}")
    full = jnp.concatenate([state_BKD.astype(x_BLD.dtype), x_BLD], axis=1)
    new_state = full[:, length:]
    if segment_ids is None:
        y = window_sum(full, w_KD.astype(x_BLD.dtype))
    else:
        runs = document_index(check_segment_ids(segment_ids, batch, length))
        y = _window_sum_within_documents(full, w_KD.astype(x_BLD.dtype), runs)
        # the state's inputs are run 0 (the first document), then one run index per input;
        # the last one's run is the last document's (the state's own for an empty chunk)
        full_runs = jnp.pad(runs, ((0, 0), (width - 1, 0)))
        same = full_runs[:, length:] == full_runs[:, full_runs.shape[1] - 1:]
        new_state = jnp.where(same[..., None], new_state, 0)
    if b_D is not None:
        y = y + b_D.astype(x_BLD.dtype)[None, None, :]
    return y, new_state.astype(state_dtype)


def _window_sum_within_documents(full_BND, w_KD, runs):
    """:func:`window_sum_reference` where tap ``k`` of output ``t`` counts only if its input is
    in ``t``'s document (``runs [B, L]``: :func:`document_index` of the segment ids). The state's
    ``K - 1`` inputs belong to the first document."""
    width, length = w_KD.shape[0], runs.shape[1]
    ids = jnp.pad(runs, ((0, 0), (width - 1, 0)))  # the state's inputs: run 0, the first document
    y = 0
    for k in range(width):
        same = (ids[:, k:k + length] == runs)[..., None]
        y = y + jnp.where(same, full_BND[:, k:k + length], 0) * w_KD[k][None, None, :]
    return y


def window_sum_reference(full_BND, w_KD):
    """``y[:, t] = sum_k w[k] * full[:, t + k]`` for ``t < N - K + 1`` (plain autodiff)."""
    width, length = w_KD.shape[0], full_BND.shape[1] - w_KD.shape[0] + 1
    return sum(full_BND[:, k:k + length] * w_KD[k][None, None, :] for k in range(width))


@jax.custom_vjp
def window_sum(full_BND, w_KD):
    """:func:`window_sum_reference` with a hand-written backward. Autodiff transposes each
    shifted slice into a zero-padded full-size array and adds them up; on XLA:CPU that made
    the convolution's forward+backward at ``[32, 128, 128]``, width 4, take 11 ms instead of
    the 4 ms of the transposed window sum below (a 4-block ``hydra_tiny`` step runs it 4 times)."""
    return window_sum_reference(full_BND, w_KD)


def _window_sum_fwd(full_BND, w_KD):
    return window_sum_reference(full_BND, w_KD), (full_BND, w_KD)


def _window_sum_bwd(residuals, dy_BLD):
    full_BND, w_KD = residuals
    width, length = w_KD.shape[0], dy_BLD.shape[1]
    # d_full[:, j] = sum_k w[k] * dy[:, j - k]: the same window sum over dy padded on both sides
    padded = jnp.pad(dy_BLD, ((0, 0), (width - 1, width - 1), (0, 0)))
    span = full_BND.shape[1]
    d_full = sum(padded[:, width - 1 - k:width - 1 - k + span] * w_KD[k][None, None, :]
                 for k in range(width))
    d_w = jnp.stack([jnp.sum(dy_BLD * full_BND[:, k:k + length], axis=(0, 1))
                     for k in range(width)])
    return d_full, d_w.astype(w_KD.dtype)


window_sum.defvjp(_window_sum_fwd, _window_sum_bwd)


__all__ = ["causal_depthwise_conv1d", "window_sum", "window_sum_reference"]
