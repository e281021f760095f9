"""Hydra's diagonal SSM (jaxsparse.ops.diagonal_ssm, jaxsparse.nn.diagonal_ssm): bad shapes
and options are named before anything broadcasts. Its numerics are tested in test_hydra.py
and test_linear_scan_native.py."""

import math

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxsparse.nn.diagonal_ssm import DiagonalSSM
from jaxsparse.ops.diagonal_ssm import diagonal_ssm


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


@pytest.mark.parametrize("max_half_life", [0.0, -4.0, math.inf, math.nan])
def test_a_half_life_that_is_not_positive_and_finite_is_refused(max_half_life):
    with pytest.raises(ValueError, match=rf"max_half_life={max_half_life}: must be a finite "
                                         r"number > 0"):
        DiagonalSSM(8, 6, rngs=nnx.Rngs(0), max_half_life=max_half_life)
