"""``linear_scan(..., implementation="pallas" | "pallas_interpret")``: layout, padding and
backend choice around the kernels of :mod:`pallas_kernels.linear_scan`.

``"pallas"`` picks the kernel by the platform being *lowered for*
(``jax.lax.platform_dependent``), so it lowers for CUDA and TPU from a CPU host; on other
platforms it runs ``fallback()``. ``"pallas_interpret"`` runs the GPU kernel in interpret mode
(CPU tests); the TPU kernel's interpret mode is reachable through :func:`kernel_linear_scan`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.linear_scan import linear_scan_config, linear_scan_core

# Time steps unrolled per block (GPU: per loop iteration; TPU: per grid step, a multiple of the
# 8 sublanes) and channels per program (GPU: one per thread of 4 warps; TPU: one lane row).
BLOCK_T = {"gpu": 16, "tpu": 64}
BLOCK_D = {"gpu": 128, "tpu": 128}


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def kernel_linear_scan(a, b, h0, *, backend: str, interpret: bool, block_t: int | None = None,
                       block_d: int | None = None):
    """``h_t = a_t h_{t−1} + b_t`` through the kernels for ``a, b [batch, L, d]``, ``h0
    [batch, d]``: ``(h [batch, L, d], final [batch, d])`` in ``b``'s dtype, computed in
    float32."""
    batch, length, d = b.shape
    block_t, block_d = block_t or BLOCK_T[backend], block_d or BLOCK_D[backend]
    length_pad, d_pad = _round_up(length, block_t), _round_up(d, block_d)

    def pad(t, value):  # padding steps and channels: a = 1, b = 0 (the state passes through)
        t = t.astype(jnp.float32)
        return jnp.pad(t, [(0, 0), (0, length_pad - length), (0, d_pad - d)],
                       constant_values=value)

    h0_k = jnp.pad(h0.astype(jnp.float32), [(0, 0), (0, d_pad - d)])[:, None, :]
    cfg = linear_scan_config(backend=backend, interpret=interpret, block_t=block_t,
                             block_d=block_d)
    hs, final = linear_scan_core(pad(a, 1.0), pad(b, 0.0), h0_k, cfg)
    return hs[:, :length, :d].astype(b.dtype), final[:, 0, :d].astype(b.dtype)


def pallas_linear_scan(a, b, h0, *, interpret: bool, fallback):
    """Dispatch by lowering platform; ``fallback()`` is the XLA scan for other platforms."""
    if interpret:
        return kernel_linear_scan(a, b, h0, backend="gpu", interpret=True)
    return jax.lax.platform_dependent(
        cuda=lambda: kernel_linear_scan(a, b, h0, backend="gpu", interpret=False),
        tpu=lambda: kernel_linear_scan(a, b, h0, backend="tpu", interpret=False),
        default=fallback)
