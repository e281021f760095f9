"""PNG curves of a run's metrics (``jaxsparse plot DIR``)."""

from __future__ import annotations

from pathlib import Path

from jaxsparse.train.metrics import read_metrics


def plot_run(workdir: str | Path, out: str | Path | None = None) -> Path:
    """One panel per metric, train and eval on the same axes where both exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    records = read_metrics(workdir)
    if not records:
        raise FileNotFoundError(f"{workdir}/metrics.jsonl is missing or empty; nothing to plot")
    keys = sorted({k for r in records for k in r if k not in ("step", "split", "time")})
    preferred = ["loss", "bits_per_byte", "accuracy", "tokens_per_sec", "grad_norm", "lr"]
    keys = [k for k in preferred if k in keys] + [k for k in keys if k not in preferred]
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for split, style in (("train", "-"), ("eval", "o-")):
            points = [(r["step"], r[key]) for r in records if r["split"] == split and key in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, label=split, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(str(workdir.name))
    fig.tight_layout()
    out = Path(out) if out is not None else workdir / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
