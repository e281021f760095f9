"""Sparse global attention (SGA), Hydra's long-range path (Chaudhary & Browning 2025): each
query reads a causal local window plus a small set of *global* tokens picked by a lightweight
controller.

Causal safety. Picking "the top-G tokens of the sequence" would leak the future (whether a
past token is picked would depend on later tokens' scores). Here a token is a global
candidate when its own controller score is positive — a function of that token alone — and
query ``t`` reads the ``G`` most recent candidates older than its local window
(``j ≤ t - window``), found by ranks (a running count of candidates), so everything query
``t`` reads depends only on positions ``≤ t``. The controller learns through the attention
logits: each global key's logit gets ``log σ(score)``, so a token that is useful as a global
key is pushed to score higher. Cost ``O(L · (window + G) · d)``.

Packed documents (``segment_ids``): a query reads only keys of its own document (the run of
equal ids it is in, :mod:`jaxsparse.ops.segments`). Its window is cut at the document's first
token, and since its global keys are the most recent candidates, dropping those before the
document's start leaves exactly the ``G`` most recent candidates of the document.

Precision: the matmuls take ``q, k, v`` in their own dtype (bfloat16 under a bfloat16 model)
and accumulate in float32, the softmax and the controller's log-sigmoid bias are float32
(:mod:`jaxsparse.ops.mixed_precision`); the result has ``q``'s dtype. The ``core`` path's
window computes as the attention core does (the Pallas kernels likewise take bfloat16
operands; the CPU paths compute in float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.ops.attention.api import (check_attention_inputs, dot_product_attention,
                                         logit_scale)
from jaxsparse.ops.attention.decode import checked_cache_lengths, nan_past_the_cache
from jaxsparse.ops.attention.online_softmax import merge_finished
from jaxsparse.ops.attention.reference import (grouped_query_rows, row_logsumexp,
                                               ungrouped_rows)
from jaxsparse.ops.checks import check_integer
from jaxsparse.ops.masks import LocalMask
from jaxsparse.ops.mixed_precision import matmul_f32, weighted_sum
from jaxsparse.ops.segments import check_segment_ids, document_first_position, document_index
from jaxsparse.ops.softmax import masked_softmax


def recent_candidates(selected_BL, upto_BL, count: int):
    """Positions ``[B, T, count]`` (oldest first) of the last ``count`` selected positions
    ``≤ upto[b, t]`` for ``upto [B, T]``, and their validity."""
    b, length = selected_BL.shape
    rank = jnp.cumsum(selected_BL.astype(jnp.int32), axis=1)        # candidates in [0, j]
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    # position of the r-th candidate (1-based), via a scatter: rank r at selected positions
    table = jnp.zeros((b, length + 1), jnp.int32).at[
        jnp.arange(b)[:, None], jnp.where(selected_BL, rank, 0)].set(pos)
    have = jnp.where(upto_BL >= 0, jnp.take_along_axis(rank, jnp.maximum(upto_BL, 0), axis=1), 0)
    wanted = have[..., None] - count + 1 + jnp.arange(count, dtype=jnp.int32)[None, None]
    valid = wanted >= 1
    positions = jnp.take_along_axis(table, jnp.maximum(wanted, 0).reshape(b, -1), axis=1)
    return positions.reshape(*upto_BL.shape, count), valid


def _gather(x_BLHD, pos_BLK):
    """``x[b, pos[b, t, i]]`` for every head: ``[B, L, H, K, D]``."""
    return jax.vmap(lambda x, p: x[p], in_axes=(0, 0))(x_BLHD, pos_BLK).transpose(0, 1, 3, 2, 4)


def _attend(q, parts, scale: float, with_lse: bool = False, kv_heads_first: bool = False):
    """One masked softmax attention of ``q [B, n, H, D]`` over the keys of all ``parts``, each
    ``(keys, values [B, K, Hkv, D], allowed [B, n, K] bool, bias)`` with a float32 logit
    ``bias`` broadcastable to ``[B, n, K]`` or None; float32 ``[B, n, H, D]``, and with
    ``with_lse`` each row's log-sum-exp and whether it had any key (``[B, n, H]``).
    ``kv_heads_first``: keys and values are ``[B, Hkv, K, D]`` (the decode rings' layout: a
    step reads each head's slots together, where XLA:CPU would first copy ``[B, K, Hkv, D]``
    into that order).

    GQA (``H`` a multiple of ``Hkv``): the ``G = H / Hkv`` query heads of a key/value head
    are stacked as ``G·n`` rows of one matmul per (batch, key/value head), as the attention
    core's reference does, so K and V (and a decode cache) are never repeated per query head;
    the masks and biases meet the logits in a ``[B, Hkv, G, n, K]`` view.

    Layouts, timed on XLA:CPU: heads before queries in the logits (the backward of
    ``[B, n, H, K]`` ran 2.4× slower); each part its own logits matmul, concatenated; and
    without GQA no 5-d view at all (with a unit group axis, a hydra_29m-shaped training step
    of the blocked path ran 0.7× as fast)."""
    b, n, heads, dim = q.shape
    kv_heads = parts[0][0].shape[1 if kv_heads_first else 2]
    kv = "bhkd" if kv_heads_first else "bkhd"
    groups = heads // kv_heads
    rows = grouped_query_rows(q, kv_heads)                            # [B, Hkv, G·n, D]
    if groups > 1:
        view = lambda x: x.reshape(b, kv_heads, groups, n, x.shape[-1])  # noqa: E731
        per_query = lambda x: x[:, None, None]                          # noqa: E731
    else:
        view = lambda x: x                                              # noqa: E731
        per_query = lambda x: x[:, None]                                # noqa: E731
    logits, masks = [], []
    for keys, _, allowed, bias in parts:
        part = view(matmul_f32(f"bhmd,{kv}->bhmk", rows, keys) * scale)
        logits.append(part if bias is None else part + per_query(bias))
        masks.append(per_query(allowed))
    cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=-1)  # noqa: E731
    logits, mask = cat(logits), cat(masks)
    probs = masked_softmax(logits, mask).reshape(b, kv_heads, groups * n, -1)
    if kv_heads_first and len(parts) > 1:
        # decode rings: each part's values read where they lie; concatenated, every slot of
        # every ring would be copied at every step (a step at 8 heads, 768 slots,
        # batch 4: 2.3 ms concatenated, 0.76 ms apart; bench decode)
        bounds = np.cumsum([p[0].shape[2] for p in parts])[:-1]
        out = sum(weighted_sum(f"bhmk,{kv}->bhmd", weights, p[1])
                  for weights, p in zip(jnp.split(probs, bounds, axis=-1), parts))
    else:
        values = parts[0][1] if len(parts) == 1 else jnp.concatenate([p[1] for p in parts],
                                                                     axis=1)
        out = weighted_sum(f"bhmk,{kv}->bhmd", probs, values)         # [B, Hkv, G·n, D]
    out = ungrouped_rows(out, n)
    if not with_lse:
        return out
    lse = row_logsumexp(logits, mask).reshape(b, kv_heads, groups, n)
    lse = lse.transpose(0, 3, 1, 2).reshape(b, n, heads)
    nonempty = jnp.any(cat([p[2] for p in parts]), axis=-1)             # [B, n]
    return out, lse, jnp.broadcast_to(nonempty[:, :, None], (b, n, heads))


def key_sets(scores_BL, length: int, window: int, max_global: int, first_BL=None):
    """The local and global key positions of every query, with validity and logit biases;
    ``first_BL``: the first position of each query's document (packed documents)."""
    b = scores_BL.shape[0]
    t = jnp.arange(length, dtype=jnp.int32)
    local = t[:, None] - window + 1 + jnp.arange(window, dtype=jnp.int32)[None, :]
    local_valid = jnp.broadcast_to(local >= 0, (b, length, window))
    local = jnp.broadcast_to(jnp.maximum(local, 0), (b, length, window))
    upto = jnp.broadcast_to(t - window, (b, length))
    glob, glob_valid = recent_candidates(scores_BL > 0, upto, max_global)
    bias = jax.nn.log_sigmoid(jnp.take_along_axis(scores_BL.astype(jnp.float32),
                                                  glob.reshape(b, -1), axis=1)).reshape(glob.shape)
    positions = jnp.concatenate([local, glob], axis=-1)
    valid = jnp.concatenate([local_valid, glob_valid], axis=-1)
    if first_BL is not None:
        valid = valid & (positions >= first_BL[:, :, None])
    biases = jnp.concatenate([jnp.zeros(local.shape, jnp.float32), bias], axis=-1)
    return positions, valid, biases


