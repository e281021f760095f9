"""Context-parallel (ring) attention: queries, keys and values split along the sequence.

Each of the ``n`` devices on the mesh axis holds one chunk of the sequence. Keys and values
travel around the ring (``ppermute`` to the next device) for ``n`` steps; at every step a
device scores its own queries against the key/value chunk it holds and folds the result into a
running (max, sum, output) online softmax, so no device ever holds more than two chunks of keys
and values (Liu et al. 2023, "Ring Attention with Blockwise Transformers"; the online softmax
of Milakov & Gimelshein 2018).

Masks are evaluated from global positions (``Mask.allowed`` on the positions a device holds),
so causal, sliding-window, chunked, strided, global-token and per-head masks all work, and
segment ids travel with their keys. Inside a step the device's queries and the keys it holds
are worked in parts of about ``PART_TARGET`` tokens (an even number of parts where the chunk
lengths are even), a scan over query parts around a scan over key parts, and with the folds
checkpointed only one pair's logits are alive at a time, forward and backward, however long
the chunks (FlashAttention's tiling, at the XLA level). Which part pairs each device works at
each step is known from the mask's block table before tracing (:func:`ring_pair_kinds`): a
pair the mask leaves empty (or packed documents do) skips its matmuls, a pair it leaves full
folds without evaluating the mask, and a step at which no device has work — the far shards of
a sliding window — is left out of the ring with its exchange: a causal window over ``n``
devices takes 2 steps, not ``n``.

Layouts. ``"contiguous"``: device ``i`` holds chunk ``i``. Under a causal mask that is
unbalanced: at every step after the first some device holds keys from its past and works a
whole chunk pair while the others idle, so the ring takes ``n`` chunk pairs of time for
``n(n+1)/2`` pairs of work. ``"zigzag"`` (the load-balanced layout of Llama 3's context
parallelism and of ring-flash-attention): the sequence is cut into ``2n`` halves and device
``i`` holds halves ``i`` and ``2n-1-i``, one early and one late, so at every step after the
first each device works exactly two of its four half pairs: about ``(n+1)/2`` chunk pairs of
time. The op takes and returns contiguous shards either way: two ``ppermute`` of each input
half (even and odd halves are each a permutation of the devices) move the halves into the
zig-zag order, and two move the output back. ``layout=None`` picks the layout whose critical
path (the per-step maximum over devices of non-empty part pairs, summed over steps, from the
mask's block table) is shorter, contiguous on a tie: zig-zag for causal masks, contiguous for
sliding windows, whose work is already local.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxsparse.ops.attention.api import (attention_segments, check_attention_inputs,
                                         lazy_mask, static_logit_options)
from jaxsparse.ops.attention.online_softmax import empty_state, finish, fold_block
from jaxsparse.ops.attention.reference import soft_cap
from jaxsparse.ops.masks import (EMPTY, FULL, PARTIAL, Mask, MultiHeadMask,
                                 cached_block_table)
from jaxsparse.ops.mixed_precision import matmul_f32, weighted_sum

RING_LAYOUTS = (None, "contiguous", "zigzag")
# Each shard's queries and keys are worked in parts of at most about this many tokens: an empty
# pair of parts is skipped, and only one pair's logits ([B, H, part, part] floats) are alive
# at a time, forward and backward, however long the shard. 256 rather than 512: on 4 emulated
# CPU devices, 8k tokens, forward + backward took 1835 against 2390 ms causal (zig-zag) and 490
# against 681 ms under a 512-token window (jaxsparse bench ring --part-tokens, same host).
PART_TARGET = 256


def _allowed(mask, q_len, kv_len, q_pos, kv_pos):
    """Boolean ``[H or 1, Sq, Tc]`` for global positions ``q_pos [Sq]`` x ``kv_pos [Tc]``."""
    if mask is None:
        return jnp.ones((1, q_pos.size, kv_pos.size), bool)
    rows, cols = q_pos[:, None], kv_pos[None, :]
    if isinstance(mask, MultiHeadMask):
        return jnp.stack([jnp.broadcast_to(m.allowed_fn(q_len, kv_len)(rows, cols),
                                           (q_pos.size, kv_pos.size)) for m in mask.masks])
    return jnp.broadcast_to(mask.allowed_fn(q_len, kv_len)(rows, cols),
                            (q_pos.size, kv_pos.size))[None]


def split_parts(q_chunk: int, kv_chunk: int, part_tokens: int = PART_TARGET) -> int:
    """Parts per shard: a common divisor of both shard lengths, even where both are even (so
    that halves, and zig-zag, work), whose longer part is nearest ``part_tokens`` on a log
    scale (the finer on a tie): a length with few divisors gets a few long parts rather than
    thousands of tiny ones."""
    common = math.gcd(q_chunk, kv_chunk)
    divisors = {d for i in range(1, math.isqrt(common) + 1) if common % i == 0
                for d in (i, common // i)}
    if common % 2 == 0:
        divisors = {d for d in divisors if d % 2 == 0}
    longest = max(q_chunk, kv_chunk)
    return min(divisors, key=lambda d: (abs(math.log(longest / d / part_tokens)), -d))


def held_part(layout: str, n: int, parts: int, device, p):
    """Index (among the sequence's ``n * parts`` parts) of the ``p``-th part that ``device``
    holds; ``device`` and ``p`` may be arrays or traced. Zig-zag: the first ``parts/2`` come
    from half ``device`` of ``2n``, the rest from half ``2n-1-device``."""
    if layout == "contiguous":
        return device * parts + p
    per_half = parts // 2
    late = p >= per_half
    half = device + late * (2 * n - 1 - 2 * device)
    return half * per_half + p % per_half


def _zigzag_device(half: int, n: int) -> int:
    return half if half < n else 2 * n - 1 - half


def ring_pair_kinds(mask, q_len: int, kv_len: int, n: int, layout: str,
                    parts: int) -> np.ndarray:
    """int8 ``[step, device, query part, key part]``: whether the pair is ``EMPTY`` (skipped),
    ``FULL`` (every entry allowed for every head: no mask to evaluate) or ``PARTIAL``, for the
    part pairs each device works at each of the ring's ``n`` steps (from the mask's block table;
    segment ids are not known here)."""
    if mask is None:
        kinds = np.full((n * parts, n * parts), FULL, np.int8)
    else:
        table = cached_block_table(mask, q_len, kv_len, q_len // (n * parts), kv_len // (n * parts))
        kinds = np.where((table.kind == EMPTY).all(axis=0), EMPTY,
                         np.where((table.kind == FULL).all(axis=0), FULL, PARTIAL)).astype(np.int8)
    devices = np.arange(n)
    held = held_part(layout, n, parts, devices[:, None], np.arange(parts)[None, :])  # [n, P]
    return np.stack([kinds[held[:, :, None], held[(devices - step) % n][:, None, :]]
                     for step in range(n)])


def ring_work(mask, q_len: int, kv_len: int, n: int, layout: str, parts: int) -> np.ndarray:
    """``[step, device]``: how many non-empty (query part, key part) pairs each device works
    at each of the ring's ``n`` steps (from the mask's block table; segment ids ignored)."""
    kinds = ring_pair_kinds(mask, q_len, kv_len, n, layout, parts)
    return (kinds != EMPTY).sum(axis=(2, 3)).astype(np.int64)


def step_run(steps: list[int], n: int) -> tuple[int, int]:
    """``(first, count)``: the shortest run of consecutive ring steps (mod ``n``) that holds
    every step in ``steps`` — it starts after the widest gap between them. A causal window:
    ``(0, 2)``; a two-sided one: ``(n - 1, 3)``; a causal mask: ``(0, n)``."""
    if not steps:
        return 0, 0
    gap, last = max(((steps[(i + 1) % len(steps)] - steps[i]) % n or n, i)
                    for i in range(len(steps)))
    return steps[(last + 1) % len(steps)], n - gap + 1


def live_steps(kinds: np.ndarray) -> list[int]:
    """The ring steps at which some device has a non-empty part pair (``kinds`` of
    :func:`ring_pair_kinds`); the others are neither computed nor communicated."""
    return [step for step in range(kinds.shape[0]) if (kinds[step] != EMPTY).any()]


def critical_path(mask, q_len: int, kv_len: int, n: int, layout: str, parts: int) -> int:
    """The ring's time in part pairs: per step, the most pairs any device works (the ring
    waits for the slowest), summed over the steps (:func:`ring_work`)."""
    return int(ring_work(mask, q_len, kv_len, n, layout, parts).max(axis=1).sum())


@functools.lru_cache(maxsize=256)  # every attention layer of a model asks the same question
def choose_layout(mask, q_len: int, kv_len: int, n: int, part_tokens: int = PART_TARGET) -> str:
    """Zig-zag where it shortens the ring's critical path, contiguous otherwise (and where the
    shards do not split into halves)."""
    if n == 1 or q_len % (2 * n) or kv_len % (2 * n):
        return "contiguous"
    parts = split_parts(q_len // n, kv_len // n, part_tokens)
    zigzag = critical_path(mask, q_len, kv_len, n, "zigzag", parts)
    contiguous = critical_path(mask, q_len, kv_len, n, "contiguous", parts)
    return "zigzag" if zigzag < contiguous else "contiguous"


def _to_zigzag(t, index, n: int, axis: str):
    """``t [B, chunk, ...]``, device ``index``'s contiguous chunk -> its zig-zag halves."""
    half = t.shape[1] // 2
    even = [(i, _zigzag_device(2 * i, n)) for i in range(n)]  # half 2i, from device i
    odd = [(i, _zigzag_device(2 * i + 1, n)) for i in range(n)]
    got_even = jax.lax.ppermute(t[:, :half], axis, even)
    got_odd = jax.lax.ppermute(t[:, half:], axis, odd)
    # device j holds halves j and 2n-1-j, of opposite parity: j's parity says which comes first
    first_is_even = index % 2 == 0
    return jnp.concatenate([jnp.where(first_is_even, got_even, got_odd),
                            jnp.where(first_is_even, got_odd, got_even)], axis=1)


