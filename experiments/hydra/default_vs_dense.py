"""Is Hydra a better default than the dense Transformer on two CPU cores? Each model trains on
the default corpus for the same wall-clock budget (default 10 minutes, compile and evaluation
included): the step count that fills the budget is calibrated from a short timing run, so each
model's learning-rate schedule completes. Reports validation bits per byte.

    python experiments/hydra/default_vs_dense.py [--minutes 10]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import jax

from jaxsparse import configs
from jaxsparse.bench import write_results
from jaxsparse.config import apply_overrides
from jaxsparse.data import Shard, make_stream
from jaxsparse.models import count_params
from jaxsparse.parallel import make_mesh
from jaxsparse.train.loop import train
from jaxsparse.train.state import TrainSetup
from jaxsparse.train.step import make_train_step

from study import step_timing  # noqa: E402  (this folder's study script)

RESULTS = Path(__file__).resolve().parent / "results"


def seconds_per_step(cfg, probe: int = 8) -> tuple[float, float]:
    """(compile seconds, steady seconds per step) of ``cfg``'s training step."""
    setup = TrainSetup(cfg, make_mesh(cfg.mesh))
    state, step = setup.init(), make_train_step(setup)
    stream = make_stream(cfg, Shard(0, 1))
    batch = setup.global_batch(stream.batch(0))
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    return compile_s, step_timing(step, state, batch, probe)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--configs", default="hydra_tiny,transformer_tiny",
                        help="comma-separated config names or config file paths")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    budget = args.minutes * 60
    rows = []
    for name in args.configs.split(","):
        base = configs.get(name)
        compile_s, step_s = seconds_per_step(base)
        # evaluation (4 passes of eval.batches) and checkpoints take ~8% of a run here
        steps = max(int((budget - 2 * compile_s) * 0.92 / step_s), 10)
        cfg = apply_overrides(base, [f"train.steps={steps}", f"train.eval_every={max(steps // 4, 1)}",
                                     f"train.checkpoint_every={steps}", "train.tensorboard=false",
                                     "eval.sample_tokens=0", f"optimizer.warmup_steps="
                                     f"{min(base.optimizer.warmup_steps, steps // 10)}"])
        name = base.name  # a config file's own name, not its path
        print(f"== {name}: {count_params(cfg.model):,} parameters, {step_s * 1e3:.0f} ms/step "
              f"-> {steps} steps", flush=True)
        workdir = Path(args.out) / "default_vs_dense" / name
        shutil.rmtree(workdir, ignore_errors=True)  # a previous run's checkpoint would resume
        start = time.perf_counter()
        result = train(cfg, workdir, sample=False)
        rows.append({"config": name, "params": count_params(cfg.model), "ms_per_step": step_s * 1e3,
                     "steps": result.step, "minutes": (time.perf_counter() - start) / 60,
                     "bits_per_byte": result.eval_metrics["bits_per_byte"]})
    notes = (f"Each config trained for ~{args.minutes:g} minutes of wall clock on this machine "
             f"({jax.device_count()} {jax.default_backend()} device(s)), steps calibrated to fill "
             "it; validation bits per byte at the end.")
    write_results("default_vs_dense", rows, ["config", "params", "ms_per_step", "steps",
                                             "minutes", "bits_per_byte"], args.out, notes)
    print(notes)


if __name__ == "__main__":
    main()
