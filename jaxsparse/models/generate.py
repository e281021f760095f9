"""Autoregressive sampling through a model's decode cache (any model with init_cache/decode)."""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsparse.ops.concrete import concrete_values


# Below float32's smallest normal number (and at 0) sampling is greedy: XLA flushes subnormal
# operands to zero, so dividing by a subnormal temperature would give 0/0 at the maximum.
_GREEDY_BELOW = float(np.finfo(np.float32).tiny)


def sample_logits(logits_BV, rng, temperature, top_k, top_p=1.0):
    """Greedy when ``temperature == 0``; else softmax sampling, from the ``top_k`` most likely
    tokens when ``top_k > 0`` (exactly ``k``: ties at the k-th value are broken by index, as
    ``lax.top_k`` does — a ``logits >= kth`` threshold would keep every tied token, common
    under bfloat16), then from the nucleus when ``top_p < 1`` (Holtzman et al. 2020: the
    fewest most likely tokens whose probabilities, after the temperature and top-k, reach
    ``top_p``; the most likely token always stays; ties ranked by index as for top-k).
    ``temperature``, ``top_k`` and ``top_p`` may be traced (one compiled sampler serves every
    value); a ``temperature`` below float32's normal range is greedy.

    The logits are shifted by their maximum before the division, so a tiny temperature sends
    the others to -inf and sampling becomes greedy (``logits / 1e-45`` alone overflows to
    inf - inf = NaN and samples garbage).

    A row with a NaN or +inf logit, or with every logit -inf (a model gone non-finite, or
    out-of-range ids fed to a traced embedding, which gives NaN rows on purpose), samples
    ``-1``, an id no token has: argmax and categorical read such rows as token 0 (+inf after
    the max shift is inf - inf = NaN), plausible-looking output."""
    shifted = logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True)
    nan_B = jnp.any(jnp.isnan(shifted), axis=-1)  # NaN, +inf (inf - inf) or all -inf
    greedy = jnp.where(nan_B, -1, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32))
    if isinstance(temperature, int | float) and temperature < _GREEDY_BELOW:
        return greedy
    logits_BV = logits_BV.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    safe = jnp.maximum(temperature, _GREEDY_BELOW)  # a traced 0 takes the greedy branch below
    logits_BV = (logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True)) / safe
    filter_k = not (isinstance(top_k, int) and top_k == 0)
    nucleus = not (isinstance(top_p, int | float) and top_p >= 1)
    if filter_k or nucleus:
        vocab = logits_BV.shape[-1]
        # each token's rank in a stable descending sort: ties ranked in index order
        order = jnp.argsort(-logits_BV, axis=-1, stable=True)
        rank = jnp.argsort(order, axis=-1)
        if filter_k:
            keep = jnp.where(top_k > 0, top_k, vocab)
            logits_BV = jnp.where(rank < keep, logits_BV, -jnp.inf)
        if nucleus:
            probs = jax.nn.softmax(jnp.take_along_axis(logits_BV, order, axis=-1), axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs  # of the more likely tokens
            inside = jnp.take_along_axis(mass_before < top_p, rank, axis=-1) | (rank == 0)
            logits_BV = jnp.where(inside, logits_BV, -jnp.inf)
    sampled = jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)
    return jnp.where(temperature < _GREEDY_BELOW, greedy, jnp.where(nan_B, -1, sampled))


@functools.partial(jax.jit, static_argnames=("graphdef", "prefill", "capacity",
                                             "max_new_tokens", "greedy", "filtered",
                                             "nucleus", "vocab_limit"))
