"""Token embedding, optionally reused (tied) as the output projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.parallel import constrain


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs, init_std: float = 1.0,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        table = init_std * jax.random.normal(rngs.params(), (vocab_size, d_model), param_dtype)
        self.embedding = nnx.Param(table, logical_axes=("vocab", "embed"))
        self.dtype = dtype
        self.vocab_size = vocab_size

    def __call__(self, tokens_BL: jax.Array) -> jax.Array:
        # Gather from a table whose model dim is whole (FSDP gathers it, as for any layer):
        # with the table split over fsdp and the tokens too, the compiler would otherwise
        # build the global [batch·length, d_model] lookup and all-reduce it.
        table = constrain(self.embedding[...], ("vocab", None))
        return jnp.take(table, tokens_BL, axis=0).astype(self.dtype)

    def attend(self, x_BLD: jax.Array) -> jax.Array:
        """Logits against the embedding table (weight tying, Press & Wolf 2017)."""
        table = self.embedding[...].astype(self.dtype)
        scale = x_BLD.shape[-1] ** -0.5  # keeps initial logits O(1) with unit-variance rows
        return jnp.einsum("bld,vd->blv", x_BLD * scale, table)
