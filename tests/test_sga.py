"""Sparse global attention (Hydra's long-range path): exact against loops, causal-safe global
token selection, cached decoding equal to the full pass (from a cache of every position and
from the rings of window + max_global + 1 slots), a learning signal for the controller."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.ops.sga import sga_decode, sparse_global_attention


def inputs(key, b=2, length=50, heads=2, dim=8):
    ks = jax.random.split(key, 4)
    q, k, v = (jax.random.normal(kk, (b, length, heads, dim)) for kk in ks[:3])
    return q, k, v, jax.random.normal(ks[3], (b, length))


def brute_force(q, k, v, scores, window, max_global):
    q, k, v, scores = (np.asarray(a, np.float64) for a in (q, k, v, scores))
    b, length, heads, dim = q.shape
    out = np.zeros_like(q)
    for bi in range(b):
        for t in range(length):
            local = list(range(max(0, t - window + 1), t + 1))
            glob = [j for j in range(t - window + 1) if scores[bi, j] > 0][-max_global:] \
                if max_global else []
            bias = [0.0] * len(local) + [-np.log1p(np.exp(-scores[bi, j])) for j in glob]
            keys = local + glob
            for h in range(heads):
                logits = np.array([q[bi, t, h] @ k[bi, j, h] for j in keys]) / np.sqrt(dim) + bias
                p = np.exp(logits - logits.max())
                out[bi, t, h] = (p / p.sum()) @ v[bi, keys, h]
    return out


IMPLEMENTATIONS = ["gather", "dense", "blocked", "core"]

# compiled: op by op one call of an implementation took 1-3 s
sga_jit = jax.jit(sparse_global_attention,
                  static_argnames=("window", "max_global", "implementation", "block"))


CASES = [(50, 6, 4), (1, 3, 2), (33, 1, 8), (40, 8, 0)]


# every implementation on every case, except the slow gathers on the two middle-sized ones
@pytest.mark.parametrize("impl,length,window,max_global", [
    (impl, *case) if impl != "gather" or case in CASES[:2]
    else pytest.param(impl, *case, marks=pytest.mark.slow)
    for impl in IMPLEMENTATIONS for case in CASES])
def test_sga_equals_the_brute_force_definition(length, window, max_global, impl):
    q, k, v, scores = inputs(jax.random.key(length), length=length)
    got = sga_jit(q, k, v, scores, window=window, max_global=max_global,
                  implementation=impl, block=8)  # blocked: several blocks
    np.testing.assert_allclose(got, brute_force(q, k, v, scores, window, max_global), atol=2e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_global_selection_is_causal_safe(impl):
    q, k, v, scores = inputs(jax.random.key(1), length=80)
    base = sga_jit(q, k, v, scores, window=8, max_global=6, implementation=impl)
    for t in (0, 9, 40, 78):
        later = jnp.arange(80)[None, :, None, None] > t
        changed = sga_jit(
            jnp.where(later, q + 1, q), jnp.where(later, k - 2, k), jnp.where(later, v * 3, v),
            jnp.where(later[:, :, 0, 0], 10.0, scores), window=8, max_global=6,
            implementation=impl)
        if impl == "blocked":  # a block's shared key set changes, so sums may reorder
            np.testing.assert_allclose(changed[:, :t + 1], base[:, :t + 1], atol=1e-6)
        else:
            np.testing.assert_array_equal(changed[:, :t + 1], base[:, :t + 1])


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_cached_decoding_equals_the_full_pass(kv_heads):
    q, k, v, scores = inputs(jax.random.key(2), length=45)
    k, v = k[:, :, :kv_heads], v[:, :, :kv_heads]  # kv_heads=1: MQA, a cache of one head
    full = sga_jit(q, k, v, scores, window=5, max_global=3)
    slots = 64
    decode = jax.jit(functools.partial(sga_decode, window=5, max_global=3))
    pad = lambda x: jnp.pad(x, [(0, 0), (0, slots - 45)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    pieces, start = [], 0
    for size in (10, 1, 20, 14):
        end = start + size
        cache_k = pad(jnp.where(jnp.arange(45)[None, :, None, None] < end, k, 0.0))
        cache_v = pad(jnp.where(jnp.arange(45)[None, :, None, None] < end, v, 0.0))
        cache_s = pad(jnp.where(jnp.arange(45)[None, :] < end, scores, -1.0))
        pieces.append(decode(q[:, start:end], cache_k, cache_v, cache_s, jnp.full((2,), end)))
        start = end
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_controller_scores_get_a_gradient_through_the_global_logits(impl):
    q, k, v, scores = inputs(jax.random.key(3), length=40)
    grad = jax.jit(jax.grad(lambda s: jnp.sum(sparse_global_attention(
        q, k, v, s, window=4, max_global=4, implementation=impl) ** 2)))(scores)
    selected_old = (scores > 0) & (jnp.arange(40)[None] < 36)
    assert float(jnp.abs(jnp.where(selected_old, grad, 0.0)).max()) > 0
    assert float(jnp.abs(jnp.where(scores > 0, 0.0, grad)).max()) == 0.0  # non-candidates: none


@pytest.mark.parametrize("max_global", [0, 5])
def test_core_merges_window_and_globals_into_the_one_softmax_with_its_gradients(max_global):
    """``core``: the window through ``dot_product_attention`` and the global keys apart, merged
    by their log-sum-exps, give the values and the gradients (q, k, v and the controller's
    scores, which reach it through the global logits' bias) of ``gather``, which puts all of a
    query's keys in one softmax."""
    q, k, v, scores = inputs(jax.random.key(6), length=45)

    def run(impl):
        def attend(q, k, v, s):
            return sparse_global_attention(q, k, v, s, window=6, max_global=max_global,
                                           implementation=impl, block=8)
        loss = lambda *a: jnp.sum(jnp.sin(attend(*a)))  # noqa: E731
        return jax.jit(lambda *a: (attend(*a), jax.grad(loss, (0, 1, 2, 3))(*a)))(q, k, v, scores)

    (out, grads), (want, want_grads) = run("core"), run("gather")
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    for name, g, w in zip(("q", "k", "v", "scores"), grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4, err_msg=name)
    assert (float(jnp.abs(grads[3]).max()) > 0) == (max_global > 0)


@pytest.mark.parametrize("impl", [pytest.param(i, marks=pytest.mark.slow) if i == "gather" else i
                                  for i in IMPLEMENTATIONS])  # the gathers: ~9 s
def test_gqa_equals_the_attention_on_key_value_heads_repeated_per_query_head(impl):
    """``H = 3·Hkv`` query heads (odd length, several blocks): the values and the gradients of
    q, k, v and the scores equal the same attention on K/V repeated per query head (what
    the layer did before)."""
    b, length, heads, kv_heads, dim = 2, 37, 6, 2, 8
    ks = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(ks[0], (b, length, heads, dim))
    k, v = (jax.random.normal(kk, (b, length, kv_heads, dim)) for kk in ks[1:3])
    scores = jax.random.normal(ks[3], (b, length))
    repeat = functools.partial(jnp.repeat, repeats=heads // kv_heads, axis=2)
    np.testing.assert_allclose(
        sga_jit(q, k, v, scores, window=5, max_global=4, implementation=impl, block=8),
        brute_force(q, repeat(k), repeat(v), scores, 5, 4), atol=2e-5)

    def loss(q, k, v, s, expand=lambda x: x):
        out = sparse_global_attention(q, expand(k), expand(v), s, window=5, max_global=4,
                                      implementation=impl, block=8)
        return jnp.sum(jnp.sin(out))

    grads = jax.jit(jax.grad(loss, (0, 1, 2, 3)))(q, k, v, scores)
    want = jax.jit(jax.grad(functools.partial(loss, expand=repeat), (0, 1, 2, 3)))(q, k, v, scores)
    for name, g, w in zip(("q", "k", "v", "scores"), grads, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4, err_msg=name)


def test_bad_sga_input_is_refused():
    q, k, v, scores = inputs(jax.random.key(4), length=10)
    with pytest.raises(ValueError, match=r"scores \(2, 9\): must be \[B, L\]"):
        sparse_global_attention(q, k, v, scores[:, :9], window=2, max_global=2)
    with pytest.raises(ValueError, match="window=0"):
        sparse_global_attention(q, k, v, scores, window=0, max_global=2)
    with pytest.raises(ValueError, match="implementation='flash'"):
        sparse_global_attention(q, k, v, scores, window=2, max_global=2, implementation="flash")
    with pytest.raises(ValueError, match="window=2.5: must be an integer >= 1"):
        sparse_global_attention(q, k, v, scores, window=2.5, max_global=2)
    with pytest.raises(ValueError, match="block=0: must be an integer >= 1"):
        sparse_global_attention(q, k, v, scores, window=2, max_global=2, block=0)
    with pytest.raises(ValueError, match="scale=0.0: must be a finite number > 0"):
        sparse_global_attention(q, k, v, scores, window=2, max_global=2, scale=0.0)
    # a traced scale (a learnt temperature) is taken by the XLA paths, unchecked
    assert np.isfinite(jax.grad(lambda s: sparse_global_attention(
        q, k, v, scores, window=2, max_global=2, scale=s).sum())(0.3))
    with pytest.raises(ValueError, match="q has dtype int32; attention needs floating-point"):
        sparse_global_attention(q.astype(jnp.int32), k, v, scores, window=2, max_global=2)
    with pytest.raises(ValueError, match=r"query heads \(2\) must be a multiple of key/value "
                                         r"heads \(3\)"):
        sparse_global_attention(q, *(jnp.concatenate([x, x[:, :, :1]], 2) for x in (k, v)),
                                scores, window=2, max_global=2)


def test_bad_decode_input_is_refused():
    q, k, v, scores = inputs(jax.random.key(5), length=6)
    one = q[:, -1:]
    decode = functools.partial(sga_decode, one, k, v, scores)
    with pytest.raises(ValueError, match="window=0: must be an integer >= 1"):
        decode(4, window=0, max_global=1)
    with pytest.raises(ValueError, match="max_global=-1: must be an integer >= 0"):
        decode(4, window=2, max_global=-1)
    # a length past the cache's 6 slots would read positions that are not there; 0 has no
    # room for the new token
    for lengths in (9, 0):
        with pytest.raises(ValueError, match=rf"lengths=\[{lengths}, {lengths}\]: each must be "
                                             r"in \[1, 6\]"):
            decode(lengths, window=2, max_global=1)
    with pytest.raises(ValueError, match=r"scores_cache \(2, 5\): must be \[B, S\] = \(2, 6\)"):
        sga_decode(one, k, v, scores[:, :5], 4, window=2, max_global=1)
    with pytest.raises(ValueError, match="k_cache and v_cache must have the same shape"):
        sga_decode(one, k, v[:, :5], scores, 4, window=2, max_global=1)


def test_the_layer_refuses_options_that_cannot_work_when_built():
    from flax import nnx

    from jaxsparse.nn.sga import SparseGlobalAttention
    build = functools.partial(SparseGlobalAttention, 8, 4, 2, 4, rngs=nnx.Rngs(0), window=4,
                              max_global=2)
    build()  # the valid baseline
    for bad, match in ((dict(window=0), "window=0"), (dict(max_global=-1), "max_global=-1"),
                       (dict(implementation="flash"), "implementation='flash'")):
        with pytest.raises(ValueError, match=match):
            build(**bad)
    with pytest.raises(ValueError, match="n_heads a multiple of n_kv_heads"):
        SparseGlobalAttention(8, 4, 3, 4, rngs=nnx.Rngs(0), window=4, max_global=2)


# ring decoding: (window, max_global, the sizes of the pieces fed in turn)
RING_CASES = [
    (5, 3, (10, 1, 20, 14)),        # a prompt, single tokens, prompts longer than the rings
    (4, 0, (1,) * 13 + (9,)),       # no global tokens: the window ring alone
    (1, 1, (7, 1, 1, 36)),          # one slot each
    (6, 4, (1,) * 45),              # generation from the first token
    (3, 7, (45,)),                  # one prompt: more new candidates than global slots
]


@pytest.mark.parametrize("window, max_global, sizes", RING_CASES)
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_ring_decoding_equals_the_full_pass(window, max_global, sizes, kv_heads):
    """The two rings of window + max_global + 1 slots give the full pass's outputs for prompts
    and single tokens: candidates move from the window ring to the global ring as they leave
    the window, and only the most recent max_global are kept."""
    from jaxsparse.ops.sga_rings import init_sga_rings, sga_ring_decode

    q, k, v, scores = inputs(jax.random.key(11), b=3, length=sum(sizes), heads=4)
    k, v = k[:, :, :kv_heads], v[:, :, :kv_heads]
    scores = scores + 0.5  # about two thirds candidates: the global ring overflows
    full = sga_jit(q, k, v, scores, window=window, max_global=max_global)
    rings = init_sga_rings(3, window, max_global, kv_heads, 8)
    decode = jax.jit(functools.partial(sga_ring_decode, window=window, max_global=max_global))
    pieces, start = [], 0
    for size in sizes:
        piece = slice(start, start + size)
        out, rings = decode(q[:, piece], k[:, piece], v[:, piece], scores[:, piece], rings,
                            start)
        pieces.append(out)
        start += size
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=2e-5, rtol=2e-5)
    candidates = np.sum(np.asarray(scores[:, :max(start - window, 0)]) > 0, axis=1)
    np.testing.assert_array_equal(rings["global_count"], candidates if max_global else 0)


def test_ring_decoding_gradients_equal_the_full_pass():
    """Through a prompt (every input) and through a generated token (its query, key, value
    and score)."""
    from jaxsparse.ops.sga_rings import init_sga_rings, sga_ring_decode

    q, k, v, scores = inputs(jax.random.key(12), length=30, heads=4)
    k, v = k[:, :, :2], v[:, :, :2]
    weights = jax.random.normal(jax.random.key(13), q.shape)
    options = dict(window=4, max_global=3)
    full = lambda *a: jnp.sum(sparse_global_attention(*a, **options) * weights)  # noqa: E731
    rings = init_sga_rings(2, 4, 3, 2, 8)
    prompt = lambda *a: jnp.sum(sga_ring_decode(*a, rings, 0, **options)[0] * weights)  # noqa
    # compiled, both: dispatched op by op these gradients took 15 s
    for got, want in zip(jax.jit(jax.grad(prompt, range(4)))(q, k, v, scores),
                         jax.jit(jax.grad(full, range(4)))(q, k, v, scores)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

    _, rings = sga_ring_decode(q[:, :-1], k[:, :-1], v[:, :-1], scores[:, :-1], rings, 0,
                               **options)
    last = lambda x: x[:, -1:]  # noqa: E731

    def full_last(*new):  # the full pass with the last token's inputs replaced
        args = [jnp.concatenate([x[:, :-1], n], axis=1) for x, n in zip((q, k, v, scores), new)]
        return jnp.sum(last(sparse_global_attention(*args, **options)) * last(weights))

    def token(*new):
        return jnp.sum(sga_ring_decode(*new, rings, 29, **options)[0] * last(weights))

    new = [last(x) for x in (q, k, v, scores)]
    for got, want in zip(jax.jit(jax.grad(token, range(4)))(*new),
                         jax.jit(jax.grad(full_last, range(4)))(*new)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_the_layer_decodes_from_rings_when_they_are_smaller_than_the_cache():
    """``init_cache`` keeps window + max_global + 1 slots, whatever the length, when that is less
    than ``max_len`` (a cache of every position otherwise); both decode like the full pass."""
    from flax import nnx

    from jaxsparse.nn.sga import SparseGlobalAttention
    layer = SparseGlobalAttention(16, 4, 2, 8, rngs=nnx.Rngs(1), window=4, max_global=3)
    x = jax.random.normal(jax.random.key(14), (2, 26, 16))
    positions = jnp.broadcast_to(jnp.arange(26), (2, 26))
    full, _ = nnx.jit(lambda layer, x, positions: layer(x, positions))(layer, x, positions)
    rings = layer.init_cache(2, 26)
    assert rings["k"].shape == (2, 2, 4, 8) and rings["global_k"].shape == (2, 2, 4, 8)
    assert jax.tree.map(jnp.shape, layer.init_cache(2, 100_000)) == \
        jax.tree.map(jnp.shape, rings)
    everything = layer.init_cache(2, 7)  # window + max_global + 1 = 8 slots: no rings
    assert set(everything) == {"k", "v", "score"} and everything["k"].shape == (2, 7, 2, 8)
    decode = nnx.jit(lambda layer, x, positions, cache, index: layer(
        x, positions, cache=cache, cache_index=index))
    pieces = []
    for start, stop in [(0, 9), (9, 10), (10, 11), (11, 20), (20, 26)]:
        out, rings = decode(layer, x[:, start:stop], positions[:, start:stop], rings, start)
        pieces.append(out)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=2e-5, rtol=2e-5)
    pieces = []
    for start, stop in [(0, 6), (6, 7)]:
        out, everything = decode(layer, x[:, start:stop], positions[:, start:stop], everything,
                                 start)
        pieces.append(out)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full[:, :7], atol=2e-5, rtol=2e-5)


def test_bad_ring_decode_input_is_refused():
    from jaxsparse.ops.sga_rings import init_sga_rings, sga_ring_decode

    q, k, v, scores = inputs(jax.random.key(15), length=3)
    rings = init_sga_rings(2, 4, 2, 2, 8)
    decode = functools.partial(sga_ring_decode, q, k, v)
    with pytest.raises(ValueError, match=r"rings\['k'\] of shape \(2, 2, 5, 8\): expected "
                                         r"\(2, 2, 4, 8\) \(batch=2, window=4, max_global=2"):
        decode(scores, init_sga_rings(2, 5, 2, 2, 8), 0, window=4, max_global=2)
    with pytest.raises(ValueError, match="rings with keys .'k', 'score', 'v'.: expected the "
                                         "dict of init_sga_rings"):
        decode(scores, {n: rings[n] for n in ("k", "v", "score")}, 0, window=4, max_global=2)
    with pytest.raises(ValueError, match=r"score_new \(2, 2\): must be \[B, L\] = \(2, 3\)"):
        decode(scores[:, :2], rings, 0, window=4, max_global=2)
    with pytest.raises(ValueError, match="index=-1: must be >= 0"):
        decode(scores, rings, -1, window=4, max_global=2)
    with pytest.raises(ValueError, match="index of shape \\(2,\\)"):
        decode(scores, rings, jnp.zeros(2, jnp.int32), window=4, max_global=2)
    with pytest.raises(ValueError, match="max_global=-1: must be an integer >= 0"):
        decode(scores, rings, 0, window=4, max_global=-1)
    # integer rings truncated the keys written into them (errors of 1.6 against the full pass),
    # a bfloat16 score ring rounded the scores that rank the candidates
    for dtype in (jnp.int32, jnp.bool_):
        with pytest.raises(ValueError, match=f"dtype='{jnp.dtype(dtype).name}': a decode cache "
                                             "must have a floating-point dtype"):
            init_sga_rings(2, 4, 2, 2, 8, dtype)
    for name, dtype, allowed in (("global_v", jnp.int32, "a floating-point dtype"),
                                 ("score", jnp.bfloat16, "float32"),
                                 ("global_count", jnp.float32, "int32")):
        with pytest.raises(ValueError, match=rf"rings\['{name}'\] has dtype "
                                             rf"{jnp.dtype(dtype).name}: expected {allowed}"):
            decode(scores, {**rings, name: rings[name].astype(dtype)}, 0, window=4, max_global=2)
    with pytest.raises(ValueError, match="kv_heads=2.0: must be an integer >= 1"):
        init_sga_rings(2, 4, 2, 2.0, 8)


@pytest.mark.parametrize("impl", [None] + IMPLEMENTATIONS)
def test_an_empty_batch_gives_an_empty_result(impl):
    # blocked divided by the zero batch (ZeroDivisionError), dense took the min of nothing
    q, k, v, scores = inputs(jax.random.key(16), b=0, length=9)
    for dtype in (jnp.float32, jnp.bfloat16):
        out = sparse_global_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), scores,
                                      window=2, max_global=1, implementation=impl)
        assert out.shape == (0, 9, 2, 8) and out.dtype == dtype
    with pytest.raises(ValueError, match="window=0"):  # still checked
        sparse_global_attention(q, k, v, scores, window=0, max_global=1, implementation=impl)


