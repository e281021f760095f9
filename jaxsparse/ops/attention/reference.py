"""The dense masked reference: softmax(q k^T) v written for clarity, float32 inside."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.ops.softmax import masked_softmax

# Finite stand-in for -inf: keeps exp() and its gradient free of NaN on fully masked rows.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def soft_cap(logits, cap):
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def grouped_query_rows(q, kv_heads: int):
    """``q [B, S, Hq, D]`` as ``[B, Hkv, G·S, D]``: the ``G = Hq / Hkv`` query heads sharing a
    key/value head stacked as the rows of one matmul per (batch, kv head), so K and V are
    never repeated."""
    batch, q_len, q_heads, head_dim = q.shape
    groups = q_heads // kv_heads
    rows = q.reshape(batch, q_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    return rows.reshape(batch, kv_heads, groups * q_len, head_dim)


def ungrouped_rows(out, q_len: int):
    """The inverse of :func:`grouped_query_rows`: ``[B, Hkv, G·S, D]`` as ``[B, S, Hq, D]``."""
    batch, kv_heads, rows, head_dim = out.shape
    groups = rows // q_len
    out = out.reshape(batch, kv_heads, groups, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, kv_heads * groups, head_dim)


def xla_attention(q, k, v, allowed, scale, logits_soft_cap, return_lse: bool = False,
                  kv_heads_first: bool = False):
    """``allowed``: boolean broadcastable to ``[B, Hq, S, T]`` or None. Masked rows give 0.
    ``return_lse``: also each row's log-sum-exp ``[B, S, Hq]`` float32 (0 on masked rows).
    ``kv_heads_first``: ``k, v`` are ``[B, Hkv, T, D]`` instead of ``[B, T, Hkv, D]`` (a
    decode cache's layout: see ``decode_attention``).

    GQA: the ``G = Hq / Hkv`` query heads sharing a key/value head are stacked as ``G·S`` rows
    of one matmul per (batch, kv head), so K and V are never repeated (a 5-d einsum with the
    group as its own axis ran ~3x slower through XLA:CPU's backward)."""
    batch, q_len, q_heads, head_dim = q.shape
    if kv_heads_first and k.shape[1] == 1:
        # one key/value head: both layouts are the same array, and XLA:CPU compiled the
        # sequence-first einsums' decode loop 1.3-1.5x faster (bench decode, 1 kv head)
        k, v = (x.reshape(x.shape[0], x.shape[2], 1, x.shape[3]) for x in (k, v))
        kv_heads_first = False
    kv_heads, kv_len = (k.shape[1], k.shape[2]) if kv_heads_first else (k.shape[2], k.shape[1])
    kv = "bhtd" if kv_heads_first else "bthd"
    groups = q_heads // kv_heads
    rows = grouped_query_rows(q, kv_heads)                              # [B, Hkv, G·S, D]
    logits = jnp.einsum(f"bhmd,{kv}->bhmt", rows, k, preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST)
    logits = soft_cap(logits * scale, logits_soft_cap)
    logits = logits.reshape(batch, kv_heads, groups, q_len, kv_len)
    if allowed is not None:
        # [B or 1, H or 1, S, T] -> [B or 1, Hkv, G, S, T] to line up with the grouped logits
        allowed = jnp.broadcast_to(allowed, (allowed.shape[0], q_heads, q_len, kv_len))
        allowed = allowed.reshape(allowed.shape[0], kv_heads, groups, q_len, kv_len)
    probs = masked_softmax(logits, allowed)                            # empty rows: zeros
    out = jnp.einsum(f"bhmt,{kv}->bhmd", probs.reshape(batch, kv_heads, groups * q_len, kv_len),
                     v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    out = ungrouped_rows(out, q_len).astype(q.dtype)
    if not return_lse:
        return out
    return out, row_logsumexp(logits, allowed).transpose(0, 3, 1, 2).reshape(batch, q_len, q_heads)


def row_logsumexp(logits, allowed):
    """log Σ exp over the allowed entries of each row, 0 on rows with none; masked entries
    become MASK_VALUE (exp gives exactly 0 beside any allowed one) so that no -inf reaches the
    gradient."""
    if allowed is None:
        return jax.nn.logsumexp(logits, axis=-1)
    allowed = jnp.broadcast_to(allowed, logits.shape)
    lse = jax.nn.logsumexp(jnp.where(allowed, logits, MASK_VALUE), axis=-1)
    return jnp.where(jnp.any(allowed, axis=-1), lse, 0.0)
