"""Routers for mixture-of-experts layers: top-k token choice, expert choice, a fixed random
router with a growing k (SMoE-Dropout) and chunk-level routing.

Router logits are float32 whatever the activation dtype (Switch Transformer, Fedus et al.
2021): a bf16 softmax over experts loses the small differences routing depends on.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsparse.ops.checks import check_integer, is_integer
from jaxsparse.ops.concrete import concrete_values
from jaxsparse.ops.segments import check_segment_ids, document_index


class TokenChoice(NamedTuple):
    """Each token's ``k`` experts: ``expert_index [T, k]`` (int32, best first), ``weights
    [T, k]`` (float32; zero for a choice switched off by a dynamic ``k``), ``probs [T, E]``
    and ``logits [T, E]`` for the auxiliary losses; ``counted [T]`` (bool, None for all) marks
    the decisions the balance and z losses and the load statistics count (see
    :func:`counted_weights`)."""

    expert_index: jax.Array
    weights: jax.Array
    probs: jax.Array
    logits: jax.Array
    counted: jax.Array | None = None


def counted_weights(choice: TokenChoice) -> jax.Array:
    """``choice.weights`` with the uncounted decisions' zeroed: what the routed fractions
    (:func:`~jaxsparse.ops.moe.losses.expert_fractions`) count. Causal chunk-level routing
    has no context for the first chunk of a row or document (its pooled input is zeros, so
    its probabilities are uniform and ``top_k`` takes expert 0 on the tie): a fixed choice,
    not the router's, so it is not counted (it pushed the balance loss away from expert 0,
    12.5% of hydra_tiny's tokens)."""
    if choice.counted is None:
        return choice.weights
    return choice.weights * choice.counted[:, None].astype(choice.weights.dtype)


class ExpertChoice(NamedTuple):
    """Each expert's ``C`` tokens: ``token_index [E, C]`` and ``weights [E, C]``."""

    token_index: jax.Array
    weights: jax.Array
    probs: jax.Array
    logits: jax.Array


def _check_k(k: int, num_experts: int, name: str = "k") -> None:
    if not is_integer(k) or not 1 <= k <= num_experts:
        raise ValueError(f"{name}={k!r}: must be an int in [1, num_experts={num_experts}]")


def top_k_routing(logits: jax.Array, k: int, *, renormalize: bool = True,
                  active_k: jax.Array | int | None = None) -> TokenChoice:
    """Softmax over experts, then each token's ``k`` most probable experts.

    ``renormalize`` rescales the k weights to sum to 1 (Mixtral, most top-2 models); without
    it they are the raw probabilities (Switch). ``active_k`` (an integer scalar in ``[1, k]``,
    possibly traced; its value is checked when concrete) keeps only the first ``active_k``
    choices, zeroing the others' weights, so k can change during training without
    recompiling (SMoE-Dropout's schedule).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {logits.shape}")
    _check_k(k, logits.shape[1])
    if active_k is not None:
        _check_active_k(active_k, k)
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, index = jax.lax.top_k(probs, k)
    if active_k is not None:
        weights = jnp.where(jnp.arange(k)[None, :] < active_k, weights, 0.0)
    if renormalize:
        weights = weights / jnp.maximum(weights.sum(axis=-1, keepdims=True), 1e-9)
    return TokenChoice(index.astype(jnp.int32), weights, probs, logits)


def _check_active_k(active_k, k: int) -> None:
    """An integer scalar in ``[1, k]``: 0 or less zeroes every weight, more than ``k`` is
    silently ``k``, a fraction compares as one, a bool is a flag passed by mistake."""
    if hasattr(active_k, "dtype"):  # an array, maybe traced: its shape and dtype are known
        if jnp.shape(active_k) != () or not jnp.issubdtype(active_k.dtype, jnp.integer):
            raise ValueError(f"active_k of shape {jnp.shape(active_k)} and dtype "
                             f"{active_k.dtype}: must be an integer scalar in [1, k={k}]")
    elif not is_integer(active_k):
        raise ValueError(f"active_k={active_k!r}: must be an integer in [1, k={k}]")
    value = concrete_values(active_k)
    if value is not None and not 1 <= value <= k:
        raise ValueError(f"active_k={value.item()!r}: must be an integer in [1, k={k}]")


def expert_choice_routing(logits: jax.Array, capacity: int) -> ExpertChoice:
    """Expert choice (Zhou et al. 2022): each expert takes the ``capacity`` tokens with the
    highest probability for it. Balanced by construction, but a token's experts depend on
    the other tokens of the group, later ones included: not for causal decoders."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {logits.shape}")
    tokens = logits.shape[0]
    if not is_integer(capacity) or not 1 <= capacity <= tokens:
        raise ValueError(f"capacity={capacity!r}: must be an int in [1, tokens={tokens}]")
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, index = jax.lax.top_k(probs.T, capacity)  # [E, C]
    return ExpertChoice(index.astype(jnp.int32), weights, probs, logits)


