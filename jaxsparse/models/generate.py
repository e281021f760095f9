"""Autoregressive sampling through a model's decode cache (any model with init_cache/decode)."""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


# Below float32's smallest normal number (and at 0) sampling is greedy: XLA flushes subnormal
# operands to zero, so dividing by a subnormal temperature would give 0/0 at the maximum.
_GREEDY_BELOW = float(np.finfo(np.float32).tiny)


def sample_logits(logits_BV, rng, temperature, top_k):
    """Greedy when ``temperature == 0``; else softmax sampling, from the ``top_k`` most likely
    tokens when ``top_k > 0`` (exactly ``k``: ties at the k-th value are broken by index, as
    ``lax.top_k`` does — a ``logits >= kth`` threshold would keep every tied token, common
    under bfloat16). ``temperature`` and ``top_k`` may be traced (one compiled sampler serves
    every value); a ``temperature`` below float32's normal range is greedy.

    The logits are shifted by their maximum before the division, so a tiny temperature sends
    the others to -inf and sampling becomes greedy (``logits / 1e-45`` alone overflows to
    inf - inf = NaN and samples garbage)."""
    greedy = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if isinstance(temperature, int | float) and temperature < _GREEDY_BELOW:
        return greedy
    logits_BV = logits_BV.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    safe = jnp.maximum(temperature, _GREEDY_BELOW)  # a traced 0 takes the greedy branch below
    logits_BV = (logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True)) / safe
    if not (isinstance(top_k, int) and top_k == 0):
        vocab = logits_BV.shape[-1]
        # each token's rank in a stable descending sort: ties ranked in index order
        rank = jnp.argsort(jnp.argsort(-logits_BV, axis=-1, stable=True), axis=-1)
        keep = jnp.where(top_k > 0, top_k, vocab)
        logits_BV = jnp.where(rank < keep, logits_BV, -jnp.inf)
    sampled = jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)
    return jnp.where(temperature < _GREEDY_BELOW, greedy, sampled)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "filtered"))
def _generate(graphdef, state, prompt_BP, rng, temperature, top_k, *, max_new_tokens, greedy,
              filtered):
    """One compiled program per model, prompt length, token count and sampling mode (greedy,
    full distribution or top-k); the temperature and k are traced, so sweeping them does not
    compile again."""
    model = nnx.merge(graphdef, state)
    model.eval()  # inference behaviour (e.g. MoE layers sow nothing inside the scan below)
    batch, prompt_len = prompt_BP.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    logits, cache = model.decode(prompt_BP, cache)
    rngs = jax.random.split(rng, max_new_tokens)
    temperature = 0.0 if greedy else temperature
    top_k = top_k if filtered else 0

    def sample(logits_BV, rng_t):
        return sample_logits(logits_BV, rng_t, temperature, top_k)

    first = sample(logits[:, -1], rngs[0])

    def step(carry, rng_t):
        token_B, cache = carry
        logits, cache = model.decode(token_B[:, None], cache)
        nxt = sample(logits[:, -1], rng_t)
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
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
            math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r}: must be a finite number >= 0 (0: greedy)")
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0 or (
            vocab is not None and top_k > vocab):
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
    return _generate(graphdef, state, prompt_BP, rng, jnp.float32(temperature),
                     jnp.int32(top_k), max_new_tokens=int(max_new_tokens),
                     greedy=float(temperature) < _GREEDY_BELOW, filtered=int(top_k) > 0)
