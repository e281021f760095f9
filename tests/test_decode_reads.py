"""Decoding from a cache of every position: the written part read block by block
(``ops.attention.decode_blocks``) against the dense read of every slot, ``full_cache_decode``,
and the attention layer's cache and mask handling around it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsparse.nn import Attention
from jaxsparse.ops.attention import decode_attention, dot_product_attention, full_cache_decode
from jaxsparse.ops.attention.decode import READ_WRITTEN_FROM_SLOTS, allowed_at
from jaxsparse.ops.attention.decode_blocks import written_blocks_attention
from jaxsparse.ops.masks import (BigBirdMask, BlockMask, CausalMask, FullMask, GlobalTokensMask,
                                 LocalMask, MultiHeadMask, StridedMask, made_causal)


def rand(key, *shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


# compiled: op by op the reference's dense attention took ~1-2 s per test
_dense_attention = jax.jit(dot_product_attention,
                           static_argnames=("mask", "logits_soft_cap", "implementation"))


def last_rows_of_full_attention(q, k_cache, v_cache, lengths, mask=None, cap=None):
    """Each sequence's new rows of full causal attention over its first ``length`` keys
    (``k_cache [B, Hkv, C, D]``), one sequence at a time: the reference."""
    new = q.shape[1]
    rows = []
    for b, length in enumerate(np.asarray(lengths)):
        keys, values = (c[b:b + 1, :, :length].swapaxes(1, 2) for c in (k_cache, v_cache))
        queries = jnp.zeros((1, length) + q.shape[2:]).at[:, length - new:].set(q[b:b + 1])
        full = mask & CausalMask() if mask is not None else CausalMask()
        rows.append(_dense_attention(queries, keys, values, mask=full, logits_soft_cap=cap,
                                     implementation="xla")[:, length - new:])
    return jnp.concatenate(rows)


@pytest.mark.parametrize("lengths", [(3, 9), (700, 1033), (1100, 1040), (2100, 2050)],
                         ids=["few", "under_half", "just_over_half", "full"])
@pytest.mark.parametrize("heads_first", [True, False], ids=["heads_first", "seq_first"])
def test_reading_the_written_part_equals_reading_every_slot(lengths, heads_first):
    """A cache of 2100 slots (not a whole number of 256-key blocks), GQA, three new tokens,
    per-sequence lengths on either side of half the cache: eager (the read chosen from the
    values), under jit (lax.cond), and each read forced, all equal full attention."""
    B, C, L, Hq, Hkv, D = 2, 2100, 3, 4, 2, 16
    assert C >= READ_WRITTEN_FROM_SLOTS
    q, k, v = rand(1, B, L, Hq, D), rand(2, B, Hkv, C, D), rand(3, B, Hkv, C, D)
    lengths = jnp.array(lengths)
    expected = last_rows_of_full_attention(q, k, v, lengths)
    layout = (lambda c: c) if heads_first else (lambda c: c.swapaxes(1, 2))

    def attend(lengths, written_only=None):
        return decode_attention(q, layout(k), layout(v), lengths, heads_first=heads_first,
                                written_only=written_only)

    for out in (attend(lengths), jax.jit(attend)(lengths), attend(lengths, True),
                attend(lengths, False)):
        np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mask", [None, LocalMask(5, 0), StridedMask(7),
                                  BigBirdMask(8, 1, 1, 1, seed=3),
                                  MultiHeadMask((LocalMask(3, 0), CausalMask(),
                                                 StridedMask(5), LocalMask(9, 0)))],
                         ids=["causal", "local", "strided", "bigbird", "per_head"])
def test_written_blocks_equal_full_attention_with_masks_soft_cap_and_odd_sizes(mask):
    """Blocks of 8 over a cache of 37 slots (the last block overlaps the one before), GQA,
    head dim 5, a soft cap, one sequence with nothing written past its third slot."""
    B, C, L, Hq, Hkv, D = 2, 37, 2, 4, 2, 5
    q, k, v = rand(4, B, L, Hq, D), rand(5, B, Hkv, C, D), rand(6, B, Hkv, C, D)
    lengths = jnp.array([3, 37])
    q_pos = lengths[:, None] - L + jnp.arange(L)[None, :]
    out = written_blocks_attention(
        q, k, v, q_pos, lambda q_pos, kv_pos: allowed_at(q_pos, kv_pos, mask, None, C),
        D**-0.5, 2.0, kv_heads_first=True, block=8)
    np.testing.assert_allclose(out, last_rows_of_full_attention(q, k, v, lengths, mask, 2.0),
                               atol=2e-5, rtol=2e-5)


def test_a_cache_shorter_than_a_block_can_be_read_written_only():
    q, k, v = rand(15, 1, 1, 2, 8), rand(16, 1, 2, 6, 8), rand(17, 1, 2, 6, 8)
    lengths = jnp.array([4])
    np.testing.assert_allclose(
        decode_attention(q, k, v, lengths, heads_first=True, written_only=True),
        last_rows_of_full_attention(q, k, v, lengths), atol=2e-5, rtol=2e-5)


def test_gradients_flow_through_the_written_read_under_jit():
    """The block loop is a scan that skips unwritten blocks, not a loop with a traced trip
    count: reverse mode works, and agrees with the dense read's gradient."""
    B, C, Hq, Hkv, D = 1, 2048, 2, 1, 8
    q, k, v = rand(7, B, 1, Hq, D), rand(8, B, Hkv, C, D), rand(9, B, Hkv, C, D)

    def loss(q, k, lengths, written_only):
        out = decode_attention(q, k, v, lengths, heads_first=True, written_only=written_only)
        return jnp.sum(jnp.sin(out))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=3)
    lengths = jnp.array([300])
    written, every = grad(q, k, lengths, None), grad(q, k, lengths, False)
    for a, b in zip(written, every):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(written[1][:, :, 300:])).max() == 0  # unwritten slots: no gradient


