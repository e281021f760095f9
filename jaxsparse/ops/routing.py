"""Routing attention (Roy, Saffar, Vaswani & Grangier, TACL 2021): content-based sparse
attention through online k-means.

Every head has ``C`` unit-norm centroids. Queries and keys are L2-normalised and assigned to
their most similar centroid; a query attends only to keys of its own cluster, so with
``C ≈ √L`` clusters of ``w = L / C`` members the cost is ``O(L^1.5 d)`` instead of
``O(L² d)``.

Two ways to form clusters:

``balanced_routing_attention`` (the paper's code, for encoders): every centroid takes the
    ``w`` queries and the ``w`` keys most similar to it (top-w), so every cluster holds
    exactly ``w`` members; a token may be in several clusters (its outputs are averaged) or in
    none (its output is zero). In a decoder this **leaks the future**: whether a past token is
    among a centroid's top ``w`` depends on how similar the *later* tokens are to it, so
    masking by position inside a cluster is not enough (``causal=True`` is offered only to show
    this; a test demonstrates the leak).
``causal_routing_attention`` (decoders, leakage-free): query ``t`` attends to the ``w`` most
    recent keys ``j ≤ t`` of its own cluster. Keys are sorted by (cluster, position), so that
    set is the run of ``w`` sorted keys ending at the last key of the query's cluster at or
    before ``t``; the set depends only on positions ``≤ t``, the balance comes from the fixed
    window (every query reads at most ``w`` keys), and decoding one token at a time gives the
    same result from a cache.

With a shared query/key projection (``shared_qk``, as the paper's language models use) keys
are the normalised queries (times ``√D``, :func:`shared_keys`) and a token does not attend to
itself unless it has nothing else.
The centroids are learnt outside the gradient by an exponential moving average of the vectors
assigned to them (:func:`ema_centroids`), and the projections are pulled towards their
centroids by the commitment loss (:func:`commitment_loss`).

**Centring** (our addition, optional ``k_center`` / ``q_center``): vectors are routed by the
direction of ``x - μ`` where ``μ`` is a running mean of the routed vectors
(:func:`ema_mean`), not by the direction of ``x``. Why: hidden states share a large common
component that grows in training; spherical k-means on uncentred vectors then sees one narrow
cone, a single centroid becomes the nearest for (almost) every token and the "clusters"
degenerate into one sliding window (measured on MQAR at 1024 tokens: the largest cluster held
all tokens from step 400 on). For keys this is free: subtracting one vector from every key
changes no query's softmax. ``μ`` is a statistic of past training batches, never of the
current sequence, so routing stays causal. Attention logits always use the raw vectors.

**Multi-probe queries** (our addition, optional ``probes`` = P > 1): a query reads the ``w``
most recent keys of each of its ``P`` most similar clusters (``P · w`` keys; a key sits in one
cluster, so the windows are disjoint), the multi-probe idea of LSH search (Lv et al., VLDB
2007) that Reformer's multi-round hashing also serves. Keys and the centroid update are as with
``P = 1``. Why: a query learns to score a key only while the key is in a window it reads, and
a query whose best cluster holds only identical keys (e.g. a filler token's) gets no gradient
at all — its softmax is flat over equal keys — so it can stay there for good (measured on
MQAR at 1024 tokens: one of two routing heads read the filler cluster at 96% fill and reached
none of the values it had to copy). Cost and memory grow by P, still ``O(L · P · w)``.

**Re-seeding dead centroids** (optional, :func:`reseed_dead`): a centroid that no vector chose
in a training batch moves onto one of the vectors served worst by the others, as k-means++
seeding and VQ-VAE codebook restarts do. With key centroids a query can prefer a centroid that
no key is near (it sits where it was initialised) and then reads nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.attention.api import check_attention_inputs, logit_scale
from jaxsparse.ops.attention.decode import checked_cache_lengths, nan_past_the_cache
from jaxsparse.ops.checks import check_integer, is_integer
from jaxsparse.ops.concrete import concrete_values
from jaxsparse.ops.mixed_precision import matmul_f32, weighted_sum
from jaxsparse.ops.segments import check_segment_ids, document_first_position
from jaxsparse.ops.sizes import round_up
from jaxsparse.ops.softmax import masked_softmax



def normalize(x, eps: float = 1e-6):
    """``x / ‖x‖`` over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def shared_keys(q):
    """Attention keys of a shared query/key space: the unit query directions times ``√D``.

    Why ``√D``: the usual ``1/√D`` logit scale assumes keys of norm ``≈ √D``; with unit keys
    the initial logits would be ``√D`` times too flat, and the projections would have to grow
    by that factor before any attention sharpens (measured on MQAR at 1024 tokens: dense
    shared-QK heads learnt nothing in 400 steps where separate ones had started to bind keys).
    """
    return (normalize(q) * jnp.sqrt(jnp.float32(q.shape[-1]))).astype(q.dtype)


