"""Mixture-of-experts feed-forward paths against dense and classic formulations.

For E SwiGLU experts, top-k routing, T tokens, width d and expert hidden h, times in one run:
  dense all-experts   every expert on every token, combined with the routing weights (peer a)
  one-hot einsums     the classic capacity formulation: dispatch/combine tensors [T, E, C]
                      contracted by einsum (Mesh-TensorFlow, flaxformer) (peer b)
  ragged_dot          dropless with jax.lax.ragged_dot as the grouped matmul (peer c)
  ours: capacity      scatter into [E, C, d] buffers by priority slot, batched expert matmuls
  ours: dropless (tiles)   sort by expert, grouped matmul over padded tiles (MegaBlocks-style)
  ours: dropless (native)  sort by expert, the C++ grouped matmul (one GEMM per expert's rows;
                      the CPU default for float32); on GPU and TPU, where "native" would run
                      the tiles path, ``ours: dropless (pallas)``, our Pallas kernel
The ratio is each path's speed relative to the dense all-experts path, beside the ideal E/k
(dense does E experts' work per token, routing only k). Float32, capacity factor 1.25; the
forward pass, or with ``--backward`` forward + backward (gradients of the input and the
expert weights).

    jaxsparse bench moe [--experts 8 16 64] [--tokens 4096] [--d 256] [--hidden 512] [--backward]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsparse.bench import cases, markdown_table, time_fn, write_results
from jaxsparse.bench.arguments import description, positive_int
from jaxsparse.ops.moe import (capacity_dispatch, dropless_dispatch, expert_capacity,
                               grouped_matmul, slot_positions, swiglu_experts, top_k_routing)

RESULTS = Path(__file__).resolve().parent.parent / "results"
CAPACITY_FACTOR = 1.25


def paths(E, k, tokens, weights):
    gate, up, down = weights
    capacity = expert_capacity(tokens, E, k, CAPACITY_FACTOR)

    def dense(x, logits):
        choice = top_k_routing(logits, k)
        hidden = jax.nn.silu(jnp.einsum("td,edh->teh", x, gate)) * jnp.einsum("td,edh->teh", x, up)
        every = jnp.einsum("teh,ehd->ted", hidden, down)
        combine = jnp.sum(jax.nn.one_hot(choice.expert_index, E) * choice.weights[..., None], axis=1)
        return jnp.einsum("te,ted->td", combine, every)

    def one_hot_einsums(x, logits):
        choice = top_k_routing(logits, k)
        position = slot_positions(choice, E)
        kept = (position >= 0) & (position < capacity)
        expert = jax.nn.one_hot(choice.expert_index, E)  # [T, k, E]
        slot = jax.nn.one_hot(jnp.where(kept, position, capacity), capacity)  # [T, k, C]
        dispatch = jnp.einsum("tke,tkc->tec", expert, slot)
        combine = jnp.einsum("tke,tkc,tk->tec", expert, slot, choice.weights)
        buffers = jnp.einsum("tec,td->ecd", dispatch, x)
        return jnp.einsum("tec,ecd->td", combine, swiglu_experts(buffers, gate, up, down))

    def dropless(impl):
        def run(x, logits):
            choice = top_k_routing(logits, k)

            def grouped(rows, sizes):
                gmm = lambda a, w: grouped_matmul(a, w, sizes, implementation=impl)  # noqa: E731
                return gmm(jax.nn.silu(gmm(rows, gate)) * gmm(rows, up), down)
            return dropless_dispatch(x, choice, grouped)
        return run

    def ours_capacity(x, logits):
        choice = top_k_routing(logits, k)
        return capacity_dispatch(x, choice, lambda b: swiglu_experts(b, gate, up, down), capacity)[0]

    return {"dense all-experts": dense, "one-hot einsums": one_hot_einsums,
            "ragged_dot": dropless("ragged_dot"), "ours: capacity": ours_capacity,
            "ours: dropless (tiles)": dropless("tiles"),
            f"ours: dropless ({fast_kernel()})": dropless(fast_kernel())}


def fast_kernel(backend: str | None = None) -> str:
    """Our grouped-matmul kernel on ``backend``: the C++ one on CPU, the Pallas one on GPU and
    TPU (``"native"`` is CPU-only; asked for elsewhere it runs ``"tiles"``, and the row
    timed the tiles path a second time under the native kernel's name)."""
    return "native" if (backend or jax.default_backend()) == "cpu" else "pallas"


def bench(E, k, tokens, d, hidden, repeats, backward=False):
    keys = jax.random.split(jax.random.key(E), 5)
    x = jax.random.normal(keys[0], (tokens, d))
    logits = jax.random.normal(keys[1], (tokens, E))
    gate, up = (jax.random.normal(keys[i], (E, d, hidden)) * d**-0.5 for i in (2, 3))
    down = jax.random.normal(keys[4], (E, hidden, d)) * hidden**-0.5
    weights = (gate, up, down)
    rows, base = [], None
    for name in paths(E, k, tokens, weights):
        def forward(x, logits, weights, name=name):
            return paths(E, k, tokens, weights)[name](x, logits)

        if backward:  # d input and d weights, as a training step needs them
            fn = jax.grad(lambda x, logits, w: jnp.sum(forward(x, logits, w) ** 2), (0, 2))
        else:
            fn = forward
        t = time_fn(jax.jit(fn), x, logits, weights, warmup=1, repeats=repeats).median_s
        base = t if base is None else base
        rows.append({"E": E, "k": k, "path": name, "ms": t * 1e3, "speedup_vs_dense": base / t,
                     "ideal": E / k})
    return rows


def grouped_matmul_rows(E, tokens, k, d, hidden, repeats):
    """Accelerators: our grouped-matmul kernel against jax.lax.ragged_dot, TFLOP/s (bf16)."""
    m = tokens * k
    lhs = jax.random.normal(jax.random.key(0), (m, d), jnp.bfloat16)
    rhs = jax.random.normal(jax.random.key(1), (E, d, hidden), jnp.bfloat16)
    sizes = jnp.bincount(jax.random.randint(jax.random.key(2), (m,), 0, E), length=E).astype(jnp.int32)
    rows = []
    for impl in ("ragged_dot", "pallas"):
        # the sizes are an argument, as in an MoE layer where they depend on the data (closed
        # over, they were a constant the compiler could fold the tile bookkeeping of)
        fn = jax.jit(lambda a, b, s, impl=impl: grouped_matmul(a, b, s, implementation=impl))
        t = time_fn(fn, lhs, rhs, sizes, warmup=1, repeats=repeats).median_s
        rows.append({"E": E, "rows": m, "impl": impl, "ms": t * 1e3,
                     "tflops": 2 * m * d * hidden / t / 1e12})
    rows[-1]["vs_ragged_dot"] = rows[0]["ms"] / rows[-1]["ms"]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--experts", type=positive_int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--k", type=positive_int, default=2)
    parser.add_argument("--tokens", type=positive_int, default=4096)
    parser.add_argument("--d", type=positive_int, default=256)
    parser.add_argument("--hidden", type=positive_int, default=512)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--backward", action="store_true",
                        help="time forward + backward (d input, d expert weights)")
    parser.add_argument("--name", default=None, help="results file stem (default moe or "
                        "moe_backward)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    passes = "forward + backward" if args.backward else "forward"
    notes = (f"{args.tokens} tokens, d {args.d}, expert hidden {args.hidden}, top-{args.k}, "
             f"float32 {passes}, {jax.default_backend()}; capacity factor {CAPACITY_FACTOR}. "
             f"Peers timed in the same run; ratio = dense all-experts time / path time.")
    name = args.name or ("moe_backward" if args.backward else "moe")
    columns = ["E", "k", "path", "ms", "speedup_vs_dense", "ideal"]
    rows = []
    for E in cases(args.experts, "moe"):
        new = bench(E, args.k, args.tokens, args.d, args.hidden, args.repeats, args.backward)
        rows += new
        # written after every E: a run stopped by its time limit keeps what it measured
        write_results(name, rows, columns, args.out, notes)
        print(markdown_table(new, columns), flush=True)
    if jax.default_backend() in ("gpu", "tpu"):
        gmm_rows = []
        columns = ["E", "rows", "impl", "ms", "tflops", "vs_ragged_dot"]
        for E in args.experts:
            new = grouped_matmul_rows(E, args.tokens * 4, args.k, 1024, 2048, args.repeats)
            gmm_rows += new
            write_results("moe_gmm_" + jax.default_backend(), gmm_rows, columns, args.out,
                          "grouped matmul, bf16, d 1024 -> 2048, rows sorted by expert")
            print(markdown_table(new, columns), flush=True)


if __name__ == "__main__":
    main()
