"""Mixed local / routing self-attention (Roy et al. 2021): some heads attend to a causal
sliding window, the others through online k-means clusters (:mod:`jaxsparse.ops.routing`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.nn.intermediates import report
from jaxsparse.nn.linear import Linear
from jaxsparse.ops.attention import (dot_product_attention, full_cache_decode,
                                     window_cache_decode)
from jaxsparse.ops.checks import (check_cache_request, check_integer, check_nonnegative,
                                  checked_decode_cache)
from jaxsparse.ops.masks import CausalMask, LocalMask
from jaxsparse.ops.rotary import apply_rotary, check_rope_theta, check_rotary_head_dim
from jaxsparse.ops.routing import (causal_routing_attention, commitment_loss, ema_centroids,
                                   ema_mean, init_centroids, routing_windows, shared_keys)
from jaxsparse.ops.routing_rings import init_routing_rings, routing_ring_decode
from jaxsparse.ops.segments import document_starts, refuse_while_decoding


class Centroids(nnx.Variable):
    """k-means centroids ``[routing heads, C, D]``: moved by an exponential moving average in
    training steps, never by the optimiser (they are not ``nnx.Param``)."""


def routing_statistics(routing, num_clusters: int, window: int,
                       probes: int = 1) -> dict[str, jax.Array]:
    """Health of the clustering, logged by the training loop:

    ``routing_empty``  share of queries whose cluster holds no key at or before them (their
                       routing output is zero: nothing can be learnt through them);
    ``routing_fill``   mean share of the ``probes · window`` slots a query reads;
    ``routing_max_cluster``  the largest cluster's share of the keys times the number of
                       clusters (1 = balanced, C = every key in one cluster), mean over heads.
    """
    read = routing["keys_read"]
    onehot = jax.nn.one_hot(routing["k_clusters"], num_clusters, dtype=jnp.float32)
    shares = jnp.mean(onehot, axis=(0, 1))                              # [H, C]
    return {"routing_empty": jnp.mean((read == 0).astype(jnp.float32)),
            "routing_fill": jnp.mean(read.astype(jnp.float32)) / (probes * window),
            "routing_max_cluster": jnp.mean(jnp.max(shares, axis=-1)) * num_clusters}


class RoutingMean(nnx.Variable):
    """Running mean of the routing heads' keys (``[routing heads, D]``) and the number of
    batches it has seen: the centre that routing subtracts before normalising
    (:func:`jaxsparse.ops.routing.ema_mean`). Moved in training steps only, like the centroids."""


class RoutingStep(nnx.Variable):
    """Training calls a routing layer has seen (drives the dense warm-up); part of the train
    state, so a resumed run continues the schedule where it stopped."""


class RoutingAttention(nnx.Module):
    """``n_heads - routing_heads`` local heads (causal window of ``local_window`` keys, rotary
    positions) and ``routing_heads`` routing heads (the ``window`` most recent keys of the
    query's cluster; content only, no rotary phase, so clusters group meaning rather than
    position). Same call and decode-cache protocol as :class:`jaxsparse.nn.Attention`.

    In training (``deterministic`` False) each call moves the centroids one EMA step towards
    the batch's routed vectors and sows the commitment loss (weight ``commitment``) as
    ``aux_loss``; ``Module.eval()`` freezes them.

    ``dense_steps`` > 0: for the first ``dense_steps`` training calls the routing heads attend
    to *every* earlier key (same projections, content only) while the centroids keep learning.
    Why: a query reaches a key only once both fall in one cluster, and only then does the loss
    teach their dot product, so from random projections a pairing the task needs may never be
    found (on MQAR the query windows stayed empty or missed the key). Keys a query learnt to
    score highly then tend to share its cluster when routing takes over — with separate
    projections only if the centroids follow the keys (``key_centroids``). Evaluation and
    decoding always route.

    ``center``: route keys by the direction of ``k - μ``, with ``μ`` a running mean of the
    keys over training batches (decay ``center_decay``), instead of the direction of ``k`` —
    keeps k-means from collapsing into one cluster when the keys share a growing common
    component (see :mod:`jaxsparse.ops.routing`). Subtracting one vector from every key
    changes no query's softmax, so this removes exactly the part of the keys that attention
    ignores. Queries are not centred (their raw direction is what ranks the keys), except with
    ``shared_qk``, where they are the keys.

    ``key_centroids`` (separate query/key projections): the centroids follow the keys only,
    and a query goes to the centroid it scores highest, i.e. to the cluster of keys it expects
    to attend to most. Why: centroids moved by both queries and keys split into query-only and
    key-only clusters when the two distributions differ, and a query whose cluster has no key
    reads nothing and learns nothing (MQAR at 1024 tokens after a dense warm-up: 97% of the
    windows empty within 100 routed steps).

    ``probes`` > 1: a routing query reads the windows of its ``probes`` most similar clusters
    (``probes · window`` keys), in training, evaluation and decoding alike — a query whose best
    cluster is useless (e.g. all filler) still reads, and learns from, the next ones (see
    :mod:`jaxsparse.ops.routing`). Dividing ``window`` by ``probes`` keeps the cost of one
    probe: on MQAR at 1024 tokens, 4 probes of 8 keys scored as 4 probes of 32 (README).

    ``reseed``: a centroid that no key of a training batch chose jumps onto one of the keys the
    live centroids serve worst (:func:`jaxsparse.ops.routing.reseed_dead`) instead of waiting
    where it is — with key centroids, queries are still sent to a dead centroid and read an
    empty window there.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, *, rngs: nnx.Rngs,
                 routing_heads: int, num_clusters: int, window: int, local_window: int,
                 shared_qk: bool = False, decay: float = 0.999, commitment: float = 1e-4,
                 dense_steps: int = 0, center: bool = False, center_decay: float = 0.99,
                 key_centroids: bool = False, probes: int = 1, reseed: bool = False,
                 rope_theta: float = 10_000.0,
                 out_init_scale: float = 1.0,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        check_integer("n_heads", n_heads)
        check_integer("routing_heads", routing_heads, 1, n_heads, f"in [1, n_heads={n_heads}]")
        for name, value in (("num_clusters", num_clusters), ("window", window),
                            ("local_window", local_window), ("probes", probes)):
            check_integer(name, value)
        if not probes <= num_clusters:
            raise ValueError(f"probes={probes}: must be in [1, num_clusters={num_clusters}]")
        check_integer("dense_steps", dense_steps, low=0)
        if not 0 < decay < 1:
            raise ValueError(f"decay={decay}: must be in (0, 1)")
        if not 0 <= center_decay < 1:  # at 1 the running mean's bias correction divides by 0
            raise ValueError(f"center_decay={center_decay}: must be in [0, 1)")
        check_nonnegative("commitment", commitment)  # a loss weight
        check_rope_theta(rope_theta, "rope_theta")  # at build, not at the first call
        check_rotary_head_dim(head_dim)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        heads = ("embed", "heads", "kv")
        self.q_proj = Linear(d_model, (n_heads, head_dim), logical_axes=heads, **kw)
        self.k_proj = None if shared_qk else Linear(d_model, (n_heads, head_dim),
                                                    logical_axes=heads, **kw)
        self.v_proj = Linear(d_model, (n_heads, head_dim), logical_axes=heads, **kw)
        self.o_proj = Linear((n_heads, head_dim), d_model, logical_axes=("heads", "kv", "embed"),
                             init_scale=out_init_scale, **kw)
        self.centroids = Centroids(init_centroids(rngs.params(), routing_heads, num_clusters,
                                                  head_dim))
        self.n_local, self.head_dim = n_heads - routing_heads, head_dim
        self.window, self.local_window = window, local_window
        self.shared_qk, self.decay, self.commitment = shared_qk, decay, commitment
        self.rope_theta, self.dense_steps = rope_theta, dense_steps
        self.step = RoutingStep(jnp.zeros((), jnp.int32))
        # The centre follows the drifting vectors faster than the centroids (0.99 averages
        # ~100 batches): a lagging centre would leave the common component in.
        self.center, self.center_decay = center, center_decay
        self.key_centroids = key_centroids
        self.probes, self.reseed = probes, reseed
        if center:
            self.route_mean = RoutingMean(jnp.zeros((routing_heads, head_dim), jnp.float32))
            self.route_mean_count = RoutingMean(jnp.zeros((), jnp.int32))
        self.deterministic = False

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict[str, jax.Array]:
        """The decode state: the local heads' keys and values ``k, v [B, local heads, slots,
        D]`` (a ring of ``local_window`` slots, or ``max_len`` when fewer) and the routing
        heads' per-cluster rings ``routed_k, routed_v [B, routing heads, C, window, D]`` and
        ``routed_count [B, routing heads, C]`` (:mod:`jaxsparse.ops.routing_rings`): its size
        does not grow with the context beyond ``local_window``."""
        check_cache_request(batch, max_len, dtype)
        heads, clusters, _ = self.centroids.shape
        rings = init_routing_rings(batch, heads, clusters, self.window, self.head_dim, dtype)
        cache = {f"routed_{name}": ring for name, ring in rings.items()}
        if self.n_local:
            shape = (batch, self.n_local, min(max_len, self.local_window), self.head_dim)
            cache |= {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
        return cache

    def _project(self, x_BLD):
        q = self.q_proj(x_BLD)
        k = q if self.shared_qk else self.k_proj(x_BLD)
        return q, k, self.v_proj(x_BLD)

    def __call__(self, x_BLD, positions_BL, *, segment_ids=None, cache=None, cache_index=None):
        """``segment_ids [B, L]`` (packed documents, no ``cache``): local heads and routing
        windows keep to each query's document. (The centroids and the running mean are
        statistics of the whole batch, as before: they change no output of this call.)"""
        refuse_while_decoding(segment_ids, cache)
        if cache is not None:  # a bad index or batch would fail inside the cache updates
            local = ("k", "v") if self.n_local else ()
            cache_index = checked_decode_cache(cache, cache_index, x_BLD.shape[0],
                                               local + ROUTED_CACHE)
        q, k, v = self._project(x_BLD)
        nl = self.n_local
        q_loc = apply_rotary(q[:, :, :nl], positions_BL, self.rope_theta)
        k_loc = apply_rotary(k[:, :, :nl], positions_BL, self.rope_theta)
        q_rt, k_rt, v_rt = q[:, :, nl:], k[:, :, nl:], v[:, :, nl:]
        k_loc, local_mask = self._local_keys(k_loc)
        centroids = self.centroids[...]
        q_center, k_center = self._centers()
        if cache is None:
            local = dot_product_attention(q_loc, k_loc, v[:, :, :nl], mask=local_mask,
                                          segment_ids=segment_ids) if nl else q_loc
            if nl and self.shared_qk:
                local = self._alone_reads_itself(local, v[:, :, :nl],
                                                 _first_tokens(x_BLD.shape[1], segment_ids))
            routed, routing = causal_routing_attention(q_rt, k_rt, v_rt, centroids,
                                                       window=self.window,
                                                       shared_qk=self.shared_qk,
                                                       q_center=q_center, k_center=k_center,
                                                       probes=self.probes,
                                                       segment_ids=segment_ids)
            if not self.deterministic:
                if self.dense_steps:
                    routed = jax.lax.cond(
                        self.step[...] < self.dense_steps,
                        lambda: self._dense(q_rt, k_rt, v_rt, segment_ids).astype(routed.dtype),
                        lambda: routed)
                    self.step[...] = self.step[...] + 1
                self._learn(centroids, routing, k_rt)
            new_cache = None
        else:
            local, routed, new_cache = self._decode(q_loc, k_loc, q_rt, k_rt, v, centroids,
                                                    cache, cache_index, q_center, k_center,
                                                    local_mask)
        out = jnp.concatenate([local.astype(routed.dtype), routed], axis=2) if nl else routed
        return self.o_proj(out), new_cache

    def _local_keys(self, k_loc):
        """The local heads' keys and mask. With shared QK, as the routing heads (and
        lucidrains' port): the unit queries times √D as keys, and a token's own key — the most
        similar one, whose logit ‖q‖²/√D ≈ √D took ~98% of a 64-dim head's weight at init —
        masked (:meth:`_alone_reads_itself` gives it back to a token with no other)."""
        window = LocalMask(self.local_window - 1, 0)
        if not self.shared_qk:
            return k_loc, window
        return shared_keys(k_loc), window & CausalMask(offset=-1)

    def _alone_reads_itself(self, local, v_loc, alone_BL):
        """Shared QK: a query with no earlier key in its window (the first of a sequence or
        document, every query of a 1-token window) reads its own value, as a routing head's
        lone query does (Reformer's rule); its masked row was empty."""
        alone = alone_BL | (self.local_window == 1)
        return jnp.where(alone[:, :, None, None], v_loc.astype(local.dtype), local)

    def windows(self, x_BLD):
        """Which keys each routing query reads for the (normed) layer input ``x_BLD``:
        ``(key_pos, valid)``, each ``[B, L, routing heads, probes · window]`` — to check,
        e.g., that a query's clusters hold the key a task needs."""
        q, k, _ = self._project(x_BLD)
        nl = self.n_local
        q_center, k_center = self._centers()
        return routing_windows(q[:, :, nl:], k[:, :, nl:], self.centroids[...],
                               window=self.window, shared_qk=self.shared_qk,
                               q_center=q_center, k_center=k_center, probes=self.probes)

    def _centers(self):
        """``(q_center, k_center)`` for routing (``None`` without centring): the keys' running
        mean, for queries too only when they are the keys (shared query/key space)."""
        if not self.center:
            return None, None
        mean = self.route_mean[...]
        return (mean if self.shared_qk else None), mean

    def _dense(self, q, k, v, segment_ids=None):
        """Warm-up attention of the routing heads: every earlier key (of the same document),
        with the routing heads' keys (the normalised queries when shared, and then not the
        token itself unless it has no other: the first of a sequence or document)."""
        if not self.shared_qk:
            return dot_product_attention(q, k, v, mask=CausalMask(), segment_ids=segment_ids)
        out = dot_product_attention(q, shared_keys(q), v, mask=CausalMask(offset=-1),
                                    segment_ids=segment_ids)
        alone = _first_tokens(q.shape[1], segment_ids)
        return jnp.where(alone[:, :, None, None], v.astype(out.dtype), out)

    def _learn(self, centroids, routing, k_rt):
        units = [routing["q_unit"]] if self.shared_qk else [routing["q_unit"], routing["k_unit"]]
        clusters = [routing["q_clusters"]] if self.shared_qk else [routing["q_clusters"],
                                                                   routing["k_clusters"]]
        report(self, "aux_loss", self.commitment * commitment_loss(centroids, units, clusters))
        for name, value in routing_statistics(routing, centroids.shape[1], self.window,
                                                 self.probes).items():
            report(self, name, value)
        if self.key_centroids and not self.shared_qk:
            units, clusters = units[1:], clusters[1:]
        self.centroids[...] = ema_centroids(centroids, units, clusters, self.decay,
                                            reseed=self.reseed)
        if self.center:
            self.route_mean[...], self.route_mean_count[...] = ema_mean(
                self.route_mean[...], self.route_mean_count[...], k_rt, self.center_decay)

    def _decode(self, q_loc, k_loc, q_rt, k_rt, v, centroids, cache, cache_index, q_center,
                k_center, local_mask):
        nl = self.n_local
        rings = {name: cache[f"routed_{name}"] for name in ("k", "v", "count")}
        routed, rings = routing_ring_decode(q_rt, k_rt, v[:, :, nl:], rings, centroids,
                                            shared_qk=self.shared_qk, q_center=q_center,
                                            k_center=k_center, probes=self.probes)
        new_cache = {f"routed_{name}": ring for name, ring in rings.items()}
        if not nl:
            return None, routed, new_cache
        k_cache, v_cache = cache["k"], cache["v"]
        # a ring of local_window slots, or every position when the cache is shorter
        decode = window_cache_decode if k_cache.shape[2] == self.local_window else \
            full_cache_decode
        local, new_cache["k"], new_cache["v"] = decode(
            q_loc, k_loc, v[:, :, :nl], k_cache, v_cache, cache_index, mask=local_mask)
        if self.shared_qk:
            positions = cache_index + jnp.arange(q_loc.shape[1])
            local = self._alone_reads_itself(local, v[:, :, :nl], (positions == 0)[None, :])
        return local, routed, new_cache


def _first_tokens(length: int, segment_ids=None):
    """bool ``[B or 1, L]``: the first token of a call without a cache and of every document,
    the queries with no earlier key."""
    first = jnp.arange(length)[None, :] == 0
    return first if segment_ids is None else first | document_starts(segment_ids)


# the routing heads' decode state (ops.routing_rings), "routed_" + its names
ROUTED_CACHE = ("routed_k", "routed_v", "routed_count")
