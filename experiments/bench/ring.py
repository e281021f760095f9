"""Context-parallel attention: the ring's contiguous and zig-zag layouts against gathered K/V.

The sequence split over mesh axis ``sequence`` (``--devices`` emulated CPU devices unless the
host has that many); forward, and forward + backward (gradients of q, k, v), float32. Paths,
timed in the same run for each mask:
  gathered K/V     the compiler's own partitioning of the dense masked attention
                   (``implementation="xla"``) on sequence-sharded inputs: keys and values
                   all-gathered onto every device; it computes every tile, masked or not
  gathered K/V, block-sparse
                   the same gathered keys and values through ``implementation=
                   "xla_blocksparse"``, which skips the mask's empty tiles as the ring skips
                   empty part pairs: the peer that separates ring-vs-gather from tile skipping
  ring contiguous  ``ring_attention(layout="contiguous")``: device i holds chunk i
  ring zigzag      ``ring_attention(layout="zigzag")``: device i holds halves i and 2n-1-i
  ring auto        ``layout=None``: the layout with the shorter critical path
Columns: times, the forward + backward speed-up over each gathered peer, and the ring's
critical path in part pairs (per step, the most non-empty query/key part pairs any device
works, summed over steps) beside the work of all devices together; ``ring.png`` maps each
layout's work per step and device. Emulated CPU devices share the host's cores (and XLA:CPU
spreads one device's ops over them), so CPU times follow the total work more than the critical
path; on a real mesh each device has its own chip and the ring waits for the slowest, so the
critical path is what the wall time follows.

    jaxsparse bench ring [--devices 4] [--length 8192] [--heads 4] [--head-dim 64]
                         [--window 512] [--part-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from jaxsparse.bench.arguments import description, positive_int

RESULTS = Path(__file__).resolve().parent.parent / "results"
DENSE_PEER, SPARSE_PEER = "gathered K/V", "gathered K/V, block-sparse"
# speedup_fwd_bwd is over the dense peer (the column older results have), speedup_vs_blocksparse
# over the block-sparse one: a window's speed-up over the dense peer is mostly tile skipping.
COLUMNS = ["mask", "path", "layout", "fwd_ms", "fwd_bwd_ms", "speedup_fwd_bwd",
           "speedup_vs_blocksparse", "critical_path", "total_pairs"]


def parse(argv):
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--devices", type=positive_int, default=4, help="size of the sequence axis")
    parser.add_argument("--length", type=positive_int, default=8192)
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--window", type=positive_int, default=512, help="the sliding-window mask's width")
    parser.add_argument("--part-tokens", type=positive_int, default=128,
                        help="ring_attention's part length (tune it per backend)")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args(argv)


def schedule(mask, args, layout):
    """Part pairs worked ``[step, device]`` by the ring in ``layout``."""
    from jaxsparse.ops.attention.ring import ring_work, split_parts

    n, length = args.devices, args.length
    parts = split_parts(length // n, length // n, args.part_tokens)
    return ring_work(mask, length, length, n, layout, parts)


def plot(work: dict, path: Path) -> None:
    """One heat map per (mask, layout): part pairs worked per ring step and device, the
    critical path (the per-step maximum, summed) in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = list(dict.fromkeys(m for m, _ in work))
    layouts = list(dict.fromkeys(layout for _, layout in work))
    fig, axes = plt.subplots(len(masks), len(layouts), squeeze=False, constrained_layout=True,
                             figsize=(3.2 * len(layouts), 2.8 * len(masks)))
    top = max(int(w.max()) for w in work.values())
    for (mask, layout), w in work.items():
        ax = axes[masks.index(mask)][layouts.index(layout)]
        image = ax.imshow(w, cmap="viridis", vmin=0, vmax=top, aspect="auto")
        ax.set_title(f"{mask}, {layout}: critical path {int(w.max(axis=1).sum())}", fontsize=9)
        ax.set_xlabel("device")
        ax.set_ylabel("ring step")
    fig.colorbar(image, ax=axes, label="part pairs worked")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measure(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from jaxsparse.bench import cases, time_fn
    from jaxsparse.ops.attention import dot_product_attention
    from jaxsparse.ops.attention.ring import choose_layout, ring_attention
    from jaxsparse.ops.masks import CausalMask, LocalMask

    n, length = args.devices, args.length
    if length % (2 * n):
        raise SystemExit(f"--length {length}: must be divisible by twice --devices ({2 * n})")
    mesh = Mesh(np.array(jax.devices()[:n]), ("sequence",))
    keys = jax.random.split(jax.random.key(0), 3)
    shape = (args.batch, length, args.heads, args.head_dim)
    split = NamedSharding(mesh, P(None, "sequence"))
    q, k, v = (jax.device_put(jax.random.normal(key, shape), split) for key in keys)
    masks = {"causal": CausalMask(), f"window {args.window}": LocalMask(args.window, 0)}
    rows, works = [], {}
    for mask_name, mask in cases(masks.items(), "ring"):
        paths = {peer: (lambda q, k, v, mask=mask, impl=impl: dot_product_attention(
                     q, k, v, mask=mask, implementation=impl), "")
                 for peer, impl in ((DENSE_PEER, "xla"), (SPARSE_PEER, "xla_blocksparse"))}
        for layout in ("contiguous", "zigzag", None):
            paths[f"ring {layout or 'auto'}"] = (
                lambda q, k, v, mask=mask, layout=layout: ring_attention(
                    q, k, v, mesh=mesh, mask=mask, layout=layout, part_tokens=args.part_tokens),
                layout or choose_layout(mask, length, length, n, args.part_tokens))
        mask_rows = []
        for name, (attend, layout) in paths.items():
            forward = jax.jit(attend)
            both = jax.jit(jax.grad(lambda q, k, v, attend=attend: jnp.sum(attend(q, k, v)),
                                    argnums=(0, 1, 2)))
            def ms(fn):
                return time_fn(fn, q, k, v, warmup=1, repeats=args.repeats).median_s * 1e3

            row = {"mask": mask_name, "path": name, "layout": layout, "fwd_ms": ms(forward),
                   "fwd_bwd_ms": ms(both)}
            if layout:
                work = schedule(mask, args, layout)
                # every non-empty pair is worked once, by one device at one step
                row["critical_path"], row["total_pairs"] = (int(work.max(axis=1).sum()),
                                                            int(work.sum()))
                if not name.endswith("auto"):
                    works[mask_name, layout] = work
            mask_rows.append(row)
            tqdm.write(json.dumps(row), file=sys.stderr)  # progress: stdout holds the table
        peer_ms = {r["path"]: r["fwd_bwd_ms"] for r in mask_rows}
        for row in mask_rows:
            row["speedup_fwd_bwd"] = peer_ms[DENSE_PEER] / row["fwd_bwd_ms"]
            row["speedup_vs_blocksparse"] = peer_ms[SPARSE_PEER] / row["fwd_bwd_ms"]
        rows += mask_rows
    return rows, works


def main(argv=None) -> None:
    args = parse(argv if argv is not None else sys.argv[1:])
    from jaxsparse.bench import markdown_table, rerun_on_emulated_devices, write_results

    if rerun_on_emulated_devices(__file__, argv, args.devices):
        return
    import jax

    rows, works = measure(args)
    notes = (f"Attention with the sequence split over {args.devices} devices (mesh sequence="
             f"{args.devices}), batch {args.batch}, {args.length} tokens, {args.heads} heads of "
             f"{args.head_dim}, float32, {jax.default_backend()}, parts of {args.part_tokens} "
             f"tokens; median of {args.repeats}. "
             f"speedup_fwd_bwd: {DENSE_PEER} (dense, every tile) / this path, forward + "
             f"backward; speedup_vs_blocksparse: {SPARSE_PEER} (empty tiles skipped) / this "
             "path. critical_path: the ring's time in part pairs (the slowest device per step); "
             "total_pairs: all devices' work. Emulated CPU devices share the host's cores, so "
             "CPU times follow the total work; a real mesh follows the critical path.")
    formats = {"fwd_ms": "{:.0f}", "fwd_bwd_ms": "{:.0f}", "speedup_fwd_bwd": "{:.2f}",
               "speedup_vs_blocksparse": "{:.2f}"}
    write_results("ring", rows, COLUMNS, args.out, notes, formats)
    plot(works, Path(args.out) / "ring.png")
    print(markdown_table(rows, COLUMNS, formats))
    print(json.dumps({"rows": rows}), file=sys.stderr)


if __name__ == "__main__":
    main()
