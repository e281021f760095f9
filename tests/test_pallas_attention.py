"""The block-sparse flash kernels (GPU/Triton and TPU/Mosaic): interpret mode against the
dense reference (forward and gradients), and lowering of all three kernels of each (forward,
dQ, dK/dV) for CUDA and for TPU from this CPU host."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import forward_and_vjp
from jaxsparse.ops.attention import dot_product_attention
from jaxsparse.ops.masks import (BigBirdMask, CausalMask, ChunkedCausalMask, FixedMask,
                                 GlobalTokensMask, LocalMask, MultiHeadMask, StridedMask)


def rand(seed, *shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


CASES = [
    # mask, S, T, Hq, Hkv, D, segments, soft cap
    (CausalMask(), 1, 1, 8, 8, 32, False, None),
    (CausalMask(), 129, 129, 8, 2, 64, True, None),
    (LocalMask(20, 0) & CausalMask(), 130, 130, 4, 1, 96, False, 30.0),
    (CausalMask(offset=50), 7, 57, 4, 2, 192, False, None),
    ((CausalMask() & StridedMask(5)) | (GlobalTokensMask(3) & CausalMask()), 100, 100, 2, 2, 32,
     False, None),
    (MultiHeadMask((ChunkedCausalMask(16), FixedMask(16, 4) & CausalMask(),
                    CausalMask(offset=-80), LocalMask(8, 8))), 100, 100, 4, 2, 32, True, None),
]


@pytest.mark.parametrize("mask, S, T, Hq, Hkv, D, segments, cap", CASES,
                         ids=[f"case{i}" for i in range(len(CASES))])
def test_interpret_kernel_matches_reference(mask, S, T, Hq, Hkv, D, segments, cap):
    q, k, v = rand(1, 2, S, Hq, D), rand(2, 2, T, Hkv, D), rand(3, 2, T, Hkv, D)
    seg = None
    if segments:
        seg = jnp.concatenate([jnp.zeros((2, S // 2), jnp.int32), jnp.ones((2, S - S // 2), jnp.int32)], 1)
    cotangent = rand(4, 2, S, Hq, D)

    def run(impl):
        f = lambda q, k, v: dot_product_attention(q, k, v, mask=mask, segment_ids=seg,  # noqa: E731
                                                  logits_soft_cap=cap, implementation=impl)
        return forward_and_vjp(f, (q, k, v), cotangent)

    ref, ref_grads = run("xla")
    out, grads = run("pallas_interpret")
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    for name, g, g_ref in zip("qkv", grads, ref_grads):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


def _triton_calls(fn, *args):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text))


@pytest.mark.parametrize("mask", [CausalMask(), LocalMask(127, 0) & CausalMask(),
                                  MultiHeadMask((CausalMask(), LocalMask(31, 0)) * 2),
                                  BigBirdMask(64, 3, 1, 2)],
                         ids=["causal", "window", "per-head", "bigbird"])
def test_kernels_lower_for_cuda_from_a_cpu_host(mask):
    q = jnp.zeros((2, 300, 4, 80), jnp.bfloat16)
    k = v = jnp.zeros((2, 300, 2, 80), jnp.bfloat16)
    seg = jnp.zeros((2, 300), jnp.int32)
    f = lambda q, k, v: dot_product_attention(q, k, v, mask=mask, segment_ids=seg,  # noqa: E731
                                              logits_soft_cap=50.0, implementation="pallas")
    heads_calls = mask.num_heads or 1
    assert _triton_calls(f, q, k, v) == heads_calls  # forward kernel
    loss = lambda q, k, v: f(q, k, v).astype(jnp.float32).sum()  # noqa: E731
    # forward (saving lse) + dQ + dK/dV
    assert _triton_calls(jax.grad(loss, argnums=(0, 1, 2)), q, k, v) == 3 * heads_calls


TPU_CASES = [
    (CausalMask(), 37, 37, 2, 1, 16, False, None),
    (LocalMask(150, 0) & CausalMask(), 300, 300, 4, 2, 80, True, 10.0),
    (MultiHeadMask((CausalMask() & StridedMask(3), ChunkedCausalMask(100))), 260, 260, 2, 2, 32,
     False, None),
]


@pytest.mark.parametrize("mask, S, T, Hq, Hkv, D, segments, cap", TPU_CASES,
                         ids=[f"case{i}" for i in range(len(TPU_CASES))])
def test_tpu_kernel_in_interpret_mode_matches_reference(mask, S, T, Hq, Hkv, D, segments, cap):
    from jaxsparse.ops.attention.pallas import _kernel_attention

    q, k, v = rand(1, 1, S, Hq, D), rand(2, 1, T, Hkv, D), rand(3, 1, T, Hkv, D)
    seg = (jnp.concatenate([jnp.zeros((1, S // 2), jnp.int32), jnp.ones((1, S - S // 2), jnp.int32)], 1)
           if segments else None)
    cotangent = rand(4, 1, S, Hq, D)
    ref = lambda q, k, v: dot_product_attention(q, k, v, mask=mask, segment_ids=seg,  # noqa: E731
                                                logits_soft_cap=cap, implementation="xla")
    tpu = lambda q, k, v: _kernel_attention(q, k, v, mask, seg, seg, D**-0.5, cap,  # noqa: E731
                                            True, 128, 128, "tpu")[0]
    (out, grads), (ref_out, ref_grads) = (forward_and_vjp(tpu, (q, k, v), cotangent),
                                          forward_and_vjp(ref, (q, k, v), cotangent))
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    for name, g, g_ref in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("mask", [CausalMask(), LocalMask(127, 0) & CausalMask(),
                                  CausalMask() & StridedMask(3), BigBirdMask(64, 3, 1, 2)],
                         ids=["causal", "window", "strided", "bigbird"])
def test_kernels_lower_for_tpu_from_a_cpu_host(mask, tpu_lowering_target):
    q = jnp.zeros((2, 300, 4, 80), jnp.bfloat16)
    k = v = jnp.zeros((2, 300, 2, 80), jnp.bfloat16)
    seg = jnp.zeros((2, 300), jnp.int32)
    f = lambda q, k, v: dot_product_attention(q, k, v, mask=mask, segment_ids=seg,  # noqa: E731
                                              logits_soft_cap=50.0, implementation="pallas")

    def mosaic_calls(fn):
        text = jax.jit(fn).trace(q, k, v).lower(lowering_platforms=("tpu",)).as_text()
        return len(re.findall(r"custom_call @tpu_custom_call", text))

    assert mosaic_calls(f) == 1
    loss = lambda q, k, v: f(q, k, v).astype(jnp.float32).sum()  # noqa: E731
    assert mosaic_calls(jax.grad(loss, argnums=(0, 1, 2))) == 3  # forward + dQ + dK/dV


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("mask", [BigBirdMask(16, 3, 1, 2, seed=1),
                                  CausalMask() & BigBirdMask(24, 3, 1, 1, seed=2, causal=True),
                                  GlobalTokensMask((1, 40)) | LocalMask(5, 5)],
                         ids=["bigbird", "causal-bigbird", "global-indices"])
def test_layout_masks_ship_their_partial_tiles(mask, backend):
    """Masks without a closed form reach the kernels as deduplicated partial-tile blocks."""
    from jaxsparse.ops.attention.pallas import _kernel_attention, closed_form, partial_tiles

    assert not closed_form(mask)
    S, D = 150, 16
    q, k, v = rand(1, 1, S, 2, D), rand(2, 1, S, 1, D), rand(3, 1, S, 1, D)
    ref = lambda q, k, v: dot_product_attention(q, k, v, mask=mask, implementation="xla")  # noqa: E731
    kernel = lambda q, k, v: _kernel_attention(q, k, v, mask, None, None, D**-0.5, None,  # noqa: E731
                                               True, 64, 64, backend)[0]
    cotangent = rand(4, 1, S, 2, D)
    (out, grads), (ref_out, ref_grads) = (forward_and_vjp(kernel, (q, k, v), cotangent),
                                          forward_and_vjp(ref, (q, k, v), cotangent))
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    for g, g_ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-4)
    blocks, kv_partial, _ = partial_tiles(mask, S, S, 64, 64)
    assert blocks.shape[1:] == (64, 64) and kv_partial.min() >= -1


def test_partial_tiles_are_deduplicated():
    from jaxsparse.ops.attention.pallas import partial_tiles

    mask = CausalMask() & BigBirdMask(128, 3, 1, 1, seed=0, causal=True)
    blocks, kv_partial, q_partial = partial_tiles(mask, 4096, 4096, 128, 128)
    assert blocks.shape[0] == 1  # every diagonal tile is the same lower triangle
    assert (blocks[0] == np.tril(np.ones((128, 128), np.int32))).all()
    table = mask.block_table(4096, 4096, 128, 128)
    listed = np.arange(kv_partial.shape[1])[None, :] < table.kv_counts[0][:, None]
    assert ((kv_partial == 0) & listed).sum() == 4096 // 128  # the 32 diagonal tiles


def test_kernel_refuses_array_masks():
    q = k = v = rand(0, 1, 64, 2, 16)
    with pytest.raises(ValueError, match="needs a lazy Mask"):
        dot_product_attention(q, k, v, mask=jnp.ones((64, 64), bool), implementation="pallas")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (run experiments/gpu_check.sh on one)")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_on_gpu_matches_reference(dtype):
    mask = LocalMask(255, 0) & CausalMask()
    q, k, v = (rand(i, 2, 1000, 8, 128, dtype=dtype) for i in (10, 11, 12))
    k, v = k[:, :, :2], v[:, :, :2]
    cotangent = rand(13, 2, 1000, 8, 128, dtype=dtype)

    def run(impl):
        f = lambda q, k, v: dot_product_attention(q, k, v, mask=mask, implementation=impl)  # noqa: E731
        out, vjp = jax.vjp(f, q, k, v)
        return out.astype(jnp.float32), [g.astype(jnp.float32) for g in vjp(cotangent)]

    ref, ref_grads = run("xla")
    out, grads = run("pallas")
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-4
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)
    for g, g_ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, g_ref, atol=4 * tol, rtol=4 * tol)
