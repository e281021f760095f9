"""Packed documents in Hydra: with ``segment_ids`` the diagonal SSM, sparse global attention,
the workspace and chunk-level MoE routing never read another document — each against a
per-document run or a plain reference loop, values and gradients — and the whole model's
logits of a document do not move when other documents change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsparse import configs, models
from jaxsparse.config import apply_overrides
from jaxsparse.ops.diagonal_ssm import diagonal_ssm
from jaxsparse.ops.moe import chunk_pool, chunk_pool_within_documents, unchunk
from jaxsparse.ops.segments import document_index
from jaxsparse.ops.sga import sparse_global_attention
from jaxsparse.ops.workspace import read_slots, workspace_memory, workspace_update

from packed_documents import (BOUNDS, LENGTH, check_equal_to_separate_documents, per_document,
                              segment_ids)
from test_hydra import SMALL


def normal(key, shape, scale=1.0):
    return scale * jax.random.normal(key, shape, jnp.float32)


@pytest.mark.parametrize("implementation", ["native", "associative", "sequential"])
def test_diagonal_ssm_with_segment_ids_equals_separate_documents(implementation):
    k = jax.random.split(jax.random.key(0), 7)
    batch, width = len(BOUNDS), 6
    args = dict(delta=normal(k[0], (batch, LENGTH, width)), B=normal(k[1], (batch, LENGTH, width)),
                C=normal(k[2], (batch, LENGTH, width)), U=normal(k[3], (batch, LENGTH, width)),
                log_lambda=normal(k[4], (width,), 0.5), D=normal(k[5], (width,)),
                initial_state=normal(k[6], (batch, width)))
    ids = segment_ids()
    check_equal_to_separate_documents(
        lambda **a: diagonal_ssm(**a, implementation=implementation, segment_ids=ids),
        lambda **a: per_document(lambda **b: diagonal_ssm(**b, implementation="sequential"),
                                 a, ("delta", "B", "C", "U"), "initial_state"),
        args, ("delta", "B", "C", "U", "log_lambda", "D", "initial_state"), 2e-5)


@pytest.mark.parametrize("implementation", ["gather", "dense", "blocked", "core"])
def test_sparse_global_attention_with_segment_ids_equals_separate_documents(implementation):
    """Window 3 and 2 global tokens over documents of 1 to 15 tokens: cut windows, globals of
    the document only (the longest document has candidates beyond its window); ``blocked``
    with 4-query blocks that straddle document starts."""
    k = jax.random.split(jax.random.key(1), 4)
    batch, heads, dim = len(BOUNDS), 2, 8
    args = dict(q=normal(k[0], (batch, LENGTH, heads, dim)), k=normal(k[1], (batch, LENGTH, heads, dim)),
                v=normal(k[2], (batch, LENGTH, heads, dim)), scores=normal(k[3], (batch, LENGTH)))
    kw = dict(window=3, max_global=2, block=4)
    ids = segment_ids()

    def packed(**a):
        out = sparse_global_attention(**a, implementation=implementation, segment_ids=ids, **kw)
        return out, jnp.zeros(())

    def separate(**a):
        rows = []
        for row, bounds in enumerate(BOUNDS):
            rows.append(jnp.concatenate([sparse_global_attention(
                **{name: t[row:row + 1, lo:hi] for name, t in a.items()},
                implementation="gather", **kw) for lo, hi in zip(bounds[:-1], bounds[1:])], 1))
        return jnp.concatenate(rows, 0), jnp.zeros(())

    check_equal_to_separate_documents(packed, separate, args, ("q", "k", "v", "scores"), 2e-5)


def workspace_reference(x, init, weights, chunk, runs):
    """Token by token in Python (``runs``: numpy document numbers): the slots restart at every
    document start; the update after a chunk uses the tokens of the document still open at
    its end."""
    rows = []
    for b in range(x.shape[0]):
        state, reads = init[None], []
        for lo in range(0, x.shape[1], chunk):
            hi = min(lo + chunk, x.shape[1])
            reading, first_open, restarted = state, lo, False
            for t in range(lo, hi):
                if t > 0 and runs[b, t] != runs[b, t - 1]:  # a document starts at t
                    reading, first_open, restarted = init[None], t, True
                reads.append(read_slots(x[b:b + 1, t:t + 1], reading)[0, 0])
            base = init[None] if restarted else state
            state = workspace_update(base, x[b:b + 1, first_open:hi], weights)
        rows.append(jnp.stack(reads))
    return jnp.stack(rows)


def workspace_weights(key, d):
    k = jax.random.split(key, 6)
    return {"wq": normal(k[0], (d, d), d ** -0.5), "wk": normal(k[1], (d, d), d ** -0.5),
            "wv": normal(k[2], (d, d), d ** -0.5), "wg": normal(k[3], (2 * d, d), (2 * d) ** -0.5),
            "bg": normal(k[4], (d,))}, normal(k[5], (3, d))


@pytest.mark.parametrize("chunk", [4, 8])
def test_workspace_with_segment_ids_restarts_at_document_starts(chunk):
    """Against the token-by-token reference (documents start mid-chunk, at a chunk edge and
    one token before the end; the last chunk is ragged), values and gradients."""
    d = 8
    weights, init = workspace_weights(jax.random.key(2), d)
    x = normal(jax.random.key(3), (len(BOUNDS), LENGTH, d))
    ids = segment_ids()

    def ours(x, init, weights):
        return workspace_memory(x, x, init, weights, chunk=chunk, segment_ids=ids)[0]

    runs = np.asarray(document_index(ids))

    def reference(x, init, weights):
        return workspace_reference(x, init, weights, chunk, runs)

    np.testing.assert_allclose(jax.jit(ours)(x, init, weights),
                               jax.jit(reference)(x, init, weights), atol=2e-5, rtol=2e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    got = jax.jit(jax.grad(loss(ours), (0, 1, 2)))(x, init, weights)
    want = jax.jit(jax.grad(loss(reference), (0, 1, 2)))(x, init, weights)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=2e-5 * float(jnp.abs(w).max()), rtol=2e-4)


def test_workspace_documents_aligned_to_chunks_read_as_if_alone():
    """A document that starts on a chunk boundary is chunked as it would be alone, so its
    reads equal a run on it alone (the reference above is not involved)."""
    d, chunk = 8, 4
    weights, init = workspace_weights(jax.random.key(4), d)
    x = normal(jax.random.key(5), (1, 20, d))
    ids = jnp.asarray([[0] * 8 + [1] * 4 + [2] * 8], jnp.int32)
    packed = workspace_memory(x, x, init, weights, chunk=chunk, segment_ids=ids)[0]
    alone = jnp.concatenate([workspace_memory(x[:, lo:hi], x[:, lo:hi], init, weights,
                                              chunk=chunk)[0]
                             for lo, hi in ((0, 8), (8, 12), (12, 20))], axis=1)
    np.testing.assert_allclose(packed, alone, atol=2e-6)
    unpacked = workspace_memory(x, x, init, weights, chunk=chunk)[0]
    assert not np.allclose(unpacked[:, 8:], alone[:, 8:], atol=1e-3)  # the ids matter


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [32, LENGTH])  # 8 chunks of 4; a ragged last chunk
def test_chunk_routing_pools_only_the_tokens_own_document(causal, length):
    chunk, d = 4, 3
    x = normal(jax.random.key(6), (len(BOUNDS), length, d))
    ids = jnp.pad(segment_ids(), ((0, 0), (0, length - LENGTH)), mode="edge")
    runs = np.asarray(document_index(ids))
    got = chunk_pool_within_documents(x, ids, chunk, causal=causal)
    want = np.zeros(x.shape, np.float32)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            c = t // chunk - (1 if causal else 0)
            source = [j for j in range(c * chunk, min((c + 1) * chunk, length))
                      if c >= 0 and runs[b, j] == runs[b, t]]
            if source:
                want[b, t] = np.mean(np.asarray(x[b, source]), axis=0)
    np.testing.assert_allclose(got, want, atol=1e-6)
    if length % chunk == 0:  # one document per row: the plain chunk pool, for every token
        one = jnp.zeros((x.shape[0], x.shape[1]), jnp.int32)
        np.testing.assert_allclose(chunk_pool_within_documents(x, one, chunk, causal=causal),
                                   unchunk(chunk_pool(x, chunk, causal=causal), chunk),
                                   atol=1e-6)


# Hydra with every branch on (SSM + conv, SGA, chunk-routed dropless MoE, PKM, workspace):
# test_hydra's small model with chunks of 4 tokens for MoE routing and the workspace. MoE is
# dropless (the default: a capacity limit would count the tokens of every document).
PACKED_HYDRA = SMALL + ["model.workspace_chunk=4"]


@pytest.fixture(scope="module")
def hydra():
    cfg = apply_overrides(configs.get("transformer_tiny"), PACKED_HYDRA)
    model = models.build(cfg.model, nnx.Rngs(0))
    model.eval()
    return model


def test_hydra_documents_on_chunk_edges_give_the_logits_of_each_document_alone(hydra):
    lengths = (8, 4, 12)  # multiples of the 4-token chunks
    tokens = jax.random.randint(jax.random.key(7), (1, sum(lengths)), 0, 256, jnp.int32)
    ids = jnp.asarray([sum(([i] * n for i, n in enumerate(lengths)), [])], jnp.int32)
    forward = nnx.jit(lambda m, x, ids: m(x, segment_ids=ids))
    packed = forward(hydra, tokens, ids)
    bounds = np.cumsum((0,) + lengths)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        alone = nnx.jit(lambda m, x: m(x))(hydra, tokens[:, lo:hi])
        np.testing.assert_allclose(packed[:, lo:hi], alone, atol=2e-5, rtol=2e-5)
    plain = nnx.jit(lambda m, x: m(x))(hydra, tokens)
    assert not np.allclose(plain[:, 8:], packed[:, 8:], atol=1e-3)


def test_hydra_documents_anywhere_do_not_see_each_other(hydra):
    """Documents starting mid-chunk (5, 11, 12): changing the tokens of one document leaves
    every other document's logits where they were, the earlier and the later ones."""
    starts = (0, 5, 11, 12, 23)
    length = 23
    ids = jnp.asarray([np.searchsorted(starts, np.arange(length), side="right") - 1], jnp.int32)
    tokens = jax.random.randint(jax.random.key(8), (1, length), 0, 256, jnp.int32)
    forward = nnx.jit(lambda m, x: m(x, segment_ids=ids))
    base = forward(hydra, tokens)
    for doc, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
        changed = forward(hydra, tokens.at[:, lo:hi].set((tokens[:, lo:hi] + 31) % 256))
        others = np.asarray(ids[0] != doc)
        np.testing.assert_allclose(changed[:, others], base[:, others], atol=1e-5,
                                   err_msg=f"document {doc} leaked")
        assert not np.allclose(changed[:, lo:hi], base[:, lo:hi], atol=1e-4)


