"""Sparse global attention decoding from a state of bounded size: two ring buffers.

A query at position ``t`` reads its window ``(t - window, t]`` and the ``max_global`` most
recent controller-picked candidates at positions ``≤ t - window`` (:mod:`jaxsparse.ops.sga`).
Both sets move forward with ``t``, and a candidate enters the global set exactly when it
leaves the window, so a decoder needs no more than

- the *window ring*: the keys, values and scores of the last ``window`` positions
  (slot = position mod ``window``), and
- the *global ring*: those of the last ``max_global`` candidates that have left the window
  (slot = push number mod ``max_global + 1``; ``global_count`` pushes so far, per batch row).
  Its one spare slot, the next to be written, holds no valid entry, so a token leaving the
  window is written there unconditionally and counted only if it is a candidate (at batch 1
  as a slice update): XLA:CPU copied the whole ring at every step for a conditional write
  (keep the old value or take the new) and for a scatter (a step at batch 1, 8 heads,
  256 + 512 slots: 0.33 ms conditional, 0.29 ms by scatter, 0.18 ms now; 0.08 ms without
  any push).

``window + max_global + 1`` slots however long the sequence grows, where a cache of every
position (:func:`jaxsparse.ops.sga.sga_decode`) keeps and reads ``length`` slots at every
step. Together with the SSM's and the workspace's fixed-size states this makes Hydra's whole
decode state independent of the context length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.attention.api import check_attention_inputs, logit_scale
from jaxsparse.ops.attention.decode import checked_first_position
from jaxsparse.ops.checks import check_cache_request, check_integer
from jaxsparse.ops.sga import _attend, check_sga_options


def init_sga_rings(batch: int, window: int, max_global: int, kv_heads: int, head_dim: int,
                   dtype=jnp.float32) -> dict[str, jax.Array]:
    """The empty decode state of :func:`sga_ring_decode`: the window ring ``k, v [B, Hkv,
    window, D]``, ``score [B, window]``, the global ring ``global_k, global_v [B, Hkv, G, D]``,
    ``global_score [B, G]`` with ``G = max_global + 1`` slots (none without global tokens)
    and ``global_count [B]`` (int32).
    Heads first, as the attention layers' caches: a step reads each head's slots together.
    ``dtype`` (keys and values) must be floating point: an integer ring truncated the keys
    written into it (errors of 1.6 against the full-sequence result)."""
    check_sga_options(window, max_global)
    for name, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim)):
        check_integer(name, value)
    check_cache_request(batch, dtype=dtype)
    rings = {}
    for prefix, slots in (("", window), ("global_", _global_slots(max_global))):
        rings[prefix + "k"] = jnp.zeros((batch, kv_heads, slots, head_dim), dtype)
        rings[prefix + "v"] = jnp.zeros((batch, kv_heads, slots, head_dim), dtype)
        rings[prefix + "score"] = jnp.zeros((batch, slots), jnp.float32)
    rings["global_count"] = jnp.zeros((batch,), jnp.int32)
    return rings


def _global_slots(max_global: int) -> int:
    """The global ring's slots: ``max_global`` entries and the spare one (module docstring)."""
    return max_global + 1 if max_global else 0


def _check_rings(rings, batch: int, kv_heads: int, head_dim: int, window: int,
                 max_global: int):
    # shapes and dtypes only: nothing is allocated at each decode step
    expected = jax.eval_shape(
        lambda: init_sga_rings(batch, window, max_global, kv_heads, head_dim))
    if not isinstance(rings, dict) or set(rings) != set(expected):
        keys = sorted(rings) if isinstance(rings, dict) else type(rings).__name__
        raise ValueError(f"rings with keys {keys}: expected the dict of init_sga_rings, keys "
                         f"{sorted(expected)}")
    for name, want in expected.items():
        if tuple(rings[name].shape) != want.shape:
            raise ValueError(f"rings[{name!r}] of shape {tuple(rings[name].shape)}: expected "
                             f"{want.shape} (batch={batch}, window={window}, max_global="
                             f"{max_global}, kv_heads={kv_heads}, head_dim={head_dim})")
        # keys and values: any float dtype (the cache's); scores exactly float32 (rounding
        # them reorders the candidates), the count an integer
        dtype = rings[name].dtype
        floating = name in ("k", "v", "global_k", "global_v")
        allowed = jnp.issubdtype(dtype, jnp.floating) if floating else dtype == want.dtype
        if not allowed:
            raise ValueError(f"rings[{name!r}] has dtype {dtype}: expected "
                             f"{'a floating-point dtype' if floating else want.dtype} "
                             "(init_sga_rings)")


# the slot axis of each ring array: keys and values are heads first
_SLOTS = {"k": 2, "v": 2, "score": 1}


