"""The XLA reference attention against a plain numpy softmax(QK^T)V, one (b, h) at a time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from helpers import forward_and_vjp
from jaxsparse.ops.attention import decode_attention, dot_product_attention, window_cache_decode
from jaxsparse.ops.masks import (BigBirdMask, CausalMask, ChunkedCausalMask, FullMask,
                                 GlobalTokensMask, LocalMask, MultiHeadMask, StridedMask)


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


@pytest.mark.parametrize("implementation", ["xla_blocksparse", "pallas_interpret"])
def test_no_mask_means_full_attention_on_every_path(implementation):
    """``mask=None`` with an explicit implementation is attention over every key (it once
    raised "needs a lazy Mask object" on the block-sparse path while the default accepted it)."""
    q, k, v = rand(15, 1, 37, 2, 8), rand(16, 1, 21, 1, 8), rand(17, 1, 21, 1, 8)
    np.testing.assert_allclose(dot_product_attention(q, k, v, implementation=implementation),
                               dot_product_attention(q, k, v, implementation="xla"),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(implementation="cudnn"), "implementation='cudnn' is not available"),
    (dict(implementation="xla_blocksparse", mask=jnp.ones((4, 4), bool)), "needs a lazy Mask"),
    (dict(mask=MultiHeadMask((CausalMask(),) * 3)), "MultiHeadMask of 3 heads; q has 2"),
    (dict(segment_ids=jnp.zeros((1, 5), jnp.int32)), r"segment_ids must have shape \(1, 4\)"),
    (dict(segment_ids=jnp.zeros((1, 4), jnp.float32)), "must be integers"),
    (dict(logits_soft_cap=-1.0), "logits_soft_cap=-1.0"),
    (dict(mask=jnp.ones((3, 3), jnp.int32)), "boolean array"),
    (dict(mask=jnp.ones((5, 5), bool)), "does not broadcast"),
    (dict(mask="loca:3"), "unknown mask spec 'loca:3'"),
    (dict(mask={"causal": True}), r"mask=\{'causal': True\}: expected a Mask, a mask spec"),
    (dict(scale=0.0), r"scale=0.0: must be a finite number > 0"),
    (dict(scale="0.1"), r"scale='0.1': expected a real number > 0"),
    (dict(logits_soft_cap=float("nan")), r"logits_soft_cap=nan: must be a finite number > 0"),
    (dict(mask=jnp.ones((4,), bool)), r"mask of shape \(4,\): a boolean array mask must be "
                                       r"\[S, T\], \[B, S, T\] or \[B, H, S, T\]"),
    (dict(mask=jnp.ones((1, 1, 1, 4, 4), bool)), r"mask of shape \(1, 1, 1, 4, 4\)"),
    (dict(mask="causal:3"), "mask spec 'causal:3': 'causal' takes no arguments"),
    (dict(mask=5), r"mask=5: expected a Mask"),
])
def test_bad_arguments_are_named(kwargs, fragment):
    q = k = v = rand(0, 1, 4, 2, 8)
    with pytest.raises((ValueError, TypeError), match=fragment):
        dot_product_attention(q, k, v, **kwargs)


def test_mask_spec_strings_and_static_scales_are_accepted_traced_ones_named():
    q, k, v = rand(3, 1, 9, 2, 8), rand(4, 1, 9, 2, 8), rand(5, 1, 9, 2, 8)
    np.testing.assert_array_equal(
        dot_product_attention(q, k, v, mask="local:3"),
        dot_product_attention(q, k, v, mask=LocalMask(2, 0) & CausalMask()))
    from flax import nnx

    from jaxsparse.nn import Attention

    layer = Attention(16, 4, 2, 8, rngs=nnx.Rngs(0), mask="heads:local:4*2;causal*2")
    assert layer.mask == MultiHeadMask((LocalMask(3, 0) & CausalMask(),) * 2 + (CausalMask(),) * 2)
    # a concrete scalar array is a static scale; a traced one cannot be compiled into the
    # kernels (the block-sparse and Pallas paths), so it is refused with the way out
    np.testing.assert_array_equal(
        dot_product_attention(q, k, v, mask="causal", scale=jnp.float32(0.25)),
        dot_product_attention(q, k, v, mask=CausalMask(), scale=0.25))
    with pytest.raises(TypeError, match="scale must be a static real number .* scale q instead"):
        jax.jit(lambda s: dot_product_attention(q, k, v, mask="causal", scale=s))(0.2)


def test_integer_inputs_are_refused_not_truncated():
    q = jnp.ones((1, 4, 2, 8), jnp.int32)
    with pytest.raises(ValueError, match="q has dtype int32; attention needs floating-point"):
        dot_product_attention(q, rand(0, 1, 4, 2, 8), rand(1, 1, 4, 2, 8))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        dot_product_attention(rand(0, 1, 4, 3, 8), rand(1, 1, 4, 2, 8), rand(2, 1, 4, 2, 8))
    with pytest.raises(ValueError, match="head dims differ: q has 8, k and v have 4"):
        dot_product_attention(rand(0, 1, 4, 2, 8), rand(1, 1, 4, 2, 4), rand(2, 1, 4, 2, 4))
    with pytest.raises(ValueError, match=r"\[batch, seq, heads, head_dim\]"):
        dot_product_attention(rand(0, 4, 3, 8), rand(1, 4, 2, 8), rand(2, 4, 2, 8))
    with pytest.raises(ValueError, match="head_dim must be >= 1"):  # not a division by zero
        dot_product_attention(*(jnp.ones((1, 4, 2, 0)),) * 3)


def test_masks_render_and_combine():
    causal = CausalMask().to_dense(3, 3)
    np.testing.assert_array_equal(causal, np.tril(np.ones((3, 3), bool)))
    np.testing.assert_array_equal((CausalMask() | FullMask()).to_dense(2, 4), np.ones((2, 4), bool))
    np.testing.assert_array_equal((CausalMask() & CausalMask(offset=-1)).to_dense(3, 3),
                                  np.tril(np.ones((3, 3), bool), -1))
    assert hash(CausalMask(2)) == hash(CausalMask(2))


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=8, deadline=None)
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



# --- block-sparse against the dense reference -----------------------------------------------

BLOCKSPARSE_CASES = [
    # mask, S, T, Hq, Hkv, D, segments
    (CausalMask(), 1, 1, 8, 8, 32, False),
    (CausalMask(), 129, 129, 8, 2, 64, True),
    (LocalMask(40, 0) & CausalMask(), 1000, 1000, 4, 1, 32, False),
    (CausalMask(offset=122), 7, 129, 8, 2, 96, False),
    (BigBirdMask(16, 3, 1, 2, seed=1), 129, 129, 4, 1, 128, True),
    (GlobalTokensMask(3) | (LocalMask(8, 8)), 200, 200, 4, 4, 192, False),
    (ChunkedCausalMask(50), 129, 129, 4, 2, 32, False),
    (CausalMask() & StridedMask(7), 129, 129, 8, 8, 64, False),
    (MultiHeadMask((CausalMask(), LocalMask(4, 0), LocalMask(16, 0), CausalMask(offset=-200))),
     129, 129, 4, 2, 32, False),  # the last head has every row empty
]


@pytest.mark.parametrize("mask, S, T, Hq, Hkv, D, segments", BLOCKSPARSE_CASES,
                         ids=lambda x: type(x).__name__ if not isinstance(x, (int, bool)) else str(x))
def test_blocksparse_matches_reference_forward_and_gradients(mask, S, T, Hq, Hkv, D, segments):
    q, k, v = rand(20, 2, S, Hq, D), rand(21, 2, T, Hkv, D), rand(22, 2, T, Hkv, D)
    seg = None
    if segments:
        seg = jnp.concatenate([jnp.zeros((2, S // 3), jnp.int32), jnp.ones((2, S - S // 3), jnp.int32)], 1)
    cotangent = rand(23, 2, S, Hq, D)

    def run(impl):
        f = lambda q, k, v: dot_product_attention(q, k, v, mask=mask, segment_ids=seg,  # noqa: E731
                                                  logits_soft_cap=20.0, implementation=impl)
        return forward_and_vjp(f, (q, k, v), cotangent)  # compiled: op by op up to 5 s

    ref, ref_grads = run("xla")
    out, grads = run("xla_blocksparse")
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    for g, g_ref in zip(grads, ref_grads):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["xla_blocksparse", "pallas_interpret"])
def test_bf16_error_is_within_the_bf16_reference_error(implementation):
    """Compare each path's bf16 error against a float32 reference with the dense bf16 path's
    own error (the splash-attention practice), rather than with a fixed tolerance."""
    mask = LocalMask(63, 0) & CausalMask()
    q, k, v = rand(30, 1, 200, 4, 64), rand(31, 1, 200, 2, 64), rand(32, 1, 200, 2, 64)
    # compiled: op by op these took ~2.5 s
    attend = jax.jit(dot_product_attention, static_argnames=("mask", "implementation"))
    exact = attend(q, k, v, mask=mask, implementation="xla")
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    ref_err = jnp.abs(attend(*low, mask=mask, implementation="xla").astype(jnp.float32) - exact).max()
    out = attend(*low, mask=mask, implementation=implementation)
    assert out.dtype == jnp.bfloat16
    err = jnp.abs(out.astype(jnp.float32) - exact).max()
    assert err <= 2 * ref_err + 1e-3, (float(err), float(ref_err))


def test_default_implementation_picks_blocksparse_from_a_million_logits_beyond_one_tile():
    from jaxsparse.ops.attention.api import _choose

    assert _choose(CausalMask(), 1, 4, 128, 128) == "xla"
    assert _choose(CausalMask(), 64, 4, 64, 64) == "xla"  # one 128-tile
    assert _choose(CausalMask(), 16, 4, 129, 129) == "xla_blocksparse"
    window = LocalMask(255, 0) & CausalMask()
    assert _choose(window, 1, 1, 8192, 8192) == "xla_blocksparse"
    assert _choose(FullMask(), 1, 4, 1024, 1024) == "xla_blocksparse"
    assert _choose(None, 1, 4, 1024, 1024) == "xla_blocksparse"
    assert _choose(None, 1, 4, 128, 128) == "xla"
    dense = jnp.ones((4, 4), bool)
    assert _choose(dense, 1, 1, 8192, 8192) == "xla"


def test_default_path_on_a_long_unmasked_batch_equals_the_reference():
    q, k, v = rand(6, 2, 520, 4, 16), rand(7, 2, 520, 2, 16), rand(8, 2, 520, 2, 16)
    out = dot_product_attention(q, k, v)  # 2*4*520*520 > 2**20 logits: the block-sparse path
    ref = dot_product_attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


# --- decoding -------------------------------------------------------------------------------


def test_decode_attention_equals_the_last_rows_of_full_attention():
    B, T, Hq, Hkv, D = 2, 23, 4, 2, 16
    q, k, v = rand(40, B, T, Hq, D), rand(41, B, T, Hkv, D), rand(42, B, T, Hkv, D)
    # compiled (op by op these took ~3.5 s); the lengths stay concrete, so still checked
    lengths = jnp.array([T, T])
    causal = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask=CausalMask()))
    decode = jax.jit(lambda q, k, v, heads_first=False: decode_attention(
        q, k, v, lengths, heads_first=heads_first), static_argnames="heads_first")
    full = causal(q, k, v)
    cache_k = jnp.zeros((B, 32, Hkv, D)).at[:, :T].set(k)
    cache_v = jnp.zeros((B, 32, Hkv, D)).at[:, :T].set(v)
    out = decode(q[:, -3:], cache_k, cache_v)
    np.testing.assert_allclose(out, full[:, -3:], atol=1e-5, rtol=1e-5)
    # the layers' layout, [B, Hkv, C, D]; also with one key/value head (MQA: taken as the
    # same array in the other layout)
    for kv_heads in (Hkv, 1):
        cache_k, cache_v = cache_k[:, :, :kv_heads], cache_v[:, :, :kv_heads]
        full = causal(q, k[:, :, :kv_heads], v[:, :, :kv_heads])
        out = decode(q[:, -3:], cache_k.swapaxes(1, 2), cache_v.swapaxes(1, 2), heads_first=True)
        np.testing.assert_allclose(out, full[:, -3:], atol=1e-5, rtol=1e-5)


def test_decode_attention_with_a_sliding_window_ring_buffer():
    B, T, H, D, W = 1, 30, 2, 8, 8
    q, k, v = rand(50, B, T, H, D), rand(51, B, T, H, D), rand(52, B, T, H, D)
    # compiled (op by op these took ~3 s); the lengths stay concrete, so still checked
    lengths = jnp.array([T])
    decode = jax.jit(lambda q, k, v, heads_first=False: decode_attention(
        q, k, v, lengths, window=W, heads_first=heads_first), static_argnames="heads_first")
    full = jax.jit(lambda q, k, v: dot_product_attention(
        q, k, v, mask=LocalMask(W - 1, 0) & CausalMask()))(q, k, v)
    slots = np.arange(T - W, T) % W  # the ring holds the last W positions
    ring_k = jnp.zeros((B, W, H, D)).at[:, slots].set(k[:, T - W:])
    ring_v = jnp.zeros((B, W, H, D)).at[:, slots].set(v[:, T - W:])
    out = decode(q[:, -1:], ring_k, ring_v)
    np.testing.assert_allclose(out, full[:, -1:], atol=1e-5, rtol=1e-5)
    out = decode(q[:, -1:], ring_k.swapaxes(1, 2), ring_v.swapaxes(1, 2), heads_first=True)
    np.testing.assert_allclose(out, full[:, -1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask", [
    LocalMask(7, 0), ChunkedCausalMask(8), LocalMask(3, 0) & CausalMask(),
    MultiHeadMask((LocalMask(2, 0), LocalMask(7, 0), LocalMask(5, 0), ChunkedCausalMask(6)))],
    ids=["window", "chunked", "narrower", "per_head"])
@pytest.mark.parametrize("prompt_chunk", [None, 4], ids=["whole_prompts", "prompt_chunks"])
def test_window_cache_decoding_equals_full_attention(mask, prompt_chunk, monkeypatch):
    """A ring buffer of 8 slots, fed a prompt of 3, one token, a chunk of 9 (longer than the
    ring), single tokens wrapping around it and a last chunk of 16: every output equals full
    attention under the mask (GQA, head dim 5), and the ring keeps only 8 positions. With
    prompts read 4 queries at a time (``PROMPT_CHUNK``, 256 by default): a first prompt of 9
    (the ring still empty), then 1, 3 and 18 tokens."""
    import jaxsparse.ops.attention.decode as decode

    pieces = [(0, 3), (3, 4), (4, 13), (13, 14), (14, 15), (15, 31)]
    if prompt_chunk:
        monkeypatch.setattr(decode, "PROMPT_CHUNK", prompt_chunk)
        pieces = [(0, 9), (9, 10), (10, 13), (13, 31)]
    B, T, Hq, Hkv, D, W = 2, 31, 4, 2, 5, 8
    q, k, v = rand(60, B, T, Hq, D), rand(61, B, T, Hkv, D), rand(62, B, T, Hkv, D)
    full = dot_product_attention(q, k, v, mask=mask & CausalMask(), implementation="xla")
    k_ring = v_ring = jnp.zeros((B, Hkv, W, D))
    # a function of its own: a jit of window_cache_decode itself would reuse the other
    # variant's compilations, traced with the other PROMPT_CHUNK
    step = jax.jit(lambda *args, mask: window_cache_decode(*args, mask=mask),
                   static_argnames="mask")
    outs = []
    for start, stop in pieces:
        out, k_ring, v_ring = step(q[:, start:stop], k[:, start:stop], v[:, start:stop],
                                   k_ring, v_ring, jnp.int32(start), mask=mask)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=1e-5)
    assert k_ring.shape == (B, Hkv, W, D)
    # the ring holds the last 8 positions, each in its slot (position mod 8)
    np.testing.assert_array_equal(k_ring[:, :, np.arange(T - W, T) % W], k[:, T - W:].swapaxes(1, 2))


def test_bad_window_cache_arguments_are_named():
    q, k, ring = rand(0, 2, 1, 4, 8), rand(1, 2, 1, 2, 8), rand(2, 2, 2, 6, 8)
    cases = [
        (dict(mask=CausalMask()), r"reads back without bound: a window cache of 6 slots"),
        (dict(mask="local:7"), r"reads back 7: a window cache of 6 slots"),
        (dict(mask=LocalMask(2, 0), index=jnp.array([3, 3])), r"index of shape \(2,\)"),
        (dict(mask=LocalMask(2, 0), index=-1), r"index=-1: must be >= 0"),
        (dict(mask=LocalMask(2, 0), k_cache=rand(3, 2, 2, 6, 4)), r"k_cache\(2, 2, 6, 4\)"),
        (dict(mask=None), "expected a Mask or a mask spec string"),
    ]
    for kwargs, fragment in cases:
        args = dict(k_cache=ring, v_cache=ring, index=3) | kwargs
        with pytest.raises((ValueError, TypeError), match=fragment):
            window_cache_decode(q, k, k, args.pop("k_cache"), args.pop("v_cache"),
                                args.pop("index"), **args)


def test_bad_decode_arguments_are_named():
    q, cache = rand(0, 2, 1, 4, 8), rand(1, 2, 6, 2, 8)
    cases = [
        (dict(lengths=jnp.array([7, 3])), r"lengths=\[7, 3\]: each must be in \[1, 6\]"),
        (dict(lengths=jnp.array([0, 3])), r"lengths=\[0, 3\]: each must be in \[1, 6\]"),
        (dict(lengths=jnp.array([3, 3, 3])), r"lengths of shape \(3,\) .* \[batch=2\]"),
        (dict(lengths=jnp.array([3.0, 3.0])), "dtype float32: expected integers"),
        (dict(lengths=3, window=0), r"window=0: must be an integer in \[1, 6\]"),
        (dict(lengths=3, window=2.5), r"window=2.5: must be an integer in \[1, 6\]"),
        (dict(lengths=3, mask=jnp.ones((6, 6), bool)), "expected a Mask, a mask spec string"),
        (dict(lengths=3, heads_first=1), "heads_first=1: must be True or False"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises((ValueError, TypeError), match=fragment):
            decode_attention(q, cache, cache, **kwargs)
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple.*k_cache"):
        decode_attention(q, rand(2, 2, 6, 3, 8), rand(3, 2, 6, 3, 8), 3)
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple.*"
                       r"k_cache.swapaxes\(1, 2\)\(2, 6, 3, 8\)"):  # named in [B, C, H, D]
        decode_attention(q, rand(2, 2, 3, 6, 8), rand(3, 2, 3, 6, 8), 3, heads_first=True)
    with pytest.raises(ValueError, match=r"lengths=\[7, 7\]: each must be in \[1, 6\]"):
        decode_attention(q, cache.swapaxes(1, 2), cache.swapaxes(1, 2), 7, heads_first=True)
    # a ring buffer holds more positions than slots; a scalar length serves the whole batch
    ring = decode_attention(q, cache, cache, 20, window=6)
    assert ring.shape == q.shape and bool(jnp.all(jnp.isfinite(ring)))
    np.testing.assert_array_equal(decode_attention(q, cache, cache, 4, mask="local:2"),
                                  decode_attention(q, cache, cache, jnp.array([4, 4]),
                                                   mask=LocalMask(1, 0)))
