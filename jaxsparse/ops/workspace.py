"""Workspace memory, Hydra's "reasoning workspace" (Chaudhary & Browning 2025): ``M`` latent
slots that tokens read by attention and that are rewritten chunk by chunk with a gate.

The sequence is cut into chunks of ``K`` tokens. Tokens of chunk ``c`` read the state
``S_c``, which summarises chunks ``0 .. c-1`` only, so a token's read never depends on its own
chunk's later tokens nor on any later chunk (causal). After the chunk, each slot attends over
the chunk's tokens and a per-slot, per-feature gate mixes the result into the state:

    u   = softmax(S_c Wq · (X_c Wk)ᵀ / √D) · X_c Wv        (slots read the chunk)
    g   = σ([S_c, u] Wg + bg)
    S_{c+1} = g ⊙ S_c + (1 − g) ⊙ u

The paper describes the workspace without equations; this gated slot update (in the spirit of
Set-Transformer/Perceiver latents with a GRU-like gate) is our choice, documented here.

Packed documents (``segment_ids``, runs of equal ids as in :mod:`jaxsparse.ops.segments`): the
workspace restarts from its initial slots at every document start. A token reads ``S_c`` only
if its document was already open when chunk ``c`` began, else the initial slots; the update
after chunk ``c`` starts from the initial slots if a document starts inside the chunk and uses
only the tokens of the document still open at the chunk's end. So no document reads another's
tokens. Chunks stay aligned to absolute positions: a document that starts mid-chunk gets its
first update at the next chunk boundary, after fewer than ``K`` of its tokens (alone at the
start of a row it would get it after ``K``); it reads only itself either way.

Precision: the slot state and its recurrence (``Wq``, the gate) are float32 — it is carried
across every chunk of the sequence, where bfloat16 rounding would compound. The work that scales
with the sequence, projecting every token's key and value and every token's read of the slots,
runs in the dtype of ``x`` and of ``Wk``/``Wv`` (bfloat16 under a bfloat16 model), the reads
accumulating in float32 (:mod:`jaxsparse.ops.mixed_precision`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.checks import is_integer
from jaxsparse.ops.mixed_precision import matmul_f32, weighted_sum
from jaxsparse.ops.segments import check_segment_ids, document_starts
from jaxsparse.ops.sizes import round_up


WEIGHT_NAMES = ("wq", "wk", "wv", "wg", "bg")


def check_weights(weights, width: int) -> None:
    """``weights`` holds ``wq, wk [d, e]``, ``wv [d, d]``, ``wg [2d, d]`` and ``bg [d]`` for
    slots of width ``d``."""
    missing = [name for name in WEIGHT_NAMES if name not in weights]
    if missing:
        raise ValueError(f"weights lack {missing}: need {list(WEIGHT_NAMES)}")
    wq = weights["wq"]
    if wq.ndim != 2 or wq.shape[0] != width:
        raise ValueError(f"weights['wq'] has shape {wq.shape}; must be [d={width}, key dim]")
    expected = {"wk": wq.shape, "wv": (width, width), "wg": (2 * width, width), "bg": (width,)}
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise ValueError(f"weights[{name!r}] has shape {weights[name].shape}; must be "
                             f"{shape} (slot width d={width}, key dim {wq.shape[1]})")


def read_slots(queries_BKD, state_BMD):
    """Each query attends over the slots: ``[B, K, D]`` float32, computed in the queries' dtype."""
    slots = state_BMD.astype(queries_BKD.dtype)
    logits = matmul_f32("bkd,bmd->bkm", queries_BKD, slots) * queries_BKD.shape[-1] ** -0.5
    return weighted_sum("bkm,bmd->bkd", jax.nn.softmax(logits, axis=-1), slots)


def workspace_update(state_BMD, chunk_BKD, weights, valid_BK=None):
    """One chunk's gated rewrite of the slots; ``valid_BK`` leaves padding tokens out (a chunk
    with no valid token leaves the state unchanged)."""
    if (state_BMD.ndim != 3 or chunk_BKD.ndim != 3 or chunk_BKD.shape[0] != state_BMD.shape[0]
            or chunk_BKD.shape[2] != state_BMD.shape[2]):
        raise ValueError(f"state {state_BMD.shape} and chunk {chunk_BKD.shape}: must be "
                         "[batch, slots, d] and [batch, chunk, d]")
    check_weights(weights, state_BMD.shape[2])
    keys = jnp.einsum("bkd,de->bke", chunk_BKD, weights["wk"])
    values = jnp.einsum("bkd,de->bke", chunk_BKD, weights["wv"])
    return update_from_keys(state_BMD, keys, values, weights, valid_BK)


