"""Grouped matrix multiplication for TPUs (Pallas, Mosaic): ``gmm`` and ``tgmm``.

Same contract as :mod:`pallas_kernels.grouped_matmul`. The innermost grid axis walks a list
of visits, (row tile, group) pairs in row order, scalar-prefetched into SMEM so each step's
BlockSpecs fetch exactly that tile and that group's matrix (the megablox scheme). ``gmm``
accumulates a row tile over its consecutive visits in VMEM scratch; ``tgmm`` accumulates a
group's ``lhs^T d_out`` over its consecutive visits. Padding visits (the list has a static
length) repeat the last real one and are skipped. Tiles: ``tm`` rows (multiple of 8), the
full contraction dimension (padded to 128), ``tn``/``tk`` output columns (multiples of 128).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.grouped_matmul import check_gmm, check_tgmm, tile_groups

f32 = jnp.float32
_NN = (((1,), (0,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


def visits(group_sizes, num_tiles: int, tm: int):
    """``(tile [V], group [V], count [1])``: every (row tile, overlapped group) pair in row
    order, a tile without rows visited once (to write its zeros); ``V = tiles + E - 1``."""
    first, last, starts, ends = tile_groups(group_sizes, num_tiles, tm)
    per_tile = jnp.maximum(last - first + 1, 1)
    offsets = jnp.cumsum(per_tile) - per_tile
    count = jnp.sum(per_tile)
    max_visits = num_tiles + group_sizes.shape[0] - 1
    v = jnp.minimum(jnp.arange(max_visits, dtype=jnp.int32), count - 1)  # pad: repeat the last
    tile = (jnp.searchsorted(jnp.cumsum(per_tile), v, side="right")).astype(jnp.int32)
    group = jnp.minimum(first[tile] + v - offsets[tile], group_sizes.shape[0] - 1)
    return tile, group.astype(jnp.int32), count[None].astype(jnp.int32), starts, ends


def _boundaries(key_ref, v, num_visits):
    """Is visit ``v`` the first / last of a run of equal ``key_ref`` entries?"""
    prev = key_ref[jnp.maximum(v - 1, 0)]
    nxt = key_ref[jnp.minimum(v + 1, num_visits - 1)]
    return (v == 0) | (prev != key_ref[v]), (v == num_visits - 1) | (nxt != key_ref[v])


def _accumulating_kernel(tile_ref, group_ref, count_ref, starts_ref, ends_ref, lhs_ref, other_ref,
                         out_ref, acc_ref, *, tm, num_visits, run_key, dims):
    """One visit: ``acc += dot(masked lhs tile, other)``; the accumulator is zeroed at the
    first visit of a run of equal ``run_key`` entries (a row tile for gmm, a group for tgmm)
    and written out at the last."""
    v = pl.program_id(2 if run_key == "group" else 1)  # the visit axis is innermost
    key_ref = group_ref if run_key == "group" else tile_ref
    first, last = _boundaries(key_ref, v, num_visits)

    @pl.when(first)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(v < count_ref[0])
    def _():
        g = group_ref[v]
        rows = tile_ref[v] * tm + jax.lax.broadcasted_iota(jnp.int32, lhs_ref.shape, 0)
        in_group = (rows >= starts_ref[g]) & (rows < ends_ref[g])
        a = jnp.where(in_group, lhs_ref[...], 0)
        acc_ref[...] += jax.lax.dot_general(a, other_ref[...], dims, preferred_element_type=f32)

    @pl.when(last)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def gmm(lhs, rhs, group_sizes, cfg):
    check_gmm(lhs, rhs, group_sizes, cfg, "grouped_matmul_tpu.gmm")
    m, k = lhs.shape
    num_groups, _, n = rhs.shape
    tile, group, count, starts, ends = visits(group_sizes, m // cfg.tm, cfg.tm)
    num_visits = tile.shape[0]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5, grid=(n // cfg.tn, num_visits),
        in_specs=[pl.BlockSpec((cfg.tm, k), lambda j, v, t, g, *_: (t[v], 0)),
                  pl.BlockSpec((None, k, cfg.tn), lambda j, v, t, g, *_: (g[v], 0, j))],
        out_specs=pl.BlockSpec((cfg.tm, cfg.tn), lambda j, v, t, g, *_: (t[v], j)),
        scratch_shapes=[pltpu.VMEM((cfg.tm, cfg.tn), f32)])
    return pl.pallas_call(
        functools.partial(_accumulating_kernel, tm=cfg.tm, num_visits=num_visits,
                          run_key="tile", dims=_NN), grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((m, n), lhs.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=cfg.interpret, name="grouped_matmul_tpu",
    )(tile, group, count, starts, ends, lhs, rhs)


def tgmm(lhs, dout, group_sizes, cfg):
    check_tgmm(lhs, dout, group_sizes, cfg, "grouped_matmul_tpu.tgmm")
    m, k = lhs.shape
    n = dout.shape[1]
    num_groups = group_sizes.shape[0]
    tile, group, count, starts, ends = visits(group_sizes, m // cfg.tm, cfg.tm)
    num_visits = tile.shape[0]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5, grid=(k // cfg.tk, n // cfg.tn, num_visits),
        in_specs=[pl.BlockSpec((cfg.tm, cfg.tk), lambda a, b, v, t, g, *_: (t[v], a)),
                  pl.BlockSpec((cfg.tm, cfg.tn), lambda a, b, v, t, g, *_: (t[v], b))],
        out_specs=pl.BlockSpec((None, cfg.tk, cfg.tn), lambda a, b, v, t, g, *_: (g[v], a, b)),
        scratch_shapes=[pltpu.VMEM((cfg.tk, cfg.tn), f32)])
    return pl.pallas_call(
        functools.partial(_accumulating_kernel, tm=cfg.tm, num_visits=num_visits,
                          run_key="group", dims=_TN), grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), f32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret, name="grouped_matmul_transposed_tpu",
    )(tile, group, count, starts, ends, lhs, dout)
