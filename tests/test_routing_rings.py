"""Routing attention decoded from per-cluster rings (jaxsparse.ops.routing_rings) against the
leakage-free causal routing attention over the whole sequence, and the routing layer's
fixed-size decode state built on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import routing_jit

from jaxsparse.nn import RoutingAttention
from jaxsparse.ops.routing import (assign, causal_routing_attention, init_centroids,
                                   routing_units)
from jaxsparse.ops.routing_rings import init_routing_rings, routing_ring_decode


def inputs(batch=2, length=37, heads=3, dim=5, clusters=4, seed=1):
    ks = jax.random.split(jax.random.key(seed), 6)
    q, k, v = (jax.random.normal(key, (batch, length, heads, dim)) for key in ks[:3])
    centroids = init_centroids(ks[3], heads, clusters, dim)
    centers = (jax.random.normal(ks[4], (heads, dim)), jax.random.normal(ks[5], (heads, dim)))
    return q, k, v, centroids, centers


# compiled once per piece length: one token at a time op by op took minutes
decode_jit = jax.jit(routing_ring_decode, static_argnames=("shared_qk", "probes", "query_chunk"))


def decoded(q, k, v, centroids, pieces, window, **options):
    """Outputs of decoding ``q, k, v`` in ``pieces`` (start positions, then the end) from
    empty rings, and the rings afterwards."""
    batch, _, heads, dim = q.shape
    rings = init_routing_rings(batch, heads, centroids.shape[1], window, dim, k.dtype)
    outs = []
    for start, stop in zip(pieces[:-1], pieces[1:]):
        out, rings = decode_jit(q[:, start:stop], k[:, start:stop], v[:, start:stop], rings,
                                centroids, **options)
        outs.append(out)
    return jnp.concatenate(outs, axis=1), rings


# one-token steps; prompts, first and after tokens, of 5, 13 and 16 tokens (13 and 16: longer
# than the rings of 4 clusters x 3 slots together); the whole sequence at once
MIXED = (0, 5, 6, 7, 20, 21, 37)
PIECES = [("mixed", MIXED, options) for options in [
    (1, False, 3, False), (1, True, 3, False), (2, False, 1, True), (2, True, 5, True),
    (3, False, 2, False), (1, False, 8, True), (4, True, 2, False)]] + [
    (name, pieces, options) for name, pieces in [("tokens", tuple(range(38))),
                                                 ("whole", (0, 37))]
    for options in [(1, True, 3, False), (2, False, 3, True)]]


@pytest.mark.parametrize("name,pieces,options", PIECES, ids=[
    f"{name}-probes{p}-{'shared' if s else 'separate'}-w{w}{'-centred' if c else ''}"
    for name, _, (p, s, w, c) in PIECES])
def test_ring_decoding_equals_routing_attention_over_the_whole_sequence(name, pieces, options):
    probes, shared_qk, window, centred = options
    q, k, v, centroids, (q_center, k_center) = inputs()
    options = dict(shared_qk=shared_qk, probes=probes, k_center=k_center if centred else None,
                   q_center=q_center if centred and shared_qk else None)
    full, _ = routing_jit(q, k, v, centroids, window=window, **options)
    out, _ = decoded(q, k, v, centroids, pieces, window, **options)
    np.testing.assert_allclose(out, full, atol=2e-6, rtol=2e-6)


def test_a_prompt_read_in_query_chunks_equals_one_read_whole():
    """Prompts of 13 and 16 tokens in chunks of 4 queries (the last one partial)."""
    q, k, v, centroids, _ = inputs()
    whole, _ = decoded(q, k, v, centroids, MIXED, 3, shared_qk=True, probes=2)
    chunked, _ = decoded(q, k, v, centroids, MIXED, 3, shared_qk=True, probes=2, query_chunk=4)
    np.testing.assert_allclose(chunked, whole, atol=1e-6, rtol=1e-6)


def test_ring_decoding_gradients_equal_those_of_routing_attention():
    """Through the rings: a later piece's gradient reaches the keys and values an earlier
    piece wrote."""
    q, k, v, centroids, (_, k_center) = inputs(length=23)
    cotangent = jax.random.normal(jax.random.key(9), q.shape)
    pieces = (0, 9, 10, 11, 17, 23)

    def ring_loss(q, k, v):
        return jnp.sum(decoded(q, k, v, centroids, pieces, 3, probes=2,
                               k_center=k_center)[0] * cotangent)

    def full_loss(q, k, v):
        return jnp.sum(causal_routing_attention(q, k, v, centroids, window=3, probes=2,
                                                k_center=k_center)[0] * cotangent)

    # compiled, both: op by op these gradients took 4 s
    for got, want in zip(jax.jit(jax.grad(ring_loss, (0, 1, 2)))(q, k, v),
                         jax.jit(jax.grad(full_loss, (0, 1, 2)))(q, k, v)):
        assert float(jnp.max(jnp.abs(want))) > 0.1  # the check below is not vacuous
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_rings_keep_their_size_and_count_every_key_of_each_cluster():
    q, k, v, centroids, (_, k_center) = inputs(length=60)
    _, rings = decoded(q, k, v, centroids, (0, 13, 14, 40, 41, 60), 3, k_center=k_center)
    empty = init_routing_rings(2, 3, 4, 3, 5)
    assert {name: x.shape for name, x in rings.items()} == \
        {name: x.shape for name, x in empty.items()}
    clusters = np.asarray(assign(routing_units(k, k_center), centroids))    # [B, L, H]
    counted = np.stack([[np.bincount(clusters[b, :, h], minlength=4) for h in range(3)]
                        for b in range(2)])
    np.testing.assert_array_equal(rings["count"], counted)


def test_bad_ring_decode_inputs_are_refused():
    q, k, v, centroids, _ = inputs(length=4)
    rings = init_routing_rings(2, 3, 4, 3, 5)
    good = dict(q=q, k=k, v=v, rings=rings, centroids=centroids)
    other_batch = init_routing_rings(1, 3, 4, 3, 5)
    for kw, message in [
            (dict(rings={"k": rings["k"]}), r"rings with keys \['k'\]: expected the dict of "
                                            r"init_routing_rings"),
            (dict(rings=other_batch), r"rings\['k'\] of shape \(1, 3, 4, 3, 5\): expected "
                                      r"\(2, 3, 4, 3, 5\)"),
            (dict(rings={**rings, "v": rings["v"][:, :, :, :2]}),
             r"rings\['v'\] of shape \(2, 3, 4, 2, 5\): expected \(2, 3, 4, 3, 5\)"),
            (dict(rings={**rings, "count": rings["count"].astype(jnp.float32)}),
             r"rings\['count'\] has dtype float32: expected integers"),
            # integer rings truncated the keys written into them (errors of 1.5, silently)
            (dict(rings={**rings, "v": rings["v"].astype(jnp.int32)}),
             r"rings\['v'\] has dtype int32: expected a floating-point dtype"),
            (dict(centroids=centroids[:, :2]), r"rings\['k'\] of shape \(2, 3, 4, 3, 5\): "
                                               r"expected \(2, 3, 2, 3, 5\)"),
            (dict(k=k[:, :3]), r"q, k, v must share one shape"),
            (dict(probes=5), r"probes=5: must be an integer in \[1, num_clusters=4\]"),
            (dict(q=q[:, :0], k=k[:, :0], v=v[:, :0]),
             r"q\(2, 0, 3, 5\) holds no new token: decode at least one")]:
        with pytest.raises(ValueError, match=message):
            routing_ring_decode(**{**good, **kw})
    with pytest.raises(ValueError, match="window=0: must be an integer >= 1"):
        init_routing_rings(2, 3, 4, 0, 5)
    with pytest.raises(ValueError, match="dtype='bool': a decode cache must have a floating"):
        init_routing_rings(2, 3, 4, 3, 5, dtype=jnp.bool_)


def _layer(**kw):
    options = dict(routing_heads=1, num_clusters=4, window=3, local_window=4)
    layer = RoutingAttention(32, 2, 8, rngs=nnx.Rngs(0), **{**options, **kw})
    layer.eval()
    return layer


@nnx.jit
def _layer_forward(layer, x, positions):  # op by op a forward pass took 1-2 s
    return layer(x, positions)


@nnx.jit
def _layer_step(layer, x, positions, cache, index):
    return layer(x, positions, cache=cache, cache_index=index)


def _decode_in_pieces(layer, x, cache, pieces):
    outs = []
    for start, stop in zip(pieces[:-1], pieces[1:]):
        positions = jnp.arange(start, stop)[None].repeat(x.shape[0], 0)
        out, cache = _layer_step(layer, x[:, start:stop], positions, cache, jnp.int32(start))
        outs.append(out)
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("routing_heads", [1, 2])
def test_the_layer_decodes_past_its_max_len_from_a_fixed_size_state(routing_heads):
    """With ``local_window <= max_len`` nothing in the cache grows with the context: a layer
    decodes far past ``max_len`` and still equals its forward pass."""
    layer = _layer(routing_heads=routing_heads)
    x = jax.random.normal(jax.random.key(2), (2, 30, 32))
    positions = jnp.arange(30)[None].repeat(2, 0)
    full, _ = _layer_forward(layer, x, positions)
    cache = layer.init_cache(2, 6)
    out, new_cache = _decode_in_pieces(layer, x, cache, (0, 5, 6, 7, 19) + tuple(range(20, 31)))
    np.testing.assert_allclose(out, full, atol=1e-5, rtol=1e-5)
    assert jax.tree.map(jnp.shape, new_cache) == jax.tree.map(jnp.shape, cache)


def test_a_local_window_longer_than_the_cache_keeps_every_position_and_refuses_overflow():
    layer = _layer(local_window=8)
    x = jax.random.normal(jax.random.key(2), (1, 6, 32))
    cache = layer.init_cache(1, 6)
    assert cache["k"].shape == (1, 1, 6, 8)  # local heads: every position, not 8 slots
    full, _ = _layer_forward(layer, x, jnp.arange(6)[None])
    out, cache = _decode_in_pieces(layer, x, cache, (0, 4, 5, 6))
    np.testing.assert_allclose(out, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"index=6 with 1 new tokens needs index \+ 1 <= 6"):
        layer(x[:, :1], jnp.full((1, 1), 6), cache=cache, cache_index=6)
