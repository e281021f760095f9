"""Logical axis names -> mesh axes, as data (DESIGN.md section 4).

Layers annotate parameters (``nnx.Param(..., logical_axes=(...))``) and activations
(:func:`constrain`) with logical names only; the table below decides which mesh axes they are
split over. A mesh axis is dropped for a dimension it does not divide, that another dimension
of the same array already uses, or that has size 1, so any rule table is safe for any shape.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# logical name -> mesh axis or tuple of mesh axes (None: replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),  # expert parallelism also splits the tokens
    ("expert", "expert"),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("layers", None),
    ("monarch_blocks", "fsdp"),  # the block dimension of Monarch factors
)


def logical_to_spec(names, shape, mesh: Mesh, rules=DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` whose dims carry logical ``names``."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        chosen = []
        size = 1
        for axis in axes:
            if axis not in mesh.shape or axis in used or mesh.shape[axis] == 1:
                continue
            if dim % (size * mesh.shape[axis]):
                continue
            chosen.append(axis)
            size *= mesh.shape[axis]
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """A pure dict of NamedShardings mirroring ``nnx.to_pure_dict(abstract_state)``."""

    def one(variable):
        names = variable.get_metadata().get("logical_axes") or (None,) * variable.get_value().ndim
        if len(names) != variable.get_value().ndim:
            raise ValueError(f"logical_axes {names} do not match shape {variable.get_value().shape}")
        return NamedSharding(mesh, logical_to_spec(names, variable.get_value().shape, mesh, rules))

    shardings = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings) if isinstance(shardings, nnx.State) else shardings


# The mesh and rules that activation constraints refer to while a step is being traced.
_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("jaxsparse_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules=DEFAULT_RULES):
    """Within this context, :func:`constrain` pins activations to ``mesh`` by ``rules``."""
    token = _CONTEXT.set((mesh, rules) if mesh is not None else None)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_mesh() -> Mesh | None:
    """The mesh of the enclosing :func:`activation_sharding`, if any."""
    context = _CONTEXT.get()
    return None if context is None else context[0]


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside :func:`activation_sharding`."""
    context = _CONTEXT.get()
    if context is None:
        return x
    mesh, rules = context
    if mesh.size == 1:
        return x
    spec = logical_to_spec(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
