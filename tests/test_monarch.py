"""Monarch matrices: the dense view, the optimal projection, every implementation of the product
(forward and gradients, float32 and bfloat16), kernel lowering, counts and bad input."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import forward_and_vjp, run_python
from jaxsparse.ops.monarch import (default_nblocks, kernel_monarch, monarch_flops,
                                   monarch_matmul, monarch_params, monarch_reference,
                                   monarch_shapes, monarch_to_dense, project_to_monarch,
                                   valid_nblocks)

HIGHEST = jax.lax.Precision.HIGHEST


def random_factors(key, n_in, n_out, nblocks=None, dtype=jnp.float32):
    s1, s2 = monarch_shapes(n_in, n_out, nblocks)
    k1, k2 = jax.random.split(key)
    w1 = jax.random.normal(k1, s1, jnp.float32) / np.sqrt(s1[2])
    w2 = jax.random.normal(k2, s2, jnp.float32) / np.sqrt(s2[2])
    return w1.astype(dtype), w2.astype(dtype)


def rel_err(a, b):
    kind = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(b) else np.float64
    a, b = np.asarray(a).astype(kind), np.asarray(b).astype(kind)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


# --- dense view and projection ---------------------------------------------------------------

_slow = pytest.mark.slow  # the largest SVD batches; 1024² and rectangular cases stay by default
SIZES = [(4, 4, None), (16, 16, None), (64, 64, 8), (64, 64, 2), (12, 12, None), (16, 64, 4),
         (64, 16, 4), (128, 384, 8), (384, 128, None), (1024, 1024, None),
         pytest.param(4096, 4096, None, marks=_slow), pytest.param(1024, 4096, 32, marks=_slow)]


@pytest.mark.parametrize("n_in,n_out,nblocks", SIZES)
def test_projecting_a_monarch_matrix_recovers_it(n_in, n_out, nblocks):
    w1, w2 = random_factors(jax.random.key(n_in + 3 * n_out), n_in, n_out, nblocks)
    dense = monarch_to_dense(w1, w2)
    assert dense.shape == (n_out, n_in)
    p1, p2 = project_to_monarch(dense, nblocks)
    assert p1.shape == w1.shape and p2.shape == w2.shape
    np.testing.assert_allclose(monarch_to_dense(p1, p2), dense, atol=1e-4)


def test_integer_and_half_precision_matrices_are_projected_in_float32():
    """An integer matrix was projected with its singular values' roots truncated to integers
    (recovery error 2.8 for an exactly-Monarch matrix of integers, no error raised); bfloat16
    failed inside the SVD."""
    w1 = jax.random.randint(jax.random.key(0), (4, 4, 4), -2, 3).astype(jnp.float32)
    w2 = jax.random.randint(jax.random.key(1), (4, 4, 4), -2, 3).astype(jnp.float32)
    dense = monarch_to_dense(w1, w2)  # small integers, exact in float32
    for dtype in (jnp.int32, jnp.bfloat16):
        p1, p2 = project_to_monarch(dense.astype(dtype))
        assert p1.dtype == p2.dtype == jnp.float32, dtype
        np.testing.assert_allclose(monarch_to_dense(p1, p2), dense, atol=1e-4, err_msg=str(dtype))


@pytest.mark.parametrize("n_in,n_out,nblocks", SIZES[:9])
def test_dense_matrix_times_x_equals_the_product(n_in, n_out, nblocks):
    w1, w2 = random_factors(jax.random.key(1), n_in, n_out, nblocks)
    x = jax.random.normal(jax.random.key(2), (3, 5, n_in))
    dense_y = jnp.einsum("mn,abn->abm", monarch_to_dense(w1, w2), x, precision=HIGHEST)
    np.testing.assert_allclose(monarch_matmul(x, w1, w2, implementation="xla"), dense_y,
                               atol=2e-5, rtol=2e-5)


def test_to_dense_follows_the_documented_index_formula():
    """``M[s'·b + l, k·p + p'] = Σ_ρ' w2[l, s', k·ρ + ρ'] · w1[k, ρ'·b + l, p']``, entry by entry."""
    w1, w2 = random_factors(jax.random.key(3), 32, 64, 2)  # b=2, q=16: rank ρ=8 blocks
    w1, w2 = np.asarray(w1, np.float64), np.asarray(w2, np.float64)
    b, q, p = w1.shape
    s, rho = w2.shape[1], q // b
    expected = np.zeros((b * s, b * p))
    for l in range(b):
        for k in range(b):
            for r in range(rho):
                expected[l::b, k * p:(k + 1) * p] += np.outer(w2[l, :, k * rho + r],
                                                              w1[k, r * b + l, :])
    np.testing.assert_allclose(monarch_to_dense(w1, w2), expected, atol=1e-5)


