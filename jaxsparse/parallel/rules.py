"""Logical axis names -> mesh axes, as data (DESIGN.md section 4).

Layers annotate parameters (``nnx.Param(..., logical_axes=(...))``) and activations
(:func:`constrain`) with logical names only; the table below decides which mesh axes they are
split over. A mesh axis is dropped for a dimension it does not divide, that another dimension
of the same array already uses, or that has size 1, so any rule table is safe for any shape.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


@dataclasses.dataclass(frozen=True)
class ShardingPreset:
    """A named strategy: which mesh axes it uses and the logical-name rules that use them."""

    name: str
    description: str
    axes: tuple[str, ...]  # mesh axes this preset may split over (others must have size 1)
    rules: Rules  # logical name -> mesh axis or tuple of mesh axes (None: replicated)


def _rules(*, fsdp=False, tensor=False, expert=False, sequence=False) -> Rules:
    batch = ("data",) + (("fsdp",) if fsdp else ()) + (("expert",) if expert else ())
    tp = "tensor" if tensor else None
    return (
        ("batch", batch),  # expert parallelism also splits the tokens
        ("expert", "expert" if expert else None),
        ("length", "sequence" if sequence else None),
        ("embed", "fsdp" if fsdp else None),
        ("vocab", tp),
        ("mlp", tp),
        ("heads", tp),
        ("kv_heads", tp),
        ("kv", None),
        ("layers", None),
        ("monarch_blocks", "fsdp" if fsdp else None),  # the block dimension of Monarch factors
    )


PRESETS: dict[str, ShardingPreset] = {p.name: p for p in (
    ShardingPreset("data", "pure data parallel: parameters replicated, batch split over data",
                   ("data",), _rules()),
    ShardingPreset("fsdp", "ZeRO-3 style: parameters and optimiser state split over fsdp "
                   "(gathered per layer), batch over data x fsdp", ("data", "fsdp"),
                   _rules(fsdp=True)),
    ShardingPreset("fsdp_tp", "FSDP + tensor parallel: heads, MLP hidden and vocab split over "
                   "tensor (Megatron-style)", ("data", "fsdp", "tensor"),
                   _rules(fsdp=True, tensor=True)),
    ShardingPreset("fsdp_tp_ep", "FSDP + tensor + expert parallel: MoE experts split over "
                   "expert, tokens exchanged by all-to-all", ("data", "fsdp", "expert", "tensor"),
                   _rules(fsdp=True, tensor=True, expert=True)),
    ShardingPreset("fsdp_tp_sp", "FSDP + tensor + sequence/context parallel: activations split "
                   "along length; attention by a ring exchange of K/V blocks, SSM scans pass "
                   "their chunk states across shards", ("data", "fsdp", "sequence", "tensor"),
                   _rules(fsdp=True, tensor=True, sequence=True)),
    ShardingPreset("full", "every axis: data x fsdp x expert x sequence x tensor (the default; "
                   "axes of size 1 drop out)", ("data", "fsdp", "expert", "sequence", "tensor"),
                   _rules(fsdp=True, tensor=True, expert=True, sequence=True)),
)}
DEFAULT_PRESET = "full"
DEFAULT_RULES: Rules = PRESETS[DEFAULT_PRESET].rules


def get_preset(name: str) -> ShardingPreset:
    if name not in PRESETS:
        raise ValueError(f"mesh.preset={name!r} is not a sharding preset; allowed: "
                         f"{', '.join(PRESETS)}")
    return PRESETS[name]


def describe(name: str) -> str:
    """The preset as a readable table (``jaxsparse configs --sharding NAME``)."""
    preset = get_preset(name)
    lines = [f"{preset.name}: {preset.description}", f"mesh axes: {', '.join(preset.axes)}",
             f"{'logical name':<16} mesh axes"]
    for logical, axes in preset.rules:
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        lines.append(f"{logical:<16} {' x '.join(axes) if axes else '(replicated)'}")
    return "\n".join(lines)


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


def current_rules() -> Rules:
    """The rules of the enclosing :func:`activation_sharding` (the default table outside)."""
    context = _CONTEXT.get()
    return DEFAULT_RULES if context is None else context[1]


def rule_mesh_axes(logical: str, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that the current rules map ``logical`` to."""
    axes = dict(current_rules()).get(logical)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(axis for axis in axes if mesh.shape.get(axis, 1) > 1)


def sequence_axis_size() -> int:
    """How many shards the ``length`` of activations is split into (1: not split)."""
    mesh = current_mesh()
    if mesh is None:
        return 1
    size = 1
    for axis in rule_mesh_axes("length", mesh):
        size *= mesh.shape[axis]
    return size


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside :func:`activation_sharding`."""
    context = _CONTEXT.get()
    if context is None:
        return x
    mesh, rules = context
    if mesh.size == 1 or jax.sharding.get_abstract_mesh().manual_axes:
        return x  # inside shard_map the layout is spelled out by its specs
    spec = logical_to_spec(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
