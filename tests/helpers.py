"""Shared test helpers: tiny configs, subprocess runners and a compiled forward+VJP."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax

from jaxsparse import configs
from jaxsparse.config import apply_overrides
from jaxsparse.ops.routing import causal_routing_attention
from jaxsparse.parallel.emulated import emulated_devices_env

ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.d_ff=64", "model.max_seq_len=64", "data.seq_len=32", "data.batch_size=8",
    "train.log_every=1", "train.eval_every=1000", "train.checkpoint_every=1000",
    "train.progress=false", "train.tensorboard=false", "eval.batches=1", "eval.sample_tokens=8",
    "optimizer.warmup_steps=2",
]


@functools.partial(jax.jit, static_argnums=0)
def forward_and_vjp(fn, primals: tuple, cotangent):
    """``fn(*primals)`` and the gradients of ``<fn(*primals), cotangent>``, compiled as one
    program: dispatched op by op, an attention or Monarch forward and backward took 1.5-5 s a
    case. ``fn`` is static (a new lambda compiles afresh)."""
    out, vjp = jax.vjp(fn, *primals)
    return out, vjp(cotangent)


# routing attention over the whole sequence, the reference of the routing and ring-decoding
# tests, compiled: op by op one call took 1-3 s
routing_jit = jax.jit(causal_routing_attention,
                      static_argnames=("window", "shared_qk", "probes", "query_chunk"))


def tiny_config(*overrides: str):
    return apply_overrides(configs.get("transformer_tiny"), TINY + list(overrides))


def short_documents(directory: Path, count: int = 200) -> list[str]:
    """Overrides for a corpus of ``count`` short text files (at most 22 bytes) written into
    ``directory``: every window of 24 bytes or more crosses a file end."""
    for i in range(count):
        (directory / f"doc{i:02d}.txt").write_text(f"f{i}:" + "ab " * (1 + i % 6))
    return [f"data.path={directory}/*.txt", f"data.cache_dir={directory}/cache"]


def run_python(code: str, *, devices: int = 1, env: dict | None = None, timeout: int = 600):
    """Run ``code`` in a fresh interpreter with ``devices`` emulated CPU devices; the last
    stdout line must be JSON, which is returned."""
    full_env = emulated_devices_env(devices)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + str(ROOT / "tests")
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sharded_gradient_check(loss, params, state, x, mesh, rules, x_spec):
    """For test programs run by :func:`run_python`: ``jax.grad`` of ``loss(p, x, mesh)`` with
    respect to ``(params, x)``, compiled with the parameters split as ``rules`` say (``state``:
    their abstract nnx state) and ``x`` as ``x_spec`` on ``mesh``. Returns the compiled
    program's collective bytes by kind and the largest relative error of its gradients
    against one device's (``loss(p, x, None)``)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from jaxsparse.dryrun import collective_summary
    from jaxsparse.parallel import param_shardings

    grad = jax.jit(jax.grad(lambda p, x: loss(p, x, mesh), argnums=(0, 1)))
    sharded = (jax.device_put(params, param_shardings(state, mesh, rules)),
               jax.device_put(x, NamedSharding(mesh, x_spec)))
    collectives = collective_summary(grad.lower(*sharded).compile().as_text())
    want = jax.jit(jax.grad(lambda p, x: loss(p, x, None), argnums=(0, 1)))(params, x)
    err = worst(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                for a, b in zip(jax.tree.leaves(grad(*sharded)), jax.tree.leaves(want)))
    return {kind: v["bytes"] for kind, v in collectives.items()}, err


def worst(errors) -> float:
    """The largest of ``errors``, NaN when any is NaN. Python's ``max`` drops a NaN that does
    not come first (``nan > x`` is False), so a NaN gradient of any leaf but the first passed
    every ``err < tol`` check of a sharded or kernel program."""
    import numpy as np

    return float(np.max(np.asarray(list(errors), dtype=float)))


class Matmul(NamedTuple):
    dtypes: tuple[str, str]  # of the two operands
    flops: int
    enclosing: tuple[str, ...]  # primitives around it, outermost first ("scan", "checkpoint")
    shapes: tuple[tuple[int, ...], tuple[int, ...]]


def matmuls(fn, *args) -> list[Matmul]:
    """Every matmul (``dot_general``) in the jaxpr of ``fn(*args)``, nested ones included
    (scan and map bodies, remat, custom_vjp, shard_map), as :class:`Matmul` records; FLOPs
    count every iteration of an enclosing scan."""
    import jax
    import numpy as np

    found = []

    def walk(jaxpr, enclosing, repeats):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval
                flops = (2 * np.prod(eqn.outvars[0].aval.shape)
                         * np.prod([lhs.shape[i] for i in lhs_contracting]) * repeats)
                found.append(Matmul(tuple(str(v.aval.dtype) for v in eqn.invars), int(flops),
                                    enclosing, tuple(v.aval.shape for v in eqn.invars)))
            inner_repeats = repeats * eqn.params.get("length", 1) if eqn.primitive.name == "scan" \
                else repeats
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner, enclosing + (eqn.primitive.name,), inner_repeats)

    walk(jax.make_jaxpr(fn)(*args).jaxpr, (), 1)
    return found
