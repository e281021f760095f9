"""How the layers keep their key/value decode caches between steps: without size-1 axes.

A decode loop carries the caches from step to step (``lax.scan``, ``fori_loop``), and a step
writes a slot (``dynamic_update_slice``) and then reads every slot in a matmul. When a cache
has an axis of size 1 — batch 1 (one sequence, the usual generation) or one key/value head —
XLA:CPU drops that axis for the matmul, and its fusion pass then computes the write twice,
once in the carried shape and once in the matmul's, copying the whole cache two or three
times a step: at batch 1, 8 key/value heads of 64 and 4k slots, a step of write and read took
0.77-1.07 ms instead of 0.09 ms (0.12-0.13 ms instead of 0.02 ms with one head). Kept without
those axes, the carried buffer already has the matmul's shape; the layers hand the ops a
full-rank view of it (a reshape: no data moves), and XLA folds the two reshapes away.

Where it is used: the attention layers' heads-first caches and ring buffers with several
key/value heads, and the SGA layer's rings. Not for an attention cache that
``decode_attention`` reads only as far as it is written (at least ``READ_WRITTEN_FROM_SLOTS``
slots): that read sits in a ``lax.cond``, where the 4-d cache is not copied and a squeezed one
was (``Attention._keep``). Not for one key/value head in the attention layer
(the dense reference reads that cache sequence first, and the 4-d cache decoded faster:
squeezed 0.75-0.89x, ``jaxsparse bench decode``) nor for sequence-first caches (the SGA's
cache of every position squeezed: 18 vs 8-10 ms a token in hydra_29m at batch 1 after 4k
tokens; routing attention's: 1.14 vs 0.51 ms in routing_tiny after 1k).
"""

from __future__ import annotations

import math

import jax


def stored(cache: jax.Array) -> jax.Array:
    """``cache`` as a layer keeps it: its axes of size 1 dropped."""
    return cache.reshape(tuple(n for n in cache.shape if n != 1))


def viewed(cache: jax.Array, *leading: int | None, name: str = "cache") -> jax.Array:
    """The full-rank view of a stored cache whose axes are ``leading``, ``None`` marking the
    slots axis, whose size is worked out from the cache's: ``viewed(k, batch, heads, None,
    head_dim)`` gives ``[batch, heads, slots, head_dim]``. A cache of any other shape (one
    made for another batch size, say) is refused by ``name``: reshaped, it would silently
    mix rows and slots."""
    known = math.prod(n for n in leading if n is not None)
    slots = cache.size // known if known else 0
    full = tuple(slots if n is None else n for n in leading)
    if tuple(cache.shape) not in (full, tuple(n for n in full if n != 1)):
        axes = ", ".join("slots" if n is None else str(n) for n in leading)
        raise ValueError(f"{name} of shape {tuple(cache.shape)}: expected [{axes}] (maybe "
                         "without its size-1 axes), the layout init_cache gives for this "
                         "input; was the cache made for another batch size?")
    return cache.reshape(full)


__all__ = ["stored", "viewed"]
