"""Fused Monarch product for TPUs (Pallas, Mosaic), forward and backward.

Same contract as the GPU kernels in :mod:`pallas_kernels.monarch`. Mosaic does strided loads
and stores along the second-minor (sublane) dimension, not along lanes, so a program works on
its ``bt`` tokens *transposed*, tokens on lanes: the tile ``x [bt, n]`` is transposed once in
VMEM to ``xᵀ [n, bt]``, then

  1. ``hᵀ[k·q:(k+1)·q] = w1[k] @ xᵀ[k·p:(k+1)·p]``   (contiguous sublane slices),
  2. ``yᵀ[l::b] = w2[l] @ hᵀ[l::b]``                 (strided sublane load and store),

and ``yᵀ`` is transposed back on the way out. ``hᵀ [b·q, T]`` is also written out as the
backward residual. The backward grid walks token tiles sequentially ("arbitrary") and keeps the
weight gradients resident in their output blocks, adding each tile's share.

Needs ``bt`` a multiple of 128 (lanes), ``p``, ``q``, ``s`` multiples of 8 (sublanes) and
``n``, ``m`` multiples of 128 (the in-VMEM transposes); the wrapper checks this. Everything in
VMEM is float32; the matmul operands are cast to the weights' dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

f32 = jnp.float32
_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))


def _dot(a, b, dims=_NN):
    return jax.lax.dot_general(a, b, dims, preferred_element_type=f32)


def _rows(start, size):
    return pl.ds(pl.multiple_of(start * size, size), size)


def _forward_kernel(x_ref, w1_ref, w2_ref, y_ref, ht_ref, xt_scr, yt_scr, *, b, p, q, s):
    xt_scr[...] = x_ref[...].astype(f32).T
    wdt = w1_ref.dtype

    def first_factor(k, carry):
        ht_ref[_rows(k, q), :] = _dot(w1_ref[k], xt_scr[_rows(k, p), :].astype(wdt))
        return carry

    def second_factor(l, carry):
        yt_scr[pl.ds(l, s, stride=b), :] = _dot(w2_ref[l], ht_ref[pl.ds(l, q, stride=b), :]
                                                .astype(wdt))
        return carry

    jax.lax.fori_loop(0, b, first_factor, 0)
    jax.lax.fori_loop(0, b, second_factor, 0)
    y_ref[...] = yt_scr[...].T.astype(y_ref.dtype)


def _backward_kernel(x_ref, ht_ref, dy_ref, w1t_ref, w2t_ref, dx_ref, dw1_ref, dw2_ref,
                     xt_scr, dyt_scr, dht_scr, dxt_scr, *, b, p, q, s):
    @pl.when(pl.program_id(0) == 0)
    def _():
        dw1_ref[...] = jnp.zeros_like(dw1_ref)
        dw2_ref[...] = jnp.zeros_like(dw2_ref)

    xt_scr[...] = x_ref[...].astype(f32).T
    dyt_scr[...] = dy_ref[...].astype(f32).T
    wdt = w1t_ref.dtype

    def second_factor(l, carry):
        dy_l = dyt_scr[pl.ds(l, s, stride=b), :]                    # [s, bt]
        dht_scr[pl.ds(l, q, stride=b), :] = _dot(w2t_ref[l], dy_l.astype(wdt))
        dw2_ref[l] += _dot(dy_l, ht_ref[pl.ds(l, q, stride=b), :], _NT)
        return carry

    def first_factor(k, carry):
        dh_k = dht_scr[_rows(k, q), :]                              # [q, bt]
        dxt_scr[_rows(k, p), :] = _dot(w1t_ref[k], dh_k.astype(wdt))
        dw1_ref[k] += _dot(dh_k, xt_scr[_rows(k, p), :], _NT)
        return carry

    jax.lax.fori_loop(0, b, second_factor, 0)
    jax.lax.fori_loop(0, b, first_factor, 0)
    dx_ref[...] = dxt_scr[...].T.astype(dx_ref.dtype)


def _whole(arr):
    return pl.BlockSpec(arr.shape, lambda i: (0,) * arr.ndim)


def forward(x, w1, w2, cfg):
    from pallas_kernels.monarch import check_operands

    check_operands(x, w1, w2, cfg, "monarch_tpu.forward", tokens_multiple=True)
    b, q, p = w1.shape
    s = w2.shape[1]
    tokens, n = x.shape
    bt, mid, m = cfg.block_tokens, b * q, b * s
    return pl.pallas_call(
        functools.partial(_forward_kernel, b=b, p=p, q=q, s=s),
        grid=(tokens // bt,),
        in_specs=[pl.BlockSpec((bt, n), lambda i: (i, 0)), _whole(w1), _whole(w2)],
        out_specs=[pl.BlockSpec((bt, m), lambda i: (i, 0)),
                   pl.BlockSpec((mid, bt), lambda i: (0, i))],
        out_shape=(jax.ShapeDtypeStruct((tokens, m), x.dtype),
                   jax.ShapeDtypeStruct((mid, tokens), f32)),
        scratch_shapes=[pltpu.VMEM((n, bt), f32), pltpu.VMEM((m, bt), f32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=cfg.interpret, name="monarch_forward_tpu",
    )(x, w1, w2)


def backward(x, w1, w2, ht, dy, cfg):
    from pallas_kernels.monarch import check_operands

    check_operands(x, w1, w2, cfg, "monarch_tpu.backward", tokens_multiple=True)
    b, q, p = w1.shape
    s = w2.shape[1]
    tokens, n = x.shape
    bt, mid, m = cfg.block_tokens, b * q, b * s
    w1t, w2t = jnp.swapaxes(w1, 1, 2), jnp.swapaxes(w2, 1, 2)  # [b, p, q], [b, q, s]: small
    return pl.pallas_call(
        functools.partial(_backward_kernel, b=b, p=p, q=q, s=s),
        grid=(tokens // bt,),
        in_specs=[pl.BlockSpec((bt, n), lambda i: (i, 0)),
                  pl.BlockSpec((mid, bt), lambda i: (0, i)),
                  pl.BlockSpec((bt, m), lambda i: (i, 0)), _whole(w1t), _whole(w2t)],
        out_specs=[pl.BlockSpec((bt, n), lambda i: (i, 0)),
                   _whole(jax.ShapeDtypeStruct((b, q, p), f32)),
                   _whole(jax.ShapeDtypeStruct((b, s, q), f32))],
        out_shape=(jax.ShapeDtypeStruct((tokens, n), x.dtype),
                   jax.ShapeDtypeStruct((b, q, p), f32), jax.ShapeDtypeStruct((b, s, q), f32)),
        scratch_shapes=[pltpu.VMEM((n, bt), f32), pltpu.VMEM((m, bt), f32),
                        pltpu.VMEM((mid, bt), f32), pltpu.VMEM((n, bt), f32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=cfg.interpret, name="monarch_backward_tpu",
    )(x, ht, dy, w1t, w2t)
