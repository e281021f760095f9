"""Hydra's diagonal SSM (jaxsparse.ops.diagonal_ssm, jaxsparse.nn.diagonal_ssm): bad shapes
and options are named before anything broadcasts. Its numerics are tested in test_hydra.py
and test_linear_scan_native.py."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsparse.nn.diagonal_ssm import DiagonalSSM
from jaxsparse.ops.diagonal_ssm import diagonal_ssm, linear_scan


def test_arguments_that_would_broadcast_are_refused():
    # a size-1 axis used to broadcast silently into a wrong answer
    U, per_channel = jnp.ones((2, 5, 3)), jnp.ones(3)
    cases = {"delta": (jnp.ones((2, 5, 1)),
                       r"delta must have U's shape .*=\(2, 5, 3\); got \(2, 5, 1\)"),
             "B": (jnp.ones((2, 5, 1)), r"B must have U's shape .*; got \(2, 5, 1\)"),
             "C": (jnp.ones((2, 1, 3)), r"C must have U's shape .*; got \(2, 1, 3\)"),
             "log_lambda": (jnp.ones(1), r"log_lambda must be \[width=3\]; got \(1,\)"),
             "D": (jnp.ones(2), r"D must be \[width=3\]; got \(2,\)")}
    for name, (bad, message) in cases.items():
        args = {"delta": U, "B": U, "C": U, "U": U, "log_lambda": per_channel, "D": per_channel}
        with pytest.raises(ValueError, match=message):
            diagonal_ssm(**(args | {name: bad}))
    with pytest.raises(ValueError, match=r"U must be \[batch, length, width\]; got \(5, 3\)"):
        diagonal_ssm(U[0], U[0], U[0], U[0], per_channel, per_channel)


def test_the_layer_names_its_input_when_it_has_the_wrong_shape():
    """The convolution named its weight ``w`` (with x's width as the layer's channels), and
    the scan the projection's ``U``, shapes the caller never passed."""
    for conv_width in (0, 3):
        layer = DiagonalSSM(16, 8, rngs=nnx.Rngs(0), conv_width=conv_width)
        for bad in (jnp.ones((2, 3, 12)), jnp.ones((3, 16))):
            with pytest.raises(ValueError, match=r"x must be \[batch, length, d_model=16\]; "
                                                 + re.escape(f"got {tuple(bad.shape)}")):
                layer(bad)


@pytest.mark.parametrize("max_half_life", [0.0, -4.0, math.inf, math.nan])
def test_a_half_life_that_is_not_positive_and_finite_is_refused(max_half_life):
    with pytest.raises(ValueError, match=rf"max_half_life={max_half_life}: must be a finite "
                                         r"number > 0"):
        DiagonalSSM(8, 6, rngs=nnx.Rngs(0), max_half_life=max_half_life)


IMPLEMENTATIONS = [None, "native", "sequential", "associative", "pallas_interpret"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_bfloat16_initial_state_works_in_every_implementation(implementation):
    # lax.scan (the default on CPU) crashed: its float32 carry met a bfloat16 initial state
    keys = jax.random.split(jax.random.key(0), 5)
    delta, B, C, U = (jax.random.normal(k, (2, 5, 4)) for k in keys[:4])
    lam, D = jnp.zeros(4), jnp.ones(4)
    init = jax.random.normal(keys[4], (2, 4)).astype(jnp.bfloat16)
    y, final = diagonal_ssm(delta, B, C, U, lam, D, initial_state=init,
                            implementation=implementation)
    y_ref, final_ref = diagonal_ssm(delta, B, C, U, lam, D,
                                    initial_state=init.astype(jnp.float32),
                                    implementation="associative")
    assert y.dtype == final.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final, final_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", [i for i in IMPLEMENTATIONS if i != "native"])
@pytest.mark.parametrize("decay_dtype,inputs_dtype,initial_dtype",
                         [(jnp.float32, jnp.bfloat16, None),
                          (jnp.bfloat16, jnp.float32, jnp.bfloat16),
                          (jnp.bfloat16, jnp.bfloat16, jnp.float32),
                          (jnp.float32, jnp.float32, jnp.bfloat16)])
def test_linear_scan_of_mixed_dtypes_agrees_across_implementations(
        implementation, decay_dtype, inputs_dtype, initial_dtype):
    # sequential crashed (carry dtype), associative crashed (concatenate of bf16 and f32) or
    # computed in bfloat16, the kernel computed in float32 and returned inputs' dtype
    keys = jax.random.split(jax.random.key(1), 3)
    decay = jax.random.uniform(keys[0], (2, 7, 3), minval=0.5, maxval=1.0)
    inputs = jax.random.normal(keys[1], (2, 7, 3))
    initial = jax.random.normal(keys[2], (2, 3))
    args = (decay.astype(decay_dtype), inputs.astype(inputs_dtype),
            None if initial_dtype is None else initial.astype(initial_dtype))
    h, last = linear_scan(*args, implementation=implementation)
    assert h.dtype == last.dtype == inputs_dtype
    # computed in float32 from the operands as given, rounded once to inputs' dtype
    exact = [None if a is None else a.astype(jnp.float32) for a in args]
    h_ref, last_ref = linear_scan(*exact, implementation="sequential")
    tol = 1e-5 if inputs_dtype == jnp.float32 else 8e-3  # (one bfloat16 rounding)
    for got, ref in ((h, h_ref), (last, last_ref)):
        np.testing.assert_allclose(got.astype(jnp.float32), ref, rtol=tol, atol=tol)


def test_linear_scan_refuses_integer_operands():
    a, b = jnp.full((1, 3, 2), 0.5), jnp.ones((1, 3, 2))
    for args, name in (((a, b.astype(jnp.int32)), "inputs"), ((a.astype(jnp.int32), b), "decay"),
                       ((a, b, jnp.ones((1, 2), jnp.int32)), "initial")):
        with pytest.raises(ValueError, match=rf"{name} has dtype int32; the scan needs "
                                             "floating-point inputs"):
            linear_scan(*args)


def test_a_scan_can_carry_the_decode_cache():
    """A bfloat16 layer returned a float32 cache's convolution state in bfloat16 (the
    convolution gave it back in the activation dtype), so a ``lax.scan`` decoding loop failed:
    carry types differ. Every cache entry keeps its dtype now."""
    layer = DiagonalSSM(16, 8, conv_width=4, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16)).astype(jnp.bfloat16)

    def step(cache, x_t):
        y, cache = layer(x_t[:, None], cache=cache)
        return cache, y[:, 0]

    cache = layer.init_cache(2, 8)  # float32
    final, ys = jax.jit(lambda c, x: jax.lax.scan(step, c, x.swapaxes(0, 1)))(cache, x)
    assert jax.tree.map(lambda a: a.dtype, final) == jax.tree.map(lambda a: a.dtype, cache)
    full = layer(x)[0].astype(jnp.float32)
    np.testing.assert_allclose(ys.swapaxes(0, 1).astype(jnp.float32), full,
                               atol=3e-2 * float(jnp.max(jnp.abs(full))))
