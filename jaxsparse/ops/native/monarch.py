"""The fused Monarch product on CPU (``monarch_cpu.cc``) as a differentiable JAX function."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.ops.native import register
from jaxsparse.ops.native.partitioning import ROW_SUM, ROWS, WHOLE, split_over_rows

_FORWARD, _RESIDUAL, _BACKWARD = ("jaxsparse_monarch_f32", "jaxsparse_monarch_residual_f32",
                                  "jaxsparse_monarch_backward_f32")
# Tokens whose weight gradients the backward sums in one go (0: the kernel sizes the chunk,
# about 16 MiB of buffers). Read when a backward is traced; tests set a few tokens so that
# chunk edges fall inside the token tiles.
WEIGHT_GRAD_CHUNK_TOKENS = 0


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


def _forward_call(residual: bool):
    def call(rows, w1T, w2T):
        b, _, q = w1T.shape
        s = w2T.shape[2]
        outs = (_f32(rows.shape[0], b * s),) + ((_f32(rows.shape[0], b * q),) if residual else ())
        kernel = jax.ffi.ffi_call(_RESIDUAL if residual else _FORWARD, outs,
                                  vmap_method="sequential")
        return tuple(kernel(rows, w1T, w2T))
    return call


# Tokens are independent rows: on a mesh each device runs its rows with whole weights, and
# the weight gradients are summed over the devices.
_FORWARD_ROWS = {residual: split_over_rows(_forward_call(residual), (ROWS, WHOLE, WHOLE),
                                           (ROWS,) * (1 + residual)) for residual in (False, True)}


def _backward_call(rows, hidden, dy, w1, w2):
    outs = (_f32(*rows.shape), _f32(*w1.shape), _f32(*w2.shape))
    return tuple(jax.ffi.ffi_call(_BACKWARD, outs, vmap_method="sequential")(
        rows, hidden, dy, w1, w2, chunk_tokens=np.int64(WEIGHT_GRAD_CHUNK_TOKENS)))


_BACKWARD_ROWS = split_over_rows(_backward_call, (ROWS, ROWS, ROWS, WHOLE, WHOLE),
                                 (ROWS, ROW_SUM, ROW_SUM))


def _forward(rows, w1, w2, *, residual: bool):
    # Weights transposed once per call (b·q·(p + s) floats, small beside the activations) so
    # the kernel's vectors run along contiguous output columns.
    return _FORWARD_ROWS[residual](rows, jnp.swapaxes(w1, 1, 2), jnp.swapaxes(w2, 1, 2))


def _rows(x):
    return x.reshape(-1, x.shape[-1])


@jax.custom_vjp
def native_monarch(x, w1, w2):
    """``monarch_reference(x, w1, w2)`` computed by the fused CPU kernels (float32 only).

    Forward: one pass over token tiles (``monarch_cpu.cc``). Under differentiation the forward
    also writes the first factor's output (the one residual the backward needs, as in XLA's
    VJP), and the backward kernel computes dx, dw1 and dw2 in one pass: dx tile by tile, the
    weight gradients summed over chunks of many tiles at a time.
    """
    (y,) = _forward(_rows(x), w1, w2, residual=False)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _fwd(x, w1, w2):
    y, hidden = _forward(_rows(x), w1, w2, residual=True)
    return y.reshape(*x.shape[:-1], y.shape[-1]), (x, hidden, w1, w2)


def _bwd(residuals, dy):
    x, hidden, w1, w2 = residuals
    rows = _rows(x)
    dx, dw1, dw2 = _BACKWARD_ROWS(rows, hidden, _rows(dy).astype(jnp.float32), w1, w2)
    return dx.reshape(x.shape), dw1, dw2


native_monarch.defvjp(_fwd, _bwd)
