"""Hydra's toy-scale studies (Chaudhary & Browning 2025, v3), one command each:

    python experiments/hydra/study.py throughput   # tokens/s vs an equal-size Transformer, 1k..8k
    python experiments/hydra/study.py routing      # expert usage per input domain, routing entropy
    python experiments/hydra/study.py pkm          # key-value recall with and without PKM
    python experiments/hydra/study.py composition  # multi-hop variable chains vs the Transformer
    python experiments/hydra/study.py ablations    # MQAR without SGA / MoE / PKM / workspace

Each writes ``results/<study>.{json,md,png}``. Defaults are sized for two CPU cores (minutes
per run); ``--steps``, ``--seq-len`` and ``--lengths`` scale them up on an accelerator.

The synthetic studies (pkm, composition, ablations) take ``--seeds 0 1 2``: each variant is
trained once per seed (another initialisation and other training data) and the table gives
each seed's accuracy, the mean and the standard deviation between seeds — one seed's spread is
often larger than the gaps between variants. A run already finished in the results directory
with exactly the same config is read back instead of retrained (``--fresh`` retrains), so
adding seeds only trains the new ones; a run directory that holds a run with other settings
(another ``--steps``, say) is refused before anything trains (``--fresh`` retrains it, or pass
another ``--out``). The committed results used
``--vocab 64 --seeds 0 1 2`` (``--vocab 128`` for pkm, as 32 pairs need 66 tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import configs
from jaxsparse.bench import write_results
from jaxsparse.bench.arguments import description, positive_int, positive_int_list, seed
from jaxsparse.config import apply_overrides
from jaxsparse.models import count_params
from jaxsparse.train.loop import train
from jaxsparse.train.metrics import read_metrics

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: study_runs
from study_runs import refuse_other_settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUIET = ["train.tensorboard=false", "eval.sample_tokens=0"]
BATCH, EVAL_BATCHES = 16, 8  # sequences per batch; eval batches per evaluation

# A small Hydra for the synthetic tasks: two blocks (SGA in the second), chunk-level MoE,
# PKM in block 0, a workspace; all components on from the start.
SMALL_HYDRA = [
    "model.name=hydra", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
    "model.n_kv_heads=4", "model.d_ff=128", "model.expand=1", "model.hydra_sga_every=2",
    "model.hydra_window=16", "model.hydra_max_global=32", "model.hydra_curriculum=",
    "model.moe_experts=4", "model.moe_k=1", "model.moe_renormalize=false", "model.moe_every=1",
    "model.moe_chunk=8",
    "model.moe_d_ff=128", "model.pkm_layers=0", "model.pkm_slots=1024", "model.pkm_heads=2",
    "model.pkm_k_dim=32", "model.pkm_knn=8", "model.workspace_slots=8", "model.workspace_chunk=16",
    "optimizer.weight_decay=0.0", "optimizer.warmup_steps=100", f"data.batch_size={BATCH}",
]
# The Transformer with about the same parameter count (d_ff widened to match).
SMALL_TRANSFORMER = ["model.name=transformer", "model.d_model=64", "model.n_layers=2",
                     "model.n_heads=4", "model.n_kv_heads=4", "model.d_ff=1024",
                     "optimizer.weight_decay=0.0", "optimizer.warmup_steps=100",
                     f"data.batch_size={BATCH}"]


def synthetic(task: str, seq_len: int, steps: int, *extra: str, vocab: int = 256) -> list[str]:
    return QUIET + [f"data.task={task}", f"model.vocab_size={vocab}", f"data.seq_len={seq_len}",
                    f"model.max_seq_len={seq_len}", f"train.steps={steps}",
                    f"train.eval_every={max(steps // 8, 1)}", f"train.checkpoint_every={steps}",
                    f"eval.batches={EVAL_BATCHES}",
                    *extra]


def run_dir(out: Path, study: str, label: str, seed: int) -> Path:
    """``results/<study>/<label>`` for seed 0 (the runs committed before seeds existed),
    ``<label>_seed<N>`` for the others."""
    name = label.replace(" ", "_").replace("/", "_")
    return out / study / (name if seed == 0 else f"{name}_seed{seed}")


def finished_run(cfg, workdir: Path):
    """The final metrics of a run already trained in ``workdir`` with exactly ``cfg`` (same
    saved config, all steps done), else None: a study re-run only trains what is missing."""
    from jaxsparse.config import from_json

    saved, final = workdir / "config.json", workdir / "final_metrics.json"
    if not (saved.exists() and final.exists()) or from_json(saved.read_text()) != cfg:
        return None
    metrics = json.loads(final.read_text())
    return metrics if metrics.get("step") == cfg.train.steps else None


def run_variants(study: str, variants: dict[str, list[str]], metric: str, out: Path,
                 seeds=(0,), fresh: bool = False):
    """Train each variant once per seed (``train.seed`` and ``data.seed``: another
    initialisation and other training data); one table row per variant with each seed's
    ``metric``, their mean and standard deviation, and the seed-mean eval curves. A run
    directory holding a run with other settings is refused before anything trains (unless
    ``fresh``: then every run is retrained from step 0)."""
    planned = {}  # (label, seed) -> (config, run directory)
    for label, overrides in variants.items():
        for seed in seeds:
            cfg = apply_overrides(configs.get("transformer_tiny"),
                                  overrides + [f"train.seed={seed}", f"data.seed={seed}"])
            planned[label, seed] = cfg, run_dir(out, study, label, seed)
    if not fresh:
        for cfg, workdir in planned.values():
            if finished_run(cfg, workdir) is None:
                refuse_other_settings(cfg, workdir, fresh_flag="--fresh")
    rows, curves = [], {}
    for label in variants:
        per_seed, seed_curves, minutes = [], [], 0.0
        for seed in seeds:
            cfg, workdir = planned[label, seed]
            done = None if fresh else finished_run(cfg, workdir)
            if done is None:
                if fresh and workdir.exists():
                    shutil.rmtree(workdir)
                print(f"== {study}: {label}, seed {seed} ({count_params(cfg.model):,} "
                      "parameters)", flush=True)
                start = time.perf_counter()
                value = train(cfg, workdir, sample=False).eval_metrics[metric]
                minutes += (time.perf_counter() - start) / 60
            else:
                print(f"== {study}: {label}, seed {seed}: already trained in {workdir}",
                      flush=True)
                value = done[metric]
            per_seed.append(value)
            seed_curves.append([(r["step"], r[metric]) for r in read_metrics(workdir)
                                if r["split"] == "eval"])
        steps = sorted({s for curve in seed_curves for s, _ in curve})
        curves[label] = [(s, float(np.mean([v for c in seed_curves for t, v in c if t == s])))
                         for s in steps]
        row = {"variant": label, "params": count_params(cfg.model), "steps": cfg.train.steps}
        row.update({f"seed {seed}": value for seed, value in zip(seeds, per_seed)})
        row.update({metric: float(np.mean(per_seed)), "std": float(np.std(per_seed, ddof=1))
                    if len(per_seed) > 1 else 0.0, "minutes": minutes})
        rows.append(row)
    return rows, curves


def table_columns(seeds, metric: str) -> list[str]:
    return (["variant", "params", "steps"] + [f"seed {s}" for s in seeds]
            + [metric, "std", "minutes"])


def eval_note(answers_per_batch: int, seeds) -> str:
    """How many answers each accuracy is measured on, its sampling error, and the seeds."""
    answers = answers_per_batch * EVAL_BATCHES
    spread = math.sqrt(0.25 / answers)  # one standard error at p = 0.5, the widest
    seeds_text = (f"mean of {len(seeds)} seeds ({', '.join(map(str, seeds))}; train.seed = "
                  "data.seed), std between seeds" if len(seeds) > 1 else f"seed {seeds[0]}")
    return (f" Eval: {EVAL_BATCHES} batches of {BATCH} sequences = {answers} answers per run "
            f"(standard error at most {100 * spread:.1f}%); {seeds_text}. minutes: training "
            "time of this invocation (0 for runs found already trained).")


def plot_curves(curves, metric: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", ms=3, label=label)
    ax.set(xlabel="step", ylabel=f"eval {metric}", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- 1. long-context throughput ----------------------------------------------------------------


def dense_match(hydra_cfg):
    """A Transformer of hydra_29m's width and depth whose d_ff makes the parameter counts equal."""
    m = hydra_cfg.model
    base = ["model.name=transformer", f"model.d_model={m.d_model}", f"model.n_layers={m.n_layers}",
            f"model.n_heads={m.n_heads}", f"model.n_kv_heads={m.n_kv_heads}",
            f"model.max_seq_len={m.max_seq_len}", "model.moe_experts=0"]
    target = count_params(m)
    probe = apply_overrides(hydra_cfg, base + ["model.d_ff=1"])
    per_unit = 3 * m.d_model * m.n_layers  # SwiGLU parameters per unit of d_ff
    d_ff = max(int(round((target - count_params(probe.model) + per_unit) / per_unit)), 1)
    return apply_overrides(hydra_cfg, base + [f"model.d_ff={d_ff}"])


