"""GPU: forward+backward throughput of the block-sparse flash kernel vs cuDNN and vs JAX's own
Pallas flash attention (``jax.experimental.pallas.ops.gpu.attention.mha``, as shipped: its
default block sizes), both dense causal, and vs itself at several densities. Needs a CUDA
device.

    jaxsparse bench attention_gpu [--lengths 4096 8192 16384] [--repeats 10]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsparse.bench import cases, markdown_table, time_fn, write_results
from jaxsparse.bench.arguments import description, positive_int
from jaxsparse.ops.attention import dot_product_attention
from jaxsparse.ops.masks import CausalMask, LocalMask

RESULTS = Path(__file__).resolve().parent.parent / "results"


def fwd_bwd(attention):
    def loss(q, k, v):
        return attention(q, k, v).astype(jnp.float32).sum()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def jax_pallas_flash(q, k, v, *, interpret: bool = False):
    """The peer DESIGN §6 names: JAX's Pallas GPU flash attention, causal, at the softmax scale
    ours uses (its ``sm_scale`` defaults to 1). ``[B, S, H, D]`` in and out, as ours."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    return pallas_attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True,
                                interpret=interpret)


def causal_flops(length, heads, head_dim, batch, density=0.5):
    # 4 matmuls of S*T*D per head (fwd 2, bwd ~2.5x fwd): 3.5 * 4 * S*T*D * density
    return 3.5 * 4 * batch * heads * length * length * head_dim * density


COLUMNS = ["S", "mask", "density", "ours_ms", "peer", "peer_ms", "ours_tflops", "ratio_to_peer",
           "fraction_of_ideal"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--heads", type=positive_int, default=16)
    parser.add_argument("--head-dim", type=positive_int, default=128)
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        raise SystemExit("attention_gpu needs a CUDA device; this process sees "
                         f"{jax.default_backend()!r}")
    rows = []
    for length in cases(args.lengths, "attention_gpu"):
        shape = (args.batch, length, args.heads, args.head_dim)
        q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3))
        ours = fwd_bwd(lambda q, k, v: dot_product_attention(q, k, v, mask=CausalMask(),
                                                             implementation="pallas"))
        cudnn = fwd_bwd(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                     implementation="cudnn"))
        flops = causal_flops(length, args.heads, args.head_dim, args.batch)
        t_ours = time_fn(ours, q, k, v, repeats=args.repeats).median_s
        try:  # a cuDNN or driver problem costs its row, not the table
            t_cudnn = time_fn(cudnn, q, k, v, repeats=args.repeats).median_s
        except Exception as err:  # noqa: BLE001
            print(f"S={length}: cuDNN attention failed: {str(err)[:300]}")
            rows.append({"S": length, "mask": "causal", "density": 0.5, "ours_ms": t_ours * 1e3,
                         "peer": "cudnn (failed)", "ours_tflops": flops / t_ours / 1e12})
        else:
            rows.append({"S": length, "mask": "causal", "density": 0.5, "ours_ms": t_ours * 1e3,
                         "peer": "cudnn", "peer_ms": t_cudnn * 1e3,
                         "ours_tflops": flops / t_ours / 1e12, "ratio_to_peer": t_cudnn / t_ours})
        try:  # an API change in JAX's example kernel costs its row, not the table
            t_jax = time_fn(fwd_bwd(jax_pallas_flash), q, k, v, repeats=args.repeats).median_s
        except Exception as err:  # noqa: BLE001
            print(f"S={length}: JAX's Pallas flash attention failed: {str(err)[:300]}")
        else:
            rows.append({"S": length, "mask": "causal", "density": 0.5, "ours_ms": t_ours * 1e3,
                         "peer": "jax pallas mha", "peer_ms": t_jax * 1e3,
                         "ours_tflops": flops / t_ours / 1e12, "ratio_to_peer": t_jax / t_ours})
        dense = fwd_bwd(lambda q, k, v: dot_product_attention(q, k, v, mask=None,
                                                              implementation="pallas"))
        t_dense = time_fn(dense, q, k, v, repeats=args.repeats).median_s
        for density in (0.1, 0.25, 0.5):
            window = max(1, int(density * length))
            mask = LocalMask(window - 1, 0) & CausalMask()
            sparse = fwd_bwd(lambda q, k, v, mask=mask: dot_product_attention(
                q, k, v, mask=mask, implementation="pallas"))
            actual = mask.block_table(length, length, 64, 64).density
            t = time_fn(sparse, q, k, v, repeats=args.repeats).median_s
            rows.append({"S": length, "mask": f"window {window}", "density": actual,
                         "ours_ms": t * 1e3, "peer": "our dense kernel", "peer_ms": t_dense * 1e3,
                         "ratio_to_peer": t_dense / t, "fraction_of_ideal": (t_dense / t) * actual})
        # written after every length: a run stopped by its time limit keeps what it measured
        write_results("attention_gpu", rows, COLUMNS, args.out,
                      f"bf16, batch {args.batch}, {args.heads} heads, head dim {args.head_dim}, "
                      "forward + backward.")
        print(markdown_table([r for r in rows if r["S"] == length], COLUMNS), flush=True)


if __name__ == "__main__":
    main()
