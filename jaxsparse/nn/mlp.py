"""SwiGLU feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.nn.linear import Linear
from jaxsparse.parallel import constrain


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))``. ``linear`` builds the three projections (any class
    with ``Linear``'s constructor, e.g. a configured ``MonarchLinear``)."""

    def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, out_init_scale: float = 1.0,
                 dtype=jnp.float32, param_dtype=jnp.float32, linear=Linear):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate = linear(d_model, d_ff, logical_axes=("embed", "mlp"), **kw)
        self.up = linear(d_model, d_ff, logical_axes=("embed", "mlp"), **kw)
        self.down = linear(d_ff, d_model, logical_axes=("mlp", "embed"),
                           init_scale=out_init_scale, **kw)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        hidden = jax.nn.silu(self.gate(x_BLD)) * self.up(x_BLD)
        hidden = constrain(hidden, ("batch", "length", "mlp"))
        return self.down(hidden)