def init_centroids(key, num_heads: int, num_clusters: int, head_dim: int):
    """``[H, C, D]`` random unit vectors: usable before any update (evaluation, generation)."""
    return normalize(jax.random.normal(key, (num_heads, num_clusters, head_dim)))


def routing_units(x_BLHD, center_HD=None):
    """The unit vectors that are clustered: ``normalize(x - center)`` (``center`` ``[H, D]``,
    a running mean of ``x``; ``None``: no centring)."""
    if center_HD is None:
        return normalize(x_BLHD)
    return normalize(x_BLHD.astype(jnp.float32) - jax.lax.stop_gradient(center_HD)[None, None])


def _similarity(x_BLHD, centroids_HCD):
    return jnp.einsum("blhd,hcd->blhc", x_BLHD, centroids_HCD)


def assign(x_BLHD, centroids_HCD):
    """Cluster of every (already normalised) vector: ``[B, L, H]`` int32."""
    return jnp.argmax(_similarity(x_BLHD, centroids_HCD), axis=-1).astype(jnp.int32)


def assign_top(x_BLHD, centroids_HCD, probes: int):
    """The ``probes`` most similar clusters of every vector, best first: ``[B, L, H, probes]``
    int32 (``[..., 0]`` equals :func:`assign`)."""
    if probes == 1:  # argmax is cheaper than a sort
        return assign(x_BLHD, centroids_HCD)[..., None]
    return jax.lax.top_k(_similarity(x_BLHD, centroids_HCD), probes)[1].astype(jnp.int32)


def _check(q, k, v, centroids, window=None):
    """``(length, num_clusters)`` after checking the inputs (``window`` too, when given)."""
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one shape [B, L, H, D]; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):  # an integer output would be truncated
            raise ValueError(f"{name} has dtype {x.dtype}; routing attention needs "
                             "floating-point inputs (e.g. float32, bfloat16)")
    _, length, heads, dim = q.shape
    _check_centroids(centroids, heads, dim)
    if window is not None:
        check_integer("window", window)
    return length, centroids.shape[1]


def _check_centroids(centroids, heads, dim):
    if (centroids.ndim != 3 or centroids.shape[0] != heads or centroids.shape[2] != dim
            or centroids.shape[1] < 1):
        raise ValueError(f"centroids must be [H={heads}, C, D={dim}], got {centroids.shape} "
                         "(C >= 1 clusters)")


def _check_probes(probes, num_clusters):
    if not is_integer(probes) or not 1 <= probes <= num_clusters:
        raise ValueError(f"probes={probes!r}: must be an integer in [1, num_clusters="
                         f"{num_clusters}] (a query reads the windows of its `probes` most "
                         "similar clusters)")


def _check_center(center, shape_BLHD, name):
    if center is not None and center.shape != tuple(shape_BLHD[2:]):
        raise ValueError(f"{name} must be [H={shape_BLHD[2]}, D={shape_BLHD[3]}] (the routed "
                         f"vectors' heads and width), got {center.shape}")


