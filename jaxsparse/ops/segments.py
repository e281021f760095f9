"""Packed documents in recurrent layers: where each document starts.

A recurrence over packed documents must not carry state from one document into the next: at
the first token of every document the state is reset, ``h_t = 0 · h_{t-1} + input_t``. Every
scan here takes that as a ``keep`` factor on the decay (1 inside a document, 0 where a new one
starts); a short convolution drops the taps that reach into an earlier document.
"""

from __future__ import annotations

import jax.numpy as jnp


def check_segment_ids(segment_ids, batch: int, length: int):
    """``segment_ids`` as an integer ``[batch, length]`` array, or a ValueError naming it."""
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != (batch, length):
        raise ValueError(f"segment_ids must be [batch={batch}, length={length}], got shape "
                         f"{segment_ids.shape}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be integers, got dtype {segment_ids.dtype}")
    return segment_ids


def document_starts(segment_ids):
    """bool ``[batch, length]``: True where the id differs from the previous token's. Position 0
    is never a start: an ``initial_state`` passed by the caller belongs to the first document."""
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(changed[:, :1]), changed], axis=1)


def keep_factor(segment_ids, batch: int, length: int):
    """float32 ``[batch, length]``: 0 where a document starts (the decay onto the previous
    state), 1 elsewhere; all ones without ``segment_ids``."""
    if segment_ids is None:
        return jnp.ones((batch, length), jnp.float32)
    starts = document_starts(check_segment_ids(segment_ids, batch, length))
    return jnp.where(starts, 0.0, 1.0).astype(jnp.float32)
