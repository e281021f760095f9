"""Hydra's SSM mixer: one projection to ``[Δ, B, C, U]``, the diagonal content-gated scan of
:mod:`jaxsparse.ops.diagonal_ssm`, an output projection; a recurrent decode state."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.nn.linear import Linear
from jaxsparse.ops.diagonal_ssm import decay_from, diagonal_ssm, diagonal_ssm_sequence_parallel
from jaxsparse.parallel import current_mesh, sequence_axis_size


class DiagonalSSM(nnx.Module):
    """``[B, L, d_model] -> [B, L, d_model]`` through a ``width``-channel diagonal recurrence.

    λ starts log-uniform so that the half-life of a channel at ``Δ = 0`` (``1/λ`` tokens) spans
    ``1 .. max_half_life`` — the spread of timescales S4D/Mamba initialisations aim for.
    """

    def __init__(self, d_model: int, width: int, *, rngs: nnx.Rngs, max_half_life: float = 512.0,
                 out_init_scale: float = 1.0, implementation: str | None = None,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = Linear(d_model, (4, width), logical_axes=("embed", None, "mlp"), **kw)
        self.out_proj = Linear(width, d_model, logical_axes=("mlp", "embed"),
                               init_scale=out_init_scale, **kw)
        u = jax.random.uniform(rngs.params(), (width,), jnp.float32)
        log_lambda = -u * math.log(max_half_life)  # λ in [1/max_half_life, 1]
        self.log_lambda = nnx.Param(log_lambda.astype(param_dtype), logical_axes=("mlp",),
                                    weight_decay=False)
        self.D = nnx.Param(jnp.ones((width,), param_dtype), logical_axes=("mlp",),
                           weight_decay=False)
        self.width, self.implementation = width, implementation

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return {"state": jnp.zeros((batch, self.width), jnp.float32)}

    def __call__(self, x_BLD, *, cache=None):
        # split along the last axis of [B, L, 4·W]: a moveaxis of [B, L, 4, W], or slices of
        # its third axis, made XLA:CPU's fwd+bwd 2x slower (transposes, padded gradients)
        projected = self.in_proj(x_BLD).reshape(*x_BLD.shape[:-1], 4 * self.width)
        delta, B, C, U = jnp.split(projected, 4, axis=-1)
        initial = None if cache is None else cache["state"]
        shards = sequence_axis_size()
        if cache is None and shards > 1 and x_BLD.shape[1] % shards == 0:
            # context parallelism: each shard scans its chunk; chunk states cross shards
            y, final = diagonal_ssm_sequence_parallel(
                delta, B, C, U, self.log_lambda[...], self.D[...], mesh=current_mesh(),
                implementation=self.implementation)
        else:
            y, final = diagonal_ssm(delta, B, C, U, self.log_lambda[...], self.D[...],
                                    initial_state=initial, implementation=self.implementation)
        out = self.out_proj(y.astype(x_BLD.dtype))
        return out, (None if cache is None else {"state": final})

    def decay(self, x_BLD):
        """The per-channel decay ``α [B, L, width]`` (for inspection)."""
        return decay_from(self.in_proj(x_BLD)[..., 0, :].astype(jnp.float32), self.log_lambda[...])