def _from_zigzag(t, index, n: int, axis: str):
    """The inverse of :func:`_to_zigzag`: each half goes back to its contiguous device."""
    half = t.shape[1] // 2
    first, second = t[:, :half], t[:, half:]
    first_is_even = index % 2 == 0
    even_half = jnp.where(first_is_even, first, second)
    odd_half = jnp.where(first_is_even, second, first)
    even = [(_zigzag_device(2 * i, n), i) for i in range(n)]
    odd = [(_zigzag_device(2 * i + 1, n), i) for i in range(n)]
    return jnp.concatenate([jax.lax.ppermute(even_half, axis, even),
                            jax.lax.ppermute(odd_half, axis, odd)], axis=1)


def _checked_mask(q, k, v, mask, n, axis, layout):
    """The checked inputs' mask as a lazy :class:`Mask` (spec strings parsed) or None."""
    check_attention_inputs(q, k, v)
    _, q_len, q_heads, _ = q.shape
    kv_len = k.shape[1]
    mask = lazy_mask(mask, q_heads)
    if layout not in RING_LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {RING_LAYOUTS}")
    for name, length in (("query length S", q_len), ("key length T", kv_len)):
        if length % n:
            raise ValueError(f"ring attention: {name}={length} must be divisible by mesh axis "
                             f"{axis!r} of size {n}")
        if layout == "zigzag" and length % (2 * n):
            raise ValueError(f"ring attention: {name}={length} must be divisible by twice the "
                             f"size of mesh axis {axis!r} ({2 * n}) for layout='zigzag' (every "
                             "shard holds two halves)")
    if isinstance(mask, Mask):
        mask.check_size(q_len, kv_len)
        if mask.num_heads is not None and mask.num_heads != q_heads:
            raise ValueError(f"mask is a MultiHeadMask of {mask.num_heads} heads; q has {q_heads}")
    elif mask is not None:
        raise ValueError(f"ring attention needs a lazy Mask object (got {type(mask).__name__}): "
                         "it evaluates the mask at global positions on each shard")
    return mask


