"""Top-k indices on CPU (``topk_cpu.cc``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.native import register

_TARGET = "jaxsparse_top_k_indices_f32"


def available() -> bool:
    """Whether the kernel is built and registered (compiles it on the first call)."""
    return register("topk_cpu.cc", ((_TARGET, "JaxsparseTopKIndicesF32"),))


def native_top_k(x, k: int):
    """``lax.top_k(x, k)`` for float32 ``x [..., n]``: the kernel finds the indices (the same
    order and ties as ``lax.top_k``), the values are gathered from ``x`` (differentiable)."""
    rows = jax.lax.stop_gradient(x).reshape(-1, x.shape[-1])
    out = jax.ShapeDtypeStruct((rows.shape[0], k), jnp.int32)
    indices = jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(rows)
    indices = indices.reshape(*x.shape[:-1], k)
    return jnp.take_along_axis(x, indices, axis=-1), indices