@pytest.mark.parametrize("prompt_chunk", [None, 4], ids=["whole_prompts", "prompt_chunks"])
def test_full_cache_decode_writes_and_attends(prompt_chunk, monkeypatch):
    """A prompt of 5 then single tokens through ``full_cache_decode`` equal full attention;
    the cache holds each key in its position's slot. With prompts read 4 queries at a time
    (``PROMPT_CHUNK``, 256 by default; under a strided mask): prompts of 9 (two runs of 4 and
    one query), 8 (two runs) and 4 (one, read whole), single tokens between."""
    import jaxsparse.ops.attention.decode as decode

    B, T, C, Hq, Hkv, D = 2, 23, 24, 4, 2, 8
    pieces, mask = [(0, 5), (5, 6), (6, 7), (7, 9)], None
    if prompt_chunk:
        monkeypatch.setattr(decode, "PROMPT_CHUNK", prompt_chunk)
        pieces, mask = [(0, 9), (9, 10), (10, 18), (18, 19), (19, 23)], StridedMask(3)
    T = pieces[-1][1]
    q, k, v = rand(10, B, T, Hq, D), rand(11, B, T, Hkv, D), rand(12, B, T, Hkv, D)
    full = dot_product_attention(q, k, v, mask=CausalMask() if mask is None
                                 else mask & CausalMask(), implementation="xla")
    k_cache = v_cache = jnp.zeros((B, Hkv, C, D))
    # a function of its own: a jit of full_cache_decode itself would reuse the other
    # variant's compilations, traced with the other PROMPT_CHUNK
    step = jax.jit(lambda *args: full_cache_decode(*args, mask=mask))
    outs = []
    for start, stop in pieces:
        out, k_cache, v_cache = step(q[:, start:stop], k[:, start:stop], v[:, start:stop],
                                     k_cache, v_cache, jnp.int32(start))
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(k_cache[:, :, :T], k.swapaxes(1, 2))


def test_bad_full_cache_and_written_only_arguments_are_named():
    q, k, cache = rand(0, 2, 3, 4, 8), rand(1, 2, 3, 2, 8), jnp.zeros((2, 2, 6, 8))
    # (named as passed: the message spoke of lengths=[7, 7], which the caller never gave)
    with pytest.raises(ValueError, match=r"index=4 with 3 new tokens needs index \+ 3 <= 6"):
        full_cache_decode(q, k, k, cache, cache, 4)
    with pytest.raises(ValueError, match="index=-1: must be >= 0"):
        full_cache_decode(q, k, k, cache, cache, -1)
    with pytest.raises(ValueError, match=r"k_cache\(2, 2, 6, 4\) and v_cache"):
        full_cache_decode(q, k, k, jnp.zeros((2, 2, 6, 4)), cache, 0)
    for bad in ("yes", 1):
        with pytest.raises(ValueError, match=f"written_only={bad!r}: must be None"):
            decode_attention(q, cache, cache, 3, heads_first=True, written_only=bad)
    with pytest.raises(ValueError, match="written_only=True: .* not a ring buffer"):
        decode_attention(q, cache, cache, 3, heads_first=True, window=4, written_only=True)


