"""Routing Transformer study (CPU-sized): routing vs local-only vs full attention at equal
parameters (all multi-head, the same widths; only the attention pattern differs).

``--task text``  validation bits per byte on the default corpus at length 128 (routing_tiny's
                 layout: two local layers, then two layers of 2 local + 2 routing heads).
``--task mqar``  multi-query associative recall (Zoology) at ``--seq-len`` (default 1024): the
                 answer is a key's value that appeared anywhere earlier, so a local window
                 cannot reach it and content-based routing can. Accuracy on answers only.

    python experiments/routing/study.py --task text [--steps 500]
    python experiments/routing/study.py --task mqar [--steps 2000] [--seq-len 1024]

The MQAR routing recipe level with full attention (``results/mqar_vocab32_probes/``, three
seeds each): ``--task mqar --steps 1000 --batch 8 --pairs 4 --vocab 32 --set optimizer.lr=1e-3
--separate-qk --probes 4 --window 8 --routing-heads 4 --dense-steps 500 --only routing --out
experiments/routing/results/mqar_vocab32_probes`` (``--out`` names that table's directory: the
default, ``results/mqar``, holds runs with other settings, which are refused; ``--only
routing`` keeps the full/local rows already there). Four windows of 8 keys read as many keys
as one probe of the paper's 32, so the layer costs one probe (``jaxsparse bench routing
--split``); ``--window`` left at 32 scores the same and costs four. ``--probes 2`` without the
warm-up learns too, but varies widely between seeds. ``--set train.seed=N`` trains other
initialisations (a row and run directory of their own). MQAR rows also get
``accuracy_1024_answers``: the final model on 32 validation batches (``probe.py``).
``--no-center``, ``--no-key-centroids`` and ``--no-reseed`` give the plain k-means of the paper.
A variant whose run directory holds a run with other settings (another ``--steps``, say) is
refused before anything trains: resuming it would change its schedule midway. ``--fresh``
retrains it from step 0, or use another ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

from jaxsparse import configs
from jaxsparse.bench import write_results
from jaxsparse.bench.arguments import description, non_negative_int, positive_int
from jaxsparse.config import apply_overrides
from jaxsparse.models import count_params
from jaxsparse.train.loop import train
from jaxsparse.train.metrics import read_metrics

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: study_runs
from study_runs import refuse_other_settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("full", "local", "routing")  # what --only picks from (each label's first word)
QUIET = ["train.tensorboard=false", "eval.sample_tokens=0"]
# How the notes this script writes end; notes that end otherwise were written by hand.
NOTES_TAIL = ("ms_per_step is the median training step time on this CPU (train_minutes = steps "
              "x ms_per_step, evaluation excluded). Rows of earlier runs in the same directory "
              "are kept (a variant run again replaces its row).")


def paper_layout(seq_len: int) -> tuple[int, int]:
    """The paper's ``(clusters, window)`` for a length: ``C = √L`` clusters of ``w = L / C``."""
    clusters = max(2, int(round(math.sqrt(seq_len))))
    return clusters, seq_len // clusters


def variants(seq_len: int, local: int, decay: float = 0.999, shared_qk: bool = True,
             dense_steps: int = 0, center: bool = False,
             key_centroids: bool = False, probes: int = 1, reseed: bool = False,
             routing_heads: int = 2, window: int | None = None
             ) -> dict[str, tuple[str, list[str]]]:
    """``label -> (run directory, overrides)``; routing runs with other options get their own
    label and directory, so they sit beside earlier ones in the table. ``window``: keys per
    probe (default the paper's ``L / C``)."""
    clusters, default_window = paper_layout(seq_len)
    window = default_window if window is None else window
    flag = lambda b: str(b).lower()  # noqa: E731
    routing = ["model.name=routing_transformer", f"model.routing_clusters={clusters}",
               f"model.routing_window={window}", f"model.routing_local_window={local}",
               f"model.routing_decay={decay}", f"model.routing_shared_qk={flag(shared_qk)}",
               f"model.routing_dense_steps={dense_steps}", f"model.routing_center={flag(center)}",
               f"model.routing_key_centroids={flag(key_centroids)}",
               f"model.routing_probes={probes}", f"model.routing_reseed={flag(reseed)}",
               f"model.routing_heads={routing_heads}"]
    options = (([f"{routing_heads} routing heads"] if routing_heads != 2 else [])
               + ["shared QK" if shared_qk else "separate QK"]
               + (["centred keys"] if center else []) + (["key centroids"] if key_centroids else [])
               + (["reseeded centroids"] if reseed else [])
               + ([f"{probes} probes"] if probes > 1 else [])
               + ([f"window {window} per probe"] if window != default_window else [])
               + ([f"dense warm-up {dense_steps}"] if dense_steps else []))
    run = ("routing" + ("" if shared_qk else "_separate_qk") + ("_centred" if center else "")
           + ("_key_centroids" if key_centroids else "")
           + ("_reseed" if reseed else "")
           + (f"_heads{routing_heads}" if routing_heads != 2 else "")
           + (f"_probes{probes}" if probes > 1 else "")
           + (f"_window{window}" if window != default_window else "")
           + (f"_dense{dense_steps}" if dense_steps else ""))
    return {"full attention": ("full", ["model.attention_mask=causal"]),
            f"local only ({local})": ("local", [f"model.attention_mask=local:{local}"]),
            f"routing ({', '.join(options)})": (run, routing)}


