"""The first-order linear scan ``h_t = a_t ⊙ h_{t−1} + x_t`` on CPU (``linear_scan_cpu.cc``) as
a differentiable function."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.native import register
from jaxsparse.ops.native.partitioning import split_over_batch_and_channels

_TARGET = "jaxsparse_linear_scan_f32"
_BWD_TARGET = "jaxsparse_linear_scan_bwd_f32"


def available() -> bool:
    """Whether the kernels are built and registered (compiles them on the first call)."""
    return register("linear_scan_cpu.cc", ((_TARGET, "JaxsparseLinearScanF32"),
                                           (_BWD_TARGET, "JaxsparseLinearScanBwdF32")))


def _scan_call(a, x, h0):
    out = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(h0.shape, jnp.float32))
    return tuple(jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(a, x, h0))


def _scan_bwd_call(a, hs, h0, g_hs, g_final):
    out = (jax.ShapeDtypeStruct(a.shape, jnp.float32),) * 2 + (
        jax.ShapeDtypeStruct(h0.shape, jnp.float32),)
    call = jax.ffi.ffi_call(_BWD_TARGET, out, vmap_method="sequential")
    return tuple(call(a, hs, h0, g_hs, g_final))


# both kernels step each (batch row, channel) alone: meshes split them over rows and channels
_scan = split_over_batch_and_channels(_scan_call, (3, 3, 2), (3, 2))
_scan_bwd = split_over_batch_and_channels(_scan_bwd_call, (3, 3, 2, 3, 2), (3, 3, 2))


@jax.custom_vjp
def native_linear_scan(a, x, h0):
    """``(h [B, L, W], h_{L−1} [B, W])`` for float32 ``a, x [B, L, W]`` and ``h0 [B, W]``."""
    return _scan(a, x, h0)


def _fwd(a, x, h0):
    hs, final = _scan(a, x, h0)
    return (hs, final), (a, h0, hs)


def _bwd(residuals, cotangents):
    a, h0, hs = residuals
    g_hs, g_final = cotangents
    # one reverse pass (linear_scan_cpu.cc): λ_t = dL/dh_t = g_t + a_{t+1} λ_{t+1} with
    # λ_{L-1} = g_{L-1} + g_final, d_x = λ, d_a_t = λ_t h_{t-1}, d_h0 = a_0 λ_0
    return _scan_bwd(a, hs, h0, g_hs.astype(jnp.float32), g_final.astype(jnp.float32))


native_linear_scan.defvjp(_fwd, _bwd)
