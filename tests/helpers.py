"""Shared test helpers: tiny configs and subprocess runners."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from jaxsparse import configs
from jaxsparse.config import apply_overrides

ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.d_ff=64", "model.max_seq_len=64", "data.seq_len=32", "data.batch_size=8",
    "train.log_every=1", "train.eval_every=1000", "train.checkpoint_every=1000",
    "train.progress=false", "train.tensorboard=false", "eval.batches=1", "eval.sample_tokens=8",
    "optimizer.warmup_steps=2",
]


def tiny_config(*overrides: str):
    return apply_overrides(configs.get("transformer_tiny"), TINY + list(overrides))


def run_python(code: str, *, devices: int = 1, env: dict | None = None, timeout: int = 600):
    """Run ``code`` in a fresh interpreter with ``devices`` emulated CPU devices; the last
    stdout line must be JSON, which is returned."""
    full_env = dict(os.environ)
    full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    full_env["JAX_PLATFORMS"] = "cpu"
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + str(ROOT / "tests")
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
