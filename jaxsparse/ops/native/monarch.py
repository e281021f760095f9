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

    Under differentiation the forward and backward are XLA's (the reference's VJP): the
    gradients need the first factor's output, which the kernel keeps in cache and never
    writes, and XLA shares it between the forward and the backward. Running the kernel for the
    primal and recomputing that output for the backward made training slower (``jaxsparse
    bench train_step --configs monarch_tiny``: 333 ms a step against XLA's 276 ms). So the
    kernel serves forward-only work — inference, evaluation, generation — and training costs
    what the XLA path costs.
    """
    lead, n = x.shape[:-1], x.shape[-1]
    out = _call(x.reshape(-1, n), w1, w2)
    return out.reshape(*lead, out.shape[-1])


def _reference(x, w1, w2):
    from jaxsparse.ops.monarch import monarch_reference

    return monarch_reference(x, w1, w2)


def _fwd(x, w1, w2):
    return jax.vjp(_reference, x, w1, w2)  # (y, the backward with XLA's residuals)


def _bwd(reference_vjp, g):
    return reference_vjp(g)


native_monarch.defvjp(_fwd, _bwd)
