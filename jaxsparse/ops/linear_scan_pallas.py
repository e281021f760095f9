"""``linear_scan(..., implementation="pallas" | "pallas_interpret")``: padding, the sharding
rule and backend choice around the kernels of :mod:`pallas_kernels.linear_scan`.

``"pallas"`` picks the kernel by the platform being *lowered for*
(``jax.lax.platform_dependent``), so it lowers for CUDA and TPU from a CPU host; on other
platforms it runs ``fallback()``. ``"pallas_interpret"`` runs the GPU kernel in interpret mode
(CPU tests); the TPU kernel's interpret mode is reachable through :func:`kernel_linear_scan`.

On a mesh the kernel sits behind the rule of the native scan
(:func:`jaxsparse.ops.native.partitioning.split_over_batch_and_channels`): every (batch row,
channel) is its own recurrence, so each device scans its own rows and channels, padded there
to whole kernel blocks; only a split time axis is gathered. Without it XLA would gather every
operand onto every device, as it does for any custom call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxsparse.ops.native.partitioning import split_over_batch_and_channels
from jaxsparse.ops.sizes import round_up
from pallas_kernels.linear_scan import linear_scan_config, scan, with_reverse_scan_vjp

# Time steps unrolled per block (GPU: per loop iteration; TPU: per grid step, a multiple of the
# 8 sublanes) and channels per program (GPU: one per thread of 4 warps; TPU: one lane row).
BLOCK_T = {"gpu": 16, "tpu": 64}
BLOCK_D = {"gpu": 128, "tpu": 128}


def _padded_kernel(cfg):
    """The kernel on float32 ``a, b [B, L, W]``, ``h0 [B, W]`` of any size: padding steps and
    channels get ``a = 1, b = 0`` (the state passes through), sliced off after."""

    def run(a, b, h0):
        batch, length, width = b.shape
        length_pad, width_pad = round_up(length, cfg.block_t), round_up(width, cfg.block_d)

        def pad(t, value):
            return jnp.pad(t, [(0, 0), (0, length_pad - length), (0, width_pad - width)],
                           constant_values=value)

        h0_k = jnp.pad(h0, [(0, 0), (0, width_pad - width)])[:, None, :]
        hs, final = scan(pad(a, 1.0), pad(b, 0.0), h0_k, cfg)
        return hs[:, :length, :width], final[:, 0, :width]

    return run


@functools.cache
def _differentiable_scan(backend: str, interpret: bool, block_t: int, block_d: int):
    cfg = linear_scan_config(backend=backend, interpret=interpret, block_t=block_t,
                             block_d=block_d)
    sharded = split_over_batch_and_channels(_padded_kernel(cfg), (3, 3, 2), (3, 2))
    return with_reverse_scan_vjp(sharded)


def kernel_linear_scan(a, b, h0, *, backend: str, interpret: bool, block_t: int | None = None,
                       block_d: int | None = None):
    """``h_t = a_t h_{t−1} + b_t`` through the kernels for ``a, b [batch, L, d]``, ``h0
    [batch, d]``: ``(h [batch, L, d], final [batch, d])`` in ``b``'s dtype, computed in
    float32. An empty batch, width or length returns at once (the initial state as the final
    one): the kernels' blocks would be larger than the operands."""
    if backend not in BLOCK_T:
        raise ValueError(f"kernel_linear_scan: backend={backend!r} must be one of "
                         f"{tuple(BLOCK_T)}")
    if b.size == 0:
        return jnp.zeros(b.shape, b.dtype), h0.astype(b.dtype)
    f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
    fn = _differentiable_scan(backend, bool(interpret),
                              BLOCK_T[backend] if block_t is None else block_t,
                              BLOCK_D[backend] if block_d is None else block_d)
    hs, final = fn(f32(a), f32(b), f32(h0))
    return hs.astype(b.dtype), final.astype(b.dtype)


def pallas_linear_scan(a, b, h0, *, interpret: bool, fallback):
    """Dispatch by lowering platform; ``fallback()`` is the XLA scan for other platforms."""
    if interpret:
        return kernel_linear_scan(a, b, h0, backend="gpu", interpret=True)
    return jax.lax.platform_dependent(
        cuda=lambda: kernel_linear_scan(a, b, h0, backend="gpu", interpret=False),
        tpu=lambda: kernel_linear_scan(a, b, h0, backend="tpu", interpret=False),
        default=fallback)
