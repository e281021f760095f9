"""The Mamba-1 selective scan on CPU (``selective_scan_cpu.cc``) as a differentiable function."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp

from jaxsparse.ops.native import register
from jaxsparse.ops.native.partitioning import ROWS, WHOLE, split_over_rows

_FORWARD, _BACKWARD = "jaxsparse_selective_scan_f32", "jaxsparse_selective_scan_backward_f32"
_LANES = 16  # channels stepped together (one vector register of float32)


def available() -> bool:
    """Whether the kernels are built and registered (compiles them on the first call)."""
    return register("selective_scan_cpu.cc",
                    ((_FORWARD, "JaxsparseSelectiveScanF32"),
                     (_BACKWARD, "JaxsparseSelectiveScanBackwardF32")))


def _f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


@jax.custom_vjp
def native_scan(x, dt, A, B, C, h0, keep):
    """``(y, h_final)`` of ``h_t = keep_t exp(dt_t A) h_{t-1} + dt_t x_t B_t``,
    ``y_t = <C_t, h_t>``; ``keep [batch, L]`` is 0 where a packed document starts (the state
    resets there) and 1 elsewhere (not differentiated).

    All float32: ``x, dt [batch, L, d]`` (dt discretised: bias and softplus applied),
    ``A [d, N]`` (or ``[d, 1]``: one decay rate per channel for all N state entries, as in
    Mamba-2; the kernel then takes one exp per step, not N), ``B, C [batch, L, groups, N]``,
    ``h0 [batch, d, N]``.
    """
    return _forward(x, dt, A, B, C, h0, keep)


def _forward_call(x, dt, A, B, C, h0, keep):
    batch, length, d = x.shape
    call = jax.ffi.ffi_call(_FORWARD, (_f32(batch, length, d), _f32(batch, d, B.shape[3])),
                            vmap_method="sequential")
    return tuple(call(x, dt, A, B, C, h0, keep))


# every batch row is its own recurrence: on a mesh each device scans its rows (A is whole)
_forward = split_over_rows(_forward_call, (ROWS, ROWS, WHOLE, ROWS, ROWS, ROWS, ROWS),
                           (ROWS, ROWS))


def _parts(batch: int, groups: int, channels: int) -> int:
    """Tasks per (batch row, group) in the backward: enough to keep every core busy when the
    batch is small. Each task keeps its own [L, N] partial sums of dB and dC, added in a fixed
    order afterwards, so the count depends only on the sizes and the machine."""
    blocks = math.ceil(channels // groups / _LANES)
    return max(1, min(blocks, math.ceil(2 * (os.cpu_count() or 1) / (batch * groups))))


def _fwd(x, dt, A, B, C, h0, keep):
    return native_scan(x, dt, A, B, C, h0, keep), (x, dt, A, B, C, h0, keep)


def _bwd(residuals, cotangents):
    x, dt, A, B, C, h0, keep = residuals
    gy, gh_final = cotangents
    batch, length, d = x.shape
    groups, n = B.shape[2], B.shape[3]
    parts = _parts(batch, groups, d)  # fixed here: the same on every device of a mesh

    def backward_call(*operands):
        rows, length, d = operands[0].shape
        outs = (_f32(rows, length, d), _f32(rows, length, d), _f32(rows, d, A.shape[1]),
                _f32(rows, groups, parts, length, n), _f32(rows, groups, parts, length, n),
                _f32(rows, d, n))
        return tuple(jax.ffi.ffi_call(_BACKWARD, outs, vmap_method="sequential")(*operands))

    # every result is per batch row (A's gradient too, summed over the rows below)
    backward = split_over_rows(backward_call, (ROWS, ROWS, WHOLE, ROWS, ROWS, ROWS, ROWS, ROWS,
                                               ROWS), (ROWS,) * 6)
    gx, gdt, gA_rows, gB_parts, gC_parts, gh0 = backward(
        x, dt, A, B, C, h0, keep, gy.astype(jnp.float32), gh_final.astype(jnp.float32))
    to_bl = lambda parts_: jnp.swapaxes(parts_.sum(axis=2), 1, 2)  # noqa: E731  [b, L, g, N]
    return (gx, gdt, gA_rows.sum(axis=0), to_bl(gB_parts), to_bl(gC_parts), gh0,
            jnp.zeros_like(keep))


native_scan.defvjp(_fwd, _bwd)
