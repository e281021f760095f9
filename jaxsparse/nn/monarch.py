"""Monarch projections (Dao et al. 2022): a drop-in for :class:`jaxsparse.nn.Linear` with
``2 n^1.5`` instead of ``n²`` parameters when square, and a Monarch SwiGLU."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.ops.monarch import (MONARCH_IMPLEMENTATIONS, monarch_matmul, monarch_shapes,
                                   warn_if_one_block)
from jaxsparse.nn.linear import _as_shape
from jaxsparse.nn.mlp import SwiGLU
from jaxsparse.ops.checks import check_nonnegative


class MonarchLinear(nnx.Module):
    """``y[..., out...] = monarch_matmul(x[..., in...])`` (+ bias), shapes as in ``Linear``.

    Multi-dim ``in_shape``/``out_shape`` (e.g. ``(heads, head_dim)``) are flattened for the
    product, so the layer replaces any ``Linear``. Initialisation matches a dense layer's
    output variance ``init_scale · Var(x)``: each block of ``w1`` has variance ``1/p`` (its
    fan-in), so the intermediate keeps unit scale, and ``w2`` has ``init_scale/q``.
    ``logical_axes`` is accepted for symmetry with ``Linear``; the block dimension of both
    factors is named ``"monarch_blocks"`` for sharding.
    """

    def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int], *,
                 rngs: nnx.Rngs, nblocks: int | None = None, use_bias: bool = False,
                 init_scale: float = 1.0, logical_axes: Sequence[str | None] | None = None,
                 implementation: str | None = None, dtype=jnp.float32, param_dtype=jnp.float32):
        # checked as Linear checks them: MonarchLinear replaces it
        self.in_shape = _as_shape("in_shape", in_shape)
        self.out_shape = _as_shape("out_shape", out_shape)
        check_nonnegative("init_scale", init_scale)
        dims = self.in_shape + self.out_shape
        # the bias and the dense layer of to_dense take their axis names from it
        if logical_axes is not None and len(logical_axes) != len(dims):
            raise ValueError(f"logical_axes {tuple(logical_axes)} must name each of the dims "
                             f"{dims}")
        n_in, n_out = math.prod(self.in_shape), math.prod(self.out_shape)
        if implementation not in MONARCH_IMPLEMENTATIONS:
            raise ValueError(f"implementation={implementation!r}: allowed {MONARCH_IMPLEMENTATIONS}")
        s1, s2 = monarch_shapes(n_in, n_out, nblocks)
        warn_if_one_block(n_in, n_out, nblocks)
        self.nblocks = s1[0]
        truncation = 0.87962566103423978  # std of a unit normal truncated at ±2
        w1 = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, s1, param_dtype)
        w2 = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, s2, param_dtype)
        axes = ("monarch_blocks", None, None)
        self.w1 = nnx.Param(w1 * (math.sqrt(1.0 / s1[2]) / truncation), logical_axes=axes)
        self.w2 = nnx.Param(w2 * (math.sqrt(init_scale / s2[2]) / truncation), logical_axes=axes)
        # a bias is not decayed: say so, as the default rule (matrices only) would take an
        # out_shape of two or more dims for a matrix
        self.bias = nnx.Param(jnp.zeros(self.out_shape, param_dtype),
                              logical_axes=tuple(logical_axes[len(self.in_shape):])
                              if logical_axes else None, weight_decay=False) if use_bias else None
        self.logical_axes = tuple(logical_axes) if logical_axes else None  # for to_dense
        self.implementation = implementation
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        if x.shape[x.ndim - n_in:] != self.in_shape:
            raise ValueError(f"MonarchLinear{self.in_shape} -> {self.out_shape}: input of shape "
                             f"{x.shape} must end in the input shape {self.in_shape}")
        lead = x.shape[: x.ndim - n_in]
        flat = x.reshape(*lead, math.prod(self.in_shape)).astype(self.dtype)
        w1, w2 = self.w1[...].astype(self.dtype), self.w2[...].astype(self.dtype)
        y = monarch_matmul(flat, w1, w2, implementation=self.implementation)
        y = y.reshape(*lead, *self.out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype).reshape((1,) * len(lead) + self.out_shape)
        return y


class MonarchSwiGLU(SwiGLU):
    """:class:`SwiGLU` whose three projections are :class:`MonarchLinear`."""

    def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, nblocks: int | None = None,
                 implementation: str | None = None, **kwargs):
        linear = functools.partial(MonarchLinear, nblocks=nblocks, implementation=implementation)
        super().__init__(d_model, d_ff, rngs=rngs, linear=linear, **kwargs)
