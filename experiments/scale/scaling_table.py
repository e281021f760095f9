"""Scaling table from dry runs: per-device memory, step FLOPs and collectives of `hydra_1p6b`
and the dense baseline `transformer_1p3b` on emulated meshes of 8 to 256 devices, under each
sharding preset, and which preset fits a 16 GB and a 95 GB device.

Nothing is allocated: every number comes from abstract shapes and the CPU compiler.

* Both configs train with per-block remat and a chunked output head (``train.loss_chunk=512``).
* Parameters and optimiser state per device are exact, from the shardings of the full model.
* Compiling all 24 blocks on 256 emulated devices takes 7 minutes on this 2-core machine, so
  each configuration is compiled at two reduced depths (one period of Hydra's block pattern
  and two; the same PKM layer in both) and the compiler's temporaries, FLOPs and collective
  bytes are extrapolated linearly in depth to the full model ("no remat" columns).
* XLA:CPU drops rematerialisation (its CSE merges the recomputation back into the forward
  pass: the temporaries of a 24-layer MLP stack are 588 MiB with and without
  ``jax.checkpoint``), so the CPU compiler cannot measure what ``model.remat`` saves on an
  accelerator. The "remat" column is therefore an estimate: the compiled temporaries of the
  shallow model (its blocks' activations included: an upper bound of the constant part) plus,
  per further block, the residual stream that per-block remat keeps
  (``batch/batch-shards × length/sequence-shards × d_model`` in the compute dtype).
* Fusion and scheduling differ on TPU and GPU, so all temporaries are estimates of the same
  program; XLA's cost analysis counts a loop body once, so FLOPs of scans are under-counted
  (see jaxsparse/dryrun.py), and remat's recomputation (about one more forward pass) is not in
  the FLOPs.
* XLA:CPU widens bf16 collectives to float32, so the collective bytes of bf16 activations
  (MoE all-to-alls, activation gathers) are counted at twice their accelerator size; gathers
  and reductions of float32 parameters and gradients are counted exactly.

Usage: python experiments/scale/scaling_table.py [--sizes 8,64,256] [--models ...]
Writes scaling.{json,md} into the directory --out (default experiments/results); rows of models
not named in --models are kept.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxsparse import configs
from jaxsparse.bench.arguments import description, positive_int
from jaxsparse.dryrun import run_emulated

RESULTS = Path(__file__).resolve().parents[1] / "results"
GB = 1e9
DEVICE_MEMORY = {"16 GB": 16 * GB, "95 GB": 95 * GB}


def meshes(preset: str, devices: int, model: str) -> dict[str, int] | None:
    """The mesh a preset uses on ``devices`` devices (None where it does not apply)."""
    tensor = min(4, devices)
    if preset == "data":
        return {"data": devices}
    if preset == "fsdp":
        return {"fsdp": devices}
    if preset == "fsdp_tp":
        return {"fsdp": devices // tensor, "tensor": tensor}
    if preset == "fsdp_tp_ep":
        if not model.startswith("hydra"):
            return None  # the dense baseline has no experts
        expert = min(8, devices)
        rest = devices // expert
        tensor = min(4, rest) if rest > 8 else 1
        return {"fsdp": rest // tensor, "expert": expert, "tensor": tensor}
    if preset == "fsdp_tp_sp":
        sequence = tensor = 4 if devices >= 64 else 2
        return {"fsdp": devices // (sequence * tensor), "sequence": sequence, "tensor": tensor}
    raise ValueError(preset)


def depth_overrides(model: str, depth: int) -> list[str]:
    overrides = [f"model.n_layers={depth}"]
    if model.startswith("hydra"):
        overrides.append("model.pkm_layers=1")  # one memory layer at both depths
    return overrides


def one(model: str, devices: int, preset: str, mesh: dict[str, int], depths) -> dict:
    sizes = {axis: mesh.get(axis, 1) for axis in ("data", "fsdp", "expert", "sequence", "tensor")}
    base = [f"mesh.{a}={s}" for a, s in sizes.items()] + [f"mesh.preset={preset}"]
    full = run_emulated(model, devices, base, compile=False)  # exact parameter/optimiser bytes
    points = [run_emulated(model, devices, base + depth_overrides(model, d), compile=True)
              for d in depths]
    cfg = configs.get(model)
    n_layers = cfg.model.n_layers

    def extrapolate(values):
        (d0, v0), (d1, v1) = zip(depths, values)
        slope = (v1 - v0) / (d1 - d0)
        return v0 + slope * (n_layers - d0)

    temps = extrapolate([p["compiled_temp_bytes_per_device"] for p in points])
    flops = extrapolate([p.get("flops_per_device", 0.0) for p in points])
    kinds = sorted(set().union(*(p["collectives"] for p in points)))
    collectives = {k: extrapolate([p["collectives"].get(k, {"bytes": 0})["bytes"] for p in points])
                   for k in kinds}
    batch_shards = sizes["data"] * sizes["fsdp"] * (sizes["expert"] if preset in ("fsdp_tp_ep", "full") else 1)
    residual = (cfg.data.batch_size / batch_shards) * (cfg.data.seq_len / sizes["sequence"]) \
        * cfg.model.d_model * np.dtype(jnp.dtype(cfg.model.dtype)).itemsize
    temps_remat = points[0]["compiled_temp_bytes_per_device"] + (n_layers - depths[0]) * residual
    state = full["param_bytes_per_device"] + full["optimizer_bytes_per_device"]
    total, total_remat = state + temps, state + temps_remat
    return {"model": model, "devices": devices, "preset": preset, "mesh": mesh,
            "params": full["params"], "state_bytes": state, "temp_bytes": temps,
            "temp_bytes_remat": temps_remat, "total_bytes": total, "total_bytes_remat": total_remat,
            "flops_per_device": flops, "collective_bytes": collectives,
            "compile_seconds": [p["compile_seconds"] for p in points], "depths": list(depths),
            "fits": {name: total <= limit for name, limit in DEVICE_MEMORY.items()},
            "fits_remat": {name: total_remat <= limit for name, limit in DEVICE_MEMORY.items()}}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | devices | preset | mesh | params+opt GiB/dev | total GiB/dev, no remat | "
             "total GiB/dev, remat (est.) | TFLOP/dev/step | collectives GiB/dev | "
             "fits 16 GB: no remat (remat) | fits 95 GB: no remat (remat) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    gib = 2**30
    yes = lambda r, size: ("yes" if r["fits"][size] else "no") + (  # noqa: E731
        "" if r["fits"][size] == r["fits_remat"][size] else
        f" ({'yes' if r['fits_remat'][size] else 'no'})")
    for r in rows:
        mesh = "×".join(f"{a}{s}" for a, s in r["mesh"].items())
        coll = sum(r["collective_bytes"].values()) / gib
        lines.append(f"| {r['model']} | {r['devices']} | {r['preset']} | {mesh} | "
                     f"{r['state_bytes'] / gib:.2f} | {r['total_bytes'] / gib:.1f} | "
                     f"{r['total_bytes_remat'] / gib:.1f} | {r['flops_per_device'] / 1e12:.1f} | "
                     f"{coll:.1f} | {yes(r, '16 GB')} | {yes(r, '95 GB')} |")
    return "\n".join(lines)


PRESETS = ("data", "fsdp", "fsdp_tp", "fsdp_tp_ep", "fsdp_tp_sp")


def model_list(text: str) -> list[str]:
    """``type=`` of ``--models``: comma-separated config names (or config files, as
    ``configs.get`` takes), each one that exists (a typo used to become an error row in the
    results and exit 0)."""
    names = text.split(",")
    unknown = [name for name in names if name not in configs.names()
               and not (name.endswith(".py") and Path(name).is_file())]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown config(s) {', '.join(map(repr, unknown))}; "
                                         f"named configs: {', '.join(configs.names())}")
    return names


def size_list(text: str) -> list[int]:
    """``type=`` of ``--sizes``: comma-separated device counts, each >= 1."""
    return [positive_int(size) for size in text.split(",")]


def preset_list(text: str) -> list[str]:
    """``type=`` of ``--presets``: comma-separated names of PRESETS (a typo matched nothing)."""
    presets = text.split(",")
    unknown = [preset for preset in presets if preset not in PRESETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown preset(s) {', '.join(map(repr, unknown))}; "
                                         f"choose from {', '.join(PRESETS)}")
    return presets


def load_rows(out: Path) -> list[dict]:
    path = out.with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else []


def table_order(rows: list[dict]) -> list[dict]:
    """Hydra first, then the baseline; by device count, then preset."""
    def key(r):
        preset = PRESETS.index(r["preset"]) if r["preset"] in PRESETS else len(PRESETS)
        return (not r["model"].startswith("hydra"), r["model"], r["devices"], preset)
    return sorted(rows, key=key)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--models", type=model_list, default="hydra_1p6b,transformer_1p3b",
                        help="comma-separated config names")
    parser.add_argument("--sizes", type=size_list, default="8,64,256",
                        help="comma-separated device counts")
    parser.add_argument("--presets", type=preset_list, default=",".join(PRESETS),
                        help=f"comma-separated sharding presets, of {', '.join(PRESETS)}")
    parser.add_argument("--out", default=str(RESULTS),
                        help="directory of the table (scaling.json, scaling.md), as the other "
                             "scripts' --out; created if missing")
    args = parser.parse_args(argv)
    jobs = []
    for model in args.models:
        depths = (3, 6) if model.startswith("hydra") else (2, 4)
        for devices in args.sizes:
            for preset in args.presets:
                mesh = meshes(preset, devices, model)
                if mesh is not None and math.prod(mesh.values()) == devices:
                    jobs.append((model, devices, preset, mesh, depths))
    if not jobs:  # e.g. fsdp_tp_ep for the dense baseline, or too few devices for a preset
        raise SystemExit("no preset applies to these models and sizes; nothing to run")
    # (a file stem until 2026-12-07: `--out DIR/` wrote DIR.json beside DIR)
    out = Path(args.out) / "scaling"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Rows not rerun now stay in the table: `--models hydra_1p6b --presets fsdp_tp` refreshes
    # those rows after a change without recompiling the others.
    rerun = {(model, devices, preset) for model, devices, preset, _, _ in jobs}
    # Failures (an error row of an older version's file among them) stay out of the results:
    # later runs kept them, and the table README cites would hold them.
    kept = [r for r in load_rows(out) if (r["model"], r["devices"], r["preset"]) not in rerun
            and "error" not in r]
    rows, failed = [], []
    for model, devices, preset, mesh, depths in tqdm(jobs, desc="dry runs", unit="config"):
        try:
            rows.append(one(model, devices, preset, mesh, depths))
        except Exception as err:  # noqa: BLE001 — report the failure, keep the table going
            failed.append(f"FAILED {model} {devices} {preset}: {str(err)[-500:]}")
            continue
        table = table_order(kept + rows)
        out.with_suffix(".json").write_text(json.dumps(table, indent=1))
        out.with_suffix(".md").write_text(markdown(table) + "\n")
    print(markdown(table_order(kept + rows)))
    if failed:
        print("\n".join(failed), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
