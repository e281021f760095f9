"""Routing attention against dense causal attention as the sequence grows.

For L in 1k..16k, one attention layer's worth of heads (batch 1, 4 heads, head dim 64) in the
same run: dense causal attention (our block-skipping flash-style XLA path, which already skips
the upper triangle, and ``jax.nn.dot_product_attention`` where its L² logits fit) against
causal routing attention with the paper's ``C = √L`` clusters and ``w = L / C`` keys per query,
and with multi-probe queries (``P`` clusters, ``P · w`` keys per query; with ``--split``
also ``P`` windows of ``w / P`` keys, as many keys as one probe). Forward + backward
(the training cost). The log-log plot shows the slopes: 2 for dense, 1.5 for routing.

    jaxsparse bench routing [--lengths 1024 2048 4096 8192 16384] [--probes 1 2] [--split]
                            [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxsparse.bench import cases, markdown_table, time_fn, write_results
from jaxsparse.bench.arguments import description, positive_int
from jaxsparse.ops.attention import dot_product_attention
from jaxsparse.ops.masks import CausalMask
from jaxsparse.ops.routing import causal_routing_attention, init_centroids

RESULTS = Path(__file__).resolve().parent.parent / "results"
HEADS, DIM = 4, 64
JAX_NN_MAX = 4096  # jax.nn.dot_product_attention materialises [H, L, L] logits


def _loss(attend):
    def loss(q, k, v):
        return jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _routing(centroids, window, probes):
    return lambda q, k, v: causal_routing_attention(q, k, v, centroids, window=window,
                                                    probes=probes)[0]


def run(lengths, repeats, probes=(1,), split=False):
    rows = []
    for length in cases(lengths, "routing"):
        clusters = int(round(math.sqrt(length)))
        window = length // clusters
        keys = jax.random.split(jax.random.key(length), 4)
        q, k, v = (jax.random.normal(kk, (1, length, HEADS, DIM)) for kk in keys[:3])
        centroids = init_centroids(keys[3], HEADS, clusters, DIM)
        paths = {
            "dense (ours, block-skipping)": lambda q, k, v: dot_product_attention(
                q, k, v, mask=CausalMask(), implementation="xla_blocksparse"),
        }
        keys_per_query = {}  # at most, per routing path
        for p in probes:
            name = "routing" + (f" ({p} probes)" if p > 1 else "")
            paths[name], keys_per_query[name] = _routing(centroids, window, p), p * window
            if split and p > 1:  # P windows of w / P keys: as many keys as one probe reads
                name, split_window = f"routing ({p} probes of w/{p})", max(window // p, 1)
                paths[name] = _routing(centroids, split_window, p)
                keys_per_query[name] = p * split_window
        if length <= JAX_NN_MAX:
            paths["jax.nn.dot_product_attention"] = lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True)
        times = {name: time_fn(_loss(fn), q, k, v, repeats=repeats).median_s
                 for name, fn in paths.items()}
        dense = times["dense (ours, block-skipping)"]
        for name, t in times.items():
            rows.append({"length": length, "clusters": clusters, "window": window, "path": name,
                         "keys_per_query": keys_per_query.get(name, ""),
                         "fwd_bwd_ms": t * 1e3, "speedup_vs_dense": dense / t})
            # progress on stderr (through the bar), so stdout holds only the table
            tqdm.write(f"L={length:6d} {name:30s} {t * 1e3:9.1f} ms  {dense / t:5.2f}x",
                       file=sys.stderr)
    return rows


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["path"] for r in rows):
        pts = [(r["length"], r["fwd_bwd_ms"]) for r in rows if r["path"] == name]
        xs, ys = np.array(pts).T
        slope = np.polyfit(np.log(xs), np.log(ys), 1)[0] if len(xs) > 1 else float("nan")
        ax.plot(xs, ys, marker="o", label=f"{name} (slope {slope:.2f})")
    ax.set(xscale="log", yscale="log", xlabel="sequence length",
           ylabel="forward + backward (ms)", title="Routing vs dense causal attention (CPU)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--probes", type=positive_int, nargs="+", default=[1, 2],
                        help="clusters each routing query reads (one row per value)")
    parser.add_argument("--split", action="store_true",
                        help="also time each P > 1 with windows of w / P keys (P · w/P = w keys "
                             "per query, the cost of one probe)")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--name", default="routing")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    rows = run(args.lengths, args.repeats, args.probes, args.split)
    columns = ["length", "clusters", "window", "path", "keys_per_query", "fwd_bwd_ms",
               "speedup_vs_dense"]
    print(markdown_table(rows, columns))
    notes = (f"Batch 1, {HEADS} heads of dim {DIM}, float32, forward + backward; routing uses "
             "C = round(sqrt(L)) clusters and w = L // C keys per query (P · w with P probes; "
             "'P probes of w/P': P windows of w // P keys).")
    write_results(args.name, rows, columns, args.out, notes)
    plot(rows, Path(args.out) / f"{args.name}.png")


if __name__ == "__main__":
    main()