def task_overrides(task: str, seq_len: int, steps: int, batch: int, pairs: int,
                   vocab: int) -> list[str]:
    every = [f"train.steps={steps}", f"train.eval_every={max(steps // 8, 1)}",
             f"train.checkpoint_every={steps}"]
    if task == "text":
        return every + [f"data.seq_len={seq_len}"]
    return every + ["data.task=mqar", f"model.vocab_size={vocab}", f"data.seq_len={seq_len}",
                    f"model.max_seq_len={seq_len}", f"data.num_kv_pairs={pairs}",
                    f"data.batch_size={batch}", "eval.batches=4",
                    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.d_ff=192",
                    "model.routing_skip_first=1",
                    "optimizer.weight_decay=0.0", "optimizer.warmup_steps=100"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--task", choices=("text", "mqar"), default="text")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="sequence length (default 128 for text, 1024 for mqar)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (mqar)")
    parser.add_argument("--decay", type=float, default=0.999,
                        help="centroid EMA decay (the paper's 0.999 moves centroids over ~1000 "
                             "steps; a short run may want 0.99)")
    parser.add_argument("--local", type=int, default=32, help="local window (keys)")
    parser.add_argument("--pairs", type=int, default=8, help="key-value pairs per sequence (mqar)")
    parser.add_argument("--vocab", type=int, default=256,
                        help="vocabulary (mqar): keys from its lower half, values from the upper")
    parser.add_argument("--separate-qk", action="store_true",
                        help="routing heads with their own key projection (default: shared "
                             "query/key space, as the paper's language models)")
    parser.add_argument("--dense-steps", type=int, default=0,
                        help="routing heads attend densely for this many warm-up steps")
    parser.add_argument("--center", action=argparse.BooleanOptionalAction, default=True,
                        help="route keys by k - running mean (model.routing_center)")
    parser.add_argument("--key-centroids", action=argparse.BooleanOptionalAction, default=True,
                        help="centroids follow the keys only (model.routing_key_centroids)")
    parser.add_argument("--probes", type=int, default=1,
                        help="clusters each routing query reads (model.routing_probes)")
    parser.add_argument("--window", type=positive_int, default=None,
                        help="keys each routing query reads per probe (default L / C; "
                             "--probes P --window L/(C·P) reads as many keys as one probe)")
    parser.add_argument("--reseed", action=argparse.BooleanOptionalAction, default=True,
                        help="re-seed dead centroids (model.routing_reseed)")
    parser.add_argument("--routing-heads", type=int, default=2,
                        help="routing heads of the routing layer (of 4; the rest stay local)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every variant (repeatable)")
    parser.add_argument("--only", type=variant_names, default=(),
                        help="comma-separated subset of variants to run: "
                             + ", ".join(VARIANTS))
    parser.add_argument("--answer-batches", type=non_negative_int, default=32,
                        help="mqar: validation batches the final model answers for the "
                             "accuracy_<N>_answers column (32 of 8 sequences x 4 pairs: N = "
                             "1024); 0: none")
    parser.add_argument("--fresh", action="store_true",
                        help="retrain the variants run now from step 0 (their run directories "
                             "are deleted first); needed to rerun a variant with other settings "
                             "in the same results directory")
    parser.add_argument("--out", default=None,
                        help="results directory (default results/<task>); rows already there "
                             "are kept")
    args = parser.parse_args(argv)
    seq_len = args.seq_len if args.seq_len is not None else (128 if args.task == "text"
                                                               else 1024)
    out = Path(args.out) if args.out else RESULTS / args.task
    seed = next((s.split("=", 1)[1] for s in args.set if s.startswith("train.seed=")), "0")
    metric = "bits_per_byte" if args.task == "text" else "accuracy"
    shared = (QUIET + ["model.n_kv_heads=4"]
              + task_overrides(args.task, seq_len, args.steps, args.batch, args.pairs,
                                args.vocab))
    shared += args.set
    chosen = set(args.only)
    name = f"routing_{args.task}"
    rows = previous_rows(out / f"{name}.json")
    planned = []
    for label, (run, extra) in variants(seq_len, args.local, args.decay, not args.separate_qk,
                                        args.dense_steps, args.center,
                                        args.key_centroids, args.probes, args.reseed,
                                        args.routing_heads, args.window).items():
        if chosen and label.split()[0] not in chosen:
            continue
        if seed != "0":  # one row and run directory per initialisation
            label, run = f"{label}, seed {seed}", f"{run}_seed{seed}"
        cfg = apply_overrides(configs.get("transformer_tiny"), shared + extra)
        planned.append((label, run, cfg, out / "runs" / run))
    # All variants are checked before any trains, so a refusal costs no training time.
    for _, _, cfg, workdir in planned:
        if args.fresh and workdir.exists():
            shutil.rmtree(workdir)
        refuse_other_settings(cfg, workdir, fresh_flag="--fresh")
    for label, run, cfg, workdir in planned:
        print(f"== {label}: {count_params(cfg.model):,} parameters", flush=True)
        result = train(cfg, workdir, sample=False)
        step_times = [r for r in read_metrics(workdir) if r["split"] == "train"]
        # The first logged window holds the warm-up steps (compilation too when every step
        # is logged); drop it when there is another.
        tokens_per_s = float(np.median([r["tokens_per_sec"] for r in step_times[1:] or step_times]))
        ms_per_step = 1e3 * cfg.data.batch_size * seq_len / tokens_per_s
        row = {"model": label, "run": run, "params": count_params(cfg.model),
               "steps": result.step, metric: result.eval_metrics[metric],
               "ms_per_step": ms_per_step, "train_minutes": result.step * ms_per_step / 6e4}
        if args.task == "mqar" and args.answer_batches:
            # The run's own evaluation holds 128 answers (+-4%); this one +-1.5% at 32 batches.
            from probe import probe  # experiments/routing/probe.py, beside this script
            answers = probe(str(workdir), args.answer_batches)[-1]
            row[f"accuracy_{answers['answers']}_answers"] = answers["reach"]
        rows = [r for r in rows if r["model"] != label] + [row]
    curves = {r["model"]: [(m["step"], m[metric]) for m in read_metrics(out / "runs" / r["run"])
                           if m["split"] == "eval"] for r in rows}
    batch = args.batch if args.task == "mqar" else "the default batch of"
    task = (f"{args.task} ({args.pairs} pairs, vocabulary {args.vocab})" if args.task == "mqar"
            else args.task)
    extra = f", overrides {' '.join(args.set)}" if args.set else ""
    settings = f"{task}, length {seq_len}, {args.steps} steps of {batch} sequences{extra}"
    notes = f"{settings}; eval {metric}; {NOTES_TAIL}"
    # A directory whose table carries hand-written notes (the commands of its rows) keeps them;
    # the script's own notes are written afresh, so they describe this run's settings.
    kept = hand_written_notes(out / f"{name}.json", metric)
    if kept:
        print(f"kept the hand-written notes of {out / name}.json: check that they cover this "
              f"run ({settings})")
    notes = kept or notes
    answer_columns = sorted({c for r in rows for c in r if c.startswith("accuracy_")})
    write_results(name, rows, ["model", "params", "steps", metric, *answer_columns,
                               "ms_per_step", "train_minutes"], out, notes)
    plot(curves, metric, out / f"{name}.png", f"{args.task}, length {seq_len}")
    print(notes)


def variant_names(text: str) -> tuple[str, ...]:
    """``type=`` for ``--only``: comma-separated names of :data:`VARIANTS` (an unknown name
    selected nothing, trained nothing and still rewrote the table)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {', '.join(map(repr, unknown))}: choose from "
            f"{', '.join(VARIANTS)} (comma-separated)")
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no variant: choose from "
                                         f"{', '.join(VARIANTS)} (comma-separated)")
    return names


def previous_rows(path: Path) -> list[dict]:
    """Rows of an earlier run of this study (same output directory) that name their run."""
    if not path.exists():
        return []
    return [r for r in json.loads(path.read_text())["rows"] if "run" in r]


def hand_written_notes(path: Path, metric: str) -> str | None:
    """The notes of an earlier table in ``path`` if someone wrote them by hand, else None.
    The script's own notes (they end ``; eval <metric>; NOTES_TAIL``) are not kept: kept, they
    went on describing the first run's settings after reruns with others."""
    notes = json.loads(path.read_text()).get("notes") if path.exists() else None
    if not notes or notes.endswith(f"; eval {metric}; {NOTES_TAIL}"):
        return None
    return notes


def plot(curves, metric, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, curve) in enumerate(curves.items()):
        # Dashed after the ten colours of the default cycle, so that no two curves look alike.
        ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", ms=3, label=label,
                linestyle="-" if i < 10 else "--")
    ax.set(xlabel="step", ylabel=f"eval {metric}", title=title)
    if metric == "bits_per_byte":
        ax.set_ylim(None, 5)
    ax.grid(alpha=0.3)
    # Below the axes: long variant labels would hide the curves.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
