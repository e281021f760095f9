"""The first-order linear scan ``h_t = a_t ⊙ h_{t−1} + x_t`` on CPU (``linear_scan_cpu.cc``) as
a differentiable function."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.native import register

_TARGET = "jaxsparse_linear_scan_f32"


def available() -> bool:
    """Whether the kernel is built and registered (compiles it on the first call)."""
    return register("linear_scan_cpu.cc", ((_TARGET, "JaxsparseLinearScanF32"),))


def _scan(a, x, h0, *, reverse: bool):
    out = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(h0.shape, jnp.float32))
    call = jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")
    return tuple(call(a, x, h0, reverse=int(reverse)))


@jax.custom_vjp
def native_linear_scan(a, x, h0):
    """``(h [B, L, W], h_{L−1} [B, W])`` for float32 ``a, x [B, L, W]`` and ``h0 [B, W]``."""
    return _scan(a, x, h0, reverse=False)


def _fwd(a, x, h0):
    hs, final = _scan(a, x, h0, reverse=False)
    return (hs, final), (a, h0, hs)


def _bwd(residuals, cotangents):
    a, h0, hs = residuals
    g_hs, g_final = cotangents
    # λ_t = dL/dh_t = g_t + a_{t+1} λ_{t+1}, with λ_{L-1} = g_{L-1} + g_final: a reverse scan
    # whose decays are shifted one step (the last step's decay, 1, carries g_final in)
    shifted = jnp.concatenate([a[:, 1:], jnp.ones_like(a[:, :1])], axis=1)
    lam, _ = _scan(shifted, g_hs.astype(jnp.float32), g_final.astype(jnp.float32), reverse=True)
    previous = jnp.concatenate([h0[:, None], hs[:, :-1]], axis=1)   # h_{t-1}
    return lam * previous, lam, a[:, 0] * lam[:, 0]


native_linear_scan.defvjp(_fwd, _bwd)