def _generate(graphdef, state, prompt_BP, tail_BT, tail_len, rng, temperature, top_k, top_p, *,
              prefill, capacity, max_new_tokens, greedy, filtered, nucleus, vocab_limit):
    """One compiled program per model, prompt bucket, token count and sampling mode (greedy,
    full distribution or top-k). ``prompt_BP`` (``prefill`` tokens, a whole number of
    buckets, maybe none) is run in one pass; the rest of the prompt, ``tail_BT[:, :tail_len]``
    (padded to a bucket, ``tail_len`` traced), is fed token by token through the loop that
    then samples, so every prompt length of a bucket shares the program. The temperature,
    k and p are traced too: sweeping them does not compile again."""
    model = nnx.merge(graphdef, state)
    model.eval()  # inference behaviour (e.g. MoE layers sow nothing inside the loop below)
    batch = prompt_BP.shape[0]
    cache = model.init_cache(batch, capacity)
    if prefill:
        logits, cache = model.decode(prompt_BP, cache)
    else:  # nothing prefilled: the tail holds the whole prompt, at least one token
        logits, cache = model.decode(tail_BT[:, :1], cache)
    rngs = jax.random.split(rng, max_new_tokens)
    temperature = 0.0 if greedy else temperature
    top_k = top_k if filtered else 0
    top_p = top_p if nucleus and not greedy else 1.0
    out_BN = jnp.zeros((batch, max_new_tokens), jnp.int32)

    def sample(i, logits_BV):  # the i-th new token (ids below vocab_limit: a prefix)
        return sample_logits(logits_BV[:, :vocab_limit], rngs[i], temperature, top_k, top_p)

    def step(i, carry):
        # consume the i-th token after the prefill: the prompt's tail, then the sampled ones
        cache, last_logits, out_BN = carry
        new = jnp.maximum(i - tail_len, 0)
        sampled = sample(new, last_logits)
        out_BN = jnp.where(i >= tail_len, out_BN.at[:, new].set(sampled), out_BN)
        token_B = jnp.where(i < tail_len, tail_BT[:, jnp.minimum(i, tail_BT.shape[1] - 1)],
                            sampled)
        logits, cache = model.decode(token_B[:, None], cache)
        return cache, logits[:, -1], out_BN

    # the last new token is sampled after the loop: nothing has to read it
    _, last_logits, out_BN = jax.lax.fori_loop(0 if prefill else 1,
                                               tail_len + max_new_tokens - 1, step,
                                               (cache, logits[:, -1], out_BN))
    return out_BN.at[:, -1].set(sample(max_new_tokens - 1, last_logits))


