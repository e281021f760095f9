"""The weighted embedding bag on CPU (``embedding_bag_cpu.cc``) as a differentiable JAX function."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.native import register

_FORWARD, _BACKWARD = "jaxsparse_embedding_bag_f32", "jaxsparse_embedding_bag_backward_f32"


def available() -> bool:
    """Whether the kernels are built and registered (compiles them on the first call)."""
    return register("embedding_bag_cpu.cc", ((_FORWARD, "JaxsparseEmbeddingBagF32"),
                                             (_BACKWARD, "JaxsparseEmbeddingBagBackwardF32")))


def _call(target, outs, *args):
    return jax.ffi.ffi_call(target, outs, vmap_method="sequential")(*args)


@jax.custom_vjp
def native_embedding_bag(weights_TJ, slots_TJ, values_NV):
    """``out[t] = Σ_j weights[t, j] · values[slots[t, j]]`` (float32, slots int32 in range) by
    the C++ kernel. Gradients reach the weights and the table (a deterministic scatter-add of
    ``weights · d_out`` into the picked rows); nothing of size ``T × J × V`` is formed."""
    out = jax.ShapeDtypeStruct((weights_TJ.shape[0], values_NV.shape[1]), jnp.float32)
    return _call(_FORWARD, out, weights_TJ, slots_TJ, values_NV)


def _fwd(weights_TJ, slots_TJ, values_NV):
    return native_embedding_bag(weights_TJ, slots_TJ, values_NV), (weights_TJ, slots_TJ, values_NV)


def _bwd(residuals, d_out):
    weights_TJ, slots_TJ, values_NV = residuals
    outs = (jax.ShapeDtypeStruct(weights_TJ.shape, jnp.float32),
            jax.ShapeDtypeStruct(values_NV.shape, jnp.float32))
    d_w, d_values = _call(_BACKWARD, outs, weights_TJ, slots_TJ, values_NV,
                          d_out.astype(jnp.float32))
    return d_w, None, d_values


native_embedding_bag.defvjp(_fwd, _bwd)
