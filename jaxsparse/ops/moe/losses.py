"""Auxiliary router losses and routing statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.concrete import concrete_values


def _check_expert_index(expert_index, num_experts: int) -> None:
    """Concrete indices must name an expert: one outside ``[0, E)`` one-hot encodes to zeros
    and silently drops out of the statistics (traced ones are checked by their router)."""
    values = concrete_values(expert_index)
    if values is not None and values.size and not 0 <= values.min() <= values.max() < num_experts:
        raise ValueError(f"expert_index holds values in [{values.min()}, {values.max()}]: must be "
                         f"in [0, num_experts={num_experts})")


def _identity(v):
    return v


def expert_fractions(expert_index: jax.Array, num_experts: int, weights=None,
                     mean=_identity) -> jax.Array:
    """f_i: the fraction of routing assignments that go to expert i, counting each token once
    per chosen expert and dividing by k, so the fractions sum to 1 (all zeros when nothing is
    counted). Choices with zero weight (switched off by a dynamic k, or not counted:
    :func:`~jaxsparse.ops.moe.routing.counted_weights`) are not counted. ``mean`` (a pmean
    over the devices holding the other tokens) is applied to the counts before dividing, so
    the fractions are those of all devices' assignments, however many each device counts."""
    _check_expert_index(expert_index, num_experts)
    one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)  # [T, k, E]
    if weights is not None:
        one_hot = one_hot * (weights > 0)[..., None]
    counts = mean(one_hot.sum(axis=(0, 1)))
    return _ratio(counts, counts.sum())


def _ratio(total, count):
    """``total / count``, 0 where ``count`` is 0 (a count averaged over devices can be < 1)."""
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def load_balancing_loss(probs: jax.Array, expert_index: jax.Array, weights=None) -> jax.Array:
    """Switch Transformer load-balancing loss ``E * sum_i f_i * P_i`` (Fedus et al. 2021,
    eq. 4), with P_i the mean router probability of expert i. Exactly 1.0 when routing is
    perfectly balanced, larger otherwise; the gradient flows through P.

    ``probs [T, E]``, ``expert_index [T, k]`` (integers), ``weights`` None or ``[T, k]``."""
    if (probs.ndim != 2 or expert_index.ndim != 2 or expert_index.shape[0] != probs.shape[0]
            or not jnp.issubdtype(expert_index.dtype, jnp.integer)
            or (weights is not None and weights.shape != expert_index.shape)):
        raise ValueError(f"probs {probs.shape}, expert_index {expert_index.shape} "
                         f"{expert_index.dtype}, weights "
                         f"{None if weights is None else weights.shape}: expected probs [T, E], "
                         "integer expert_index [T, k] and weights None or [T, k]")
    f = expert_fractions(expert_index, probs.shape[-1], weights)
    return balance_from_statistics(f, probs.astype(jnp.float32).mean(axis=0))


def balance_from_statistics(f: jax.Array, P: jax.Array) -> jax.Array:
    """``E * sum_i f_i P_i`` from the routed fractions and mean probabilities (which expert
    parallelism averages across devices first)."""
    return f.shape[-1] * jnp.sum(jax.lax.stop_gradient(f) * P)


def router_z_loss(logits: jax.Array, counted: jax.Array | None = None,
                  mean=_identity) -> jax.Array:
    """ST-MoE router z-loss ``mean(logsumexp(logits)^2)`` (Zoph et al. 2022): keeps router
    logits small so the float32 softmax stays well conditioned. ``counted`` and ``mean`` as
    in :func:`counted_mean`."""
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2
    return counted_mean(z, counted, mean)


def counted_mean(values: jax.Array, counted: jax.Array | None = None,
                 mean=_identity) -> jax.Array:
    """The mean over the leading axis of the rows where ``counted [T]`` (bool; None: all) is
    True, 0 if none. ``mean`` (a pmean over the devices holding the other rows) averages the
    sum and the count separately, so the result is the mean over every device's counted rows
    (a mean of per-device means weighs a device with fewer counted rows too much)."""
    mask = (jnp.ones(values.shape[:1], jnp.float32) if counted is None
            else counted.astype(jnp.float32))
    mask = mask.reshape(mask.shape + (1,) * (values.ndim - 1))
    return _ratio(mean(jnp.sum(values * mask, axis=0)), mean(jnp.sum(mask)))