def ring_attention(q, k, v, *, mesh: Mesh, axis: str = "sequence", mask: Mask | None = None,
                   segment_ids=None, scale: float | None = None,
                   logits_soft_cap: float | None = None, layout: str | None = None,
                   part_tokens: int = PART_TARGET):
    """``dot_product_attention`` with the sequence split over mesh axis ``axis``.

    Args:
      q: ``[B, S, Hq, D]``; k, v: ``[B, T, Hkv, D]`` (``Hq % Hkv == 0``); ``S`` and ``T`` must
        be divisible by the axis size (the shards hold equal chunks), and by twice it for
        ``layout="zigzag"``.
      mask: a lazy :class:`Mask` (or ``MultiHeadMask``) over global positions, a mask spec
        string (``"causal"``, ``"local:256"``, …), or None.
      segment_ids: ``[B, S]`` integers (needs ``S == T``) or a ``(q, kv)`` pair.
      layout: ``"contiguous"``, ``"zigzag"`` or None (the one with the shorter critical path
        for this mask; see the module docstring). Inputs and output are contiguous shards
        whatever the layout.
      part_tokens: the longest part each shard's queries and keys are worked in (see
        :func:`split_parts`; shard lengths with few divisors can leave longer parts).
      Other axes of ``mesh`` stay under the compiler's automatic sharding.

    Returns ``[B, S, Hq, D]`` in ``q.dtype``, equal to the single-device result; rows with
    nothing to attend to are zero.
    """
    n = mesh.shape.get(axis)
    if n is None:
        raise ValueError(f"mesh {dict(mesh.shape)} has no axis {axis!r} to split the sequence over")
    mask = _checked_mask(q, k, v, mask, n, axis, layout)
    scale, logits_soft_cap = static_logit_options(scale, logits_soft_cap)
    if not isinstance(part_tokens, int) or part_tokens < 1:
        raise ValueError(f"part_tokens={part_tokens!r}: expected a positive integer")
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if layout is None:
        layout = choose_layout(mask, q_len, kv_len, n, part_tokens)
    q_seg, kv_seg = attention_segments(segment_ids, batch, q_len, kv_len)
    if segment_ids is None:  # one document: no same-document test (zeros fill the arguments)
        q_seg, kv_seg = jnp.zeros((batch, q_len), jnp.int32), jnp.zeros((batch, kv_len), jnp.int32)
    scale = head_dim**-0.5 if scale is None else scale
    groups = q_heads // kv_heads
    q_chunk, kv_chunk = q_len // n, kv_len // n
    parts = split_parts(q_chunk, kv_chunk, part_tokens)
    q_part, kv_part = q_chunk // parts, kv_chunk // parts

    def positions(device, part_len):
        """Global positions ``[parts, part_len]`` of the parts of the chunk ``device`` holds."""
        first = held_part(layout, n, parts, device, jnp.arange(parts)) * part_len
        return first[:, None] + jnp.arange(part_len)[None, :]

    def allowed_pairs(kind, q_pos, kv_pos, q_seg, kv_seg):
        """Boolean ``[B, Hkv|1, G|1, Sq, Tc]`` (or a scalar): the mask at global positions,
        within documents. A ``FULL`` pair evaluates no mask; without segment ids, no
        same-document test."""
        allowed = jnp.ones((), bool)
        if kind == PARTIAL:
            allowed = _allowed(mask, q_len, kv_len, q_pos, kv_pos)  # [H or 1, Sq, Tc]
            allowed = (allowed.reshape(-1, 1, q_part, kv_part) if allowed.shape[0] == 1
                       else allowed.reshape(kv_heads, groups, q_part, kv_part))[None]
        if segment_ids is not None:
            allowed = allowed & (q_seg[:, :, None] == kv_seg[:, None, :])[:, None, None]
        return allowed

    @jax.checkpoint  # the backward recomputes a part pair's logits instead of keeping them all
    def fold(carry, q_g, k_p, v_p, allowed):
        """Fold one key/value part into the running online softmax of one query part."""
        logits = matmul_f32("bshgd,bthd->bhgst", q_g, k_p)
        return fold_block(carry, soft_cap(logits * scale, logits_soft_cap), allowed,
                          lambda w: weighted_sum("bhgst,bthd->bhgsd", w, v_p))

    def split_parts_of(t, part_len):  # [B, chunk, ...] -> [parts, B, part_len, ...]
        return jnp.moveaxis(t.reshape(t.shape[0], parts, part_len, *t.shape[2:]), 1, 0)

    # which part pairs each device works at each step, known before tracing: empty pairs are
    # skipped without evaluating the mask, full ones fold without it, and steps at which no
    # device has work (a sliding window's far shards) are neither computed nor communicated
    kinds = ring_pair_kinds(mask, q_len, kv_len, n, layout, parts)
    first, count = step_run(live_steps(kinds), n)

    def local(q_c, k_c, v_c, q_seg_c, kv_seg_c):
        index = jax.lax.axis_index(axis)
        if layout == "zigzag":
            zig = functools.partial(_to_zigzag, index=index, n=n, axis=axis)
            q_c, k_c, v_c, q_seg_c, kv_seg_c = map(zig, (q_c, k_c, v_c, q_seg_c, kv_seg_c))
        q_parts = split_parts_of(q_c.reshape(batch, q_chunk, kv_heads, groups, head_dim), q_part)
        q_seg_parts, q_pos = split_parts_of(q_seg_c, q_part), positions(index, q_part)
        shape = (parts, batch, kv_heads, groups, q_part)
        carries = empty_state(shape, head_dim)
        # the running statistics differ per shard: say so, or the branches of the switch
        # below would disagree on their type
        carries = jax.tree.map(lambda t: jax.lax.pcast(t, axis, to="varying"), carries)

        def attend_held(carries, k_c, v_c, kv_seg_c, step, step_kinds):
            """Fold the keys held at ``step`` (device ``index - step``'s) into every query
            part; ``step_kinds [n, P, P]`` as :func:`ring_pair_kinds` gives that step."""
            source = (index - step) % n
            pair_kinds = jnp.asarray(step_kinds)[index]                    # [P(q), P(kv)]
            kv_parts = (split_parts_of(k_c, kv_part), split_parts_of(v_c, kv_part),
                        positions(source, kv_part), split_parts_of(kv_seg_c, kv_part))

            @jax.checkpoint  # keep one carry per query part, not one per part pair
            def one_query_part(carry, q_g, q_pos_p, q_seg_p, row_kinds):
                def visit(carry, kv):
                    k_p, v_p, kv_pos_p, kv_seg_p, kind = kv

                    def folded(static_kind):
                        return lambda c: fold(c, q_g, k_p, v_p, allowed_pairs(
                            static_kind, q_pos_p, kv_pos_p, q_seg_p, kv_seg_p))

                    kind = kind.astype(jnp.int32)
                    if segment_ids is not None:  # documents can empty a pair the mask keeps
                        same = q_seg_p[:, :, None] == kv_seg_p[:, None, :]
                        kind = jnp.where(jnp.any(same), kind, EMPTY)
                    branches = [lambda c: c, folded(PARTIAL), folded(FULL)]  # by kind: 0, 1, 2
                    return jax.lax.switch(kind, branches, carry), None

                return jax.lax.scan(visit, carry, (*kv_parts, row_kinds))[0]

            _, carries = jax.lax.scan(lambda _, xs: (None, one_query_part(*xs)), None,
                                      (carries, q_parts, q_pos, q_seg_parts, pair_kinds))
            return carries

        def shift(t, by):  # device i's t goes to device i + by: the keys held advance `by` steps
            return jax.lax.ppermute(t, axis, [(i, (i + by) % n) for i in range(n)])

        # one scan over the run of steps that holds every live one (mod n: a two-sided window
        # visits the next shard's keys, step n - 1, first), one neighbour exchange per step
        # (the last one unused; a loop of steps would compile every step apart)
        def step(state, xs):
            carries, k_c, v_c, kv_seg_c = state
            carries = attend_held(carries, k_c, v_c, kv_seg_c, *xs)
            return (carries, *(shift(t, 1) for t in (k_c, v_c, kv_seg_c))), None

        if first:  # start from the keys `first` devices back
            k_c, v_c, kv_seg_c = (shift(t, first) for t in (k_c, v_c, kv_seg_c))
        run = (first + np.arange(count)) % n
        (carries, *_), _ = jax.lax.scan(step, (carries, k_c, v_c, kv_seg_c),
                                        (jnp.asarray(run), kinds[run]))
        out, _ = finish(carries)  # [P, B, Hkv, G, Sq, D]
        out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, q_chunk, q_heads, head_dim)
        out = out.astype(q_c.dtype)
        return _from_zigzag(out, index, n, axis) if layout == "zigzag" else out

    seq = P(None, axis, None, None)
    with jax.named_scope("ring_attention"):  # findable in profiles and HLO metadata
        return jax.shard_map(local, mesh=mesh,
                             in_specs=(seq, seq, seq, P(None, axis), P(None, axis)),
                             out_specs=seq, axis_names={axis})(q, k, v, q_seg, kv_seg)


__all__ = ["PART_TARGET", "RING_LAYOUTS", "choose_layout", "critical_path", "held_part",
           "live_steps", "ring_attention", "ring_pair_kinds", "ring_work", "split_parts", "step_run"]
