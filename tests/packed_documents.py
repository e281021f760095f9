"""Packed-document fixtures shared by the tests of layers that take ``segment_ids``: a batch
whose rows hold several documents, and a check that a layer on the packed rows equals the
layer run on each document alone (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np

# document boundaries per batch row (exclusive ends): row 0 starts new documents inside and
# at the edge of 8-step chunks, row 1 is one document
LENGTH = 29
BOUNDS = [(0, 5, 8, 9, 24, LENGTH), (0, LENGTH)]


def segment_ids():
    ids = np.zeros((len(BOUNDS), LENGTH), np.int32)
    for row, bounds in enumerate(BOUNDS):
        for doc, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            # ids need only differ from the neighbour's, so they recur: [0, 0, 1, 1, 0, ...]
            # (increasing ids hid an SGA path that read equal ids as one document)
            ids[row, lo:hi] = doc % 2 + 3 * row
    return jnp.asarray(ids)


def per_document(fn, args, seq_names, state_name):
    """``fn`` on each document of each row separately: ``initial_state`` for the first
    document only; outputs concatenated, the final state of the last document."""
    ys, finals = [], []
    for row, bounds in enumerate(BOUNDS):
        pieces, state = [], None
        for doc, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            piece = {k: (v[row:row + 1, lo:hi] if k in seq_names else v) for k, v in args.items()}
            initial = args.get(state_name)
            piece[state_name] = (initial[row:row + 1] if doc == 0 and initial is not None
                                 else jnp.zeros_like(initial[row:row + 1]))
            y, state = fn(**piece)
            pieces.append(y)
        ys.append(jnp.concatenate(pieces, axis=1))
        finals.append(state)
    return jnp.concatenate(ys, 0), jnp.concatenate(finals, 0)


def check_equal_to_separate_documents(packed, separate, args, differentiate, tol):
    def loss(fn, diff):
        y, final = fn(**(args | diff))
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(final)), (y, final)

    diff = {name: args[name] for name in differentiate}
    (_, (want_y, want_final)), want = jax.jit(jax.value_and_grad(
        lambda d: loss(separate, d), has_aux=True))(diff)
    (_, (y, final)), got = jax.jit(jax.value_and_grad(
        lambda d: loss(packed, d), has_aux=True))(diff)
    np.testing.assert_allclose(y, want_y, atol=tol, rtol=tol)
    np.testing.assert_allclose(final, want_final, atol=tol, rtol=tol)
    for name in differentiate:
        assert np.isfinite(np.asarray(got[name])).all(), name
        scale = float(jnp.abs(want[name]).max()) + 1e-6
        np.testing.assert_allclose(got[name], want[name], atol=tol * scale, rtol=tol,
                                   err_msg=f"d{name}")
