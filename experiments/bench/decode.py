"""Decoding against a KV cache, our cache against the alternative, in one run:

- ``layout``: the cache kept heads first, ``[B, Hkv, C, D]`` (what the attention layers keep,
  ``decode_attention(..., heads_first=True)``), against the sequence-first ``[B, C, Hkv, D]``
  they kept before;
- ``window W``: a causal sliding window of ``W`` keys decoded from a ring buffer of ``W``
  slots (``window_cache_decode``, what a layer with a bounded mask keeps) against a cache of
  all ``C`` positions under the same mask;
- ``squeezed`` (at batch 1 or with one key/value head): the heads-first cache kept without
  its size-1 axes (``nn.cache_layout``) against the same cache with them, both reading every
  slot — XLA:CPU copied the 4-d one several times a step at batch 1 with several key/value
  heads; the attention layers keep it squeezed where they read every slot (with one
  key/value head the 4-d cache was faster: they keep it);
- ``written 1/8``: decoding from position ``C/8`` of a cache of at least
  ``READ_WRITTEN_FROM_SLOTS`` positions, ours reading only the written slots
  (``decode_attention``'s choice: block by block while at most half is written, the cache
  kept 4-d as the layers keep it then) against reading every slot as before (at batch 1 with
  several key/value heads from the squeezed cache the layers kept);
- ``sga W+G``: Hydra's sparse global attention (window ``W``, ``G`` global tokens) decoded
  from its two ring buffers of ``W + G`` slots (``ops.sga_rings.sga_ring_decode``, what the
  layer keeps when ``W + G`` is below the cache length) against a cache of all ``C``
  positions (``ops.sga.sga_decode``, what it kept before);
- ``routing K×w`` (routing heads: one key/value head per query head): causal routing
  attention (``K`` clusters, the ``w`` most recent keys of the query's cluster) decoded from
  per-cluster rings of ``K · w`` slots (``ops.routing_rings.routing_ring_decode``, what
  ``nn.RoutingAttention`` keeps) against a cache of all ``C`` positions and their clusters
  (``ops.routing.causal_routing_decode``, what it kept before).

Each row times ``steps`` generated tokens as a ``lax.scan`` — as ``jaxsparse generate`` runs
them: every step writes the new token's key and value into the cache (a loop carry) and
attends — and reports the time per step. ``speedup`` > 1 is our cache's gain. Query heads
``--heads`` of 64 on each of ``--kv-heads`` (MHA, GQA, MQA); float32.

    jaxsparse bench decode [--cache 1024 4096] [--heads 8] [--kv-heads 8 2 1] [--window 256]
                           [--max-global 512] [--clusters 32] [--routing-window 32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsparse.bench import cases, markdown_table, time_interleaved, write_results
from jaxsparse.bench.arguments import description, positive_int
from jaxsparse.nn.cache_layout import stored, viewed
from jaxsparse.ops.attention import decode_attention, window_cache_decode
from jaxsparse.ops.attention.decode import reads_written_part
from jaxsparse.ops.masks import LocalMask
from jaxsparse.ops.routing import assign, causal_routing_decode, init_centroids, routing_units
from jaxsparse.ops.routing_rings import init_routing_rings, routing_ring_decode
from jaxsparse.ops.sga import sga_decode
from jaxsparse.ops.sga_rings import init_sga_rings, sga_ring_decode

RESULTS = Path(__file__).resolve().parent.parent / "results"
HEAD_DIM = 64


def decode_loop(attend_and_write, first: int):
    """A compiled scan of decode steps from position ``first``: ``attend_and_write(q, k_new,
    v_new, score, cache, position)`` returns the step's output and the new cache (a pytree;
    ``score``: the new token's controller score, read by the SGA steps only)."""

    def run(q_NBHD, k_new_NBHD, v_new_NBHD, score_NB, cache):
        def step(carry, inputs):
            cache, position = carry
            q, k_new, v_new, score = (x[:, None] for x in inputs)  # [B, 1, ...]
            out, cache = attend_and_write(q, k_new, v_new, score, cache, position)
            return (cache, position + 1), out[:, 0]

        carry = (cache, jnp.int32(first))
        return jax.lax.scan(step, carry, (q_NBHD, k_new_NBHD, v_new_NBHD, score_NB))[1]

    return jax.jit(run)


