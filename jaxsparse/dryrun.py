"""Compile-only dry run: a config's training step on an emulated device mesh, without
allocating its parameters. Reports per-device parameter and optimiser-state memory (from the
shardings of the abstract train state) and, when compiled, XLA's memory analysis, the step's
FLOPs per device (XLA's cost analysis) and the collectives the compiled HLO runs per step (a
collective inside a loop counted once per trip).

The numbers come from the CPU compiler: layouts, fusion and scheduling differ on TPU and GPU,
so temporaries are an estimate of the same program, not the accelerator's exact footprint;
and XLA's cost analysis counts the body of a loop (``lax.scan``) once, so FLOPs inside scans
(SSM recurrences, the ring attention loop) are under-counted by their trip count. XLA:CPU has
no bfloat16 collectives: its float normalization widens them to float32 (a bf16 all-to-all
compiles as convert -> f32 all-to-all -> convert), so collective bytes of bf16 activations are
counted at twice what a TPU or GPU moves (3-block ``hydra_1p6b`` under expert parallelism:
the MoE all-to-alls are 144 GiB per device and step as compiled here, 72 GiB in bf16)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time

import jax

from jaxsparse.config import Config
from jaxsparse.parallel.emulated import emulated_devices_env


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of ``tree`` (abstract arrays carrying shardings): the largest
    shard of each leaf, summed."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_LINE = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_ARRAY_TYPE = re.compile(r"\b(pred|[sfu]\d+|bf16)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2}


def _type_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY_TYPE.findall(text):
        size = _BYTES.get(dtype) or int(dtype[1:]) // 8
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


_LISTED_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[\d+,(\d+)\]")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}")


def _group_size(line: str) -> int | None:
    """Devices in each replica group of a collective's HLO line (None: not stated, e.g. all
    devices, or source-target pairs)."""
    if match := _LISTED_GROUPS.search(line):
        return len(match.group(1).split(","))
    if match := _IOTA_GROUPS.search(line):
        return int(match.group(1))
    if match := _MESH_GROUPS.search(line):
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", match.group(1)))
        return math.prod(int(sizes[axis]) for axis in re.findall(r"'(\w+)'", match.group(2)))
    return None


_COMPUTATION_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_WHILE_BODY = re.compile(r" while\(.*\bbody=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
# computations that run once per execution of the op naming them (a reducer's to_apply holds
# no collectives and is left out)
_CALLED = re.compile(r"\b(?:calls|true_computation|false_computation)=%?([\w.\-]+)"
                     r"|\bbranch_computations=\{([^}]*)\}")


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """HLO module text -> ({computation name: its lines}, the entry's name). Text without
    computation headers (a few instructions) is one entry computation."""
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        if header := _COMPUTATION_HEADER.match(line):
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif current is not None:
            computations[current].append(line)
    if entry is None:
        return {"entry": hlo_text.splitlines()}, "entry"
    return computations, entry


def collective_summary(hlo_text: str) -> dict[str, dict[str, int]]:
    """Count and result bytes per device of the collective ops one execution of compiled HLO
    text runs.

    A collective inside a loop counts once per trip (XLA's ``known_trip_count`` of the while
    loop: a ring's exchanges run once per step); in a loop whose trip count XLA does not know it
    counts once, and the entry says how many such ops it holds (``"unknown_trips"``). A
    collective in a conditional's branch counts as if its branch ran. Collectives whose replica
    groups hold one device each move nothing and are left out (``shard_map``'s transpose emits
    such all-reduces over mesh axes of size 1, and XLA:CPU keeps them as copies). Bytes are
    those of the compiled types: bf16 collectives count as the float32 that XLA:CPU widens them
    to (see the module docstring)."""
    computations, entry = _computations(hlo_text)
    totals: dict[str, dict[str, dict[str, int]]] = {}

    def add(summary, name, count, size, unknown):
        entry_ = summary.setdefault(name, {"count": 0, "bytes": 0, "unknown_trips": 0})
        entry_["count"] += count
        entry_["bytes"] += size
        entry_["unknown_trips"] += unknown

    def collectives_in(name: str) -> dict[str, dict[str, int]]:  # one execution of `name`
        if name in totals:
            return totals[name]
        summary = totals[name] = {}
        for line in computations.get(name, ()):
            match = _COLLECTIVE_LINE.search(line)
            if match is not None and _group_size(line) != 1:
                result_type, kind = match.groups()
                add(summary, kind, 1, _type_bytes(result_type), 0)
            callees = []
            if body := _WHILE_BODY.search(line):
                trips = _TRIP_COUNT.search(line)
                callees.append((body.group(1), int(trips.group(1)) if trips else None))
            for single, branches in _CALLED.findall(line):
                names = [single] if single else [b.strip().lstrip("%") for b in branches.split(",")]
                callees += [(callee, 1) for callee in names if callee]
            for callee, trips in callees:
                for kind, v in collectives_in(callee).items():
                    # in a loop of unknown length every one of them is counted once
                    unknown = v["count"] if trips is None else v["unknown_trips"] * trips
                    add(summary, kind, v["count"] * (trips or 1), v["bytes"] * (trips or 1),
                        unknown)
        return summary

    ordered = {}
    for kind in COLLECTIVES:  # the report's order
        if kind in (found := collectives_in(entry)):
            v = found[kind]
            ordered[kind] = {"count": v["count"], "bytes": v["bytes"]}
            if v["unknown_trips"]:
                ordered[kind]["unknown_trips"] = v["unknown_trips"]
    return ordered


def mesh_overrides(spec: str) -> tuple[list[str], int]:
    """``"data=16,fsdp=16"`` -> (config overrides setting every mesh axis, device count);
    axes not named are 1."""
    from jaxsparse.config import ConfigError, MESH_AXES

    sizes = dict.fromkeys(MESH_AXES, 1)
    named = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        axis, _, value = item.partition("=")
        if axis not in sizes or not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--mesh {spec!r}: {item!r} must be AXIS=SIZE with AXIS one of "
                              f"{', '.join(MESH_AXES)} and SIZE >= 1")
        if axis in named:
            raise ConfigError(f"--mesh {spec!r} names the {axis} axis twice")
        named.add(axis)
        sizes[axis] = int(value)
    if not named:
        raise ConfigError(f"--mesh {spec!r} names no axis; e.g. --mesh data=16,fsdp=16")
    return [f"mesh.{axis}={size}" for axis, size in sizes.items()], math.prod(sizes.values())


def dry_run(cfg: Config, *, compile: bool = True) -> dict:
    """Build the abstract train state of ``cfg`` on the current devices' mesh and lower (and
    optionally compile) one training step. Nothing of the model's size is allocated."""
    from jaxsparse.models import count_params
    from jaxsparse.parallel import check_batch_split, make_mesh
    from jaxsparse.parallel.mesh import check_mesh
    from jaxsparse.train.state import TrainSetup
    from jaxsparse.train.step import make_train_step

    check_batch_split(cfg, check_mesh(cfg, jax.device_count()))  # by name, not in XLA
    mesh = make_mesh(cfg.mesh)
    setup = TrainSetup(cfg, mesh)
    state = setup.abstract_state
    report = {
        "config": cfg.name, "devices": jax.device_count(), "mesh": dict(mesh.shape),
        "preset": cfg.mesh.preset, "batch": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
        "remat": cfg.model.remat,
        "params": count_params(cfg.model),
        "param_bytes_per_device": _per_device_bytes(state["params"]),
        "optimizer_bytes_per_device": _per_device_bytes(state["opt_state"]),
    }
    batch = {k: jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), dtype,
                                     sharding=setup.batch_sharding)
             for k, dtype in (("inputs", "int32"), ("targets", "int32"), ("mask", "float32"))
             + ((("segment_ids", "int32"),) if cfg.data.packed_documents else ())}
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
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        if cost and "flops" in cost:
            report["flops_per_device"] = float(cost["flops"])
        report["collectives"] = collective_summary(compiled.as_text())
    return report


