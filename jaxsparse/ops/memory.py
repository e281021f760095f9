"""Product-key memory lookup (Lample et al., NeurIPS 2019, "Large Memory Layers with Product
Keys").

A memory of ``N = n²`` slots is addressed by the Cartesian product of two sub-key tables of
``n`` keys each: slot ``i·n + j`` has the key ``[K1[i], K2[j]]``, so a query ``[q1, q2]``
scores it ``q1·K1[i] + q2·K2[j]``. The exact top-k over all ``N`` slots is found from the
top-k of each half alone — any slot in the global top-k has both halves in their halves'
top-k — by re-scoring the ``k²`` candidate pairs: ``O(n + k²)`` per query instead of
``O(N)``. The output is the softmax-weighted sum of the chosen slots' values.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.ops.checks import is_integer
from jaxsparse.ops.concrete import concrete_values
from jaxsparse.ops.topk import top_k


def product_key_topk(query_HK, subkeys1_HND, subkeys2_HND, knn: int, *,
                     top_k_implementation: str | None = None):
    """Top ``knn`` slots of every head for queries ``[..., H, K]`` (``K`` = 2 × sub-key dim).

    Returns ``(scores [..., H, knn], slots [..., H, knn])`` in descending score order; slot
    ``i·n + j`` pairs sub-key ``i`` of the first table with ``j`` of the second. The three
    top-k selections go through :func:`jaxsparse.ops.topk.top_k` (a C++ kernel on CPU, where
    XLA's sort-based top-k was most of the layer's time).

    Ties: slots of equal score are ranked by their halves' ranks (first half first), not by
    slot index as a top-k over all ``n²`` slots would; where exact ties meet at the ``k``-th
    place the two can keep different (equally scored) slots.
    """
    if subkeys1_HND.ndim != 3:
        raise ValueError(f"subkeys1 {subkeys1_HND.shape}: must be [heads, n_keys, sub-key dim]")
    if subkeys2_HND.shape != subkeys1_HND.shape:  # slot i·n + j assumes one n for both tables
        raise ValueError(f"subkeys2 {subkeys2_HND.shape} must match subkeys1 "
                         f"{subkeys1_HND.shape}")
    heads, n, half = subkeys1_HND.shape
    if query_HK.shape[-2:] != (heads, 2 * half):
        raise ValueError(f"query {query_HK.shape}: last dims must be (heads={heads}, "
                         f"2·sub-key dim={2 * half})")
    if not is_integer(knn) or not 1 <= knn <= n:
        raise ValueError(f"knn={knn!r}: must be an integer in [1, n_keys={n}] (top-k is taken "
                         "per half)")
    q1, q2 = query_HK[..., :half].astype(jnp.float32), query_HK[..., half:].astype(jnp.float32)
    s1 = jnp.einsum("...hd,hnd->...hn", q1, subkeys1_HND.astype(jnp.float32))
    s2 = jnp.einsum("...hd,hnd->...hn", q2, subkeys2_HND.astype(jnp.float32))
    select = lambda x: top_k(x, knn, implementation=top_k_implementation)  # noqa: E731
    v1, i1 = select(s1)                                              # [..., H, k]
    v2, i2 = select(s2)
    pair_scores = (v1[..., :, None] + v2[..., None, :]).reshape(*v1.shape[:-1], knn * knn)
    pair_slots = (i1[..., :, None] * n + i2[..., None, :]).reshape(pair_scores.shape)
    scores, best = select(pair_scores)
    return scores, jnp.take_along_axis(pair_slots, best, axis=-1)


MEMORY_READ_IMPLEMENTATIONS = (None, "scan", "native")


def memory_read(scores_HK, slots_HK, values_NV, *, implementation: str | None = None):
    """``Σ_heads Σ_top-k softmax(scores) · values[slot]``: ``[..., V]``. Gradients reach the
    scores and only the ``knn · heads`` value rows read (a sparse update, as the paper's).

    The paper's EmbeddingBag, never holding the ``[..., heads, knn, V]`` block of gathered
    rows (for a 1.6B Hydra at 4096 tokens per sequence that block alone is 128 GiB per 32
    sequences). ``"scan"`` adds the ``heads · knn`` chosen rows one at a time (a scan whose
    step is rematerialised; its backward scatters every token's row into the whole table once
    per pick). ``"native"`` is the C++ kernel of :mod:`jaxsparse.ops.native.embedding_bag`
    (float32; the value gradient a deterministic scatter-add after a counting sort of the
    picks by slot): at 8k tokens of hydra_29m the PKM layer's forward + backward takes
    0.27 s instead of 4.0 s on 2 cores. ``None`` picks ``"native"`` on a CPU-only host for
    float32 and the scan elsewhere.

    ``values`` must be floating point; concrete ``slots`` must lie in ``[0, values rows)``
    (traced ones cannot be checked: out of range, the scan wraps or reads NaN)."""
    if implementation not in MEMORY_READ_IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: allowed "
                         f"{MEMORY_READ_IMPLEMENTATIONS}")
    if (scores_HK.shape != slots_HK.shape or scores_HK.ndim < 2 or values_NV.ndim != 2
            or not jnp.issubdtype(slots_HK.dtype, jnp.integer)):
        raise ValueError(f"scores {scores_HK.shape}, slots {slots_HK.shape} {slots_HK.dtype}, "
                         f"values {values_NV.shape}: expected scores and integer slots of one "
                         "shape [..., heads, knn] and values [slots, value_dim]")
    if not jnp.issubdtype(values_NV.dtype, jnp.floating):  # the weights would be cast to zeros
        raise ValueError(f"values has dtype {values_NV.dtype}; memory_read needs floating-point "
                         "values (e.g. float32, bfloat16)")
    _check_slots(slots_HK, values_NV.shape)
    # float32 weights, and the scan sums the picks in float32 (a bfloat16 running sum of
    # heads·knn rows rounded at every add: 8x one rounding at 4 heads x 32)
    weights = jax.nn.softmax(scores_HK.astype(jnp.float32), axis=-1)
    lead = weights.shape[:-2]
    if implementation == "scan" or (implementation is None and jax.default_backend() != "cpu"):
        return _scan_read(weights, slots_HK, values_NV)
    from jaxsparse.ops.native import embedding_bag as native

    if values_NV.dtype != jnp.float32:
        if implementation == "native":
            raise ValueError(f"memory_read(implementation='native') computes in float32; got "
                             f"values {values_NV.dtype} (use 'scan')")
        return _scan_read(weights, slots_HK, values_NV)
    if not native.available():
        if implementation == "native":
            raise RuntimeError("memory_read(implementation='native'): the C++ kernel could not "
                               "be built (see the warning above); use 'scan'")
        return _scan_read(weights, slots_HK, values_NV)

    def bag(weights, slots, values):  # one bag of heads·knn picks per token
        picks = weights.shape[-2] * weights.shape[-1]
        tokens = math.prod(lead)  # (not -1: a 0 in lead or picks)
        flat = native.native_embedding_bag(weights.reshape(tokens, picks),
                                           slots.reshape(tokens, picks), values)
        return flat.reshape(*lead, values.shape[-1])

    slots = slots_HK.astype(jnp.int32)
    return jax.lax.platform_dependent(weights, slots, values_NV, cpu=bag, default=_scan_read)


def _check_slots(slots_HK, values_shape) -> None:
    """Concrete slots must name a table row: the scan would wrap -1 to the last row and read
    NaN past the end, the native kernel fail (traced slots come from a top-k in range)."""
    values, rows = concrete_values(slots_HK), values_shape[0]
    if values is None or not values.size:
        return
    bad = np.unique(values[(values < 0) | (values >= rows)])
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:8]) + (", …" if bad.size > 8 else "")
        raise ValueError(f"slots holds {shown}: must be in [0, {rows}) (the rows of values "
                         f"{values_shape})")


def _scan_read(weights, slots_HK, values_NV):
    lead = weights.shape[:-2]
    picks = weights.shape[-2] * weights.shape[-1]  # (not -1: lead may hold a 0)
    weights = jnp.moveaxis(weights.reshape(*lead, picks), -1, 0)  # [heads·knn, ...]
    slots = jnp.moveaxis(slots_HK.reshape(*lead, picks), -1, 0)

    @jax.checkpoint  # the backward re-gathers the row instead of storing every one
    def weighted_row(weight, slot):
        return weight[..., None] * jnp.take(values_NV, slot, axis=0).astype(jnp.float32)

    def add(total, step):
        return total + weighted_row(*step), None

    total, _ = jax.lax.scan(add, jnp.zeros(lead + values_NV.shape[-1:], jnp.float32),
                            (weights.astype(jnp.float32), slots))
    return total.astype(values_NV.dtype)


def memory_read_reference(scores_HK, slots_HK, values_NV):
    """Gather every chosen row, then one weighted sum (tests: clear, but memory-hungry)."""
    weights = jax.nn.softmax(scores_HK, axis=-1)
    rows = jnp.take(values_NV, slots_HK, axis=0)                     # [..., H, k, V]
    return jnp.einsum("...hk,...hkv->...v", weights.astype(rows.dtype), rows)


def exhaustive_topk(query_HK, subkeys1_HND, subkeys2_HND, knn: int):
    """The reference: score all ``n²`` slots, then top-k (tests; O(N) per query)."""
    _, n, half = subkeys1_HND.shape
    q1, q2 = query_HK[..., :half].astype(jnp.float32), query_HK[..., half:].astype(jnp.float32)
    s1 = jnp.einsum("...hd,hnd->...hn", q1, subkeys1_HND.astype(jnp.float32))
    s2 = jnp.einsum("...hd,hnd->...hn", q2, subkeys2_HND.astype(jnp.float32))
    every = (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:-1], n * n)
    return jax.lax.top_k(every, knn)
