"""Selective scans on this backend: every implementation against the lax.scan recurrence.

Mamba-1 ``selective_scan`` (sequential = lax.scan, associative, chunked, and on CPU the native
C++ kernel, the CPU default) and Mamba-2 (chunked ``ssd`` and on CPU ``ssd_native``, its CPU
default, against the lax.scan recurrence ``ssd_reference``), at several lengths, in one run. Reports tokens/s,
the ratio to the recurrence, peak memory (XLA's compiled memory analysis) and achieved bytes/s
next to this machine's measured copy bandwidth. Bytes counted: for Mamba-1 the float32
[batch, length, d_inner, d_state] tensors the plain recurrence materialises (decay, input,
states: written and read once each) — the fused chunked and native scans never materialise
them, so their figures are effective rates and may exceed the copy bandwidth; for Mamba-2 the
inputs and outputs only.

    jaxsparse bench ssm [--lengths 1024 8192 65536] [--batch 8 --d-inner 1536 --backward]
                        [--packed 8]

On GPU/TPU the Mamba-1 rows include ``"pallas"`` (the kernel). ``--packed K`` adds Mamba-1 rows
with ``segment_ids``: K documents per row on average, starting at random positions (the state
resets at each), so the cost of packed documents shows next to the plain rows of each
implementation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsparse.bench import cases, markdown_table, time_fn, write_results
from jaxsparse.bench.arguments import description, positive_int
from jaxsparse.ops.ssm import selective_scan, ssd, ssd_native, ssd_reference

RESULTS = Path(__file__).resolve().parent.parent / "results"


def copy_bandwidth(n_bytes: int = 1 << 28) -> float:
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda x: x + 1.0)
    return 2 * n_bytes / time_fn(copy, x, repeats=5).median_s  # read + write


def peak_mb(fn, *args) -> float:
    try:
        # a jitted fn lowers as it is: wrapping it in another jit compiled everything twice
        # (a second 3 s compile per case on CPU)
        lowered = fn.lower(*args) if hasattr(fn, "lower") else jax.jit(fn).lower(*args)
        m = lowered.compile().memory_analysis()
        return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 2**20
    except Exception:  # noqa: BLE001 — best-effort across backends
        return float("nan")


def mamba1_implementations():
    impls = ["sequential", "associative", "chunked"]
    # on CPU "pallas" is the chunked scan again; on GPU/TPU it is the kernel (and "native",
    # the C++ CPU kernel, would be the chunked scan)
    return impls + (["pallas"] if jax.default_backend() in ("gpu", "tpu") else ["native"])


def packed_ids(batch, length, documents, seed=2):
    """int32 ``[batch, length]``: a new document at each position with probability
    ``documents / length`` (about ``documents`` per row)."""
    opens = jax.random.bernoulli(jax.random.key(seed), documents / length, (batch, length))
    return jnp.cumsum(opens.astype(jnp.int32), axis=1)


def mamba1_rows(length, batch, d_inner, d_state, repeats, chunk, backward, documents=None):
    ids = None if documents is None else packed_ids(batch, length, documents)
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (batch, length, d_inner))
    dt = jax.random.normal(k[1], (batch, length, d_inner))
    A = -jnp.exp(jax.random.normal(k[2], (d_inner, d_state)))
    B = jax.random.normal(k[3], (batch, length, 1, d_state))
    C = jax.random.normal(k[4], (batch, length, 1, d_state))
    moved = 6 * 4 * batch * length * d_inner * d_state * (3 if backward else 1)
    rows, base = [], None
    for impl in mamba1_implementations():
        def scan(x, dt, A, B, C, impl=impl):
            return selective_scan(x, dt, A, B, C, implementation=impl, chunk_size=chunk,
                                  segment_ids=ids)
        if backward:  # forward + the gradient of every input
            fn = jax.jit(jax.grad(lambda *a, f=scan: jnp.sum(f(*a)), argnums=(0, 1, 2, 3, 4)))
        else:
            fn = jax.jit(scan)
        t = time_fn(fn, x, dt, A, B, C, warmup=1, repeats=repeats).median_s
        base = t if impl == "sequential" else base
        op = "selective_scan" + (f" packed {documents}" if ids is not None else "")
        rows.append({"op": op + (" fwd+bwd" if backward else ""), "impl": impl,
                     "L": length, "ms": t * 1e3, "tokens_per_s": batch * length / t,
                     "speedup_vs_lax_scan": base / t, "peak_mb": peak_mb(fn, x, dt, A, B, C),
                     "gb_per_s": moved / t / 1e9})
    return rows


def mamba2_implementations(chunk):
    """(name, fn) of each Mamba-2 implementation; the recurrence (the peer) first."""
    impls = [("recurrence (lax.scan)", lambda *a: ssd_reference(*a, dt_softplus=True)),
             (f"ssd chunk {chunk}", lambda *a: ssd(*a, chunk_size=chunk, dt_softplus=True))]
    if jax.default_backend() == "cpu":  # the C++ kernel, Mamba-2's CPU default
        impls.append(("native", lambda *a: ssd_native(*a, dt_softplus=True)))
    return impls


def mamba2_rows(length, heads, head_dim, d_state, repeats, chunk, backward):
    k = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(k[0], (1, length, heads, head_dim))
    dt = jax.random.normal(k[1], (1, length, heads))
    A = -jnp.exp(jax.random.normal(k[2], (heads,)))
    B = jax.random.normal(k[3], (1, length, 1, d_state))
    C = jax.random.normal(k[4], (1, length, 1, d_state))
    # the recurrence keeps its state in cache: count what it must read and write
    moved = 4 * length * (2 * heads * head_dim + heads + 2 * d_state) * (3 if backward else 1)
    rows, base = [], None
    for impl, scan in mamba2_implementations(chunk):
        if backward:  # forward + the gradient of every input
            fn = jax.jit(jax.grad(lambda *a, f=scan: jnp.sum(f(*a)), argnums=(0, 1, 2, 3, 4)))
        else:
            fn = jax.jit(scan)
        t = time_fn(fn, x, dt, A, B, C, warmup=1, repeats=repeats).median_s
        base = t if base is None else base
        rows.append({"op": "ssd" + (" fwd+bwd" if backward else ""), "impl": impl, "L": length,
                     "ms": t * 1e3, "tokens_per_s": length / t, "speedup_vs_lax_scan": base / t,
                     "peak_mb": peak_mb(fn, x, dt, A, B, C), "gb_per_s": moved / t / 1e9})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[1024, 8192, 65536])
    parser.add_argument("--batch", type=positive_int, default=1, help="Mamba-1 batch")
    parser.add_argument("--d-inner", type=positive_int, default=256)
    parser.add_argument("--d-state", type=positive_int, default=16)
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--ssd-state", type=positive_int, default=64)
    parser.add_argument("--chunk", type=positive_int, default=64)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--backward", action="store_true",
                        help="also time forward + backward")
    parser.add_argument("--skip-ssd", action="store_true", help="Mamba-1 rows only")
    parser.add_argument("--packed", type=positive_int, default=None, metavar="K",
                        help="also time Mamba-1 on packed documents, K per row on average")
    parser.add_argument("--name", default="ssm", help="results file stem")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    bandwidth = copy_bandwidth()
    columns = ["op", "impl", "L", "ms", "tokens_per_s", "speedup_vs_lax_scan", "peak_mb",
               "gb_per_s", "fraction_of_copy_bw"]
    notes = (f"Mamba-1 batch {args.batch}, d_inner {args.d_inner}, N {args.d_state}; Mamba-2 "
             f"batch 1, {args.heads} heads x {args.head_dim}, N {args.ssd_state}; float32, "
             f"{'forward and forward+backward' if args.backward else 'forward only'}, "
             f"{jax.default_backend()}. Peer: the lax.scan recurrence in the same run; copy "
             f"bandwidth {bandwidth / 1e9:.1f} GB/s (x + 1 over 256 MiB).")
    rows = []
    for length in cases(args.lengths, "ssm"):
        done = len(rows)
        for documents in [None] + ([args.packed] if args.packed else []):
            rows += mamba1_rows(length, args.batch, args.d_inner, args.d_state, args.repeats,
                                args.chunk, backward=False, documents=documents)
            if args.backward:
                rows += mamba1_rows(length, args.batch, args.d_inner, args.d_state, args.repeats,
                                    args.chunk, backward=True, documents=documents)
        if not args.skip_ssd:
            rows += mamba2_rows(length, args.heads, args.head_dim, args.ssd_state, args.repeats,
                                args.chunk, backward=False)
            if args.backward:
                rows += mamba2_rows(length, args.heads, args.head_dim, args.ssd_state,
                                    args.repeats, args.chunk, backward=True)
        for row in rows:
            row["fraction_of_copy_bw"] = row["gb_per_s"] * 1e9 / bandwidth
        # after every length: a later one that runs out of memory or time (a device run has a
        # time limit) keeps the rows already measured
        write_results(args.name, rows, columns, args.out, notes)
        print(markdown_table(rows[done:], columns), flush=True)


if __name__ == "__main__":
    main()
