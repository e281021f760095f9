"""``dot_product_attention``: one entry point, argument checks, and the choice of implementation.

Layout follows ``jax.nn.dot_product_attention``: ``q [B, S, Hq, D]``, ``k, v [B, T, Hkv, D]``
with ``Hq % Hkv == 0`` (multi-head, grouped-query and multi-query attention).
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.ops.attention.blocksparse import blocksparse_attention
from jaxsparse.ops.attention.reference import xla_attention
from jaxsparse.ops.concrete import concrete_values
from jaxsparse.ops.mask_specs import parse_mask_spec
from jaxsparse.ops.masks import FullMask, Mask, MultiHeadMask

IMPLEMENTATIONS = (None, "xla", "xla_blocksparse", "pallas", "pallas_interpret")

# From this many logits (batch x heads x queries x keys) on, the block-skipping path beats the
# dense reference on CPU whatever the mask's density: the dense path writes every [B, H, S, T]
# intermediate to memory, the tiled one keeps a tile in cache. Measured on 2 cores, forward +
# backward (dense softmax with its written-out VJP): causal B1 H4 D64 at 512 tokens (1M
# logits) 6.8 vs 4.9 ms, B8 H4 D16 at 1024 tokens 361 vs 69 ms, B1 H4 D64 at 2048 tokens
# 209 vs 54 ms.
_BLOCKSPARSE_MIN_LOGITS = 1 << 20
# ... unless the whole problem is one tile of the block-skipping path (its default block is
# 128): then there is nothing to skip, and its scan, gathers and online softmax only cost
# (B32 H4 D32 at 128 tokens, the tiny configs' attention: 7.9 vs 27.5 ms).
_ONE_TILE = 128


def check_attention_inputs(q, k, v, names: tuple[str, str, str] = ("q", "k", "v")) -> None:
    """Shapes ``q [B, S, Hq, D]``, ``k, v [B, T, Hkv, D]`` with ``Hq % Hkv == 0`` and floating
    dtypes, or a ``ValueError`` in the caller's argument ``names``."""
    nq, nk, nv = names
    got = f"got {nq}{q.shape}, {nk}{k.shape}, {nv}{v.shape}"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{nq}, {nk}, {nv} must be [batch, seq, heads, head_dim]; {got}")
    if k.shape != v.shape:
        raise ValueError(f"{nk} and {nv} must have the same shape; {got}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{nq} and {nk} must have the same batch size (dim 0); {got}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head dims differ: {nq} has {q.shape[3]}, {nk} and {nv} have "
                         f"{k.shape[3]}; they must be equal")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads "
                         f"({k.shape[2]}); {got}")
    if q.shape[1] < 1 or k.shape[1] < 1:
        raise ValueError(f"sequence lengths must be >= 1; {got}")
    if q.shape[3] < 1:
        raise ValueError(f"head_dim must be >= 1; {got}")
    for name, x in zip(names, (q, k, v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):  # an integer output would be truncated
            raise ValueError(f"{name} has dtype {x.dtype}; attention needs floating-point "
                             "inputs (e.g. float32, bfloat16)")


def static_logit_options(scale, logits_soft_cap) -> tuple[float | None, float | None]:
    """``(scale, logits_soft_cap)`` as Python floats (or None), each finite and > 0, else an
    error naming it. Both are compiled into the kernels, so they must be known when tracing: a
    learnt temperature belongs in ``q`` (scale the queries), not here."""
    return _static_positive("scale", scale), _static_positive("logits_soft_cap", logits_soft_cap)


def logit_scale(scale, head_dim: int):
    """``scale``, or ``1/√head_dim`` for None, for the ops that may take a traced one (a learnt
    temperature under ``jit``: the XLA paths of routing and sparse global attention); a
    concrete one must be a finite real number > 0 (NaN or 0 would give NaN or flat
    attention), a traced one cannot be checked here."""
    if scale is None:
        return head_dim ** -0.5
    value = concrete_values(scale)
    if value is None:  # traced
        return scale
    if (isinstance(scale, bool) or value.shape != () or value.dtype.kind not in "iuf"
            or not (np.isfinite(value) and value > 0)):
        raise ValueError(f"scale={scale!r}: must be a finite number > 0 (or None)")
    return scale


def _static_positive(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real | jax.Array | np.ndarray):
        raise TypeError(f"{name}={value!r}: expected a real number > 0 or None")
    concrete = concrete_values(value)
    if concrete is None or concrete.shape != ():
        raise TypeError(f"{name} must be a static real number (it is compiled into the "
                        f"kernels); got {value!r}. To learn a temperature, scale q instead.")
    value = float(concrete)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r}: must be a finite number > 0 (or None)")
    return value