@pytest.mark.parametrize("written_only", [None, True, False])
def test_traced_positions_past_a_full_cache_give_nan_not_silent_reads(written_only):
    """Under jit the index cannot be refused: the keys of positions past the cache were written
    clamped over its last slots and read silently; the rows outside the cache are NaN now, the
    others unchanged. The same for SGA's and routing's caches of every position."""
    from jaxsparse.ops.routing import causal_routing_decode
    from jaxsparse.ops.sga import sga_decode

    q, k, cache = rand(0, 2, 3, 4, 8), rand(1, 2, 3, 2, 8), rand(2, 2, 2, 6, 8)
    step = jax.jit(lambda i: full_cache_decode(q, k, k, cache, cache, i)[0])
    assert np.isfinite(step(3)).all() and np.isnan(step(4)).all()
    read = jax.jit(lambda lengths: decode_attention(q, cache, cache, lengths, heads_first=True,
                                                    written_only=written_only))
    out, inside = read(jnp.array([7, 6])), read(jnp.array([6, 6]))
    assert np.isnan(out[0]).all() and not np.isnan(inside).any()
    np.testing.assert_array_equal(out[1], inside[1])
    seq_first = cache.swapaxes(1, 2)  # [B, S, Hkv, D]
    sga = jax.jit(lambda lengths: sga_decode(q, seq_first, seq_first, rand(3, 2, 6), lengths,
                                             window=2, max_global=2))
    assert np.isnan(sga(jnp.array([3, 7]))[1]).all() and np.isfinite(sga(jnp.array([3, 6]))).all()
    heads4 = rand(4, 2, 6, 4, 8)
    routing = jax.jit(lambda lengths: causal_routing_decode(
        q, heads4, heads4, jnp.zeros((2, 6, 4), jnp.int32), lengths, rand(5, 4, 2, 8), window=3))
    assert np.isnan(routing(jnp.array([2, 6]))[0]).all()  # fewer than the 3 new tokens
    assert np.isfinite(routing(jnp.array([3, 6]))).all()


@pytest.mark.parametrize("cache_batch", [1, 3, 4])
def test_a_cache_made_for_another_batch_size_is_refused(cache_batch):
    """Reshaped by its size, a batch-4 cache would have read as 2 sequences of 32 slots."""
    layer = Attention(16, 2, 2, 8, rngs=nnx.Rngs(0))
    x, positions = rand(13, 2, 1, 16), jnp.zeros((2, 1), jnp.int32)
    layer(x, positions, cache=layer.init_cache(2, 16), cache_index=0)  # the right batch works
    with pytest.raises(ValueError, match=r"cache\['k'\] of shape .*: expected \[2, 2, slots, 8\]"
                       r".*another batch size"):
        layer(x, positions, cache=layer.init_cache(cache_batch, 16), cache_index=0)
    # a cache missing a part (or not a dict) was a bare KeyError 'v'
    good = layer.init_cache(2, 16)
    for bad, found in (({"k": good["k"]}, r"\['k'\]"), (good["k"], "ArrayImpl")):
        with pytest.raises(ValueError, match=r"cache: expected the dict init_cache gives, with "
                                             r"\['k', 'v'\]; got " + found):
            layer(x, positions, cache=bad, cache_index=0)


@pytest.mark.parametrize("mask", [None, FullMask(), LocalMask(2, 2), "local:3"],
                         ids=["none", "full", "two_sided_window", "spec"])
