"""Sharding rules for the custom kernels: the native CPU kernels here, and the Pallas scan and
Monarch kernels (``jaxsparse.ops.ssm_pallas``, ``linear_scan_pallas``, ``monarch``), whose
custom VJPs take these rules as a hook. XLA knows nothing about a custom call, so on a
multi-device mesh it gathers the call's operands onto every device (a data-parallel dry run of
hydra_1p6b moved 144 GiB per step that way; mamba_tiny and monarch_tiny on 4 devices gathered
their activations too). The kernels here work row by row, so each device can run them on its
own rows unchanged:

- :func:`split_over_batch_and_channels`: first-order scans over ``[batch, L, width]`` — an
  independent recurrence per (batch row, channel); only the time axis must be whole.
- :func:`split_over_rows`: kernels whose operands and results are either split by rows (dim 0:
  batch rows, tokens) or whole (weights); results that sum over the rows (weight gradients)
  are summed across the devices that hold the rows.

A dimension whose split would not be even is kept whole (padding rows would enter the summed
weight gradients). On one device, or inside a ``shard_map`` over every mesh axis, the wrapped
kernel is called as is; under ``vmap`` too (the rules cannot be batched). Inside a partly
manual ``shard_map`` (the sequence-parallel scans: manual over ``sequence`` only) the
partitioner hands the rules shardings they cannot name, so the kernel is called without a rule
there (correct, but gathered over the other axes: the default paths avoid the kernels in that
context, see :func:`in_partly_manual_context`)."""

from __future__ import annotations

import functools

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ROWS, WHOLE, ROW_SUM = "rows", "whole", "row_sum"
ROWS_LAST = "rows_last"  # split over the rows like ROWS, with the rows on the last dimension


def in_partly_manual_context() -> bool:
    """Whether tracing happens inside a ``shard_map`` that leaves some mesh axes to the
    partitioner."""
    mesh = jax.sharding.get_abstract_mesh()
    return bool(mesh.manual_axes) and set(mesh.manual_axes) != set(mesh.axis_names)


def _axis_names(axes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _even_split(mesh, shape, dim: int):
    """The mesh axes splitting ``shape``'s dimension ``dim`` if they split it evenly, else
    None (whole)."""
    axes = (tuple(shape.sharding.spec) + (None,) * len(shape.shape))[dim]
    size = 1
    for name in _axis_names(axes):
        size *= mesh.shape[name]
    return axes if axes is not None and shape.shape[dim] % size == 0 else None


def _batchable(kernel, with_rule):
    """``with_rule(*operands)`` (a ``custom_partitioning`` op, which ``vmap`` cannot batch)
    under a ``vmap`` rule that maps ``kernel`` itself (the FFI calls loop over the mapped
    axis); inside a partly manual ``shard_map``, ``kernel`` without the rule."""

    @jax.custom_batching.custom_vmap
    def call(*operands):
        return kernel(*operands) if in_partly_manual_context() else with_rule(*operands)

    @call.def_vmap
    def _(axis_size, in_batched, *operands):
        results = jax.vmap(kernel, in_axes=tuple(0 if b else None for b in in_batched),
                           axis_size=axis_size)(*operands)
        return results, jax.tree.map(lambda _: True, results)

    return call


def split_over_batch_and_channels(kernel, in_ranks: tuple[int, ...], out_ranks: tuple[int, ...]):
    """``kernel`` (operands and results ``[batch, L, width]`` (rank 3) or ``[batch, width]``
    (rank 2), returning a tuple) as an op the SPMD partitioner splits over ``batch`` and
    ``width`` and gathers over ``L``."""
    factors = {3: "b l w", 2: "b w"}
    wrapped = custom_partitioning(kernel)

    def batch_and_channel_axes(mesh, shape):
        return _even_split(mesh, shape, 0), _even_split(mesh, shape, len(shape.shape) - 1)

    def shardings(mesh, axes, ranks):
        batch, channels = axes
        return tuple(NamedSharding(mesh, P(batch, None, channels) if rank == 3 else
                                   P(batch, channels)) for rank in ranks)

    def partition(mesh, arg_shapes, result_shape):
        axes = batch_and_channel_axes(mesh, result_shape[0])
        return mesh, kernel, shardings(mesh, axes, out_ranks), shardings(mesh, axes, in_ranks)

    def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
        return shardings(mesh, batch_and_channel_axes(mesh, arg_shapes[0]), out_ranks)

    rule = (", ".join(factors[r] for r in in_ranks) + " -> "
            + ", ".join(factors[r] for r in out_ranks))
    wrapped.def_partition(partition=partition,
                          infer_sharding_from_operands=infer_sharding_from_operands,
                          sharding_rule=rule, need_replication_factors=("l",))
    return _batchable(kernel, wrapped)


def split_over_rows(kernel, operand_kinds: tuple[str, ...], result_kinds: tuple[str, ...]):
    """``kernel`` (returning a tuple) as an op the partitioner splits over dim 0 of its
    ``ROWS`` operands and results (the last dim of ``ROWS_LAST`` ones: a transposed layout);
    ``WHOLE`` operands are gathered (weights: small), and each ``ROW_SUM`` result (a sum over
    the rows) is summed over the devices holding the rows."""
    if ROWS not in operand_kinds:
        raise ValueError(f"operand_kinds={operand_kinds}: at least one must be {ROWS!r}")

    @functools.cache
    def with_rule(in_ranks: tuple[int, ...], out_ranks: tuple[int, ...]):
        wrapped = custom_partitioning(kernel)
        first_rows = operand_kinds.index(ROWS)

        def spec(kind, rank, rows):
            if kind == ROWS_LAST:
                return P(*(None,) * (rank - 1), rows)
            return P(rows) if kind == ROWS else P()

        def shardings(mesh, rows, kinds, ranks):
            return tuple(NamedSharding(mesh, spec(kind, rank, rows))
                         for kind, rank in zip(kinds, ranks))

        def partition(mesh, arg_shapes, result_shape):
            rows = _even_split(mesh, arg_shapes[first_rows], 0)
            axes = _axis_names(rows)

            def per_device(*operands):
                results = kernel(*operands)
                return tuple(jax.lax.psum(r, axes) if kind == ROW_SUM and axes else r
                             for kind, r in zip(result_kinds, results))

            return (mesh, per_device, shardings(mesh, rows, result_kinds, out_ranks),
                    shardings(mesh, rows, operand_kinds, in_ranks))

        def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
            return shardings(mesh, _even_split(mesh, arg_shapes[first_rows], 0), result_kinds,
                             out_ranks)

        # Shardy rule: factor r is the rows; every other dimension is its own factor, kept whole
        names, whole = iter(f"d{i}" for i in range(10_000)), []

        def dims(kind, rank):
            own = [next(names) for _ in range(rank - (kind in (ROWS, ROWS_LAST)))]
            whole.extend(own)
            if kind == ROWS_LAST:
                return " ".join(own + ["r"])
            return " ".join((["r"] if kind == ROWS else []) + own)

        rule = (", ".join(dims(k, r) for k, r in zip(operand_kinds, in_ranks)) + " -> "
                + ", ".join(dims(k, r) for k, r in zip(result_kinds, out_ranks)))
        wrapped.def_partition(partition=partition,
                              infer_sharding_from_operands=infer_sharding_from_operands,
                              sharding_rule=rule, need_replication_factors=tuple(whole))
        return wrapped

    def with_rule_for(*operands):
        results = jax.eval_shape(kernel, *operands)
        return with_rule(tuple(o.ndim for o in operands), tuple(r.ndim for r in results))(*operands)

    return _batchable(kernel, with_rule_for)
