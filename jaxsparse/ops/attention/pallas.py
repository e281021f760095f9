"""``implementation="pallas"`` / ``"pallas_interpret"``: the block-sparse flash kernel of
:mod:`pallas_kernels.block_sparse_attention`, fed with our masks' block tables.

The kernel evaluates the mask inside partial tiles from closed-form integer arithmetic, so it
serves masks built from Full, Causal, Local, ChunkedCausal, Strided, Fixed and
GlobalTokens(n) with ``&``/``|`` (per head too); layout masks (BigBird, BlockMask, explicit
global indices) are refused with a ValueError — ``implementation=None`` then uses the XLA
block-sparse path. ``"pallas"`` picks the kernel by the platform being lowered for: the
Triton kernel on CUDA, the Mosaic kernel on TPU (both lower from a CPU host), and the XLA
block-sparse path elsewhere. ``"pallas_interpret"`` runs the GPU kernel in interpret mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.attention.blocksparse import blocksparse_attention
from jaxsparse.ops.masks import (AndMask, CausalMask, ChunkedCausalMask, FixedMask, FullMask,
                                 GlobalTokensMask, LocalMask, Mask, MultiHeadMask, OrMask,
                                 StridedMask, cached_block_table)
from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.block_sparse_attention_tpu import LANES, block_sparse_attention_tpu

_ELEMENTWISE = (FullMask, CausalMask, LocalMask, ChunkedCausalMask, StridedMask, FixedMask)


def kernel_can_serve(mask: Mask) -> bool:
    """True if the kernel can evaluate ``mask`` inside tiles."""
    if isinstance(mask, MultiHeadMask):
        return all(kernel_can_serve(m) for m in mask.masks)
    if isinstance(mask, AndMask | OrMask):
        return kernel_can_serve(mask.left) and kernel_can_serve(mask.right)
    if isinstance(mask, GlobalTokensMask):
        return isinstance(mask.num_or_indices, int)
    return isinstance(mask, _ELEMENTWISE)


def _block(length: int, preferred: int) -> int:
    """Triton needs power-of-two tiles of at least 16."""
    return max(16, min(preferred, 1 << max(length - 1, 1).bit_length()))


def _pad(x, axis, size):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _kernel_attention(q, k, v, mask, q_seg, kv_seg, scale, soft_cap, interpret, block_q,
                      block_kv, backend="gpu"):
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = q_heads // kv_heads
    if backend == "tpu":  # Mosaic tiles: (8, 128)-aligned blocks, lane-dense head dim
        bq = bk = 128
        d_pad = -(-head_dim // LANES) * LANES
        kernel = block_sparse_attention_tpu
    else:
        bq, bk = _block(q_len, block_q), _block(kv_len, block_kv)
        d_pad = max(16, 1 << (head_dim - 1).bit_length())
        kernel = block_sparse_attention
    s_pad, t_pad = -(-q_len // bq) * bq, -(-kv_len // bk) * bk
    # [B, S, H, D] -> [B, H, S, D], padded to whole blocks and the kernel's head dim
    to_kernel = lambda x, length: jnp.transpose(_pad(_pad(x, 1, length), 3, d_pad), (0, 2, 1, 3))  # noqa: E731
    qt, kt, vt = to_kernel(q, s_pad), to_kernel(k, t_pad), to_kernel(v, t_pad)
    if q_seg is not None:
        q_seg = _pad(q_seg.astype(jnp.int32), 1, s_pad)
        kv_seg = _pad(kv_seg.astype(jnp.int32), 1, t_pad)

    def run(head_mask, q_part, k_part, v_part):
        table = cached_block_table(head_mask, q_len, kv_len, bq, bk)
        return kernel(
            q_part, k_part, v_part, table.kv_indices[0], table.kv_counts[0], table.q_indices[0],
            table.q_counts[0], kv_len=kv_len, block_q=bq, block_kv=bk, scale=scale,
            soft_cap=soft_cap, mask_fn=head_mask.allowed, q_segment_ids=q_seg,
            kv_segment_ids=kv_seg, interpret=interpret)

    if isinstance(mask, MultiHeadMask):
        parts = [run(m, qt[:, h:h + 1], kt[:, h // groups:h // groups + 1],
                     vt[:, h // groups:h // groups + 1]) for h, m in enumerate(mask.masks)]
        out = jnp.concatenate(parts, axis=1)
    else:
        out = run(mask if mask is not None else FullMask(), qt, kt, vt)
    return jnp.transpose(out, (0, 2, 1, 3))[:, :q_len, :, :head_dim]


def pallas_attention(q, k, v, *, mask, q_segment_ids, kv_segment_ids, scale, logits_soft_cap,
                     interpret: bool, block_q: int = 64, block_kv: int = 64):
    mask = FullMask() if mask is None else mask
    if not isinstance(mask, Mask):
        raise ValueError("implementation='pallas' needs a lazy Mask object (or None), not an "
                         "array; use 'xla' for array masks")
    if not kernel_can_serve(mask):
        raise ValueError(f"implementation='pallas' cannot evaluate {type(mask).__name__} inside "
                         "tiles (layout masks: BigBird, BlockMask, explicit global indices); use "
                         "'xla_blocksparse' or implementation=None")
    kernel = lambda interp, backend="gpu": _kernel_attention(  # noqa: E731
        q, k, v, mask, q_segment_ids, kv_segment_ids, scale, logits_soft_cap, interp, block_q,
        block_kv, backend)
    if interpret:
        return kernel(True)
    fallback = lambda: blocksparse_attention(q, k, v, mask=mask, q_segment_ids=q_segment_ids,  # noqa: E731
                                             kv_segment_ids=kv_segment_ids, scale=scale,
                                             logits_soft_cap=logits_soft_cap)
    # Chosen by the platform being lowered for, so CUDA lowering works from a CPU host.
    return jax.lax.platform_dependent(cuda=lambda: kernel(False), tpu=lambda: kernel(False, "tpu"),
                                      default=fallback)