@pytest.mark.parametrize("max_len", [26, 7])  # rings; a cache of every position
def test_the_layer_keeps_one_sequence_without_size_one_axes(max_len):
    """Batch 1 and one key/value head: the rings are kept without size-1 axes (XLA:CPU copied
    a cache with one several times a step; nn.cache_layout); both caches decode as before."""
    from flax import nnx

    from jaxsparse.nn.sga import SparseGlobalAttention
    layer = SparseGlobalAttention(16, 4, 1, 8, rngs=nnx.Rngs(2), window=4, max_global=3)
    x = jax.random.normal(jax.random.key(16), (1, 20, 16))
    positions = jnp.arange(20)[None]
    full, _ = nnx.jit(lambda layer, x, positions: layer(x, positions))(layer, x, positions)
    cache = layer.init_cache(1, max_len)
    if max_len > 7:  # the rings (a cache of every position, sequence first, stays 4-d)
        for name in ("k", "v", "global_k", "global_v"):
            assert 1 not in cache[name].shape, (name, cache[name].shape)  # (scores are small)
    else:
        assert cache["k"].shape == (1, 7, 1, 8)
    decode = nnx.jit(lambda layer, x, positions, cache, index: layer(
        x, positions, cache=cache, cache_index=index))
    pieces = []
    for start, stop in ([(0, 9), (9, 10), (10, 11), (11, 20)] if max_len > 7 else
                        [(0, 5), (5, 6), (6, 7)]):
        out, cache = decode(layer, x[:, start:stop], positions[:, start:stop], cache, start)
        pieces.append(out)
    got = jnp.concatenate(pieces, 1)
    np.testing.assert_allclose(got, full[:, :got.shape[1]], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("max_len", [12, 7])  # rings (4 + 2 + 1 < 12); a cache of every position
def test_the_layer_refuses_bad_caches_and_decode_inputs(max_len):
    """An integer cache truncated the rings' keys and values (decoding went 1.8 off); a bad
    index or a cache of another batch size failed inside dynamic_update_slice."""
    from flax import nnx

    from jaxsparse.nn.sga import SparseGlobalAttention
    layer = SparseGlobalAttention(16, 2, 1, 8, window=4, max_global=2, rngs=nnx.Rngs(0))
    for args, message in [((2, max_len, jnp.int32), "dtype='int32': a decode cache must have "
                                                    "a floating-point dtype"),
                          ((2, max_len, jnp.bool_), "dtype='bool'"),
                          ((0, max_len), "batch=0: must be an integer >= 1"),
                          ((2, 2.5), "max_len=2.5: must be an integer >= 1")]:
        with pytest.raises(ValueError, match=message):
            layer.init_cache(*args)
    x = jax.random.normal(jax.random.key(17), (2, 3, 16))
    positions = jnp.broadcast_to(jnp.arange(3), (2, 3))
    cache = layer.init_cache(2, max_len)
    layer(x, positions, cache=cache, cache_index=0)  # the valid baseline
    for index, message in [(1.0, r"cache_index: index of shape \(\) and dtype float32"),
                           (jnp.array([0, 0]), r"cache_index: index of shape \(2,\)"),
                           (None, "cache_index=None: decoding with a cache needs"),
                           (-1, "cache_index: index=-1: must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            layer(x, positions, cache=cache, cache_index=index)
    for batch in (1, 3):
        with pytest.raises(ValueError, match=rf"cache\['.*'\] of shape \({batch}, .*made for "
                                             r"another batch size than the input's 2"):
            layer(x, positions, cache=layer.init_cache(batch, max_len), cache_index=0)
    if max_len <= 7:  # a cache of every position: more new tokens than slots (rings have no end)
        long = jax.random.normal(jax.random.key(18), (2, max_len + 2, 16))
        # was a TypeError inside dynamic_update_slice
        with pytest.raises(ValueError, match=rf"index=0 with {max_len + 2} new tokens needs "
                                             rf"index \+ {max_len + 2} <= {max_len}"):
            layer(long, jnp.broadcast_to(jnp.arange(max_len + 2), (2, max_len + 2)),
                  cache=cache, cache_index=0)


def test_under_sequence_parallelism_the_layer_exchanges_its_rows_once_not_per_query_block():
    """fsdp2 × sequence2 × tensor2 (8 emulated devices), 1024 tokens in 8 query blocks: the
    layer trades each device's length slice for whole rows once each way (all-to-alls) and
    its gradients equal one device's. Left to the compiler, every query block's slice of the
    keys was an all-gather of the whole length — once per block and pass (a 3-block
    hydra_1p6b: 32 gathers of 2 GiB per block and pass), which a dry run counting loop bodies
    once had hidden."""
    from helpers import run_python

    code = """
import json, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P
from helpers import sharded_gradient_check
from jaxsparse.nn.sga import SparseGlobalAttention
from jaxsparse.parallel import PRESETS, activation_sharding
mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("fsdp", "sequence", "tensor"))
rules = PRESETS["fsdp_tp_sp"].rules
graphdef, state = nnx.split(SparseGlobalAttention(64, 4, 2, 16, window=16, max_global=16,
                                                  rngs=nnx.Rngs(0), implementation="blocked"))
params = nnx.to_pure_dict(state)
x = jax.random.normal(jax.random.key(1), (8, 1024, 64))
positions = jnp.broadcast_to(jnp.arange(1024), (8, 1024))

def loss(p, x, mesh=None):
    with activation_sharding(mesh, rules):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x, positions)[0]))

moved, err = sharded_gradient_check(loss, params, state, x, mesh, rules, P("fsdp", "sequence"))
print(json.dumps({"bytes": moved, "err": err, "x_bytes": x.size * 4}))
"""
    out = run_python(code, devices=8)
    assert out["err"] < 1e-5, out
    assert out["bytes"].get("all-to-all", 0) > 0, out  # the rows were traded, once each way
    # every exchange together: under 3x the input's bytes (q, k and v hold twice its features;
    # measured 2.5x) — the 8 blocks' gathers of the keys came to 6.5x
    assert sum(out["bytes"].values()) < 3 * out["x_bytes"], out
