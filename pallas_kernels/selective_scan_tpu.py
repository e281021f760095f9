"""Mamba-1 selective scan for TPUs (Pallas, Mosaic), forward and backward.

Same contract and layout as the GPU kernels in :mod:`pallas_kernels.selective_scan`. The grid
is (batch, channel block, time block) with time innermost and sequential ("arbitrary"): each
step's BlockSpecs bring one ``[T, BD]`` tile of x/dt and one ``[N, T]`` tile of B/C into VMEM,
and the ``[N, BD]`` state is carried between steps in VMEM scratch. The backward grid walks
time blocks in reverse through its index maps, recomputes the block's states from the saved
start into a ``[T + 1, N, BD]`` scratch, and carries dL/dh in scratch. Time steps inside a
block are unrolled, so every index is static: rows of x/dt/dy are sublane loads from float32
refs, and the per-step B/C column is picked from its ``[N, T]`` tile by a masked lane
reduction (gradient columns are merged into whole tiles by a masked select), so Mosaic never
sees a lane-unaligned slice; the optional reset factor of packed documents is a ``[1, T]`` tile
read the same way. Needs ``T`` a multiple of 128 (the lane dimension of the B/C
tiles), ``BD`` a multiple of 128, and x in float32 (the wrapper casts).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._scan_math import (backward_out_shapes, backward_step, decay,
                                       forward_out_shapes, forward_step, split_keep)

f32 = jnp.float32


def _column(tile, lane, i):
    """Column ``i`` of an ``[N, T]`` tile as ``[N, 1]``."""
    return jnp.sum(jnp.where(lane == i, tile, 0.0), axis=1, keepdims=True)


def _keep_columns(kt_ref, block_t):
    """The block's per-step reset factors as ``[1, 1]`` values, or Nones without a keep input."""
    if kt_ref is None:
        return [None] * block_t
    kt = kt_ref[...]  # [1, T]
    lane = jax.lax.broadcasted_iota(jnp.int32, kt.shape, 1)
    return [_column(kt, lane, i) for i in range(block_t)]


def _fwd_kernel(x_ref, dt_ref, At_ref, Bt_ref, Ct_ref, h0_ref, *refs, block_t, num_blocks,
                has_keep):
    kt_ref, (y_ref, hl_ref, st_ref, h_scr) = split_keep(refs, has_keep)
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        h_scr[...] = h0_ref[...]

    h = h_scr[...]
    st_ref[...] = h
    At = At_ref[...]
    Bt, Ct = Bt_ref[...].astype(f32), Ct_ref[...].astype(f32)
    lane = jax.lax.broadcasted_iota(jnp.int32, Bt.shape, 1)
    keep = _keep_columns(kt_ref, block_t)
    for i in range(block_t):
        row = pl.ds(i, 1)
        h, _, y = forward_step(h, x_ref[row, :], dt_ref[row, :], At, _column(Bt, lane, i),
                               _column(Ct, lane, i), keep[i])
        y_ref[row, :] = y
    h_scr[...] = h

    @pl.when(k == num_blocks - 1)
    def _():
        hl_ref[...] = h


def _bwd_kernel(x_ref, dt_ref, At_ref, Bt_ref, Ct_ref, st_ref, dy_ref, dhl_ref, *refs, block_t,
                num_blocks, has_keep):
    kt_ref, refs = split_keep(refs, has_keep)
    dx_ref, ddt_ref, dAt_ref, dBt_ref, dCt_ref, dh0_ref, g_scr, hs_scr = refs
    kk = pl.program_id(2)  # time blocks in reverse: block num_blocks - 1 - kk

    @pl.when(kk == 0)
    def _():
        g_scr[...] = dhl_ref[...]
        dAt_ref[...] = jnp.zeros_like(dAt_ref)

    At = At_ref[...]
    Bt, Ct = Bt_ref[...].astype(f32), Ct_ref[...].astype(f32)
    lane = jax.lax.broadcasted_iota(jnp.int32, Bt.shape, 1)
    keep = _keep_columns(kt_ref, block_t)
    h = st_ref[...]
    hs_scr[0] = h
    for i in range(block_t):  # recompute the block's states from its saved start
        row = pl.ds(i, 1)
        h, _, _ = forward_step(h, x_ref[row, :], dt_ref[row, :], At, _column(Bt, lane, i),
                               _column(Ct, lane, i), keep[i])
        hs_scr[i + 1] = h

    g, dA = g_scr[...], jnp.zeros_like(At)
    dB_tile, dC_tile = jnp.zeros_like(Bt), jnp.zeros_like(Ct)
    for i in reversed(range(block_t)):
        row = pl.ds(i, 1)
        x_t, dt_t = x_ref[row, :], dt_ref[row, :]
        g, dx, ddt, dA_t, dB, dC = backward_step(
            g, hs_scr[i], hs_scr[i + 1], decay(dt_t, At, keep[i]), dy_ref[row, :], x_t, dt_t, At,
            _column(Bt, lane, i), _column(Ct, lane, i))
        dA = dA + dA_t
        dx_ref[row, :] = dx
        ddt_ref[row, :] = ddt
        # columns land in whole [N, T] tiles (one full store per block, no lane-offset stores)
        dB_tile = jnp.where(lane == i, dB, dB_tile)
        dC_tile = jnp.where(lane == i, dC, dC_tile)
    dBt_ref[...] = dB_tile
    dCt_ref[...] = dC_tile
    g_scr[...] = g
    dAt_ref[...] += dA

    @pl.when(kk == num_blocks - 1)
    def _():
        dh0_ref[...] = g


