"""What the README's "Differentiation" paragraph promises: reverse mode everywhere; forward
mode on the pieces without a hand-written backward pass (and refused, with JAX's TypeError,
on those with one); second order through reverse mode (Hessian-vector products) on whole
models once the native kernels are kept out of the defaults (``JAXSPARSE_NATIVE=0``).

The paragraph said float32 routing, SGA and workspace took ``jax.jvp``, and recommended
``"tiles"`` for it: the masked softmax, the short convolution, every attention implementation
and ``"tiles"`` have a ``jax.custom_vjp``, so none did."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsparse import models
from jaxsparse.ops.attention import dot_product_attention
from jaxsparse.ops.conv import causal_depthwise_conv1d
from jaxsparse.ops.moe.grouped import grouped_matmul
from jaxsparse.ops.ssm import selective_scan
from test_ssm import mamba1_inputs

CUSTOM_VJP = "can't apply forward-mode autodiff \\(jvp\\) to a custom_vjp function"


def normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def squares(fn):
    return lambda x: jnp.sum(fn(x) ** 2)


def forward_mode_pieces():
    """``name -> (function of one array, its argument)`` that take ``jax.jvp``."""
    ssm = mamba1_inputs(0, 1, 8, 4, 3, 1)
    rhs, sizes = normal(1, (2, 4, 4)), jnp.array([3, 5])
    pieces = {f"selective_scan {impl}": (
        lambda x, impl=impl: selective_scan(x, ssm["dt"], ssm["A"], ssm["B"], ssm["C"],
                                            implementation=impl), ssm["x"])
        for impl in ("chunked", "sequential", "associative")}
    pieces.update({f"grouped_matmul {impl}": (
        lambda x, impl=impl: grouped_matmul(x, rhs, sizes, implementation=impl), normal(2, (8, 4)))
        for impl in ("dense", "ragged_dot")})
    return pieces


def custom_vjp_pieces():
    """``name -> (function, argument)`` with a hand-written backward pass: reverse mode only."""
    q, w = normal(3, (1, 8, 2, 4)), normal(4, (3, 4))
    rhs, sizes = normal(1, (2, 4, 4)), jnp.array([3, 5])
    pieces = {f"attention {impl}": (
        lambda x, impl=impl: dot_product_attention(x, x, x, mask="causal", implementation=impl), q)
        for impl in ("xla", "xla_blocksparse")}
    pieces["causal conv"] = (lambda x: causal_depthwise_conv1d(x, w)[0], normal(5, (1, 8, 4)))
    pieces["grouped_matmul tiles"] = (
        lambda x: grouped_matmul(x, rhs, sizes, implementation="tiles"), normal(2, (8, 4)))
    return pieces


@pytest.mark.parametrize("name", list(forward_mode_pieces()))
def test_forward_mode_pieces_give_the_tangent_of_a_finite_difference(name):
    fn, x = forward_mode_pieces()[name]
    dx = normal(9, x.shape)
    _, tangent = jax.jvp(squares(fn), (x,), (dx,))
    eps = 1e-3
    finite = (squares(fn)(x + eps * dx) - squares(fn)(x - eps * dx)) / (2 * eps)
    np.testing.assert_allclose(tangent, finite, rtol=2e-3)


@pytest.mark.parametrize("name", list(custom_vjp_pieces()))
def test_hand_written_backward_passes_refuse_forward_mode_but_give_hessian_products(name):
    """Forward mode is JAX's TypeError; forward over reverse (a Hessian-vector product) works,
    since the backward pass is itself JAX, and matches a finite difference of the gradient."""
    fn, x = custom_vjp_pieces()[name]
    with pytest.raises(TypeError, match=CUSTOM_VJP):
        jax.jvp(squares(fn), (x,), (x,))
    grad = jax.grad(squares(fn))
    dx = normal(9, x.shape)
    _, hvp = jax.jvp(grad, (x,), (dx,))
    eps = 1e-3
    finite = (grad(x + eps * dx) - grad(x - eps * dx)) / (2 * eps)
    scale = float(jnp.abs(finite).max())
    np.testing.assert_allclose(hvp, finite, rtol=1e-2, atol=1e-2 * scale)


@pytest.mark.parametrize("config", ["transformer_tiny", "mamba_tiny", "routing_tiny", "moe_tiny",
                                    pytest.param("hydra_tiny", marks=pytest.mark.slow)])  # 50 s
def test_whole_models_give_hessian_vector_products_without_the_native_kernels(config,
                                                                              monkeypatch):
    """``JAXSPARSE_NATIVE=0`` and eval mode: every default is an XLA path whose backward pass
    is JAX, so forward over reverse reaches through the whole model (the README's advice for
    Hessians and gradient penalties), and agrees with reverse over reverse. (In training mode
    the routing, MoE and Hydra layers update their state in the forward pass — centroids,
    router and curriculum steps — which a nested transform refuses.)"""
    monkeypatch.setenv("JAXSPARSE_NATIVE", "0")
    from jaxsparse import configs

    cfg = configs.get(config)
    model = models.build(cfg.model, nnx.Rngs(0))
    model.eval()
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, cfg.model.vocab_size)

    def loss(p):
        return jnp.mean(jax.nn.logsumexp(nnx.merge(graph, p, rest)(tokens), axis=-1))

    direction = jax.tree.map(lambda p: normal(2, p.shape).astype(p.dtype), params)
    _, forward_over_reverse = jax.jvp(jax.grad(loss), (params,), (direction,))
    reverse_over_reverse = jax.grad(lambda p: sum(
        jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(jax.grad(loss)(p)),
                                       jax.tree.leaves(direction))))(params)
    got, want = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])
                 for t in (forward_over_reverse, reverse_over_reverse))
    assert float(jnp.linalg.norm(want)) > 0
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * float(jnp.abs(want).max()))


def test_empty_rows_have_zero_hessian_products_not_nan():
    """A row with nothing allowed divided by a floor of 1e-30, whose square (the division's
    second derivative) is 0 in float32: forward over reverse gave NaN there, which reached a
    whole routing model's Hessian product (a query whose cluster has no earlier key). The
    masked softmax now divides an empty row by 1, and so does the merge of finished softmax
    parts (its floor did not give NaN here, but is the same division)."""
    from jaxsparse.ops.attention.online_softmax import merge_finished
    from jaxsparse.ops.softmax import masked_softmax

    logits = normal(0, (3, 5))
    mask = jnp.array([[True] * 5, [False] * 5, [True, False, True, False, False]])
    weights = normal(1, (3, 5))

    def loss(x):
        return jnp.sum(jnp.sin(weights * masked_softmax(x, mask)))

    _, hvp = jax.jvp(jax.grad(loss), (logits,), (normal(2, (3, 5)),))
    assert bool(jnp.all(jnp.isfinite(hvp))) and bool(jnp.all(hvp[1] == 0)), hvp
    assert float(jnp.abs(hvp[0]).max()) > 0

    out, lse = normal(3, (2, 4)), normal(4, (2,))
    nonempty = jnp.array([True, False])

    def merged(o):
        return jnp.sum(jnp.sin(merge_finished([(o, lse, nonempty), (2 * o, lse - 1, nonempty)])))

    _, hvp = jax.jvp(jax.grad(merged), (out,), (normal(5, (2, 4)),))
    assert bool(jnp.all(jnp.isfinite(hvp))) and bool(jnp.all(hvp[1] == 0)), hvp


def test_turning_the_native_kernels_off_takes_effect_after_they_have_run(monkeypatch):
    """``JAXSPARSE_NATIVE`` was read once, inside the cache of the kernels' build: set to 0
    after a kernel had run in the process, the defaults kept using it (the Hessian products
    above then failed on the kernel, in any worker that had run a native test first)."""
    from jaxsparse.ops.native import selective_scan as native

    args = mamba1_inputs(0, 1, 8, 4, 3, 1)

    def calls_the_kernel():
        text = jax.jit(lambda x: selective_scan(x, args["dt"], args["A"], args["B"],
                                                args["C"])).lower(args["x"]).as_text()
        return "jaxsparse_selective_scan" in text

    if not native.available():
        pytest.fail("the native selective-scan kernel did not build on this host")
    assert calls_the_kernel()
    monkeypatch.setenv("JAXSPARSE_NATIVE", "0")
    assert not calls_the_kernel()
    monkeypatch.setenv("JAXSPARSE_NATIVE", "1")
    assert calls_the_kernel()
