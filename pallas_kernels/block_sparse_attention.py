"""Block-sparse flash attention for GPUs (Pallas, Triton lowering), forward and backward.

One program per (q-block, batch, head) walks the compact list of that q-block's non-empty
kv-blocks (from a block table), keeping an online softmax in registers (FlashAttention-2,
Dao 2023). The backward pass is two kernels, as in FlashAttention-2: dQ walks the same
per-q-block lists; dK/dV walks the transposed per-kv-block lists, so each program owns its
output block and no atomics are needed. The forward pass saves the log-sum-exp per row.

The kernels know nothing of mask objects: they take the block table as integer arrays and
an elementwise ``mask_fn(q_pos, kv_pos) -> bool`` (closed-form integer arithmetic, evaluated
inside every visited tile), plus optional segment ids. Arrays are ``[batch, heads, seq,
head_dim]``, already padded to whole blocks and to a power-of-two head dim; positions
``>= kv_len`` are masked. Rows with nothing to attend to produce zeros (and zero gradients).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _checks
from pallas_kernels._flash_vjp import KernelConfig, flash_vjp

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp() and its gradient stay NaN-free


def _tile_mask(mask_fn, q_pos, kv_pos, kv_len, q_seg, kv_seg, pidx_ref, blocks_ref, r, w):
    allowed = kv_pos[None, :] < kv_len
    if blocks_ref is not None:  # a precomputed partial tile (layout masks); -1: full tile
        which = pidx_ref[r, w]
        allowed = allowed & ((which < 0) | (blocks_ref[jnp.maximum(which, 0)] != 0))
    if mask_fn is not None:
        allowed = allowed & mask_fn(q_pos[:, None], kv_pos[None, :])
    if q_seg is not None:
        allowed = allowed & (q_seg[:, None] == kv_seg[None, :])
    return allowed


def _logits(q, k, scale, soft_cap):
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = s * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    return s


def _fwd_kernel(kv_idx_ref, kv_cnt_ref, pidx_ref, blocks_ref, q_ref, k_ref, v_ref, *rest, scale,
                soft_cap, mask_fn, block_q, block_kv, kv_len, has_segments, has_blocks):
    blocks_ref = blocks_ref if has_blocks else None
    if has_segments:
        q_seg_ref, kv_seg_ref, o_ref, lse_ref = rest
    else:
        o_ref, lse_ref = rest
    i = pl.program_id(0)
    q = q_ref[...]
    q_pos = i * block_q + jnp.arange(block_q)
    q_seg = q_seg_ref[...] if has_segments else None
    count = kv_cnt_ref[i]

    def body(w, carry):
        acc, m_prev, l_prev = carry
        j = kv_idx_ref[i, w]
        kv_slice = pl.ds(pl.multiple_of(j * block_kv, block_kv), block_kv)
        k = k_ref[kv_slice, :]
        v = v_ref[kv_slice, :]
        kv_pos = j * block_kv + jnp.arange(block_kv)
        kv_seg = kv_seg_ref[kv_slice] if has_segments else None
        allowed = _tile_mask(mask_fn, q_pos, kv_pos, kv_len, q_seg, kv_seg, pidx_ref, blocks_ref, i, w)
        s = jnp.where(allowed, _logits(q, k, scale, soft_cap), _NEG)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        correction = jnp.exp(m_prev - m_new)
        p = jnp.where(allowed, jnp.exp(s - m_new[:, None]), 0.0)
        l_new = l_prev * correction + jnp.sum(p, axis=1)
        acc = acc * correction[:, None] + jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return acc, m_new, l_new

    init = (jnp.zeros(o_ref.shape, jnp.float32), jnp.full((block_q,), _NEG, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, count, body, init)
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))


def _dq_kernel(kv_idx_ref, kv_cnt_ref, pidx_ref, blocks_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, *rest, scale, soft_cap, mask_fn, block_q, block_kv, kv_len,
               has_segments, has_blocks):
    blocks_ref = blocks_ref if has_blocks else None
    if has_segments:
        q_seg_ref, kv_seg_ref, dq_ref = rest
    else:
        (dq_ref,) = rest
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = i * block_q + jnp.arange(block_q)
    q_seg = q_seg_ref[...] if has_segments else None

    def body(w, dq):
        j = kv_idx_ref[i, w]
        kv_slice = pl.ds(pl.multiple_of(j * block_kv, block_kv), block_kv)
        k, v = k_ref[kv_slice, :], v_ref[kv_slice, :]
        kv_pos = j * block_kv + jnp.arange(block_kv)
        kv_seg = kv_seg_ref[kv_slice] if has_segments else None
        allowed = _tile_mask(mask_fn, q_pos, kv_pos, kv_len, q_seg, kv_seg, pidx_ref, blocks_ref, i, w)
        ds = _score_grad(q, k, v, do, lse, delta, allowed, scale, soft_cap)
        return dq + jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(0, kv_cnt_ref[i], body, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_idx_ref, q_cnt_ref, pidx_ref, blocks_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, *rest, scale, soft_cap, mask_fn, block_q, block_kv, kv_len,
                has_segments, has_blocks):
    blocks_ref = blocks_ref if has_blocks else None
    if has_segments:
        q_seg_ref, kv_seg_ref, dk_ref, dv_ref = rest
    else:
        dk_ref, dv_ref = rest
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    kv_pos = j * block_kv + jnp.arange(block_kv)
    kv_seg = kv_seg_ref[...] if has_segments else None

    def body(w, carry):
        dk, dv = carry
        i = q_idx_ref[j, w]
        q_slice = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
        q, do = q_ref[q_slice, :], do_ref[q_slice, :]
        lse, delta = lse_ref[q_slice], delta_ref[q_slice]
        q_pos = i * block_q + jnp.arange(block_q)
        q_seg = q_seg_ref[q_slice] if has_segments else None
        allowed = _tile_mask(mask_fn, q_pos, kv_pos, kv_len, q_seg, kv_seg, pidx_ref, blocks_ref, j, w)
        p = jnp.where(allowed, jnp.exp(_logits(q, k, scale, soft_cap) - lse[:, None]), 0.0)
        dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        ds = _score_grad(q, k, v, do, lse, delta, allowed, scale, soft_cap)
        dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros(dk_ref.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, q_cnt_ref[j], body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _score_grad(q, k, v, do, lse, delta, allowed, scale, soft_cap):
    """d(loss)/d(scaled logits) of one tile, before the final multiplication by ``scale``."""
    raw = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = raw * scale
    if soft_cap is not None:
        capped = jnp.tanh(s / soft_cap)
        s = soft_cap * capped
    p = jnp.where(allowed, jnp.exp(s - lse[:, None]), 0.0)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    if soft_cap is not None:
        ds = ds * (1.0 - capped * capped)
    return ds


def _specs(block_q, block_kv, q_len, kv_len, head_dim, groups, has_segments, by_kv):
    """BlockSpecs for grid (blocks, batch, heads): the walked side is whole, the owned side
    is one block. ``by_kv`` selects the dK/dV layout (owned = kv block)."""
    own_q = not by_kv
    q_spec = pl.BlockSpec((None, None, block_q if own_q else q_len, head_dim),
                          (lambda n, b, h: (b, h, n, 0)) if own_q else (lambda n, b, h: (b, h, 0, 0)))
    kv_spec = pl.BlockSpec((None, None, block_kv if by_kv else kv_len, head_dim),
                           (lambda n, b, h: (b, h // groups, n, 0)) if by_kv
                           else (lambda n, b, h: (b, h // groups, 0, 0)))
    row_spec = pl.BlockSpec((None, None, block_q if own_q else q_len),
                            (lambda n, b, h: (b, h, n)) if own_q else (lambda n, b, h: (b, h, 0)))
    seg_specs = []
    if has_segments:
        seg_specs = [pl.BlockSpec((None, block_q if own_q else q_len),
                                  (lambda n, b, h: (b, n)) if own_q else (lambda n, b, h: (b, 0))),
                     pl.BlockSpec((None, block_kv if by_kv else kv_len),
                                  (lambda n, b, h: (b, n)) if by_kv else (lambda n, b, h: (b, 0)))]
    return q_spec, kv_spec, row_spec, seg_specs


def _table_specs(side, blocks):
    """Whole-array specs for one side's (indices, counts, partial ids) and the partial blocks."""
    return [pl.BlockSpec(side[0].shape, lambda n, b, h: (0, 0)),
            pl.BlockSpec(side[1].shape, lambda n, b, h: (0,)),
            pl.BlockSpec(side[2].shape, lambda n, b, h: (0, 0)),
            pl.BlockSpec(blocks.shape, lambda n, b, h: (0, 0, 0))]