def _keys(q, k, shared_qk, q_center=None, k_center=None):
    """Keys used for attention and the unit vectors that are routed (queries, keys)."""
    _check_center(q_center, q.shape, "q_center")
    _check_center(k_center, q.shape, "k_center")
    qn = routing_units(q, q_center)
    if shared_qk:
        return shared_keys(q), qn, qn
    return k, qn, routing_units(k, k_center)


# --- causal: the w most recent keys of the query's cluster ------------------------------------


def cluster_windows(q_clusters_BLH, k_clusters_BLH, window: int):
    """Key positions ``[B, L, H, P·w]`` each query attends to and their validity (same shape):
    for each of the query's ``P`` clusters (``q_clusters [B, L, H]`` or ``[B, L, H, P]``) the
    ``w`` most recent keys ``j ≤ t`` of that cluster, oldest first. A key belongs to one
    cluster, so the ``P`` windows never share a key."""
    if q_clusters_BLH.ndim == 3:
        q_clusters_BLH = q_clusters_BLH[..., None]
    batch, length, heads, probes = q_clusters_BLH.shape
    pos = jnp.arange(length, dtype=jnp.int32)
    code = k_clusters_BLH * length + pos[None, :, None]           # unique per key
    order = jnp.argsort(code, axis=1)                              # keys by (cluster, position)
    sorted_code = jnp.take_along_axis(code, order, axis=1)
    query_code = q_clusters_BLH * length + pos[None, :, None, None]
    # Index of the last sorted key with code <= the query's: same cluster and position <= t.
    last = jax.vmap(jax.vmap(lambda s, c: jnp.searchsorted(s, c, side="right"),
                             in_axes=(1, 1), out_axes=1))(sorted_code, query_code) - 1
    offsets = jnp.arange(window, dtype=jnp.int32)[None, None, None, None]
    idx = last[..., None] - (window - 1) + offsets                # [B, L, H, P, w]
    idx = idx.reshape(batch, length, heads, probes * window)       # [B, L, H, P·w]
    safe = jnp.clip(idx, 0, length - 1)
    gather = jax.vmap(lambda arr, i: arr[i], in_axes=(1, 1), out_axes=1)  # over heads
    key_pos = jax.vmap(gather)(order, safe)                        # [B, L, H, P·w]
    key_cluster = _gather_keys(k_clusters_BLH[..., None], key_pos)[..., 0]
    wanted = jnp.repeat(q_clusters_BLH, window, axis=-1)           # the cluster of each slot
    valid = (idx >= 0) & (key_cluster == wanted)
    return key_pos, valid


def _gather_keys(x_BLHD, pos_BLHW):
    """``x[b, pos[b, t, h, i], h]`` as ``[B, L, H, w, D]``."""
    return jax.vmap(jax.vmap(lambda x, p: x[p], in_axes=(1, 1), out_axes=1))(x_BLHD, pos_BLHW)


def _attend(q, keys, values, valid, scale):
    # matmuls in the inputs' dtype, accumulated in float32; the softmax in float32
    logits = matmul_f32("blhd,blhwd->blhw", q, keys)
    weights = masked_softmax(logits * scale, valid, axis=-1)
    return weighted_sum("blhw,blhwd->blhd", weights, values)


def _attend_in_chunks(q, keys, values, key_pos, valid, scale, chunk):
    length = q.shape[1]
    if length <= chunk:
        return _attend(q, _gather_keys(keys, key_pos), _gather_keys(values, key_pos), valid, scale)
    padded = round_up(length, chunk)

    def split(x):  # [B, L, ...] -> [L/chunk, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(args):
        q_c, pos_c, valid_c = args
        return _attend(q_c, _gather_keys(keys, pos_c), _gather_keys(values, pos_c), valid_c, scale)

    out = jax.lax.map(one, (split(q), split(key_pos), split(valid)))
    return jnp.moveaxis(out, 0, 1).reshape(q.shape[0], padded, *q.shape[2:])[:, :length]


