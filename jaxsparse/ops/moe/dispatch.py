"""Moving tokens to experts and back: capacity buffers with priority dropping, dropless
sorting into groups, and expert-choice gathering.

``experts(x_ECD) -> y_ECD`` maps per-expert token buffers; ``grouped(rows, group_sizes) ->
rows`` maps rows sorted by expert. Outputs are combined with the router weights; a dropped
token gets zeros (the residual connection carries it).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxsparse.ops.checks import check_integer, is_real
from jaxsparse.ops.moe.routing import ExpertChoice, TokenChoice


def _check_capacity_factor(capacity_factor) -> None:
    if not is_real(capacity_factor) or not 0 < capacity_factor < math.inf:  # also nan
        raise ValueError(f"capacity_factor={capacity_factor!r}: must be a finite number > 0")


def _check_routed_tokens(x_TD, tokens: int) -> None:
    """``x_TD`` must be the ``[tokens, d]`` rows the routing was computed for: a mismatch
    would silently gather clamped rows or scatter out of range."""
    if x_TD.ndim != 2 or x_TD.shape[0] != tokens:
        raise ValueError(f"x_TD of shape {x_TD.shape}: expected [tokens={tokens}, d], the "
                         "tokens the routing was computed for")


def _check_floating(x_TD) -> None:
    """The router weights are cast to the activations' dtype: integer activations would
    combine with weights truncated to 0."""
    if not jnp.issubdtype(x_TD.dtype, jnp.floating):
        raise ValueError(f"x_TD has dtype {x_TD.dtype}; MoE dispatch needs floating-point "
                         "inputs (e.g. float32, bfloat16)")


def _check_callback_output(name: str, out, expected: tuple) -> None:
    """What an ``experts``/``grouped`` callback returned must have the shape it was given (a
    buffer of another capacity or width would be gathered as zeros or combined into a
    wrong-shaped output) and a floating dtype (the router weights are cast to it)."""
    if tuple(out.shape) != tuple(expected):
        raise ValueError(f"the {name} callback returned shape {tuple(out.shape)}; expected "
                         f"{tuple(expected)}, the shape of the rows it was given")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"the {name} callback returned dtype {out.dtype}; expected a "
                         "floating-point dtype (the router weights are cast to it)")


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float,
                    minimum: int = 4) -> int:
    """Slots per expert: ``round(capacity_factor * tokens * k / E)``, at least ``minimum``
    (``minimum >= 1``, so tokens always get a slot) and at most the token count: a token's k
    choices are distinct experts, so no expert can be given more. With factor 1 the slots
    equal the assignments (MaxText's convention; flaxformer's ``cf * tokens / E`` leaves k
    out, so its top-2 factor 1.25 is 0.625 here)."""
    check_integer("num_tokens", num_tokens, 0)
    check_integer("num_experts", num_experts, 1)
    check_integer("k", k, 1, num_experts, f"in [1, num_experts={num_experts}]")
    check_integer("minimum", minimum, 1)
    _check_capacity_factor(capacity_factor)
    slots = max(int(round(capacity_factor * num_tokens * k / num_experts)), minimum)
    return min(slots, num_tokens)


def slot_positions(choice: TokenChoice, num_experts: int) -> jax.Array:
    """``[T, k]`` position of each assignment in its expert's buffer, in priority order: every
    token's first choice before any token's second choice (then by token order), as in
    Switch/ST-MoE. Zero-weight choices take no slot (position -1)."""
    active = choice.weights > 0
    one_hot = jax.nn.one_hot(choice.expert_index.T, num_experts, dtype=jnp.int32)  # [k, T, E]
    one_hot = one_hot * active.T[..., None]
    k, tokens, _ = one_hot.shape
    flat = one_hot.reshape(k * tokens, num_experts)
    position = jnp.sum((jnp.cumsum(flat, axis=0) - 1) * flat, axis=-1)  # [k*T]
    position = jnp.where(flat.sum(-1) > 0, position, -1)
    return position.reshape(k, tokens).T


def swiglu_experts(x_ECD, gate, up, down):
    """Every expert's SwiGLU on its buffer: ``[E, C, D]`` with weights ``[E, D, H]``,
    ``[E, D, H]``, ``[E, H, D]``."""
    shapes = tuple(a.shape for a in (x_ECD, gate, up, down))
    if (any(len(shape) != 3 for shape in shapes) or len({shape[0] for shape in shapes}) != 1
            or not shapes[0][2] == shapes[1][1] == shapes[2][1] == shapes[3][2]
            or not shapes[1][2] == shapes[2][2] == shapes[3][1]):
        raise ValueError(f"swiglu_experts needs x_ECD [E, C, D], gate [E, D, H], up [E, D, H], "
                         f"down [E, H, D]; got {', '.join(map(str, shapes))}")
    hidden = jax.nn.silu(jnp.einsum("ecd,edh->ech", x_ECD, gate)) * jnp.einsum("ecd,edh->ech", x_ECD, up)
    return jnp.einsum("ech,ehd->ecd", hidden, down)


def pack(x_TD, choice: TokenChoice, capacity: int):
    """Per-expert buffers ``[E, C, D]`` filled by priority slot; ``(buffers, slot, kept)``
    where dropped assignments have ``slot == C`` (out of range)."""
    _check_routed_tokens(x_TD, choice.expert_index.shape[0])
    tokens, d = x_TD.shape
    check_integer("capacity", capacity, 1 if tokens else 0)
    num_experts = choice.probs.shape[-1]
    position = slot_positions(choice, num_experts)
    kept = (position >= 0) & (position < capacity)
    slot = jnp.where(kept, position, capacity)  # out of range: dropped by the scatter
    token_of = jnp.broadcast_to(jnp.arange(tokens)[:, None], slot.shape)
    buffers = jnp.zeros((num_experts, capacity, d), x_TD.dtype).at[
        choice.expert_index, slot].set(x_TD[token_of], mode="drop")
    return buffers, slot, kept


def unpack(out_ECD, choice: TokenChoice, slot, kept):
    """Combine expert outputs back per token: ``(y [T, D], dropped_fraction)``."""
    num_experts = choice.probs.shape[-1]
    if out_ECD.ndim != 3 or out_ECD.shape[0] != num_experts:
        raise ValueError(f"out_ECD of shape {out_ECD.shape}: expected [num_experts="
                         f"{num_experts}, capacity, d], the buffers pack() returned")
    if not jnp.issubdtype(out_ECD.dtype, jnp.floating):  # the weights would be cast to 0
        raise ValueError(f"out_ECD has dtype {out_ECD.dtype}; needs floating point")
    gathered = out_ECD.at[choice.expert_index, slot].get(mode="fill", fill_value=0)  # [T, k, D]
    weights = jnp.where(kept, choice.weights, 0.0).astype(out_ECD.dtype)
    y = jnp.einsum("tk,tkd->td", weights, gathered)
    active = jnp.sum(choice.weights > 0)  # none (an empty batch): nothing dropped
    return y, jnp.where(active > 0, 1.0 - jnp.sum(kept) / jnp.maximum(active, 1), 0.0)


def capacity_dispatch(x_TD, choice: TokenChoice, experts, capacity: int):
    """Token-choice MoE with fixed per-expert buffers. Returns ``(y [T, D], dropped_fraction)``.
    ``experts`` maps the ``[E, C, D]`` buffers to outputs of the same shape; ``x_TD`` must be
    floating point."""
    _check_floating(x_TD)
    buffers, slot, kept = pack(x_TD, choice, capacity)
    out = experts(buffers)
    _check_callback_output("experts", out, buffers.shape)
    return unpack(out, choice, slot, kept)


def dropless_dispatch(x_TD, choice: TokenChoice, grouped, *, skip_unweighted: bool = False):
    """Token-choice MoE without dropping: sort the ``T * k`` assignments by expert, run the
    experts as grouped matmuls over the sorted rows, un-sort and combine. With
    ``skip_unweighted`` choices of zero weight (SMoE-Dropout's k schedule) sort last, outside
    every group, and ``grouped`` must give zeros for rows past ``sum(group_sizes)`` (as
    :func:`grouped_matmul` does under jit); expert parallelism then does not send them.
    ``grouped`` returns rows of the shape it was given; ``x_TD`` must be floating point."""
    _check_routed_tokens(x_TD, choice.expert_index.shape[0])
    _check_floating(x_TD)
    tokens, d = x_TD.shape
    num_experts = choice.probs.shape[-1]
    k = choice.expert_index.shape[1]
    skipped = (choice.weights <= 0) if skip_unweighted else jnp.zeros(choice.weights.shape, bool)
    flat_expert = jnp.where(skipped, num_experts, choice.expert_index).reshape(-1)
    order = jnp.argsort(flat_expert, stable=True)
    rows = x_TD[order // k]
    group_sizes = jnp.bincount(flat_expert, length=num_experts + 1)[:num_experts]
    group_sizes = group_sizes.astype(jnp.int32)
    out_rows = grouped(rows, group_sizes)
    _check_callback_output("grouped", out_rows, rows.shape)
    unsorted = jnp.zeros_like(out_rows).at[order].set(out_rows)
    unsorted = unsorted.reshape(tokens, k, out_rows.shape[-1])  # explicit width: T may be 0
    return jnp.einsum("tk,tkd->td", choice.weights.astype(unsorted.dtype), unsorted)


def expert_choice_dispatch(x_TD, choice: ExpertChoice, experts):
    """Expert-choice MoE: gather each expert's tokens, run, scatter-add back weighted.
    ``experts`` maps the ``[E, C, D]`` buffers to outputs of the same shape; ``x_TD`` must be
    floating point."""
    _check_routed_tokens(x_TD, choice.probs.shape[0])
    _check_floating(x_TD)
    buffers = x_TD[choice.token_index]
    out = experts(buffers)  # [E, C, D]
    _check_callback_output("experts", out, buffers.shape)
    weighted = out * choice.weights[..., None].astype(out.dtype)
    return jnp.zeros_like(x_TD, dtype=out.dtype).at[choice.token_index].add(weighted)


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens per expert for expert choice: ``capacity_factor * T / E`` (factor 2: each token
    is processed twice on average, like top-2)."""
    check_integer("num_tokens", num_tokens, 0)
    check_integer("num_experts", num_experts, 1)
    _check_capacity_factor(capacity_factor)
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens / num_experts)))