def full_cache_step(heads_first: bool, mask=None, written_only: bool | None = None):
    """Write at the position's slot of a cache of every position and attend
    (``decode_attention``'s ``written_only``: None lets it choose how much to read)."""

    def attend_and_write(q, k_new, v_new, score, cache, position):
        k_cache, v_cache = cache
        if heads_first:
            k_new, v_new = k_new.swapaxes(1, 2), v_new.swapaxes(1, 2)
            at = (0, 0, position, 0)
        else:
            at = (0, position, 0, 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_new, at)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_new, at)
        lengths = jnp.full((q.shape[0],), position + 1)
        out = decode_attention(q, k_cache, v_cache, lengths, mask=mask, heads_first=heads_first,
                               written_only=written_only)
        return out, (k_cache, v_cache)

    return attend_and_write


def squeezed_cache_step(written_only: bool | None = None):
    """``full_cache_step(True, written_only=...)`` on a cache kept without its size-1 axes
    (batch 1, one key/value head), as the layers keep it (``nn.cache_layout``): a full-rank
    view for the write and the attention, stored back squeezed."""
    inner = full_cache_step(True, written_only=written_only)

    def attend_and_write(q, k_new, v_new, score, cache, position):
        batch, _, kv_heads, dim = k_new.shape
        views = tuple(viewed(c, batch, kv_heads, None, dim) for c in cache)
        out, (k_cache, v_cache) = inner(q, k_new, v_new, score, views, position)
        return out, (stored(k_cache), stored(v_cache))

    return attend_and_write


def window_cache_step(mask):
    """The ring buffer as the attention layers keep it: without a size-1 batch axis, but with
    one key/value head (``nn.Attention._keep``)."""

    def attend_and_write(q, k_new, v_new, score, cache, position):
        batch, _, kv_heads, dim = k_new.shape
        views = (viewed(c, batch, kv_heads, None, dim) for c in cache)
        out, k_cache, v_cache = window_cache_decode(q, k_new, v_new, *views, position, mask=mask)
        keep = stored if kv_heads > 1 else (lambda c: c)  # noqa: E731
        return out, (keep(k_cache), keep(v_cache))

    return attend_and_write


def sga_rings_step(window: int, max_global: int):
    """The rings as the SGA layer keeps them: keys and values without size-1 axes."""

    def attend_and_write(q, k_new, v_new, score, rings, position):
        batch, _, kv_heads, dim = k_new.shape
        rings = {name: viewed(x, batch, kv_heads, None, dim) if name.endswith(("k", "v"))
                 else x for name, x in rings.items()}
        out, rings = sga_ring_decode(q, k_new, v_new, score, rings, position, window=window,
                                     max_global=max_global)
        return out, {name: stored(x) if x.ndim == 4 else x for name, x in rings.items()}

    return attend_and_write


def sga_full_cache_step(window: int, max_global: int):
    """What the SGA layer did before its rings: write at the position, read every slot."""

    def attend_and_write(q, k_new, v_new, score, cache, position):
        k_cache, v_cache, scores = cache
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_new, (0, position, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_new, (0, position, 0, 0))
        scores = jax.lax.dynamic_update_slice(scores, score, (0, position))
        lengths = jnp.full((q.shape[0],), position + 1)
        out = sga_decode(q, k_cache, v_cache, scores, lengths, window=window,
                         max_global=max_global)
        return out, (k_cache, v_cache, scores)

    return attend_and_write


def routing_rings_step(centroids):
    """The routing heads' per-cluster rings, as ``nn.RoutingAttention`` keeps them."""

    def attend_and_write(q, k_new, v_new, score, rings, position):
        return routing_ring_decode(q, k_new, v_new, rings, centroids)

    return attend_and_write


def routing_full_cache_step(centroids, window: int):
    """What the routing layer did before its rings: write the key, its value and its cluster
    at the position, then count the window of the query's cluster over every slot."""

    def attend_and_write(q, k_new, v_new, score, cache, position):
        k_cache, v_cache, clusters = cache
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_new, (0, position, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_new, (0, position, 0, 0))
        new_clusters = assign(routing_units(k_new), centroids)
        clusters = jax.lax.dynamic_update_slice(clusters, new_clusters, (0, position, 0))
        lengths = jnp.full((q.shape[0],), position + 1)
        out = causal_routing_decode(q, k_cache, v_cache, clusters, lengths, centroids,
                                    window=window)
        return out, (k_cache, v_cache, clusters)

    return attend_and_write