def _forward(q, k, v, q_seg, kv_seg, tables, cfg):
    batch, heads, q_len, head_dim = q.shape
    kv_len_padded = k.shape[2]
    groups = heads // k.shape[1]
    has_segments = q_seg is not None
    q_spec, kv_spec, row_spec, seg_specs = _specs(cfg.block_q, cfg.block_kv, q_len,
                                                  kv_len_padded, head_dim, groups, has_segments, False)
    kernel = functools.partial(_fwd_kernel, has_segments=has_segments, **_kernel_args(cfg))
    grid = (q_len // cfg.block_q, batch, heads)
    segs = (q_seg, kv_seg) if has_segments else ()
    return pl.pallas_call(
        kernel, grid=grid,
        in_specs=_table_specs(tables[:3], tables[6]) + [q_spec, kv_spec, kv_spec] + seg_specs,
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
        compiler_params=_compiler_params(cfg, head_dim),
        interpret=cfg.interpret, name="block_sparse_attention_fwd",
    )(*tables[:3], tables[6], q, k, v, *segs)


def _compiler_params(cfg, head_dim):
    """Triton backend parameters (also selects Triton over Mosaic GPU when lowering)."""
    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _kernel_args(cfg):
    return cfg.pick("scale", "soft_cap", "mask_fn", "block_q", "block_kv", "kv_len", "has_blocks")


def _backward(q, k, v, q_seg, kv_seg, tables, out, lse, do, dlse, cfg):
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len_padded = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    has_segments = q_seg is not None
    segs = (q_seg, kv_seg) if has_segments else ()
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1) - dlse
    args = _kernel_args(cfg)

    q_spec, kv_spec, row_spec, seg_specs = _specs(cfg.block_q, cfg.block_kv, q_len,
                                                  kv_len_padded, head_dim, groups, has_segments, False)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, has_segments=has_segments, **args),
        grid=(q_len // cfg.block_q, batch, heads),
        in_specs=_table_specs(tables[:3], tables[6]) + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
        + seg_specs,
        out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(cfg, head_dim),
        interpret=cfg.interpret, name="block_sparse_attention_dq",
    )(*tables[:3], tables[6], q, k, v, do, lse, delta, *segs)

    q_spec, kv_spec, row_spec, seg_specs = _specs(cfg.block_q, cfg.block_kv, q_len,
                                                  kv_len_padded, head_dim, groups, has_segments, True)
    # dK/dV per query head ([B, Hq, T, D]); grouped heads are summed afterwards (GQA).
    dkv_spec = pl.BlockSpec((None, None, cfg.block_kv, head_dim), lambda n, b, h: (b, h, n, 0))
    per_head = jax.ShapeDtypeStruct((batch, heads, kv_len_padded, head_dim), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, has_segments=has_segments, **args),
        grid=(kv_len_padded // cfg.block_kv, batch, heads),
        in_specs=_table_specs(tables[3:6], tables[6]) + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
        + seg_specs,
        out_specs=[dkv_spec, dkv_spec], out_shape=[per_head, per_head],
        compiler_params=_compiler_params(cfg, head_dim),
        interpret=cfg.interpret, name="block_sparse_attention_dkv",
    )(*tables[3:6], tables[6], q, k, v, do, lse, delta, *segs)
    fold = lambda g: g.reshape(batch, kv_heads, groups, kv_len_padded, head_dim).sum(2)  # noqa: E731
    return dq, fold(dk).astype(k.dtype), fold(dv).astype(v.dtype)