def test_the_attention_layer_is_causal_whatever_its_mask(mask):
    """A mask that reads ahead is applied on top of causality, as decoding applies it: later
    tokens never change earlier outputs, and decoding token by token equals the full pass."""
    layer = Attention(16, 2, 1, 8, rngs=nnx.Rngs(0), mask=mask)
    x, positions = rand(14, 1, 12, 16), jnp.arange(12)[None]
    # compiled: op by op the full passes and the 12 decoding steps took ~2.5 s
    forward = nnx.jit(lambda layer, x: layer(x, positions))
    step = nnx.jit(lambda layer, x, positions, cache, i: layer(x, positions, cache=cache,
                                                               cache_index=i))
    y, _ = forward(layer, x)
    changed, _ = forward(layer, x.at[:, 6:].set(0.0))
    np.testing.assert_array_equal(y[:, :6], changed[:, :6])
    cache, outs = layer.init_cache(1, 12), []
    for i in range(12):
        out, cache = step(layer, x[:, i:i + 1], positions[:, i:i + 1], cache, i)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask", [LocalMask(255, 0) | StridedMask(256), StridedMask(300),
                                  GlobalTokensMask((300,)) | LocalMask(31, 0)],
                         ids=["sparse_transformer_stride_256", "stride_300", "global_at_300"])
def test_a_mask_that_reads_ahead_only_far_away_is_made_causal(mask):
    """Whether a mask reads ahead was decided from a 256-position rendering, so these passed
    unchanged and a decoder layer read the future (position 43 changed with token 299). It is
    decided from the parameters now; causal masks are still kept as they are."""
    causal = made_causal(mask)
    dense, wanted = causal.to_dense(640, 640), mask.to_dense(640, 640)
    assert np.triu(wanted, 1).any() and not np.triu(dense, 1).any()
    np.testing.assert_array_equal(np.tril(dense), np.tril(wanted))
    for kept in (CausalMask(), LocalMask(7, 0), CausalMask() & StridedMask(300),
                 MultiHeadMask((LocalMask(3, 0), CausalMask()))):
        assert made_causal(kept) is kept


def test_the_attention_layer_does_not_read_far_ahead_with_a_stride_of_256():
    layer = Attention(16, 2, 1, 8, rngs=nnx.Rngs(0), mask=LocalMask(255, 0) | StridedMask(256))
    x, positions = rand(15, 1, 300, 16), jnp.arange(300)[None]
    forward = nnx.jit(lambda layer, x: layer(x, positions)[0])
    y, changed = forward(layer, x), forward(layer, x.at[:, 299].set(0.0))
    np.testing.assert_array_equal(y[:, :299], changed[:, :299])


def test_decoding_refuses_what_its_cache_cannot_serve():
    """Each was a silent wrong answer or a misnamed error: several queries against a ring
    buffer that no longer holds the keys the earlier ones read (errors of 0.6 and 0.5 for
    the first two of three); an explicit layout smaller than the cache (clipped to its last
    block); a length-dependent mask over a ring."""
    q, cache = rand(20, 1, 3, 2, 8), rand(21, 1, 8, 1, 8)
    with pytest.raises(ValueError, match=r"window=8 with 3 new queries needs window \+ 3 - 1 "
                                         r"<= slots=8"):
        decode_attention(q, cache, cache, 20, window=8)
    assert decode_attention(q, cache, cache, 20, window=6).shape == q.shape  # 6 + 2 fits
    eight_positions = BlockMask(np.tril(np.ones((2, 2), bool)), block_size=(4, 4))
    long_cache = rand(22, 1, 16, 1, 8)
    with pytest.raises(ValueError, match=r"covers at most \(8, 8\); cannot serve "
                                         r"\(q_len, kv_len\)=\(16, 16\)"):
        decode_attention(q[:, :1], long_cache, long_cache, 12, mask=eight_positions)
    with pytest.raises(ValueError, match="depends on the sequence length; a ring buffer"):
        decode_attention(q[:, :1], cache, cache, 20, mask=BigBirdMask(2), window=8)


def test_a_mask_of_the_wrong_type_is_named():
    with pytest.raises(TypeError, match="mask=5: expected a Mask, a mask spec string"):
        Attention(16, 2, 1, 8, rngs=nnx.Rngs(0), mask=5)


def test_attention_cache_requests_are_checked():
    layer = Attention(16, 2, 2, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dtype='int32': a decode cache must have a floating"):
        layer.init_cache(2, 16, jnp.int32)
    with pytest.raises(ValueError, match="max_len=0: must be an integer >= 1"):
        layer.init_cache(2, 0)
