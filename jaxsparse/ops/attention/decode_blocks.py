"""Decode attention that reads only the written part of a cache, one key block at a time.

A cache of ``C`` slots holding ``n < C`` positions: the dense pass reads all ``C`` slots and
masks the unwritten ones. This loop reads ``ceil(n / block)`` blocks and folds them with the
online softmax (``online_softmax``), the way flash-decoding splits the keys (Dao et al. 2023,
"Flash-Decoding for long-context inference"), sequentially here. On XLA:CPU a block costs
more per key than the dense pass (each block's keys are copied out of the cache and the
running sums rescaled: 1.1-1.7x the dense time with the whole cache written), so
``decode_attention`` takes this loop only while at most half the cache is written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.attention import online_softmax
from jaxsparse.ops.attention.reference import (grouped_query_rows, soft_cap,
                                               ungrouped_rows)

# Keys per block: 256 took ~0.1x the dense time with 100 of 4096 slots written (batch 4,
# 8 heads of 64, float32, XLA:CPU); 512 and 1024 lost more to the copy of each block.
KEY_BLOCK = 256


def written_blocks_attention(q, k, v, q_pos, allowed_fn, scale, logits_soft_cap, *,
                             kv_heads_first: bool, block: int = KEY_BLOCK):
    """Queries ``q [B, L, Hq, D]`` at positions ``q_pos [B, L]`` over the cache slots
    ``0 .. max(q_pos)`` of ``k, v`` (``[B, Hkv, C, D]`` if ``kv_heads_first`` else
    ``[B, C, Hkv, D]``, slot = position; blocks of at most ``C`` keys).
    ``allowed_fn(q_pos, kv_pos)`` gives the allowed keys ``[B, 1 or Hq, L, T]`` for the key
    positions ``kv_pos [B, T]``. Returns ``[B, L, Hq, D]`` in ``q.dtype``; rows with nothing
    allowed give zeros."""
    batch, q_len, q_heads, head_dim = q.shape
    seq_axis = 2 if kv_heads_first else 1
    kv_heads, slots = k.shape[3 - seq_axis], k.shape[seq_axis]
    groups = q_heads // kv_heads
    block = min(block, slots)
    kv = "bhtd" if kv_heads_first else "bthd"
    rows = grouped_query_rows(q, kv_heads)  # [B, Hkv, G·L, D], as xla_attention
    read = jnp.max(q_pos) + 1  # slots 0 .. read - 1 hold every key a query may read

    def fold(i, state):
        # the last block starts at C - block when C is not a whole number of blocks: its
        # slots before i·block were folded already and are masked here
        start = jnp.minimum(i * block, slots - block)
        k_block, v_block = (jax.lax.dynamic_slice_in_dim(x, start, block, axis=seq_axis)
                            for x in (k, v))
        kv_pos = jnp.broadcast_to(start + jnp.arange(block), (batch, block))
        allowed = allowed_fn(q_pos, kv_pos) & (kv_pos >= i * block)[:, None, None, :]
        allowed = jnp.broadcast_to(allowed, (batch, q_heads, q_len, block))
        allowed = allowed.reshape(batch, kv_heads, groups * q_len, block)
        logits = jnp.einsum(f"bhmd,{kv}->bhmt", rows, k_block.astype(q.dtype),
                            preferred_element_type=jnp.float32,
                            precision=jax.lax.Precision.HIGHEST)
        logits = soft_cap(logits * scale, logits_soft_cap)
        return online_softmax.fold_block(
            state, logits, allowed,
            lambda weights: jnp.einsum(f"bhmt,{kv}->bhmd", weights, v_block.astype(jnp.float32),
                                       precision=jax.lax.Precision.HIGHEST))

    # a scan over every block that skips the unwritten ones, not a loop bounded by the
    # written length: as fast on XLA:CPU (0.21 vs 0.27 ms, batch 1, 100 of 4096 slots), and
    # reverse-differentiable, which a loop with a traced trip count is not
    def fold_if_read(state, i):
        return jax.lax.cond(i * block < read, fold, lambda i, state: state, i, state), None

    state = online_softmax.empty_state((batch, kv_heads, groups * q_len), head_dim)
    state, _ = jax.lax.scan(fold_if_read, state, jnp.arange(-(-slots // block)))
    out, _ = online_softmax.finish(state)
    return ungrouped_rows(out, q_len).astype(q.dtype)