def test_projection_is_no_worse_than_perturbed_alternatives():
    """Optimality: the projection of a dense matrix is at least as close to it (Frobenius) as
    any nearby Monarch matrix, including the projection's own perturbations."""
    dense = jax.random.normal(jax.random.key(4), (64, 64))
    w1, w2 = project_to_monarch(dense, 8)
    best = float(jnp.linalg.norm(monarch_to_dense(w1, w2) - dense))
    assert best < float(jnp.linalg.norm(dense))  # it captures something
    for i in range(8):
        k1, k2 = jax.random.split(jax.random.key(10 + i))
        scale = 10.0 ** (-1 - i % 3)
        d1 = w1 + scale * jax.random.normal(k1, w1.shape)
        d2 = w2 + scale * jax.random.normal(k2, w2.shape)
        assert float(jnp.linalg.norm(monarch_to_dense(d1, d2) - dense)) >= best * (1 - 1e-6)


def test_permuted_dft_is_exactly_monarch_and_the_plain_dft_is_not():
    """Cooley–Tukey: with its columns read in transposed (n₂, n₁) order, the DFT of size b² is
    a Monarch matrix with b blocks (twiddles folded into the factors) — the paper's Prop. 3."""
    b = 16
    n = b * b
    dft = np.exp(-2j * np.pi * np.outer(np.arange(n), np.arange(n)) / n)
    columns = np.array([b * (c % b) + c // b for c in range(n)])  # c = n₂·b + n₁ -> b·n₁ + n₂
    permuted = jnp.asarray(dft[:, columns], jnp.complex64)
    w1, w2 = project_to_monarch(permuted, b)
    np.testing.assert_allclose(monarch_to_dense(w1, w2), permuted, atol=1e-4)
    w1, w2 = project_to_monarch(jnp.asarray(dft, jnp.complex64), b)
    assert rel_err(monarch_to_dense(w1, w2), dft) > 0.1


def test_counts():
    assert monarch_params(4096, 4096) == 2 * 4096 ** 1.5
    assert default_nblocks(4096, 4096) == 64 and default_nblocks(1024, 4096) == 32
    assert monarch_flops(10, 1024, 1024) == 2 * 10 * monarch_params(1024, 1024)
    w1, w2 = random_factors(jax.random.key(0), 384, 128)
    assert w1.size + w2.size == monarch_params(384, 128)


# --- the product: every implementation against the reference ---------------------------------

CASES = [  # (tokens, n_in, n_out, nblocks): odd token counts, rectangular both ways, rank 2
    (7, 256, 256, 16), (33, 256, 1024, 16), (40, 512, 512, 16), (1, 1024, 256, 16),
]


def _vjp(fn, x, w1, w2, ct):
    y, grads = forward_and_vjp(fn, (x, w1, w2), ct)  # compiled: op by op a case took 2-4 s
    return (y,) + grads


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_on_a_mesh_each_device_runs_the_kernel_on_its_own_tokens(backend):
    """Behind the native kernel's row rule (the TPU kernel's saved intermediate is split on its
    last axis, where its tokens are): tokens split 4 ways need no collective but the
    all-reduces of the weight gradients and the loss, each device pads its 9 tokens to a
    whole tile; values and gradients equal one device's XLA product."""
    out = run_python(f"""
import json, jax, jax.numpy as jnp, numpy as np
from helpers import worst
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxsparse.dryrun import collective_summary
from jaxsparse.ops.monarch import kernel_monarch, monarch_reference
from test_monarch import random_factors
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"))
w1, w2 = random_factors(jax.random.key(0), 256, 256, 16)
x = jax.random.normal(jax.random.key(1), (36, 256))

def loss(x, w1, w2, fn):
    return jnp.sum(jnp.sin(fn(x, w1, w2)))

kernel = lambda *a: kernel_monarch(*a, backend="{backend}", interpret=True)
want = jax.grad(loss, argnums=(0, 1, 2))(x, w1, w2, monarch_reference)
grad = jax.jit(jax.grad(lambda *a: loss(*a, kernel), argnums=(0, 1, 2)))
args = (jax.device_put(x, NamedSharding(mesh, P("data"))), w1, w2)
lowered = grad.lower(*args)
got = grad(*args)
print(json.dumps({{"collectives": sorted(collective_summary(lowered.compile().as_text())),
                  "rules": lowered.as_text().count("CustomSPMDPartitioning"),
                  "err": worst(float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
                             for g, w in zip(got, want))}}))
""", devices=8)
    assert out["collectives"] in ([], ["all-reduce"]), out
    assert out["rules"] == 2 and out["err"] < 1e-5, out  # the forward and backward kernels


@pytest.mark.parametrize("tokens,n_in,n_out,nblocks", CASES)
@pytest.mark.parametrize("impl", ["pallas_interpret", "tpu_interpret"])
def test_implementations_match_the_reference_float32(impl, tokens, n_in, n_out, nblocks):
    w1, w2 = random_factors(jax.random.key(tokens), n_in, n_out, nblocks)
    x = jax.random.normal(jax.random.key(5), (tokens, n_in))
    ct = jax.random.normal(jax.random.key(6), (tokens, n_out))
    if impl == "tpu_interpret":
        fn = lambda *a: kernel_monarch(*a, backend="tpu", interpret=True)  # noqa: E731
    else:
        fn = lambda *a: monarch_matmul(*a, implementation=impl)  # noqa: E731
    got = _vjp(fn, x, w1, w2, ct)
    want = _vjp(monarch_reference, x, w1, w2, ct)
    for name, g, w in zip(("y", "dx", "dw1", "dw2"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert rel_err(g, w) < 1e-5, (name, rel_err(g, w))


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_bfloat16_matches_the_float32_reference(impl):
    tokens, n_in, n_out, nblocks = 50, 256, 512, 16
    w1, w2 = random_factors(jax.random.key(7), n_in, n_out, nblocks)
    x = jax.random.normal(jax.random.key(8), (2, tokens, n_in))
    ct = jax.random.normal(jax.random.key(9), (2, tokens, n_out))
    bf = lambda a: a.astype(jnp.bfloat16)  # noqa: E731
    got = _vjp(lambda *a: monarch_matmul(*a, implementation=impl), bf(x), bf(w1), bf(w2), bf(ct))
    want = _vjp(monarch_reference, x, w1, w2, ct)
    for name, g, w in zip(("y", "dx", "dw1", "dw2"), got, want):
        assert g.dtype == jnp.bfloat16, name
        assert rel_err(g, w) < 3e-2, (name, rel_err(g, w))  # a few bf16 ulps after 2 products


def test_default_implementation_matches_the_reference():
    w1, w2 = random_factors(jax.random.key(0), 64, 64)
    x = jax.random.normal(jax.random.key(1), (300, 64))
    np.testing.assert_allclose(monarch_matmul(x, w1, w2), monarch_reference(x, w1, w2),
                               atol=1e-6, rtol=1e-6)


# --- lowering for accelerators from this CPU host ---------------------------------------------


def _lowered(fn, args, platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _product_and_grad(dtype):
    w1, w2 = random_factors(jax.random.key(0), 1024, 1024, 32, dtype)
    x = jax.random.normal(jax.random.key(1), (2, 300, 1024), dtype)

    def f(x, w1, w2):
        return monarch_matmul(x, w1, w2, implementation="pallas")

    def loss(x, w1, w2):
        return f(x, w1, w2).astype(jnp.float32).sum()

    return f, jax.grad(loss, argnums=(0, 1, 2)), (x, w1, w2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_for_cuda(dtype):
    f, grad, args = _product_and_grad(dtype)
    triton = r"custom_call @__gpu\$xla\.gpu\.triton"
    assert len(re.findall(triton, _lowered(f, args, "cuda"))) == 1
    assert len(re.findall(triton, _lowered(grad, args, "cuda"))) == 3  # forward, dx, dw


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_for_tpu(dtype, tpu_lowering_target):
    f, grad, args = _product_and_grad(dtype)
    mosaic = r"custom_call @tpu_custom_call"
    assert len(re.findall(mosaic, _lowered(f, args, "tpu"))) == 1
    assert len(re.findall(mosaic, _lowered(grad, args, "tpu"))) == 2  # forward, backward


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (runs in gpu_check.sh)")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_kernel_on_device_matches_the_reference(dtype):
    w1, w2 = random_factors(jax.random.key(0), 1024, 4096, 32, dtype)
    x = jax.random.normal(jax.random.key(1), (1000, 1024), dtype)
    ct = jax.random.normal(jax.random.key(2), (1000, 4096), dtype)
    got = _vjp(lambda *a: monarch_matmul(*a, implementation="pallas"), x, w1, w2, ct)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    want = _vjp(monarch_reference, f32(x), f32(w1), f32(w2), f32(ct))
    tol = 5e-3 if dtype == jnp.float32 else 3e-2  # float32 dots run as TF32 on tensor cores
    for name, g, w in zip(("y", "dx", "dw1", "dw2"), got, want):
        assert rel_err(g, w) < tol, (name, rel_err(g, w))


# --- bad input --------------------------------------------------------------------------------


def test_sizes_that_do_not_split_name_the_valid_block_counts():
    with pytest.raises(ValueError, match=r"nblocks=5 cannot split n_in=64 -> n_out=64.*valid "
                                         r"nblocks: \[1, 2, 4, 8\]"):
        monarch_shapes(64, 64, 5)
    assert valid_nblocks(96, 96) == [1, 2, 4]
    with pytest.raises(ValueError, match="n_in=0"):
        monarch_shapes(0, 8)


def test_inconsistent_factors_and_inputs_are_refused():
    w1, w2 = random_factors(jax.random.key(0), 64, 64, 8)
    with pytest.raises(ValueError, match=r"w2 must be \[8, s, 8\]"):
        monarch_matmul(jnp.ones((2, 64)), w1, w2[:, :, :4])
    with pytest.raises(ValueError, match=r"x \(2, 60\): last dim must be n = b·p = 8·8 = 64"):
        monarch_matmul(jnp.ones((2, 60)), w1, w2)
    with pytest.raises(ValueError, match=r"w1 must be \[b, q, p\]"):
        monarch_to_dense(w1[0], w2)
    with pytest.raises(ValueError, match="implementation='fast'"):
        monarch_matmul(jnp.ones((2, 64)), w1, w2, implementation="fast")
    with pytest.raises(ValueError, match=r"matrix must be 2-D"):
        project_to_monarch(jnp.ones((4, 4, 4)), 2)
    with pytest.raises(ValueError, match=r"w1 \(0, 2, 2\) .* every dimension must be >= 1"):
        monarch_matmul(jnp.ones((2, 0)), jnp.ones((0, 2, 2)), jnp.ones((0, 2, 2)))
    with pytest.raises(ValueError, match=r"nblocks=2.0: must be an integer"):
        monarch_shapes(8, 8, 2.0)


def test_pallas_refuses_blocks_no_kernel_can_take():
    w1, w2 = random_factors(jax.random.key(0), 36, 36, 3)  # p = q = s = 12
    with pytest.raises(ValueError, match=r"GPU kernel needs p, q, s powers of two >= 16"):
        monarch_matmul(jnp.ones((2, 36)), w1, w2, implementation="pallas")
    # the interpret-mode kernel's refusal names what was asked for (it said 'pallas')
    with pytest.raises(ValueError, match=r"implementation='pallas_interpret'\): the GPU kernel "
                                         "needs p, q, s powers of two"):
        monarch_matmul(jnp.ones((2, 36)), w1, w2, implementation="pallas_interpret")


def test_a_default_of_one_block_is_said_with_the_parameter_counts():
    """15 -> 16 has no block count >= 2: the default b=1 is a dense factorisation of 465
    parameters for a 240-parameter matrix, which a layer asked to be Monarch took silently."""
    import warnings

    from flax import nnx

    from jaxsparse.nn.monarch import MonarchLinear
    from jaxsparse.ops.monarch import DenseMonarchWarning, project_to_monarch

    message = r"no Monarch block count >= 2 splits n_in=15 -> n_out=16 .* 465 parameters " \
              r"against the dense matrix's 240"
    with pytest.warns(DenseMonarchWarning, match=message):
        MonarchLinear(15, 16, rngs=nnx.Rngs(0))
    with pytest.warns(DenseMonarchWarning, match=r"n_in=16 -> n_out=15"):
        project_to_monarch(jnp.ones((15, 16)))
    with warnings.catch_warnings():  # chosen, or a real split: nothing to say
        warnings.simplefilter("error", DenseMonarchWarning)
        MonarchLinear(15, 16, rngs=nnx.Rngs(0), nblocks=1)
        MonarchLinear(16, 64, rngs=nnx.Rngs(0))
        MonarchLinear(1, 7, rngs=nnx.Rngs(0))