def _specs(cfg, n, num_blocks, reverse):
    bd, bt = cfg.block_d, cfg.block_t
    t = (lambda k: num_blocks - 1 - k) if reverse else (lambda k: k)
    if cfg.groups == 1:
        group = lambda c: 0  # noqa: E731
    else:  # channel blocks past groups·per_group are padding: they read the last group's B, C
        group = lambda c: jnp.minimum(c * bd // cfg.per_group, cfg.groups - 1)  # noqa: E731
    return dict(
        tile=pl.BlockSpec((None, bt, bd), lambda b, c, k: (b, t(k), c)),
        col=pl.BlockSpec((None, None, n, bt), lambda b, c, k: (b, group(c), 0, t(k))),
        own_col=pl.BlockSpec((None, None, n, bt), lambda b, c, k: (b, c, 0, t(k))),
        At=pl.BlockSpec((n, bd), lambda b, c, k: (0, c)),
        state=pl.BlockSpec((None, n, bd), lambda b, c, k: (b, 0, c)),
        keep=pl.BlockSpec((None, 1, bt), lambda b, c, k: (b, 0, t(k))),
        start=pl.BlockSpec((None, None, n, bd), lambda b, c, k: (b, t(k), 0, c)))


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def forward(x, dt, At, Bt, Ct, h0, kt, cfg):
    from pallas_kernels.selective_scan import check_operands

    check_operands(x, dt, At, Bt, Ct, h0, kt, cfg, "selective_scan_tpu.forward")
    batch, length, d = x.shape
    n = At.shape[0]
    num_blocks = length // cfg.block_t
    s = _specs(cfg, n, num_blocks, reverse=False)
    has_keep = kt is not None
    return pl.pallas_call(
        functools.partial(_fwd_kernel, block_t=cfg.block_t, num_blocks=num_blocks,
                          has_keep=has_keep),
        grid=(batch, d // cfg.block_d, num_blocks),
        in_specs=[s["tile"], s["tile"], s["At"], s["col"], s["col"], s["state"]]
        + [s["keep"]] * has_keep,
        out_specs=[s["tile"], s["state"], s["start"]],
        out_shape=forward_out_shapes(batch, length, d, n, num_blocks),
        scratch_shapes=[pltpu.VMEM((n, cfg.block_d), f32)],
        compiler_params=_params(), interpret=cfg.interpret, name="selective_scan_fwd_tpu",
    )(x, dt, At, Bt, Ct, h0, *[kt] * has_keep)


def backward(x, dt, At, Bt, Ct, starts, dy, dhl, kt, cfg):
    batch, length, d = x.shape
    n = At.shape[0]
    num_blocks = length // cfg.block_t
    blocks_d = d // cfg.block_d
    s = _specs(cfg, n, num_blocks, reverse=True)
    has_keep = kt is not None
    return pl.pallas_call(
        functools.partial(_bwd_kernel, block_t=cfg.block_t, num_blocks=num_blocks,
                          has_keep=has_keep),
        grid=(batch, blocks_d, num_blocks),
        in_specs=[s["tile"], s["tile"], s["At"], s["col"], s["col"], s["start"], s["tile"],
                  s["state"]] + [s["keep"]] * has_keep,
        out_specs=[s["tile"], s["tile"], s["state"], s["own_col"], s["own_col"], s["state"]],
        out_shape=backward_out_shapes(batch, length, d, n, blocks_d),
        scratch_shapes=[pltpu.VMEM((n, cfg.block_d), f32),
                        pltpu.VMEM((cfg.block_t + 1, n, cfg.block_d), f32)],
        compiler_params=_params(), interpret=cfg.interpret, name="selective_scan_bwd_tpu",
    )(x, dt, At, Bt, Ct, starts, dy, dhl, *[kt] * has_keep)
