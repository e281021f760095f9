"""Packed documents in the selective-state-space layers: with ``segment_ids`` every scan, the
short convolution and the Mamba blocks equal running each document on its own (state reset
where a document starts), values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsparse.nn import DiagonalSSM, Mamba, Mamba2
from jaxsparse.ops.conv import causal_depthwise_conv1d
from jaxsparse.ops.ssm import selective_scan, ssd, ssd_native, ssd_reference

from packed_documents import (BOUNDS, LENGTH, check_equal_to_separate_documents, per_document,
                              segment_ids)

def mamba1_args(seed):
    k = jax.random.split(jax.random.key(seed), 8)
    batch, d, n = len(BOUNDS), 20, 3  # 20 channels: a full and a partial block of 16 lanes
    normal = lambda i, shape: jax.random.normal(k[i], shape, jnp.float32)  # noqa: E731
    return dict(x=normal(0, (batch, LENGTH, d)), dt=normal(1, (batch, LENGTH, d)),
                A=-jnp.exp(normal(2, (d, n))), B=normal(3, (batch, LENGTH, 2, n)),
                C=normal(4, (batch, LENGTH, 2, n)), D=normal(5, (d,)),
                z=normal(6, (batch, LENGTH, d)), initial_state=normal(7, (batch, d, n)))


def mamba2_args(seed):
    k = jax.random.split(jax.random.key(seed), 7)
    batch, heads, p, n = len(BOUNDS), 4, 8, 5
    normal = lambda i, shape: jax.random.normal(k[i], shape, jnp.float32)  # noqa: E731
    return dict(x=normal(0, (batch, LENGTH, heads, p)), dt=normal(1, (batch, LENGTH, heads)),
                A=-jnp.exp(normal(2, (heads,))), B=normal(3, (batch, LENGTH, 2, n)),
                C=normal(4, (batch, LENGTH, 2, n)), D=normal(5, (heads,)),
                initial_state=normal(6, (batch, heads, p, n)))


MAMBA1_SEQ = ("x", "dt", "B", "C", "z")
MAMBA2_SEQ = ("x", "dt", "B", "C")


@pytest.mark.parametrize("implementation", ["sequential", "associative", "chunked", "native",
                                            "pallas_interpret"])
def test_selective_scan_with_segment_ids_equals_separate_documents(implementation):
    args = mamba1_args(1)
    kw = dict(dt_bias=0.1 * args["D"], return_final_state=True, chunk_size=8,
              implementation=implementation)
    ids = segment_ids()
    reference = kw | {"implementation": "sequential"}
    check_equal_to_separate_documents(
        lambda **a: selective_scan(**a, segment_ids=ids, **kw),
        lambda **a: per_document(lambda **b: selective_scan(**b, **reference), a, MAMBA1_SEQ,
                                 "initial_state"),
        args, ("x", "dt", "A", "B", "C", "D", "z", "initial_state"), 1e-4)


@pytest.mark.parametrize("name, fn", [("ssd chunk 8", lambda **a: ssd(**a, chunk_size=8)),
                                      ("ssd chunk 5", lambda **a: ssd(**a, chunk_size=5)),
                                      ("reference", ssd_reference), ("native", ssd_native)])
def test_ssd_with_segment_ids_equals_separate_documents(name, fn):
    args = mamba2_args(2)
    kw = dict(dt_softplus=True, dt_bias=0.1 * args["D"], return_final_state=True)
    ids = segment_ids()
    check_equal_to_separate_documents(
        lambda **a: fn(**a, segment_ids=ids, **kw),
        lambda **a: per_document(lambda **b: ssd_reference(**b, **kw), a, MAMBA2_SEQ,
                                 "initial_state"),
        args, ("x", "dt", "A", "B", "C", "D", "initial_state"), 1e-4)


def first_token(args, sequence_keys):
    return {key: value[:, :1] if key in sequence_keys else value for key, value in args.items()}


@pytest.mark.parametrize("name, fn, args", [
    *[(impl, lambda impl=impl, **a: selective_scan(**a, implementation=impl, chunk_size=4),
       first_token(mamba1_args(3), MAMBA1_SEQ))
      for impl in ("sequential", "associative", "chunked", "native")],
    ("ssd", lambda **a: ssd(**a, chunk_size=4), first_token(mamba2_args(3), MAMBA2_SEQ)),
    ("ssd reference", ssd_reference, first_token(mamba2_args(3), MAMBA2_SEQ))])
def test_a_single_token_with_segment_ids_is_the_scan_without_them(name, fn, args):
    """Length 1 (one token, one document; an empty slice in the document starts once failed
    every scan here with a shape error): the same output as without ids."""
    ids = jnp.array([[4], [0]], jnp.int32)
    without, with_ids = fn(**args), fn(**args, segment_ids=ids)
    assert with_ids.shape[1] == 1
    np.testing.assert_allclose(with_ids, without, rtol=1e-6, atol=1e-6)


def test_conv_with_segment_ids_equals_separate_documents():
    k = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k[0], (len(BOUNDS), LENGTH, 6))
    w = jax.random.normal(k[1], (4, 6))
    state = jax.random.normal(k[2], (len(BOUNDS), 3, 6))
    y, new_state = causal_depthwise_conv1d(x, w, None, state, segment_ids=segment_ids())
    for row, bounds in enumerate(BOUNDS):
        for doc, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            doc_state = state[row:row + 1] if doc == 0 else None
            want, want_state = causal_depthwise_conv1d(x[row:row + 1, lo:hi], w, None, doc_state)
            np.testing.assert_allclose(y[row:row + 1, lo:hi], want, atol=1e-5, rtol=1e-5)
        # the cache: the last document's own (its last inputs, zeros before its start)
        np.testing.assert_array_equal(new_state[row:row + 1], want_state)


@pytest.mark.parametrize("length", [1, 2, 3])
def test_conv_shorter_than_its_window_with_segment_ids(length):
    """Fewer tokens than the width-4 window's 3 past inputs (a decode-sized prefill): row 0 one
    document (the output without ids), row 1 a new document at its last token (that token
    reads no earlier input, not even the state's)."""
    k = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(k[0], (2, length, 6))
    w = jax.random.normal(k[1], (4, 6))
    state = jax.random.normal(k[2], (2, 3, 6))
    ids = jnp.zeros((2, length), jnp.int32).at[1, -1].set(1 if length > 1 else 0)
    y, new_state = causal_depthwise_conv1d(x, w, None, state, segment_ids=ids)
    want, want_state = causal_depthwise_conv1d(x, w, None, state)
    assert y.shape == want.shape == x.shape
    np.testing.assert_allclose(y[0], want[0], atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(new_state[0], want_state[0])
    if length > 1:
        np.testing.assert_allclose(y[1, :-1], want[1, :-1], atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(y[1, -1], x[1, -1] * w[-1], atol=1e-6, rtol=1e-6)
        # the carried state: the new document's one input, zeros before it
        np.testing.assert_array_equal(new_state[1], jnp.zeros((3, 6)).at[-1].set(x[1, -1]))
    else:
        np.testing.assert_array_equal(new_state[1], want_state[1])


@pytest.mark.parametrize("block", ["mamba", "mamba2"])
def test_mamba_blocks_with_segment_ids_equal_separate_documents(block):
    """The whole block (projections, convolution, scan, gate) on packed documents equals each
    document on its own, and so do the parameter gradients of a loss over all tokens."""
    rngs = nnx.Rngs(4)
    layer = (Mamba(16, d_state=4, rngs=rngs) if block == "mamba"
             else Mamba2(16, d_state=8, head_dim=8, chunk_size=8, rngs=rngs))
    x = jax.random.normal(jax.random.key(5), (len(BOUNDS), LENGTH, 16))
    ids = segment_ids()

    def separate(layer):
        rows = []
        for row, bounds in enumerate(BOUNDS):
            rows.append(jnp.concatenate([layer(x[row:row + 1, lo:hi])[0]
                                         for lo, hi in zip(bounds[:-1], bounds[1:])], 1))
        return jnp.concatenate(rows, 0)

    packed = lambda layer: layer(x, segment_ids=ids)[0]  # noqa: E731
    run = lambda f: nnx.jit(f)(layer)  # noqa: E731  (op by op: ~10 s a block)
    np.testing.assert_allclose(run(packed), run(separate), atol=2e-5, rtol=2e-5)
    loss = lambda f: lambda layer: jnp.sum(jnp.sin(f(layer)))  # noqa: E731
    want = nnx.jit(nnx.grad(loss(separate)))(layer)
    got = nnx.jit(nnx.grad(loss(packed)))(layer)
    for (path, g), (_, w) in zip(nnx.to_flat_state(nnx.state(got)),
                                 nnx.to_flat_state(nnx.state(want))):
        scale = float(jnp.abs(w[...]).max()) + 1e-6
        np.testing.assert_allclose(g[...], w[...], atol=1e-4 * scale, rtol=1e-4, err_msg=str(path))


@pytest.mark.parametrize("block", ["mamba", "mamba2", "diagonal"])
def test_packed_documents_in_chunks_with_a_cache_equal_one_pass(block):
    """A sequence of packed documents fed in chunks through the cache (a chunked prefill),
    cut inside documents, equals one pass: the carried convolution state holds only the last
    document's inputs, as the carried scan state does (it once held the previous document's,
    which the next chunk's first tokens then read). An empty chunk keeps the cache. (A chunk
    that starts a document cannot say so: its carried state is its first document's.)"""
    rngs = nnx.Rngs(6)
    layer = {"mamba": lambda: Mamba(16, d_state=4, rngs=rngs),
             "mamba2": lambda: Mamba2(16, d_state=8, head_dim=8, chunk_size=8, rngs=rngs),
             "diagonal": lambda: DiagonalSSM(16, 12, conv_width=4, rngs=rngs)}[block]()
    x = jax.random.normal(jax.random.key(7), (len(BOUNDS), LENGTH, 16))
    ids = segment_ids()
    whole, _ = layer(x, segment_ids=ids)
    cache, pieces = layer.init_cache(len(BOUNDS), LENGTH), []
    for lo, hi in zip((0, 3, 3, 7, 12, 26), (3, 3, 7, 12, 26, LENGTH)):  # inside documents
        y, cache = layer(x[:, lo:hi], segment_ids=ids[:, lo:hi], cache=cache)
        pieces.append(y)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), whole, atol=2e-5, rtol=2e-5)


def test_bad_segment_ids_name_the_argument():
    args = mamba1_args(0)
    with pytest.raises(ValueError, match=r"segment_ids must be \[batch=2, length=29\]"):
        selective_scan(**args, segment_ids=jnp.zeros((2, 28), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must be integers"):
        ssd(**mamba2_args(0), chunk_size=8, segment_ids=jnp.zeros((2, LENGTH)))
