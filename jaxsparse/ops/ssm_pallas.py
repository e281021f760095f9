"""``selective_scan(..., implementation="pallas" | "pallas_interpret")``: layout, padding and
backend choice around the kernels in :mod:`pallas_kernels.selective_scan`.

The kernels run only the recurrence; dt's bias and softplus, the D skip and the z gate are
elementwise and stay in XLA (autodiff handles them). ``"pallas"`` picks the kernel by the
platform being *lowered for* (``jax.lax.platform_dependent``), so it lowers for TPU and CUDA
from a CPU host; on other platforms it runs the chunked XLA scan. ``"pallas_interpret"`` runs
the GPU kernel in interpret mode (CPU tests); the TPU kernel's interpret mode is reachable
through :func:`kernel_scan` with ``backend="tpu"``. On a mesh the kernels sit behind the
native scan's row rule (:func:`jaxsparse.ops.native.partitioning.split_over_rows`): each
device scans its own batch rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.native.partitioning import split_over_rows
from jaxsparse.ops.sizes import round_up
from pallas_kernels.selective_scan import differentiable_scan, scan_config

# Time steps per block: the GPU keeps a block's recomputed states in registers during the
# backward pass; the TPU blocks B/C as [N, T] tiles whose lane dimension must be 128.
BLOCK_T = {"gpu": 16, "tpu": 128}
GPU_BLOCK_D = 32  # channels per Triton program: [N, 32] state = 512 floats, one warp
TPU_BLOCK_D = 128  # one lane row


def _block_d(backend: str, d_inner: int, groups: int) -> int:
    per_group = d_inner // groups
    if backend == "tpu":
        if groups > 1 and per_group % TPU_BLOCK_D:
            raise ValueError(f"implementation='pallas' on TPU needs d_inner/groups (={per_group}) "
                             f"to be a multiple of {TPU_BLOCK_D} when groups={groups} > 1")
        return TPU_BLOCK_D
    if groups == 1:
        return GPU_BLOCK_D
    block = GPU_BLOCK_D
    while per_group % block:  # a channel block must stay inside one group
        block //= 2
    return block


def kernel_scan(x, dt, A, B, C, h0, keep=None, *, backend: str, interpret: bool,
                block_t: int | None = None):
    """The recurrence through the kernels: ``dt`` final (float32), ``h0 [b, d, N]`` float32,
    ``keep`` ``None`` or the float32 ``[b, L]`` reset factor of packed documents
    (:func:`jaxsparse.ops.segments.keep_factor`). Returns ``(y [b, L, d] float32, final state
    [b, d, N])``."""
    batch, length, d_inner = x.shape
    d_state, groups = A.shape[1], B.shape[2]
    block_t = block_t or BLOCK_T[backend]
    block_d = _block_d(backend, d_inner, groups)
    # Triton loads need power-of-two shapes; Mosaic wants whole sublane tiles.
    n_pad = 1 << (d_state - 1).bit_length() if backend == "gpu" else round_up(d_state, 8)
    length_pad, d_pad = round_up(length, block_t), round_up(d_inner, block_d)

    def pad(t, sizes, value=0.0):
        return jnp.pad(t, [(0, s - n) for n, s in zip(t.shape, sizes)], constant_values=value)

    # padding: steps and channels get dt = 0 (decay 1, no input); states get A = -1, B = C = 0
    # Mosaic row loads are simplest on 32-bit refs; Triton reads x in its own dtype.
    x_k = pad(x.astype(jnp.float32) if backend == "tpu" else x, (batch, length_pad, d_pad))
    dt_k = pad(dt, (batch, length_pad, d_pad))
    At = pad(A.astype(jnp.float32).T, (n_pad, d_pad), value=-1.0)
    Bt = pad(jnp.transpose(B, (0, 2, 3, 1)), (batch, groups, n_pad, length_pad))
    Ct = pad(jnp.transpose(C, (0, 2, 3, 1)), (batch, groups, n_pad, length_pad))
    h0_k = pad(jnp.transpose(h0, (0, 2, 1)), (batch, n_pad, d_pad))
    # padding steps keep the state (factor 1), like their dt = 0
    kt = None if keep is None else pad(keep[:, None, :], (batch, 1, length_pad), value=1.0)
    cfg = scan_config(backend=backend, interpret=interpret, groups=groups,
                      per_group=d_inner // groups, block_t=block_t, block_d=block_d)
    # every batch row is its own recurrence: on a mesh each device runs the kernels on its rows
    # (A whole; its gradient leaves per row and is summed over the rows after, in XLA)
    scan = differentiable_scan(cfg, kt is not None, split_rows=split_over_rows)
    y, h_last = scan(x_k, dt_k, At, Bt, Ct, h0_k, kt)
    return y[:, :length, :d_inner], jnp.transpose(h_last[:, :d_state, :d_inner], (0, 2, 1))


def pallas_selective_scan(x, dt, A, B, C, h0, keep=None, *, interpret: bool, fallback):
    """Dispatch by lowering platform. ``fallback()`` is the XLA scan for other platforms."""
    if interpret:
        return kernel_scan(x, dt, A, B, C, h0, keep, backend="gpu", interpret=True)
    # Every branch is traced whatever the target, so a shape the TPU kernel cannot tile
    # takes the XLA scan on TPU instead of failing CUDA lowering too.
    d_inner, groups = x.shape[2], B.shape[2]
    tpu_can_serve = groups == 1 or (d_inner // groups) % TPU_BLOCK_D == 0
    return jax.lax.platform_dependent(
        cuda=lambda: kernel_scan(x, dt, A, B, C, h0, keep, backend="gpu", interpret=False),
        tpu=((lambda: kernel_scan(x, dt, A, B, C, h0, keep, backend="tpu", interpret=False))
             if tpu_can_serve else fallback),
        default=fallback)