MAX_EMULATED_DEVICES = 4096  # 256 compile in minutes here; 100,000 never came back
DEFAULT_EMULATED_DEVICES = 64


def default_device_count(cfg: Config) -> tuple[int, str | None]:
    """The emulated device count for ``cfg`` when ``--devices`` is not given, and a note
    saying why it is not what the mesh asks for (``None`` when it is): the product of the
    mesh sizes; with a ``-1`` axis, 64 devices, or fewer where the config refuses 64 once the
    axis is resolved (the batch split over the data-parallel axes, heads over the tensor axis,
    experts over the expert axis, ...: the checks the dry run itself makes): the largest count
    ``other axes * r`` with ``r`` dividing ``64 // other axes`` that passes them. Where none
    does, a ConfigError asks for ``--devices``."""
    from jaxsparse.config import ConfigError
    from jaxsparse.parallel import check_batch_split
    from jaxsparse.parallel.mesh import axis_sizes, check_mesh

    sizes = axis_sizes(cfg.mesh)
    rest = [axis for axis, size in sizes.items() if size == -1]
    if not rest:  # the mesh names its device count
        return math.prod(sizes.values()), None
    rest = rest[0]
    fixed = math.prod(size for size in sizes.values() if size != -1)
    top = DEFAULT_EMULATED_DEVICES // fixed
    first_error = None
    for r in (r for r in range(top, 0, -1) if top % r == 0):
        devices = fixed * r
        try:
            check_batch_split(cfg, check_mesh(cfg, devices))
        except ConfigError as err:
            first_error = first_error or err
            continue
        if devices == DEFAULT_EMULATED_DEVICES:
            return devices, None
        if first_error is None:  # 64 is not a multiple of the other axes' product
            why = f"cannot hold the mesh's other axes ({fixed} devices)"
        elif str(first_error).startswith("data.batch_size="):
            why = f"cannot split data.batch_size={cfg.data.batch_size}"
        else:
            why = f"are refused: {first_error}"
        return devices, (f"--devices {devices}: {DEFAULT_EMULATED_DEVICES} emulated devices "
                         f"{why}; mesh.{rest}=-1 resolves to {r}")
    detail = f": {first_error}" if first_error is not None else ""
    raise ConfigError(
        f"mesh.{rest}=-1: no emulated device count up to {DEFAULT_EMULATED_DEVICES} suits "
        f"this config{detail}; give the device count with --devices N (or the mesh with "
        "--mesh AXIS=SIZE,...)")


