"""Mixed local / routing self-attention (Roy et al. 2021): some heads attend to a causal
sliding window, the others through online k-means clusters (:mod:`jaxsparse.ops.routing`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.nn.linear import Linear
from jaxsparse.ops.attention import decode_attention, dot_product_attention
from jaxsparse.ops.masks import CausalMask, LocalMask
from jaxsparse.ops.rotary import apply_rotary
from jaxsparse.ops.routing import (assign, causal_routing_attention, causal_routing_decode,
                                   commitment_loss, ema_centroids, init_centroids, normalize)


class Centroids(nnx.Variable):
    """k-means centroids ``[routing heads, C, D]``: moved by an exponential moving average in
    training steps, never by the optimiser (they are not ``nnx.Param``)."""


def routing_statistics(routing, num_clusters: int, window: int) -> dict[str, jax.Array]:
    """Health of the clustering, logged by the training loop:

    ``routing_empty``  share of queries whose cluster holds no key at or before them (their
                       routing output is zero: nothing can be learnt through them);
    ``routing_fill``   mean share of the ``window`` slots a query reads;
    ``routing_max_cluster``  the largest cluster's share of the keys times the number of
                       clusters (1 = balanced, C = every key in one cluster), mean over heads.
    """
    read = routing["keys_read"]
    onehot = jax.nn.one_hot(routing["k_clusters"], num_clusters, dtype=jnp.float32)
    shares = jnp.mean(onehot, axis=(0, 1))                              # [H, C]
    return {"routing_empty": jnp.mean((read == 0).astype(jnp.float32)),
            "routing_fill": jnp.mean(read.astype(jnp.float32)) / window,
            "routing_max_cluster": jnp.mean(jnp.max(shares, axis=-1)) * num_clusters}


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
    found (on MQAR the query windows stayed empty or missed the key). With a shared query/key
    space a large dot product means a small angle, so the pairs learnt densely land in one
    cluster when routing takes over. Evaluation and decoding always route.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, *, rngs: nnx.Rngs,
                 routing_heads: int, num_clusters: int, window: int, local_window: int,
                 shared_qk: bool = False, decay: float = 0.999, commitment: float = 1e-4,
                 dense_steps: int = 0, rope_theta: float = 10_000.0,
                 out_init_scale: float = 1.0,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        if not 1 <= routing_heads <= n_heads:
            raise ValueError(f"routing_heads={routing_heads}: must be in [1, n_heads={n_heads}]")
        for name, value in (("num_clusters", num_clusters), ("window", window),
                            ("local_window", local_window)):
            if value < 1:
                raise ValueError(f"{name}={value}: must be >= 1")
        if dense_steps < 0:
            raise ValueError(f"dense_steps={dense_steps}: must be >= 0")
        if not 0 < decay < 1:
            raise ValueError(f"decay={decay}: must be in (0, 1)")
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
        self.deterministic = False

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict[str, jax.Array]:
        heads = self.n_local + self.centroids.shape[0]
        shape = (batch, max_len, heads, self.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                "k_clusters": jnp.full((batch, max_len, self.centroids.shape[0]), -1, jnp.int32)}

    def _project(self, x_BLD):
        q = self.q_proj(x_BLD)
        k = q if self.shared_qk else self.k_proj(x_BLD)
        return q, k, self.v_proj(x_BLD)

    def __call__(self, x_BLD, positions_BL, *, segment_ids=None, cache=None, cache_index=None):
        if segment_ids is not None:
            raise ValueError("RoutingAttention does not take segment_ids: clusters would mix "
                             "packed documents; train routing models on unpacked sequences")
        q, k, v = self._project(x_BLD)
        nl = self.n_local
        q_loc = apply_rotary(q[:, :, :nl], positions_BL, self.rope_theta)
        k_loc = apply_rotary(k[:, :, :nl], positions_BL, self.rope_theta)
        q_rt, k_rt, v_rt = q[:, :, nl:], k[:, :, nl:], v[:, :, nl:]
        local_mask = LocalMask(self.local_window - 1, 0)
        centroids = self.centroids[...]
        if cache is None:
            local = dot_product_attention(q_loc, k_loc, v[:, :, :nl], mask=local_mask) \
                if nl else q_loc
            routed, routing = causal_routing_attention(q_rt, k_rt, v_rt, centroids,
                                                       window=self.window,
                                                       shared_qk=self.shared_qk)
            if not self.deterministic:
                if self.dense_steps:
                    routed = jax.lax.cond(self.step[...] < self.dense_steps,
                                          lambda: self._dense(q_rt, k_rt, v_rt).astype(routed.dtype),
                                          lambda: routed)
                    self.step[...] = self.step[...] + 1
                self._learn(centroids, routing)
            new_cache = None
        else:
            local, routed, new_cache = self._decode(q_loc, k_loc, q_rt, k_rt, v, centroids,
                                                    cache, cache_index)
        out = jnp.concatenate([local.astype(routed.dtype), routed], axis=2) if nl else routed
        return self.o_proj(out), new_cache

    def _dense(self, q, k, v):
        """Warm-up attention of the routing heads: every earlier key, with the routing heads'
        keys (the normalised queries when shared, and then not the token itself)."""
        if self.shared_qk:
            return dot_product_attention(q, normalize(q).astype(q.dtype), v,
                                         mask=CausalMask(offset=-1))
        return dot_product_attention(q, k, v, mask=CausalMask())

    def _learn(self, centroids, routing):
        units = [routing["q_unit"]] if self.shared_qk else [routing["q_unit"], routing["k_unit"]]
        clusters = [routing["q_clusters"]] if self.shared_qk else [routing["q_clusters"],
                                                                   routing["k_clusters"]]
        self.sow(nnx.Intermediate, "aux_loss",
                 self.commitment * commitment_loss(centroids, units, clusters))
        for name, value in routing_statistics(routing, centroids.shape[1], self.window).items():
            self.sow(nnx.Intermediate, name, value)
        self.centroids[...] = ema_centroids(centroids, units, clusters, self.decay)

    def _decode(self, q_loc, k_loc, q_rt, k_rt, v, centroids, cache, cache_index):
        nl = self.n_local
        k_keys = normalize(k_rt).astype(k_rt.dtype) if self.shared_qk else k_rt
        k_new = jnp.concatenate([k_loc, k_keys], axis=2) if nl else k_keys
        start = (0, cache_index, 0, 0)
        k_all = jax.lax.dynamic_update_slice(cache["k"], k_new.astype(cache["k"].dtype), start)
        v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
        clusters = assign(normalize(k_rt), centroids)
        c_all = jax.lax.dynamic_update_slice(cache["k_clusters"], clusters, (0, cache_index, 0))
        lengths = jnp.full((q_rt.shape[0],), cache_index + q_rt.shape[1], jnp.int32)
        local = decode_attention(q_loc, k_all[:, :, :nl], v_all[:, :, :nl], lengths,
                                 mask=LocalMask(self.local_window - 1, 0)) if nl else None
        routed = causal_routing_decode(q_rt, k_all[:, :, nl:], v_all[:, :, nl:], c_all, lengths,
                                       centroids, window=self.window, shared_qk=self.shared_qk)
        return local, routed, {"k": k_all, "v": v_all, "k_clusters": c_all}
