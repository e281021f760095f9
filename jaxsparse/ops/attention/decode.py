"""Attention of a few new query tokens against a key/value cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.ops.attention.api import (check_attention_inputs, lazy_mask,
                                         static_logit_options)
from jaxsparse.ops.attention.decode_blocks import KEY_BLOCK, written_blocks_attention
from jaxsparse.ops.attention.reference import xla_attention
from jaxsparse.ops.checks import is_integer
from jaxsparse.ops.concrete import concrete_values
from jaxsparse.ops.masks import Mask, MultiHeadMask


# A cache of at least this many slots (and no ring buffer) is read only as far as it is
# written while that is at most half of it; smaller caches are read whole (with 1000 slots,
# 300 written, the blocks took ~1.9x the dense pass: too few keys to skip).
READ_WRITTEN_FROM_SLOTS = 8 * KEY_BLOCK


def reads_written_part(slots: int) -> bool:
    """Whether ``decode_attention`` may read a cache of ``slots`` positions (no ring buffer)
    only as far as it is written."""
    return slots >= READ_WRITTEN_FROM_SLOTS


def checked_cache_lengths(lengths, batch: int, new: int, slots: int | None):
    """``lengths`` as int32 ``[batch]`` (a scalar is broadcast). Concrete values are checked:
    at least the ``new`` query tokens, and at most ``slots`` without a ring buffer (positions
    past the cache would silently be missing); traced values cannot be checked here."""
    lengths = jnp.asarray(lengths)
    if lengths.ndim > 1 or lengths.size not in (1, batch) or not jnp.issubdtype(
            lengths.dtype, jnp.integer):
        raise ValueError(f"lengths of shape {lengths.shape} and dtype {lengths.dtype}: expected "
                         f"integers of shape [batch={batch}] or a scalar")
    lengths = jnp.broadcast_to(lengths.astype(jnp.int32).reshape(-1), (batch,))
    values = concrete_values(lengths)
    if values is not None:
        low, high = int(values.min()), int(values.max())
        if low < new or (slots is not None and high > slots):
            allowed = f"in [{new}, {slots}] (the cache has {slots} slots)" if slots else f">= {new}"
            raise ValueError(f"lengths={values.tolist()}: each must be {allowed}; "
                             f"a length counts the {new} new tokens")
    return lengths


def nan_past_the_cache(out, lengths, new: int, slots: int):
    """``out [B, ...]`` with NaN in the rows whose traced ``lengths`` fall outside
    ``[new, slots]`` (concrete ones were refused by :func:`checked_cache_lengths`). Under jit a
    position past a cache of every position cannot raise: its keys were written clamped by
    ``dynamic_update_slice`` over the last slots and its reads would be silently wrong; NaN
    makes them loud, as JAX's ``mode="fill"`` does for gathers out of bounds."""
    if concrete_values(lengths) is not None:
        return out
    outside = (lengths < new) | (lengths > slots)
    return jnp.where(outside.reshape((-1,) + (1,) * (out.ndim - 1)), jnp.nan, out)


def check_new_positions_fit(index, new: int, slots: int) -> None:
    """``new`` tokens written from position ``index`` fit a cache of every position with
    ``slots`` slots (where ``index`` is concrete; traced: :func:`nan_past_the_cache`).
    Named as the caller passed it, the index, not the lengths it implies. More new tokens
    than slots are refused whatever the index (under jit the write failed inside XLA)."""
    first = concrete_values(index)
    if first is not None and int(first) + new > slots:
        raise ValueError(f"index={int(first)} with {new} new tokens needs index + {new} <= "
                         f"{slots}, the cache's slots")
    if new > slots:  # known from the shapes, whatever the (traced) index
        raise ValueError(f"{new} new tokens need index + {new} <= {slots}, the cache's slots: "
                         "more than the cache holds")


def checked_first_position(index):
    """``index`` (the position of the first new token, where a ring buffer's caller keeps no
    lengths) as an int32 scalar: an integer scalar, >= 0 where it is concrete."""
    index = jnp.asarray(index)
    if index.ndim != 0 or not jnp.issubdtype(index.dtype, jnp.integer):
        raise ValueError(f"index of shape {index.shape} and dtype {index.dtype}: expected an "
                         "integer scalar (the position of the first new token)")
    first = concrete_values(index)
    if first is not None and first < 0:
        raise ValueError(f"index={int(first)}: must be >= 0 (the position of the first new "
                         "token)")
    return index.astype(jnp.int32)


