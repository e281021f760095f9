"""Mixture-of-experts study on the default corpus (CPU-sized).

1. ``moe_tiny`` against its dense baseline ``transformer_tiny`` at equal active parameters
   (8 half-width experts, top-2, in every other layer): validation bits per byte, training
   throughput, and the per-expert load of every MoE layer at the end (bar plot).
2. SMoE-Dropout (Chen et al. 2023): the same MoE with a fixed random router whose k grows
   from 2 to 8 during training, then evaluated with k = 1 .. 8 experts ("self-slimmable":
   loss should fall as k grows).

    python experiments/moe/study.py [--steps 500] [--out experiments/moe/results]

Each run trains in ``<out>/runs/<run>`` and resumes a run it finds there; a run directory that
holds a run with other settings (another ``--steps``, say) is refused before anything trains:
pass another ``--out``, or delete it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxsparse import configs
from jaxsparse.bench import write_results
from jaxsparse.bench.arguments import description, positive_int
from jaxsparse.config import apply_overrides
from jaxsparse.data import make_stream
from jaxsparse.models import count_params
from jaxsparse.nn.intermediates import run_capturing
from jaxsparse.train import evaluate, load
from jaxsparse.train.loop import train
from jaxsparse.train.metrics import read_metrics
from jaxsparse.train.state import TrainSetup
from jaxsparse.train.step import make_eval_step

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: study_runs
from study_runs import refuse_any_other_settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUIET = ["train.tensorboard=false", "eval.sample_tokens=0"]


def active_params(cfg) -> int:
    """Parameters a token uses where the row is scored: all, minus the experts it is not
    routed to, at the k of the final evaluation (``moe_eval_k``, else the end of a k schedule:
    the SMoE-Dropout row trains to k=8 and is scored there, not at its starting k=2)."""
    m = cfg.model
    total = count_params(m)
    if not m.moe_experts:
        return total
    k = m.moe_eval_k or m.moe_k_end or m.moe_k
    moe_layers = sum(1 for i in range(m.n_layers) if i % m.moe_every == m.moe_every - 1)
    per_expert = 3 * m.d_model * (m.moe_d_ff or m.d_ff)
    return total - moe_layers * (m.moe_experts - k) * per_expert


def expert_loads(workdir: Path) -> np.ndarray:
    """``[MoE layers, E]``: the share of routing assignments each expert gets on a validation
    batch, from the sown statistics of a training-mode forward pass."""
    cfg, setup, state = load(workdir)
    model = setup.model(state["params"], state["rest"])
    stream = make_stream(cfg)
    _, sown = run_capturing(model, "__call__", stream.eval_batch(0, 1)["inputs"])
    return np.stack([np.asarray(v) for v in sown["moe_load"]])


def eval_with_k(workdir: Path, ks) -> list[float]:
    """Validation loss of a trained MoE evaluated with ``k`` experts per token."""
    cfg, setup, state = load(workdir)
    losses = []
    for k in ks:
        cfg_k = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe_eval_k=k))
        setup_k = TrainSetup(cfg_k, setup.mesh)
        metrics = evaluate(setup_k, make_eval_step(setup_k), state, make_stream(cfg_k), cfg_k)
        losses.append(metrics["bits_per_byte"])
    return losses


def median_tokens_per_s(train_rows: list[dict]) -> float:
    """Median training throughput of a run's logged windows. The first is the first step
    alone, compilation included, when the run logs every step, and the warm-up steps otherwise,
    so it is dropped when there is another (a run that logs one window has only that one: the
    median of none was NaN)."""
    return float(np.median([r["tokens_per_sec"] for r in train_rows[1:] or train_rows]))


def plan(name, overrides, out: Path, steps: int):
    """``(cfg, workdir)`` of one run of the study."""
    cfg = apply_overrides(configs.get(name), QUIET + [f"train.steps={steps}"] + overrides)
    workdir = out / "runs" / (name + ("_" + "_".join(o.split("=")[1] for o in overrides) if overrides else ""))
    return cfg, workdir


def run(name, overrides, out: Path, steps: int):
    cfg, workdir = plan(name, overrides, out, steps)
    start = time.perf_counter()
    result = train(cfg, workdir, sample=False)
    train_rows = [r for r in read_metrics(workdir) if r["split"] == "train"]
    return cfg, workdir, {
        "model": cfg.name + (" " + " ".join(overrides) if overrides else ""),
        "params": count_params(cfg.model), "active_params": active_params(cfg),
        "steps": result.step, "valid_bpb": result.eval_metrics["bits_per_byte"],
        "tokens_per_s": median_tokens_per_s(train_rows),
        "minutes": (time.perf_counter() - start) / 60}


def plot(loads, ks, slim, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(loads)
    for i, layer in enumerate(loads):
        axes[0].bar(np.arange(layer.size) + i * width, layer, width, label=f"MoE layer {i}")
    axes[0].axhline(1 / loads.shape[1], color="k", lw=0.8, ls="--", label="balanced")
    axes[0].set(xlabel="expert", ylabel="share of assignments", title="moe_tiny expert load")
    axes[0].legend(fontsize=8)
    axes[1].plot(ks, slim, marker="o")
    axes[1].set(xlabel="experts per token at evaluation (k)", ylabel="validation bits/byte",
                title="SMoE-Dropout: evaluating with more experts")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--steps", type=positive_int, default=500)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    out = Path(args.out)
    smoe = ["model.moe_router=random", "model.moe_k_end=8",
            f"model.moe_k_schedule_steps={args.steps}"]
    runs = (("transformer_tiny", []), ("moe_tiny", []), ("moe_tiny", smoe))
    # Every run is checked before any trains, so a refusal costs no training time.
    refuse_any_other_settings(plan(name, overrides, out, args.steps) for name, overrides in runs)
    rows = []
    for name, overrides in runs[:2]:
        rows.append(run(name, overrides, out, args.steps)[2])
    loads = expert_loads(out / "runs" / "moe_tiny")
    _, smoe_dir, smoe_row = run("moe_tiny", smoe, out, args.steps)
    rows.append(smoe_row)
    ks = list(range(1, 9))
    slim = eval_with_k(smoe_dir, ks)
    notes = (f"{args.steps} steps each on the default corpus (byte-level stdlib source); "
             f"validation bits per byte over the eval batches; tokens/s is the median training "
             f"throughput on this CPU. SMoE-Dropout evaluated with k = 1..8: "
             + ", ".join(f"k={k}: {b:.3f}" for k, b in zip(ks, slim)) + " bits/byte. "
             "moe_tiny's expert loads (share of assignments on a validation batch), by layer: "
             + "; ".join(" ".join(f"{share:.1%}" for share in layer) for layer in loads) + ".")
    write_results("moe_study", rows, ["model", "params", "active_params", "steps", "valid_bpb",
                                      "tokens_per_s", "minutes"], out, notes)
    plot(loads, ks, slim, out / "moe_study.png")
    print(notes)


if __name__ == "__main__":
    main()
