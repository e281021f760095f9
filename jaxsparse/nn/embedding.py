"""Token embedding, optionally reused (tied) as the output projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.ops.checks import check_integer, check_nonnegative
from jaxsparse.ops.concrete import concrete_values
from jaxsparse.ops.mixed_precision import matmul_in
from jaxsparse.parallel import constrain


def _check_token_ids(tokens, vocab_size: int) -> None:
    """Integer tokens in ``[0, vocab_size)``; values are checked where they are concrete (an
    eager call, e.g. in a notebook); traced ones out of range embed as NaN rows (``Embed``)."""
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    values = concrete_values(tokens)
    if values is not None and values.size:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"tokens range over [{low}, {high}]; the vocabulary is "
                             f"[0, {vocab_size})")


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs, init_std: float = 1.0,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        # integers, not floats (failing inside JAX) nor bools (a vocabulary of one token)
        check_integer("vocab_size", vocab_size)
        check_integer("d_model", d_model)
        check_nonnegative("init_std", init_std)
        table = init_std * jax.random.normal(rngs.params(), (vocab_size, d_model), param_dtype)
        self.embedding = nnx.Param(table, logical_axes=("vocab", "embed"))
        self.dtype = dtype
        self.vocab_size = vocab_size

    def __call__(self, tokens_BL: jax.Array) -> jax.Array:
        _check_token_ids(tokens_BL, self.vocab_size)
        # Gather from a table whose model dim is whole (FSDP gathers it, as for any layer):
        # with the table split over fsdp and the tokens too, the compiler would otherwise
        # build the global [batch·length, d_model] lookup and all-reduce it.
        table = constrain(self.embedding[...], ("vocab", None))
        # traced ids out of range embed as NaN: loud, not silently another token's row (a
        # negative id wrapped around to the end of the table, as numpy indexing does)
        ids = jnp.where(tokens_BL < 0, self.vocab_size, tokens_BL)
        return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan).astype(self.dtype)

    def attend(self, x_BLD: jax.Array) -> jax.Array:
        """Logits against the embedding table (weight tying, Press & Wolf 2017)."""
        scale = x_BLD.shape[-1] ** -0.5  # keeps initial logits O(1) with unit-variance rows
        # operands in the compute dtype, forward and backward (the float32 residual stream
        # would otherwise promote the vocabulary matmuls to float32); the logits come out
        # float32, the matmul's own sums: rounded to bfloat16, logits of 10-30 lost 0.06-0.125
        return matmul_in("bld,vd->blv", x_BLD * scale, self.embedding[...], self.dtype)