def test_hydra_names_segment_ids_of_the_wrong_shape(hydra):
    tokens = jnp.zeros((2, 12), jnp.int32)
    with pytest.raises(ValueError, match=r"segment_ids must be \[batch=2, length=12\], got "
                                         r"shape \(2, 11\)"):
        hydra(tokens, segment_ids=jnp.zeros((2, 11), jnp.int32))


def test_hydra_refuses_segment_ids_while_decoding_from_a_cache(hydra):
    """The decode paths (workspace chunk buffer, SGA and router caches) hold one document."""
    block = hydra.blocks[2]  # the SGA block
    x = jnp.zeros((1, 3, block.norm.scale.shape[0]))
    cache = block.init_cache(1, 16, jnp.float32, hydra.workspace)
    with pytest.raises(ValueError, match="segment_ids: decoding with a cache runs one document"):
        block(x, jnp.arange(3)[None], segment_ids=jnp.zeros((1, 3), jnp.int32), cache=cache,
              cache_index=0, workspace=hydra.workspace)


def test_hydra_trains_on_packed_documents(tmp_path):
    """``data.packed_documents`` with the default model's family: the train step's loss is
    the model's own with the batch's segment ids, and differs without them."""
    from jaxsparse.data import make_stream
    from jaxsparse.parallel import make_mesh
    from jaxsparse.train.state import TrainSetup
    from jaxsparse.train.step import make_eval_step, make_train_step, masked_token_stats
    from helpers import short_documents

    cfg = apply_overrides(configs.get("transformer_tiny"),
                          PACKED_HYDRA + ["data.packed_documents=true", *short_documents(tmp_path)])
    setup = TrainSetup(cfg, make_mesh(cfg.mesh))
    state, stream = setup.init(), make_stream(cfg)
    batch = setup.global_batch(stream.batch(0))
    ce_sum, _, count = make_eval_step(setup)(state["params"], state["rest"], batch)
    model = setup.model(state["params"], state["rest"])
    model.eval()
    forward = nnx.jit(lambda m, x, ids: m(x, segment_ids=ids))  # eager Hydra: many small ops
    want = masked_token_stats(forward(model, batch["inputs"], batch["segment_ids"]),
                              batch["targets"], batch["mask"])[0]
    unpacked = masked_token_stats(forward(model, batch["inputs"], None), batch["targets"],
                                  batch["mask"])[0]
    np.testing.assert_allclose(ce_sum, want, rtol=1e-5)
    # the gates start small, so at init the documents' isolation moves the loss by ~1e-3 of
    # it; float32 noise on this sum is ~1e-6 of it
    assert abs(float(unpacked - want)) > 1e-4 * float(want)
    _, metrics = make_train_step(setup)(state, batch)
    np.testing.assert_allclose(metrics["loss"], ce_sum / count, rtol=1e-4)
