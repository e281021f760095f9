"""Sharding rule for the native recurrences: XLA knows nothing about a custom call, so on a
multi-device mesh it gathers the call's operands onto every device (a data-parallel dry run
of hydra_1p6b moved 144 GiB per step that way). A first-order scan over ``[batch, L, width]``
is an independent recurrence per (batch row, channel), so it can run on each device's block
of rows and channels unchanged; only the time axis must be whole on a device."""

from __future__ import annotations

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_FACTORS = {3: "b l w", 2: "b w"}


def in_partly_manual_context() -> bool:
    """Whether tracing happens inside a ``shard_map`` that leaves some mesh axes to the
    partitioner (as the sequence-parallel scan does): there the partitioner hands the rule
    shardings it cannot name, so the rule does not apply."""
    mesh = jax.sharding.get_abstract_mesh()
    return bool(mesh.manual_axes) and set(mesh.manual_axes) != set(mesh.axis_names)


def split_over_batch_and_channels(kernel, in_ranks: tuple[int, ...], out_ranks: tuple[int, ...]):
    """``kernel`` (operands and results ``[batch, L, width]`` (rank 3) or ``[batch, width]``
    (rank 2), returning a tuple) as an op the SPMD partitioner splits over ``batch`` and
    ``width`` and gathers over ``L``; on one device, or inside a ``shard_map`` over every
    axis, it is simply ``kernel``. Inside a partly manual ``shard_map`` it is ``kernel``
    without the rule (correct, but gathered over the other axes: the default scan avoids it
    there)."""
    wrapped = custom_partitioning(kernel)

    def call(*operands):
        return kernel(*operands) if in_partly_manual_context() else wrapped(*operands)

    def batch_and_channel_axes(shape):
        spec = tuple(shape.sharding.spec) + (None,) * len(shape.shape)
        return spec[0], spec[len(shape.shape) - 1]

    def shardings(mesh, axes, ranks):
        batch, channels = axes
        return tuple(NamedSharding(mesh, P(batch, None, channels) if rank == 3 else
                                   P(batch, channels)) for rank in ranks)

    def partition(mesh, arg_shapes, result_shape):
        axes = batch_and_channel_axes(result_shape[0])
        return mesh, kernel, shardings(mesh, axes, out_ranks), shardings(mesh, axes, in_ranks)

    def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
        return shardings(mesh, batch_and_channel_axes(arg_shapes[0]), out_ranks)

    rule = (", ".join(_FACTORS[r] for r in in_ranks) + " -> "
            + ", ".join(_FACTORS[r] for r in out_ranks))
    wrapped.def_partition(partition=partition,
                          infer_sharding_from_operands=infer_sharding_from_operands,
                          sharding_rule=rule, need_replication_factors=("l",))
    return call