def check_sga_options(window, max_global, block=1):
    """The integer options of SGA: ``window >= 1``, ``max_global >= 0``, ``block >= 1``."""
    for name, value, low in (("window", window, 1), ("max_global", max_global, 0),
                             ("block", block, 1)):
        check_integer(name, value, low)


SGA_IMPLEMENTATIONS = (None, "gather", "dense", "blocked", "core")


def _blocked(q, k, v, scores, window: int, max_global: int, scale: float, block: int,
             first=None, with_local: bool = True):
    """Query blocks of ``block`` tokens share their keys: the contiguous span of the block's
    local windows (``window + block - 1`` keys, a slice) and the ``max_global + block``
    most recent candidates before the last query's window, which contain every query's own
    ``max_global``; per-query masks pick each query's exact set. Memory per block is
    ``O(block · (window + max_global + 2·block))``, each block is rematerialised in the
    backward pass, and the work is dense matmuls.

    ``with_local=False`` (needs ``max_global > 0``): the attention over the global keys only,
    returned as ``(out [B, L, H, D] float32, lse [B, L, H], any [B, L, H])`` — each row's
    log-sum-exp and whether it had a global key at all — for merging with the window's."""
    b, length, heads, dim = q.shape
    nblocks = -(-length // block)
    padded = nblocks * block
    pad_end = lambda x: jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    q, scores = pad_end(q), pad_end(scores)
    first = None if first is None else pad_end(first)
    front = [(0, 0), (window - 1, padded - length)] + [(0, 0)] * 2
    k_local, v_local = jnp.pad(k, front), jnp.pad(v, front)         # position p at p + w - 1
    selected = scores > 0
    rank = jnp.cumsum(selected.astype(jnp.int32), axis=1)           # candidates in [0, j]
    t = jnp.arange(padded, dtype=jnp.int32)
    have = jnp.where(t >= window, rank[:, jnp.maximum(t - window, 0)], 0)  # [B, padded]
    starts = jnp.arange(nblocks, dtype=jnp.int32) * block
    g_count = max_global + block if max_global else 0
    if g_count:
        upto = jnp.broadcast_to(starts + block - 1 - window, (b, nblocks))
        g_pos, g_valid = recent_candidates(selected, upto, g_count)  # [B, nblocks, G + bq]
    log_sig = jax.nn.log_sigmoid(scores.astype(jnp.float32))
    span = window + block - 1

    @jax.checkpoint
    def one_block(i):
        t0 = starts[i]
        tq = t0 + jnp.arange(block, dtype=jnp.int32)                 # query positions
        q_blk = jax.lax.dynamic_slice_in_dim(q, t0, block, axis=1)
        k_loc = jax.lax.dynamic_slice_in_dim(k_local, t0, span, axis=1)
        v_loc = jax.lax.dynamic_slice_in_dim(v_local, t0, span, axis=1)
        j = t0 - window + 1 + jnp.arange(span, dtype=jnp.int32)      # local key positions
        local_ok = (j[None, :] >= 0) & (j[None, :] <= tq[:, None]) & (j[None, :] > tq[:, None] - window)
        local_ok = jnp.broadcast_to(local_ok[None], (b, block, span))
        if first is not None:  # packed documents: keys from the query's document only
            first_q = jax.lax.dynamic_slice_in_dim(first, t0, block, axis=1)  # [B, bq]
            local_ok = local_ok & (j[None, None, :] >= first_q[:, :, None])
        parts = []
        if with_local:
            parts.append((k_loc, v_loc, local_ok, None))
        if g_count:
            pos, ok = g_pos[:, i], g_valid[:, i]                     # [B, G + bq]
            rows = lambda x: jax.vmap(lambda xb, pb: xb[pb])(x, pos)  # noqa: E731
            have_q = jax.lax.dynamic_slice_in_dim(have, t0, block, axis=1)  # [B, bq]
            r = jnp.take_along_axis(rank, pos, axis=1)               # rank of each candidate
            glob_ok = (ok[:, None, :] & (pos[:, None, :] <= tq[None, :, None] - window)
                       & (r[:, None, :] > have_q[:, :, None] - max_global))  # [B, bq, G + bq]
            if first is not None:
                glob_ok = glob_ok & (pos[:, None, :] >= first_q[:, :, None])
            bias = jnp.take_along_axis(log_sig, pos, axis=1)[:, None, :]
            parts.append((rows(k), rows(v), glob_ok, bias))          # keys [B, G + bq, Hkv, D]
        return _attend(q_blk, parts, scale, with_lse=not with_local)

    def unblock(x):  # [nblocks, B, bq, ...] -> [B, L, ...]
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape(b, padded, *x.shape[3:])[:, :length]

    if not with_local:
        return tuple(map(unblock, jax.lax.map(one_block, jnp.arange(nblocks))))
    return unblock(jax.lax.map(one_block, jnp.arange(nblocks))).astype(q.dtype)


def _core(q, k, v, scores, window: int, max_global: int, scale: float, block: int,
          segment_ids=None, first=None):
    """The window through the library's block-sparse attention (the Pallas kernel on GPU and
    TPU, the block-skipping XLA path on CPU: a ``LocalMask`` is a static band of tiles), the
    global keys — data-dependent, so no static mask can list them — as query blocks against
    their gathered candidates, and the two softmaxes merged by their log-sum-exps. A query's
    window always holds its own position, so the window's part is never empty."""
    # The attention core reads equal ids as one document; here a document is a run of equal
    # ids (ids may recur: [0, 0, 1, 1, 0, 0] is three), so it gets the runs' numbers: with the
    # raw ids the third document's window read the first's keys.
    runs = None if segment_ids is None else document_index(segment_ids)
    out_local, lse_local = dot_product_attention(
        q, k, v, mask=LocalMask(window - 1, 0), segment_ids=runs, scale=scale, return_lse=True)
    if not max_global:
        return out_local
    global_part = _blocked(q, k, v, scores, window, max_global, scale, block, first,
                           with_local=False)
    return merge_finished([(out_local, lse_local, None), global_part]).astype(q.dtype)


def sparse_global_attention(q, k, v, scores, *, window: int, max_global: int,
                            scale: float | None = None, implementation: str | None = None,
                            block: int = 128, segment_ids=None):
    """``q [B, L, H, D]``, ``k, v [B, L, Hkv, D]`` (``H`` a multiple of ``Hkv``: GQA, never
    repeating K/V), controller ``scores [B, L]`` (a token is a global candidate when its
    score is > 0) -> ``[B, L, H, D]``: one softmax over the ``window`` most recent
    keys and the ``max_global`` most recent candidates before that window; with
    ``segment_ids [B, L]`` (packed documents) only those of the query's own document.

    ``"gather"`` gathers each query's ``window + max_global`` keys (``O(L·(w+G))``, but a
    ``[B, L, Hkv, w+G, D]`` intermediate); ``"dense"`` masks the full ``L × L`` logits
    (``O(L²)``, plain matmuls: on CPU ~10× faster than the gathers and their scatter-add
    gradients at ``L = 128``); ``"blocked"`` runs query blocks of ``block`` tokens against
    shared key spans (``O(L·(w+G+2·block))`` matmuls, memory bounded per block); ``"core"``
    runs the window on the block-sparse attention core (Pallas on GPU/TPU) and only the global
    keys in query blocks, merging the two by log-sum-exp. ``None`` picks dense while
    ``L ≤ 2·(w+G)`` (at most twice the sparse work) and blocked beyond."""
    if implementation not in SGA_IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: allowed {SGA_IMPLEMENTATIONS}")
    check_attention_inputs(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"k, v {k.shape} must have q's length {q.shape[1]} (self-attention)")
    if scores.shape != q.shape[:2]:
        raise ValueError(f"scores {scores.shape}: must be [B, L] = {q.shape[:2]}")
    check_sga_options(window, max_global, block)
    scale = logit_scale(scale, q.shape[-1])  # core: static (the attention core checks it)
    length = q.shape[1]
    first = (None if segment_ids is None else document_first_position(
        check_segment_ids(segment_ids, *q.shape[:2])))
    if q.shape[0] == 0:  # an empty batch: nothing to attend (the paths divide by the size)
        return jnp.zeros(q.shape, q.dtype)
    if implementation is None:
        implementation = "dense" if length <= 2 * (window + max_global) else "blocked"
    if implementation == "blocked":
        return _blocked(q, k, v, scores, window, max_global, scale, min(block, length), first)
    if implementation == "core":
        return _core(q, k, v, scores, window, max_global, scale, min(block, length),
                     segment_ids, first)
    if implementation == "dense":
        lengths = jnp.full((q.shape[0],), length, jnp.int32)
        return sga_decode(q, k, v, scores, lengths, window=window, max_global=max_global,
                          scale=scale, first_positions=first)
    positions, valid, biases = key_sets(scores, length, window, max_global, first)
    keys, values = _gather(k, positions), _gather(v, positions)      # [B, L, Hkv, K, D]
    b, heads, kv_heads = q.shape[0], q.shape[2], k.shape[2]
    q_grouped = q.reshape(b, length, kv_heads, heads // kv_heads, -1)  # [B, L, Hkv, G, D]
    logits = matmul_f32("blhgd,blhkd->blhgk", q_grouped, keys) * scale
    logits = logits + biases[:, :, None, None, :]
    weights = masked_softmax(logits, valid[:, :, None, None, :], axis=-1)
    out = weighted_sum("blhgk,blhkd->blhgd", weights, values)
    return out.reshape(q.shape).astype(q.dtype)


def sga_decode(q, k_cache, v_cache, scores_cache, lengths, *, window: int, max_global: int,
               scale: float | None = None, first_positions=None):
    """Queries ``q [B, n, H, D]`` at positions ``lengths - n .. lengths - 1`` against caches
    ``[B, S, Hkv, D]`` (GQA: each read once for its ``H / Hkv`` query heads) and controller
    scores ``[B, S]`` holding positions ``0 .. lengths - 1``: the same key sets as
    :func:`sparse_global_attention`, as masks over the cache. ``first_positions [B, S]``
    (packed documents): the first position of the document of every cache position; a query
    reads no key before its own document's first position."""
    check_attention_inputs(q, k_cache, v_cache, ("q", "k_cache", "v_cache"))
    check_sga_options(window, max_global)
    batch, new, _, dim = q.shape
    slots = k_cache.shape[1]
    if scores_cache.shape != (batch, slots):
        raise ValueError(f"scores_cache {scores_cache.shape}: must be [B, S] = {(batch, slots)}, "
                         "one controller score per cache slot")
    if first_positions is not None and first_positions.shape != (batch, slots):
        raise ValueError(f"first_positions {first_positions.shape}: must be [B, S] = "
                         f"{(batch, slots)}")
    lengths = checked_cache_lengths(lengths, batch, new, slots)
    q_pos = lengths.reshape(batch, 1) - new + jnp.arange(new)[None, :]
    j = jnp.arange(slots)[None, None, :]
    t = q_pos[:, :, None]
    local = (j <= t) & (j > t - window)                               # [B, n, S]
    candidate = (scores_cache > 0)[:, None, :] & (j <= t - window)
    if first_positions is not None:
        first_q = jnp.take_along_axis(first_positions, jnp.maximum(q_pos, 0), axis=1)  # [B, n]
        in_document = j >= first_q[:, :, None]
        local, candidate = local & in_document, candidate & in_document
    newer = jnp.cumsum(candidate[..., ::-1], axis=-1)[..., ::-1] - candidate
    glob = candidate & (newer < max_global)
    bias = jnp.where(glob, jax.nn.log_sigmoid(scores_cache.astype(jnp.float32))[:, None, :], 0.0)
    scale = logit_scale(scale, dim)
    out = _attend(q, [(k_cache, v_cache, local | glob, bias)], scale).astype(q.dtype)
    return nan_past_the_cache(out, lengths, new, slots)  # traced lengths past the cache