def _at_slots(ring, rows, slots):
    """``ring.at`` the given ``slots`` of the given batch ``rows`` (broadcast together); the
    indexed dims come first, then any heads and features."""
    return ring.at[rows, slots] if ring.ndim == 2 else ring.at[rows, :, slots]


def _per_row_take(x, slots_BK):
    """``x[b, :, slots[b, i]]`` of a ring ``[B, Hkv, K, D]`` or ``x[b, slots[b, i]]`` of its
    scores ``[B, K]``."""
    if x.ndim == 2:
        return jnp.take_along_axis(x, slots_BK, axis=1)
    index = jnp.broadcast_to(slots_BK[:, None, :, None],
                             (x.shape[0], x.shape[1], slots_BK.shape[1], x.shape[3]))
    return jnp.take_along_axis(x, index, axis=2)


def sga_ring_decode(q, k_new, v_new, score_new, rings, index, *, window: int, max_global: int,
                    scale: float | None = None):
    """Queries ``q [B, L, H, D]`` of the new tokens at positions ``index .. index + L - 1``,
    whose keys and values ``k_new, v_new [B, L, Hkv, D]`` and controller scores
    ``score_new [B, L]`` are given, attend as :func:`jaxsparse.ops.sga.sparse_global_attention`
    does over the ``index`` positions before them, held in ``rings`` (see the module
    docstring; :func:`init_sga_rings` for the empty state), and over each other. Returns
    ``(out [B, L, H, D], rings)`` with the new tokens kept. ``L`` may be one token (generation)
    or many (a prompt); the cost of a token grows with ``window + max_global``, not with
    ``index``."""
    check_attention_inputs(q, k_new, v_new, ("q", "k_new", "v_new"))
    check_sga_options(window, max_global)
    batch, new, _, dim = q.shape
    kv_heads = k_new.shape[2]
    if tuple(score_new.shape) != (batch, new):
        raise ValueError(f"score_new {tuple(score_new.shape)}: must be [B, L] = {(batch, new)}, "
                         "one controller score per new token")
    _check_rings(rings, batch, kv_heads, dim, window, max_global)
    index = checked_first_position(index)
    dtype = rings["k"].dtype
    k_new, v_new = (x.swapaxes(1, 2).astype(dtype) for x in (k_new, v_new))  # heads first
    score_new = score_new.astype(jnp.float32)
    scale = logit_scale(scale, dim)
    if new == 1:
        out, rings = _one_token(q, k_new, v_new, score_new, rings, index, window, max_global,
                                scale)
    else:
        out, rings = _tokens(q, k_new, v_new, score_new, rings, index, window, max_global, scale)
    return out.astype(q.dtype), rings


def _one_token(q, k_new, v_new, score_new, rings, index, window, max_global, scale):
    """Generation: the token reads the window ring (after it is written in) and every valid
    global slot, in any order: no sorting by position is needed."""
    batch = q.shape[0]
    rings = dict(rings)
    slot = index % window  # holds position index - window, which leaves the window now
    if max_global:
        count = rings["global_count"]
        leaving = {name: jax.lax.dynamic_index_in_dim(rings[name], slot, axis=_SLOTS[name],
                                                      keepdims=False)
                   for name in ("k", "v", "score")}                             # [B, (Hkv, D)]
        pushed = (index >= window) & (leaving["score"] > 0)                 # [B]
        spare = count % (max_global + 1)  # written whether pushed or not (module docstring)
        for name in ("k", "v", "score"):
            ring, axis = rings["global_" + name], _SLOTS[name]
            if batch == 1:  # one sequence: a slice update (the scatter below ran 1.6x slower)
                rings["global_" + name] = jax.lax.dynamic_update_slice_in_dim(
                    ring, jnp.expand_dims(leaving[name], axis), spare[0], axis=axis)
            else:
                rings["global_" + name] = _at_slots(ring, jnp.arange(batch), spare).set(
                    leaving[name], unique_indices=True)
        rings["global_count"] = count + pushed
    for name, value in (("k", k_new), ("v", v_new), ("score", score_new)):
        rings[name] = jax.lax.dynamic_update_slice_in_dim(rings[name], value, slot,
                                                          axis=_SLOTS[name])
    # slot s holds position index - ((index - s) mod window): valid when >= 0
    window_valid = (index - (index - jnp.arange(window)) % window) >= 0
    parts = [(rings["k"], rings["v"],
              jnp.broadcast_to(window_valid[None, None, :], (batch, 1, window)), None)]
    if max_global:
        count, slot_ids = rings["global_count"][:, None], jnp.arange(max_global + 1)[None, :]
        global_valid = (slot_ids < count) & (slot_ids != count % (max_global + 1))
        bias = jax.nn.log_sigmoid(rings["global_score"])[:, None, :]
        parts.insert(0, (rings["global_k"], rings["global_v"], global_valid[:, None, :], bias))
    return _attend(q, parts, scale, kv_heads_first=True), rings


