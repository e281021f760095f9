"""RMSNorm module (math in :func:`jaxsparse.ops.normalization.rms_norm`)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxsparse.ops.normalization import rms_norm


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("embed",))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps)
