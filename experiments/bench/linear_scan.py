"""Hydra's first-order linear scan ``h_t = a_t h_{t-1} + b_t`` on this backend: every
implementation against ``lax.scan`` in one run.

Implementations: ``sequential`` (``lax.scan``, the peer), ``associative``
(``lax.associative_scan``, the accelerator default) and, by backend, ``native`` (the C++
kernel, the CPU default) or ``pallas`` (the Triton / Mosaic kernel). Reports time, the ratio to
``lax.scan``, and achieved bytes/s against this machine's copy bandwidth: the scan must read
``a`` and ``b`` and write ``h`` (12 bytes per element in float32; the backward reads ``a``,
``h`` and the cotangent and writes two gradients), so a kernel at the copy bandwidth is as fast
as the scan can go.

    jaxsparse bench linear_scan [--shapes 8x4096x512 1x65536x256] [--backward]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsparse.bench import cases, markdown_table, time_fn, write_results
from jaxsparse.bench.arguments import description, positive_int, size_tuple
from jaxsparse.ops.diagonal_ssm import linear_scan

RESULTS = Path(__file__).resolve().parent.parent / "results"


def copy_bandwidth(n_bytes: int = 1 << 28) -> float:
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    return 2 * n_bytes / time_fn(jax.jit(lambda x: x + 1.0), x, repeats=5).median_s


def implementations() -> list[str]:
    fast = "native" if jax.default_backend() == "cpu" else "pallas"
    return ["sequential", "associative", fast]


def rows_for(shape, repeats, backward):
    batch, length, width = shape
    k = jax.random.split(jax.random.key(0), 3)
    a = jax.random.uniform(k[0], shape, minval=0.5, maxval=1.0)
    b = jax.random.normal(k[1], shape)
    h0 = jax.random.normal(k[2], (batch, width))
    elements = batch * length * width
    moved = 4 * elements * (3 + (5 if backward else 0))
    rows, base = [], None
    for impl in implementations():
        def scan(a, b, h0, impl=impl):
            return linear_scan(a, b, h0, implementation=impl)
        if backward:
            fn = jax.jit(jax.grad(lambda *p, f=scan: jnp.sum(f(*p)[0]), argnums=(0, 1, 2)))
        else:
            fn = jax.jit(scan)
        t = time_fn(fn, a, b, h0, warmup=1, repeats=repeats).median_s
        base = t if base is None else base
        rows.append({"op": "linear_scan" + (" fwd+bwd" if backward else ""), "impl": impl,
                     "shape": "x".join(map(str, shape)), "ms": t * 1e3,
                     "speedup_vs_lax_scan": base / t, "gb_per_s": moved / t / 1e9})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--shapes", nargs="+", type=size_tuple, default=[(8, 4096, 512), (1, 65536, 256)],
                        help="batch x length x width")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--backward", action="store_true", help="also time forward + backward")
    parser.add_argument("--name", default="linear_scan", help="results file stem")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    shapes = args.shapes
    for s in shapes:
        if len(s) != 3:
            parser.error(f"--shapes: {'x'.join(map(str, s))!r} must be batch x length x width")
    bandwidth = copy_bandwidth()
    columns = ["op", "impl", "shape", "ms", "speedup_vs_lax_scan", "gb_per_s",
               "fraction_of_copy_bw"]
    notes = (f"float32, {jax.default_backend()}; peer: lax.scan in the same run; copy bandwidth "
             f"{bandwidth / 1e9:.1f} GB/s (x + 1 over 256 MiB). Bytes: a, b read and h written "
             "(forward); + a, h, cotangent read and two gradients written (backward).")
    rows = []
    for shape in cases(shapes, "linear_scan"):
        new = rows_for(shape, args.repeats, backward=False)
        if args.backward:
            new += rows_for(shape, args.repeats, backward=True)
        for row in new:
            row["fraction_of_copy_bw"] = row["gb_per_s"] * 1e9 / bandwidth
        rows += new
        # written after every shape: a run stopped by its time limit keeps what it measured
        write_results(args.name, rows, columns, args.out, notes)
        print(markdown_table(new, columns), flush=True)


if __name__ == "__main__":
    main()