def ring_positions(lengths, slots: int):
    """``[B, slots]``: the position each slot of a ring buffer holds (slot = position mod
    slots) after ``lengths [B]`` positions were written — the newest that maps to it,
    negative for a slot never written."""
    last = lengths[:, None] - 1
    return last - ((last - jnp.arange(slots)[None, :]) % slots)


def allowed_at(q_pos, kv_pos, mask: Mask | None, window: int | None, mask_len: int):
    """Which of the keys at ``kv_pos [B, T]`` (negative: an empty slot) each query at
    ``q_pos [B, L]`` may read: causal, within ``window`` when given, and allowed by ``mask``
    (evaluated on absolute positions; length-dependent patterns for ``mask_len`` positions).
    Booleans ``[B, 1 or heads, L, T]``."""
    kq, kk = q_pos[:, :, None], kv_pos[:, None, :]
    allowed = (kk <= kq) & (kk >= 0)
    if window is not None:
        allowed = allowed & (kk > kq - window)
    allowed = allowed[:, None]
    if isinstance(mask, MultiHeadMask):
        shape = (q_pos.shape[0], q_pos.shape[1], kv_pos.shape[1])
        per_head = [jnp.broadcast_to(m.allowed_fn(mask_len, mask_len)(kq, kk), shape)
                    for m in mask.masks]
        allowed = allowed & jnp.stack(per_head, axis=1)
    elif mask is not None:
        allowed = allowed & mask.allowed_fn(mask_len, mask_len)(kq, kk)[:, None]
    return allowed


def _seq_first(cache):
    """The shape and dtype of ``cache.swapaxes(1, 2)`` (nothing is moved)."""
    shape = tuple(cache.shape)
    if len(shape) > 2:
        shape = (shape[0], shape[2], shape[1], *shape[3:])
    return jax.ShapeDtypeStruct(shape, cache.dtype)