def run_emulated(config: str, devices: int, overrides: list[str], compile: bool) -> dict:
    """:func:`dry_run` in a fresh interpreter with ``devices`` emulated CPU devices (the device
    count is fixed when JAX starts, so it cannot be changed in this process)."""
    import json

    from jaxsparse import configs
    from jaxsparse.config import ConfigError
    from jaxsparse.parallel import check_batch_split
    from jaxsparse.parallel.mesh import check_mesh

    # bad input fails here, with the config's own message, not in the child's traceback
    if not 1 <= devices <= MAX_EMULATED_DEVICES:
        raise ConfigError(f"{devices} emulated devices: must be in [1, {MAX_EMULATED_DEVICES}] "
                          "(all emulated on this one host)")
    cfg = configs.get(config, overrides)
    check_batch_split(cfg, check_mesh(cfg, devices))
    # a ConfigError in the child (a check only the built model makes) comes back as one line
    # of JSON and is raised here as itself: the command prints it, no traceback
    code = (
        "import json, sys; from jaxsparse import configs; from jaxsparse.config import "
        "ConfigError; from jaxsparse.dryrun import dry_run\n"
        "try:\n"
        f"    cfg = configs.get({config!r}, {overrides!r})\n"
        f"    report = dry_run(cfg, compile={compile!r})\n"
        "except ConfigError as err:\n"
        "    print(json.dumps({'config_error': str(err)})); sys.exit(0)\n"
        "print(json.dumps(report))")
    env = emulated_devices_env(devices)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"dry run failed:\n{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if "config_error" in report:
        raise ConfigError(report["config_error"])
    return report


def format_report(report: dict) -> str:
    gib = 2 ** 30
    lines = [f"{report['config']}: {report['params']:,} parameters on {report['devices']} emulated "
             f"devices, mesh {report['mesh']}, preset {report['preset']}, batch {report['batch']} x "
             f"{report['seq_len']} tokens, remat {report['remat']}",
             f"  per device: parameters {report['param_bytes_per_device'] / gib:.3f} GiB, "
             f"optimizer state {report['optimizer_bytes_per_device'] / gib:.3f} GiB"]
    if "compile_seconds" in report:
        lines.append(
            f"  compiled in {report['compile_seconds']} s (lowered in {report['lower_seconds']} s);"
            f" XLA per device: arguments {report.get('compiled_argument_bytes_per_device', 0) / gib:.3f}"
            f" GiB, temporaries {report.get('compiled_temp_bytes_per_device', 0) / gib:.3f} GiB")
        if "flops_per_device" in report:
            lines.append(f"  step FLOPs: {report['flops_per_device']:.4g} per device, "
                         f"{report['flops_per_device'] * report['devices']:.4g} in all "
                         "(loop bodies counted once)")
        collectives = report.get("collectives") or {}
        lines.append("  collectives per step: " + (", ".join(
            f"{name} x{v['count']} ({v['bytes'] / gib:.3f} GiB"
            + (f"; {v['unknown_trips']} in loops of unknown trip count, counted once"
               if v.get("unknown_trips") else "") + ")"
            for name, v in collectives.items()) or "none"))
    return "\n".join(lines)