def causal_routing_attention(q, k, v, centroids, *, window: int, shared_qk: bool = False,
                             scale: float | None = None, query_chunk: int = 512,
                             q_center=None, k_center=None, probes: int = 1, segment_ids=None):
    """Leakage-free causal routing attention; ``q, k, v [B, L, H, D]``, ``centroids [H, C, D]``.

    Returns ``(out [B, L, H, D], routing)`` where ``routing`` holds the normalised vectors and
    their clusters (``q_unit``, ``k_unit``, ``q_clusters``, ``k_clusters``) for the centroid
    update and the commitment loss, and ``keys_read [B, L, H]`` (how many keys each query
    attended to) for diagnostics. A query with no key of its cluster at or before it gets
    zeros. Queries are processed ``query_chunk`` at a time (rematerialised in the backward
    pass), so the gathered keys take ``O(query_chunk · w · D)`` memory, not ``O(L · w · D)``.
    ``q_center``, ``k_center`` ``[H, D]``: route by ``x - center`` (module docstring; with
    ``shared_qk`` only ``q_center`` is used). ``probes``: a query reads the windows of its
    ``probes`` most similar clusters (``probes · w`` keys; module docstring); the centroid
    update and the commitment loss use its best cluster (``q_clusters``).
    ``segment_ids [B, L]`` (packed documents, runs of equal ids as in
    :mod:`jaxsparse.ops.segments`): a query reads only keys of its own document — of its
    cluster's ``w`` most recent keys, those at or after the document's first token, which are
    the ``w`` most recent of the document's keys in that cluster.
    """
    _, num_clusters = _check(q, k, v, centroids, window)
    _check_probes(probes, num_clusters)
    check_integer("query_chunk", query_chunk)
    scale = logit_scale(scale, q.shape[-1])
    keys, qn, kn = _keys(q, k, shared_qk, q_center, k_center)
    cq, ck, key_pos, valid = _route(qn, kn, centroids, window, shared_qk, probes,
                                    _first_positions(segment_ids, q.shape[:2]))
    out = _attend_in_chunks(q, keys, v, key_pos, valid, scale, query_chunk)
    routing = {"q_unit": qn, "k_unit": kn, "q_clusters": cq, "k_clusters": ck,
               "keys_read": jnp.sum(valid, axis=-1, dtype=jnp.int32)}
    return out.astype(q.dtype), routing


def _first_positions(segment_ids, batch_length):
    """``[B, L, 1, 1]``: the first position of each query's document, or None."""
    if segment_ids is None:
        return None
    first = document_first_position(check_segment_ids(segment_ids, *batch_length))
    return first[:, :, None, None]


def _route(qn, kn, centroids, window, shared_qk, probes=1, first=None):
    cq, ck = assign_top(qn, centroids, probes), assign(kn, centroids)
    key_pos, valid = cluster_windows(cq, ck, window)
    if first is not None:  # packed documents: keys of the query's own document only
        valid = valid & (key_pos >= first)
    if shared_qk:
        valid = _drop_self_unless_alone(key_pos, valid)
    return cq[..., 0], ck, key_pos, valid


def routing_windows(q, k, centroids, *, window: int, shared_qk: bool = False, q_center=None,
                    k_center=None, probes: int = 1, segment_ids=None):
    """The keys :func:`causal_routing_attention` lets each query read, for diagnostics and
    plots: ``(key_pos [B, L, H, P·w], valid [B, L, H, P·w])`` (arguments as there; ``k`` is
    ignored with ``shared_qk``)."""
    _, num_clusters = _check(q, k if not shared_qk else q, q, centroids, window)
    _check_probes(probes, num_clusters)
    _, qn, kn = _keys(q, k, shared_qk, q_center, k_center)
    return _route(qn, kn, centroids, window, shared_qk, probes,
                  _first_positions(segment_ids, q.shape[:2]))[2:]


