"""Shared runner for the SSM studies: train a list of named configurations (each its own
workdir, resumable), then write a results table (json + md) and an accuracy-vs-step plot.
A workdir that holds a run with other settings is refused before anything trains (pass another
``--out``, or delete it); a run with the same settings is read back or resumed.

The table is the study's, not the call's: a call that trains a subset (``--models mamba``)
keeps the rows of the earlier table for the runs it did not train, where their saved settings
agree with this call's shared ones (the same ``--steps``, length, ...); a row whose run was
trained on other shared settings, or whose directory is gone, is dropped and named.

Accuracy is the evaluation accuracy on answer tokens only (the tasks' loss masks), on
``eval.batches`` held-out batches drawn from a separate stream.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jaxsparse import configs
from jaxsparse.bench import write_results
from jaxsparse.config import apply_overrides, diff
from jaxsparse.models import count_params
from jaxsparse.train.loop import read_config, train
from jaxsparse.train.metrics import read_metrics

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: study_runs
from study_runs import refuse_any_other_settings  # noqa: E402

COMMON = ["train.tensorboard=false", "eval.sample_tokens=0", "model.tie_embeddings=false"]
BASES = {"transformer": "transformer_tiny", "mamba": "mamba_tiny", "mamba2": "mamba2_tiny"}


@dataclass(frozen=True)
class Run:
    label: str
    model: str  # registry name: transformer, mamba, mamba2
    overrides: tuple[str, ...]


def eval_curve(workdir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["accuracy"]) for r in read_metrics(workdir) if r["split"] == "eval"]


def run_study(name: str, runs: Sequence[Run], shared: Sequence[str], out_dir: str | Path,
              notes: str) -> list[dict]:
    out_dir = Path(out_dir)
    rows, curves = [], {}
    planned = [(run, apply_overrides(configs.get(BASES[run.model]),
                                     COMMON + [f"model.name={run.model}"] + list(shared)
                                     + list(run.overrides)),
                out_dir / "runs" / run.label) for run in runs]
    # Every run is checked before any trains, so a refusal costs no training time.
    refuse_any_other_settings((cfg, workdir) for _, cfg, workdir in planned)
    for run, cfg, workdir in planned:
        print(f"== {run.label}: {count_params(cfg.model):,} parameters", flush=True)
        start = time.perf_counter()
        result = train(cfg, workdir, sample=False)
        curve = eval_curve(workdir)
        curves[run.label] = curve
        rows.append({"model": run.label, "params": count_params(cfg.model),
                     "steps": result.step, "eval_accuracy": result.eval_metrics["accuracy"],
                     "best_eval_accuracy": max(a for _, a in curve),
                     "eval_loss": result.eval_metrics["loss"],
                     "minutes": (time.perf_counter() - start) / 60})
    kept, dropped = earlier_rows(name, out_dir, shared, {row["model"] for row in rows})
    for row in kept:
        curves[row["model"]] = eval_curve(out_dir / "runs" / row["model"])
    if dropped:
        print(f"not kept from the earlier {name} table (trained on other shared settings, or "
              f"its run directory is gone): {', '.join(dropped)}", flush=True)
    rows = kept + rows
    columns = ["model", "params", "steps", "eval_accuracy", "best_eval_accuracy", "eval_loss",
               "minutes"]
    write_results(name, rows, columns, out_dir, notes)
    plot_curves(curves, out_dir / f"{name}.png", title=name)
    return rows


def earlier_rows(name: str, out_dir: Path, shared: Sequence[str],
                 trained_now: set[str]) -> tuple[list[dict], list[str]]:
    """``(kept, dropped)``: the rows of the table already in ``out_dir`` for runs this call did
    not train. A row is kept when its run directory holds a saved config that the study's shared
    overrides leave unchanged (it was trained on the same shared settings), else dropped."""
    table = out_dir / f"{name}.json"
    if not table.is_file():
        return [], []
    kept, dropped = [], []
    for row in json.loads(table.read_text())["rows"]:
        if row["model"] in trained_now:
            continue
        saved = out_dir / "runs" / row["model"] / "config.json"
        same = saved.is_file() and not diff(cfg := read_config(saved),
                                            apply_overrides(cfg, COMMON + list(shared)))
        (kept if same else dropped).append(row if same else row["model"])
    return kept, dropped


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ax.plot([s for s, _ in curve], [a for _, a in curve], marker="o", label=label)
    ax.set(xlabel="step", ylabel="eval accuracy (answer tokens)", title=title, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
