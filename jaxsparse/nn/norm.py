"""RMSNorm module (math in :func:`jaxsparse.ops.normalization.rms_norm`)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxsparse.ops.checks import check_integer
from jaxsparse.ops.normalization import check_eps, rms_norm


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        check_integer("dim", dim)  # not a float (fails inside JAX) nor a bool (dim 1)
        check_eps(eps)
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("embed",))
        self.eps = eps

    def __call__(self, x):
        if x.shape[-1:] != self.scale.shape:
            raise ValueError(f"RMSNorm{self.scale.shape}: input of shape {x.shape} must end in "
                             f"{self.scale.shape[0]}")
        return rms_norm(x, self.scale[...], self.eps)