def _drop_self_unless_alone(key_pos, valid):
    """Shared-QK attention: a token's own key is the most similar one, so it is masked unless
    it is the only key the query has (Kitaev et al.'s Reformer rule)."""
    t = jnp.arange(key_pos.shape[1], dtype=jnp.int32)[None, :, None, None]
    is_self = key_pos == t
    others = jnp.any(valid & ~is_self, axis=-1, keepdims=True)
    return valid & ~(is_self & others)


# --- balanced top-w clusters (the paper's code) ------------------------------------------------


def balanced_clusters(unit_BLHD, centroids_HCD, window: int):
    """Positions ``[B, H, C, w]`` of the ``w`` vectors most similar to each centroid."""
    scores = jnp.einsum("blhd,hcd->bhcl", unit_BLHD, centroids_HCD)
    return jax.lax.top_k(scores, window)[1].astype(jnp.int32)


def balanced_routing_attention(q, k, v, centroids, *, window: int, causal: bool = False,
                               shared_qk: bool = False, scale: float | None = None):
    """The paper's top-w routing: cluster ``c`` holds the ``w`` queries and the ``w`` keys most
    similar to centroid ``c``, attention runs inside each cluster, and each token's outputs are
    averaged over the clusters that picked it (zeros if none did). ``causal=True`` only masks
    by position inside clusters, which **still leaks** (module docstring)."""
    length, num_clusters = _check(q, k, v, centroids, window)
    if window > length:
        raise ValueError(f"window={window} exceeds the length {length}: a cluster cannot hold "
                         f"more members than there are tokens")
    scale = logit_scale(scale, q.shape[-1])
    keys, qn, kn = _keys(q, k, shared_qk)
    q_members = balanced_clusters(qn, centroids, window)           # [B, H, C, w]
    k_members = q_members if shared_qk else balanced_clusters(kn, centroids, window)

    def pick(x_BLHD, members):
        return jax.vmap(jax.vmap(lambda x, m: x[m], in_axes=(1, 0)))(x_BLHD, members)

    qc, kc, vc = pick(q, q_members), pick(keys, k_members), pick(v, k_members)  # [B, H, C, w, D]
    logits = matmul_f32("bhcid,bhcjd->bhcij", qc, kc)
    allowed = jnp.ones(logits.shape, bool)
    if causal:
        allowed &= k_members[..., None, :] <= q_members[..., :, None]
    if shared_qk:
        self_key = k_members[..., None, :] == q_members[..., :, None]
        allowed &= ~self_key | ~jnp.any(allowed & ~self_key, axis=-1, keepdims=True)
    weights = masked_softmax(logits * scale, allowed, axis=-1)
    out_c = weighted_sum("bhcij,bhcjd->bhcid", weights, vc)
    b, _, h, d = q.shape
    flat = q_members.reshape(b, h, -1)
    total = jax.vmap(jax.vmap(lambda o, m: jnp.zeros((length, d)).at[m].add(o)))(
        out_c.reshape(b, h, -1, d), flat)                          # [B, H, L, D]
    count = jax.vmap(jax.vmap(lambda m: jnp.zeros((length,)).at[m].add(1.0)))(flat)
    out = (total / jnp.maximum(count, 1.0)[..., None]).transpose(0, 2, 1, 3)
    routing = {"q_unit": qn, "k_unit": kn, "q_clusters": assign(qn, centroids),
               "k_clusters": assign(kn, centroids), "q_members": q_members}
    return out.astype(q.dtype), routing


# --- learning the centroids ---------------------------------------------------------------


