"""Attention-style matmuls under a low-precision compute dtype.

The operands stay in the compute dtype — bfloat16 runs on tensor cores / the MXU at full rate
and moves half the bytes of float32 — and the products accumulate into a float32 result, which
the softmax needs. Upcasting the operands instead (``q.astype(float32)``) buys nothing for the
logits — a product of two bfloat16 numbers is exact in float32 — and turns every such matmul,
forward and backward, into a float32 one.

The gradient of :func:`matmul_f32` is computed the same way: its float32 cotangent is rounded to
the operands' dtype before the two backward matmuls, as FlashAttention-2's backward (Dao 2023)
and JAX's Pallas flash attention do with ``dS``. Left to autodiff, those matmuls would take a
float32 cotangent and a bfloat16 operand, which XLA runs by upcasting to a float32 matmul.
With float32 operands all of this is an ordinary float32 matmul and its exact gradient, and
it is computed as one (no custom rule): forward-mode autodiff (``jax.jvp``, ``jax.hessian``)
works there. The low-precision path is a ``custom_vjp``: reverse mode only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _matmul(equation: str, a, b, compute_dtype):
    return jnp.einsum(equation, a.astype(compute_dtype), b.astype(compute_dtype),
                      preferred_element_type=jnp.float32)


def _forward(equation, a, b, compute_dtype):
    # the residuals are the inputs as given: casting again in the backward pass is cheaper than
    # keeping a second, low-precision copy of attention probabilities alive until then
    return _matmul(equation, a, b, compute_dtype), (a, b)


def _backward(equation, compute_dtype, operands, g):
    a, b = operands
    low_a, low_b, low_g = (x.astype(compute_dtype) for x in (a, b, g))
    # the einsum's transpose in each operand: two matmuls with compute-dtype operands
    (da,) = jax.linear_transpose(lambda x: jnp.einsum(equation, x, low_b), low_a)(low_g)
    (db,) = jax.linear_transpose(lambda y: jnp.einsum(equation, low_a, y), low_b)(low_g)
    return da.astype(a.dtype), db.astype(b.dtype)


_matmul.defvjp(_forward, _backward)


def _mixed(equation: str, a, b, compute_dtype):
    if jnp.dtype(compute_dtype).itemsize >= 4:  # float32: nothing to round, plain autodiff
        return jnp.einsum(equation, a.astype(compute_dtype), b.astype(compute_dtype),
                          preferred_element_type=jnp.float32)
    return _matmul(equation, a, b, compute_dtype)


def matmul_in(equation: str, a, b, compute_dtype):
    """``einsum(equation, a, b)`` with both operands cast to ``compute_dtype``, accumulated and
    returned in float32 (e.g. an output head: float32 logits from bfloat16 matmuls); the
    gradients come back in the operands' own dtypes from backward matmuls in
    ``compute_dtype`` (see the module docstring)."""
    return _mixed(equation, a, b, compute_dtype)


def matmul_f32(equation: str, a, b):
    """``einsum(equation, a, b)`` on operands in their own dtype, accumulated and returned in
    float32; its backward matmuls run in the operands' dtype (see the module docstring)."""
    return _mixed(equation, a, b, jnp.promote_types(a.dtype, b.dtype))


def weighted_sum(equation: str, weights, values):
    """Attention's ``weights @ values`` with the float32 weights (softmax probabilities) cast to
    the values' dtype, as flash attention does, and a float32 result; the weights' gradient
    is float32."""
    return _mixed(equation, weights, values, values.dtype)
