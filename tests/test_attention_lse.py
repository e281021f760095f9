"""``dot_product_attention(..., return_lse=True)``: each row's log-sum-exp beside the output,
in every implementation (the dense reference, the block-skipping XLA path, the GPU and TPU
kernels in interpret mode), against a plain written-out reference, values and gradients of a
loss that reads both; and the kernels still lower for CUDA and TPU with it."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.ops.attention import dot_product_attention
from jaxsparse.ops.masks import CausalMask, LocalMask


def rand(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def written_out(q, k, v, allowed, cap):
    """softmax attention and log Σ exp over the allowed keys, from the definition (rows with
    no allowed key: output 0, log-sum-exp 0)."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    s = jnp.einsum("bshd,bthd->bhst", q, k, precision="highest") * q.shape[-1] ** -0.5
    s = cap * jnp.tanh(s / cap) if cap else s
    lse = jax.nn.logsumexp(jnp.where(allowed, s, -1e30), axis=-1)
    lse = jnp.where(jnp.any(allowed, axis=-1), lse, 0.0)
    p = jnp.where(allowed, jnp.exp(s - lse[..., None]), 0.0)
    return jnp.einsum("bhst,bthd->bshd", p, v, precision="highest"), jnp.moveaxis(lse, 1, 2)


# (mask, S, T, Hq, Hkv, D, segments, soft cap): rows with nothing to attend (offset -8 and
# S != T), GQA, odd sizes, packed documents, several tiles
CASES = [(CausalMask(-8), 37, 45, 4, 2, 16, False, 3.0),
         (LocalMask(9, 0), 70, 70, 2, 1, 8, True, None)]


def allowed_of(mask, S, T, segments):
    allowed = jnp.asarray(mask.to_dense(S, T))[None, None]
    if segments is not None:
        allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
    return allowed


@pytest.mark.parametrize("impl", ["xla", "xla_blocksparse", "pallas_interpret", "tpu_interpret"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_log_sum_exp_and_its_gradient_match_the_definition(impl, case):
    mask, S, T, Hq, Hkv, D, with_segments, cap = CASES[case]
    q, k, v = rand(1, 2, S, Hq, D), rand(2, 2, T, Hkv, D), rand(3, 2, T, Hkv, D)
    segments = (jnp.asarray(np.repeat([[0, 1, 2], [0, 0, 1]], [20, 25, S - 45], axis=1), jnp.int32)
                if with_segments else None)
    weights = rand(4, 2, S, Hq)

    if impl == "tpu_interpret":  # the Mosaic kernel, through the wrapper that pads for it
        from jaxsparse.ops.attention.pallas import _kernel_attention

        def ours(q, k, v):
            return _kernel_attention(q, k, v, mask, segments, segments, D**-0.5, cap, True,
                                     128, 128, "tpu")
    else:
        def ours(q, k, v):
            return dot_product_attention(q, k, v, mask=mask, segment_ids=segments,
                                         logits_soft_cap=cap, implementation=impl,
                                         return_lse=True)

    def reference(q, k, v):
        return written_out(q, k, v, allowed_of(mask, S, T, segments), cap)

    def loss(fn):  # reads the log-sum-exp too, so its cotangent reaches the backward pass
        def value(*args):
            out, lse = fn(*args)
            return jnp.sum(jnp.sin(out)) + jnp.sum(weights * jnp.cos(lse))
        return value

    (out, lse), (want_out, want_lse) = jax.jit(ours)(q, k, v), jax.jit(reference)(q, k, v)
    assert lse.shape == (2, S, Hq) and lse.dtype == jnp.float32
    np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=2e-5)
    empty = jnp.moveaxis(~jnp.any(allowed_of(mask, S, T, segments), -1), 1, 2)  # [B|1, S, H|1]
    assert bool(jnp.any(empty)) == (case == 0)  # the offset causal case has rows with no key
    assert not jnp.any(jnp.where(empty, lse, 0.0))
    grads = jax.jit(jax.grad(loss(ours), (0, 1, 2)))(q, k, v)
    wanted = jax.jit(jax.grad(loss(reference), (0, 1, 2)))(q, k, v)
    for name, g, want in zip("qkv", grads, wanted):
        np.testing.assert_allclose(g, want, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


def test_without_return_lse_the_result_is_the_output_alone():
    q = rand(1, 1, 9, 2, 8)
    for impl in ("xla", "xla_blocksparse", "pallas_interpret"):
        out = dot_product_attention(q, q, q, mask=CausalMask(), implementation=impl)
        assert isinstance(out, jax.Array) and out.shape == q.shape


def _custom_calls(fn, platform, args):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    pattern = r"custom_call @__gpu\$xla\.gpu\.triton" if platform == "cuda" else \
        r"custom_call @tpu_custom_call"
    return len(re.findall(pattern, text))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_with_log_sum_exp_lower_for_cuda_and_tpu(platform, tpu_lowering_target):
    q = jnp.zeros((2, 300, 4, 128), jnp.bfloat16)
    k = v = jnp.zeros((2, 300, 2, 128), jnp.bfloat16)

    def attend(q, k, v):
        return dot_product_attention(q, k, v, mask=LocalMask(63, 0), implementation="pallas",
                                     return_lse=True)

    def loss(q, k, v):
        out, lse = attend(q, k, v)
        return out.astype(jnp.float32).sum() + lse.sum()

    assert _custom_calls(attend, platform, (q, k, v)) == 1
    assert _custom_calls(jax.grad(loss, (0, 1, 2)), platform, (q, k, v)) == 3  # fwd, dQ, dK/dV


def test_attentions_over_disjoint_keys_merge_into_the_attention_over_all():
    """``merge_finished``: a causal attention split into its last 5 keys and the keys before
    (empty for the first 5 rows, flagged so) gives the causal attention, values and
    gradients; rows empty in every part stay zero."""
    from jaxsparse.ops.attention.online_softmax import merge_finished

    S = 23
    q, k, v = rand(5, 2, S, 2, 8), rand(6, 2, S, 2, 8), rand(7, 2, S, 2, 8)
    recent, older = LocalMask(4, 0), CausalMask(-5)
    older_seen = jnp.asarray(older.to_dense(S, S).any(-1))[None, :, None]  # [1, S, 1]

    def merged(q, k, v):
        parts = [dot_product_attention(q, k, v, mask=m, implementation="xla_blocksparse",
                                       return_lse=True) for m in (recent, older)]
        return merge_finished([(*parts[0], None), (*parts[1], older_seen)])

    def whole(q, k, v):
        return dot_product_attention(q, k, v, mask=CausalMask(), implementation="xla")

    assert not bool(older_seen.all())  # the first rows have no older key
    np.testing.assert_allclose(jax.jit(merged)(q, k, v), whole(q, k, v), atol=2e-5, rtol=2e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    got = jax.jit(jax.grad(loss(merged), (0, 1, 2)))(q, k, v)
    for g, want in zip(got, jax.jit(jax.grad(loss(whole), (0, 1, 2)))(q, k, v)):
        np.testing.assert_allclose(g, want, atol=1e-4, rtol=1e-4)
    nothing = jnp.zeros((2, S, 2), bool)
    zeros = merge_finished([(v, jnp.zeros((2, S, 2)), nothing), (v, jnp.ones((2, S, 2)), nothing)])
    assert not jnp.any(zeros)