def update_from_keys(state_BMD, keys_BKE, values_BKE, weights, valid_BK=None):
    """:func:`workspace_update` given the chunk's projected keys and values."""
    # the recurrence runs in the state's dtype (float32 under a bfloat16 model): one chunk's
    # keys and values are cast, rather than mixed-dtype matmuls left for XLA to upcast
    keys_BKE, values_BKE = (t.astype(state_BMD.dtype) for t in (keys_BKE, values_BKE))
    q = jnp.einsum("bmd,de->bme", state_BMD, weights["wq"])
    logits = jnp.einsum("bme,bke->bmk", q, keys_BKE) * q.shape[-1] ** -0.5
    if valid_BK is not None:
        logits = jnp.where(valid_BK[:, None, :], logits, -1e30)
    u = jnp.einsum("bmk,bke->bme", jax.nn.softmax(logits, axis=-1), values_BKE)
    g = jax.nn.sigmoid(jnp.einsum("bmf,fd->bmd", jnp.concatenate([state_BMD, u], axis=-1),
                                  weights["wg"]) + weights["bg"][None, None, :])
    new = g * state_BMD + (1 - g) * u
    if valid_BK is None:
        return new
    return jnp.where(jnp.any(valid_BK, axis=1)[:, None, None], new, state_BMD)


def workspace_memory(x_BLD, queries_BLD, init_MD, weights, *, chunk: int, segment_ids=None):
    """Reads ``[B, L, D]`` (float32): token ``t`` of chunk ``c`` reads ``S_c`` with its query,
    and the final state ``[B, M, D]``. ``x`` feeds the updates, ``queries`` the reads;
    ``segment_ids [B, L]``: packed documents (see the module docstring).

    Only the slot recurrence is sequential: the chunks' keys and values are projected for the
    whole sequence at once before the scan, and the reads of every chunk are one batched
    attention over the stacked states after it (inside a ``lax.scan`` each of these was a
    small per-chunk matmul, in the backward pass too)."""
    if not is_integer(chunk) or chunk < 1:
        raise ValueError(f"chunk={chunk!r}: must be an integer >= 1")
    if x_BLD.ndim != 3:
        raise ValueError(f"x must be [batch, length, d]; got {x_BLD.shape}")
    b, length, d = x_BLD.shape
    if queries_BLD.shape != x_BLD.shape:
        raise ValueError(f"x {x_BLD.shape} and queries {queries_BLD.shape} must agree on the "
                         "width (one shape)")
    if init_MD.ndim != 2 or init_MD.shape[1] != d:
        raise ValueError(f"init_MD (the initial slots) must be [slots, d={d}]; got "
                         f"{init_MD.shape}")
    check_weights(weights, d)
    padded = round_up(length, chunk)
    chunks = padded // chunk  # (explicit sizes, never -1: the batch or length may be 0)
    pad = [(0, 0), (0, padded - length), (0, 0)]
    by_chunk = lambda t: jnp.pad(t, pad).reshape(b, chunks, chunk, t.shape[-1]).swapaxes(0, 1)  # noqa: E731
    keys, values = by_chunk(x_BLD @ weights["wk"]), by_chunk(x_BLD @ weights["wv"])
    # only a ragged last chunk has padding to mask: without one, no masking ops in the scan
    valid = (None if padded == length else jnp.broadcast_to(
        (jnp.arange(padded) < length).reshape(chunks, 1, chunk), (chunks, b, chunk)))
    state0 = jnp.broadcast_to(init_MD[None], (b, *init_MD.shape)).astype(jnp.float32)
    documents = None
    if segment_ids is not None:
        documents = _chunk_documents(check_segment_ids(segment_ids, b, length), padded, chunk)
        valid = documents["open_at_end"] if valid is None else valid & documents["open_at_end"]

    def step(state, inputs):
        k_c, v_c, valid_c, restart_c = inputs
        base = state if restart_c is None else jnp.where(restart_c[:, None, None], state0, state)
        return update_from_keys(base, k_c, v_c, weights, valid_c), state  # S_c is read

    restart = None if documents is None else documents["restart"]
    final, read_states = jax.lax.scan(step, state0, (keys, values, valid, restart))  # [C, B, M, D]
    states = read_states.swapaxes(0, 1).reshape(b * chunks, *init_MD.shape)
    queries = jnp.pad(queries_BLD, pad).reshape(b * chunks, chunk, d)
    reads = read_slots(queries, states).reshape(b, padded, d)  # every chunk's reads at once
    if documents is not None:  # tokens whose document opened in this chunk read the initial slots
        fresh_reads = read_slots(queries.reshape(b, padded, d), state0)
        reads = jnp.where(documents["fresh"][..., None], fresh_reads, reads)
    return reads[:, :length], final


def _chunk_documents(segment_ids, padded: int, chunk: int):
    """Per chunk, for packed documents: ``restart [C, B]`` (a document starts in the chunk),
    ``open_at_end [C, B, K]`` (the token belongs to the document still open at the chunk's
    end) and, per token, ``fresh [B, padded]`` (its document started in its own chunk)."""
    b, length = segment_ids.shape
    starts = jnp.pad(document_starts(segment_ids), [(0, 0), (0, padded - length)])
    starts = starts.reshape(b, padded // chunk, chunk)
    k = jnp.arange(chunk)[None, None, :]
    last_start = jnp.max(jnp.where(starts, k, -1), axis=-1)       # [B, C], -1: none
    fresh = jnp.cumsum(starts, axis=-1) > 0                        # a start at or before k
    return {"restart": jnp.any(starts, axis=-1).swapaxes(0, 1),
            "open_at_end": (k >= last_start[..., None]).swapaxes(0, 1),
            "fresh": fresh.reshape(b, padded)}