def lazy_mask(mask, num_heads: int):
    """A mask spec string (``"causal"``, ``"local:256"``, …; see ``jaxsparse.ops.mask_specs``)
    as its lazy :class:`Mask`; anything else unchanged."""
    if isinstance(mask, str):
        return parse_mask_spec(mask, num_heads)
    return mask


def attention_segments(segment_ids, batch, q_len, kv_len):
    """``(q_segment_ids [B, S], kv_segment_ids [B, T])`` from one ``[B, S]`` array (needs
    ``S == T``) or a pair, checked for shape and integer dtype; ``(None, None)`` for None."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, tuple | list):
        if len(segment_ids) != 2:
            raise ValueError("segment_ids must be one [B, S] array or a (q, kv) pair of arrays")
        q_seg, kv_seg = (jnp.asarray(s) for s in segment_ids)
    else:
        if q_len != kv_len:
            raise ValueError(f"a single segment_ids array needs S == T (got S={q_len}, T={kv_len}); "
                             "pass a (q_segment_ids, kv_segment_ids) pair")
        q_seg = kv_seg = jnp.asarray(segment_ids)
    for name, seg, length in (("q", q_seg, q_len), ("kv", kv_seg, kv_len)):
        if seg.shape != (batch, length):
            raise ValueError(f"{name} segment_ids must have shape {(batch, length)}, got {seg.shape}")
        if not jnp.issubdtype(seg.dtype, jnp.integer):
            raise ValueError(f"{name} segment_ids must be integers, got dtype {seg.dtype}")
    return q_seg, kv_seg


def _dense_allowed(mask, q_seg, kv_seg, batch, heads, q_len, kv_len):
    """``mask`` and segments as one boolean array broadcastable to [B, H, S, T] (or None)."""
    allowed = None
    if isinstance(mask, MultiHeadMask):
        allowed = jnp.asarray(mask.to_dense(q_len, kv_len))[None]
    elif isinstance(mask, Mask):
        allowed = jnp.asarray(mask.to_dense(q_len, kv_len))[None, None]
    elif mask is not None:
        allowed = mask
    if q_seg is not None:
        same = q_seg[:, None, :, None] == kv_seg[:, None, None, :]
        allowed = same if allowed is None else allowed & same
    return allowed


def _array_mask(mask, batch, heads, q_len, kv_len):
    if not isinstance(mask, jax.Array | np.ndarray):
        raise TypeError(f"mask={mask!r:.80}: expected a Mask, a mask spec string (e.g. 'causal', "
                        "'local:256'), a boolean array broadcastable to [B, H, S, T], or None")
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be a Mask object or a boolean array, got dtype {mask.dtype}")
    if mask.ndim not in (2, 3, 4):
        raise ValueError(f"mask of shape {mask.shape}: a boolean array mask must be [S, T], "
                         "[B, S, T] or [B, H, S, T] (size-1 dimensions broadcast)")
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    try:
        np.broadcast_shapes(mask.shape, (batch, heads, q_len, kv_len))
    except ValueError:
        raise ValueError(f"mask of shape {mask.shape} does not broadcast to [B, H, S, T]="
                         f"{(batch, heads, q_len, kv_len)}") from None
    return mask


def _choose(mask, batch: int, heads: int, q_len: int, kv_len: int):
    """The best implementation available on this backend for ``mask``; only speed depends on
    the choice, never results."""
    if jax.default_backend() in ("gpu", "tpu") and (mask is None or isinstance(mask, Mask)):
        from jaxsparse.ops.attention.pallas import kernel_can_serve

        if mask is None or kernel_can_serve(mask):
            return "pallas"
    if mask is not None and not isinstance(mask, Mask):
        return "xla"  # an explicit boolean array: only the dense path takes it
    if (batch * heads * q_len * kv_len < _BLOCKSPARSE_MIN_LOGITS
            or max(q_len, kv_len) <= _ONE_TILE):
        return "xla"
    return "xla_blocksparse"


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: Mask | jax.Array | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    implementation: str | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """softmax(q k^T * scale [soft-capped] [masked]) v, per head, with GQA.

    Args:
      q: ``[B, S, Hq, D]`` queries. k, v: ``[B, T, Hkv, D]``; ``Hq`` a multiple of ``Hkv``.
        Any ``S, T >= 1`` and any head dim; implementations pad internally.
      mask: a lazy :class:`~jaxsparse.ops.masks.Mask` (a ``MultiHeadMask`` needs ``Hq``
        heads), a mask spec string such as ``"causal"`` or ``"local:256"``
        (:mod:`~jaxsparse.ops.mask_specs`), or a boolean array broadcastable to ``[B, Hq, S, T]`` (``[S, T]`` and
        ``[B, S, T]`` are accepted), True = may attend.
      segment_ids: integer ``[B, S]`` (needs ``S == T``) or a pair ``([B, S], [B, T])``; tokens
        attend only within their segment (packed documents). ANDed with ``mask``.
      scale: multiplies the logits; default ``D ** -0.5``.
      logits_soft_cap: if set, logits become ``cap * tanh(logits / cap)`` (Gemma-2 style).
      implementation: ``None`` (best available), ``"xla"`` (dense reference),
        ``"xla_blocksparse"`` (visits only non-empty tiles of a lazy mask), ``"pallas"`` (the
        block-sparse flash kernel: Triton on CUDA, Mosaic on TPU) or ``"pallas_interpret"``
        (the CUDA kernel in interpret mode, for CPU tests).
      return_lse: also return each row's log-sum-exp of its (scaled, soft-capped) allowed
        logits, ``[B, S, Hq]`` float32 and differentiable — what merging this attention with
        another over a disjoint key set needs (``out = Σ_parts exp(lse_p - lse) out_p``,
        :func:`~jaxsparse.ops.attention.online_softmax.merge_finished`).

    Returns:
      ``[B, S, Hq, D]`` in ``q.dtype`` (with ``return_lse``, the pair ``(out, lse)``). Rows
      with nothing to attend to are zero, and so are their gradients; their ``lse`` is 0.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not available; allowed: {IMPLEMENTATIONS}")
    check_attention_inputs(q, k, v)
    scale, logits_soft_cap = static_logit_options(scale, logits_soft_cap)
    batch, q_len, q_heads, head_dim = q.shape
    kv_len = k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    mask = lazy_mask(mask, q_heads)
    if isinstance(mask, Mask):
        mask.check_size(q_len, kv_len)
        if mask.num_heads is not None and mask.num_heads != q_heads:
            raise ValueError(f"mask is a MultiHeadMask of {mask.num_heads} heads; q has {q_heads}")
    elif mask is not None:
        mask = _array_mask(mask, batch, q_heads, q_len, kv_len)
    q_seg, kv_seg = attention_segments(segment_ids, batch, q_len, kv_len)

    if implementation is None:
        implementation = _choose(mask, batch, q_heads, q_len, kv_len)
    if implementation == "xla_blocksparse":
        mask = FullMask() if mask is None else mask  # None means no mask on every path
        if not isinstance(mask, Mask):
            raise ValueError("implementation='xla_blocksparse' needs a lazy Mask object as mask "
                             f"(got {type(mask).__name__}); use 'xla' for array masks")
        return blocksparse_attention(q, k, v, mask=mask, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                     scale=scale, logits_soft_cap=logits_soft_cap,
                                     return_lse=return_lse)
    if implementation in ("pallas", "pallas_interpret"):
        from jaxsparse.ops.attention.pallas import pallas_attention

        return pallas_attention(q, k, v, mask=mask, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                scale=scale, logits_soft_cap=logits_soft_cap,
                                interpret=implementation == "pallas_interpret",
                                return_lse=return_lse)
    allowed = _dense_allowed(mask, q_seg, kv_seg, batch, q_heads, q_len, kv_len)
    return xla_attention(q, k, v, allowed, scale, logits_soft_cap, return_lse)