def generate(model: nnx.Module, prompt_BP: jax.Array, max_new_tokens: int, *, rng=None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             prompt_bucket: int = 64, vocab_limit: int | None = None) -> jax.Array:
    """Return ``[B, max_new_tokens]`` sampled continuations of the int prompt ``[B, P]``.

    The prompt's first ``P - P % prompt_bucket`` tokens are run in one pass and the rest one
    by one, as the sampled tokens are: prompts whose lengths lie in one bucket share a
    compiled program (a notebook trying prompts compiles once per bucket, not per length),
    for at most ``prompt_bucket - 1`` single-token steps. ``prompt_bucket=1`` runs every prompt
    in one pass. ``vocab_limit``: sample only ids below it (a byte-level model whose
    vocabulary is padded past 256 must not emit ids no byte stands for). ``top_k`` and
    ``top_p`` (nucleus, in (0, 1]; 1: off) filter as :func:`sample_logits` says.

    Non-finite logits sample ``-1`` (:func:`sample_logits`); called eagerly, that is a
    ``FloatingPointError`` naming the rows and the first such token (under ``jax.jit`` the
    ``-1`` entries are the mark)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an int >= 1")
    if isinstance(prompt_bucket, bool) or not isinstance(prompt_bucket, numbers.Integral) \
            or prompt_bucket < 1:
        raise ValueError(f"prompt_bucket={prompt_bucket!r}: must be an int >= 1")
    prompt_BP = jnp.asarray(prompt_BP)
    if prompt_BP.ndim != 2 or min(prompt_BP.shape) < 1:  # an empty batch fails in numpy's min
        raise ValueError(f"prompt must be a non-empty [batch, length] array (each >= 1), got "
                         f"{prompt_BP.shape}")
    # checked here: inside the compiled loop the model's embedding sees traced tokens
    if not jnp.issubdtype(prompt_BP.dtype, jnp.integer):
        raise ValueError(f"prompt must hold integer token ids, got dtype {prompt_BP.dtype}")
    temperature = _checked_temperature(temperature)
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0 or (
            vocab is not None and top_k > vocab):
        raise ValueError(f"top_k={top_k!r}: must be an int in [0, vocab_size={vocab}] "
                         "(0: the full distribution)")
    top_p = _checked_top_p(top_p)
    if vocab_limit is not None and (isinstance(vocab_limit, bool) or not isinstance(
            vocab_limit, numbers.Integral) or not 1 <= vocab_limit <= (vocab or vocab_limit)):
        raise ValueError(f"vocab_limit={vocab_limit!r}: must be None or an int in [1, "
                         f"vocab_size={vocab}]")
    values = concrete_values(prompt_BP)
    if vocab is not None and values is not None:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"prompt tokens range over [{low}, {high}]; the vocabulary is "
                             f"[0, {vocab})")
    prompt_BP = prompt_BP.astype(jnp.int32)
    limit = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    if limit is not None and prompt_BP.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {prompt_BP.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
            f"model.max_seq_len={limit}"
        )
    rng = _checked_rng(rng)
    length, bucket = prompt_BP.shape[1], int(prompt_bucket)
    prefill = length - length % bucket
    tail_BT = jnp.zeros((prompt_BP.shape[0], bucket), jnp.int32)
    tail_BT = tail_BT.at[:, :length - prefill].set(prompt_BP[:, prefill:])
    # room for the longest prompt of the bucket, never past what the model reads
    capacity = prefill + bucket - 1 + int(max_new_tokens)
    capacity = capacity if limit is None else min(capacity, limit)
    graphdef, state = nnx.split(model)
    out_BN = _generate(graphdef, state, prompt_BP[:, :prefill], tail_BT,
                       jnp.int32(length - prefill), rng, jnp.float32(temperature),
                       jnp.int32(top_k), jnp.float32(top_p), prefill=prefill,
                       capacity=capacity, max_new_tokens=int(max_new_tokens),
                       greedy=float(temperature) < _GREEDY_BELOW, filtered=int(top_k) > 0,
                       nucleus=top_p < 1, vocab_limit=None if vocab_limit is None else
                       int(vocab_limit))
    _refuse_nan_samples(out_BN)
    return out_BN


def _refuse_nan_samples(out_BN) -> None:
    """A ``FloatingPointError`` where (concrete) samples hold ``-1``, the mark of NaN logits."""
    if isinstance(out_BN, jax.core.Tracer) or not out_BN.is_fully_addressable:
        return  # traced (the -1 entries are the mark), or rows on other hosts: not here
    values = concrete_values(out_BN)
    if values is None or not (values < 0).any():
        return
    rows = sorted({int(r) for r in np.nonzero((values < 0).any(axis=1))[0]})
    first = int(np.argmax((values < 0).any(axis=0)))
    raise FloatingPointError(f"the model's logits are not finite (NaN, +inf or all -inf; rows "
                             f"{rows}, from new token {first} on): its parameters or inputs "
                             "are not finite; the samples there are -1")


def _checked_temperature(temperature) -> float:
    """``temperature`` as a Python float: a Python, numpy or (concrete) JAX real scalar,
    finite and >= 0, else an error naming it."""
    value = None if isinstance(temperature, bool) else concrete_values(temperature)
    if value is None or value.shape != () or value.dtype.kind not in "iuf" or not (
            math.isfinite(value) and value >= 0):
        raise ValueError(f"temperature={temperature!r}: must be a finite number >= 0 "
                         "(0: greedy): a Python, numpy or concrete JAX real scalar")
    return float(value)


def _checked_top_p(top_p) -> float:
    """``top_p`` as a Python float in (0, 1] (a Python, numpy or concrete JAX real scalar), else
    an error naming it: at 0 the nucleus would hold no token, past 1 it means nothing."""
    value = None if isinstance(top_p, bool) else concrete_values(top_p)
    if value is None or value.shape != () or value.dtype.kind not in "iuf" or not (
            0 < value <= 1):
        raise ValueError(f"top_p={top_p!r}: must be a number in (0, 1] (1: the full "
                         "distribution; 0.9: the smallest set of tokens holding 90% of it)")
    return float(value)


def _checked_rng(rng):
    """``rng``: one PRNG key, typed (``jax.random.key``) or a raw uint32 pair
    (``jax.random.PRNGKey``); None gives ``jax.random.key(0)``. Anything else (a seed such
    as ``0``) would fail inside JAX's key handling without naming the argument."""
    if rng is None:
        return jax.random.key(0)
    dtype, shape = getattr(rng, "dtype", None), getattr(rng, "shape", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ()
    raw = dtype == np.uint32 and tuple(shape or ()) == (2,)
    if not (typed or raw):
        raise ValueError(f"rng={rng!r}: expected one PRNG key, e.g. jax.random.key(0)")
    return rng