def decode_attention(q, k_cache, v_cache, lengths, *, mask: Mask | str | None = None,
                     scale: float | None = None, logits_soft_cap: float | None = None,
                     window: int | None = None, heads_first: bool = False,
                     written_only: bool | None = None):
    """Queries ``q [B, L, Hq, D]`` at positions ``lengths - L ... lengths - 1`` attend to
    cache slots ``[B, C, Hkv, D]`` holding positions ``0 .. lengths - 1``.

    ``heads_first=True``: the caches are ``[B, Hkv, C, D]``, the layout the layers keep. A
    step reads the cache head by head, and in that layout each head's slots lie together;
    from ``[B, C, Hkv, D]`` XLA:CPU copied the whole cache into it at every step (a decode
    loop at batch 4, 4k slots, 8 key/value heads of 64 took ~7x as long;
    ``jaxsparse bench decode``).

    With ``window`` set, the cache is a ring buffer of ``C`` slots (slot = position mod C)
    holding the last ``C`` positions; keys further than ``window - 1`` behind a query are
    masked. ``mask`` (a lazy mask over absolute positions, per head for a ``MultiHeadMask``,
    or its spec string) is applied on top of causality; masks whose pattern depends on the
    sequence length (BigBird) are evaluated for a sequence of ``C`` positions.

    Without ``window``, a cache of at least ``READ_WRITTEN_FROM_SLOTS`` slots that is at most
    half written is read only as far as it is written, a block of keys at a time
    (``decode_blocks``): a long cache decoding a short context does not pay for its empty
    slots. The choice is made on the values of ``lengths`` (by ``lax.cond`` when traced);
    ``written_only=True`` or ``False`` makes it instead (True: not with ``window``).
    """
    if not isinstance(heads_first, bool):
        raise ValueError(f"heads_first={heads_first!r}: must be True or False")
    if not (written_only is None or isinstance(written_only, bool)) or (
            written_only and window is not None):
        raise ValueError(f"written_only={written_only!r}: must be None (decide by the lengths), "
                         "True or False; True reads a cache of positions 0.., not a ring "
                         "buffer (window)")
    if heads_first:  # checked in the [B, C, Hkv, D] order the messages speak of
        check_attention_inputs(q, _seq_first(k_cache), _seq_first(v_cache),
                               names=("q", "k_cache.swapaxes(1, 2)", "v_cache.swapaxes(1, 2)"))
    else:
        check_attention_inputs(q, k_cache, v_cache, names=("q", "k_cache", "v_cache"))
    scale, logits_soft_cap = static_logit_options(scale, logits_soft_cap)
    batch, new, q_heads, head_dim = q.shape
    slots = k_cache.shape[2 if heads_first else 1]
    if window is not None and (not is_integer(window) or not 1 <= window <= slots):
        raise ValueError(f"window={window!r}: must be an integer in [1, {slots}] (the cache "
                         "slots)")
    if window is not None and window + new - 1 > slots:
        # the earliest query reads window - 1 keys behind it, which the ring has overwritten
        raise ValueError(f"window={window} with {new} new queries needs window + {new} - 1 <= "
                         f"slots={slots}: the ring buffer no longer holds the keys the earlier "
                         "queries read (window_cache_decode reads a prompt beside the cache)")
    lengths = checked_cache_lengths(lengths, batch, new, None if window is not None else slots)
    mask = lazy_mask(mask, q_heads)
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(f"mask={mask!r:.80}: expected a Mask, a mask spec string or None")
    if isinstance(mask, MultiHeadMask) and mask.num_heads != q_heads:
        raise ValueError(f"mask has {mask.num_heads} heads; q has {q_heads}")
    if mask is not None and window is None:
        mask.check_size(slots, slots)  # evaluated for C positions: a smaller layout was clipped
    elif mask is not None and not mask.length_free:
        raise ValueError(f"mask={mask!r:.80} depends on the sequence length; a ring buffer "
                         "(window) holds positions past its slots, for which it has no length: "
                         "use a cache of every position (no window)")
    q_pos = lengths[:, None] - new + jnp.arange(new)[None, :]  # [B, L]
    scale = head_dim**-0.5 if scale is None else scale
    k_cache, v_cache = k_cache.astype(q.dtype), v_cache.astype(q.dtype)

    def every_slot():
        slot = jnp.arange(slots)[None, :]
        if window is None:
            kv_pos = jnp.broadcast_to(slot, (batch, slots))
        else:
            kv_pos = ring_positions(lengths, slots)
        allowed = allowed_at(q_pos, kv_pos, mask, window, slots)
        return xla_attention(q, k_cache, v_cache, allowed, scale, logits_soft_cap,
                             kv_heads_first=heads_first)

    if written_only is False or (written_only is None and (
            window is not None or not reads_written_part(slots))):
        out = every_slot()
        return out if window is not None else nan_past_the_cache(out, lengths, new, slots)

    def written_slots():
        return written_blocks_attention(
            q, k_cache, v_cache, q_pos, lambda q_pos, kv_pos: allowed_at(
                q_pos, kv_pos, mask, None, slots), scale, logits_soft_cap,
            kv_heads_first=heads_first)

    if written_only:
        return nan_past_the_cache(written_slots(), lengths, new, slots)
    # reading block by block pays while at most half the cache is written (decode_blocks)
    mostly_empty = 2 * jnp.max(lengths) <= slots
    known = concrete_values(mostly_empty)
    if known is not None:
        return written_slots() if known else every_slot()
    return nan_past_the_cache(jax.lax.cond(mostly_empty, written_slots, every_slot), lengths,
                              new, slots)


def _checked_heads_first_caches(k_cache, v_cache, k_new) -> int:
    """The slot count of heads-first caches ``[B, Hkv, slots, D]`` that must match the new
    keys ``k_new [B, L, Hkv, D]``; a clear error otherwise."""
    batch, _, kv_heads, head_dim = k_new.shape
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape or \
            k_cache.shape[:2] != (batch, kv_heads) or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache{tuple(k_cache.shape)} and v_cache{tuple(v_cache.shape)} must "
                         f"both be [batch={batch}, kv_heads={kv_heads}, slots, "
                         f"head_dim={head_dim}]")
    return k_cache.shape[2]


