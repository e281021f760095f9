"""The grouped matmul on CPU (``grouped_matmul_cpu.cc``) as a differentiable JAX function."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.native import register

_FORWARD, _RHS_GRAD = "jaxsparse_grouped_matmul_f32", "jaxsparse_grouped_matmul_rhs_grad_f32"


def available() -> bool:
    """Whether the kernels are built and registered (compiles them on the first call)."""
    return register("grouped_matmul_cpu.cc", ((_FORWARD, "JaxsparseGroupedMatmulF32"),
                                              (_RHS_GRAD, "JaxsparseGroupedMatmulRhsGradF32")))


def supports(lhs, rhs) -> bool:
    """The kernels compute in float32 only; other dtypes take the XLA path."""
    return lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32


def _gmm(lhs, rhs, group_sizes):
    out = jax.ShapeDtypeStruct((lhs.shape[0], rhs.shape[2]), jnp.float32)
    return jax.ffi.ffi_call(_FORWARD, out, vmap_method="sequential")(lhs, rhs, group_sizes)


@jax.custom_vjp
def native_grouped_matmul(lhs, rhs, group_sizes):
    """``lhs [m, k]`` rows of group ``e`` times ``rhs[e]`` (``[E, k, n]``), float32, by the
    C++ kernel; ``group_sizes [E]`` int32. Backward: d_lhs is the same grouped matmul against
    the transposed weights, d_rhs a per-group ``lhsᵀ · d_out`` (``tgmm``)."""
    return _gmm(lhs, rhs, group_sizes)


def _fwd(lhs, rhs, group_sizes):
    return _gmm(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _bwd(residuals, dout):
    lhs, rhs, group_sizes = residuals
    dout = dout.astype(jnp.float32)
    # rhs transposed once per call (E·k·n floats, small beside the rows)
    d_lhs = _gmm(dout, jnp.swapaxes(rhs, 1, 2), group_sizes)
    d_rhs = jax.ffi.ffi_call(_RHS_GRAD, jax.ShapeDtypeStruct(rhs.shape, jnp.float32),
                             vmap_method="sequential")(lhs, dout, group_sizes)
    return d_lhs, d_rhs, None


native_grouped_matmul.defvjp(_fwd, _bwd)