def ema_centroids(centroids_HCD, units, clusters, decay: float = 0.999, mask=None,
                  reseed: bool = False):
    """One k-means step as an exponential moving average: each centroid moves towards the mean
    of the unit vectors assigned to it (``units``: list of ``[B, L, H, D]``, ``clusters``: list
    of ``[B, L, H]``; ``mask [B, L]`` leaves out padding) and is renormalised; centroids with no
    member stay put — or, with ``reseed``, jump to the vectors that fit their own centroid
    worst (:func:`reseed_dead`). No gradient flows through it. ``decay`` must be in
    ``[0, 1]`` (checked when concrete: a NaN would make every centroid NaN)."""
    value = concrete_values(decay)
    if value is not None and not (value.shape == () and 0 <= value <= 1):
        raise ValueError(f"decay={decay!r}: must be in [0, 1]")
    _check_routed_units(centroids_HCD, units, clusters, mask)
    h, c, d = centroids_HCD.shape
    sums = jnp.zeros((h, c, d), jnp.float32)
    counts = jnp.zeros((h, c), jnp.float32)
    for unit, cluster in zip(units, clusters):
        onehot = jax.nn.one_hot(cluster, c, dtype=jnp.float32)      # [B, L, H, C]
        if mask is not None:
            onehot = onehot * mask[:, :, None, None]
        sums = sums + jnp.einsum("blhc,blhd->hcd", onehot, unit.astype(jnp.float32))
        counts = counts + jnp.sum(onehot, axis=(0, 1))
    means = sums / jnp.maximum(counts, 1.0)[..., None]
    moved = normalize(decay * centroids_HCD + (1 - decay) * means)
    out = jnp.where((counts > 0)[..., None], moved, centroids_HCD)
    if reseed:
        out = reseed_dead(out, counts == 0, units, mask)
    return jax.lax.stop_gradient(out)


def reseed_dead(centroids_HCD, dead_HC, units, mask=None):
    """Move every dead centroid (``dead [H, C]``: no member in the batch) onto one of the
    vectors its live centroids serve worst — lowest similarity to their nearest centroid,
    the farthest-first rule that seeds k-means++ (Arthur & Vassilvitskii 2007) — the i-th
    dead centroid of a head onto that head's i-th worst vector. Why: a centroid no key is near
    never moves under the moving average, yet queries are still sent to it (with key
    centroids) and read an empty window; measured on MQAR at 1024 tokens, a routing head sent
    its queries to its filler cluster and to dead centroids only (VQ-VAE codebooks die the same
    way; Jukebox restarts dead codes on encoder outputs, Dhariwal et al. 2020)."""
    h, c, d = centroids_HCD.shape
    x = jnp.concatenate([u.astype(jnp.float32).reshape(-1, h, d) for u in units])  # [N, H, D]
    scores = jnp.einsum("nhd,hcd->nhc", x, centroids_HCD)
    fit = jnp.max(jnp.where(dead_HC[None], -jnp.inf, scores), axis=-1)             # [N, H]
    if mask is not None:
        fit = jnp.where(jnp.tile(mask.reshape(-1), len(units))[:, None] > 0, fit, jnp.inf)
    k = min(c, x.shape[0])
    worst = jax.lax.top_k(-fit.T, k)[1]                                             # [H, k]
    rank = jnp.clip(jnp.cumsum(dead_HC, axis=-1) - 1, 0, k - 1)                     # [H, C]
    pick = jnp.take_along_axis(worst, rank, axis=-1)                                # [H, C]
    seeds = normalize(x[pick, jnp.arange(h)[:, None]])                              # [H, C, D]
    return jnp.where(dead_HC[..., None], seeds, centroids_HCD)


