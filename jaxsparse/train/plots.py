"""PNG curves of a run's metrics (``jaxsparse plot DIR``)."""

from __future__ import annotations

import os
from pathlib import Path

from jaxsparse.config import ConfigError
from jaxsparse.train.metrics import read_metrics

# the splits drawn as curves, each in one colour on every panel
CURVES = {"train": ("-", "C0"), "eval": ("o-", "C1")}


def stage_starts(records) -> list[tuple[int, int]]:
    """``(first step, stage)`` of every curriculum stage that begins after step 0. The loop logs
    a stage when it begins and again when a resumed run continues in it, each time with the
    stage's first step."""
    first = {int(r["stage"]): int(r["first_step"]) for r in records
             if r["split"] == "curriculum"}
    return sorted((step, stage) for stage, step in first.items() if step > 0)


def panel_keys(records) -> list[str]:
    """The metrics drawn, one panel each: those of train and eval records, the usual first."""
    keys = {k for r in records if r["split"] in CURVES for k in r} - {"step", "split", "time"}
    preferred = ["loss", "bits_per_byte", "accuracy", "tokens_per_sec", "grad_norm", "lr"]
    return [k for k in preferred if k in keys] + sorted(keys - set(preferred))


def plot_run(workdir: str | Path, out: str | Path | None = None) -> Path:
    """One panel per train / eval metric, both splits on the same axes where both exist; the
    starts of curriculum stages are dotted vertical lines on every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} is not a directory")
    records = read_metrics(workdir)
    curves = [r for r in records if r["split"] in CURVES]
    if not curves:
        raise FileNotFoundError(f"{workdir}/metrics.jsonl has no train or eval records; "
                                "nothing to plot")
    keys = panel_keys(curves)
    if not keys:  # records with a step and a split but no value (a ZeroDivisionError below)
        raise FileNotFoundError(f"{workdir}/metrics.jsonl has train/eval records without any "
                                "metric values; nothing to plot")
    out = _output_path(workdir, out)  # (after: it may create the output directory)
    starts = stage_starts(records)
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False,
                             layout="constrained")
    for ax, key in zip(axes.flat, keys):
        for split, (style, colour) in CURVES.items():
            points = [(r["step"], r[key]) for r in curves if r["split"] == split and key in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, color=colour, label=split, markersize=3)
        for step, stage in starts:
            ax.axvline(step, color="0.5", linestyle=":", linewidth=1)
            ax.annotate(f"stage {stage}", (step, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(1, -3), textcoords="offset points", fontsize=7, color="0.4",
                        rotation=90, ha="left", va="top")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(str(workdir.name))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _output_path(workdir: Path, out) -> Path:
    """``out`` as matplotlib will write it: a directory gets ``metrics.png`` inside, a name
    without a suffix gets ``.png`` (what matplotlib appends, so the path returned is the file
    written); a suffix matplotlib cannot write is refused."""
    if out is None:
        return workdir / "metrics.png"
    meant_as_directory = str(out).endswith(("/", os.sep))
    out = Path(out)
    if out.is_dir() or meant_as_directory:  # "new/": a directory to create, not "new.png"
        out.mkdir(parents=True, exist_ok=True)
        return out / "metrics.png"
    if not out.suffix:
        return out.with_suffix(".png")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    if out.suffix[1:].lower() not in formats:
        raise ConfigError(f"out={str(out)!r}: matplotlib cannot write {out.suffix!r} files; "
                          f"use one of {', '.join('.' + f for f in sorted(formats))}")
    return out