def step_seconds(cfg, repeats: int) -> float:
    from jaxsparse.parallel import make_mesh
    from jaxsparse.train.state import TrainSetup
    from jaxsparse.train.step import make_train_step

    setup = TrainSetup(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    state, step = setup.init(), make_train_step(setup)
    rng = np.random.default_rng(0)
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    batch = {"inputs": rng.integers(0, 256, shape, dtype=np.int32),
             "targets": rng.integers(0, 256, shape, dtype=np.int32),
             "mask": np.ones(shape, np.float32)}
    batch = setup.global_batch(batch)
    return step_timing(step, state, batch, repeats)


def step_timing(step, state, batch, repeats: int) -> float:
    """Median seconds of one training step (``time_fn``: warm-up, then ``repeats`` timed
    calls, each waited for). The step donates its state, so each call takes the last one's."""
    from jaxsparse.bench.timing import time_fn

    holder = [state]

    def one_step(batch):
        holder[0], metrics = step(holder[0], batch)
        return metrics

    return time_fn(one_step, batch, warmup=1, repeats=repeats).median_s


def study_throughput(args, out: Path) -> None:
    hydra = apply_overrides(configs.get("hydra_29m"), ["model.hydra_curriculum=", "data.batch_size=1",
                                                       "mesh.data=1"])
    dense = dense_match(hydra)
    notes = (f"Training-step throughput (forward + backward + AdamW, batch 1) of hydra_29m "
             f"({count_params(hydra.model):,} parameters) and a Transformer of the same width, "
             f"depth and parameter count ({count_params(dense.model):,}; d_ff={dense.model.d_ff}) "
             f"on {jax.device_count()} {jax.default_backend()} device(s); median of "
             f"{args.repeats} steps. Paper: ~3x at 8k on a GPU. The Transformer's attention is the "
             "library default for the shape (jaxsparse.ops.attention).")
    columns = ["length", "hydra_tok_s", "transformer_tok_s", "hydra/transformer"]
    rows = []
    for length in args.lengths:
        row = {"length": length}
        for label, cfg in (("hydra", hydra), ("transformer", dense)):
            cfg = apply_overrides(cfg, [f"data.seq_len={length}",
                                        f"model.hydra_max_global={min(512, length)}"])
            try:
                seconds = step_seconds(cfg, args.repeats)
            except jax.errors.JaxRuntimeError as err:
                if "RESOURCE_EXHAUSTED" not in str(err):
                    raise
                row[f"{label}_tok_s"] = "out of memory"
                print(f"   {label:12s} L={length:5d}: out of memory", flush=True)
                continue
            row[f"{label}_tok_s"] = length / seconds
            print(f"   {label:12s} L={length:5d}: {seconds * 1e3:8.1f} ms/step", flush=True)
        both = all(isinstance(row[f"{k}_tok_s"], float) for k in ("hydra", "transformer"))
        row["hydra/transformer"] = (row["hydra_tok_s"] / row["transformer_tok_s"] if both
                                    else "-")
        rows.append(row)
        # written after every length: a run stopped by its time limit keeps what it measured
        write_results("throughput", rows, columns, out, notes)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("hydra_tok_s", "transformer_tok_s"):
        points = [(r["length"], r[key]) for r in rows if isinstance(r[key], float)]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key[:-6])
    ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="tokens / s",
           title="training throughput")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    print(notes)


