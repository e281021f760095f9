"""``implementation="pallas"`` / ``"pallas_interpret"``: the block-sparse flash kernel of
:mod:`pallas_kernels.block_sparse_attention`, fed with our masks' block tables.

Inside partial tiles the kernels evaluate closed-form masks (Full, Causal, Local,
ChunkedCausal, Strided, Fixed, GlobalTokens(n) and their ``&``/``|``) from integer
arithmetic; any other mask (BigBird, BlockMask, explicit global indices) ships the dense masks
of its partial tiles, deduplicated, as splash attention does. ``"pallas"`` picks the kernel by the platform being lowered for: the
Triton kernel on CUDA, the Mosaic kernel on TPU (both lower from a CPU host), and the XLA
block-sparse path elsewhere. ``"pallas_interpret"`` runs the GPU kernel in interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.ops.attention.blocksparse import blocksparse_attention
from jaxsparse.ops.masks import (PARTIAL, AndMask, CausalMask, ChunkedCausalMask, FixedMask,
                                 FullMask, GlobalTokensMask, LocalMask, Mask, MultiHeadMask, OrMask,
                                 StridedMask, cached_block_table)
from jaxsparse.ops.sizes import round_up
from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.block_sparse_attention_tpu import LANES, block_sparse_attention_tpu

_ELEMENTWISE = (FullMask, CausalMask, LocalMask, ChunkedCausalMask, StridedMask, FixedMask)


def closed_form(mask: Mask) -> bool:
    """True if the kernels can evaluate ``mask`` inside tiles from integer arithmetic;
    other masks (BigBird, BlockMask, explicit global indices) ship their partial tiles."""
    if isinstance(mask, AndMask | OrMask):
        return closed_form(mask.left) and closed_form(mask.right)
    if isinstance(mask, GlobalTokensMask):
        return isinstance(mask.num_or_indices, int)
    return isinstance(mask, _ELEMENTWISE)


def kernel_can_serve(mask: Mask | None) -> bool:
    """Every lazy mask can be served: closed-form ones in-kernel, others by partial tiles."""
    return mask is None or isinstance(mask, Mask)


@functools.lru_cache(maxsize=32)
def partial_tiles(mask: Mask, q_len: int, kv_len: int, block_q: int, block_kv: int):
    """Distinct dense masks of the partial tiles, and for each listed tile (per q-block and,
    transposed, per kv-block) the index of its mask block, -1 for full tiles.

    Like splash attention's ``partial_mask_blocks``: identical tiles are stored once, so a
    causal-style diagonal costs one block however long the sequence."""
    table = cached_block_table(mask, q_len, kv_len, block_q, block_kv)
    kind = table.kind[0]
    rows, cols = np.nonzero(kind == PARTIAL)
    allowed = mask.allowed_fn(q_len, kv_len)
    q_pos = rows[:, None, None] * block_q + np.arange(block_q)[None, :, None]
    kv_pos = cols[:, None, None] * block_kv + np.arange(block_kv)[None, None, :]
    dense = np.broadcast_to(allowed(q_pos, kv_pos), (rows.size, block_q, block_kv))
    dense = dense & (q_pos < q_len) & (kv_pos < kv_len)
    ids = np.full(kind.shape, -1, np.int32)
    if rows.size:
        unique, which = np.unique(dense.reshape(rows.size, -1), axis=0, return_inverse=True)
        ids[rows, cols] = which.reshape(-1)
    else:  # block-aligned layouts: every visited tile is full
        unique = np.zeros((1, block_q * block_kv), bool)
    kv_partial = np.take_along_axis(ids, table.kv_indices[0], axis=1)
    q_partial = np.take_along_axis(ids.T, table.q_indices[0], axis=1)
    return unique.reshape(-1, block_q, block_kv).astype(np.int32), kv_partial, q_partial


def _block(length: int, preferred: int) -> int:
    """Triton needs power-of-two tiles of at least 16."""
    return max(16, min(preferred, 1 << max(length - 1, 1).bit_length()))


def _pad(x, axis, size):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _kernel_attention(q, k, v, mask, q_seg, kv_seg, scale, soft_cap, interpret, block_q,
                      block_kv, backend="gpu"):
    """``(out [B, S, Hq, D], lse [B, S, Hq])`` from the kernel of ``backend``."""
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = q_heads // kv_heads
    if backend == "tpu":  # Mosaic tiles: (8, 128)-aligned blocks, lane-dense head dim
        bq = bk = 128
        d_pad = round_up(head_dim, LANES)
        kernel = block_sparse_attention_tpu
    else:
        bq, bk = _block(q_len, block_q), _block(kv_len, block_kv)
        d_pad = max(16, 1 << (head_dim - 1).bit_length())
        kernel = block_sparse_attention
    s_pad, t_pad = round_up(q_len, bq), round_up(kv_len, bk)
    # [B, S, H, D] -> [B, H, S, D], padded to whole blocks and the kernel's head dim
    to_kernel = lambda x, length: jnp.transpose(_pad(_pad(x, 1, length), 3, d_pad), (0, 2, 1, 3))  # noqa: E731
    qt, kt, vt = to_kernel(q, s_pad), to_kernel(k, t_pad), to_kernel(v, t_pad)
    if q_seg is not None:
        q_seg = _pad(q_seg.astype(jnp.int32), 1, s_pad)
        kv_seg = _pad(kv_seg.astype(jnp.int32), 1, t_pad)

    def run(head_mask, q_part, k_part, v_part):
        table = cached_block_table(head_mask, q_len, kv_len, bq, bk)
        if closed_form(head_mask):
            mask_args = dict(mask_fn=head_mask.allowed)
        else:
            blocks, kv_partial, q_partial = partial_tiles(head_mask, q_len, kv_len, bq, bk)
            mask_args = dict(partial_blocks=blocks, kv_partial=kv_partial, q_partial=q_partial)
        return kernel(
            q_part, k_part, v_part, table.kv_indices[0], table.kv_counts[0], table.q_indices[0],
            table.q_counts[0], kv_len=kv_len, block_q=bq, block_kv=bk, scale=scale,
            soft_cap=soft_cap, q_segment_ids=q_seg, kv_segment_ids=kv_seg, interpret=interpret,
            return_lse=True, **mask_args)

    if isinstance(mask, MultiHeadMask):
        parts = [run(m, qt[:, h:h + 1], kt[:, h // groups:h // groups + 1],
                     vt[:, h // groups:h // groups + 1]) for h, m in enumerate(mask.masks)]
        out, lse = (jnp.concatenate(p, axis=1) for p in zip(*parts))
    else:
        out, lse = run(mask if mask is not None else FullMask(), qt, kt, vt)
    return (jnp.transpose(out, (0, 2, 1, 3))[:, :q_len, :, :head_dim],
            jnp.transpose(lse, (0, 2, 1))[:, :q_len])


def pallas_attention(q, k, v, *, mask, q_segment_ids, kv_segment_ids, scale, logits_soft_cap,
                     interpret: bool, block_q: int = 64, block_kv: int = 64,
                     return_lse: bool = False):
    mask = FullMask() if mask is None else mask
    if not isinstance(mask, Mask):
        raise ValueError("implementation='pallas' needs a lazy Mask object (or None), not an "
                         "array; use 'xla' for array masks")
    fallback = lambda: blocksparse_attention(q, k, v, mask=mask, q_segment_ids=q_segment_ids,  # noqa: E731
                                             kv_segment_ids=kv_segment_ids, scale=scale,
                                             logits_soft_cap=logits_soft_cap,
                                             return_lse=return_lse)
    if q.shape[0] == 0 or q.shape[2] == 0:
        # An empty batch or no query heads: nothing to compute, and the kernels' blocks would
        # be larger than the operands. The XLA path returns the empty out (and lse) and
        # gradients, as on every other implementation.
        return fallback()

    def kernel(interp, backend="gpu"):
        out, lse = _kernel_attention(q, k, v, mask, q_segment_ids, kv_segment_ids, scale,
                                     logits_soft_cap, interp, block_q, block_kv, backend)
        return (out, lse) if return_lse else out

    if interpret:
        return kernel(True)
    # Chosen by the platform being lowered for, so CUDA lowering works from a CPU host.
    return jax.lax.platform_dependent(cuda=lambda: kernel(False), tpu=lambda: kernel(False, "tpu"),
                                      default=fallback)
