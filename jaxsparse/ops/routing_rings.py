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
far), so the slot ``r`` places behind the newest is filled when ``r < count[c]``.

- **One token** (generation) is written first, then reads the filled slots of the ``P``
  clusters it probes: ``P · w`` keys, its own among them.
- **A block of new tokens** (a prompt) is read before it is written: a query reads, per probed
  cluster, the new keys of that cluster at or before it in its window (the sorted windows of
  ``causal_routing_attention``) and the ring slots fewer than ``w`` keys behind it — their rank
  behind the newest slot plus the new keys of the cluster in the query's window, below ``w``.
  Time and memory ``O(n · P · w)`` for ``n`` new tokens, queries a chunk at a time. Each
  cluster's ring then takes its last ``w`` new keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.attention.api import logit_scale
from jaxsparse.ops.checks import check_cache_request, check_integer
from jaxsparse.ops.routing import (_attend, _attend_in_chunks, _check, _check_probes, _keys,
                                   assign, assign_top, cluster_windows)


def init_routing_rings(batch: int, heads: int, num_clusters: int, window: int, head_dim: int,
                       dtype=jnp.float32) -> dict[str, jax.Array]:
    """The empty decode state of :func:`routing_ring_decode`: ``k, v [B, H, C, w, D]`` (each
    cluster's last ``w`` keys and values, heads first) and ``count [B, H, C]`` (int32: keys
    routed to each cluster so far)."""
    for name, value in (("batch", batch), ("heads", heads), ("num_clusters", num_clusters),
                        ("window", window), ("head_dim", head_dim)):
        check_integer(name, value)
    check_cache_request(batch, dtype=dtype)  # integer rings truncated the keys (errors of 1.5)
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
    for name in ("k", "v"):  # keys written into integer rings were truncated silently
        if not jnp.issubdtype(rings[name].dtype, jnp.floating):
            raise ValueError(f"rings[{name!r}] has dtype {rings[name].dtype}: expected a "
                             "floating-point dtype (init_routing_rings)")
    return window


def routing_ring_decode(q, k, v, rings, centroids, *, shared_qk: bool = False,
                        scale: float | None = None, q_center=None, k_center=None,
                        probes: int = 1, query_chunk: int = 512):
    """Decode ``n`` new tokens ``q, k, v [B, n, H, D]`` that follow the tokens ``rings`` has
    seen: the same outputs as :func:`jaxsparse.ops.routing.causal_routing_attention` over the
    whole sequence gives these tokens (arguments as there; the ring window is the ``w`` of
    ``init_routing_rings``). Returns ``(out [B, n, H, D], rings)`` with the new keys kept."""
    _, num_clusters = _check(q, k if not shared_qk else q, v, centroids)
    _check_probes(probes, num_clusters)
    check_integer("query_chunk", query_chunk)
    batch, new, heads, dim = q.shape
    if new < 1:
        raise ValueError(f"q{tuple(q.shape)} holds no new token: decode at least one")
    window = _check_rings(rings, batch, heads, num_clusters, dim)
    scale = logit_scale(scale, dim)
    keys, q_units, k_units = _keys(q, k, shared_qk, q_center, k_center)
    q_clusters = assign_top(q_units, centroids, probes)                    # [B, n, H, P]
    k_clusters = assign(k_units, centroids)                                # [B, n, H]
    if new == 1:
        # written first, then read: a step that read the rings before writing them made XLA
        # copy them whole (it could not order the read before the in-place write)
        rings = _pushed(rings, keys, v, k_clusters, num_clusters, window)
        out = _one_token(q, rings, q_clusters, k_clusters, window, shared_qk, scale)
    else:
        out = _block(q, keys, v, rings, q_clusters, k_clusters, window, shared_qk, scale,
                     query_chunk)
        rings = _pushed(rings, keys, v, k_clusters, num_clusters, window)
    return out.astype(q.dtype), rings


