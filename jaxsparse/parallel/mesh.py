"""Device meshes built from :class:`~jaxsparse.config.MeshConfig`."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from jaxsparse.config import ConfigError, MeshConfig

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


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(mesh_cfg, len(devices))
    grid = np.asarray(devices).reshape(tuple(sizes[a] for a in AXES))
    return Mesh(grid, AXES)
