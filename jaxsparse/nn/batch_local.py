"""Per-device computation on the rows of the batch each device holds.

Under data or FSDP parallelism the compiler partitions most layers by the batch on its own.
Layers built on sorts, top-k and gathers over all tokens (MoE dispatch, product-key memory
reads) are the exception: it tends to gather the global batch onto every device first. Running
them inside ``jax.shard_map`` over the batch axes keeps them local.

Under tensor parallelism the residual stream is replicated over the axes that split the
hidden widths (``mlp``, ``heads``). A layer that is not itself split over them (the MoE
dispatch, the product-key memory, Hydra's workspace) would repeat the same work on each of
their devices; :func:`row_shard_axes` adds them to the row split instead, so each device takes
a slice of its rows and the outputs are gathered after.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsparse.parallel import current_mesh, current_rules, logical_to_spec


def token_shard_axes(mesh, batch: int) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split the batch of a ``[batch, ...]`` activation."""
    spec = logical_to_spec(("batch",), (batch,), mesh, current_rules())[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return tuple(axis for axis in axes if mesh.shape[axis] > 1)


def _rule_axes(logical: str) -> tuple[str, ...]:
    axes = dict(current_rules()).get(logical)
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def row_shard_axes(mesh, batch: int) -> tuple[str, ...]:
    """The mesh axes that split the rows of a per-row layer: the batch axes
    (:func:`token_shard_axes`), then each axis of tensor parallelism (the mesh axes of the
    logical ``mlp`` and ``heads``) over which the rows are replicated, as long as the rows
    divide. Every row is then computed on exactly one device of each replica group."""
    axes = token_shard_axes(mesh, batch)
    split = math.prod(mesh.shape[axis] for axis in axes)
    for axis in _rule_axes("mlp") + _rule_axes("heads"):
        size = mesh.shape.get(axis, 1)
        if size > 1 and axis not in axes and batch % (split * size) == 0:
            axes, split = axes + (axis,), split * size
    return axes


def batch_local(module, x_BLD, method: str = "__call__"):
    """``module.method(x)`` with each device computing its own rows of the batch (split over
    :func:`row_shard_axes`).

    For per-row layers whose internals (top-k over product keys, gathers from a table) the
    compiler would otherwise partition by gathering the global batch onto every device. The
    module's state enters ``shard_map`` whole (FSDP-split parameters are gathered, as for any
    layer); gradients flow back through it. Outside a mesh with a split batch: a plain call.
    Modules that write state during the call (sown values, counters) are not supported."""
    mesh = current_mesh()
    axes = () if mesh is None else row_shard_axes(mesh, x_BLD.shape[0])
    if not axes:
        return getattr(module, method)(x_BLD)
    graphdef, state = nnx.split(module)

    def local(state, x_BLD):
        return getattr(nnx.merge(graphdef, state), method)(x_BLD)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes)), out_specs=P(axes),
                         check_vma=False)(state, x_BLD)
