"""Autoregressive sampling through a model's decode cache (any model with init_cache/decode)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_logits(logits_BV, rng, temperature: float, top_k: int):
    """Greedy when ``temperature == 0``; else softmax sampling, optionally from the top k.

    The logits are shifted by their maximum before the division, so a tiny temperature sends
    the others to -inf and sampling becomes greedy (``logits / 1e-45`` alone overflows to
    inf - inf = NaN and samples garbage); one too small for float32 is greedy outright."""
    if temperature < np.finfo(np.float32).smallest_subnormal:  # 0, or 0 in float32
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32)
    logits_BV = (logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True)) / temperature
    if top_k:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k"))
def _generate(graphdef, state, prompt_BP, rng, *, max_new_tokens, temperature, top_k):
    model = nnx.merge(graphdef, state)
    model.eval()  # inference behaviour (e.g. MoE layers sow nothing inside the scan below)
    batch, prompt_len = prompt_BP.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    logits, cache = model.decode(prompt_BP, cache)
    rngs = jax.random.split(rng, max_new_tokens)
    first = sample_logits(logits[:, -1], rngs[0], temperature, top_k)

    def step(carry, rng_t):
        token_B, cache = carry
        logits, cache = model.decode(token_B[:, None], cache)
        nxt = sample_logits(logits[:, -1], rng_t, temperature, top_k)
        return (nxt, cache), token_B

    # Each step emits the token it consumed; the final carry holds the last sampled token.
    (last, _), tokens = jax.lax.scan(step, (first, cache), rngs[1:])
    return jnp.concatenate([tokens.T, last[:, None]], axis=1)


def generate(model: nnx.Module, prompt_BP: jax.Array, max_new_tokens: int, *, rng=None,
             temperature: float = 1.0, top_k: int = 0) -> jax.Array:
    """Return ``[B, max_new_tokens]`` sampled continuations of the int prompt ``[B, P]``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
    if prompt_BP.ndim != 2 or prompt_BP.shape[1] < 1:
        raise ValueError(f"prompt must be a non-empty [batch, length] array, got {prompt_BP.shape}")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)
            and temperature >= 0):
        raise ValueError(f"temperature={temperature!r}: must be a finite number >= 0 (0: greedy)")
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if not isinstance(top_k, int) or top_k < 0 or (vocab is not None and top_k > vocab):
        raise ValueError(f"top_k={top_k!r}: must be an int in [0, vocab_size={vocab}] "
                         "(0: the full distribution)")
    limit = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    if limit is not None and prompt_BP.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {prompt_BP.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
            f"model.max_seq_len={limit}"
        )
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt_BP, rng, max_new_tokens=max_new_tokens,
                     temperature=float(temperature), top_k=int(top_k))
