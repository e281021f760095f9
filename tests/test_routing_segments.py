"""Packed documents in the routing transformer: with ``segment_ids`` routing attention reads
only keys of each query's document (the document's most recent keys of the query's clusters),
equal to routing each document on its own — values and gradients — and the whole model gives
every document the logits it gets alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsparse.models.registry import build
from jaxsparse.ops.routing import causal_routing_attention, init_centroids

from helpers import tiny_config
from packed_documents import BOUNDS, LENGTH, check_equal_to_separate_documents, segment_ids
from test_routing import ROUTING


@pytest.mark.parametrize("shared_qk, probes", [(False, 1), (False, 3), (True, 2)])
def test_routing_attention_with_segment_ids_equals_separate_documents(shared_qk, probes):
    """4 clusters with windows of 3 over documents of 1 to 15 tokens: a document's clusters
    hold fewer keys than the window early on, and the shared-QK rule (no attending to oneself
    unless alone) applies within the document."""
    ks = jax.random.split(jax.random.key(0), 3)
    batch, heads, dim = len(BOUNDS), 2, 8
    args = {name: jax.random.normal(k, (batch, LENGTH, heads, dim))
            for name, k in zip("qkv", ks)}
    centroids = init_centroids(jax.random.key(1), heads, 4, dim)
    kw = dict(window=3, shared_qk=shared_qk, probes=probes, query_chunk=8)
    ids = segment_ids()

    def packed(**a):
        return causal_routing_attention(**a, centroids=centroids, segment_ids=ids, **kw)[0], \
            jnp.zeros(())

    def separate(**a):
        rows = []
        for row, bounds in enumerate(BOUNDS):
            rows.append(jnp.concatenate([causal_routing_attention(
                **{name: t[row:row + 1, lo:hi] for name, t in a.items()}, centroids=centroids,
                **kw)[0] for lo, hi in zip(bounds[:-1], bounds[1:])], 1))
        return jnp.concatenate(rows, 0), jnp.zeros(())

    check_equal_to_separate_documents(packed, separate, args, ("q", "k", "v"), 2e-5)


def test_routing_transformer_gives_each_packed_document_its_logits_alone():
    """Local heads (RoPE: relative positions) and routing heads both keep to the document;
    in training mode with the dense warm-up of the routing heads too."""
    cfg = tiny_config(*ROUTING, "model.routing_dense_steps=5").model
    model = build(cfg, nnx.Rngs(0))
    lengths = (9, 1, 14)
    tokens = jax.random.randint(jax.random.key(2), (1, sum(lengths)), 0, 256, jnp.int32)
    ids = jnp.asarray([sum(([i] * n for i, n in enumerate(lengths)), [])], jnp.int32)
    bounds = np.cumsum((0,) + lengths)
    forward = nnx.jit(lambda m, x, ids: m(x, segment_ids=ids))
    for mode in ("train", "eval"):  # train: routing heads attend densely (warm-up steps)
        getattr(model, mode)()
        frozen = nnx.clone(model)  # the training call moves centroids and counts a step
        packed = forward(nnx.clone(frozen), tokens, ids)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            alone = forward(nnx.clone(frozen), tokens[:, lo:hi], None)
            np.testing.assert_allclose(packed[:, lo:hi], alone, atol=2e-5, rtol=2e-5,
                                       err_msg=f"{mode}, document at {lo}")
        plain = forward(nnx.clone(frozen), tokens, None)
        assert not np.allclose(plain[:, 9:], packed[:, 9:], atol=1e-3)
