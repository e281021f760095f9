"""Is Hydra a better default than the dense Transformer on two CPU cores? Each model trains on
the default corpus for the same wall-clock budget (default 10 minutes, compile and evaluation
included): the step count that fills the budget is calibrated from timed training steps and
evaluations of each model, so each model's learning-rate schedule completes. Two rounds by
default, the second in reverse order; reports each run's validation bits per byte and the means.

    python experiments/hydra/default_vs_dense.py [--minutes 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax

from jaxsparse import configs
from jaxsparse.bench import write_results
from jaxsparse.bench.arguments import positive_float, positive_int
from jaxsparse.config import apply_overrides
from jaxsparse.data import Shard, make_stream
from jaxsparse.models import count_params
from jaxsparse.parallel import make_mesh
from jaxsparse.train.loop import evaluate, train
from jaxsparse.train.state import TrainSetup
from jaxsparse.train.step import make_eval_step, make_train_step

from study import step_timing  # noqa: E402  (this folder's study script)

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: study_runs

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Timing:
    """What one training run of ``cfg`` spends its wall clock on (seconds)."""
    step_compile: float  # the first training step: tracing + XLA compilation
    step: float  # one steady training step (median of the probe)
    eval_compile: float  # the first evaluation's extra time: compiling the forward pass
    evaluation: float  # one evaluation (eval.batches forward passes)

    def steps_within(self, budget: float, evals: int) -> int:
        """Training steps that fill ``budget`` with ``evals`` evaluations and 2% to spare
        (the final checkpoint, logging, timing noise)."""
        fixed = self.step_compile + self.eval_compile + evals * self.evaluation
        return max(int((0.98 * budget - fixed) / self.step), 10)


def measure(cfg, probe: int = 16) -> Timing:
    """Time ``cfg``'s training step and its evaluation the way the training loop runs them."""
    setup = TrainSetup(cfg, make_mesh(cfg.mesh))
    state, step = setup.init(), make_train_step(setup)
    stream = make_stream(cfg, Shard(0, 1))
    batch = setup.global_batch(stream.batch(0))
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    step_compile = time.perf_counter() - start
    step_s = step_timing(step, state, batch, probe)
    eval_step = make_eval_step(setup)
    fresh = setup.init()  # the probe donated ``state``'s buffers
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        evaluate(setup, eval_step, fresh, stream, cfg)
        seconds.append(time.perf_counter() - start)
    evaluation = min(seconds[1:])
    return Timing(step_compile, step_s, seconds[0] - evaluation, evaluation)


EVALS = 6  # the loop's first evaluation, one every steps // 4, and one at a ragged end


def run_one(base, budget: float, workdir: Path) -> dict:
    """Calibrate ``base``'s step count to ``budget`` seconds, train it, report the end."""
    timing = measure(base)
    steps = timing.steps_within(budget, EVALS)
    cfg = apply_overrides(base, [f"train.steps={steps}", f"train.eval_every={max(steps // 4, 1)}",
                                 f"train.checkpoint_every={steps}", "train.tensorboard=false",
                                 "eval.sample_tokens=0", f"optimizer.warmup_steps="
                                 f"{min(base.optimizer.warmup_steps, steps // 10)}"])
    print(f"== {base.name}: {count_params(cfg.model):,} parameters, "
          f"{timing.step * 1e3:.0f} ms/step, compile {timing.step_compile:.0f} s + "
          f"{timing.eval_compile:.0f} s, "
          f"evaluation {timing.evaluation:.1f} s -> {steps} steps", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)  # a previous run's checkpoint would resume
    start = time.perf_counter()
    result = train(cfg, workdir, sample=False)
    return {"config": base.name, "params": count_params(cfg.model),
            "ms_per_step": timing.step * 1e3, "steps": result.step,
            "minutes": (time.perf_counter() - start) / 60,
            "bits_per_byte": result.eval_metrics["bits_per_byte"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=positive_float, default=10.0,
                        help="wall-clock budget of each run (> 0)")
    parser.add_argument("--configs", default="hydra_tiny,transformer_tiny",
                        help="comma-separated config names or config file paths")
    parser.add_argument("--rounds", type=positive_int, default=2,
                        help="runs per config; odd rounds reverse the order (A B, B A, ...), so a "
                             "machine that speeds up or slows down favours neither")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    bases = [configs.get(name) for name in args.configs.split(",")]
    names = [base.name for base in bases]
    if len(set(names)) < len(names):  # one workdir each: the second would delete the first
        parser.error(f"argument --configs: {args.configs!r} names one config twice "
                     f"({', '.join(names)}); give each once")
    rows = []
    for round_ in range(args.rounds):
        for base in bases if round_ % 2 == 0 else bases[::-1]:
            workdir = Path(args.out) / "default_vs_dense" / f"{base.name}-{round_}"
            rows.append({"round": round_} | run_one(base, args.minutes * 60, workdir))
    for base in bases:
        mine = [r for r in rows if r["config"] == base.name and r["round"] != "mean"]
        rows.append({"round": "mean", "config": base.name,
                     **{k: sum(r[k] for r in mine) / len(mine)
                        for k in ("ms_per_step", "steps", "minutes", "bits_per_byte")}})
    notes = (f"Each config trained {args.rounds} time(s) for ~{args.minutes:g} minutes of wall "
             f"clock on this machine ({jax.device_count()} {jax.default_backend()} device(s)), "
             "steps calibrated to fill it (timed steps and evaluations), the order reversed every "
             "other round; validation bits per byte at the end of each run, then each config's "
             "mean.")
    write_results("default_vs_dense", rows, ["round", "config", "params", "ms_per_step", "steps",
                                             "minutes", "bits_per_byte"], args.out, notes,
                  formats={"bits_per_byte": "{:.4f}", "steps": "{:.0f}"})
    print(notes)


if __name__ == "__main__":
    main()
