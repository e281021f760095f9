"""The XLA reference attention against a plain numpy softmax(QK^T)V, one (b, h) at a time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxsparse.ops.attention import dot_product_attention
from jaxsparse.ops.masks import CausalMask, FullMask


def numpy_attention(q, k, v, allowed, scale, cap=None):
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    out = np.zeros((B, S, Hq, D))
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            logits = q[b, :, h].astype(np.float64) @ k[b, :, kh].T.astype(np.float64) * scale
            if cap is not None:
                logits = cap * np.tanh(logits / cap)
            ok = allowed[b, h] if allowed is not None else np.ones_like(logits, bool)
            logits = np.where(ok, logits, -np.inf)
            for i in range(S):
                if ok[i].any():
                    w = np.exp(logits[i] - logits[i].max())
                    out[b, i, h] = (w / w.sum()) @ v[b, :, kh]
    return out


def rand(key, *shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


@pytest.mark.parametrize("S, T, Hq, Hkv, D", [(1, 1, 2, 2, 8), (7, 7, 4, 2, 16), (5, 9, 4, 1, 12),
                                              (33, 33, 6, 3, 64)])
def test_matches_numpy_with_causal_mask_and_gqa(S, T, Hq, Hkv, D):
    q, k, v = rand(0, 2, S, Hq, D), rand(1, 2, T, Hkv, D), rand(2, 2, T, Hkv, D)
    mask = CausalMask(offset=T - S)
    out = dot_product_attention(q, k, v, mask=mask)
    allowed = np.broadcast_to(mask.to_dense(S, T), (2, Hq, S, T))
    ref = numpy_attention(np.asarray(q), np.asarray(k), np.asarray(v), allowed, D**-0.5)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_segment_ids_soft_cap_and_scale():
    B, S, H, D = 2, 10, 2, 8
    q, k, v = rand(3, B, S, H, D), rand(4, B, S, H, D), rand(5, B, S, H, D)
    seg = jnp.array([[0] * 4 + [1] * 6, [0] * 10])
    out = dot_product_attention(q, k, v, mask=CausalMask(), segment_ids=seg, scale=0.3,
                                logits_soft_cap=2.0)
    allowed = CausalMask().to_dense(S, S)[None, None] & (np.asarray(seg)[:, None, :, None]
                                                         == np.asarray(seg)[:, None, None, :])
    ref = numpy_attention(np.asarray(q), np.asarray(k), np.asarray(v),
                          np.broadcast_to(allowed, (B, H, S, S)), 0.3, cap=2.0)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_fully_masked_rows_are_zero_with_finite_gradients():
    q, k, v = rand(6, 1, 4, 2, 8), rand(7, 1, 4, 2, 8), rand(8, 1, 4, 2, 8)
    allowed = jnp.array([[True, False, False, False], [False] * 4, [True] * 4, [False] * 4])
    out = dot_product_attention(q, k, v, mask=allowed)
    np.testing.assert_array_equal(out[:, 1], 0.0)
    np.testing.assert_array_equal(out[:, 3], 0.0)
    grads = jax.grad(lambda q, k, v: dot_product_attention(q, k, v, mask=allowed).sum(),
                     argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()


def test_gradients_match_finite_differences():
    q, k, v = rand(9, 1, 5, 2, 4), rand(10, 1, 5, 1, 4), rand(11, 1, 5, 1, 4)
    f = lambda q, k, v: dot_product_attention(q, k, v, mask=CausalMask())  # noqa: E731
    check_grads(f, (q, k, v), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)


def test_bf16_inputs_are_close_to_the_float32_reference():
    q, k, v = rand(12, 2, 16, 4, 32), rand(13, 2, 16, 2, 32), rand(14, 2, 16, 2, 32)
    ref = dot_product_attention(q, k, v, mask=CausalMask())
    out = dot_product_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                v.astype(jnp.bfloat16), mask=CausalMask())
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(implementation="pallas"), "implementation='pallas' is not available"),
    (dict(logits_soft_cap=-1.0), "logits_soft_cap=-1.0"),
    (dict(mask=jnp.ones((3, 3), jnp.int32)), "boolean array"),
    (dict(mask=jnp.ones((5, 5), bool)), "does not broadcast"),
])
def test_bad_arguments_are_named(kwargs, fragment):
    q = k = v = rand(0, 1, 4, 2, 8)
    with pytest.raises(ValueError, match=fragment):
        dot_product_attention(q, k, v, **kwargs)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        dot_product_attention(rand(0, 1, 4, 3, 8), rand(1, 1, 4, 2, 8), rand(2, 1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"\[batch, seq, heads, head_dim\]"):
        dot_product_attention(rand(0, 4, 3, 8), rand(1, 4, 2, 8), rand(2, 4, 2, 8))


def test_masks_render_and_combine():
    causal = CausalMask().to_dense(3, 3)
    np.testing.assert_array_equal(causal, np.tril(np.ones((3, 3), bool)))
    np.testing.assert_array_equal((CausalMask() | FullMask()).to_dense(2, 4), np.ones((2, 4), bool))
    np.testing.assert_array_equal((CausalMask() & CausalMask(offset=-1)).to_dense(3, 3),
                                  np.tril(np.ones((3, 3), bool), -1))
    assert hash(CausalMask(2)) == hash(CausalMask(2))


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(S=st.integers(1, 20), T=st.integers(1, 20), kv_heads=st.sampled_from([1, 2]),
       groups=st.sampled_from([1, 3]), D=st.sampled_from([4, 6, 16]), seed=st.integers(0, 99))
def test_random_shapes_match_numpy(S, T, kv_heads, groups, D, seed):
    Hq = kv_heads * groups
    q, k, v = rand(seed, 1, S, Hq, D), rand(seed + 1, 1, T, kv_heads, D), rand(seed + 2, 1, T, kv_heads, D)
    mask = CausalMask(offset=T - S)
    out = dot_product_attention(q, k, v, mask=mask)
    allowed = np.broadcast_to(mask.to_dense(S, T), (1, Hq, S, T))
    ref = numpy_attention(np.asarray(q), np.asarray(k), np.asarray(v), allowed, D**-0.5)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