def ema_mean(mean_HD, count, x_BLHD, decay: float, mask=None):
    """One step of the running mean used for centring: returns ``(mean, count + 1)``.

    The mean is bias-corrected (as Adam's moments) so that it is the plain batch mean after the
    first step and a ``decay``-weighted mean of all batches seen later, instead of being pulled
    towards its zero initialisation for the first ``1 / (1 - decay)`` steps. ``mask [B, L]``
    leaves out padding. No gradient flows through it. ``decay`` must be in ``[0, 1)``: at 1 the
    bias correction divides by ``1 - 1 = 0`` (checked when concrete)."""
    value = concrete_values(decay)
    if value is not None and not (value.shape == () and 0 <= value < 1):
        raise ValueError(f"decay={decay!r}: must be in [0, 1)")
    x = x_BLHD.astype(jnp.float32)
    if mask is None:
        batch_mean = jnp.mean(x, axis=(0, 1))
    else:
        w = mask.astype(jnp.float32)[:, :, None, None]
        batch_mean = jnp.sum(x * w, axis=(0, 1)) / jnp.maximum(jnp.sum(w), 1.0)
    # Raw EMA m_t = d·m_{t-1} + (1-d)·x_t from m_0 = 0; the stored mean is m_t / (1 - d^t).
    count = count + 1
    seen = (count - 1).astype(jnp.float32)
    raw_before = mean_HD * (1.0 - decay ** seen)
    new = (decay * raw_before + (1.0 - decay) * batch_mean) / (1.0 - decay ** (seen + 1.0))
    return jax.lax.stop_gradient(new), count


def _check_routed_units(centroids_HCD, units, clusters, mask=None) -> None:
    """``units`` (``[B, L, H, D]`` each) and their ``clusters`` (``[B, L, H]``, ids in
    ``[0, C)`` where concrete) pair up one to one, and ``mask`` is ``[B, L]``: a missing
    cluster list dropped its units from the update (zip), an id out of range moved no
    centroid (or was clamped to the last in the loss), a mask of another length failed
    inside a multiply."""
    h, c, d = centroids_HCD.shape
    if not units:
        raise ValueError("units=[]: at least one array of routed vectors is needed (the update "
                         "and the loss average over them)")
    if len(units) != len(clusters):
        raise ValueError(f"{len(units)} units and {len(clusters)} clusters: each unit array "
                         "needs its cluster ids")
    for i, (unit, cluster) in enumerate(zip(units, clusters)):
        if unit.ndim != 4 or unit.shape[2:] != (h, d):
            raise ValueError(f"units[{i}] of shape {tuple(unit.shape)}: expected [batch, length, "
                             f"heads={h}, head_dim={d}] (the centroids' heads and width)")
        if tuple(cluster.shape) != tuple(unit.shape[:3]) or not jnp.issubdtype(cluster.dtype,
                                                                             jnp.integer):
            raise ValueError(f"clusters[{i}] of shape {tuple(cluster.shape)} and dtype "
                             f"{cluster.dtype}: expected integers of shape {tuple(unit.shape[:3])}")
        ids = concrete_values(cluster)
        if ids is not None and ids.size and not (0 <= ids.min() and ids.max() < c):
            raise ValueError(f"clusters[{i}] holds ids in [{ids.min()}, {ids.max()}]: must be in "
                             f"[0, {c}) (the centroids)")
        if mask is not None and tuple(jnp.shape(mask)) != tuple(unit.shape[:2]):
            raise ValueError(f"mask of shape {tuple(jnp.shape(mask))}: expected [batch, length]="
                             f"{tuple(unit.shape[:2])}, as units[{i}]")


def commitment_loss(centroids_HCD, units, clusters):
    """Mean ``‖x̂ − μ_c(x)‖²`` over the routed vectors, the centroids held fixed: gradients
    reach the projections only."""
    _check_routed_units(centroids_HCD, units, clusters)
    fixed = jax.lax.stop_gradient(centroids_HCD)
    total, count = 0.0, 0
    for unit, cluster in zip(units, clusters):
        chosen = jax.vmap(lambda cl: fixed[jnp.arange(fixed.shape[0]), cl])(
            cluster.reshape(-1, cluster.shape[-1]))                # [B*L, H, D]
        diff = unit.reshape(chosen.shape) - chosen
        total = total + jnp.sum(diff * diff)
        count += diff.shape[0] * diff.shape[1]
    return total / count


