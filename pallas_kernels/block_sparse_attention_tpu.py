"""Block-sparse flash attention for TPUs (Pallas, Mosaic), forward and backward.

Same contract as :mod:`pallas_kernels.block_sparse_attention` (the GPU kernel), in the TPU
style of JAX's splash attention: the block table's index lists are scalar-prefetched into
SMEM, and the innermost grid axis walks a list, so each step's BlockSpec index map fetches
exactly the next non-empty block (padded slots repeat the last index, which Pallas does not
re-fetch, and are skipped with ``pl.when``). Running statistics live in VMEM scratch and are
kept lane-replicated (``[rows, 128]``) as Mosaic prefers. Backward: a dQ kernel walking the
per-q-block lists and a dK/dV kernel walking the transposed per-kv-block lists.

Arrays are ``[batch, heads, seq, head_dim]`` padded to whole blocks, head dim to a multiple
of 128; tile sizes must be multiples of 128 (8 for the q side).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _checks
from pallas_kernels._flash_vjp import KernelConfig, flash_vjp

LANES = 128
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _allowed(mask_fn, q_start, kv_start, shape, kv_len, q_seg_ref, kv_seg_ref, which=None,
             block_ref=None):
    q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    kv_pos = kv_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    allowed = kv_pos < kv_len
    if mask_fn is not None:
        allowed = allowed & mask_fn(q_pos, kv_pos)
    if q_seg_ref is not None:
        allowed = allowed & (q_seg_ref[:, :1] == kv_seg_ref[:1, :])
    if block_ref is not None:  # a precomputed partial tile (layout masks); -1: a full tile
        allowed = allowed & ((block_ref[...] != 0) | (which < 0))
    return allowed


def _capped(s, soft_cap):
    return s if soft_cap is None else soft_cap * jnp.tanh(s / soft_cap)


def _fwd_kernel(idx_ref, cnt_ref, pidx_ref, blocks_ref, q_ref, k_ref, v_ref, *refs, scale,
                soft_cap, mask_fn, block_q, block_kv, kv_len, width, has_segments, has_blocks):
    if has_segments:
        q_seg_ref, kv_seg_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    else:
        (o_ref, lse_ref, m_ref, l_ref, acc_ref), q_seg_ref, kv_seg_ref = refs, None, None
    i, w = pl.program_id(2), pl.program_id(3)

    @pl.when(w == 0)
    def _init():
        m_ref[...] = jnp.full_like(m_ref, _NEG)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(w < cnt_ref[i])
    def _step():
        j = idx_ref[i, w]
        s = _capped(jax.lax.dot_general(q_ref[...], k_ref[...], _NT,
                                        preferred_element_type=jnp.float32) * scale, soft_cap)
        allowed = _allowed(mask_fn, i * block_q, j * block_kv, s.shape, kv_len, q_seg_ref,
                           kv_seg_ref, pidx_ref[i, w], blocks_ref if has_blocks else None)
        s = jnp.where(allowed, s, _NEG)
        m_prev, l_prev = m_ref[...], l_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, LANES]
        p = jnp.where(allowed, jnp.exp(s - m_next[:, :1]), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_ref[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_next
        acc_ref[...] = alpha[:, :1] * acc_ref[...] + jax.lax.dot_general(
            p.astype(v_ref.dtype), v_ref[...], _NN, preferred_element_type=jnp.float32)

    @pl.when(w == width - 1)
    def _finish():
        l = l_ref[...]
        empty = l == 0.0
        safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_ref[...] / safe[:, :1]).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, 0.0, m_ref[...] + jnp.log(safe))


def _tile_grads(q, k, v, do, lse, delta, allowed, scale, soft_cap):
    """Probabilities and d(loss)/d(scaled logits) of one tile (before the final ``scale``)."""
    s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    tanh = None
    if soft_cap is not None:
        tanh = jnp.tanh(s / soft_cap)
        s = soft_cap * tanh
    p = jnp.where(allowed, jnp.exp(s - lse[:, :1]), 0.0)
    dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, :1])
    if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
    return p, ds


def _dq_kernel(idx_ref, cnt_ref, pidx_ref, blocks_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, *refs, scale, soft_cap, mask_fn, block_q, block_kv, kv_len, width,
               has_segments, has_blocks):
    if has_segments:
        q_seg_ref, kv_seg_ref, dq_ref, acc_ref = refs
    else:
        (dq_ref, acc_ref), q_seg_ref, kv_seg_ref = refs, None, None
    i, w = pl.program_id(2), pl.program_id(3)

    @pl.when(w == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(w < cnt_ref[i])
    def _step():
        j = idx_ref[i, w]
        allowed = _allowed(mask_fn, i * block_q, j * block_kv, (block_q, block_kv), kv_len,
                           q_seg_ref, kv_seg_ref, pidx_ref[i, w], blocks_ref if has_blocks else None)
        k = k_ref[...]
        _, ds = _tile_grads(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...],
                            delta_ref[...], allowed, scale, soft_cap)
        acc_ref[...] += jax.lax.dot_general(ds.astype(k.dtype), k, _NN,
                                            preferred_element_type=jnp.float32)

    @pl.when(w == width - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, cnt_ref, pidx_ref, blocks_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, *refs, scale, soft_cap, mask_fn, block_q, block_kv, kv_len, width,
                has_segments, has_blocks):
    if has_segments:
        q_seg_ref, kv_seg_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
    else:
        (dk_ref, dv_ref, dk_acc, dv_acc), q_seg_ref, kv_seg_ref = refs, None, None
    j, w = pl.program_id(2), pl.program_id(3)

    @pl.when(w == 0)
    def _init():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    @pl.when(w < cnt_ref[j])
    def _step():
        i = idx_ref[j, w]
        allowed = _allowed(mask_fn, i * block_q, j * block_kv, (block_q, block_kv), kv_len,
                           q_seg_ref, kv_seg_ref, pidx_ref[j, w], blocks_ref if has_blocks else None)
        q, do = q_ref[...], do_ref[...]
        p, ds = _tile_grads(q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...],
                            allowed, scale, soft_cap)
        dv_acc[...] += jax.lax.dot_general(p.astype(do.dtype), do, _TN,
                                           preferred_element_type=jnp.float32)
        dk_acc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, _TN,
                                           preferred_element_type=jnp.float32)

    @pl.when(w == width - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _call(kernel, cfg, grid, indices, in_specs, out_specs, out_shape, scratch, name):
    return pl.pallas_call(
        functools.partial(kernel, **_kernel_args(cfg, indices.shape[1])),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=grid, in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=scratch),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        out_shape=out_shape, interpret=cfg.interpret, name=name,
    )


def _segment_inputs(q_seg, kv_seg):
    """Segment ids in Mosaic-friendly 2-D layouts: q lane-replicated, kv sublane-replicated."""
    if q_seg is None:
        return ()
    return (jnp.broadcast_to(q_seg[:, :, None], q_seg.shape + (LANES,)),
            jnp.broadcast_to(kv_seg[:, None, :], (kv_seg.shape[0], 8, kv_seg.shape[1])))


def _block_spec(cfg, blocks):
    """The partial-tile mask block of the current step (a fixed dummy when none exist)."""
    if not cfg.has_blocks:
        return pl.BlockSpec((None,) + blocks.shape[1:], lambda b, h, n, w, idx, cnt, pidx: (0, 0, 0))
    return pl.BlockSpec((None, cfg.block_q, cfg.block_kv),
                        lambda b, h, n, w, idx, cnt, pidx: (jnp.maximum(pidx[n, w], 0), 0, 0))


def _forward(q, k, v, q_seg, kv_seg, tables, cfg):
    batch, heads, q_len, head_dim = q.shape
    groups = heads // k.shape[1]
    bq, bk = cfg.block_q, cfg.block_kv
    idx, cnt, pidx, blocks = tables[0], tables[1], tables[2], tables[6]
    q_map = lambda b, h, i, w, idx, cnt, pidx: (b, h, i, 0)  # noqa: E731
    kv_map = lambda b, h, i, w, idx, cnt, pidx: (b, h // groups, idx[i, w], 0)  # noqa: E731
    in_specs = [_block_spec(cfg, blocks),
                pl.BlockSpec((None, None, bq, head_dim), q_map),
                pl.BlockSpec((None, None, bk, head_dim), kv_map),
                pl.BlockSpec((None, None, bk, head_dim), kv_map)]
    segs = _segment_inputs(q_seg, kv_seg)
    if segs:
        in_specs += [pl.BlockSpec((None, bq, LANES), lambda b, h, i, w, idx, cnt, pidx: (b, i, 0)),
                     pl.BlockSpec((None, 8, bk), lambda b, h, i, w, idx, cnt, pidx: (b, 0, idx[i, w]))]
    out_specs = [pl.BlockSpec((None, None, bq, head_dim), q_map),
                 pl.BlockSpec((None, None, bq, LANES), q_map)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len, LANES), jnp.float32)]
    scratch = [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
               pltpu.VMEM((bq, head_dim), jnp.float32)]
    grid = (batch, heads, q_len // bq, idx.shape[1])
    return _call(_fwd_kernel, cfg, grid, idx, in_specs, out_specs, out_shape, scratch,
                 "block_sparse_attention_fwd_tpu")(idx, cnt, pidx, blocks, q, k, v, *segs)


def _backward(q, k, v, q_seg, kv_seg, tables, out, lse, do, dlse, cfg):
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len_padded = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    bq, bk = cfg.block_q, cfg.block_kv
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    # lse is broadcast over the lanes: a row's cotangent is the sum of its lanes'
    delta = jnp.broadcast_to(delta - jnp.sum(dlse, axis=-1, keepdims=True), lse.shape)
    segs = _segment_inputs(q_seg, kv_seg)

    # dQ: walk each q-block's kv list
    idx, cnt, pidx, blocks = tables[0], tables[1], tables[2], tables[6]
    q_map = lambda b, h, i, w, idx, cnt, pidx: (b, h, i, 0)  # noqa: E731
    kv_map = lambda b, h, i, w, idx, cnt, pidx: (b, h // groups, idx[i, w], 0)  # noqa: E731
    q_block, kv_block = (None, None, bq, head_dim), (None, None, bk, head_dim)
    row_block = (None, None, bq, LANES)
    in_specs = [_block_spec(cfg, blocks),
                pl.BlockSpec(q_block, q_map), pl.BlockSpec(kv_block, kv_map),
                pl.BlockSpec(kv_block, kv_map), pl.BlockSpec(q_block, q_map),
                pl.BlockSpec(row_block, q_map), pl.BlockSpec(row_block, q_map)]
    if segs:
        in_specs += [pl.BlockSpec((None, bq, LANES), lambda b, h, i, w, idx, cnt, pidx: (b, i, 0)),
                     pl.BlockSpec((None, 8, bk), lambda b, h, i, w, idx, cnt, pidx: (b, 0, idx[i, w]))]
    dq = _call(_dq_kernel, cfg, (batch, heads, q_len // bq, idx.shape[1]), idx, in_specs,
               pl.BlockSpec(q_block, q_map), jax.ShapeDtypeStruct(q.shape, q.dtype),
               [pltpu.VMEM((bq, head_dim), jnp.float32)], "block_sparse_attention_dq_tpu",
               )(idx, cnt, pidx, blocks, q, k, v, do, lse, delta, *segs)

    # dK/dV: walk each kv-block's q list; one output block per (query head, kv block)
    idx, cnt, pidx = tables[3], tables[4], tables[5]
    own_kv = lambda b, h, j, w, idx, cnt, pidx: (b, h // groups, j, 0)  # noqa: E731
    walk_q = lambda b, h, j, w, idx, cnt, pidx: (b, h, idx[j, w], 0)  # noqa: E731
    in_specs = [_block_spec(cfg, blocks),
                pl.BlockSpec(q_block, walk_q), pl.BlockSpec(kv_block, own_kv),
                pl.BlockSpec(kv_block, own_kv), pl.BlockSpec(q_block, walk_q),
                pl.BlockSpec(row_block, walk_q), pl.BlockSpec(row_block, walk_q)]
    if segs:
        in_specs += [pl.BlockSpec((None, bq, LANES), lambda b, h, j, w, idx, cnt, pidx: (b, idx[j, w], 0)),
                     pl.BlockSpec((None, 8, bk), lambda b, h, j, w, idx, cnt, pidx: (b, 0, j))]
    out_map = lambda b, h, j, w, idx, cnt, pidx: (b, h, j, 0)  # noqa: E731
    per_head = jax.ShapeDtypeStruct((batch, heads, kv_len_padded, head_dim), jnp.float32)
    dk, dv = _call(_dkv_kernel, cfg, (batch, heads, kv_len_padded // bk, idx.shape[1]),
                   idx, in_specs,
                   [pl.BlockSpec(kv_block, out_map), pl.BlockSpec(kv_block, out_map)],
                   [per_head, per_head],
                   [pltpu.VMEM((bk, head_dim), jnp.float32), pltpu.VMEM((bk, head_dim), jnp.float32)],
                   "block_sparse_attention_dkv_tpu")(idx, cnt, pidx, blocks, q, k, v, do, lse, delta, *segs)
    fold = lambda g: g.reshape(batch, kv_heads, groups, kv_len_padded, head_dim).sum(2)  # noqa: E731
    return dq, fold(dk).astype(k.dtype), fold(dv).astype(v.dtype)


def _kernel_args(cfg, width):
    return cfg.pick("scale", "soft_cap", "mask_fn", "block_q", "block_kv", "kv_len",
                    "has_segments", "has_blocks") | {"width": width}


_attention = flash_vjp(_forward, _backward)


def block_sparse_attention_tpu(q, k, v, kv_indices, kv_counts, q_indices, q_counts, *,
                               kv_len: int, block_q: int, block_kv: int, scale: float,
                               soft_cap: float | None = None, mask_fn: Callable | None = None,
                               partial_blocks=None, kv_partial=None, q_partial=None,
                               q_segment_ids=None, kv_segment_ids=None, interpret: bool = False,
                               return_lse: bool = False):
    """Same arguments and result as the GPU kernel's ``block_sparse_attention``; tiles need
    ``block_q % 8 == 0`` and ``block_kv``, ``head_dim`` multiples of 128. Raises
    ``ValueError`` for operands that are not whole blocks or tables of another size."""
    _checks.attention_operands(
        "block_sparse_attention_tpu", q, k, v, kv_indices, kv_counts, q_indices, q_counts,
        kv_len=kv_len, block_q=block_q, block_kv=block_kv, partial_blocks=partial_blocks,
        kv_partial=kv_partial, q_partial=q_partial, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids)
    if block_q % 8 or block_kv % LANES or q.shape[-1] % LANES:
        raise ValueError(f"TPU tiles need block_q % 8 == 0 and block_kv, head_dim multiples of "
                         f"{LANES}; got block_q={block_q}, block_kv={block_kv}, "
                         f"head_dim={q.shape[-1]}")
    has_blocks = partial_blocks is not None
    if not has_blocks:  # placeholders keep one kernel signature; never read
        partial_blocks = jnp.zeros((1, 8, LANES), jnp.int32)
        kv_partial = jnp.zeros_like(jnp.asarray(kv_indices))
        q_partial = jnp.zeros_like(jnp.asarray(q_indices))
    cfg = KernelConfig(scale=float(scale), soft_cap=None if soft_cap is None else float(soft_cap),
                  mask_fn=mask_fn, block_q=int(block_q), block_kv=int(block_kv),
                  kv_len=int(kv_len), interpret=bool(interpret),
                  has_segments=q_segment_ids is not None, has_blocks=has_blocks)
    tables = tuple(jnp.asarray(t, jnp.int32) for t in (
        kv_indices, kv_counts, kv_partial, q_indices, q_counts, q_partial, partial_blocks))
    out, lse = _attention(q, k, v, q_segment_ids, kv_segment_ids, tables, cfg)
    return (out, lse[..., 0]) if return_lse else out
