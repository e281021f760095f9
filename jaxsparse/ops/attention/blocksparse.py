"""Block-sparse attention in plain XLA: visit only the non-empty kv-blocks of each q-block.

All q-blocks advance together through the slots of their kv-block lists (a ``lax.scan``
over the widest list), carrying an online softmax (Milakov & Gimelshein 2018; FlashAttention,
Dao et al. 2022). Work and memory grow with the number of non-empty tiles, not with S*T.
Inside a visited tile the lazy mask is evaluated on the tile's absolute positions, so
partial tiles are exact; padded slots and padded positions are masked out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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
                          block_kv: int = 128):
    """Same contract as the dense reference, for a lazy ``mask`` (required)."""
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = q_heads // kv_heads
    if mask.num_heads is not None and mask.num_heads != q_heads:
        raise ValueError(f"mask has {mask.num_heads} heads but q has {q_heads}")
    bq, bk = pick_block(q_len, block_q), pick_block(kv_len, block_kv)
    table = cached_block_table(mask, q_len, kv_len, bq, bk)
    nq, nk = table.num_q_blocks, table.num_kv_blocks
    width = table.kv_indices.shape[-1]

    # [Hq, nq, W] block indices and validity (one table row per head, or shared)
    kv_idx = np.broadcast_to(table.kv_indices, (q_heads, nq, width))
    valid = np.arange(width)[None, None, :] < np.broadcast_to(table.kv_counts, (q_heads, nq))[..., None]

    q_blk = _pad_to(q, 1, nq * bq).reshape(batch, nq, bq, q_heads, head_dim)
    q_blk = jnp.transpose(q_blk, (0, 3, 1, 2, 4))  # [B, Hq, nq, bq, D]
    k_blk = _pad_to(k, 1, nk * bk).reshape(batch, nk, bk, kv_heads, head_dim)
    v_blk = _pad_to(v, 1, nk * bk).reshape(batch, nk, bk, kv_heads, head_dim)
    head_kv = (np.arange(q_heads) // groups)[:, None]  # [Hq, 1]: GQA without repeating K/V

    q_pos = (np.arange(nq)[:, None] * bq + np.arange(bq)[None, :])  # [nq, bq]
    if q_segment_ids is not None:
        q_seg = _pad_to(q_segment_ids, 1, nq * bq).reshape(batch, 1, nq, bq, 1)
        kv_seg_blk = _pad_to(kv_segment_ids, 1, nk * bk).reshape(batch, nk, bk)

    head_fns = ([m.allowed_fn(q_len, kv_len) for m in mask.masks] if isinstance(mask, MultiHeadMask)
                else [mask.allowed_fn(q_len, kv_len)])

    def step(carry, xs):
        m_prev, l_prev, acc = carry
        idx, ok = xs  # [Hq, nq] int32, [Hq, nq] bool
        k_t = k_blk[:, idx, :, head_kv]  # [Hq, nq, B, bk, D] (advanced indices first)
        v_t = v_blk[:, idx, :, head_kv]
        k_t, v_t = jnp.moveaxis(k_t, 2, 0), jnp.moveaxis(v_t, 2, 0)  # [B, Hq, nq, bk, D]
        logits = jnp.einsum("bhnqd,bhnkd->bhnqk", q_blk, k_t, preferred_element_type=jnp.float32,
                            precision=jax.lax.Precision.HIGHEST)
        logits = soft_cap(logits * scale, logits_soft_cap)
        kv_pos = idx[:, :, None] * bk + jnp.arange(bk)[None, None, :]  # [Hq, nq, bk]
        qp = q_pos[None, :, :, None]
        kp = kv_pos[:, :, None, :]
        if len(head_fns) == 1:
            allowed = head_fns[0](qp, kp)
        else:
            allowed = jnp.concatenate([fn(qp, kp[h:h + 1]) for h, fn in enumerate(head_fns)])
        allowed = allowed & (kp < kv_len) & ok[:, :, None, None]  # [Hq, nq, bq, bk]
        allowed = allowed[None]
        if q_segment_ids is not None:
            kv_seg = kv_seg_blk[:, idx]  # [B, Hq, nq, bk]
            allowed = allowed & (q_seg == kv_seg[:, :, :, None, :])
        logits = jnp.where(allowed, logits, MASK_VALUE)
        m_new = jnp.maximum(m_prev, jnp.max(logits, axis=-1))
        correction = jnp.exp(m_prev - m_new)
        p = jnp.where(allowed, jnp.exp(logits - m_new[..., None]), 0.0)
        l_new = l_prev * correction + jnp.sum(p, axis=-1)
        acc = acc * correction[..., None] + jnp.einsum(
            "bhnqk,bhnkd->bhnqd", p, v_t.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        return (m_new, l_new, acc), None

    shape = (batch, q_heads, nq, bq)
    init = (jnp.full(shape, MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32))
    xs = (jnp.asarray(np.moveaxis(kv_idx, -1, 0)), jnp.asarray(np.moveaxis(valid, -1, 0)))
    # Recompute tiles in the backward pass instead of storing every slot's logits.
    (_, l_fin, acc), _ = jax.lax.scan(jax.checkpoint(step), init, xs)
    out = acc / jnp.where(l_fin == 0.0, 1.0, l_fin)[..., None]  # empty rows stay 0
    out = jnp.transpose(out, (0, 2, 3, 1, 4)).reshape(batch, nq * bq, q_heads, head_dim)
    return out[:, :q_len].astype(q.dtype)
