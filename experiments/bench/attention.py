"""Block-sparse attention (XLA path) against dense masked attention, and mask preprocessing.

Peer: ``jax.nn.dot_product_attention`` given the equivalent dense boolean mask, timed in the
same run. Reports the time ratio next to the ideal ratio (1 / tile density), and the peak
memory XLA's compiled memory analysis gives for each (temporaries + arguments + outputs).
A second table times block-table construction for masks up to 1M tokens.

    jaxsparse bench attention [--lengths 1024 4096 16384] [--heads 4] [--head-dim 64]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsparse.bench import cases, markdown_table, time_fn, write_results
from jaxsparse.bench.arguments import description, positive_int
from jaxsparse.ops.attention import dot_product_attention
from jaxsparse.ops.mask_specs import parse_mask_spec

RESULTS = Path(__file__).resolve().parent.parent / "results"
PATTERNS = {"window 256": "local:256", "window 512": "local:512", "bigbird 64": "bigbird:64,3,2,3",
            "causal": "causal"}


def peak_bytes(jitted, *args) -> float:
    try:
        m = jitted.lower(*args).compile().memory_analysis()
        return float(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # noqa: BLE001 — memory analysis is best-effort across backends
        return float("nan")


def bench_attention(length: int, pattern: str, heads: int, head_dim: int, repeats: int) -> dict:
    mask = parse_mask_spec(PATTERNS[pattern])
    q, k, v = (jax.random.normal(jax.random.key(i), (1, length, heads, head_dim), jnp.float32)
               for i in range(3))
    ours = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask=mask,
                                                         implementation="xla_blocksparse"))
    row = {"S": length, "pattern": pattern}
    table = mask.block_table(length, length, 128, 128)
    row["density"] = table.density
    row["ideal_ratio"] = 1.0 / table.density
    row["ours_ms"] = time_fn(ours, q, k, v, warmup=1, repeats=repeats).median_s * 1e3
    row["ours_peak_mb"] = peak_bytes(ours, q, k, v) / 2**20
    dense_mask = jnp.asarray(mask.to_dense(length, length))[None, None]
    peer = jax.jit(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m))
    row["peer_peak_mb"] = peak_bytes(peer, q, k, v, dense_mask) / 2**20
    if row["peer_peak_mb"] > 16 * 1024:
        row["peer_ms"], row["speedup"] = float("nan"), float("nan")  # does not fit in memory
    else:
        row["peer_ms"] = time_fn(peer, q, k, v, dense_mask, warmup=1, repeats=repeats).median_s * 1e3
        row["speedup"] = row["peer_ms"] / row["ours_ms"]
    row["fraction_of_ideal"] = row["speedup"] / row["ideal_ratio"]
    ref = jax.jit(lambda q, k, v, m: dot_product_attention(q, k, v, mask=m, implementation="xla"))
    if length <= 4096:  # correctness spot check against our dense reference
        err = jnp.abs(ours(q, k, v) - ref(q, k, v, dense_mask)).max()
        row["max_abs_err"] = float(err)
    return row


def bench_tables(lengths) -> list[dict]:
    rows = []
    for name, spec in [("causal", "causal"), ("window 512", "local:512"),
                       ("bigbird 128", "bigbird:128,3,2,3")]:
        mask = parse_mask_spec(spec)
        for length in lengths:
            start = time.perf_counter()
            table = mask.block_table(length, length, 128, 128)
            rows.append({"mask": name, "S": length, "block": 128,
                         "build_s": time.perf_counter() - start, "tiles": table.kind.size,
                         "density": table.density})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--lengths", type=positive_int, nargs="*", default=[1024, 4096, 16384])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--table-lengths", type=positive_int, nargs="*", default=[1 << 16, 1 << 18, 1 << 20])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default="attention", help="results file stem")
    args = parser.parse_args(argv)

    rows = [bench_attention(s, p, args.heads, args.head_dim, args.repeats)
            for s, p in cases([(s, p) for s in args.lengths for p in args.patterns], "attention")]
    columns = ["S", "pattern", "density", "ours_ms", "peer_ms", "speedup", "ideal_ratio",
               "fraction_of_ideal", "ours_peak_mb", "peer_peak_mb", "max_abs_err"]
    notes = (f"xla_blocksparse vs jax.nn.dot_product_attention with the dense mask; batch 1, "
             f"{args.heads} heads, head dim {args.head_dim}, float32, forward only, "
             f"{jax.default_backend()}.")
    if rows:
        write_results(args.name, rows, columns, args.out, notes)
        print(markdown_table(rows, columns))

    if not args.table_lengths:
        return
    table_rows = bench_tables(args.table_lengths)
    table_columns = ["mask", "S", "block", "build_s", "tiles", "density"]
    write_results(f"{args.name}_block_tables", table_rows, table_columns, args.out,
                  "Block-table construction (numpy, one process, first call in the process "
                  "for each mask: includes first-touch page faults of the output arrays).")
    print()
    print(markdown_table(table_rows, table_columns))


if __name__ == "__main__":
    main()