_attention = flash_vjp(_forward, _backward)


def block_sparse_attention(q, k, v, kv_indices, kv_counts, q_indices, q_counts, *, kv_len: int,
                           block_q: int, block_kv: int, scale: float,
                           soft_cap: float | None = None, mask_fn: Callable | None = None,
                           partial_blocks=None, kv_partial=None, q_partial=None,
                           q_segment_ids=None, kv_segment_ids=None, interpret: bool = False,
                           return_lse: bool = False):
    """Attention over the tiles a block table lists; differentiable in q, k, v.

    Args:
      q: ``[B, Hq, S, D]``; k, v: ``[B, Hkv, T, D]`` with S, T multiples of the blocks.
      kv_indices, kv_counts: ``[S/block_q, W]`` and ``[S/block_q]`` int32 (one head's table).
      q_indices, q_counts: the transposed lists, ``[T/block_kv, W']`` and ``[T/block_kv]``.
      kv_len: true key length (positions beyond it are masked).
      mask_fn: elementwise ``(q_pos, kv_pos) -> bool`` on int32 position grids, or None.
      partial_blocks: optional int32 ``[U, block_q, block_kv]`` distinct masks of partial
        tiles, for masks without a closed form; ``kv_partial [S/block_q, W]`` and
        ``q_partial [T/block_kv, W']`` give each listed tile's block (-1: a full tile).
      q_segment_ids, kv_segment_ids: optional int32 ``[B, S]``, ``[B, T]``.
      return_lse: also return each row's log-sum-exp ``[B, Hq, S]`` float32 (0 for rows with
        nothing to attend to), differentiable too.

    Raises ``ValueError`` for operands the kernel would silently read past (S or T not whole
    blocks, tables of another size, ``Hq % Hkv != 0``) and for tiles Triton cannot take
    (``block_q``, ``block_kv`` and ``D`` powers of two >= 16, as ``tl.dot`` needs).
    """
    where = "block_sparse_attention"
    _checks.attention_operands(
        where, q, k, v, kv_indices, kv_counts, q_indices, q_counts, kv_len=kv_len,
        block_q=block_q, block_kv=block_kv, partial_blocks=partial_blocks, kv_partial=kv_partial,
        q_partial=q_partial, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    _checks.power_of_two(where, "block_q", block_q, 16)
    _checks.power_of_two(where, "block_kv", block_kv, 16)
    _checks.power_of_two(where, "head_dim (q.shape[3])", q.shape[3], 16)
    has_blocks = partial_blocks is not None
    if not has_blocks:  # placeholders keep one kernel signature; never read
        partial_blocks = jnp.zeros((1, 1, 1), jnp.int32)
        kv_partial, q_partial = jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32)
    cfg = KernelConfig(scale=float(scale), soft_cap=None if soft_cap is None else float(soft_cap),
                  mask_fn=mask_fn, block_q=int(block_q), block_kv=int(block_kv),
                  kv_len=int(kv_len), interpret=bool(interpret), has_blocks=has_blocks)
    tables = tuple(jnp.asarray(t, jnp.int32) for t in (
        kv_indices, kv_counts, kv_partial, q_indices, q_counts, q_partial, partial_blocks))
    out, lse = _attention(q, k, v, q_segment_ids, kv_segment_ids, tables, cfg)
    return (out, lse) if return_lse else out
