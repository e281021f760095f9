"""Decoding against a KV cache, our cache against the alternative, in one run:

- ``layout``: the cache kept heads first, ``[B, Hkv, C, D]`` (what the attention layers keep,
  ``decode_attention(..., heads_first=True)``), against the sequence-first ``[B, C, Hkv, D]``
  they kept before;
- ``window W``: a causal sliding window of ``W`` keys decoded from a ring buffer of ``W``
  slots (``window_cache_decode``, what a layer with a bounded mask keeps) against a cache of
  all ``C`` positions under the same mask.

Each row times ``steps`` generated tokens as a ``lax.scan`` — as ``jaxsparse generate`` runs
them: every step writes the new token's key and value into the cache (a loop carry) and
attends — and reports the time per step. ``speedup`` > 1 is our cache's gain. Query heads
``--heads`` of 64 on each of ``--kv-heads`` (MHA, GQA, MQA); float32.

    jaxsparse bench decode [--cache 1024 4096] [--heads 8] [--kv-heads 8 2 1] [--window 256]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsparse.bench import cases, markdown_table, time_interleaved, write_results
from jaxsparse.bench.arguments import positive_int
from jaxsparse.ops.attention import decode_attention, window_cache_decode
from jaxsparse.ops.masks import LocalMask

RESULTS = Path(__file__).resolve().parent.parent / "results"
HEAD_DIM = 64


def decode_loop(attend_and_write, first: int):
    """A compiled scan of decode steps from position ``first``: ``attend_and_write(q, k_new,
    v_new, k_cache, v_cache, position)`` returns the step's output and the new caches."""

    def run(q_NBHD, k_new_NBHD, v_new_NBHD, k_cache, v_cache):
        def step(carry, inputs):
            k_cache, v_cache, position = carry
            q, k_new, v_new = (x[:, None] for x in inputs)  # [B, 1, H, D]
            out, k_cache, v_cache = attend_and_write(q, k_new, v_new, k_cache, v_cache, position)
            return (k_cache, v_cache, position + 1), out[:, 0]

        carry = (k_cache, v_cache, jnp.int32(first))
        return jax.lax.scan(step, carry, (q_NBHD, k_new_NBHD, v_new_NBHD))[1]

    return jax.jit(run)


def full_cache_step(heads_first: bool, mask=None):
    """Write at the position's slot of a cache of every position, attend over all of it."""

    def attend_and_write(q, k_new, v_new, k_cache, v_cache, position):
        if heads_first:
            k_new, v_new = k_new.swapaxes(1, 2), v_new.swapaxes(1, 2)
            at = (0, 0, position, 0)
        else:
            at = (0, position, 0, 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_new, at)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_new, at)
        lengths = jnp.full((q.shape[0],), position + 1)
        out = decode_attention(q, k_cache, v_cache, lengths, mask=mask, heads_first=heads_first)
        return out, k_cache, v_cache

    return attend_and_write


def window_cache_step(mask):
    def attend_and_write(q, k_new, v_new, k_cache, v_cache, position):
        return window_cache_decode(q, k_new, v_new, k_cache, v_cache, position, mask=mask)

    return attend_and_write


def inputs(batch, heads, kv_heads, steps, cache_shape):
    keys = jax.random.split(jax.random.key(sum(cache_shape) * 31 + kv_heads), 5)
    q = jax.random.normal(keys[0], (steps, batch, heads, HEAD_DIM))
    k_new, v_new = (jax.random.normal(kk, (steps, batch, kv_heads, HEAD_DIM)) for kk in keys[1:3])
    k_cache, v_cache = (jax.random.normal(kk, cache_shape) for kk in keys[3:])
    return q, k_new, v_new, k_cache, v_cache


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", nargs="+", type=positive_int, default=[1024, 4096],
                        help="cache positions C (the full cache's slots)")
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--kv-heads", nargs="+", type=positive_int, default=[8, 2, 1])
    parser.add_argument("--window", type=positive_int, default=256,
                        help="the sliding window W of the ring-buffer rows")
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
    b, w = args.batch, args.window
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
            windows = [(decode_loop(window_cache_step(mask), first),
                        inputs(b, *shape, (b, kv_heads, w, HEAD_DIM))),
                       (decode_loop(full_cache_step(True, mask), first),
                        inputs(b, *shape, (b, kv_heads, slots, HEAD_DIM)))]
            for op, pair in (("layout", layouts), (f"window {w}", windows)):
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
             "(heads-first) cache of all C positions. Same run, interleaved, the better of two "
             "medians each.")
    write_results(args.name, rows, columns, args.out, notes)
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
