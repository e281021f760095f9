"""Grouped matrix multiplication as Pallas kernels (GPU via Triton here, TPU via Mosaic in
:mod:`pallas_kernels.grouped_matmul_tpu`), with a ``custom_vjp``.

``gmm(lhs [m, k], rhs [E, k, n], group_sizes [E]) -> [m, n]``: rows of ``lhs`` are sorted by
group; each group's rows are multiplied by that group's matrix; rows past the last group give
zeros. The backward pass is ``d_lhs = gmm(d_out, rhs^T)`` and ``d_rhs = tgmm(lhs, d_out)``,
the per-group ``lhs_g^T @ d_out_g`` (zeros for an empty group), as in megablox (Gale et al.'s
MegaBlocks for TPU in JAX).

Row tiles of ``tm`` rows may straddle group boundaries: a tile is visited once per group it
overlaps, with the rows of other groups masked to zero, so group sizes need not be multiples
of anything. Kernels see arrays padded to whole tiles; the wrapper pads and slices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _checks
from pallas_kernels._flash_vjp import KernelConfig

f32 = jnp.float32


def tile_groups(group_sizes, num_tiles: int, tm: int):
    """Per row tile, the first and last group it overlaps (last < first: a tile of no rows);
    per group, its row range ``[starts, ends)``, cut at the ``num_tiles * tm`` rows there are
    (traced sizes may sum past them, as the other implementations allow: groups end with
    the rows; uncut, the transposed kernel read tiles past the last and wrapped around)."""
    rows = num_tiles * tm
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.minimum(jnp.cumsum(sizes), rows)
    starts = jnp.minimum(jnp.cumsum(sizes) - sizes, rows)
    total = ends[-1]
    tile_start = jnp.arange(num_tiles, dtype=jnp.int32) * tm
    tile_last_row = jnp.minimum(tile_start + tm, total) - 1
    first = jnp.searchsorted(ends, tile_start, side="right").astype(jnp.int32)
    last = jnp.searchsorted(ends, tile_last_row, side="right").astype(jnp.int32)
    last = jnp.where(tile_start < total, last, first - 1)
    return first, last, starts, ends


def _row_mask(rows, starts_ref, ends_ref, g):
    return (rows >= starts_ref[g]) & (rows < ends_ref[g])


# --- GPU (Triton) -----------------------------------------------------------------------------


def _gpu_gmm_kernel(first_ref, last_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *,
                    tm, tk, k_blocks):
    i = pl.program_id(0)
    rows = i * tm + jnp.arange(tm)

    def per_group(g, acc):
        in_group = _row_mask(rows, starts_ref, ends_ref, g)

        def per_k(kk, acc):
            cols = pl.ds(pl.multiple_of(kk * tk, tk), tk)
            a = jnp.where(in_group[:, None], lhs_ref[:, cols], 0)
            return acc + jax.lax.dot_general(a, rhs_ref[g, cols, :], (((1,), (0,)), ((), ())),
                                             preferred_element_type=f32)
        return jax.lax.fori_loop(0, k_blocks, per_k, acc)

    acc = jax.lax.fori_loop(first_ref[i], last_ref[i] + 1, per_group,
                            jnp.zeros(out_ref.shape, f32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _gpu_tgmm_kernel(starts_ref, ends_ref, lhs_ref, dout_ref, out_ref, *, tm):
    g = pl.program_id(0)
    start, end = starts_ref[g], ends_ref[g]

    def per_tile(t, acc):
        rows = t * tm + jnp.arange(tm)
        in_group = (rows >= start) & (rows < end)
        row_slice = pl.ds(pl.multiple_of(t * tm, tm), tm)
        a = jnp.where(in_group[:, None], lhs_ref[row_slice, :], 0)
        return acc + jax.lax.dot_general(a, dout_ref[row_slice, :], (((0,), (0,)), ((), ())),
                                         preferred_element_type=f32)

    acc = jax.lax.fori_loop(start // tm, (end + tm - 1) // tm, per_tile,
                            jnp.zeros(out_ref.shape, f32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _gpu_gmm(lhs, rhs, group_sizes, cfg):
    m, k = lhs.shape
    num_groups, _, n = rhs.shape
    num_tiles = m // cfg.tm
    first, last, starts, ends = tile_groups(group_sizes, num_tiles, cfg.tm)
    scalars = [pl.BlockSpec((num_tiles,), lambda i, j: (0,))] * 2 + \
              [pl.BlockSpec((num_groups,), lambda i, j: (0,))] * 2
    return pl.pallas_call(
        functools.partial(_gpu_gmm_kernel, tm=cfg.tm, tk=cfg.tk, k_blocks=k // cfg.tk),
        grid=(num_tiles, n // cfg.tn),
        in_specs=scalars + [pl.BlockSpec((cfg.tm, k), lambda i, j: (i, 0)),
                            pl.BlockSpec((num_groups, k, cfg.tn), lambda i, j: (0, 0, j))],
        out_specs=pl.BlockSpec((cfg.tm, cfg.tn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), lhs.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=cfg.interpret, name="grouped_matmul",
    )(first, last, starts, ends, lhs, rhs)


def _gpu_tgmm(lhs, dout, group_sizes, cfg):
    m, k = lhs.shape
    n = dout.shape[1]
    num_groups = group_sizes.shape[0]
    _, _, starts, ends = tile_groups(group_sizes, m // cfg.tm, cfg.tm)
    scalars = [pl.BlockSpec((num_groups,), lambda g, a, b: (0,))] * 2
    return pl.pallas_call(
        functools.partial(_gpu_tgmm_kernel, tm=cfg.tm),
        grid=(num_groups, k // cfg.tk, n // cfg.tn),
        in_specs=scalars + [pl.BlockSpec((m, cfg.tk), lambda g, a, b: (0, a)),
                            pl.BlockSpec((m, cfg.tn), lambda g, a, b: (0, b))],
        out_specs=pl.BlockSpec((None, cfg.tk, cfg.tn), lambda g, a, b: (g, a, b)),
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), f32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=cfg.interpret, name="grouped_matmul_transposed",
    )(starts, ends, lhs, dout)


# --- custom VJP over both backends ------------------------------------------------------------


def _kernels(cfg):
    if cfg.backend == "tpu":
        from pallas_kernels import grouped_matmul_tpu

        return grouped_matmul_tpu.gmm, grouped_matmul_tpu.tgmm
    return _gpu_gmm, _gpu_tgmm


def check_tgmm(lhs, dout, group_sizes, cfg, where: str = "tgmm") -> None:
    """``tgmm(lhs [m, k], dout [m, n], group_sizes [E])`` on whole tiles."""
    _checks.ndim(where, "lhs", lhs, 2, "[m, k]")
    _checks.ndim(where, "dout", dout, 2, "[m, n]")
    _checks.ndim(where, "group_sizes", group_sizes, 1, "[E]")
    if dout.shape[0] != lhs.shape[0]:
        raise ValueError(f"{where}: lhs.shape={tuple(lhs.shape)} and dout.shape="
                         f"{tuple(dout.shape)} disagree on m")
    _checks.multiple(where, "lhs.shape[0] (m)", lhs.shape[0], "tm", cfg.tm)
    _checks.multiple(where, "lhs.shape[1] (k)", lhs.shape[1], "tk", cfg.tk)
    _checks.multiple(where, "dout.shape[1] (n)", dout.shape[1], "tn", cfg.tn)


def check_gmm(lhs, rhs, group_sizes, cfg, where: str = "gmm") -> None:
    """``gmm(lhs [m, k], rhs [E, k, n], group_sizes [E])`` on whole tiles."""
    _checks.ndim(where, "lhs", lhs, 2, "[m, k]")
    _checks.ndim(where, "rhs", rhs, 3, "[E, k, n]")
    _checks.ndim(where, "group_sizes", group_sizes, 1, "[E]")
    (m, k), (num_groups, k_rhs, n) = lhs.shape, rhs.shape
    if k_rhs != k:
        raise ValueError(f"{where}: lhs.shape={tuple(lhs.shape)} and rhs.shape="
                         f"{tuple(rhs.shape)} disagree on k")
    if num_groups < 1 or group_sizes.shape[0] != num_groups:
        raise ValueError(f"{where}: group_sizes.shape={tuple(group_sizes.shape)} must be "
                         f"[E]=[{num_groups}], E >= 1")
    _checks.multiple(where, "lhs.shape[0] (m)", m, "tm", cfg.tm)
    _checks.multiple(where, "lhs.shape[1] (k)", k, "tk", cfg.tk)
    _checks.multiple(where, "rhs.shape[2] (n)", n, "tn", cfg.tn)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs, rhs, group_sizes, cfg: KernelConfig):
    return _kernels(cfg)[0](lhs, rhs, group_sizes, cfg)


def gmm(lhs, rhs, group_sizes, cfg: KernelConfig):
    """``[m, n]``: each group's rows of ``lhs [m, k]`` times its ``rhs [E, k, n]``;
    differentiable in ``lhs`` and ``rhs``.

    Padded operands: ``m % tm == 0``, ``k % tk == 0``, ``n % tn == 0`` (rows past the groups
    give zeros); anything else raises ``ValueError`` instead of reading past the last tile.
    """
    check_gmm(lhs, rhs, group_sizes, cfg)
    return _gmm(lhs, rhs, group_sizes, cfg)


def _gmm_fwd(lhs, rhs, group_sizes, cfg):
    return _gmm(lhs, rhs, group_sizes, cfg), (lhs, rhs, group_sizes)


def _gmm_bwd(cfg, residuals, dout):
    lhs, rhs, group_sizes = residuals
    transposed = gmm_config(backend=cfg.backend, interpret=cfg.interpret, tm=cfg.tm, tk=cfg.tn,
                            tn=cfg.tk)  # d_lhs contracts over n and produces k
    d_lhs = gmm(dout.astype(lhs.dtype), jnp.swapaxes(rhs, 1, 2), group_sizes, transposed)
    d_rhs = _kernels(cfg)[1](lhs, dout.astype(lhs.dtype), group_sizes, cfg)
    # Groups with no rows are reached by no TPU visit, so their blocks are never written: zero
    # them. "No rows" after the cut at the last row (tile_groups): a positive size that starts
    # past the rows has none either (masking on size > 0 left such a block as leftover memory).
    _, _, starts, ends = tile_groups(group_sizes, lhs.shape[0] // cfg.tm, cfg.tm)
    d_rhs = jnp.where((ends > starts)[:, None, None], d_rhs, 0.0)
    return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm_config(*, backend: str, interpret: bool, tm: int, tk: int, tn: int) -> KernelConfig:
    """Tiles: Triton (``"gpu"``) takes powers of two >= 16; Mosaic (``"tpu"``) ``tm`` a
    multiple of 8 and ``tk``, ``tn`` multiples of 128."""
    where = f"gmm_config(backend={backend!r})"
    _checks.backend(where, backend)
    for name, value in (("tm", tm), ("tk", tk), ("tn", tn)):
        _checks.positive_int(where, name, value)
        if backend == "gpu":
            _checks.power_of_two(where, name, value, 16)
    if backend == "tpu" and (tm % 8 or tk % 128 or tn % 128):
        raise ValueError(f"{where}: TPU tiles need tm % 8 == 0 and tk, tn multiples of 128; "
                         f"got tm={tm}, tk={tk}, tn={tn}")
    return KernelConfig(backend=backend, interpret=bool(interpret), tm=int(tm), tk=int(tk),
                        tn=int(tn))
