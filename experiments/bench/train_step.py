"""Training-step throughput of the dense baseline at two sizes.

Reports tokens/s, XLA-counted FLOPs per step, achieved FLOP/s, and the ratio to the peer: a
dense matmul in the config's compute dtype (``model.dtype``) timed in the same run (the
machine's practical peak for that dtype, i.e. MFU; 1024² on CPU, 4096² on accelerators, where
a 1024² matmul is far from their peak).

    jaxsparse bench train_step [--configs transformer_tiny transformer_small] [--repeats 5]
                               [--set KEY=VALUE ...] [--name train_step]

The ``--set`` overrides are written into the results' notes; give runs that compare settings
(``--set model.monarch_impl=...``) a ``--name`` each, or each overwrites ``train_step``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsparse import configs
from jaxsparse.bench import cases, markdown_table, matmul_peak_flops, time_fn, write_results
from jaxsparse.bench.arguments import description, positive_int
from jaxsparse.bench.timing import compiled_flops
from jaxsparse.config import apply_overrides
from jaxsparse.data import make_stream
from jaxsparse.parallel import make_mesh
from jaxsparse.train.state import TrainSetup, count_params
from jaxsparse.train.step import make_train_step

RESULTS = Path(__file__).resolve().parent.parent / "results"


def bench_config(name: str, overrides: list[str], repeats: int) -> dict:
    cfg = apply_overrides(configs.get(name), overrides)
    setup = TrainSetup(cfg, make_mesh(cfg.mesh))
    step = make_train_step(setup)
    batch = setup.global_batch(make_stream(cfg).batch(0))
    state = setup.init()
    flops = compiled_flops(step, state, batch)
    holder = {"state": state}

    def one_step():
        # the step donates its input state, so thread the new state through the calls
        holder["state"], metrics = step(holder["state"], batch)
        return metrics["loss"]

    timing = time_fn(one_step, warmup=2, repeats=repeats)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    return {"config": name, "params": count_params(state["params"]),
            "tokens_per_step": tokens, "step_ms": timing.median_s * 1e3,
            "tokens_per_s": tokens / timing.median_s,
            "gflop_per_step": (flops or float("nan")) / 1e9,
            "achieved_gflops": (flops or float("nan")) / timing.median_s / 1e9}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--configs", nargs="+", default=["transformer_tiny", "transformer_small"])
    parser.add_argument("--set", action="append", default=[], help="override for every config")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--name", default="train_step", help="results file stem")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    size = 1024 if jax.default_backend() == "cpu" else 4096
    peaks = {}  # compute dtype -> the peer's FLOP/s: a bfloat16 model against a bfloat16 matmul
    rows = []
    for name in cases(args.configs, "train_step"):
        dtype = apply_overrides(configs.get(name), args.set).model.dtype
        if dtype not in peaks:
            peaks[dtype] = matmul_peak_flops(size, jnp.dtype(dtype))
        row = bench_config(name, args.set, args.repeats)
        row["peak_dtype"] = dtype
        row["peak_matmul_gflops"] = peaks[dtype] / 1e9
        row["ratio_to_matmul_peak"] = row["achieved_gflops"] * 1e9 / peaks[dtype]
        rows.append(row)
    columns = ["config", "params", "tokens_per_step", "step_ms", "tokens_per_s", "gflop_per_step",
               "achieved_gflops", "peak_dtype", "peak_matmul_gflops", "ratio_to_matmul_peak"]
    # The overrides are part of what was measured (a Monarch kernel, a batch size): without
    # them the table cannot say which setting it holds.
    overrides = " ".join(args.set) or "none (the configs as registered)"
    peers = ", ".join(f"{dtype} {peak / 1e9:.1f} GFLOP/s" for dtype, peak in peaks.items())
    notes = (f"Peer: {size}x{size} jnp.dot in each config's compute dtype, in the same run "
             f"({peers}). "
             f"Backend {jax.default_backend()}, {jax.device_count()} device(s). Overrides: "
             f"{overrides}.")
    json_path, md_path = write_results(args.name, rows, columns, args.out, notes)
    print(markdown_table(rows, columns))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
