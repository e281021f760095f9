"""Planning a ring: how each shard is cut into parts, and which part pairs each device works
at each of the ring's steps — all numpy, from the mask's block table, before tracing.

Layouts. ``"contiguous"``: device ``i`` holds chunk ``i``. Under a causal mask that is
unbalanced: at every step after the first some device holds keys from its past and works a
whole chunk pair while the others idle, so the ring takes ``n`` chunk pairs of time for
``n(n+1)/2`` pairs of work. ``"zigzag"`` (the load-balanced layout of Llama 3's context
parallelism and of ring-flash-attention): the sequence is cut into ``2n`` halves and device
``i`` holds halves ``i`` and ``2n-1-i``, one early and one late, so at every step after the
first each device works exactly two of its four half pairs: about ``(n+1)/2`` chunk pairs of
time. :func:`choose_layout` picks the layout whose critical path (the per-step maximum over
devices of non-empty part pairs, summed over steps) is shorter, contiguous on a tie: zig-zag
for causal masks, contiguous for sliding windows, whose work is already local.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from jaxsparse.ops.masks import EMPTY, FULL, PARTIAL, cached_block_table

RING_LAYOUTS = (None, "contiguous", "zigzag")
# Each shard's queries and keys are worked in parts of at most about this many tokens: an empty
# pair of parts is skipped, and only one pair's logits ([B, H, part, part] floats) are alive
# at a time, forward and backward, however long the shard. Tuned on CPU (4 emulated devices,
# 8k tokens, 4 heads of 64, forward + backward, one quiet run, the ring visiting live pairs
# only): causal 1513 / 1335 / 1421 / 2014 ms and a 512-token window 289 / 268 / 313 / 560 ms
# for parts of 64 / 128 / 256 / 512. Smaller parts waste less of a window's diagonal pairs;
# below 128 the per-pair overhead wins. On GPU larger parts may pay (fewer loop steps).
PART_TARGET = 128


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
    :func:`ring_pair_kinds`). The ring runs the shortest run of steps holding them all
    (:func:`step_run`); the steps outside it are neither computed nor communicated."""
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


def ring_pair_lists(kinds: np.ndarray, run: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """The non-empty part pairs of each device at each step of ``run`` (the ring steps taken, in
    order), as three int32 arrays ``[len(run), n, L]``: query part, key part and kind
    (``PARTIAL`` or ``FULL``), row by row. ``L`` is the most pairs any device works at any of
    those steps; shorter lists are padded with ``EMPTY`` pairs (0, 0), which change nothing.
    A device then visits only its live pairs: a sliding window's query part meets two or three
    key parts, not all of them."""
    live = kinds[run] != EMPTY                                  # [steps, n, P, P]
    width = max(1, int(live.sum(axis=(2, 3)).max(initial=0)))
    q_part, kv_part, kind = (np.zeros(live.shape[:2] + (width,), np.int32) for _ in range(3))
    for step, device in np.ndindex(*live.shape[:2]):
        rows, cols = np.nonzero(live[step, device])
        q_part[step, device, :rows.size] = rows
        kv_part[step, device, :rows.size] = cols
        kind[step, device, :rows.size] = kinds[run[step], device, rows, cols]
    return q_part, kv_part, kind