# --- 2. expert routing by domain -----------------------------------------------------------------


def mixed_batch(batch: dict) -> tuple[dict, np.ndarray]:
    """``batch`` of Python source with half its rows byte-reversed (another "language" with the
    same byte frequencies: experts can only tell them apart from context), and each row's
    domain (0 Python, 1 reversed)."""
    seq = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    half = len(seq) // 2
    seq[half:] = seq[half:, ::-1]
    domain = np.zeros(len(seq), np.int32)
    domain[half:] = 1
    return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "mask": np.ones_like(seq[:, 1:], np.float32)}, domain


def held_out_batch(stream) -> tuple[dict, np.ndarray]:
    """A mixed batch of validation-split windows (``stream.batch`` draws from the train split
    at any step, so a far-off step was still training text)."""
    return mixed_batch(stream.eval_batch(0, 1))


def expert_choices(model, tokens):
    """Per block, the expert each token is routed to (top-1) ``[layers, B, L]``, -1 for the
    tokens no router chose for (the first chunk of causal chunk-level routing: expert 0 by a
    tie of uniform probabilities, the same in every domain), and the mean entropy of the
    router's distribution over the routed decisions."""
    from flax import nnx

    trace = nnx.jit(lambda m, t: m.routing_trace(t))(model, tokens)
    choices, entropies = [], []
    for experts, probs, routed, decided in zip(trace["experts"], trace["router_probs"],
                                               trace["routed"], trace["decisions_routed"]):
        if experts is None:  # a block with a dense feed-forward: no routing to show
            continue
        experts = np.asarray(experts)
        if routed is not None:
            experts = np.where(np.asarray(routed), experts, -1)
        choices.append(experts.reshape(tokens.shape))
        probs = np.asarray(probs)
        if decided is not None:
            probs = probs[np.asarray(decided)]
        entropies.append(float(-(probs * np.log(np.maximum(probs, 1e-12))).sum(-1).mean()))
    return np.stack(choices), entropies


