"""The first-order linear scan ``h_t = a_t ⊙ h_{t−1} + b_t`` (Hydra's diagonal SSM) as Pallas
kernels: Triton on GPU here, Mosaic on TPU in :mod:`pallas_kernels.linear_scan_tpu`.

Each program owns one batch row and one block of ``BD`` channels and walks time in blocks of
``T`` unrolled steps, the ``[1, BD]`` state in registers; every step reads a row of ``a`` and of
``b`` and writes a row of ``h`` (3 x 4 bytes per element: the scan is bound by memory
bandwidth, which a log-depth ``lax.associative_scan`` spends ~2 log2(L) times over).

The backward pass needs no kernel of its own. With λ_t = dL/dh_t (all paths into h_t):

    λ_t = g_t + a_{t+1} λ_{t+1},   λ_{L−1} = g_{L−1} + g_final,
    db_t = λ_t,   da_t = λ_t h_{t−1} (h_{−1} = h_0),   dh_0 = a_0 λ_0,

which is the same scan run backwards in time: decays ``a`` shifted one step (1 past the end),
inputs ``g``, initial state ``g_final``.

Kernel-side layout (:mod:`jaxsparse.ops.linear_scan_pallas` pads): ``a, b [batch, L, d]``
and ``h0 [batch, 1, d]``, all float32; ``L`` a multiple of ``T``
(padding steps carry a = 1, b = 0, so the state passes through) and ``d`` of ``BD``.
Outputs: ``h [batch, L, d]`` and the final state ``[batch, 1, d]``, float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _checks
from pallas_kernels._flash_vjp import KernelConfig

f32 = jnp.float32


def _gpu_kernel(a_ref, b_ref, h0_ref, h_ref, hl_ref, *, block_t, num_blocks):
    def block(k, h):
        for i in range(block_t):  # unrolled: the loads do not wait on the state
            row = pl.ds(k * block_t + i, 1)
            h = a_ref[row, :] * h + b_ref[row, :]
            h_ref[row, :] = h
        return h

    hl_ref[...] = jax.lax.fori_loop(0, num_blocks, block, h0_ref[...])


def _gpu_scan(a, b, h0, cfg):
    batch, length, d = a.shape
    seq = pl.BlockSpec((None, length, cfg.block_d), lambda i, c: (i, 0, c))
    state = pl.BlockSpec((None, 1, cfg.block_d), lambda i, c: (i, 0, c))
    return pl.pallas_call(
        functools.partial(_gpu_kernel, block_t=cfg.block_t, num_blocks=length // cfg.block_t),
        grid=(batch, d // cfg.block_d),
        in_specs=[seq, seq, state],
        out_specs=[seq, state],
        out_shape=[jax.ShapeDtypeStruct((batch, length, d), f32),
                   jax.ShapeDtypeStruct((batch, 1, d), f32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=cfg.interpret, name="linear_scan",
    )(a, b, h0)


def check_operands(a, b, h0, cfg, where: str = "linear_scan.scan") -> None:
    """``a, b [batch, L, d]``, ``h0 [batch, 1, d]`` with ``L % block_t == 0`` and
    ``d % block_d == 0`` (else the last block reads past the arrays)."""
    _checks.ndim(where, "a", a, 3, "[batch, L, d]")
    _checks.shape(where, "b", b, a.shape)
    batch, length, d = a.shape
    _checks.shape(where, "h0", h0, (batch, 1, d))
    _checks.multiple(where, "a.shape[1] (L)", length, "block_t", cfg.block_t)
    _checks.multiple(where, "a.shape[2] (d)", d, "block_d", cfg.block_d)


def scan(a, b, h0, cfg):
    """The kernel chosen by ``cfg.backend`` (no VJP; see :func:`with_reverse_scan_vjp`) on
    padded float32 operands (the module docstring); other shapes raise ``ValueError``."""
    check_operands(a, b, h0, cfg)
    if cfg.backend == "tpu":
        from pallas_kernels import linear_scan_tpu

        return linear_scan_tpu.scan(a, b, h0, cfg)
    return _gpu_scan(a, b, h0, cfg)


def with_reverse_scan_vjp(scan_fn):
    """``scan_fn(a, b, h0) -> (h [B, L, W], final [B, W])`` as a differentiable function whose
    backward is ``scan_fn`` again, backwards in time (the module docstring). ``scan_fn`` may be
    the kernel itself or the kernel behind a sharding rule; float32 throughout."""

    @jax.custom_vjp
    def linear_scan(a, b, h0):
        return scan_fn(a, b, h0)

    def fwd(a, b, h0):
        hs, final = scan_fn(a, b, h0)
        return (hs, final), (a, h0, hs)

    def bwd(residuals, cotangents):
        a, h0, hs = residuals
        g_hs, g_final = cotangents
        # λ in reverse time: decays a_{t+1} (1 after the last step), inputs g_t, start g_final
        next_decay = jnp.concatenate([a[:, 1:], jnp.ones_like(a[:, :1])], axis=1)
        lam_reversed, _ = scan_fn(next_decay[:, ::-1], g_hs[:, ::-1], g_final)
        lam = lam_reversed[:, ::-1]
        h_prev = jnp.concatenate([h0[:, None], hs[:, :-1]], axis=1)
        return lam * h_prev, lam, a[:, 0] * lam[:, 0]

    linear_scan.defvjp(fwd, bwd)
    return linear_scan


def linear_scan_config(*, backend: str, interpret: bool, block_t: int, block_d: int,
                       num_warps: int = 4) -> KernelConfig:
    """``block_t`` steps unrolled per block, ``block_d`` channels per program: a power of two
    on GPU (a Triton block); on TPU hardware ``block_t % 8 == 0`` and ``block_d % 128 == 0``
    (interpret mode takes any)."""
    where = f"linear_scan_config(backend={backend!r})"
    _checks.backend(where, backend)
    for name, value in (("block_t", block_t), ("block_d", block_d), ("num_warps", num_warps)):
        _checks.positive_int(where, name, value)
    _checks.scan_tiles(where, backend, interpret, block_t, block_d, tpu_block_t=8)
    return KernelConfig(backend=backend, interpret=bool(interpret), block_t=int(block_t),
                        block_d=int(block_d), num_warps=int(num_warps))
