"""Grouped matrix multiplication: ``out[rows of group e] = lhs[rows of group e] @ rhs[e]``.

``lhs [m, k]`` holds rows sorted by group, ``group_sizes [E]`` how many rows each group has
(in order; they must sum to at most ``m``, checked when the sizes are concrete), ``rhs [E, k, n]``
one matrix per group. Rows past ``sum(group_sizes)`` give zeros; traced sizes that
sum past ``m`` cannot be checked while tracing: the native kernel then fails when it runs
("group_sizes must be >= 0 and sum to at most the rows of lhs"), the XLA paths use the first
``m`` rows' worth of groups (sizes clipped in order).
This is the expert computation of a dropless mixture-of-experts layer (MegaBlocks, Gale et al.
2022; JAX's megablox ``gmm``).

Implementations:
  ``"dense"``      every row times every group's matrix, masked: O(E m k n); the reference.
  ``"ragged_dot"`` ``jax.lax.ragged_dot`` (XLA's grouped GEMM; on CPU it computes every group
                   densely, so it is no faster than ``"dense"``).
  ``"tiles"``      rows are scattered into tiles of ``tile`` rows that each belong to one group
                   (every group padded to whole tiles, as MegaBlocks does) and a scan over the
                   tiles multiplies each by its group's matrix: O(m k n) plus the padding (at
                   most E tiles), with a custom VJP (the same tiles against ``rhsᵀ`` for
                   d_lhs, per-tile ``rowsᵀ·d_out`` added in place for d_rhs). The CPU path for
                   dtypes other than float32.
  ``"native"``     the C++ kernels of :mod:`jaxsparse.ops.native.grouped_matmul` (float32):
                   one GEMM per group over its own rows, no copies or padding, with a custom
                   VJP (the same kernel against ``rhsᵀ`` for d_lhs, a per-group ``lhsᵀ·d_out``
                   for d_rhs). The default on a CPU-only host for float32.
  ``"pallas"``     the kernels of :mod:`pallas_kernels.grouped_matmul` (Triton on CUDA, Mosaic
                   on TPU; a row tile straddling groups is visited once per group, masked),
                   with a custom VJP (a grouped matmul for d_lhs, a transposed one for d_rhs);
                   chosen by the lowering platform, ``"tiles"`` elsewhere.
  ``"pallas_interpret"`` the GPU kernel in interpret mode (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.ops.checks import is_integer
from jaxsparse.ops.sizes import ceil_div, round_up

GMM_IMPLEMENTATIONS = (None, "dense", "ragged_dot", "tiles", "native", "pallas",
                       "pallas_interpret")
# Tiles (rows, contraction, output columns): Triton wants powers of two; Mosaic wants the
# lane dimension in multiples of 128 and takes the whole contraction dimension in one block.
GPU_TILES = (64, 32, 64)
TPU_TILES = (128, 128, 128)


def _check(lhs, rhs, group_sizes):
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(f"grouped_matmul needs lhs [m, k], rhs [E, k, n], group_sizes [E]; got "
                         f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"lhs [m, k={lhs.shape[1]}] and rhs [E, k={rhs.shape[1]}, n] disagree on k")
    if group_sizes.shape[0] != rhs.shape[0]:
        raise ValueError(f"group_sizes has {group_sizes.shape[0]} groups, rhs has {rhs.shape[0]}")
    if rhs.shape[0] < 1:  # no group to put a row in (and nothing to take a min over below)
        raise ValueError(f"rhs {rhs.shape} and group_sizes {group_sizes.shape} have E=0 groups: "
                         "grouped_matmul needs at least one expert (E >= 1)")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers, got {group_sizes.dtype}")
    for name, x in (("lhs", lhs), ("rhs", rhs)):  # integer products would be truncated
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} has dtype {x.dtype}; needs floating point")
    try:
        sizes = np.asarray(group_sizes)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced: checked by the caller's construction (bincount of routing)
    if (sizes < 0).any() or sizes.sum() > lhs.shape[0]:  # rows past the sum give zeros
        raise ValueError(f"group_sizes must be >= 0 and sum to at most the {lhs.shape[0]} rows "
                         f"of lhs; got sum {int(sizes.sum())}, min {int(sizes.min())}")


def row_groups(group_sizes, m: int):
    """Group of every row (``E`` for rows past the last group)."""
    return jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(m), side="right").astype(jnp.int32)


def _dense(lhs, rhs, group_sizes):
    groups = row_groups(group_sizes, lhs.shape[0])
    out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
    for e in range(rhs.shape[0]):
        prod = jnp.dot(lhs, rhs[e], preferred_element_type=jnp.float32)
        out = out + jnp.where((groups == e)[:, None], prod, 0.0)
    return out.astype(lhs.dtype)


def default_tile(m: int, num_groups: int) -> int:
    """Rows per tile: padding is at most one tile per group, so keep E * tile <= m / 2 (at
    most ~50% extra rows, ~25% on average) but no smaller than 8 rows nor larger than 128."""
    tile = 128
    while tile > 8 and num_groups * tile > m // 2:
        tile //= 2
    return tile


def _tile_layout(group_sizes, m: int, num_groups: int, tile: int):
    """Every group padded to whole tiles: ``(num_tiles, dest, tile_group)`` — the padded row
    of each of the ``m`` rows (``num_tiles * tile`` for rows past the groups) and each tile's
    group."""
    num_tiles = ceil_div(m, tile) + num_groups  # sum_e ceil(size_e / tile) <= m / tile + E
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    padded = round_up(sizes, tile)
    padded_starts = jnp.cumsum(padded) - padded
    groups = row_groups(sizes, m)
    g = jnp.minimum(groups, num_groups - 1)
    dest = jnp.where(groups < num_groups, padded_starts[g] + jnp.arange(m) - starts[g],
                     num_tiles * tile)
    tile_group = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(num_tiles) * tile, side="right")
    tile_group = jnp.minimum(tile_group, num_groups - 1)  # tiles past the end hold zero rows
    return num_tiles, dest, tile_group


def _to_tiles(x, dest, num_tiles: int, tile: int):
    buffer = jnp.zeros((num_tiles * tile, x.shape[1]), x.dtype).at[dest].set(x, mode="drop")
    return buffer.reshape(num_tiles, tile, -1)


def _tile_products(lhs, rhs, group_sizes, tile):
    num_groups = rhs.shape[0]
    num_tiles, dest, tile_group = _tile_layout(group_sizes, lhs.shape[0], num_groups, tile)

    # One tile per step, indexing its group's matrix in place: gathering rhs per tile instead
    # (a batched einsum) copies E * k * n floats per tile and ran 3x slower on CPU.
    def tile_product(_, tile_and_group):
        rows, group = tile_and_group
        w = jax.lax.dynamic_index_in_dim(rhs, group, keepdims=False)
        return None, jnp.dot(rows, w, preferred_element_type=jnp.float32).astype(lhs.dtype)

    _, out = jax.lax.scan(tile_product, None, (_to_tiles(lhs, dest, num_tiles, tile), tile_group))
    return out.reshape(num_tiles * tile, -1).at[dest].get(mode="fill", fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiles_vjp(lhs, rhs, group_sizes, tile):
    return _tile_products(lhs, rhs, group_sizes, tile)


def _tiles_fwd(lhs, rhs, group_sizes, tile):
    return _tile_products(lhs, rhs, group_sizes, tile), (lhs, rhs, group_sizes)


def _tiles_bwd(tile, residuals, d_out):
    # By hand rather than by differentiating the scan, whose backward kept every tile's
    # [k, n] slice of rhs (num_tiles copies of a group's matrix) and scattered into zeros.
    lhs, rhs, group_sizes = residuals
    d_lhs = _tile_products(d_out, jnp.swapaxes(rhs, 1, 2), group_sizes, tile)
    num_tiles, dest, tile_group = _tile_layout(group_sizes, lhs.shape[0], rhs.shape[0], tile)

    def accumulate(d_rhs, tiles_and_group):  # d_rhs[group] += rowsᵀ · d_out rows, in place
        rows, d_rows, group = tiles_and_group
        update = jnp.dot(rows.T, d_rows, preferred_element_type=jnp.float32)
        return d_rhs.at[group].add(update), None

    d_rhs, _ = jax.lax.scan(accumulate, jnp.zeros(rhs.shape, jnp.float32),
                            (_to_tiles(lhs, dest, num_tiles, tile),
                             _to_tiles(d_out, dest, num_tiles, tile), tile_group))
    return d_lhs, d_rhs.astype(rhs.dtype), None


_tiles_vjp.defvjp(_tiles_fwd, _tiles_bwd)


def _tiles(lhs, rhs, group_sizes, tile):
    if tile is None:
        tile = default_tile(lhs.shape[0], rhs.shape[0])
    return _tiles_vjp(lhs, rhs, group_sizes, tile)


def _native_or_tiles(lhs, rhs, group_sizes, tile, *, required: bool):
    """The C++ kernel when lowering for CPU, ``"tiles"`` on other platforms (a program lowered
    for CUDA or TPU never contains the CPU custom call). ``required`` (an explicit
    ``implementation="native"``) turns an unsupported dtype or a failed build into an error."""
    from jaxsparse.ops.native import grouped_matmul as native

    if not native.supports(lhs, rhs):
        if required:
            raise ValueError(f"grouped_matmul(implementation='native') computes in float32; got "
                             f"lhs {lhs.dtype}, rhs {rhs.dtype} (use 'tiles')")
        return _tiles(lhs, rhs, group_sizes, tile)
    if not native.available():
        if required:
            raise RuntimeError("grouped_matmul(implementation='native'): the C++ kernel could not "
                               "be built (see the warning above); use 'tiles'")
        return _tiles(lhs, rhs, group_sizes, tile)
    sizes = group_sizes.astype(jnp.int32)
    return jax.lax.platform_dependent(
        lhs, rhs, sizes, cpu=native.native_grouped_matmul,
        default=lambda lhs, rhs, sizes: _tiles(lhs, rhs, sizes, tile))


def kernel_grouped_matmul(lhs, rhs, group_sizes, *, backend: str, interpret: bool):
    from pallas_kernels.grouped_matmul import gmm, gmm_config

    m, k = lhs.shape
    n = rhs.shape[2]
    tm, tk, tn = GPU_TILES if backend == "gpu" else TPU_TILES
    m_pad, k_pad, n_pad = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    lhs_p = jnp.pad(lhs, ((0, m_pad - m), (0, k_pad - k)))  # padded rows lie past every group
    rhs_p = jnp.pad(rhs, ((0, 0), (0, k_pad - k), (0, n_pad - n)))
    cfg = gmm_config(backend=backend, interpret=interpret, tm=tm, tk=tk, tn=tn)
    return gmm(lhs_p, rhs_p, group_sizes.astype(jnp.int32), cfg)[:m, :n]


def grouped_matmul(lhs, rhs, group_sizes, *, implementation: str | None = None,
                   tile: int | None = None):
    """``[m, n]`` in ``lhs``'s dtype: each group's rows of ``lhs`` times that group's ``rhs``;
    see the module doc.

    ``None`` picks ``"native"`` on a CPU-only host for float32 (``"tiles"`` for other dtypes
    or where the C++ kernel cannot be built) and ``"ragged_dot"`` elsewhere. ``tile``: rows
    per tile of ``"tiles"`` (None: :func:`default_tile`).
    """
    if implementation not in GMM_IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: allowed {GMM_IMPLEMENTATIONS}")
    if tile is not None and (not is_integer(tile) or tile < 1):
        raise ValueError(f"tile={tile!r}: must be an integer >= 1, or None (default_tile)")
    group_sizes = jnp.asarray(group_sizes)  # a list of ints failed with an AttributeError
    _check(lhs, rhs, group_sizes)
    if 0 in (lhs.shape[0], lhs.shape[1], rhs.shape[2]):  # no rows (an empty batch), no
        return _dense(lhs, rhs, group_sizes)  # contraction or no columns: nothing to tile
    if implementation is None and jax.default_backend() != "cpu":
        implementation = "ragged_dot"
    if implementation in (None, "native"):
        return _native_or_tiles(lhs, rhs, group_sizes, tile, required=implementation == "native")
    if implementation == "dense":
        return _dense(lhs, rhs, group_sizes)
    if implementation == "ragged_dot":  # in lhs's dtype, as every other implementation
        return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32)).astype(lhs.dtype)
    if implementation == "pallas_interpret":
        return kernel_grouped_matmul(lhs, rhs, group_sizes, backend="gpu", interpret=True)
    if implementation == "pallas":
        return jax.lax.platform_dependent(
            cuda=lambda: kernel_grouped_matmul(lhs, rhs, group_sizes, backend="gpu", interpret=False),
            tpu=lambda: kernel_grouped_matmul(lhs, rhs, group_sizes, backend="tpu", interpret=False),
            default=lambda: _tiles(lhs, rhs, group_sizes, tile))
    return _tiles(lhs, rhs, group_sizes, tile)
