"""Inputs at the edges of the kernel paths: dtypes the Monarch kernel must not truncate,
zero-sized axes on the Pallas paths, and operands the raw kernels of ``pallas_kernels`` cannot
take (not padded to whole blocks), which must raise instead of returning NaN or garbage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.ops.attention import dot_product_attention
from jaxsparse.ops.diagonal_ssm import linear_scan
from jaxsparse.ops.linear_scan_pallas import kernel_linear_scan
from jaxsparse.ops.masks import FullMask
from jaxsparse.ops.monarch import monarch_matmul
from jaxsparse.ops.ssm import selective_scan


def rand(seed, *shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


# --- 1. Monarch dtypes --------------------------------------------------------------------


def _factors():
    return rand(1, 2, 16, 16) * 0.25, rand(2, 2, 16, 16) * 0.25  # n = m = 32, GPU-kernel sizes


@pytest.mark.parametrize("implementation", [None, "xla", "native", "pallas", "pallas_interpret"])
def test_monarch_rejects_integer_operands(implementation):
    w1, w2 = _factors()
    x_int = jnp.arange(5 * 32).reshape(5, 32) % 7
    with pytest.raises(ValueError, match=r"x has dtype int32.*floating"):
        monarch_matmul(x_int, w1, w2, implementation=implementation)
    with pytest.raises(ValueError, match=r"w2 has dtype int32.*floating"):
        monarch_matmul(rand(3, 5, 32), w1, w2.astype(jnp.int32), implementation=implementation)


@pytest.mark.parametrize("implementation", [None, "xla", "native", "pallas", "pallas_interpret"])
def test_monarch_computes_in_the_result_type_of_all_operands(implementation):
    w1, w2 = _factors()
    x = rand(3, 5, 32, dtype=jnp.bfloat16)
    want = monarch_matmul(x.astype(jnp.float32), w1, w2, implementation="xla")
    got = monarch_matmul(x, w1, w2, implementation=implementation)
    assert got.dtype == jnp.float32  # result_type(bfloat16, float32), not x's dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # float32 x with bfloat16 weights: float32 too (the weights' values, cast up)
    got = monarch_matmul(x.astype(jnp.float32), w1.astype(jnp.bfloat16), w2,
                         implementation=implementation)
    assert got.dtype == jnp.float32


def test_monarch_kernel_gradient_of_mixed_dtypes():
    w1, w2 = _factors()
    x = rand(3, 5, 32, dtype=jnp.bfloat16)
    ct = rand(4, 5, 32)

    def grads(implementation):
        f = lambda x, a, b: (monarch_matmul(x, a, b, implementation=implementation) * ct).sum()  # noqa: E731
        return jax.grad(f, argnums=(0, 1, 2))(x, w1, w2)

    for got, want in zip(grads("pallas_interpret"), grads("xla")):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32),
                                   rtol=1e-5, atol=1e-5)


# --- 2. zero-sized axes on the kernel paths ------------------------------------------------


@pytest.mark.parametrize("shape_q, shape_kv", [((0, 5, 2, 8), (0, 5, 2, 8)),   # batch 0
                                               ((1, 5, 0, 8), (1, 5, 1, 8))])  # no q heads
def test_attention_kernel_paths_take_empty_batches_and_heads(shape_q, shape_kv):
    q, k, v = jnp.ones(shape_q), jnp.ones(shape_kv), jnp.ones(shape_kv)
    for implementation in ("pallas_interpret", "pallas"):
        out, lse = dot_product_attention(q, k, v, mask="causal", implementation=implementation,
                                         return_lse=True)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32

        def loss(q, k, v, implementation=implementation):
            out, lse = dot_product_attention(q, k, v, mask="causal", return_lse=True,
                                             implementation=implementation)
            return out.sum() + lse.sum()

        grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        for g, a in zip(grads, (q, k, v)):
            assert g.shape == a.shape
            np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("shape", [(0, 5, 4), (2, 5, 0)])
def test_linear_scan_kernel_paths_take_empty_batches_and_widths(shape):
    a, b = jnp.full(shape, 0.5), jnp.ones(shape)
    h0 = jnp.ones((shape[0], shape[2]))
    for implementation in ("pallas_interpret", "pallas"):
        hs, final = linear_scan(a, b, h0, implementation=implementation)
        assert hs.shape == shape and final.shape == h0.shape
        g = jax.grad(lambda h0, i=implementation: linear_scan(a, b, h0, implementation=i)[1].sum())(h0)
        assert g.shape == h0.shape
    for backend in ("gpu", "tpu"):
        hs, final = kernel_linear_scan(a, b, h0, backend=backend, interpret=True)
        assert hs.shape == shape and final.shape == h0.shape


def test_selective_scan_kernel_path_takes_no_channels():
    x = jnp.ones((2, 5, 0))
    A, B, C = -jnp.ones((0, 4)), rand(1, 2, 5, 1, 4), rand(2, 2, 5, 1, 4)
    h0 = jnp.ones((2, 0, 4))
    for implementation in ("pallas_interpret", "pallas"):
        y, final = selective_scan(x, x, A, B, C, initial_state=h0, return_final_state=True,
                                  implementation=implementation)
        assert y.shape == x.shape and final.shape == h0.shape
        grads = jax.grad(lambda B, C, i=implementation: selective_scan(
            x, x, A, B, C, initial_state=h0, implementation=i).sum(), argnums=(0, 1))(B, C)
        for g in grads:
            np.testing.assert_array_equal(g, 0.0)


# --- 3. the raw kernels check their operands -----------------------------------------------


def _attention_args(S=40, T=40, Hq=1, Hkv=1, D=16, block=16):
    q = rand(1, 1, Hq, S, D)
    k, v = rand(2, 1, Hkv, T, D), rand(3, 1, Hkv, T, D)
    table = FullMask().block_table(S, T, block, block)
    tables = (table.kv_indices[0], table.kv_counts[0], table.q_indices[0], table.q_counts[0])
    return (q, k, v) + tables


def _gpu_attention(*args, **kw):
    from pallas_kernels.block_sparse_attention import block_sparse_attention

    opts = dict(kv_len=args[1].shape[2], block_q=16, block_kv=16, scale=0.25, interpret=True)
    return block_sparse_attention(*args, **(opts | kw))


def test_gpu_attention_kernel_rejects_unpadded_operands():
    # S = T = 40 with blocks of 16: the kernel used to return NaN rows past row 32
    with pytest.raises(ValueError, match=r"q.shape\[2\]=40 must be a multiple of block_q=16"):
        _gpu_attention(*_attention_args())
    args = _attention_args(S=48, T=40)
    with pytest.raises(ValueError, match=r"k.shape\[2\]=40 must be a multiple of block_kv=16"):
        _gpu_attention(*args, kv_len=40)
    q, k, v, *tables = _attention_args(S=48, T=48)
    with pytest.raises(ValueError, match=r"kv_len=49 must be an integer in \[0, k.shape\[2\]=48\]"):
        _gpu_attention(q, k, v, *tables, kv_len=49)
    small = _attention_args(S=32, T=48)[3:]  # a table made for another length
    with pytest.raises(ValueError, match=r"kv_indices.shape=\(2, 3\) must have S/block_q=48/16=3"):
        _gpu_attention(q, k, v, *small)
    q3, k2, v2, *tables = _attention_args(S=48, T=48, Hq=3, Hkv=2)
    with pytest.raises(ValueError, match=r"Hq=3 must be a multiple of k/v heads Hkv=2"):
        _gpu_attention(q3, k2, v2, *tables)
    q, k, v, *tables = _attention_args(S=48, T=48, D=24)
    with pytest.raises(ValueError, match=r"head_dim \(q.shape\[3\]\)=24 must be a power of two"):
        _gpu_attention(q, k, v, *tables)
    q, k, v, *tables = _attention_args(S=48, T=48)
    with pytest.raises(ValueError, match=r"q_segment_ids.shape=\(1, 40\) must be \(1, 48\)"):
        _gpu_attention(q, k, v, *tables, q_segment_ids=jnp.zeros((1, 40), jnp.int32),
                       kv_segment_ids=jnp.zeros((1, 48), jnp.int32))
    # padded operands pass, and agree with the reference on every row
    q, k, v, *tables = _attention_args(S=48, T=48)
    out = _gpu_attention(q, k, v, *tables, kv_len=48)
    t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    want = t(jax.nn.dot_product_attention(t(q), t(k), t(v), scale=0.25))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_tpu_attention_kernel_rejects_unpadded_operands():
    from pallas_kernels.block_sparse_attention_tpu import block_sparse_attention_tpu

    q, k, v, *tables = _attention_args(S=200, T=256, D=128, block=128)
    with pytest.raises(ValueError, match=r"q.shape\[2\]=200 must be a multiple of block_q=128"):
        block_sparse_attention_tpu(q, k, v, *tables, kv_len=256, block_q=128, block_kv=128,
                                   scale=0.1, interpret=True)


def test_grouped_matmul_kernels_reject_unpadded_operands():
    from pallas_kernels.grouped_matmul import gmm, gmm_config

    lhs, rhs, sizes = rand(0, 40, 32), rand(1, 2, 32, 64), jnp.array([20, 20], jnp.int32)
    cfg = gmm_config(backend="gpu", interpret=True, tm=16, tk=32, tn=64)
    with pytest.raises(ValueError, match=r"lhs.shape\[0\] \(m\)=40 must be a multiple of tm=16"):
        gmm(lhs, rhs, sizes, cfg)  # rows 32..39 used to come back NaN
    with pytest.raises(ValueError, match=r"rhs.shape\[2\] \(n\)=48 must be a multiple of tn=64"):
        gmm(lhs[:32], rhs[:, :, :48], sizes, cfg)
    with pytest.raises(ValueError, match=r"group_sizes.shape=\(3,\) must be \[E\]=\[2\]"):
        gmm(lhs[:32], rhs, jnp.array([10, 10, 12]), cfg)
    with pytest.raises(ValueError, match=r"tm=24 must be a power of two >= 16"):
        gmm_config(backend="gpu", interpret=True, tm=24, tk=32, tn=64)
    with pytest.raises(ValueError, match=r"tm % 8 == 0 and tk, tn multiples of 128"):
        gmm_config(backend="tpu", interpret=True, tm=128, tk=64, tn=128)
    with pytest.raises(ValueError, match=r"backend='cuda' must be one of"):
        gmm_config(backend="cuda", interpret=True, tm=16, tk=32, tn=64)
    out = gmm(lhs[:32], rhs, jnp.array([20, 12], jnp.int32), cfg)
    want = jnp.concatenate([lhs[:20] @ rhs[0], lhs[20:32] @ rhs[1]])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)


def test_linear_scan_kernel_rejects_unpadded_operands():
    from pallas_kernels.linear_scan import linear_scan_config, scan

    cfg = linear_scan_config(backend="gpu", interpret=True, block_t=16, block_d=4)
    a, b, h0 = jnp.full((1, 10, 4), 0.5), jnp.ones((1, 10, 4)), jnp.zeros((1, 1, 4))
    with pytest.raises(ValueError, match=r"a.shape\[1\] \(L\)=10 must be a multiple of block_t=16"):
        scan(a, b, h0, cfg)
    with pytest.raises(ValueError, match=r"h0.shape=\(1, 4\) must be \(1, 1, 4\)"):
        scan(a[:, :0], b[:, :0], h0[:, 0], cfg)
    with pytest.raises(ValueError, match=r"block_t=0 must be an integer >= 1"):
        linear_scan_config(backend="gpu", interpret=True, block_t=0, block_d=4)
    with pytest.raises(ValueError, match=r"block_d=24 must be a power of two"):
        linear_scan_config(backend="gpu", interpret=True, block_t=16, block_d=24)
    with pytest.raises(ValueError, match=r"backend='cuda' must be one of"):
        kernel_linear_scan(a, b, h0[:, 0], backend="cuda", interpret=True)
    with pytest.raises(ValueError, match=r"block_t=-8 must be an integer >= 1"):
        kernel_linear_scan(a, b, h0[:, 0], backend="gpu", interpret=True, block_t=-8)
    with pytest.raises(ValueError, match=r"block_t=0 must be an integer >= 1"):
        kernel_linear_scan(a, b, h0[:, 0], backend="gpu", interpret=True, block_t=0)


def test_selective_scan_kernel_rejects_unpadded_operands():
    from pallas_kernels.selective_scan import differentiable_scan, scan_config

    cfg = scan_config(backend="gpu", interpret=True, groups=1, per_group=32, block_t=16,
                      block_d=32)
    scan = differentiable_scan(cfg, False)
    b, L, d, n = 1, 20, 32, 4
    x, dt = jnp.ones((b, L, d)), jnp.ones((b, L, d))
    At, Bt, Ct, h0 = -jnp.ones((n, d)), jnp.ones((b, 1, n, L)), jnp.ones((b, 1, n, L)), jnp.zeros((b, n, d))
    with pytest.raises(ValueError, match=r"x.shape\[1\] \(L\)=20 must be a multiple of block_t=16"):
        scan(x, dt, At, Bt, Ct, h0, None)
    with pytest.raises(ValueError, match=r"x.shape\[2\] \(d\)=24 must be a multiple of block_d=32"):
        scan(x[:, :16, :24], dt[:, :16, :24], At[:, :24], Bt[..., :16], Ct[..., :16],
             h0[..., :24], None)
    with pytest.raises(ValueError, match=r"d_state N \(At.shape\[0\]\)=3 must be a power of two"):
        scan(x[:, :16], dt[:, :16], At[:3], Bt[:, :, :3, :16], Ct[:, :, :3, :16], h0[:, :3], None)
    with pytest.raises(ValueError, match=r"Ct.shape=\(1, 1, 4, 20\) must be \(1, 1, 4, 16\)"):
        scan(x[:, :16], dt[:, :16], At, Bt[..., :16], Ct, h0, None)


def test_monarch_kernels_reject_operands_they_cannot_take():
    from pallas_kernels.monarch import differentiable_monarch, monarch_config

    w1, w2 = _factors()
    monarch = differentiable_monarch(monarch_config(backend="gpu", interpret=True, nblocks=2,
                                                    block_tokens=32))
    with pytest.raises(ValueError, match=r"x, w1 and w2 must share one dtype"):
        monarch(rand(3, 5, 32, dtype=jnp.bfloat16), w1, w2)
    with pytest.raises(ValueError, match=r"x.shape=\(5, 48\) must be \(5, 32\)"):
        monarch(rand(3, 5, 48), w1, w2)
    w1_bad, w2_bad = rand(1, 2, 16, 24), rand(2, 2, 16, 16)
    with pytest.raises(ValueError,
                       match=r"GPU kernel needs p, q, s powers of two >= 16, got \{'p': 24\}"):
        monarch(rand(3, 5, 48), w1_bad, w2_bad)
    with pytest.raises(ValueError, match=r"block_tokens=24 must be a power of two >= 16"):
        monarch_config(backend="gpu", interpret=True, nblocks=2, block_tokens=24)
    with pytest.raises(ValueError, match=r"block_tokens=64 must be a multiple of 128"):
        monarch_config(backend="tpu", interpret=True, nblocks=2, block_tokens=64)


def test_monarch_tpu_kernel_rejects_partial_token_tiles():
    from pallas_kernels import monarch_tpu
    from pallas_kernels.monarch import monarch_config

    cfg = monarch_config(backend="tpu", interpret=True, nblocks=2, block_tokens=128)
    w1, w2 = rand(1, 2, 64, 64), rand(2, 2, 64, 64)
    with pytest.raises(ValueError, match=r"x.shape\[0\] \(tokens\)=100 must be a multiple of "
                                         r"block_tokens=128"):
        monarch_tpu.forward(rand(3, 100, 128), w1, w2, cfg)
