"""Causal routing attention decoded from a state of fixed size: one ring buffer per cluster.

A routing query at position ``t`` reads the ``w`` most recent keys ``j ≤ t`` of each of its
``P`` clusters (:func:`jaxsparse.ops.routing.causal_routing_attention`). A key's cluster is
fixed when it is written (the centroids do not move while decoding), so the keys any later
query can still read are, per cluster, the ``w`` most recent ones, and a decoder needs no more
than a ring of ``w`` slots per cluster and head: ``C · w`` keys and values however long the
sequence grows (``≈ L`` for the training length ``L`` with ``C ≈ √L``, ``w ≈ L / C``). A cache
of every position (:func:`jaxsparse.ops.routing.causal_routing_decode`) keeps the whole
context and reads and counts over all of it at every token.

Slot ``i mod w`` of cluster ``c`` holds the ``i``-th key routed to ``c`` (``count[c]`` keys so
far), so the slot ``r`` places behind the newest is filled when ``r < count[c]``. A query in a
block of new tokens reads

- ring slots of its clusters that are fewer than ``w`` keys of that cluster behind it: their
  rank behind the newest plus the new same-cluster keys at or before the query, below ``w``;
- new keys at or before it of its clusters with fewer than ``w`` same-cluster new keys after
  them up to it;

and the ring takes the last ``w`` new keys of each cluster afterwards. One token reads its
clusters' slots and itself; a prompt reads the rings and its own keys side by side (time and
memory ``O(n · (C·w + n))`` for ``n`` new tokens per head, against ``O(n · context)`` for the
cache of every position).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.attention.api import logit_scale
from jaxsparse.ops.checks import check_integer
from jaxsparse.ops.mixed_precision import matmul_f32, weighted_sum
from jaxsparse.ops.routing import _check, _check_probes, _keys, assign, assign_top
from jaxsparse.ops.softmax import masked_softmax


def init_routing_rings(batch: int, heads: int, num_clusters: int, window: int, head_dim: int,
                       dtype=jnp.float32) -> dict[str, jax.Array]:
    """The empty decode state of :func:`routing_ring_decode`: ``k, v [B, H, C, w, D]`` (each
    cluster's last ``w`` keys and values, heads first) and ``count [B, H, C]`` (int32: keys
    routed to each cluster so far)."""
    for name, value in (("batch", batch), ("heads", heads), ("num_clusters", num_clusters),
                        ("window", window), ("head_dim", head_dim)):
        check_integer(name, value)
    shape = (batch, heads, num_clusters, window, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "count": jnp.zeros(shape[:3], jnp.int32)}


def _check_rings(rings, batch: int, heads: int, num_clusters: int, head_dim: int) -> int:
    """The window ``w`` of ``rings`` after checking them against the queries and centroids."""
    if not isinstance(rings, dict) or set(rings) != {"k", "v", "count"}:
        keys = sorted(rings) if isinstance(rings, dict) else type(rings).__name__
        raise ValueError(f"rings with keys {keys}: expected the dict of init_routing_rings, "
                         "keys ['count', 'k', 'v']")
    shape = tuple(rings["k"].shape)
    window = shape[3] if len(shape) == 5 else None
    want = (batch, heads, num_clusters, window, head_dim)
    for name, expected in (("k", want), ("v", want), ("count", want[:3])):
        if tuple(rings[name].shape) != expected:
            raise ValueError(f"rings[{name!r}] of shape {tuple(rings[name].shape)}: expected "
                             f"{expected} (batch={batch}, heads={heads}, num_clusters="
                             f"{num_clusters}, window, head_dim={head_dim}; init_routing_rings)")
    if not jnp.issubdtype(rings["count"].dtype, jnp.integer):
        raise ValueError(f"rings['count'] has dtype {rings['count'].dtype}: expected integers")
    return window


def routing_ring_decode(q, k, v, rings, centroids, *, shared_qk: bool = False,
                        scale: float | None = None, q_center=None, k_center=None,
                        probes: int = 1):
    """Decode ``n`` new tokens ``q, k, v [B, n, H, D]`` that follow the tokens ``rings`` has
    seen: the same outputs as :func:`jaxsparse.ops.routing.causal_routing_attention` over the
    whole sequence gives these tokens (arguments as there; the ring window is the ``w`` of
    ``init_routing_rings``). Returns ``(out [B, n, H, D], rings)`` with the new keys kept."""
    _, num_clusters = _check(q, k if not shared_qk else q, v, centroids, 1)
    _check_probes(probes, num_clusters)
    batch, new, heads, dim = q.shape
    window = _check_rings(rings, batch, heads, num_clusters, dim)
    scale = logit_scale(scale, dim)
    keys, q_units, k_units = _keys(q, k, shared_qk, q_center, k_center)
    q_clusters = assign_top(q_units, centroids, probes)                    # [B, n, H, P]
    k_clusters = assign(k_units, centroids)                                # [B, n, H]
    if new == 1:
        # written first, then read: a step that read the rings before writing them made XLA
        # copy them whole (it could not order the read before the in-place write)
        rings = _pushed(rings, keys, v, k_clusters, num_clusters, window)
        ring_k, ring_v, ring_valid, ring_own = _ring_part(rings, q_clusters, k_clusters,
                                                          window, written=True)
        keys, v = keys[:, :0], v[:, :0]
        new_valid = new_own = jnp.zeros((batch, 1, heads, 0), bool)
    else:
        ring_k, ring_v, ring_valid, ring_own = _ring_part(rings, q_clusters, k_clusters,
                                                          window, written=False)
        new_valid = _new_keys_read(q_clusters, k_clusters, window)
        new_own = jnp.broadcast_to(jnp.eye(new, dtype=bool).reshape(1, new, 1, new),
                                   new_valid.shape)
        rings = _pushed(rings, keys, v, k_clusters, num_clusters, window)
    if shared_qk:  # the token's own key only when it reads nothing else (Reformer's rule)
        others = jnp.any(ring_valid & ~ring_own, axis=(-2, -1))[..., None] | \
            jnp.any(new_valid & ~new_own, axis=-1, keepdims=True)           # [B, n, H, 1]
        ring_valid = ring_valid & ~(ring_own & others[..., None])
        new_valid = new_valid & ~(new_own & others)
    ring_logits = matmul_f32("bnhd,bhgwd->bnhgw", q, ring_k)
    new_logits = matmul_f32("bnhd,bmhd->bnhm", q, keys)
    read = ring_k.shape[2] * window
    logits = jnp.concatenate([ring_logits.reshape(batch, new, heads, read), new_logits], -1)
    valid = jnp.concatenate([ring_valid.reshape(batch, new, heads, read), new_valid], -1)
    weights = masked_softmax(logits * scale, valid, axis=-1)
    ring_weights = weights[..., :read].reshape(ring_logits.shape)
    out = (weighted_sum("bnhgw,bhgwd->bnhd", ring_weights, ring_v)
           + weighted_sum("bnhm,bmhd->bnhd", weights[..., read:], v))
    return out.astype(q.dtype), rings


def _ring_part(rings, q_clusters, k_clusters, window: int, written: bool):
    """The ring slots the new queries may read: ``(keys, values [B, H, G, w, D], valid, own
    [B, n, H, G, w])``, ``own`` marking the query's own key. Of the ``G = P`` clusters the
    query probes when it is one token (it reads ``P · w`` slots, not ``C · w``), of all
    ``G = C`` clusters for several (their probes differ). A slot is valid when it is filled,
    in a probed cluster, and fewer than ``w`` keys of its cluster lie between it and the query
    (module docstring). ``written``: the rings already hold the new token (one token), whose
    key is then the newest slot of its cluster; else they hold none of the new keys."""
    batch, new, heads, probes = q_clusters.shape
    count = rings["count"]                                                  # [B, H, C]
    if new == 1:
        chosen = q_clusters[:, 0]                                           # [B, H, P]
        ring_k, ring_v = (jnp.take_along_axis(rings[name], chosen[..., None, None], axis=2)
                          for name in ("k", "v"))
        count = jnp.take_along_axis(count, chosen, axis=-1)
    else:
        chosen = jnp.broadcast_to(jnp.arange(count.shape[-1], dtype=jnp.int32), count.shape)
        ring_k, ring_v = rings["k"], rings["v"]
    chosen = chosen[:, None]                                                # [B, 1, H, G]
    probed = jnp.any(q_clusters[..., None, :] == chosen[..., None], axis=-1)  # [B, n, H, G]
    own_cluster = k_clusters[..., None] == chosen                           # [B, n, H, G]
    # new keys of each chosen cluster at or before the query that the rings do not count
    new_before = jnp.zeros_like(probed, jnp.int32) if written else \
        jnp.cumsum(own_cluster, axis=1, dtype=jnp.int32)
    count = count[:, None, :, :, None]                                      # [B, 1, H, G, 1]
    slot = jnp.arange(window, dtype=jnp.int32).reshape(1, 1, 1, 1, window)
    behind = jnp.mod(count - 1 - slot, window)          # keys of the cluster newer than the slot
    valid = probed[..., None] & (behind < count) & (behind + new_before[..., None] < window)
    own = own_cluster[..., None] & (behind == 0) if written else jnp.zeros_like(valid)
    return ring_k, ring_v, valid, own


def _new_keys_read(q_clusters, k_clusters, window: int):
    """``[B, n, H, n]``: the new keys each new query reads (module docstring)."""
    new = k_clusters.shape[1]
    causal = jnp.tril(jnp.ones((new, new), bool)).reshape(1, new, 1, new)
    keys_in = k_clusters.swapaxes(1, 2)[:, None]                            # [B, 1, H, n]
    valid = jnp.zeros((k_clusters.shape[0], new, k_clusters.shape[2], new), bool)
    for p in range(q_clusters.shape[-1]):  # a key is in one cluster: the windows are disjoint
        same = (keys_in == q_clusters[..., p:p + 1]) & causal                # [B, n, H, n]
        after = jnp.cumsum(same[..., ::-1], axis=-1)[..., ::-1] - same       # same, up to query
        valid = valid | (same & (after < window))
    return valid


def _pushed(rings, keys, values, k_clusters, num_clusters: int, window: int):
    """``rings`` after the new keys: each cluster keeps its last ``w`` (module docstring)."""
    batch, new, heads, dim = keys.shape
    onehot = jax.nn.one_hot(k_clusters, num_clusters, dtype=jnp.int32)      # [B, n, H, C]
    upto = jnp.cumsum(onehot, axis=1)
    index = jnp.sum(upto * onehot, axis=-1) - 1          # the key's place among its cluster's new
    total = jnp.take_along_axis(upto[:, -1], k_clusters.swapaxes(1, 2), axis=-1).swapaxes(1, 2)
    count = rings["count"]
    start = jnp.take_along_axis(count, k_clusters.swapaxes(1, 2), axis=-1).swapaxes(1, 2)
    slot = k_clusters * window + jnp.mod(start + index, window)             # [B, n, H]
    kept = total - index <= window      # of a cluster's new keys only the last w stay
    flat = num_clusters * window
    slot = jnp.where(kept, slot, flat)  # out of range: dropped by the scatter
    rows = jnp.arange(batch)[:, None, None]
    cols = jnp.arange(heads)[None, None, :]

    def push(ring, x):
        ring = ring.reshape(batch, heads, flat, dim)
        ring = ring.at[rows, cols, slot].set(x.astype(ring.dtype), mode="drop")
        return ring.reshape(batch, heads, num_clusters, window, dim)

    return {"k": push(rings["k"], keys), "v": push(rings["v"], values),
            "count": count + upto[:, -1]}


__all__ = ["init_routing_rings", "routing_ring_decode"]
