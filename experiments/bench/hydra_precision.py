"""Hydra's sparse global attention and workspace under bfloat16: the bfloat16 path (bfloat16
operands, float32 accumulation) against the same op on float32 inputs — what both ops computed
before they kept bfloat16 operands (they upcast q, k, v and the workspace input) — forward and
backward, in one run.

Rows: ``sga blocked`` / ``sga core`` / ``sga dense`` (``sparse_global_attention``, window
``w``, ``G`` global tokens, GQA heads already repeated) and ``workspace`` (``WorkspaceMemory``,
16 slots, chunks of 64). ``speedup_vs_f32`` > 1 is the gain of keeping bfloat16 operands; on
CPU expect about 1. ``speedup_vs_blocked`` compares the SGA implementations in bfloat16 (the
automatic choice at long lengths is ``blocked``; ``core`` runs the window on the attention
core — the Pallas kernel on GPU/TPU — and is chosen only by ``model.hydra_sga_impl``).

    jaxsparse bench hydra_precision [--lengths 4096 8192] [--batch 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.bench import cases, markdown_table, time_fn, write_results
from jaxsparse.bench.arguments import description, positive_int
from jaxsparse.nn.workspace import WorkspaceMemory
from jaxsparse.ops.sga import sparse_global_attention

RESULTS = Path(__file__).resolve().parent.parent / "results"
HEADS, HEAD_DIM, WIDTH = 8, 64, 512
WINDOW, GLOBAL = 256, 512


def _grad_of_sum(fn, argnums):
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums))


def sga_cases(batch: int, length: int, impl: str):
    """(forward+backward function, bfloat16 args, float32 args)."""
    keys = jax.random.split(jax.random.key(length), 4)
    q, k, v = (jax.random.normal(kk, (batch, length, HEADS, HEAD_DIM)) for kk in keys[:3])
    scores = jax.random.normal(keys[3], (batch, length))

    def attend(q, k, v):
        return sparse_global_attention(q, k, v, scores, window=WINDOW, max_global=GLOBAL,
                                       implementation=impl)

    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    return _grad_of_sum(attend, (0, 1, 2)), low, [q, k, v]


def workspace_cases(batch: int, length: int):
    """((bfloat16 forward+backward, float32 peer), bfloat16 args, float32 args): the same
    bfloat16 weights, computed in bfloat16 or (the peer) cast to float32 with the input."""
    x = jax.random.normal(jax.random.key(length), (batch, length, WIDTH))
    fns = []
    for dtype in (jnp.bfloat16, jnp.float32):
        graph, weights = nnx.split(WorkspaceMemory(WIDTH, 16, 64, rngs=nnx.Rngs(0), dtype=dtype,
                                                   param_dtype=jnp.bfloat16))
        fns.append(_grad_of_sum(lambda w, x, g=graph: nnx.merge(g, w)(x), (0, 1)))
    return fns, [weights, x.astype(jnp.bfloat16)], [weights, x]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--lengths", nargs="+", type=positive_int, default=[4096, 8192])
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--name", default="hydra_precision", help="results file stem")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    columns = ["op", "length", "batch", "bf16_ms", "f32_ms", "speedup_vs_f32",
               "speedup_vs_blocked"]
    notes = (f"{jax.default_backend()}; SGA: {HEADS} heads of {HEAD_DIM}, window {WINDOW}, "
             f"{GLOBAL} global tokens; workspace: width {WIDTH}, 16 slots, chunks of 64. Peer: "
             "the same op on float32 inputs (the float32 matmuls both ops ran before keeping "
             "bfloat16 operands), in the same run.")
    rows = []
    for length in cases(args.lengths, "hydra_precision"):
        runs = {}
        for impl in ("blocked", "core", "dense"):
            fn, low, wide = sga_cases(args.batch, length, impl)
            runs[f"sga {impl}"] = ((fn, low), (fn, wide))
        (fn_low, fn_wide), low, wide = workspace_cases(args.batch, length)
        runs["workspace"] = ((fn_low, low), (fn_wide, wide))
        for op, ((fn, low_args), (peer, wide_args)) in runs.items():
            ours = time_fn(fn, *low_args, warmup=1, repeats=args.repeats).median_s
            f32 = time_fn(peer, *wide_args, warmup=1, repeats=args.repeats).median_s
            rows.append({"op": op + " fwd+bwd", "length": length, "batch": args.batch,
                         "bf16_ms": ours * 1e3, "f32_ms": f32 * 1e3,
                         "speedup_vs_f32": f32 / ours})
        blocked = rows[-len(runs)]["bf16_ms"]
        for row in rows[-len(runs):]:
            if row["op"].startswith("sga"):
                row["speedup_vs_blocked"] = blocked / row["bf16_ms"]
        # written after every length: a run stopped by its time limit keeps what it measured
        write_results(args.name, rows, columns, args.out, notes)
        print(markdown_table(rows[-len(runs):], columns), flush=True)


if __name__ == "__main__":
    main()
