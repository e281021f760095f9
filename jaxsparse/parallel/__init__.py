"""Meshes, logical-axis sharding rules and multi-host helpers."""

from jaxsparse.parallel.mesh import make_mesh, mesh_shape
from jaxsparse.parallel.rules import (
    DEFAULT_RULES,
    activation_sharding,
    constrain,
    current_mesh,
    logical_to_spec,
    param_shardings,
)

__all__ = [
    "DEFAULT_RULES", "activation_sharding", "constrain", "current_mesh", "logical_to_spec", "make_mesh",
    "mesh_shape", "param_shardings",
]
