"""Timing that means something: warm-up, ``block_until_ready``, median of repeats.

Every benchmark times our path and a peer in the same process and reports the ratio, so
numbers from different machines or days are never compared directly.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    times_s: tuple[float, ...]


def time_fn(fn: Callable, *args, warmup: int = 2, repeats: int = 5) -> Timing:
    """Call ``fn(*args)`` ``warmup`` times (compilation, caches), then time ``repeats`` calls.

    The result of every call is waited for with ``jax.block_until_ready``, so asynchronous
    dispatch does not make a call look faster than it is.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: must be >= 1")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), tuple(times))


def time_interleaved(ours, peer, *, warmup: int = 1, repeats: int = 5) -> tuple[float, float]:
    """Seconds of ``ours`` and ``peer`` (each a ``(fn, args)`` pair), timed ours, peer, ours,
    peer so that a slow phase of the machine hits both alike; the better of two medians each."""
    times = [time_fn(fn, *args, warmup=warmup, repeats=repeats).median_s
             for fn, args in (ours, peer, ours, peer)]
    return min(times[0::2]), min(times[1::2])


def matmul_peak_flops(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
    """Achieved FLOP/s of an ``n x n`` by ``n x n`` matmul: the machine's practical peak."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(jnp.dot)
    return 2 * n**3 / time_fn(matmul, a, b, repeats=repeats).median_s


def compiled_flops(jitted, *args) -> float | None:
    """FLOPs that XLA's cost analysis reports for one call (None where unavailable)."""
    try:
        cost = jitted.lower(*args).compile().cost_analysis()
    except Exception:  # noqa: BLE001 — cost analysis is best-effort across backends
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0)) or None


def markdown_table(rows: Sequence[dict], columns: Sequence[str],
                   formats: dict[str, str] | None = None) -> str:
    """Rows as a Markdown table; floats to 3 significant digits below 1000 and as whole
    numbers with thousands separators from there (``6,520``, not ``6.52e+03``), unless
    ``formats`` gives a column its own format string (e.g. ``{"bits_per_byte": "{:.4f}"}``)."""
    formats = formats or {}

    def fmt(v, column):
        if column in formats and v != "":
            return formats[column].format(v)
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e3 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, ""), c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def environment() -> dict:
    return {"backend": jax.default_backend(), "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
            "machine": platform.machine(), "processor": platform.processor()}


def write_results(name: str, rows: Sequence[dict], columns: Sequence[str], out_dir: str | Path,
                  notes: str = "", formats: dict[str, str] | None = None) -> tuple[Path, Path]:
    """Write ``NAME.json`` and ``NAME.md`` (table + environment) under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps({"name": name, "environment": env, "rows": list(rows),
                                     "notes": notes}, indent=2))
    env_line = ", ".join(f"{k}={v}" for k, v in env.items())
    table = markdown_table(rows, columns, formats)
    md_path.write_text(f"# {name}\n\n{notes}\n\n{table}\n\n_{env_line}_\n")
    return json_path, md_path