def causal_routing_decode(q, k_cache, v_cache, k_clusters_cache, lengths, centroids, *,
                          window: int, shared_qk: bool = False, scale: float | None = None,
                          q_center=None, probes: int = 1):
    """Queries ``q [B, n, H, D]`` at positions ``lengths - n .. lengths - 1`` against a cache of
    keys/values ``[B, S, H, D]`` and their clusters ``[B, S, H]`` holding positions
    ``0 .. lengths - 1``: the same key sets as :func:`causal_routing_attention` (the ``w`` most
    recent keys of the query's cluster), found by counting instead of sorting. ``q_center``:
    as in :func:`causal_routing_attention` (the cached key clusters were assigned with it);
    ``probes`` likewise. Cluster ids in the cache are in ``[-1, C)`` (``-1``: an empty slot).
    Its time and memory grow with the cache; :mod:`jaxsparse.ops.routing_rings` decodes the
    same key sets from a state of fixed size (what ``nn.RoutingAttention`` keeps)."""
    _check_decode(q, k_cache, v_cache, k_clusters_cache, centroids, window)
    batch, new, heads, dim = q.shape
    slots = k_cache.shape[1]
    lengths = checked_cache_lengths(lengths, batch, new, slots)
    _check_center(q_center, q.shape, "q_center")
    _check_probes(probes, centroids.shape[1])
    scale = logit_scale(scale, dim)
    cq = assign_top(routing_units(q, q_center), centroids, probes)  # [B, n, H, P]
    q_pos = lengths.reshape(batch, 1) - new + jnp.arange(new)[None, :]
    kv_pos = jnp.arange(slots)[None, None, :]
    past = (kv_pos <= q_pos[:, :, None])[..., None]                 # [B, n, S, 1]
    valid = jnp.zeros((batch, new, slots, heads), bool)
    for p in range(probes):  # a key is in one cluster: the probes' windows are disjoint
        same = (k_clusters_cache[:, None, :, :] == cq[:, :, None, :, p]) & past  # [B, n, S, H]
        newer = jnp.cumsum(same[:, :, ::-1], axis=2)[:, :, ::-1] - same  # same cluster, after j
        valid = valid | (same & (newer < window))
    if shared_qk:
        is_self = (kv_pos == q_pos[:, :, None])[..., None]
        others = jnp.any(valid & ~is_self, axis=2, keepdims=True)
        valid = valid & ~(is_self & others)
    logits = matmul_f32("bnhd,bshd->bnsh", q, k_cache)
    weights = masked_softmax(logits * scale, valid, axis=2)
    out = weighted_sum("bnsh,bshd->bnhd", weights, v_cache)
    return nan_past_the_cache(out.astype(q.dtype), lengths, new, slots)


def _check_decode(q, k_cache, v_cache, k_clusters_cache, centroids, window):
    """Shapes of :func:`causal_routing_decode`'s arguments against ``q`` and the caches, and
    (when concrete) the cached cluster ids against the centroids."""
    check_attention_inputs(q, k_cache, v_cache, names=("q", "k_cache", "v_cache"))
    batch, _, heads, dim = q.shape
    slots = k_cache.shape[1]
    if k_cache.shape[2] != heads:
        raise ValueError(f"k_cache has {k_cache.shape[2]} heads and q has {heads}: routing "
                         f"decodes every head against its own keys; got q{q.shape}, "
                         f"k_cache{k_cache.shape}")
    if (k_clusters_cache.shape != (batch, slots, heads)
            or not jnp.issubdtype(k_clusters_cache.dtype, jnp.integer)):
        raise ValueError(f"k_clusters_cache must be integers [B={batch}, S={slots}, H={heads}] "
                         f"(the cluster of every cached key), got {k_clusters_cache.dtype}"
                         f"{list(k_clusters_cache.shape)}")
    _check_centroids(centroids, heads, dim)
    check_integer("window", window)
    ids = concrete_values(k_clusters_cache)
    num_clusters = centroids.shape[1]
    if ids is not None and ids.size and not -1 <= ids.min() <= ids.max() < num_clusters:
        raise ValueError(f"k_clusters_cache holds cluster ids in [{ids.min()}, {ids.max()}]: "
                         f"each must be in [-1, num_clusters={num_clusters}) (-1: an empty "
                         "slot)")
