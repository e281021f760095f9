"""Block-sparse attention in plain XLA: visit only the non-empty kv-blocks of each q-block.

The q-blocks are packed into lanes (:mod:`~jaxsparse.ops.attention.lanes`: long kv-lists
beside short ones, so causal and BigBird tables do not pay for their widest row everywhere)
and all lanes advance together, one tile each per step of a ``lax.scan``, carrying an online
softmax (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022). Work grows with the
number of non-empty tiles, not with S*T.
Inside a visited tile the lazy mask is evaluated on the tile's absolute positions, so
partial tiles are exact; padded slots and padded positions are masked out.

The gradient is written out (``custom_vjp``): the forward saves each row's log-sum-exp, and
the backward runs the same schedule once more, recomputing each tile's probabilities from it
(FlashAttention-2, Dao 2023). Autodiff of the forward scan instead carried the cotangents of
the whole online-softmax state through every step and recomputed every step under
``jax.checkpoint``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.ops.attention.lanes import cached_lane_schedule
from jaxsparse.ops.attention.online_softmax import SoftmaxState, empty_state, finish, fold_block
from jaxsparse.ops.attention.reference import soft_cap
from jaxsparse.ops.masks import Mask, MultiHeadMask, cached_block_table
from jaxsparse.ops.sizes import round_up


def pick_block(length: int, preferred: int) -> int:
    """The preferred block, shrunk (to a multiple of 8) for short sequences."""
    return max(8, min(preferred, round_up(length, 8)))


def _pad_to(x, axis: int, size: int):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def blocksparse_attention(q, k, v, *, mask: Mask, q_segment_ids=None, kv_segment_ids=None,
                          scale: float, logits_soft_cap=None, block_q: int = 128,
                          block_kv: int = 128, blocks_per_lane: int | None = None,
                          return_lse: bool = False):
    """Same contract as the dense reference, for a lazy ``mask`` (required); ``return_lse``
    also returns each row's log-sum-exp ``[B, S, Hq]`` (0 on rows with nothing to attend to).

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

    head_kv = (np.arange(q_heads) // groups)[:, None]  # [Hq, 1]: GQA without repeating K/V

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

    def q_blocks(x):  # [B, S, Hq, ...] -> [B, Hq, nq, bq, ...]
        x = _pad_to(x, 1, nq * bq).reshape((batch, nq, bq) + x.shape[2:])
        return jnp.moveaxis(x, 3, 1)

    def from_q_blocks(x):  # [B, Hq, nq, bq, ...] -> [B, S, Hq, ...]
        x = jnp.moveaxis(x, 1, 3)
        return x.reshape((batch, nq * bq) + x.shape[3:])[:, :q_len]

    def to_lanes(x):  # [B, Hq, nq, bq, ...] -> [B, Hq, P, G, bq, ...]
        if g == 1:  # lane i is q-block i
            return x[:, :, :, None]
        lanes_x = jnp.zeros((batch, q_heads, lanes, g) + x.shape[3:], x.dtype)
        return lanes_x.at[:, heads_col, sched.q_block_lane, sched.q_block_slot].set(x)

    def from_lanes(x):  # [B, Hq, P, G, bq, ...] -> [B, Hq, nq, bq, ...]
        if g == 1:
            return x[:, :, :, 0]
        return x[:, heads_col, sched.q_block_lane, sched.q_block_slot]

    def tile(q_blk, k_blk, v_blk, q_seg_blk, kv_seg_blk, q_idx, idx, ok):
        """One step's tiles of every lane: (q, k, v, soft-capped scaled logits, allowed), shapes
        [B, Hq, P, bq or bk(, D)] and [B, Hq, P, bq, bk]."""
        q_t = q_blk if g == 1 else q_blk[:, heads_col, q_idx]  # [B, Hq, P, bq, D]
        k_t = k_blk[:, idx, :, head_kv]  # [Hq, P, B, bk, D] (advanced indices first)
        v_t = v_blk[:, idx, :, head_kv]
        k_t, v_t = jnp.moveaxis(k_t, 2, 0), jnp.moveaxis(v_t, 2, 0)  # [B, Hq, P, bk, D]
        logits = jnp.einsum("bhnqd,bhnkd->bhnqk", q_t, k_t, preferred_element_type=jnp.float32,
                            precision=jax.lax.Precision.HIGHEST)
        capped = soft_cap(logits * scale, logits_soft_cap)
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
        if q_seg_blk is not None:
            q_seg = q_seg_blk[:, q_idx]  # [B, Hq, P, bq]
            kv_seg = kv_seg_blk[:, idx]  # [B, Hq, P, bk]
            allowed = allowed & (q_seg[..., :, None] == kv_seg[..., None, :])
        return q_t, k_t, v_t, capped, allowed

    # numpy, not jnp: each scan converts them in its own trace (jnp constants made here are
    # tracers inside shard_map, and the backward's scan would leak them)
    xs = tuple(np.asarray(a) for a in (sched.slot, sched.q_block, sched.kv_block, sched.valid))

    def kv_blocks(x):  # [B, T, Hkv, D] -> [B, nk, bk, Hkv, D]
        return _pad_to(x, 1, nk * bk).reshape(batch, nk, bk, kv_heads, head_dim)

    def seg_blocks(q_seg, kv_seg):
        if q_seg is None:
            return None, None
        return (_pad_to(q_seg, 1, nq * bq).reshape(batch, nq, bq),
                _pad_to(kv_seg, 1, nk * bk).reshape(batch, nk, bk))

    def forward(q, k, v, q_seg, kv_seg):
        """(out [B, S, Hq, D], log-sum-exp per row in lane layout [B, Hq, P, G, bq])."""
        q_blk, k_blk, v_blk = q_blocks(q), kv_blocks(k), kv_blocks(v)
        segs = seg_blocks(q_seg, kv_seg)

        def step(carry, step_xs):
            slot, q_idx, idx, ok = step_xs  # [Hq, P] each
            _, _, v_t, logits, allowed = tile(q_blk, k_blk, v_blk, *segs, q_idx, idx, ok)
            state = fold_block(
                SoftmaxState(*(select(t, slot) for t in carry)), logits, allowed,
                lambda p: jnp.einsum("bhnqk,bhnkd->bhnqd", p, v_t.astype(jnp.float32),
                                     precision=jax.lax.Precision.HIGHEST))
            return SoftmaxState(*(put(t, new, slot) for t, new in zip(carry, state))), None

        state, _ = jax.lax.scan(step, empty_state((batch, q_heads, lanes, g, bq), head_dim), xs)
        out, lse = finish(state)  # [B, Hq, P, G, bq(, D)]
        return from_q_blocks(from_lanes(out)).astype(q.dtype), lse

    def backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse):
        """FlashAttention-2's backward (Dao 2023) over the same tiles: each visited tile's
        probabilities are recomputed from the saved log-sum-exp; dQ accumulates per lane,
        dK and dV are scatter-added into their kv-block (GQA heads and lanes sharing a block
        add up). The log-sum-exp's cotangent ``d_lse [B, S, Hq]`` enters as ``delta - d_lse``
        (d lse_i / d s_ij = p_ij)."""
        q_blk, k_blk, v_blk = q_blocks(q), kv_blocks(k), kv_blocks(v)
        segs = seg_blocks(q_seg, kv_seg)
        do_blk = q_blocks(d_out.astype(jnp.float32))
        delta = jnp.sum(do_blk * q_blocks(out.astype(jnp.float32)), axis=-1)  # [B, Hq, nq, bq]
        delta = delta - q_blocks(d_lse)
        do_lanes, delta_lanes = to_lanes(do_blk), to_lanes(delta)

        def step(carry, step_xs):
            dq_all, dk, dv = carry
            slot, q_idx, idx, ok = step_xs
            q_t, k_t, v_t, capped, allowed = tile(q_blk, k_blk, v_blk, *segs, q_idx, idx, ok)
            do_t = select(do_lanes, slot)  # [B, Hq, P, bq, D]
            p = jnp.where(allowed, jnp.exp(capped - select(lse, slot)[..., None]), 0.0)
            dv_t = jnp.einsum("bhnqk,bhnqd->bhnkd", p, do_t, precision=jax.lax.Precision.HIGHEST)
            dp = jnp.einsum("bhnqd,bhnkd->bhnqk", do_t, v_t.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
            ds = p * (dp - select(delta_lanes, slot)[..., None])
            if logits_soft_cap is not None:  # d(cap·tanh(s/cap))/ds = 1 - tanh²
                ds = ds * (1.0 - jnp.square(capped / logits_soft_cap))
            ds = ds * scale
            dq_t = jnp.einsum("bhnqk,bhnkd->bhnqd", ds, k_t.astype(jnp.float32),
                              precision=jax.lax.Precision.HIGHEST)
            dk_t = jnp.einsum("bhnqk,bhnqd->bhnkd", ds, q_t.astype(jnp.float32),
                              precision=jax.lax.Precision.HIGHEST)
            dq_all = put(dq_all, select(dq_all, slot) + dq_t, slot)
            dk = dk.at[:, idx, :, head_kv].add(jnp.moveaxis(dk_t, 0, 2))
            dv = dv.at[:, idx, :, head_kv].add(jnp.moveaxis(dv_t, 0, 2))
            return (dq_all, dk, dv), None

        kv_zeros = jnp.zeros((batch, nk, bk, kv_heads, head_dim), jnp.float32)
        init = (jnp.zeros((batch, q_heads, lanes, g, bq, head_dim), jnp.float32), kv_zeros, kv_zeros)
        (dq, dk, dv), _ = jax.lax.scan(step, init, xs)
        dq = from_q_blocks(from_lanes(dq)).astype(q.dtype)

        def unblock(x, like):
            return x.reshape(batch, nk * bk, kv_heads, head_dim)[:, :kv_len].astype(like.dtype)

        return dq, unblock(dk, k), unblock(dv, v)

    def rows(lse_lanes):  # [B, Hq, P, G, bq] -> [B, S, Hq]
        return from_q_blocks(from_lanes(lse_lanes))

    @jax.custom_vjp
    def attend(q, k, v, q_seg, kv_seg):
        out, lse = forward(q, k, v, q_seg, kv_seg)
        return out, rows(lse)

    def attend_fwd(q, k, v, q_seg, kv_seg):
        out, lse = forward(q, k, v, q_seg, kv_seg)
        return (out, rows(lse)), (q, k, v, q_seg, kv_seg, out, lse)

    def attend_bwd(residuals, cotangents):
        d_out, d_lse = cotangents
        return (*backward(*residuals, d_out, d_lse), None, None)

    attend.defvjp(attend_fwd, attend_bwd)
    out, lse = attend(q, k, v, q_segment_ids, kv_segment_ids)
    return (out, lse) if return_lse else out
