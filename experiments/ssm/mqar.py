"""Multi-query associative recall (Arora et al. 2023, "Zoology"), scaled to a CPU.

Zoology sweeps length 64-512 with up to 64 key-value pairs and vocabulary 8192; here length
128 with 16 key-value pairs and vocabulary 512, 2-layer models at d_model 64 and 128: Mamba-1,
Mamba-2 and a dense causal Transformer. Accuracy counts the answers (the values after each
queried key) only.

    python experiments/ssm/mqar.py [--steps 1000] [--vocab 512] [--lr 3e-3] [--widths 64 128]
        [--models transformer mamba mamba2] [--out experiments/ssm/results/mqar]

A run directory (``<out>/runs/<label>``) that holds a run with other settings is refused: pass
another ``--out`` or delete it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import Run, run_study  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("transformer", "mamba", "mamba2")


def runs_for(width: int, models) -> list[Run]:
    heads = max(width // 32, 2)
    table = {
        "transformer": Run(f"Transformer d{width}", "transformer",
                           (f"model.d_model={width}", f"model.n_heads={heads}",
                            f"model.n_kv_heads={heads}", f"model.d_ff={4 * width}")),
        "mamba": Run(f"Mamba d{width}", "mamba", (f"model.d_model={width}", "model.d_state=16")),
        "mamba2": Run(f"Mamba-2 d{width}", "mamba2",
                      (f"model.d_model={width}", "model.d_state=32", "model.ssm_head_dim=32")),
    }
    return [table[m] for m in models]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=512,
                        help="vocabulary size; 64 is learnt in a CPU budget, 512 is not (README)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--out", default=str(RESULTS / "mqar"))
    args = parser.parse_args(argv)
    shared = [
        "data.task=mqar", f"data.seq_len={args.seq_len}", f"data.num_kv_pairs={args.pairs}",
        f"data.batch_size={args.batch}", f"model.vocab_size={args.vocab}", "model.n_layers=2",
        f"model.max_seq_len={args.seq_len}",
        f"optimizer.lr={args.lr}", "optimizer.warmup_steps=100", "optimizer.weight_decay=0.0",
        f"train.steps={args.steps}", f"train.eval_every={max(args.steps // 8, 1)}",
        f"train.checkpoint_every={args.steps}", "train.log_every=50", "eval.batches=8",
    ]
    runs = [run for width in args.widths for run in runs_for(width, args.models)]
    notes = (f"MQAR: length {args.seq_len}, {args.pairs} key-value pairs, vocabulary {args.vocab}, "
             f"batch {args.batch}, {args.steps} steps of AdamW (lr {args.lr:g}, cosine), 2 layers; "
             f"accuracy on the answers over 8 held-out batches ({8 * args.batch * args.pairs} "
             f"answers; chance ~1/{args.vocab // 2}, answering with some value of the context "
             f"without binding it to its key ~1/{args.pairs}).")
    run_study("mqar", runs, shared, args.out, notes)


if __name__ == "__main__":
    main()
