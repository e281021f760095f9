"""Compile-only dry run: a config's training step on an emulated device mesh, without
allocating its parameters. Reports per-device parameter and optimiser-state memory (from the
shardings of the abstract train state) and, when compiled, XLA's memory analysis."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import jax

from jaxsparse.config import Config


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of ``tree`` (abstract arrays carrying shardings): the largest
    shard of each leaf, summed."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def dry_run(cfg: Config, *, compile: bool = True) -> dict:
    """Build the abstract train state of ``cfg`` on the current devices' mesh and lower (and
    optionally compile) one training step. Nothing of the model's size is allocated."""
    from jaxsparse.models import count_params
    from jaxsparse.parallel import make_mesh
    from jaxsparse.train.state import TrainSetup
    from jaxsparse.train.step import make_train_step

    mesh = make_mesh(cfg.mesh)
    setup = TrainSetup(cfg, mesh)
    state = setup.abstract_state
    report = {
        "config": cfg.name, "devices": jax.device_count(), "mesh": dict(mesh.shape),
        "params": count_params(cfg.model),
        "param_bytes_per_device": _per_device_bytes(state["params"]),
        "optimizer_bytes_per_device": _per_device_bytes(state["opt_state"]),
    }
    batch = {k: jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), dtype,
                                     sharding=setup.batch_sharding)
             for k, dtype in (("inputs", "int32"), ("targets", "int32"), ("mask", "float32"))}
    start = time.perf_counter()
    lowered = make_train_step(setup).trace(state, batch).lower()
    report["lower_seconds"] = round(time.perf_counter() - start, 1)
    if compile:
        start = time.perf_counter()
        compiled = lowered.compile()
        report["compile_seconds"] = round(time.perf_counter() - start, 1)
        analysis = compiled.memory_analysis()
        if analysis is not None:
            report["compiled_argument_bytes_per_device"] = int(analysis.argument_size_in_bytes)
            report["compiled_temp_bytes_per_device"] = int(analysis.temp_size_in_bytes)
    return report


def run_emulated(config: str, devices: int, overrides: list[str], compile: bool) -> dict:
    """:func:`dry_run` in a fresh interpreter with ``devices`` emulated CPU devices (the device
    count is fixed when JAX starts, so it cannot be changed in this process)."""
    import json

    code = (
        "import json, sys; from jaxsparse import configs; from jaxsparse.config import "
        "apply_overrides, validate; from jaxsparse.dryrun import dry_run; "
        f"cfg = validate(apply_overrides(configs.get({config!r}), {overrides!r})); "
        f"print(json.dumps(dry_run(cfg, compile={compile!r})))")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"dry run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
