"""Meshes, logical-axis sharding rules and presets, and multi-host helpers."""

from jaxsparse.parallel.mesh import check_batch_split, make_mesh, mesh_shape
from jaxsparse.parallel.ragged import ragged_all_to_all
from jaxsparse.parallel.rules import (
    DEFAULT_RULES,
    PRESETS,
    ShardingPreset,
    activation_sharding,
    constrain,
    current_mesh,
    current_rules,
    get_preset,
    logical_to_spec,
    param_shardings,
    rule_mesh_axes,
    sequence_axis_size,
)

__all__ = [
    "DEFAULT_RULES", "PRESETS", "ShardingPreset", "activation_sharding", "check_batch_split",
    "constrain", "current_mesh", "current_rules", "get_preset", "logical_to_spec", "make_mesh",
    "mesh_shape",
    "param_shardings", "ragged_all_to_all", "rule_mesh_axes", "sequence_axis_size",
]