def linear_k_schedule(step, *, k_start: int, k_end: int, steps: int):
    """SMoE-Dropout (Chen et al. 2023): k grows linearly from ``k_start`` to ``k_end`` over
    ``steps`` training steps (an int32 scalar; traced inside a jitted step)."""
    bad = {name: value for name, value in (("k_start", k_start), ("k_end", k_end),
                                           ("steps", steps))
           if not is_integer(value) or value < 1}
    if bad:
        raise ValueError(", ".join(f"{name}={value!r}" for name, value in bad.items())
                         + ": each must be an integer >= 1")
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
    return jnp.round(k_start + frac * (k_end - k_start)).astype(jnp.int32)


def chunk_pool(x_BLD: jax.Array, chunk: int, *, causal: bool) -> jax.Array:
    """``[B, L/chunk, D]`` representations for chunk-level routing (one routing decision per
    ``chunk`` consecutive tokens; ``L`` must be a multiple of ``chunk``).

    Non-causal: the chunk's mean. Causal: the mean of the *previous* chunk (zeros for the
    first), so no token's experts depend on tokens after it.
    """
    if x_BLD.ndim != 3:
        raise ValueError(f"x_BLD must be [batch, length, d], got shape {x_BLD.shape}")
    batch, length, d = x_BLD.shape
    if not is_integer(chunk) or chunk < 1 or length % chunk:
        raise ValueError(f"chunk={chunk!r}: must be an integer >= 1 and divide the sequence "
                         f"length {length}")
    means = x_BLD.reshape(batch, length // chunk, chunk, d).mean(axis=2)
    if causal:  # shift by one chunk (pad, then drop the last: also right for length 0)
        means = jnp.pad(means, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    return means


def chunk_pool_within_documents(x_BLD: jax.Array, segment_ids: jax.Array, chunk: int, *,
                                causal: bool) -> jax.Array:
    """Per-token router inputs ``[B, L, D]`` of chunk-level routing over packed documents
    (``segment_ids [B, L]``, documents as runs of equal ids, :mod:`jaxsparse.ops.segments`):
    :func:`chunk_pool` (the mean of the previous chunk if ``causal``, else of the token's own
    chunk) over only the tokens of the token's own document (zeros when there are none). With
    one document per row it is :func:`chunk_pool` repeated per token. Any length (the last
    chunk is padded; padding joins no document). Cost ``O(L · chunk · D)``, like one more
    projection of width ``chunk``."""
    if x_BLD.ndim != 3:
        raise ValueError(f"x_BLD must be [batch, length, d], got shape {x_BLD.shape}")
    batch, length, d = x_BLD.shape
    if not is_integer(chunk) or chunk < 1:
        raise ValueError(f"chunk={chunk!r}: must be an integer >= 1")
    runs = document_index(check_segment_ids(segment_ids, batch, length))
    n = -(-length // chunk)
    pad = n * chunk - length
    x = jnp.pad(x_BLD, ((0, 0), (0, pad), (0, 0))).reshape(batch, n, chunk, d)
    docs = jnp.pad(runs, ((0, 0), (0, pad)), constant_values=-1).reshape(batch, n, chunk)
    if causal:  # the previous chunk is the source; before the first chunk, nothing
        x = jnp.pad(x[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0)))
        source = jnp.pad(docs[:, :-1], ((0, 0), (1, 0), (0, 0)), constant_values=-1)
    else:
        source = docs
    same = (docs[..., :, None] == source[..., None, :]) & (source[..., None, :] >= 0)
    same = same.astype(x.dtype)                                       # [B, n, token, source]
    total = jnp.einsum("bnts,bnsd->bntd", same, x)
    count = jnp.maximum(jnp.sum(same, axis=-1, keepdims=True), 1.0)
    return (total / count).reshape(batch, n * chunk, d)[:, :length]


def unchunk(values: jax.Array, chunk: int) -> jax.Array:
    """Repeat per-chunk routing values ``[B, L/chunk, ...]`` for every token: ``[B, L, ...]``."""
    check_integer("chunk", chunk)
    if values.ndim < 2:
        raise ValueError(f"values of shape {values.shape}: must be [batch, chunks, ...]")
    return jnp.repeat(values, chunk, axis=1)
