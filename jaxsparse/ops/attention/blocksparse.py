"""Block-sparse attention in plain XLA: visit only the non-empty kv-blocks of each q-block.

The q-blocks are packed into lanes (:mod:`~jaxsparse.ops.attention.lanes`: long kv-lists
beside short ones, so causal and BigBird tables do not pay for their widest row everywhere)
and all lanes advance together, one tile each per step of a ``lax.scan``, carrying an online
softmax (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022). Work grows with the
number of non-empty tiles, not with S*T.
Inside a visited tile the lazy mask is evaluated on the tile's absolute positions, so
partial tiles are exact; padded slots and padded positions are masked out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.ops.attention.lanes import cached_lane_schedule
from jaxsparse.ops.attention.reference import MASK_VALUE, soft_cap
from jaxsparse.ops.masks import Mask, MultiHeadMask, cached_block_table


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pick_block(length: int, preferred: int) -> int:
    """The preferred block, shrunk (to a multiple of 8) for short sequences."""
    return max(8, min(preferred, _round_up(length, 8)))


def _pad_to(x, axis: int, size: int):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def blocksparse_attention(q, k, v, *, mask: Mask, q_segment_ids=None, kv_segment_ids=None,
                          scale: float, logits_soft_cap=None, block_q: int = 128,
                          block_kv: int = 128, blocks_per_lane: int | None = None):
    """Same contract as the dense reference, for a lazy ``mask`` (required).

    ``blocks_per_lane`` forces the lane packing (tests); by default it is chosen from the
    block table (:func:`~jaxsparse.ops.attention.lanes.choose_blocks_per_lane`)."""
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = q_heads // kv_heads
    if mask.num_heads is not None and mask.num_heads != q_heads:
        raise ValueError(f"mask has {mask.num_heads} heads but q has {q_heads}")
    bq, bk = pick_block(q_len, block_q), pick_block(kv_len, block_kv)
    table = cached_block_table(mask, q_len, kv_len, bq, bk)
    nq, nk = table.num_q_blocks, table.num_kv_blocks

    # Which tile every lane computes at every step (q-blocks packed so the lanes are even).
    sched = cached_lane_schedule(mask, q_len, kv_len, bq, bk, q_heads, blocks_per_lane)
    g, lanes = sched.blocks_per_lane, sched.lanes
    heads_col = np.arange(q_heads)[:, None]  # [Hq, 1]

    q_blk = _pad_to(q, 1, nq * bq).reshape(batch, nq, bq, q_heads, head_dim)
    q_blk = jnp.transpose(q_blk, (0, 3, 1, 2, 4))  # [B, Hq, nq, bq, D]
    k_blk = _pad_to(k, 1, nk * bk).reshape(batch, nk, bk, kv_heads, head_dim)
    v_blk = _pad_to(v, 1, nk * bk).reshape(batch, nk, bk, kv_heads, head_dim)
    head_kv = (np.arange(q_heads) // groups)[:, None]  # [Hq, 1]: GQA without repeating K/V
    if q_segment_ids is not None:
        q_seg_blk = _pad_to(q_segment_ids, 1, nq * bq).reshape(batch, nq, bq)
        kv_seg_blk = _pad_to(kv_segment_ids, 1, nk * bk).reshape(batch, nk, bk)

    head_fns = ([m.allowed_fn(q_len, kv_len) for m in mask.masks] if isinstance(mask, MultiHeadMask)
                else [mask.allowed_fn(q_len, kv_len)])

    def select(state, slot):
        """Each lane's state for the q-block it works on now: [B, Hq, P, G, ...] -> [B, Hq, P,
        ...]."""
        if g == 1:
            return state[:, :, :, 0]
        index = slot.reshape((1,) + slot.shape + (1,) * (state.ndim - 3))
        return jnp.take_along_axis(state, index, axis=3)[:, :, :, 0]

    def put(state, new, slot):
        if g == 1:
            return new[:, :, :, None]
        chosen = jnp.arange(g)[None, None, :] == slot[..., None]  # [Hq, P, G]
        chosen = chosen.reshape((1,) + chosen.shape + (1,) * (state.ndim - 4))
        return jnp.where(chosen, new[:, :, :, None], state)

    def step(carry, xs):
        m_all, l_all, acc_all = carry  # [B, Hq, P, G, bq(, D)]
        slot, q_idx, idx, ok = xs  # [Hq, P] each
        m_prev, l_prev, acc = select(m_all, slot), select(l_all, slot), select(acc_all, slot)
        q_t = q_blk if g == 1 else q_blk[:, heads_col, q_idx]  # [B, Hq, P, bq, D]
        k_t = k_blk[:, idx, :, head_kv]  # [Hq, P, B, bk, D] (advanced indices first)
        v_t = v_blk[:, idx, :, head_kv]
        k_t, v_t = jnp.moveaxis(k_t, 2, 0), jnp.moveaxis(v_t, 2, 0)  # [B, Hq, P, bk, D]
        logits = jnp.einsum("bhnqd,bhnkd->bhnqk", q_t, k_t, preferred_element_type=jnp.float32,
                            precision=jax.lax.Precision.HIGHEST)
        logits = soft_cap(logits * scale, logits_soft_cap)
        if g == 1:  # lane i is q-block i: static positions, so XLA can fold mask arithmetic
            q_pos = np.broadcast_to(np.arange(nq)[:, None] * bq + np.arange(bq), (q_heads, nq, bq))
        else:
            q_pos = q_idx[:, :, None] * bq + jnp.arange(bq)[None, None, :]  # [Hq, P, bq]
        kv_pos = idx[:, :, None] * bk + jnp.arange(bk)[None, None, :]  # [Hq, P, bk]
        qp = q_pos[:, :, :, None]
        kp = kv_pos[:, :, None, :]
        if len(head_fns) == 1:
            allowed = head_fns[0](qp, kp)
        else:
            allowed = jnp.concatenate([fn(qp[h:h + 1], kp[h:h + 1])
                                       for h, fn in enumerate(head_fns)])
        allowed = allowed & (kp < kv_len) & ok[:, :, None, None]  # [Hq, P, bq, bk]
        allowed = allowed[None]
        if q_segment_ids is not None:
            q_seg = q_seg_blk[:, q_idx]  # [B, Hq, P, bq]
            kv_seg = kv_seg_blk[:, idx]  # [B, Hq, P, bk]
            allowed = allowed & (q_seg[..., :, None] == kv_seg[..., None, :])
        logits = jnp.where(allowed, logits, MASK_VALUE)
        # The running max only shifts the exponents; it cancels in acc / l, so its exact
        # gradient is zero: stop_gradient keeps autodiff from routing one through the max's
        # argmax selection (3x the backward time on CPU otherwise).
        m_new = jax.lax.stop_gradient(jnp.maximum(m_prev, jnp.max(logits, axis=-1)))
        correction = jnp.exp(m_prev - m_new)
        p = jnp.where(allowed, jnp.exp(logits - m_new[..., None]), 0.0)
        l_new = l_prev * correction + jnp.sum(p, axis=-1)
        acc = acc * correction[..., None] + jnp.einsum(
            "bhnqk,bhnkd->bhnqd", p, v_t.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        return (put(m_all, m_new, slot), put(l_all, l_new, slot), put(acc_all, acc, slot)), None

    shape = (batch, q_heads, lanes, g, bq)
    init = (jnp.full(shape, MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32))
    xs = tuple(jnp.asarray(a) for a in (sched.slot, sched.q_block, sched.kv_block, sched.valid))
    # Recompute tiles in the backward pass instead of storing every step's logits.
    (_, l_fin, acc), _ = jax.lax.scan(jax.checkpoint(step), init, xs)
    out = acc / jnp.where(l_fin == 0.0, 1.0, l_fin)[..., None]  # empty rows stay 0
    if g == 1:
        out = out[:, :, :, 0]  # lane i is q-block i
    else:  # back from (lane, slot) to q-block order
        out = out[:, heads_col, sched.q_block_lane, sched.q_block_slot]  # [B, Hq, nq, bq, D]
    out = jnp.transpose(out, (0, 2, 3, 1, 4)).reshape(batch, nq * bq, q_heads, head_dim)
    return out[:, :q_len].astype(q.dtype)
