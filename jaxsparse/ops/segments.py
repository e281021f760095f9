"""Packed documents in recurrent layers: where each document starts.

A recurrence over packed documents must not carry state from one document into the next: at
the first token of every document the state is reset, ``h_t = 0 · h_{t-1} + input_t``. Every
scan here takes that as a ``keep`` factor on the decay (1 inside a document, 0 where a new one
starts); a short convolution drops the taps that reach into an earlier document.

A document is a *run* of equal ids: a new one starts wherever the id changes (a recurrence
cannot return to an earlier document, so ``[0, 0, 1, 0]`` holds three documents). Hydra's
sparse global attention, workspace and chunk routing and the short convolutions use the same
runs, so that every layer of a recurrent model agrees on where a document begins. (The
attention op compares ids, as attention kernels do; for ids that increase along a row — what
``data.packed_documents`` produces — runs and equal ids are the same documents.)
"""

from __future__ import annotations

import jax
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
    # the first column sliced from the ids, not from `changed`: that is empty at length 1
    first = jnp.zeros_like(segment_ids[:, :1], dtype=bool)
    return jnp.concatenate([first, changed], axis=1)


def keep_factor(segment_ids, batch: int, length: int):
    """float32 ``[batch, length]``: 0 where a document starts (the decay onto the previous
    state), 1 elsewhere; all ones without ``segment_ids``."""
    if segment_ids is None:
        return jnp.ones((batch, length), jnp.float32)
    starts = document_starts(check_segment_ids(segment_ids, batch, length))
    return jnp.where(starts, 0.0, 1.0).astype(jnp.float32)


def refuse_while_decoding(segment_ids, cache):
    """A ValueError if both are given: decode paths that read a cache (SGA, routing, the
    workspace) hold one document and do not take ids."""
    if segment_ids is not None and cache is not None:
        raise ValueError("segment_ids: decoding with a cache runs one document; packed "
                         "documents are for the full forward pass")


def document_index(segment_ids):
    """int32 ``[batch, length]``: the run number of every token's document (0 for the first
    run of a row, +1 at every :func:`document_starts`)."""
    return jnp.cumsum(document_starts(segment_ids).astype(jnp.int32), axis=1)


def document_first_position(segment_ids):
    """int32 ``[batch, length]``: the position of the first token of every token's document,
    so position ``j`` is in the document of token ``t`` iff ``first[t] <= j <= t``."""
    length = segment_ids.shape[1]
    positions = jnp.arange(length, dtype=jnp.int32)[None, :]
    return jax.lax.cummax(jnp.where(document_starts(segment_ids), positions, 0), axis=1)


# Sequence-parallel scans (:mod:`jaxsparse.ops.sequence_scan`): the starts are found on the
# whole sequence, then each shard resets its own scan.

def with_document_starts(seq, segment_ids, batch, length):
    """Sequence-parallel scans: ``seq`` plus ``"starts"`` (int32 ``[batch, length]``, 1 where a
    document starts), found on the whole sequence so that a shard knows whether its first
    token opens a document (its own ``segment_ids`` slice could not tell)."""
    if segment_ids is None:
        return seq
    starts = document_starts(check_segment_ids(segment_ids, batch, length))
    return seq | {"starts": starts.astype(jnp.int32)}


def shard_documents(seq, initial):
    """Inside one shard: ``(segment_ids, initial)`` for its scan. Ids count the starts (a reset
    at every start after the first position); a start at the first position drops the state
    entering the shard instead."""
    if "starts" not in seq:
        return None, initial
    starts = seq["starts"]
    if initial is not None:
        keep_first = (1 - starts[:, 0]).astype(initial.dtype)
        initial = initial * keep_first.reshape((-1,) + (1,) * (initial.ndim - 1))
    return jnp.cumsum(starts, axis=1), initial


def shard_keeps_state(seq):
    """``[batch]``: 1 if no document starts in this shard (its total decay carries the
    entering state through), else 0."""
    if "starts" not in seq:
        return None
    return jnp.prod(1 - seq["starts"], axis=1).astype(jnp.float32)
