"""Context-parallel (ring) attention: queries, keys and values split along the sequence.

Each of the ``n`` devices on the mesh axis holds one contiguous chunk of the sequence. Keys
and values travel around the ring (``ppermute`` to the next device) for ``n`` steps; at every
step a device scores its own queries against the key/value chunk it holds and folds the
result into a running (max, sum, output) online softmax, so no device ever holds more than
two chunks of keys and values (Liu et al. 2023, "Ring Attention with Blockwise
Transformers"; the online softmax of Milakov & Gimelshein 2018).

Masks are evaluated from global positions (``Mask.allowed`` on ``chunk * index + offset``),
so causal, sliding-window, chunked, strided, global-token and per-head masks all work, and
segment ids travel with their keys. A step whose chunk pair is entirely masked (the future,
under a causal mask; far away, under a window) skips its matmuls with ``lax.cond``. The
causal load imbalance this leaves (the last device works ``n`` steps, the first one) is what
striped/zig-zag layouts fix; they reorder tokens, which this version does not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxsparse.ops.attention.reference import MASK_VALUE, soft_cap
from jaxsparse.ops.masks import Mask, MultiHeadMask


def _allowed(mask, q_len, kv_len, q_pos, kv_pos):
    """Boolean ``[H or 1, Sq, Tc]`` for global positions ``q_pos [Sq]`` x ``kv_pos [Tc]``."""
    if mask is None:
        return jnp.ones((1, q_pos.size, kv_pos.size), bool)
    rows, cols = q_pos[:, None], kv_pos[None, :]
    if isinstance(mask, MultiHeadMask):
        return jnp.stack([jnp.broadcast_to(m.allowed_fn(q_len, kv_len)(rows, cols),
                                           (q_pos.size, kv_pos.size)) for m in mask.masks])
    return jnp.broadcast_to(mask.allowed_fn(q_len, kv_len)(rows, cols),
                            (q_pos.size, kv_pos.size))[None]


def ring_attention(q, k, v, *, mesh: Mesh, axis: str = "sequence", mask: Mask | None = None,
                   segment_ids=None, scale: float | None = None,
                   logits_soft_cap: float | None = None):
    """``dot_product_attention`` with the sequence split over mesh axis ``axis``.

    Args:
      q: ``[B, S, Hq, D]``; k, v: ``[B, T, Hkv, D]`` (``Hq % Hkv == 0``); ``S`` and ``T`` must
        be divisible by the axis size (the shards hold equal chunks).
      mask: a lazy :class:`Mask` (or ``MultiHeadMask``) over global positions, or None.
      segment_ids: ``[B, S]`` integers (needs ``S == T``) or a ``(q, kv)`` pair.
      Other axes of ``mesh`` stay under the compiler's automatic sharding.

    Returns ``[B, S, Hq, D]`` in ``q.dtype``, equal to the single-device result; rows with
    nothing to attend to are zero.
    """
    n = mesh.shape.get(axis)
    if n is None:
        raise ValueError(f"mesh {dict(mesh.shape)} has no axis {axis!r} to split the sequence over")
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q{q.shape}, k{k.shape}, v{v.shape}: expected q [B, S, Hq, D] and "
                         "k, v [B, T, Hkv, D]")
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")
    for name, length in (("query length S", q_len), ("key length T", kv_len)):
        if length % n:
            raise ValueError(f"ring attention: {name}={length} must be divisible by mesh axis "
                             f"{axis!r} of size {n}")
    if isinstance(mask, Mask):
        mask.check_size(q_len, kv_len)
        if mask.num_heads is not None and mask.num_heads != q_heads:
            raise ValueError(f"mask is a MultiHeadMask of {mask.num_heads} heads; q has {q_heads}")
    elif mask is not None:
        raise ValueError(f"ring attention needs a lazy Mask object (got {type(mask).__name__}): "
                         "it evaluates the mask at global positions on each shard")
    if segment_ids is None:
        q_seg = kv_seg = jnp.zeros((batch, q_len), jnp.int32)
        if kv_len != q_len:
            kv_seg = jnp.zeros((batch, kv_len), jnp.int32)
    elif isinstance(segment_ids, tuple | list):
        q_seg, kv_seg = segment_ids
    else:
        if q_len != kv_len:
            raise ValueError("a single segment_ids array needs S == T; pass a (q, kv) pair")
        q_seg = kv_seg = segment_ids
    scale = head_dim**-0.5 if scale is None else scale
    groups = q_heads // kv_heads
    q_chunk, kv_chunk = q_len // n, kv_len // n

    def block(carry, q_g, k_c, v_c, allowed):
        """Fold one key/value chunk into the running online softmax."""
        peak, denom, acc = carry
        logits = jnp.einsum("bshgd,bthd->bhgst", q_g, k_c, preferred_element_type=jnp.float32)
        logits = soft_cap(logits * scale, logits_soft_cap)
        logits = jnp.where(allowed, logits, MASK_VALUE)
        new_peak = jnp.maximum(peak, jax.lax.stop_gradient(jnp.max(logits, axis=-1)))
        weights = jnp.where(allowed, jnp.exp(logits - new_peak[..., None]), 0.0)
        correction = jnp.exp(peak - new_peak)
        denom = denom * correction + jnp.sum(weights, axis=-1)
        acc = acc * correction[..., None] + jnp.einsum(
            "bhgst,bthd->bhgsd", weights, v_c.astype(jnp.float32))
        return new_peak, denom, acc

    block = jax.checkpoint(block)  # keep one chunk's logits alive at a time in the backward

    def local(q_c, k_c, v_c, q_seg_c, kv_seg_c):
        index = jax.lax.axis_index(axis)
        q_pos = index * q_chunk + jnp.arange(q_chunk)
        q_g = q_c.reshape(batch, q_chunk, kv_heads, groups, head_dim)
        shape = (batch, kv_heads, groups, q_chunk)
        carry = (jnp.full(shape, MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
                 jnp.zeros(shape + (head_dim,), jnp.float32))
        # the running statistics differ per shard: say so, or both branches of the cond
        # below would disagree on their type
        carry = jax.tree.map(lambda t: jax.lax.pcast(t, axis, to="varying"), carry)
        ring = [(i, (i + 1) % n) for i in range(n)]

        def step(state, s):
            carry, k_c, v_c, kv_seg_c = state
            source = (index - s) % n  # the shard whose keys this device holds at step s
            kv_pos = source * kv_chunk + jnp.arange(kv_chunk)
            allowed = _allowed(mask, q_len, kv_len, q_pos, kv_pos)  # [H or 1, Sq, Tc]
            allowed = allowed.reshape(-1, 1, q_chunk, kv_chunk) if allowed.shape[0] == 1 else \
                allowed.reshape(kv_heads, groups, q_chunk, kv_chunk)
            same = q_seg_c[:, :, None] == kv_seg_c[:, None, :]  # [B, Sq, Tc]
            allowed = allowed[None] & same[:, None, None]  # [B, Hkv|1, G|1, Sq, Tc]
            carry = jax.lax.cond(jnp.any(allowed), lambda c: block(c, q_g, k_c, v_c, allowed),
                                 lambda c: c, carry)
            k_c, v_c, kv_seg_c = (jax.lax.ppermute(t, axis, ring) for t in (k_c, v_c, kv_seg_c))
            return (carry, k_c, v_c, kv_seg_c), None

        (carry, *_), _ = jax.lax.scan(step, (carry, k_c, v_c, kv_seg_c), jnp.arange(n))
        _, denom, acc = carry
        out = acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]  # [B, Hkv, G, Sq, D]
        out = out.transpose(0, 3, 1, 2, 4).reshape(batch, q_chunk, q_heads, head_dim)
        return out.astype(q_c.dtype)

    seq = P(None, axis, None, None)
    with jax.named_scope("ring_attention"):  # findable in profiles and HLO metadata
        return jax.shard_map(local, mesh=mesh,
                             in_specs=(seq, seq, seq, P(None, axis), P(None, axis)),
                             out_specs=seq, axis_names={axis})(q, k, v, q_seg, kv_seg)


__all__ = ["ring_attention"]
