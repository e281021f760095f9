"""The fused Monarch product on CPU (``monarch_cpu.cc``) as a differentiable JAX function."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.native import register

_FORWARD, _RESIDUAL, _BACKWARD = ("jaxsparse_monarch_f32", "jaxsparse_monarch_residual_f32",
                                  "jaxsparse_monarch_backward_f32")


def available() -> bool:
    """Whether the kernels are built and registered (compiles them on the first call)."""
    return register("monarch_cpu.cc", ((_FORWARD, "JaxsparseMonarchF32"),
                                       (_RESIDUAL, "JaxsparseMonarchResidualF32"),
                                       (_BACKWARD, "JaxsparseMonarchBackwardF32")))


def supports(x, w1, w2) -> bool:
    """The kernels compute in float32 only; other dtypes take the XLA path."""
    return all(a.dtype == jnp.float32 for a in (x, w1, w2))


def _f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _forward(rows, w1, w2, *, residual: bool):
    b, q, _ = w1.shape
    s = w2.shape[1]
    outs = (_f32(rows.shape[0], b * s),) + ((_f32(rows.shape[0], b * q),) if residual else ())
    # Weights transposed once per call (b·q·(p + s) floats, small beside the activations) so
    # the kernel's vectors run along contiguous output columns.
    call = jax.ffi.ffi_call(_RESIDUAL if residual else _FORWARD, outs, vmap_method="sequential")
    return call(rows, jnp.swapaxes(w1, 1, 2), jnp.swapaxes(w2, 1, 2))


def _rows(x):
    return x.reshape(-1, x.shape[-1])


@jax.custom_vjp
def native_monarch(x, w1, w2):
    """``monarch_reference(x, w1, w2)`` computed by the fused CPU kernels (float32 only).

    Forward: one pass over token tiles (``monarch_cpu.cc``). Under differentiation the forward
    also writes the first factor's output (the one residual the backward needs, as in XLA's
    VJP), and the backward kernel computes dx, dw1 and dw2 in one pass over the tiles.
    """
    (y,) = _forward(_rows(x), w1, w2, residual=False)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _fwd(x, w1, w2):
    y, hidden = _forward(_rows(x), w1, w2, residual=True)
    return y.reshape(*x.shape[:-1], y.shape[-1]), (x, hidden, w1, w2)


def _bwd(residuals, dy):
    x, hidden, w1, w2 = residuals
    rows = _rows(x)
    outs = (_f32(*rows.shape), _f32(*w1.shape), _f32(*w2.shape))
    dx, dw1, dw2 = jax.ffi.ffi_call(_BACKWARD, outs, vmap_method="sequential")(
        rows, hidden, _rows(dy).astype(jnp.float32), w1, w2)
    return dx.reshape(x.shape), dw1, dw2


native_monarch.defvjp(_fwd, _bwd)
