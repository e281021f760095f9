"""Attention of a few new query tokens against a key/value cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.ops.attention.api import (check_attention_inputs, lazy_mask,
                                         static_logit_options)
from jaxsparse.ops.attention.reference import xla_attention
from jaxsparse.ops.checks import is_integer
from jaxsparse.ops.concrete import concrete_values
from jaxsparse.ops.masks import Mask, MultiHeadMask


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


def _seq_first(cache):
    """The shape and dtype of ``cache.swapaxes(1, 2)`` (nothing is moved)."""
    shape = tuple(cache.shape)
    if len(shape) > 2:
        shape = (shape[0], shape[2], shape[1], *shape[3:])
    return jax.ShapeDtypeStruct(shape, cache.dtype)


def decode_attention(q, k_cache, v_cache, lengths, *, mask: Mask | str | None = None,
                     scale: float | None = None, logits_soft_cap: float | None = None,
                     window: int | None = None, heads_first: bool = False):
    """Queries ``q [B, L, Hq, D]`` at positions ``lengths - L ... lengths - 1`` attend to
    cache slots ``[B, C, Hkv, D]`` holding positions ``0 .. lengths - 1``.

    ``heads_first=True``: the caches are ``[B, Hkv, C, D]``, the layout the layers keep. A
    step reads every slot of the cache, and in that layout each head's slots lie together;
    from ``[B, C, Hkv, D]`` XLA:CPU copied the whole cache into it at every step (a decode
    loop at batch 4, 4k slots, 8 key/value heads of 64 took 7.5x as long;
    ``jaxsparse bench decode``).

    With ``window`` set, the cache is a ring buffer of ``C`` slots (slot = position mod C)
    holding the last ``C`` positions; keys further than ``window - 1`` behind a query are
    masked. ``mask`` (a lazy mask over absolute positions, per head for a ``MultiHeadMask``,
    or its spec string)
    is applied on top of causality; masks whose pattern depends on the sequence length
    (BigBird) are evaluated for a sequence of ``C`` positions.
    """
    if not isinstance(heads_first, bool):
        raise ValueError(f"heads_first={heads_first!r}: must be True or False")
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
    lengths = checked_cache_lengths(lengths, batch, new, None if window is not None else slots)
    mask = lazy_mask(mask, q_heads)
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(f"mask={mask!r:.80}: expected a Mask, a mask spec string or None")
    q_pos = lengths[:, None] - new + jnp.arange(new)[None, :]  # [B, L]
    slot = jnp.arange(slots)[None, :]
    if window is None:
        kv_pos = jnp.broadcast_to(slot, (batch, slots))
    else:
        # the newest position written to each slot, given `lengths` positions so far
        last = lengths[:, None] - 1
        kv_pos = last - ((last - slot) % slots)
    kq, kk = q_pos[:, :, None], kv_pos[:, None, :]
    allowed = (kk <= kq) & (kk >= 0)
    if window is not None:
        allowed = allowed & (kk > kq - window)
    allowed = allowed[:, None]  # [B, 1, L, C]
    if isinstance(mask, MultiHeadMask):
        if mask.num_heads != q_heads:
            raise ValueError(f"mask has {mask.num_heads} heads; q has {q_heads}")
        per_head = [jnp.broadcast_to(m.allowed_fn(slots, slots)(kq, kk), (batch, new, slots))
                    for m in mask.masks]
        allowed = allowed & jnp.stack(per_head, axis=1)
    elif mask is not None:
        allowed = allowed & mask.allowed_fn(slots, slots)(kq, kk)[:, None]
    scale = head_dim**-0.5 if scale is None else scale
    if heads_first and k_cache.shape[1] == 1:
        # one key/value head: both layouts are the same array, and XLA:CPU compiled the
        # sequence-first form's loop 1.3-1.5x faster (experiments/results/decode.md)
        k_cache, v_cache = (c.reshape(batch, slots, 1, head_dim) for c in (k_cache, v_cache))
        heads_first = False
    return xla_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), allowed,
                         scale, logits_soft_cap, kv_heads_first=heads_first)


__all__ = ["decode_attention"]
