"""The first-order linear scan of :mod:`pallas_kernels.linear_scan` for TPUs (Pallas, Mosaic).

Same contract and layout as the GPU kernel. The grid is (batch, channel block, time block)
with time innermost and sequential ("arbitrary"): each step's BlockSpecs bring one ``[T, BD]``
tile of ``a`` and ``b`` into VMEM, the ``T`` steps are unrolled over static sublane rows, and
the ``[1, BD]`` state is carried between time blocks in VMEM scratch. Needs ``T`` a multiple of
8 (sublanes) and ``BD`` of 128 (lanes) on hardware; interpret mode checks neither.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

f32 = jnp.float32


def _kernel(a_ref, b_ref, h0_ref, h_ref, hl_ref, h_scr, *, block_t, num_blocks):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        h_scr[...] = h0_ref[...]

    h = h_scr[...]
    for i in range(block_t):
        row = pl.ds(i, 1)
        h = a_ref[row, :] * h + b_ref[row, :]
        h_ref[row, :] = h
    h_scr[...] = h

    @pl.when(k == num_blocks - 1)
    def _():
        hl_ref[...] = h


def scan(a, b, h0, cfg):
    from pallas_kernels.linear_scan import check_operands

    check_operands(a, b, h0, cfg, "linear_scan_tpu.scan")
    batch, length, d = a.shape
    bt, bd = cfg.block_t, cfg.block_d
    num_blocks = length // bt
    tile = pl.BlockSpec((None, bt, bd), lambda i, c, k: (i, k, c))
    state = pl.BlockSpec((None, 1, bd), lambda i, c, k: (i, 0, c))
    return pl.pallas_call(
        functools.partial(_kernel, block_t=bt, num_blocks=num_blocks),
        grid=(batch, d // bd, num_blocks),
        in_specs=[tile, tile, state],
        out_specs=[tile, state],
        out_shape=[jax.ShapeDtypeStruct((batch, length, d), f32),
                   jax.ShapeDtypeStruct((batch, 1, d), f32)],
        scratch_shapes=[pltpu.VMEM((1, bd), f32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret, name="linear_scan_tpu",
    )(a, b, h0)
