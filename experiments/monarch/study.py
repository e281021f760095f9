"""Monarch study on the default corpus (CPU-sized).

1. The dense baseline ``transformer_tiny`` against ``monarch_tiny`` (every block projection a
   Monarch matrix with 4 blocks): validation bits per byte against wall-clock time.
2. Dense -> Monarch conversion: the trained baseline's projections replaced by their optimal
   Monarch projections (``train.init_from``), evaluated as converted, then fine-tuned for a
   fraction of the steps: how much of the gap to the dense model the fine-tune recovers.

    python experiments/monarch/study.py [--steps 500] [--finetune 100] [--out DIR]

Each run trains in ``<out>/runs/<run>`` and resumes a run it finds there; a run directory that
holds a run with other settings (another ``--steps``, say) is refused before anything trains:
pass another ``--out``, or delete it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from jaxsparse import configs
from jaxsparse.bench import write_results
from jaxsparse.bench.arguments import description, positive_int
from jaxsparse.config import apply_overrides
from jaxsparse.models import count_params
from jaxsparse.train.loop import train
from jaxsparse.train.metrics import read_metrics

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: study_runs
from study_runs import refuse_any_other_settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUIET = ["train.tensorboard=false", "eval.sample_tokens=0"]


def eval_curve(workdir: Path) -> tuple[list[float], list[float]]:
    """(seconds since the first evaluation, validation bits/byte) of every evaluation, each
    step's first record (re-running a finished run appends a later copy of the last one)."""
    first: dict[int, dict] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "eval":
            first.setdefault(record["step"], record)
    rows = [first[s] for s in sorted(first)]
    start = rows[0]["time"]
    return [r["time"] - start for r in rows], [r["bits_per_byte"] for r in rows]


def median_tokens_per_s(train_rows: list[dict]) -> float:
    """Median training throughput of a run's logged windows. The first is the first step
    alone, compilation included, when the run logs every step, and the warm-up steps otherwise,
    so it is dropped when there is another (a run that logs one window has only that one: the
    median of none was NaN)."""
    return float(np.median([r["tokens_per_sec"] for r in train_rows[1:] or train_rows]))


def run(cfg, workdir: Path) -> dict:
    """Train (or resume; a finished run is not repeated) and summarise one run."""
    result = train(cfg, workdir, sample=False)
    final = json.loads((workdir / "final_metrics.json").read_text())
    records = read_metrics(workdir)
    train_rows = [r for r in records if r["split"] == "train"]
    start = min(r["time"] for r in records)
    return {"run": workdir.name, "params": count_params(cfg.model), "steps": result.step,
            "valid_bpb": final["bits_per_byte"],
            "tokens_per_s": median_tokens_per_s(train_rows),
            "minutes": (train_rows[-1]["time"] - start) / 60}  # from the logs: resume-proof


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, (seconds, bpb) in curves.items():
        ax.plot(np.asarray(seconds) / 60, bpb, marker="o", ms=3, label=name)
    ax.set(xlabel="wall-clock minutes (2 CPU cores)", ylabel="validation bits/byte",
           title="Dense vs Monarch Transformer", ylim=(None, 5))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def refuse_a_stale_conversion(dense_dir: Path, finetune_dir: Path) -> None:
    """The conversion run starts from the dense run's weights (``train.init_from`` names its
    directory, not the weights), so its settings match whatever dense model is there now: a
    conversion saved before the dense run was deleted and retrained (another ``--steps``) was
    read back as finished, and the notes mixed the new dense score with the old conversion's."""
    converted = finetune_dir / "config.json"
    if not converted.exists():
        return
    dense = dense_dir / "config.json"
    if not dense.exists() or dense.stat().st_mtime > converted.stat().st_mtime:
        raise SystemExit(f"{finetune_dir} was converted from an earlier dense run than the one "
                         f"in {dense_dir} (gone or retrained since). Nothing was trained: delete "
                         f"{finetune_dir} to convert the current dense run.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--steps", type=positive_int, default=500)
    parser.add_argument("--finetune", type=positive_int, default=100)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    out = Path(args.out)
    every = [f"train.steps={args.steps}", f"train.eval_every={max(args.steps // 10, 1)}"]
    dense_cfg = apply_overrides(configs.get("transformer_tiny"), QUIET + every)
    monarch_cfg = apply_overrides(configs.get("monarch_tiny"), QUIET + every)
    finetune_cfg = apply_overrides(monarch_cfg, [
        f"train.steps={args.finetune}", f"train.eval_every={max(args.finetune // 5, 1)}",
        f"train.init_from={out / 'runs' / 'dense'}", "optimizer.warmup_steps=10",
        "optimizer.lr=1e-3"])
    finetune_dir = out / "runs" / "dense_to_monarch"
    # Every run is checked before any trains, so a refusal costs no training time.
    refuse_any_other_settings([(dense_cfg, out / "runs" / "dense"),
                               (monarch_cfg, out / "runs" / "monarch"),
                               (finetune_cfg, finetune_dir)])
    refuse_a_stale_conversion(out / "runs" / "dense", finetune_dir)
    rows = [run(dense_cfg, out / "runs" / "dense"), run(monarch_cfg, out / "runs" / "monarch")]
    rows.append(run(finetune_cfg, finetune_dir))
    _, converted = eval_curve(finetune_dir)
    dense_bpb, projected, tuned = rows[0]["valid_bpb"], converted[0], rows[2]["valid_bpb"]
    recovered = (projected - tuned) / max(projected - dense_bpb, 1e-9)
    curves = {"dense (transformer_tiny)": eval_curve(out / "runs" / "dense"),
              "monarch_tiny": eval_curve(out / "runs" / "monarch")}
    notes = (f"{args.steps} steps each on the default corpus; validation bits per byte. "
             f"Conversion: the dense model's projections projected onto Monarch (4 blocks) give "
             f"{projected:.3f} bits/byte before fine-tuning (dense {dense_bpb:.3f}); "
             f"{args.finetune} fine-tuning steps reach {tuned:.3f}, recovering "
             f"{100 * recovered:.0f}% of the gap.")
    write_results("monarch_study", rows, ["run", "params", "steps", "valid_bpb", "tokens_per_s",
                                          "minutes"], out, notes)
    plot(curves, out / "monarch_study.png")
    print(notes)


if __name__ == "__main__":
    main()