def study_routing(args, out: Path) -> None:
    from jaxsparse.data import Shard, make_stream
    from jaxsparse.parallel import make_mesh
    from jaxsparse.train.state import TrainSetup
    from jaxsparse.train.step import make_train_step
    from tqdm.auto import tqdm

    cfg = apply_overrides(configs.get("hydra_tiny"), QUIET + ["model.hydra_curriculum=",
                                                              f"train.steps={args.steps}"])
    setup = TrainSetup(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    state, step = setup.init(), make_train_step(setup)
    stream = make_stream(cfg, Shard(0, 1))
    losses = []
    for i in tqdm(range(args.steps), desc="routing study"):
        batch, _ = mixed_batch(stream.batch(i))
        state, metrics = step(state, setup.global_batch(batch))
        losses.append(float(metrics["loss"]))
    model = setup.model(state["params"], state["rest"])
    model.eval()
    batch, domain = held_out_batch(stream)
    choices, entropies = expert_choices(model, jnp.asarray(batch["inputs"]))
    experts = cfg.model.moe_experts
    rows = []
    usage = np.zeros((len(choices), 2, experts))
    for layer, chosen in enumerate(choices):
        for d in (0, 1):
            picked = chosen[domain == d].ravel()
            counts = np.bincount(picked[picked >= 0], minlength=experts)
            usage[layer, d] = counts / counts.sum()
        overlap = float(np.minimum(usage[layer, 0], usage[layer, 1]).sum())
        rows.append({"block": layer, "python": " ".join(f"{u:.2f}" for u in usage[layer, 0]),
                     "reversed": " ".join(f"{u:.2f}" for u in usage[layer, 1]),
                     "usage_overlap": overlap, "router_entropy": entropies[layer],
                     "max_entropy": math.log(experts)})
    notes = (f"hydra_tiny ({count_params(cfg.model):,} parameters) trained {args.steps} steps on "
             "a 50/50 mix of Python source and byte-reversed Python source; expert usage per "
             "domain (fraction of routed tokens per expert, chunk-level top-1 routing; the first "
             "chunk of each row, which has no earlier chunk to route from, is left out) on a held-out "
             "mixed batch (validation-split windows, half of them reversed). usage_overlap = "
             "sum_e min(p_python, p_reversed): 1 is identical usage, 0 disjoint experts. Final "
             f"train loss {np.mean(losses[-20:]):.3f}.")
    write_results("routing", rows, ["block", "python", "reversed", "usage_overlap",
                                    "router_entropy", "max_entropy"], out, notes)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(choices), figsize=(3 * len(choices), 3), sharey=True)
    for layer, ax in enumerate(np.atleast_1d(axes)):
        width = 0.4
        ax.bar(np.arange(experts) - width / 2, usage[layer, 0], width, label="python")
        ax.bar(np.arange(experts) + width / 2, usage[layer, 1], width, label="reversed")
        ax.set(title=f"block {layer}", xlabel="expert")
    np.atleast_1d(axes)[0].set_ylabel("fraction of tokens")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "routing.png", dpi=120)
    print(notes)


# --- 3-5. synthetic recall and composition -------------------------------------------------------


def mqar_levels(vocab: int, pairs: int) -> str:
    """The reference levels an MQAR accuracy is read against."""
    return (f"vocabulary {vocab}; answer accuracy (chance ~1/{vocab // 2}; copying some opening "
            f"value without binding it to its key: ~1/{pairs})")