def _tokens(q, k_new, v_new, score_new, rings, index, window, max_global, scale):
    """A prompt: its queries read the rings and each other under the key sets of
    ``sga_decode``, over the keys put in position order."""
    batch, new = q.shape[:2]

    # The keys in position order: the global ring (oldest push first), the window ring
    # (positions index - window .. index - 1), the new tokens.
    win_pos = index - window + jnp.arange(window, dtype=jnp.int32)            # [W]
    win_slot = win_pos % window
    win_k, win_v = rings["k"][:, :, win_slot], rings["v"][:, :, win_slot]
    win_score = rings["score"][:, win_slot]
    win_valid = jnp.broadcast_to(win_pos >= 0, (batch, window))
    new_pos = index + jnp.arange(new, dtype=jnp.int32)
    count = rings["global_count"]
    parts_k, parts_v, parts_score, parts_valid = [win_k, k_new], [win_v, v_new], \
        [win_score, score_new], [win_valid, jnp.ones((batch, new), bool)]
    positions = jnp.concatenate([win_pos, new_pos])                          # [W + L]
    if max_global:
        pushes = count[:, None] - max_global + jnp.arange(max_global, dtype=jnp.int32)[None, :]
        slots = pushes % (max_global + 1)
        parts_k.insert(0, _per_row_take(rings["global_k"], slots))
        parts_v.insert(0, _per_row_take(rings["global_v"], slots))
        parts_score.insert(0, _per_row_take(rings["global_score"], slots))
        parts_valid.insert(0, pushes >= 0)
        # older than every window position, and so eligible for every new query
        positions = jnp.concatenate([index - window - max_global
                                     + jnp.arange(max_global, dtype=jnp.int32), positions])
    keys, values = jnp.concatenate(parts_k, axis=2), jnp.concatenate(parts_v, axis=2)
    scores, valid = jnp.concatenate(parts_score, axis=1), jnp.concatenate(parts_valid, axis=1)

    # the key sets of sga_decode, over these keys
    t = new_pos[None, :, None]                                               # [1, L, 1]
    j = positions[None, None, :]                                             # [1, 1, K]
    valid = valid[:, None, :]
    local = valid & (j <= t) & (j > t - window)                              # [B, L, K]
    candidate = valid & (scores > 0)[:, None, :] & (j <= t - window)
    newer = jnp.cumsum(candidate[..., ::-1], axis=-1)[..., ::-1] - candidate
    glob = candidate & (newer < max_global)
    bias = jnp.where(glob, jax.nn.log_sigmoid(scores)[:, None, :], 0.0)
    out = _attend(q, [(keys, values, local | glob, bias)], scale, kv_heads_first=True)

    # Keep the new tokens: the window ring takes the last `window` positions; the positions
    # that left it (index - window .. index - window + L - 1, the first L of the window ring
    # and the new tokens in order) push their candidates onto the global ring. A global
    # slot's push number is fixed, so the entries that stay keep their slots; of more than
    # max_global new candidates only the last max_global are written (no two to one slot).
    keep = min(new, window)
    kept_slots = (index + new - keep + jnp.arange(keep, dtype=jnp.int32)) % window
    rings = dict(rings)
    rings["k"] = rings["k"].at[:, :, kept_slots].set(k_new[:, :, new - keep:])
    rings["v"] = rings["v"].at[:, :, kept_slots].set(v_new[:, :, new - keep:])
    rings["score"] = rings["score"].at[:, kept_slots].set(score_new[:, new - keep:])
    if max_global:
        leaving = slice(max_global, max_global + new)                        # the first L
        pushed = valid[:, 0, leaving] & (scores[:, leaving] > 0)             # [B, L]
        rank = jnp.cumsum(pushed, axis=1, dtype=jnp.int32) - 1
        total = rank[:, -1] + 1
        written = pushed & (rank >= total[:, None] - max_global)
        # a slot past the ring for the others: dropped by the scatter
        target = jnp.where(written, (count[:, None] + rank) % (max_global + 1), max_global + 1)
        rows = jnp.arange(batch)[:, None]
        for name, source in (("global_k", keys[:, :, leaving].swapaxes(1, 2)),
                             ("global_v", values[:, :, leaving].swapaxes(1, 2)),
                             ("global_score", scores[:, leaving])):
            rings[name] = _at_slots(rings[name], rows, target).set(source, mode="drop")
        rings["global_count"] = count + total
    return out, rings


__all__ = ["init_sga_rings", "sga_ring_decode"]
