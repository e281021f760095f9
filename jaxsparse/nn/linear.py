"""A projection whose kernel carries logical axis names for sharding."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.ops.checks import check_nonnegative, is_integer
from jaxsparse.ops.mixed_precision import matmul_in


class Linear(nnx.Module):
    """``y[..., out...] = sum_in x[..., in...] * W[in..., out...]`` (no bias).

    ``in_shape``/``out_shape`` may have several dims (e.g. ``out_shape=(heads, head_dim)``),
    which keeps head structure visible to the sharding rules. Initialisation: truncated normal
    with variance ``scale / fan_in`` (LeCun), so activations keep unit scale.
    ``out_dtype=float32`` returns the matmul's float32 sums instead of rounding them to
    ``dtype`` (an output head computing in bfloat16; its backward matmuls stay in ``dtype``:
    :func:`jaxsparse.ops.mixed_precision.matmul_in`). None: the result is in ``dtype``.
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        out_shape: int | Sequence[int],
        *,
        logical_axes: Sequence[str | None],
        rngs: nnx.Rngs,
        init_scale: float = 1.0,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        out_dtype=None,
    ):
        self.in_shape = _as_shape("in_shape", in_shape)
        self.out_shape = _as_shape("out_shape", out_shape)
        shape = self.in_shape + self.out_shape
        if min(shape, default=0) < 1:
            raise ValueError(f"Linear{self.in_shape} -> {self.out_shape}: every size must be >= 1")
        check_nonnegative("init_scale", init_scale)  # a variance factor
        if len(logical_axes) != len(shape):
            raise ValueError(f"logical_axes {logical_axes} must name each of the dims {shape}")
        fan_in = math.prod(self.in_shape)
        std = math.sqrt(init_scale / fan_in) / 0.87962566103423978  # truncation correction
        w = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, param_dtype) * std
        self.kernel = nnx.Param(w, logical_axes=tuple(logical_axes))
        self.dtype = dtype
        self.out_dtype = out_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, n_out = len(self.in_shape), len(self.out_shape)
        if x.shape[x.ndim - n_in:] != self.in_shape:
            raise ValueError(f"Linear{self.in_shape} -> {self.out_shape}: input of shape "
                             f"{x.shape} must end in the input shape {self.in_shape}")
        if self.out_dtype is not None:
            if jnp.dtype(self.out_dtype) != jnp.float32:
                raise ValueError(f"out_dtype={self.out_dtype!r}: only float32 (or None)")
            ins, outs = "abcdefgh"[:n_in], "ijklmnop"[:n_out]
            return matmul_in(f"...{ins},{ins}{outs}->...{outs}", x, self.kernel[...],
                             self.dtype)
        axes = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        kernel = self.kernel[...].astype(self.dtype)
        return jax.lax.dot_general(x.astype(self.dtype), kernel, (axes, ((), ())))


def _as_shape(name: str, value) -> tuple[int, ...]:
    """An int or a sequence of ints as a tuple of Python ints, else an error naming ``name``."""
    dims = (value,) if is_integer(value) else value
    try:
        dims = tuple(dims)
    except TypeError:
        dims = None
    if dims is None or not all(is_integer(d) for d in dims):
        raise ValueError(f"{name}={value!r}: expected an int or a sequence of ints")
    return tuple(int(d) for d in dims)
