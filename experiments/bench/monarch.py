"""Monarch projection against a dense linear layer of the same shape, in one run.

For width d (square, the paper's b = √d blocks) and T tokens, times ``x @ W`` (the peer, a
dense ``jnp.dot``) and ``monarch_matmul`` in XLA's einsum form and in this backend's fused
kernel (the C++ kernel on CPU, Pallas on accelerators), and prints
the speed-up over dense beside two ideals: the FLOP ratio (``d / (2√d)``) and the roofline
bound ``max(FLOPs / peak, bytes / bandwidth)`` of each, with the machine's matmul peak and copy
bandwidth measured in the same run. Float32 on CPU (bfloat16 on accelerators). Each width is
timed twice: the forward pass, and a training pass (the forward output, and ``dx`` and the
weight gradients for a given output cotangent), against the dense layer's ``y, dx, dW``. Both
sides return their forward output, so each pass is three products' work (one forward, two
backward) on either side.

    jaxsparse bench monarch [--d 1024 4096 8192] [--tokens 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jaxsparse.bench import cases, markdown_table, matmul_peak_flops, time_fn, write_results
from jaxsparse.bench.arguments import description, positive_int
from jaxsparse.ops.monarch import (dense_flops, monarch_bytes, monarch_flops, monarch_matmul,
                                   monarch_shapes)

RESULTS = Path(__file__).resolve().parent.parent / "results"


def copy_bandwidth(dtype, n: int = 1 << 26) -> float:
    """Bytes/s of reading and writing a large array (``x + 1``): the memory roof."""
    x = jnp.zeros((n,), dtype)
    t = time_fn(jax.jit(lambda a: a + 1), x, repeats=5).median_s
    return 2 * n * jnp.dtype(dtype).itemsize / t


def implementations() -> list[str]:
    """XLA's einsum form beside this backend's fused kernel (C++ on CPU, Pallas elsewhere)."""
    return ["xla", "native" if jax.default_backend() == "cpu" else "pallas"]


def training_pass(f, ct):
    """``f``'s output and its VJP for the output cotangent ``ct``. The output is returned so
    that XLA cannot drop the forward product: a VJP alone keeps only the residuals it needs
    (for the dense layer none, leaving 2 of the pass's 3 products; Monarch keeps half its
    forward), and the two sides would not time the same pass."""
    def both(*args):
        y, pullback = jax.vjp(f, *args)
        return y, pullback(ct)
    return both


# mode -> (function transform, products of the forward's size each pass computes)
PASSES = {"forward": (lambda f, ct: f, 1), "forward+backward": (training_pass, 3)}


def run(widths, tokens: int, repeats: int, save=None) -> list[dict]:
    """The rows of every width, and the machine's measured ceilings; ``save(rows, machine)``
    (optional) is called after each width with the rows so far."""
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    size = jnp.dtype(dtype).itemsize
    peak, bandwidth = matmul_peak_flops(2048, dtype), copy_bandwidth(dtype)
    print(f"{jax.default_backend()}: matmul peak {peak / 1e9:.0f} GFLOP/s, copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s", file=sys.stderr, flush=True)
    machine = {"matmul_peak_gflops": peak / 1e9, "copy_gbps": bandwidth / 1e9}
    rows = []
    for d in cases(widths, "monarch"):
        keys = jax.random.split(jax.random.key(d), 5)
        x = jax.random.normal(keys[0], (tokens, d), dtype)
        w = (jax.random.normal(keys[1], (d, d)) / d**0.5).astype(dtype)
        s1, s2 = monarch_shapes(d, d)
        w1 = jax.random.normal(keys[2], s1, dtype)
        w2 = jax.random.normal(keys[3], s2, dtype)
        ct = jax.random.normal(keys[4], (tokens, d), dtype)
        d_flops, m_flops = dense_flops(tokens, d, d), monarch_flops(tokens, d, d)
        d_bound = max(d_flops / peak, (2 * tokens * d + d * d) * size / bandwidth)
        m_bound = max(m_flops / peak, monarch_bytes(tokens, d, d, itemsize=size) / bandwidth)
        for mode, (transform, work) in PASSES.items():
            dense_t = time_fn(jax.jit(transform(jnp.dot, ct)), x, w, repeats=repeats).median_s
            for impl in implementations():
                def product(x, w1, w2, impl=impl):
                    return monarch_matmul(x, w1, w2, implementation=impl)

                fn = jax.jit(transform(product, ct))
                t = time_fn(fn, x, w1, w2, repeats=repeats).median_s
                row = {"d": d, "blocks": s1[0], "tokens": tokens, "pass": mode,
                       "implementation": impl, "dense_ms": dense_t * 1e3, "monarch_ms": t * 1e3,
                       "speedup": dense_t / t, "flop_ratio": d_flops / m_flops,
                       "roofline_ratio": d_bound / m_bound,
                       "monarch_gflops": work * m_flops / t / 1e9}
                rows.append(row)
                # progress on stderr (through the bar), so stdout holds only the table
                tqdm.write(f"d={d:5d} {mode:16s} {impl:8s} dense {dense_t * 1e3:8.1f} ms  "
                           f"monarch {t * 1e3:7.1f} ms  {row['speedup']:5.1f}x  (FLOP ratio "
                           f"{row['flop_ratio']:.0f}x, forward roofline "
                           f"{row['roofline_ratio']:.1f}x)", file=sys.stderr)
        if save is not None:
            save(rows, machine)
    return rows, machine


def main(argv=None):
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--d", type=positive_int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--tokens", type=positive_int, default=4096)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--name", default="monarch", help="results file stem")
    parser.add_argument("--out", default=str(RESULTS), help="results directory")
    args = parser.parse_args(argv)
    columns = ["d", "blocks", "tokens", "pass", "implementation", "dense_ms", "monarch_ms",
               "speedup", "flop_ratio", "roofline_ratio", "monarch_gflops"]

    def save(rows, machine):  # after every width: a run stopped by its time limit keeps them
        notes = ("forward: y = x W; forward+backward: y and the VJP (dx and the weight "
                 "gradients), the output returned on both sides so that the forward product is "
                 "kept (3 products' work per pass; monarch_gflops counts 3x the forward FLOPs). "
                 "roofline_ratio is the forward pass's. "
                 f"Machine: matmul peak {machine['matmul_peak_gflops']:.0f} GFLOP/s, "
                 f"copy bandwidth {machine['copy_gbps']:.1f} GB/s (measured in the same run). "
                 "speedup = dense_ms / monarch_ms; flop_ratio and roofline_ratio are the ideals.")
        write_results(args.name, rows, columns, args.out, notes)

    rows, _ = run(args.d, args.tokens, args.repeats, save)
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
