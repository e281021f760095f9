"""Device meshes built from :class:`~jaxsparse.config.MeshConfig`."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxsparse.config import Config, ConfigError, MeshConfig, check_mesh_sizes

# Outermost to innermost: neighbouring devices (the fastest links) share the tensor axis, then
# the sequence axis (its ring exchange talks only to neighbours).
AXES = ("data", "fsdp", "expert", "sequence", "tensor")


def axis_sizes(mesh_cfg: MeshConfig) -> dict[str, int]:
    """The configured size of every axis, each an integer >= 1 or -1 ("the rest"), at most one
    -1; anything else is a ConfigError naming the axis."""
    sizes = {}
    for axis in AXES:
        size = getattr(mesh_cfg, axis)
        # bool is an int to Python, and a float or a string would fail later in numpy
        if isinstance(size, bool) or not isinstance(size, int | np.integer):
            raise ConfigError(f"mesh.{axis}={size!r}: must be an integer (>= 1, or -1 for "
                              f"'the rest'), not {type(size).__name__}")
        if size < 1 and size != -1:
            raise ConfigError(f"mesh.{axis}={size}: must be >= 1, or -1 for 'the rest'")
        sizes[axis] = int(size)
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {sizes}")
    return sizes


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Check the axis sizes (:func:`axis_sizes`), resolve the ``-1`` axis and check that the
    sizes multiply to ``num_devices``."""
    sizes = axis_sizes(mesh_cfg)
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if -1 in sizes.values():
        if num_devices % fixed:
            raise ConfigError(
                f"mesh {sizes}: the fixed axes multiply to {fixed}, which does not divide the "
                f"{num_devices} available devices"
            )
        sizes = {a: (num_devices // fixed if s == -1 else s) for a, s in sizes.items()}
    elif fixed != num_devices:
        raise ConfigError(
            f"mesh {sizes} needs {fixed} devices but {num_devices} are available; "
            "set one axis to -1 to absorb the rest"
        )
    return sizes


def check_mesh(cfg: Config, num_devices: int) -> dict[str, int]:
    """:func:`mesh_shape` of ``cfg.mesh`` on ``num_devices``, then the config's mesh checks
    (:func:`jaxsparse.config.check_mesh_sizes`) on the resolved sizes: ``validate`` cannot
    check the size of a ``-1`` axis, which is only known here."""
    sizes = mesh_shape(cfg.mesh, num_devices)
    try:
        check_mesh_sizes(cfg.model, cfg.data, cfg.mesh.preset, sizes)
    except ConfigError as err:
        rest = [a for a in AXES if getattr(cfg.mesh, a) == -1]
        if not rest:
            raise
        raise ConfigError(f"{err}; here mesh.{rest[0]}=-1 is {sizes[rest[0]]}, the rest of "
                          f"{num_devices} devices") from None
    return sizes


def check_batch_split(cfg: Config, sizes: dict[str, int], processes: int = 1) -> None:
    """Refuse a global batch that the data-parallel axes of ``sizes`` (the preset's ``batch``
    rule) cannot split evenly.

    The processes need no check of their own: each reads the rows its devices hold
    (:func:`process_rows`), a whole number of the data-parallel shards, or all of the batch
    when it is not split across processes (a tensor or sequence axis spanning them), so any
    number of processes works. ``processes`` is accepted for callers that pass it."""
    from jaxsparse.parallel.rules import get_preset

    del processes
    batch_axes = dict(get_preset(cfg.mesh.preset).rules)["batch"]
    dp = int(np.prod([sizes.get(axis, 1) for axis in batch_axes]))
    if cfg.data.batch_size % dp:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by the data-parallel size "
            f"{dp} (mesh " + " x ".join(f"{a}={sizes.get(a)}" for a in batch_axes)
            + f", preset {cfg.mesh.preset!r}); use a multiple of {dp}")


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...],
                 devices=None) -> tuple[int, int]:
    """``(start, stop)``: the rows (dimension 0) of an array of ``global_shape`` laid out by
    ``sharding`` that ``devices`` (default: this process's devices in the sharding) hold, i.e.
    the rows :func:`jax.make_array_from_process_local_data` expects this process to supply.
    That is every row when the batch is not split across processes (a tensor or sequence axis
    spans them), a part of them when it is.

    Rows that are not one contiguous range (a mesh whose device order interleaves the
    processes along its batch axes) are a ConfigError naming the mesh."""
    devices = list(sharding.addressable_devices if devices is None else devices)
    indices = sharding.devices_indices_map(tuple(global_shape))
    held = np.zeros(global_shape[0], bool)
    for device in devices:
        held[indices[device][0]] = True
    rows = np.flatnonzero(held)
    mesh = getattr(sharding, "mesh", None)
    where = (f"mesh {dict(mesh.shape)}, batch sharding {sharding.spec}" if mesh is not None
             else f"sharding {sharding}")
    if rows.size == 0:
        raise ConfigError(f"the devices {devices} hold no rows of the global batch "
                          f"({where})")
    start, stop = int(rows[0]), int(rows[-1]) + 1
    if rows.size != stop - start:
        runs = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
        parts = ", ".join(f"[{int(r[0])}, {int(r[-1]) + 1})" for r in runs)
        raise ConfigError(
            f"the devices of process {devices[0].process_index} hold rows {parts} of the "
            f"{global_shape[0]}-row global batch, not one contiguous range ({where}): each "
            "process reads one range of rows. Order the mesh's devices so that each process's "
            "devices are neighbours along the batch axes (jax.devices() order does)")
    return start, stop


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(mesh_cfg, len(devices))
    grid = np.asarray(devices).reshape(tuple(sizes[a] for a in AXES))
    return Mesh(grid, AXES)
