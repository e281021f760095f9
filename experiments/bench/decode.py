"""Decoding against a KV cache: the cache kept heads first, ``[B, Hkv, C, D]`` (what the
attention layers keep, ``decode_attention(..., heads_first=True)``), against the sequence-first
``[B, C, Hkv, D]`` layout they kept before, in one run.

Each row times ``steps`` generated tokens as a ``lax.scan`` — as ``jaxsparse generate`` runs
them: every step writes the new token's key and value into the cache (a loop carry) and
attends over all ``C`` slots — and reports the time per step. ``speedup`` > 1 is the gain of
the heads-first layout. Query heads ``--heads`` of 64 on each of ``--kv-heads`` (MHA, GQA,
MQA); float32.

    jaxsparse bench decode [--cache 1024 4096] [--heads 8] [--kv-heads 8 2 1] [--batch 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsparse.bench import cases, markdown_table, time_fn, write_results
from jaxsparse.bench.arguments import positive_int
from jaxsparse.ops.attention import decode_attention

RESULTS = Path(__file__).resolve().parent.parent / "results"
HEAD_DIM = 64


def decode_steps(heads_first: bool, steps: int):
    """A compiled loop of ``steps`` decode steps from a cache whose first ``C - steps`` slots
    are filled: write the step's key and value, attend to the cache."""

    def run(q_NBHD, k_new_NBHD, v_new_NBHD, k_cache, v_cache):
        slots = k_cache.shape[2 if heads_first else 1]
        batch = q_NBHD.shape[1]

        def step(cache, inputs):
            k_cache, v_cache, length = cache
            q, k_new, v_new = (x[:, None] for x in inputs)  # [B, 1, H, D]
            if heads_first:
                k_new, v_new = k_new.swapaxes(1, 2), v_new.swapaxes(1, 2)
                at = (0, 0, length, 0)
            else:
                at = (0, length, 0, 0)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k_new, at)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v_new, at)
            out = decode_attention(q, k_cache, v_cache, jnp.full((batch,), length + 1),
                                   heads_first=heads_first)
            return (k_cache, v_cache, length + 1), out[:, 0]

        first = jnp.int32(slots - steps)
        _, out = jax.lax.scan(step, (k_cache, v_cache, first), (q_NBHD, k_new_NBHD, v_new_NBHD))
        return out

    return jax.jit(run)


def inputs(batch, slots, heads, kv_heads, steps, heads_first):
    keys = jax.random.split(jax.random.key(slots * 31 + kv_heads), 5)
    q = jax.random.normal(keys[0], (steps, batch, heads, HEAD_DIM))
    k_new, v_new = (jax.random.normal(kk, (steps, batch, kv_heads, HEAD_DIM)) for kk in keys[1:3])
    shape = (batch, kv_heads, slots, HEAD_DIM) if heads_first else (batch, slots, kv_heads, HEAD_DIM)
    k_cache, v_cache = (jax.random.normal(kk, shape) for kk in keys[3:])
    return q, k_new, v_new, k_cache, v_cache


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", nargs="+", type=positive_int, default=[1024, 4096],
                        help="cache slots C")
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--kv-heads", nargs="+", type=positive_int, default=[8, 2, 1])
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
    rows = []
    for slots in cases(args.cache, "decode"):
        for kv_heads in args.kv_heads:
            fns = {layout: (decode_steps(layout, args.steps),
                            inputs(args.batch, slots, args.heads, kv_heads, args.steps, layout))
                   for layout in (True, False)}
            # interleaved, so that a slow phase of the machine hits both alike
            times = {True: [], False: []}
            for layout in (True, False, True, False):
                fn, fn_args = fns[layout]
                times[layout].append(time_fn(fn, *fn_args, warmup=1,
                                             repeats=args.repeats).median_s)
            ours, peer = (min(times[layout]) / args.steps for layout in (True, False))
            rows.append({"cache": slots, "heads": args.heads, "kv_heads": kv_heads,
                         "batch": args.batch, "heads_first_ms": ours * 1e3,
                         "seq_first_ms": peer * 1e3, "speedup": peer / ours})
    columns = ["cache", "heads", "kv_heads", "batch", "heads_first_ms", "seq_first_ms",
               "speedup"]
    notes = (f"{jax.default_backend()}; float32; head dim {HEAD_DIM}; milliseconds per "
             f"generated token over a scan of {args.steps} decode steps (cache update + "
             "attention over every slot). Peer: the same loop on a [B, C, Hkv, D] cache, in "
             "the same run (interleaved, the better of two medians each).")
    write_results(args.name, rows, columns, args.out, notes)
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
