"""Expert-parallel MoE layer: the dropless ragged exchange against worst-case buffers.

Experts split over mesh axis ``expert`` (``--devices`` emulated CPU devices unless the host has
that many), each device holding ``--tokens`` tokens; forward + backward of one MoE layer
(gradients of the input and all parameters), float32. Paths, timed in the same run:
  worst-case buffers   per-expert buffers ``[E, C, d]`` with C = every local token, through
                       plain all-to-alls: dropless by over-allocation, what this layer did
                       before (``capacity_factor = E / k`` gives exactly that C) (the peer)
  ours: ragged         the assignments sorted by expert through a ragged all-to-all
                       (emulated on CPU with fixed-size chunks) and grouped matmuls that skip
                       unused rows (``capacity_factor=None``)
  capacity 1.25        per-expert buffers of 1.25x the balanced load: drops tokens (reference)
Columns: time, speed relative to the worst-case buffers, the rows each device sends per
exchange as compiled here (the CPU emulation moves fixed-size chunks), and from the run's own
routing the rows each device really sends (what the collective moves on TPU/GPU) and those
the busiest device receives (its expert work).

    jaxsparse bench expert_parallel [--devices 4] [--experts 8] [--k 2] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxsparse.bench.arguments import description, positive_int

RESULTS = Path(__file__).resolve().parent.parent / "results"
COLUMNS = ["path", "ms", "speedup_vs_buffers", "exchanged_rows_compiled", "rows_sent",
           "rows_received_max"]


def parse(argv):
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--devices", type=positive_int, default=4, help="size of the expert axis")
    parser.add_argument("--experts", type=positive_int, default=8)
    parser.add_argument("--k", type=positive_int, default=2)
    parser.add_argument("--tokens", type=positive_int, default=2048, help="tokens per device")
    parser.add_argument("--d", type=positive_int, default=256)
    parser.add_argument("--hidden", type=positive_int, default=512)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    # checked here, naming the flags (they reached the MoE layer as a traceback naming its
    # arguments: "num_experts=4 must be divisible by mesh axis 'expert' of size 3")
    if args.experts % args.devices:
        parser.error(f"--experts {args.experts}: must be divisible by --devices {args.devices} "
                     "(each device holds the same number of experts)")
    if args.k > args.experts:
        parser.error(f"--k {args.k}: must be at most --experts {args.experts}")
    return args


def measure(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from jaxsparse.bench import cases, time_fn
    from jaxsparse.dryrun import collective_summary
    from jaxsparse.nn import MoE
    from jaxsparse.parallel import PRESETS, activation_sharding

    mesh = Mesh(np.array(jax.devices()[:args.devices]), ("expert",))
    rules = PRESETS["fsdp_tp_ep"].rules
    seq = min(256, args.tokens)  # rows of 256 tokens (fewer tokens: one row per device)
    if args.tokens % seq:
        raise SystemExit(f"--tokens {args.tokens}: must be a multiple of 256 or below it")
    x = jax.random.normal(jax.random.key(0), (args.devices * args.tokens // seq, seq, args.d))
    x = jax.device_put(x, NamedSharding(mesh, P("expert")))
    paths = {"worst-case buffers": args.experts / args.k, "ours: ragged": None,
             "capacity 1.25": 1.25}
    rows, reference = [], None
    for name, capacity_factor in cases(paths.items(), "expert_parallel"):
        moe = MoE(args.d, args.hidden, args.experts, args.k, rngs=nnx.Rngs(0),
                  capacity_factor=capacity_factor)
        moe.eval()
        graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

        def loss(params, x, graphdef=graphdef, rest=rest):
            with activation_sharding(mesh, rules):
                return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        compiled = collective_summary(step.lower(params, x).compile().as_text())
        sent = compiled.get("all-to-all", {}).get("bytes", 0)
        ms = time_fn(step, params, x, warmup=1, repeats=args.repeats).median_s * 1e3
        # four exchanges per step (forward there and back, backward there and back)
        rows.append({"path": name, "ms": ms, "exchanged_rows_compiled": sent // (4 * args.d * 4),
                     **(routed_rows(moe, x, args) if capacity_factor is None else {})})
        reference = reference or ms
        rows[-1]["speedup_vs_buffers"] = reference / ms
    return rows


def routed_rows(moe, x, args) -> dict:
    """Rows the dropless routing sends per device (the mean) and receives on the busiest
    device: what a ragged all-to-all moves and what the busiest device computes."""
    import numpy as np

    choice, _ = moe.route(x)
    expert = np.asarray(choice.expert_index).reshape(args.devices, -1)  # [source, assignments]
    destination = expert // (args.experts // args.devices)
    counts = np.stack([np.bincount(d, minlength=args.devices) for d in destination])
    return {"rows_sent": int(counts.sum(1).mean()), "rows_received_max": int(counts.sum(0).max())}


def main(argv=None) -> None:
    args = parse(argv if argv is not None else sys.argv[1:])
    from jaxsparse.bench import markdown_table, rerun_on_emulated_devices, write_results

    if rerun_on_emulated_devices(__file__, argv, args.devices):
        return
    import jax

    rows = measure(args)
    notes = (f"MoE layer forward + backward, {args.experts} experts top-{args.k}, d {args.d}, "
             f"hidden {args.hidden}, {args.tokens} tokens on each of {args.devices} devices "
             f"(mesh expert={args.devices}), float32, {jax.default_backend()}. Exchanged rows: "
             "per device and exchange, as compiled (the CPU emulation pads each slice to its "
             "worst case) and as routed (what a ragged all-to-all moves on TPU/GPU).")
    write_results("expert_parallel", rows, COLUMNS, args.out, notes)
    print(markdown_table(rows, COLUMNS))
    print(json.dumps({"rows": rows}), file=sys.stderr)


if __name__ == "__main__":
    main()