def full_cache_decode(q, k_new, v_new, k_cache, v_cache, index, *,
                      mask: Mask | str | None = None, scale: float | None = None,
                      logits_soft_cap: float | None = None):
    """Decode ``L`` new tokens at positions ``index .. index + L - 1`` against a cache of
    every position: ``k_cache, v_cache [B, Hkv, C, D]`` (heads first, slot = position)
    holding positions ``0 .. index - 1``. The new keys and values are written into their
    slots, then the queries read every slot up to their own position (causal, and ``mask``
    on top, as ``decode_attention``). ``q [B, L, Hq, D]``, ``k_new, v_new [B, L, Hkv, D]``;
    returns ``(out [B, L, Hq, D], k_cache, v_cache)``. A prompt longer than ``PROMPT_CHUNK``
    is read that many queries at a time (``O(PROMPT_CHUNK · C)`` memory, not ``O(L · C)``).

    A concrete ``index`` is checked against the ``C`` slots; a traced one cannot be: positions
    past the cache are written clamped by ``dynamic_update_slice`` and their outputs are NaN
    (:func:`nan_past_the_cache`) — the caller sizes the cache (``generate`` allocates the
    prompt plus the new tokens)."""
    check_attention_inputs(q, k_new, v_new, names=("q", "k_new", "v_new"))
    new = q.shape[1]
    slots = _checked_heads_first_caches(k_cache, v_cache, k_new)
    index = checked_first_position(index)
    check_new_positions_fit(index, new, slots)
    lengths = checked_cache_lengths(index + new, q.shape[0], new, slots)
    at = (0, 0, index, 0)
    k_cache, v_cache = (jax.lax.dynamic_update_slice(cache, x.swapaxes(1, 2).astype(cache.dtype),
                                                     at)
                        for cache, x in ((k_cache, k_new), (v_cache, v_new)))
    out = _queries_in_chunks(
        lambda q, lengths: decode_attention(q, k_cache, v_cache, lengths, mask=mask, scale=scale,
                                            logits_soft_cap=logits_soft_cap, heads_first=True),
        q, lengths)
    return out, k_cache, v_cache


# A prompt longer than this is read in chunks of this many queries: by a cache of every
# position, each chunk against the slots up to its last query (reading them all at once took
# O(L · C) memory), by a window cache each against the W keys before the chunk and its own
# (every query reading the ring and all the new keys took O(L · (W + L)) time and memory).
PROMPT_CHUNK = 256


def _queries_in_chunks(attend, q, lengths):
    """``attend(q, lengths)`` for the new queries ``q [B, L, Hq, D]`` ending at ``lengths``,
    ``PROMPT_CHUNK`` queries at a time (the last run of fewer by itself)."""
    batch, new = q.shape[:2]
    full, rest = divmod(new, PROMPT_CHUNK)
    if full <= 1 and not (full and rest):
        return attend(q, lengths)
    first = lengths - new                                               # [B]
    runs = q[:, :full * PROMPT_CHUNK].reshape(batch, full, PROMPT_CHUNK, *q.shape[2:])
    ends = first[None, :] + PROMPT_CHUNK * jnp.arange(1, full + 1)[:, None]   # [runs, B]
    out = jax.lax.map(lambda run: attend(*run), (runs.swapaxes(0, 1), ends))
    out = out.swapaxes(0, 1).reshape(batch, full * PROMPT_CHUNK, *q.shape[2:])
    if rest:
        out = jnp.concatenate([out, attend(q[:, full * PROMPT_CHUNK:], lengths)], axis=1)
    return out


