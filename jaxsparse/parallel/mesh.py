"""Device meshes built from :class:`~jaxsparse.config.MeshConfig`."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from jaxsparse.config import Config, ConfigError, MeshConfig

# Outermost to innermost: neighbouring devices (the fastest links) share the tensor axis, then
# the sequence axis (its ring exchange talks only to neighbours).
AXES = ("data", "fsdp", "expert", "sequence", "tensor")


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Resolve the ``-1`` axis and check that the sizes multiply to ``num_devices``."""
    sizes = {axis: getattr(mesh_cfg, axis) for axis in AXES}
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


def check_batch_split(cfg: Config, sizes: dict[str, int], processes: int = 1) -> None:
    """Refuse a global batch that the data-parallel axes of ``sizes`` (the preset's ``batch``
    rule) or the ``processes`` cannot split evenly."""
    from jaxsparse.parallel.rules import get_preset

    batch_axes = dict(get_preset(cfg.mesh.preset).rules)["batch"]
    dp = int(np.prod([sizes.get(axis, 1) for axis in batch_axes]))
    if cfg.data.batch_size % dp:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by the data-parallel size "
            f"{dp} (mesh " + " x ".join(f"{a}={sizes.get(a)}" for a in batch_axes)
            + f", preset {cfg.mesh.preset!r}); use a multiple of {dp}")
    if cfg.data.batch_size % processes:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by the "
                          f"{processes} processes")


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(mesh_cfg, len(devices))
    grid = np.asarray(devices).reshape(tuple(sizes[a] for a in AXES))
    return Mesh(grid, AXES)