def routing_inputs(batch, heads, steps, slots, centroids, window: int, rings: bool):
    """As ``inputs`` (one key/value head per query head), with either full rings (every
    cluster has seen more than ``window`` keys) or a cache of ``slots`` positions and the
    clusters of its keys."""
    q, k_new, v_new, score, (k, v) = inputs(batch, heads, heads, steps,
                                            (batch, slots, heads, HEAD_DIM))
    clusters = assign(routing_units(k), centroids)
    if not rings:
        return q, k_new, v_new, score, (k, v, clusters)
    num_clusters = centroids.shape[1]
    state = init_routing_rings(batch, heads, num_clusters, window, HEAD_DIM)
    ring = k[:, :num_clusters * window].reshape(batch, num_clusters, window, heads, HEAD_DIM)
    state |= {"k": jnp.moveaxis(ring, 3, 1), "v": jnp.moveaxis(
        v[:, :num_clusters * window].reshape(ring.shape), 3, 1),
        "count": jnp.full((batch, heads, num_clusters), slots // num_clusters, jnp.int32)}
    return q, k_new, v_new, score, state


def inputs(batch, heads, kv_heads, steps, cache_shape):
    """Per-step queries, new keys/values and scores, and a random cache of ``cache_shape``
    (a pair of arrays of that shape)."""
    keys = jax.random.split(jax.random.key(sum(cache_shape) * 31 + kv_heads), 6)
    q = jax.random.normal(keys[0], (steps, batch, heads, HEAD_DIM))
    k_new, v_new = (jax.random.normal(kk, (steps, batch, kv_heads, HEAD_DIM)) for kk in keys[1:3])
    score = jax.random.normal(keys[3], (steps, batch))
    cache = tuple(jax.random.normal(kk, cache_shape) for kk in keys[4:])
    return q, k_new, v_new, score, cache


def stored_cache(args):
    """``inputs``' arguments with the cache's keys and values (a pair, or SGA rings) kept as
    the layers keep them: without size-1 axes."""
    *per_step, cache = args
    if isinstance(cache, tuple):
        return (*per_step, tuple(stored(c) for c in cache))
    return (*per_step, {name: stored(x) if x.ndim == 4 else x for name, x in cache.items()})


def sga_inputs(batch, heads, kv_heads, steps, slots, window, max_global, rings: bool):
    """As ``inputs``, with either full rings (every global slot holding a candidate) or a cache
    of ``slots`` positions and their scores (about half of them candidates)."""
    q, k_new, v_new, score, (k, v) = inputs(batch, heads, kv_heads, steps,
                                            (batch, slots, kv_heads, HEAD_DIM))
    scores = jax.random.normal(jax.random.key(slots), (batch, slots))
    if not rings:
        return q, k_new, v_new, score, (k, v, scores)
    state = init_sga_rings(batch, window, max_global, kv_heads, HEAD_DIM)
    heads_first = lambda x, start, stop: x[:, start:stop].swapaxes(1, 2)  # noqa: E731
    state |= {"k": heads_first(k, 0, window), "v": heads_first(v, 0, window),
              "score": scores[:, :window],
              "global_k": heads_first(k, window, window + max_global + 1),
              "global_v": heads_first(v, window, window + max_global + 1),
              "global_score": jnp.abs(scores[:, window:window + max_global + 1]) + 0.1,
              "global_count": jnp.full((batch,), max_global, jnp.int32)}
    return q, k_new, v_new, score, state


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--cache", nargs="+", type=positive_int, default=[1024, 4096],
                        help="cache positions C (the full cache's slots)")
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--kv-heads", nargs="+", type=positive_int, default=[8, 2, 1])
    parser.add_argument("--window", type=positive_int, default=256,
                        help="the sliding window W of the ring-buffer rows")
    parser.add_argument("--max-global", type=positive_int, default=512,
                        help="the global tokens G of the SGA rows (their window: --window)")
    parser.add_argument("--clusters", type=positive_int, default=32,
                        help="k-means clusters K of the routing rows (~sqrt of the length)")
    parser.add_argument("--routing-window", type=positive_int, default=32,
                        help="keys w a routing query reads (~length / clusters)")
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--steps", type=positive_int, default=32, help="tokens per timed loop")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--name", default="decode", help="results file stem")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    for kv_heads in args.kv_heads:
        if args.heads % kv_heads:
            parser.error(f"--heads {args.heads} must be a multiple of --kv-heads {kv_heads}")
    for slots in args.cache:
        if slots < args.steps:
            parser.error(f"--cache {slots} must hold the --steps {args.steps} new tokens")
    b, w, g = args.batch, args.window, args.max_global
    mask = LocalMask(w - 1, 0)
    rows = []
    for slots in cases(args.cache, "decode"):
        first = slots - args.steps  # the loop fills the cache's last positions
        for kv_heads in args.kv_heads:
            shape = (args.heads, kv_heads, args.steps)
            layouts = [(decode_loop(full_cache_step(heads_first), first),
                        inputs(b, *shape, (b, kv_heads, slots, HEAD_DIM) if heads_first
                               else (b, slots, kv_heads, HEAD_DIM)))
                       for heads_first in (True, False)]
            ring = inputs(b, *shape, (b, kv_heads, w, HEAD_DIM))
            windows = [(decode_loop(window_cache_step(mask), first),
                        stored_cache(ring) if kv_heads > 1 else ring),
                       (decode_loop(full_cache_step(True, mask), first),
                        inputs(b, *shape, (b, kv_heads, slots, HEAD_DIM)))]
            pairs = [("layout", layouts), (f"window {w}", windows)]
            if b == 1 or kv_heads == 1:  # a cache with a size-1 axis: kept squeezed or not
                cache_shape = (b, kv_heads, slots, HEAD_DIM)
                q, k_new, v_new, score, cache = inputs(b, *shape, cache_shape)
                pairs.append(("squeezed", [
                    (decode_loop(squeezed_cache_step(written_only=False), first),
                     (q, k_new, v_new, score, tuple(stored(c) for c in cache))),
                    (decode_loop(full_cache_step(True, written_only=False), first),
                     (q, k_new, v_new, score, cache))]))
            if reads_written_part(slots):  # from position C/8: 1/8 to 1/8 + steps/C written
                early = slots // 8
                q, k_new, v_new, score, cache = inputs(b, *shape, (b, kv_heads, slots, HEAD_DIM))
                before = (decode_loop(squeezed_cache_step(written_only=False), early),
                          (q, k_new, v_new, score, tuple(stored(c) for c in cache))) \
                    if b == 1 and kv_heads > 1 else \
                    (decode_loop(full_cache_step(True, written_only=False), early),
                     (q, k_new, v_new, score, cache))
                pairs.append(("written 1/8", [
                    (decode_loop(full_cache_step(True), early), (q, k_new, v_new, score, cache)),
                    before]))
            if w + g + 1 < slots:  # the layer's rings are for caches longer than them
                pairs.append((f"sga {w}+{g}", [
                    (decode_loop(sga_rings_step(w, g), first),
                     stored_cache(sga_inputs(b, *shape, slots, w, g, rings=True))),
                    (decode_loop(sga_full_cache_step(w, g), first),
                     sga_inputs(b, *shape, slots, w, g, rings=False))]))
            clusters, rw = args.clusters, args.routing_window
            if kv_heads == args.heads and clusters * rw <= slots:  # routing heads: MHA
                centroids = init_centroids(jax.random.key(slots), args.heads, clusters,
                                           HEAD_DIM)
                pairs.append((f"routing {clusters}x{rw}", [
                    (decode_loop(routing_rings_step(centroids), first),
                     routing_inputs(b, args.heads, args.steps, slots, centroids, rw, True)),
                    (decode_loop(routing_full_cache_step(centroids, rw), first),
                     routing_inputs(b, args.heads, args.steps, slots, centroids, rw, False))]))
            for op, pair in pairs:
                ours, peer = (s / args.steps * 1e3
                              for s in time_interleaved(*pair, repeats=args.repeats))
                rows.append({"op": op, "cache": slots, "heads": args.heads, "kv_heads": kv_heads,
                             "batch": b, "ours_ms": ours, "peer_ms": peer,
                             "speedup": peer / ours})
    columns = ["op", "cache", "heads", "kv_heads", "batch", "ours_ms", "peer_ms", "speedup"]
    notes = (f"{jax.default_backend()}; float32; head dim {HEAD_DIM}; milliseconds per "
             f"generated token over a scan of {args.steps} decode steps (cache write + "
             "attention). layout: ours a [B, Hkv, C, D] cache, peer [B, C, Hkv, D]. window: "
             f"a causal window of {w} keys, ours a ring buffer of {w} slots, peer a "
             "(heads-first) cache of all C positions. squeezed: ours the heads-first cache "
             "kept without size-1 axes, peer with them, both reading every slot. written 1/8: "
             "decoding from position C/8, ours reading only the written slots (a 4-d cache), "
             "peer every slot (squeezed at batch 1 with several kv heads, as the layers kept "
             "it). sga: Hydra's sparse global attention "
             f"(window {w}, {g} global tokens), ours its rings of {w}+{g}+1 slots, peer a cache "
             "of all C positions. routing: causal routing attention "
             f"({args.clusters} clusters of window {args.routing_window}, one kv head per "
             f"head), ours per-cluster rings of {args.clusters}x{args.routing_window} slots, "
             "peer a cache of all C positions and their clusters. Same run, interleaved, the "
             "better of two medians each.")
    write_results(args.name, rows, columns, args.out, notes)
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