def study_pkm(args, out: Path) -> None:
    seq_len = 256 if args.seq_len is None else args.seq_len
    task = synthetic("mqar", seq_len, args.steps, "data.num_kv_pairs=32", vocab=args.vocab)
    variants = {"hydra + PKM": SMALL_HYDRA + task,
                "hydra, no PKM": SMALL_HYDRA + task + ["model.pkm_layers="]}
    rows, curves = run_variants("pkm", variants, "accuracy", out, args.seeds, args.fresh)
    notes = (f"MQAR with 32 key-value pairs at length {seq_len}, {args.steps} steps, "
             f"{mqar_levels(args.vocab, 32)}. The same small Hydra with and without a 1,024-slot "
             "product-key memory." + eval_note(32 * BATCH, args.seeds))
    write_results("pkm", rows, table_columns(args.seeds, "accuracy"), out, notes)
    plot_curves(curves, "accuracy", out / "pkm.png", "key-value recall")
    print(notes)


def study_composition(args, out: Path) -> None:
    seq_len = 128 if args.seq_len is None else args.seq_len
    variants = {}
    for hops in (1, 2, 4):
        task = synthetic("multi_hop", seq_len, args.steps, f"data.hops={hops}", "data.chains=4",
                         vocab=args.vocab)
        variants[f"hydra, {hops} hops"] = SMALL_HYDRA + task
        variants[f"transformer, {hops} hops"] = SMALL_TRANSFORMER + task
    rows, curves = run_variants("composition", variants, "accuracy", out, args.seeds,
                                args.fresh)
    notes = (f"Multi-hop variable chains (4 chains, shuffled assignments, one query per chain) "
             f"at length {seq_len}, {args.steps} steps, vocabulary {args.vocab}; answer "
             f"accuracy (chance ~1/{args.vocab // 2}; naming some chain's value without "
             "following the query's chain: ~1/4). Hydra vs a Transformer of about the same "
             "parameter count." + eval_note(4 * BATCH, args.seeds))
    write_results("composition", rows, table_columns(args.seeds, "accuracy"), out, notes)
    plot_curves(curves, "accuracy", out / "composition.png", "multi-step composition")
    print(notes)


def study_ablations(args, out: Path) -> None:
    seq_len = 256 if args.seq_len is None else args.seq_len
    task = synthetic("mqar", seq_len, args.steps, "data.num_kv_pairs=16", vocab=args.vocab)
    variants = {"full": SMALL_HYDRA + task,
                "- SGA": SMALL_HYDRA + task + ["model.hydra_sga_every=100"],
                "- MoE": SMALL_HYDRA + task + ["model.moe_experts=0", "model.d_ff=128"],
                "- PKM": SMALL_HYDRA + task + ["model.pkm_layers="],
                "- workspace": SMALL_HYDRA + task + ["model.workspace_slots=0"]}
    rows, curves = run_variants("ablations", variants, "accuracy", out, args.seeds, args.fresh)
    notes = (f"MQAR with 16 key-value pairs at length {seq_len}, {args.steps} steps, "
             f"{mqar_levels(args.vocab, 16)}; the small Hydra with one component removed at a "
             "time." + eval_note(16 * BATCH, args.seeds))
    write_results("ablations", rows, table_columns(args.seeds, "accuracy"), out, notes)
    plot_curves(curves, "accuracy", out / "ablations.png", "component ablations (MQAR)")
    print(notes)


STUDIES = {"throughput": study_throughput, "routing": study_routing, "pkm": study_pkm,
           "composition": study_composition, "ablations": study_ablations}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--steps", type=positive_int, default=600)
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="pkm, ablations: default 256; composition: default 128")
    parser.add_argument("--lengths", type=positive_int_list, default="1024,2048,4096,8192",
                        help="throughput study: comma-separated sequence lengths")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="throughput study: timed steps")
    parser.add_argument("--vocab", type=int, default=256,
                        help="vocabulary of the synthetic studies (pkm, composition, ablations); "
                             "smaller vocabularies leave the MQAR plateau sooner (README)")
    parser.add_argument("--seeds", type=seed, nargs="+", default=[0],
                        help="pkm, composition, ablations: train each variant once per seed "
                             "(train.seed and data.seed) and report the mean and std")
    parser.add_argument("--fresh", action="store_true",
                        help="retrain runs already finished in the results directory with the "
                             "same config (by default they are read back, not retrained)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if len(set(args.seeds)) < len(args.seeds):  # a repeat is read back, a spread of nothing
        parser.error(f"argument --seeds: {' '.join(map(str, args.seeds))} repeats a seed; each "
                     "seed is one independent run of every variant")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    STUDIES[args.study](args, out)


if __name__ == "__main__":
    main()
