"""Sparse global attention under GQA: each key/value head read once for its query heads (our
path) against the same op on K/V repeated per query head (what ``SparseGlobalAttention``
did before, and what an attention written for MHA needs), in one run.

Rows: ``blocked`` / ``core`` / ``dense`` forward+backward over ``length`` tokens, and
``decode``: one new token's step against a cache of ``length`` positions (``sga_decode``,
what every generated token pays in each SGA layer). ``speedup_vs_repeat`` > 1 is the gain of
not repeating. Window ``w``, ``G`` global tokens; float32 (bfloat16 with ``--bf16``).

    jaxsparse bench sga_gqa [--lengths 1024 4096] [--heads 8] [--kv-heads 2] [--batch 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsparse.bench import cases, markdown_table, time_interleaved, write_results
from jaxsparse.bench.arguments import description, positive_int
from jaxsparse.ops.sga import sga_decode, sparse_global_attention

RESULTS = Path(__file__).resolve().parent.parent / "results"
HEAD_DIM, WINDOW, GLOBAL = 64, 256, 512


def _inputs(batch, length, heads, kv_heads, queries, dtype):
    keys = jax.random.split(jax.random.key(length), 4)
    q = jax.random.normal(keys[0], (batch, queries, heads, HEAD_DIM), dtype)
    k, v = (jax.random.normal(kk, (batch, length, kv_heads, HEAD_DIM), dtype) for kk in keys[1:3])
    return q, k, v, jax.random.normal(keys[3], (batch, length))


def training_pair(impl, batch, length, heads, kv_heads, dtype):
    """(ours, the repeating peer) forward+backward of ``sparse_global_attention``, and args."""
    args = _inputs(batch, length, heads, kv_heads, length, dtype)

    def grad_fn(expand):
        def loss(q, k, v, scores):
            out = sparse_global_attention(q, expand(k), expand(v), scores, window=WINDOW,
                                          max_global=GLOBAL, implementation=impl)
            return jnp.sum(out.astype(jnp.float32))
        return jax.jit(jax.grad(loss, (0, 1, 2, 3)))

    repeat = lambda x: jnp.repeat(x, heads // kv_heads, axis=2)  # noqa: E731
    return grad_fn(lambda x: x), grad_fn(repeat), args


def decode_pair(batch, length, heads, kv_heads, dtype):
    """(ours, the repeating peer) decode step of one token at the cache's last position."""
    args = _inputs(batch, length, heads, kv_heads, 1, dtype)
    lengths = jnp.full((batch,), length, jnp.int32)

    def step(expand):
        return jax.jit(lambda q, k, v, scores: sga_decode(
            q, expand(k), expand(v), scores, lengths, window=WINDOW, max_global=GLOBAL))

    repeat = lambda x: jnp.repeat(x, heads // kv_heads, axis=2)  # noqa: E731
    return step(lambda x: x), step(repeat), args


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--lengths", nargs="+", type=positive_int, default=[1024, 4096])
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--kv-heads", type=positive_int, default=2)
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 inputs (default float32)")
    parser.add_argument("--name", default="sga_gqa", help="results file stem")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    shape = (args.batch, args.heads, args.kv_heads, dtype)
    rows = []
    for length in cases(args.lengths, "sga_gqa"):
        pairs = {f"{impl} fwd+bwd": training_pair(impl, args.batch, length, *shape[1:])
                 for impl in ("blocked", "core", "dense")}
        pairs["decode step"] = decode_pair(args.batch, length, *shape[1:])
        for op, (ours, peer, fn_args) in pairs.items():
            ours_s, peer_s = time_interleaved((ours, fn_args), (peer, fn_args),
                                              repeats=args.repeats)
            rows.append({"op": op, "length": length, "batch": args.batch,
                         "gqa_ms": ours_s * 1e3, "repeat_ms": peer_s * 1e3,
                         "speedup_vs_repeat": peer_s / ours_s})
    columns = ["op", "length", "batch", "gqa_ms", "repeat_ms", "speedup_vs_repeat"]
    notes = (f"{jax.default_backend()}; {jnp.dtype(dtype).name}; {args.heads} query heads on "
             f"{args.kv_heads} key/value heads of {HEAD_DIM}, window {WINDOW}, {GLOBAL} global "
             "tokens. Peer: the same op on K/V repeated per query head, in the same run "
             "(interleaved, the better of two medians each). decode: one token, a cache of "
             "`length` positions.")
    write_results(args.name, rows, columns, args.out, notes)
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
