"""Training step of the routing study's MQAR model: routing vs full vs local attention.

``jaxsparse bench routing`` times one attention op; this times what a user pays per training
step for the whole model of ``experiments/routing/study.py --task mqar`` (2 layers, d 64,
4 heads; layer 1 routing), at equal tokens per step as the length grows: full causal
attention (the peer), local-only attention (the floor) and routing with the study's recipe
(4 routing heads, 4 probes of ``w / 4`` keys, separate QK, centred keys, key centroids,
re-seeding; no dense warm-up, so every timed step routes).

    jaxsparse bench routing_model [--lengths 1024 4096 8192 16384] [--tokens 16384]
                                  [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from tqdm.auto import tqdm

from jaxsparse.bench import cases, markdown_table, write_results
from jaxsparse.bench.arguments import description, positive_int

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(lengths, tokens: int, repeats: int, probes: int = 4) -> list[dict]:
    study = _load("routing_study", HERE.parent / "routing" / "study.py")
    train_step = _load("train_step_bench", HERE / "train_step.py")
    rows = []
    for length in cases(lengths, "routing_model"):
        batch = max(tokens // length, 1)
        window = max(study.paper_layout(length)[1] // probes, 1)
        shared = (study.QUIET + ["model.n_kv_heads=4"]
                  + study.task_overrides("mqar", length, 1, batch, 4, 32))
        variants = study.variants(length, 32, shared_qk=False, center=True, key_centroids=True,
                                  probes=probes, reseed=True, routing_heads=4, window=window)
        times = {}
        for label, (_, extra) in variants.items():
            row = train_step.bench_config("transformer_tiny", shared + extra, repeats)
            times[label] = row["step_ms"]
        full = times["full attention"]
        for label, ms in times.items():
            rows.append({"length": length, "batch": batch, "model": label, "step_ms": ms,
                         "speedup_vs_full": full / ms})
            # progress on stderr (through the bar), so stdout holds only the table
            tqdm.write(f"L={length:6d} B={batch:3d} {label[:60]:60s} {ms:9.1f} ms  "
                       f"{full / ms:5.2f}x", file=sys.stderr)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--tokens", type=positive_int, default=16384,
                        help="tokens per training step (batch = tokens // length, at least 1)")
    parser.add_argument("--probes", type=positive_int, default=4)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--name", default="routing_model")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    rows = run(args.lengths, args.tokens, args.repeats, args.probes)
    columns = ["length", "batch", "model", "step_ms", "speedup_vs_full"]
    print(markdown_table(rows, columns))
    notes = ("Training step (forward, backward, AdamW update) of the MQAR study's model "
             f"(experiments/routing/study.py), {args.tokens} tokens per step; routing: C = "
             f"round(sqrt(L)) clusters, {args.probes} probes of w // {args.probes} keys "
             "(w = L // C), 4 routing heads in layer 1. Median of "
             f"{args.repeats} steps after 2 warm-up steps.")
    write_results(args.name, rows, columns, args.out, notes)


if __name__ == "__main__":
    main()
