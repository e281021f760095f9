"""``masked_softmax`` and its written-out VJP: the same values and gradients as autodiff of the
plain definition, zeros (never NaN) for rows with nothing allowed, any broadcastable mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.ops.softmax import masked_softmax


def plain(logits, mask, axis):
    """Softmax over the allowed entries by its definition, differentiated by JAX."""
    weights = jnp.where(mask, jnp.exp(logits - jnp.max(logits, axis=axis, keepdims=True)), 0.0)
    total = jnp.sum(weights, axis=axis, keepdims=True)
    return weights / jnp.where(total == 0.0, 1.0, total)


@pytest.mark.parametrize("axis", [-1, 1])
def test_values_and_gradients_equal_autodiff_of_the_definition(axis):
    logits = jax.random.normal(jax.random.key(0), (3, 7, 5)) * 4.0
    mask = jax.random.bernoulli(jax.random.key(1), 0.6, (3, 7, 5))
    mask = mask.at[0, :, :].set(True).at[1, 2, :].set(True)
    ct = jax.random.normal(jax.random.key(2), (3, 7, 5))
    got, got_vjp = jax.vjp(lambda x: masked_softmax(x, mask, axis=axis), logits)
    # the definition needs every row non-empty along axis for a finite max; mask those out
    want, want_vjp = jax.vjp(lambda x: plain(x, mask, axis), logits)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_vjp(ct)[0], want_vjp(ct)[0], rtol=1e-5, atol=1e-6)


def test_empty_rows_give_zeros_forward_and_backward():
    logits = jax.random.normal(jax.random.key(3), (4, 6))
    mask = jnp.array([True, False, True, False, True, True])[None, :] & (jnp.arange(4) != 2)[:, None]
    probs, vjp = jax.vjp(lambda x: masked_softmax(x, mask), logits)
    grad = vjp(jnp.ones_like(probs))[0]
    assert np.all(np.isfinite(probs)) and np.all(np.isfinite(grad))
    np.testing.assert_array_equal(probs[2], 0.0)
    np.testing.assert_array_equal(grad[2], 0.0)
    np.testing.assert_array_equal(probs[:, 1], 0.0)  # masked entries: weight 0, gradient 0
    np.testing.assert_array_equal(grad[:, 1], 0.0)
    np.testing.assert_allclose(probs.sum(axis=-1), [1.0, 1.0, 0.0, 1.0], rtol=1e-6)


def test_no_mask_and_broadcast_masks_equal_the_full_mask():
    logits = jax.random.normal(jax.random.key(4), (2, 3, 4, 4))
    causal = jnp.tril(jnp.ones((4, 4), bool))
    full = jnp.broadcast_to(causal, logits.shape)
    np.testing.assert_allclose(masked_softmax(logits, causal), masked_softmax(logits, full))
    np.testing.assert_allclose(masked_softmax(logits), jax.nn.softmax(logits), rtol=1e-6)
    g1 = jax.grad(lambda x: jnp.sum(masked_softmax(x, causal) ** 3))(logits)
    g2 = jax.grad(lambda x: jnp.sum(masked_softmax(x, full) ** 3))(logits)
    np.testing.assert_allclose(g1, g2)