def _window_prompt_in_chunks(q, k_new, v_new, k_cache, v_cache, index, mask, scale,
                             logits_soft_cap):
    """``window_cache_decode``'s attention for a long prompt: ``q [B, L, Hq, D]`` at positions
    ``index ..`` against the ring ``k_cache, v_cache [B, Hkv, W, D]`` (the ``W`` positions
    before ``index``) and the new ``k_new, v_new [B, Hkv, L, D]``. The ring is put in position
    order before the new keys, so the keys a chunk of queries may read (the mask looks back at
    most ``W``) are one contiguous run: the ``W`` before the chunk and the chunk's own."""
    batch, new, q_heads, head_dim = q.shape
    slots, chunk = k_cache.shape[2], PROMPT_CHUNK
    by_position = (index + jnp.arange(slots)) % slots  # the slots of index - W .. index - 1
    padded = -(-new // chunk) * chunk
    keys, values = (jnp.pad(jnp.concatenate([jnp.take(c, by_position, axis=2), x], axis=2),
                            ((0, 0), (0, 0), (0, padded - new), (0, 0))).astype(q.dtype)
                    for c, x in ((k_cache, k_new), (v_cache, v_new)))  # [B, Hkv, W + L', D]
    queries = jnp.pad(q, ((0, 0), (0, padded - new), (0, 0), (0, 0)))

    def one(start):
        q_pos = jnp.broadcast_to(index + start + jnp.arange(chunk), (batch, chunk))
        kv_pos = jnp.broadcast_to(index - slots + start + jnp.arange(slots + chunk),
                                  (batch, slots + chunk))
        allowed = allowed_at(q_pos, kv_pos, mask, slots, slots)  # slots before 0: negative
        return xla_attention(jax.lax.dynamic_slice_in_dim(queries, start, chunk, axis=1),
                             jax.lax.dynamic_slice_in_dim(keys, start, slots + chunk, axis=2),
                             jax.lax.dynamic_slice_in_dim(values, start, slots + chunk, axis=2),
                             allowed, scale, logits_soft_cap, kv_heads_first=True)

    out = jax.lax.map(one, jnp.arange(0, padded, chunk))         # [chunks, B, chunk, Hq, D]
    return jnp.moveaxis(out, 0, 1).reshape(batch, padded, q_heads, head_dim)[:, :new]


def window_cache_decode(q, k_new, v_new, k_cache, v_cache, index, *,
                        mask: Mask | str | None = None, scale: float | None = None,
                        logits_soft_cap: float | None = None):
    """Decode ``L`` new tokens at positions ``index .. index + L - 1`` against a
    sliding-window cache: ring buffers ``k_cache, v_cache [B, Hkv, W, D]`` (heads first)
    holding the last ``W`` positions before ``index``, for a ``mask`` that reads at most the
    ``W`` most recent positions (``mask.lookback() <= W``: a causal window, chunked causal
    attention, per-head windows). Memory and time per token grow with ``W``, not with the
    length decoded. ``q [B, L, Hq, D]``, ``k_new, v_new [B, L, Hkv, D]``; returns
    ``(out [B, L, Hq, D], k_cache, v_cache)`` with the new keys and values kept.

    One token (generation) is written first, over the position ``W`` behind it that it no
    longer reads, and attended as ``decode_attention``'s ring buffer. Several (a prompt) read
    the cache as it was and their own keys side by side — written first, they would overwrite
    keys the earliest of them still reads — and then only the last ``W`` are kept. A prompt
    longer than ``PROMPT_CHUNK`` is read that many queries at a time, each chunk against the
    ``W`` positions before it and its own keys: ``O(L · (W + chunk))``, not ``O(L · (W + L))``."""
    check_attention_inputs(q, k_new, v_new, names=("q", "k_new", "v_new"))
    scale, logits_soft_cap = static_logit_options(scale, logits_soft_cap)
    batch, new, q_heads, head_dim = q.shape
    slots = _checked_heads_first_caches(k_cache, v_cache, k_new)
    mask = lazy_mask(mask, q_heads)
    if not isinstance(mask, Mask):
        raise TypeError(f"mask={mask!r:.80}: expected a Mask or a mask spec string")
    if isinstance(mask, MultiHeadMask) and mask.num_heads != q_heads:
        raise ValueError(f"mask has {mask.num_heads} heads; q has {q_heads}")
    if mask.lookback() is None or mask.lookback() > slots:
        raise ValueError(f"mask={mask!r:.80} reads back {mask.lookback() or 'without bound'}: "
                         f"a window cache of {slots} slots serves masks that read at most the "
                         f"{slots} most recent positions (Mask.lookback)")
    index = checked_first_position(index)
    lengths = checked_cache_lengths(index + new, batch, new, None)
    k_new, v_new = (x.swapaxes(1, 2).astype(k_cache.dtype) for x in (k_new, v_new))
    if new == 1:
        at = (0, 0, index % slots, 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_new, at)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_new, at)
        out = decode_attention(q, k_cache, v_cache, lengths, mask=mask, scale=scale,
                               logits_soft_cap=logits_soft_cap, window=slots, heads_first=True)
        return out, k_cache, v_cache
    scale = head_dim**-0.5 if scale is None else scale
    if new > PROMPT_CHUNK:
        out = _window_prompt_in_chunks(q, k_new, v_new, k_cache, v_cache, index, mask, scale,
                                       logits_soft_cap)
    else:
        q_pos = lengths[:, None] - new + jnp.arange(new)[None, :]  # [B, L]
        kv_pos = jnp.concatenate([ring_positions(lengths - new, slots), q_pos], axis=1)
        allowed = allowed_at(q_pos, kv_pos, mask, slots, slots)
        keys, values = (jnp.concatenate([c, x], axis=2).astype(q.dtype)
                        for c, x in ((k_cache, k_new), (v_cache, v_new)))
        out = xla_attention(q, keys, values, allowed, scale, logits_soft_cap,
                            kv_heads_first=True)
    keep = min(new, slots)  # the last `keep` new positions, each into its slot
    kept = (index + new - keep + jnp.arange(keep)) % slots
    k_cache = k_cache.at[:, :, kept].set(k_new[:, :, new - keep:])
    v_cache = v_cache.at[:, :, kept].set(v_new[:, :, new - keep:])
    return out, k_cache, v_cache


__all__ = ["decode_attention", "full_cache_decode", "window_cache_decode"]