def _behind(count, window: int):
    """For each slot of a ring whose cluster has seen ``count`` keys (``[..., 1]``), how many
    keys of the cluster are newer, ``[..., w]``; the slot is filled when that is < count."""
    slot = jnp.arange(window, dtype=jnp.int32).reshape((1,) * (count.ndim - 1) + (window,))
    return jnp.mod(count - 1 - slot, window)


def _one_token(q, rings, q_clusters, k_clusters, window: int, shared_qk: bool, scale):
    """One token, already written: it reads the filled slots of the ``P`` clusters it probes
    (``P · w`` slots, not ``C · w``); its own key is the newest slot of its cluster."""
    batch, _, heads, probes = q_clusters.shape
    chosen = q_clusters[:, 0]                                               # [B, H, P]
    ring_k, ring_v = (jnp.take_along_axis(rings[name], chosen[..., None, None], axis=2)
                      .reshape(batch, 1, heads, probes * window, -1)
                      for name in ("k", "v"))                               # [B, 1, H, P·w, D]
    count = jnp.take_along_axis(rings["count"], chosen, axis=-1)[..., None]  # [B, H, P, 1]
    behind = _behind(count, window)                                         # [B, H, P, w]
    valid = (behind < count).reshape(batch, 1, heads, probes * window)
    if shared_qk:  # its own key only when it has nothing else (Reformer's rule)
        own = ((chosen == k_clusters[:, 0, :, None])[..., None] & (behind == 0))
        own = own.reshape(valid.shape)
        valid = valid & ~(own & jnp.any(valid & ~own, axis=-1, keepdims=True))
    return _attend(q, ring_k, ring_v, valid, scale)


def _block(q, keys, values, rings, q_clusters, k_clusters, window: int, shared_qk: bool, scale,
           query_chunk: int):
    """Several tokens, read before they are written: each query reads, per probed cluster,
    that cluster's new keys at or before it in its window (the sorted windows of
    ``causal_routing_attention``) and the ring slots fewer than ``w`` keys behind it — time
    and memory ``O(n · P · w)``, queries ``query_chunk`` at a time."""
    batch, new, heads, probes = q_clusters.shape
    num_clusters = rings["count"].shape[-1]
    new_pos, new_valid = cluster_windows(q_clusters, k_clusters, window)   # [B, n, H, P·w]
    # the cluster's new keys in the query's window: newer than every ring slot
    in_window = jnp.sum(new_valid.reshape(batch, new, heads, probes, window), axis=-1)
    count = jnp.take_along_axis(rings["count"][:, None], q_clusters, axis=-1)  # [B, n, H, P]
    behind = _behind(count[..., None], window)                              # [B, n, H, P, w]
    ring_valid = (behind < count[..., None]) & (behind + in_window[..., None] < window)
    ring_valid = ring_valid.reshape(new_valid.shape)
    if shared_qk:  # its own key only when it has nothing else (Reformer's rule)
        own = new_pos == jnp.arange(new, dtype=jnp.int32).reshape(1, new, 1, 1)
        others = jnp.any(ring_valid, axis=-1, keepdims=True) | \
            jnp.any(new_valid & ~own, axis=-1, keepdims=True)
        new_valid = new_valid & ~(own & others)
    # the rings' slots and the new keys as one sequence of keys: slot c·w + s of the rings,
    # then the new key j at C·w + j
    flat = num_clusters * window
    ring_slots = (q_clusters[..., None] * window
                  + jnp.arange(window, dtype=jnp.int32).reshape(1, 1, 1, 1, window))
    positions = jnp.concatenate([ring_slots.reshape(new_pos.shape), flat + new_pos], axis=-1)
    as_sequence = lambda ring: jnp.moveaxis(  # noqa: E731  [B, H, C, w, D] -> [B, C·w, H, D]
        ring.reshape(batch, heads, flat, -1), 1, 2)
    all_keys = jnp.concatenate([as_sequence(rings["k"]).astype(keys.dtype), keys], axis=1)
    all_values = jnp.concatenate([as_sequence(rings["v"]).astype(values.dtype), values], axis=1)
    valid = jnp.concatenate([ring_valid, new_valid], axis=-1)
    return _attend_in_chunks(q, all_keys, all_values, positions, valid, scale, query_chunk)


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
