"""The fused Monarch product on CPU (``monarch_cpu.cc``) as a differentiable JAX function."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.native import register

_TARGET = "jaxsparse_monarch_f32"


def available() -> bool:
    """Whether the kernel is built and registered (compiles it on the first call)."""
    return register("monarch_cpu.cc", ((_TARGET, "JaxsparseMonarchF32"),))


def supports(x, w1, w2) -> bool:
    """The kernel computes in float32 only; other dtypes take the XLA path."""
    return all(a.dtype == jnp.float32 for a in (x, w1, w2))


def _call(rows, w1, w2):
    b, q, _ = w1.shape
    s = w2.shape[1]
    out = jax.ShapeDtypeStruct((rows.shape[0], b * s), jnp.float32)
    # Weights transposed once per call (b·q·(p + s) floats, small beside the activations) so
    # the kernel's vectors run along contiguous output columns.
    return jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(
        rows, jnp.swapaxes(w1, 1, 2), jnp.swapaxes(w2, 1, 2))


@jax.custom_vjp
def native_monarch(x, w1, w2):
    """``monarch_reference(x, w1, w2)`` computed by the fused CPU kernel (float32 only).

    Gradients come from the XLA reference's VJP (the backward is GEMMs over tokens, which XLA
    already runs well, and dx); the forward product XLA's VJP would recompute is dead code under
    ``jit``, except for the first factor's output that ``dw2`` needs.
    """
    lead, n = x.shape[:-1], x.shape[-1]
    out = _call(x.reshape(-1, n), w1, w2)
    return out.reshape(*lead, out.shape[-1])


def _fwd(x, w1, w2):
    return native_monarch(x, w1, w2), (x, w1, w2)


def _bwd(residuals, g):
    from jaxsparse.ops.monarch import monarch_reference

    return jax.vjp(monarch_reference, *residuals)[1](g)


native_monarch.defvjp(_fwd, _bwd)
