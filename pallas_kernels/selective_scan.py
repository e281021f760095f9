"""Mamba-1 selective scan as Pallas kernels (GPU via Triton here, TPU via Mosaic in
:mod:`pallas_kernels.selective_scan_tpu`), forward and backward, behind one ``custom_vjp``.

Each program owns one batch row and one block of ``BD`` channels and walks time in blocks of
``T`` steps, keeping the ``[N, BD]`` state on chip; nothing of size length x d_inner x N is
written. The forward pass saves the state at the start of every time block (1/T of the full
state history); the backward pass walks the blocks in reverse, recomputes the T states of a
block from its saved start, and runs the reverse recurrence of :mod:`pallas_kernels._scan_math`
(the scheme of the reference CUDA kernel, which also recomputes per chunk).

Kernel-side layout (the wrapper in ``jaxsparse.ops.ssm_pallas`` converts):
  x ``[b, L, d]`` (any float dtype), dt ``[b, L, d]`` float32 (biased, softplus-ed),
  At ``[N, d]`` float32 (A transposed), Bt/Ct ``[b, groups, N, L]`` (time last, so one step is
  a ``[N, 1]`` column), h0 ``[b, N, d]`` float32.
  ``L`` is a multiple of ``T`` (padding steps carry dt = 0: decay 1, input 0) and ``d`` a
  multiple of ``BD``; a channel block never straddles two groups. Optional kt ``[b, 1, L]``
  float32, the reset factor of packed documents (0 at a document's first token, 1 elsewhere,
  padding included), multiplies the decay; without it the kernels take no such input.
Outputs: y ``[b, L, d]`` float32 (without the D skip or the gate) and the final state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _checks
from pallas_kernels._flash_vjp import KernelConfig
from pallas_kernels._scan_math import (backward_out_shapes, backward_step, forward_out_shapes,
                                       forward_step, split_keep)

f32 = jnp.float32


def _group_of(cfg):
    """Index map helper: the B/C group of channel block ``di``."""
    if cfg.groups == 1:
        return lambda di: 0
    return lambda di: jnp.minimum(di * cfg.block_d // cfg.per_group, cfg.groups - 1)


# --- GPU (Triton): one program per (batch, channel block), a loop over time blocks ---------


def _gpu_fwd_kernel(x_ref, dt_ref, At_ref, Bt_ref, Ct_ref, h0_ref, *refs, block_t, num_blocks,
                    has_keep):
    kt_ref, (y_ref, hl_ref, st_ref) = split_keep(refs, has_keep)
    At = At_ref[...]

    def block(k, h):
        st_ref[pl.ds(k, 1), :, :] = h[None]
        for i in range(block_t):  # unrolled: the scan is latency-bound
            row = pl.ds(k * block_t + i, 1)
            keep = kt_ref[:, row] if has_keep else None
            h, _, y = forward_step(h, x_ref[row, :].astype(f32), dt_ref[row, :], At,
                                   Bt_ref[:, row].astype(f32), Ct_ref[:, row].astype(f32), keep)
            y_ref[row, :] = y
        return h

    hl_ref[...] = jax.lax.fori_loop(0, num_blocks, block, h0_ref[...])


def _gpu_bwd_kernel(x_ref, dt_ref, At_ref, Bt_ref, Ct_ref, st_ref, dy_ref, dhl_ref, *refs,
                    block_t, num_blocks, has_keep):
    kt_ref, (dx_ref, ddt_ref, dAt_ref, dBt_ref, dCt_ref, dh0_ref) = split_keep(refs, has_keep)
    At = At_ref[...]

    def block(kk, carry):
        g, dA = carry
        k = num_blocks - 1 - kk
        rows = [pl.ds(k * block_t + i, 1) for i in range(block_t)]
        x = [x_ref[r, :].astype(f32) for r in rows]
        dt = [dt_ref[r, :] for r in rows]
        B = [Bt_ref[:, r].astype(f32) for r in rows]
        C = [Ct_ref[:, r].astype(f32) for r in rows]
        keep = [kt_ref[:, r] if has_keep else None for r in rows]
        hs, decays = [st_ref[pl.ds(k, 1), :, :][0]], []
        for i in range(block_t):  # recompute this block's states from its saved start
            h, a, _ = forward_step(hs[-1], x[i], dt[i], At, B[i], C[i], keep[i])
            hs.append(h)
            decays.append(a)
        for i in reversed(range(block_t)):
            g, dx, ddt, dA_t, dB, dC = backward_step(
                g, hs[i], hs[i + 1], decays[i], dy_ref[rows[i], :], x[i], dt[i], At, B[i], C[i])
            dA = dA + dA_t
            dx_ref[rows[i], :] = dx
            ddt_ref[rows[i], :] = ddt
            dBt_ref[:, rows[i]] = dB
            dCt_ref[:, rows[i]] = dC
        return g, dA

    g, dA = jax.lax.fori_loop(0, num_blocks, block, (dhl_ref[...], jnp.zeros_like(At)))
    dh0_ref[...] = g
    dAt_ref[...] = dA


def _gpu_specs(cfg, batch, length, d, n):
    group = _group_of(cfg)
    bd = cfg.block_d
    seq = pl.BlockSpec((None, length, bd), lambda b, c: (b, 0, c))
    col = pl.BlockSpec((None, None, n, length), lambda b, c: (b, group(c), 0, 0))
    state = pl.BlockSpec((None, n, bd), lambda b, c: (b, 0, c))
    return dict(seq=seq, col=col, state=state, At=pl.BlockSpec((n, bd), lambda b, c: (0, c)),
                starts=pl.BlockSpec((None, length // cfg.block_t, n, bd), lambda b, c: (b, 0, 0, c)),
                own_col=pl.BlockSpec((None, None, n, length), lambda b, c: (b, c, 0, 0)),
                keep=pl.BlockSpec((None, 1, length), lambda b, c: (b, 0, 0)),
                grid=(batch, d // bd))


def _gpu_params(cfg):
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=1)


def _gpu_forward(x, dt, At, Bt, Ct, h0, kt, cfg):
    batch, length, d = x.shape
    n = At.shape[0]
    s = _gpu_specs(cfg, batch, length, d, n)
    num_blocks = length // cfg.block_t
    has_keep = kt is not None
    return pl.pallas_call(
        functools.partial(_gpu_fwd_kernel, block_t=cfg.block_t, num_blocks=num_blocks,
                          has_keep=has_keep),
        grid=s["grid"],
        in_specs=[s["seq"], s["seq"], s["At"], s["col"], s["col"], s["state"]]
        + [s["keep"]] * has_keep,
        out_specs=[s["seq"], s["state"], s["starts"]],
        out_shape=forward_out_shapes(batch, length, d, n, num_blocks),
        compiler_params=_gpu_params(cfg), interpret=cfg.interpret, name="selective_scan_fwd",
    )(x, dt, At, Bt, Ct, h0, *[kt] * has_keep)


def _gpu_backward(x, dt, At, Bt, Ct, starts, dy, dhl, kt, cfg):
    batch, length, d = x.shape
    n = At.shape[0]
    s = _gpu_specs(cfg, batch, length, d, n)
    blocks_d = d // cfg.block_d
    has_keep = kt is not None
    return pl.pallas_call(
        functools.partial(_gpu_bwd_kernel, block_t=cfg.block_t, num_blocks=length // cfg.block_t,
                          has_keep=has_keep),
        grid=s["grid"],
        in_specs=[s["seq"], s["seq"], s["At"], s["col"], s["col"], s["starts"], s["seq"],
                  s["state"]] + [s["keep"]] * has_keep,
        out_specs=[s["seq"], s["seq"], s["state"], s["own_col"], s["own_col"], s["state"]],
        out_shape=backward_out_shapes(batch, length, d, n, blocks_d),
        compiler_params=_gpu_params(cfg), interpret=cfg.interpret, name="selective_scan_bwd",
    )(x, dt, At, Bt, Ct, starts, dy, dhl, *[kt] * has_keep)


# --- the custom VJP, shared by both backends ------------------------------------------------


def _kernels(cfg):
    if cfg.backend == "tpu":
        from pallas_kernels import selective_scan_tpu

        return selective_scan_tpu.forward, selective_scan_tpu.backward
    return _gpu_forward, _gpu_backward


def _sum_channel_blocks(dBt, cfg):
    """``[b, channel blocks, N, L]`` partial sums -> ``[b, groups, N, L]``."""
    batch, blocks, n, length = dBt.shape
    if cfg.groups == 1:
        return dBt.sum(axis=1, keepdims=True)
    per_group_blocks = cfg.per_group // cfg.block_d
    real = cfg.groups * per_group_blocks  # blocks past the real channels are padding
    return dBt[:, :real].reshape(batch, cfg.groups, per_group_blocks, n, length).sum(axis=2)


def check_operands(x, dt, At, Bt, Ct, h0, kt, cfg, where: str = "selective_scan") -> None:
    """The kernel-side layout of the module docstring, padded to whole blocks: ``L`` a
    multiple of ``block_t``, ``d`` of ``block_d``, channel blocks inside one group; on GPU
    ``N`` a power of two (Triton loads), on TPU ``x`` in float32."""
    _checks.ndim(where, "x", x, 3, "[b, L, d]")
    batch, length, d = x.shape
    _checks.ndim(where, "At", At, 2, "[N, d]")
    n = At.shape[0]
    _checks.shape(where, "dt", dt, x.shape)
    _checks.shape(where, "At", At, (n, d))
    for name, arr in (("Bt", Bt), ("Ct", Ct)):
        _checks.shape(where, name, arr, (batch, cfg.groups, n, length))
    _checks.shape(where, "h0", h0, (batch, n, d))
    if kt is not None:
        _checks.shape(where, "kt", kt, (batch, 1, length))
    _checks.multiple(where, "x.shape[1] (L)", length, "block_t", cfg.block_t)
    _checks.multiple(where, "x.shape[2] (d)", d, "block_d", cfg.block_d)
    if cfg.groups > 1:
        _checks.multiple(where, "per_group", cfg.per_group, "block_d", cfg.block_d)
        if cfg.groups * cfg.per_group > d:
            raise ValueError(f"{where}: groups·per_group={cfg.groups}·{cfg.per_group} channels "
                             f"exceed x.shape[2]={d}")
    if cfg.backend == "gpu":
        _checks.power_of_two(where, "d_state N (At.shape[0])", n)
    elif x.dtype != jnp.float32:
        raise ValueError(f"{where}: the TPU kernel takes x in float32, got {x.dtype}")


@functools.cache
def differentiable_scan(cfg: KernelConfig, has_keep: bool, split_rows=None):
    """``scan(x, dt, At, Bt, Ct, h0, kt) -> (y [b, L, d] float32, final state [b, N, d])`` with
    the kernels' backward as its VJP (see the module docstring); ``kt`` is None unless
    ``has_keep`` (then the float32 reset factor ``[b, 1, L]``, 0 where a packed document
    starts). Operands outside that layout (not padded to whole blocks, say) raise
    ``ValueError`` (:func:`check_operands`).

    ``split_rows(kernel, operand_kinds, result_kinds)``, if given, wraps the forward and the
    backward kernel call, each ``kernel(*operands) -> tuple``, before use; a kind is ``"rows"``
    (leads with the batch row: here every operand and result but At) or ``"whole"`` (At), so
    a caller can hand the calls a sharding rule that keeps each device on its own rows (this
    package depends on JAX alone)."""
    forward_kernel, backward_kernel = _kernels(cfg)

    def forward(*operands):  # x, dt, At, Bt, Ct, h0[, kt]
        return tuple(forward_kernel(*operands[:6], operands[6] if has_keep else None, cfg))

    def backward(*operands):  # x, dt, At, Bt, Ct, starts, dy, dh_last[, kt]
        return tuple(backward_kernel(*operands[:8], operands[8] if has_keep else None, cfg))

    if split_rows is not None:
        rows = lambda n: ("rows",) * n  # noqa: E731
        forward = split_rows(forward, rows(2) + ("whole",) + rows(3 + has_keep), rows(3))
        backward = split_rows(backward, rows(2) + ("whole",) + rows(5 + has_keep), rows(6))

    def keep_operand(kt):
        if (kt is not None) != has_keep:
            raise ValueError(f"kt={'None' if kt is None else kt.shape}: this scan was built "
                             f"with has_keep={has_keep}")
        return (kt,) if has_keep else ()

    @jax.custom_vjp
    def _scan(x, dt, At, Bt, Ct, h0, kt):
        y, h_last, _ = forward(x, dt, At, Bt, Ct, h0, *keep_operand(kt))
        return y, h_last

    def scan_fwd(x, dt, At, Bt, Ct, h0, kt):
        y, h_last, starts = forward(x, dt, At, Bt, Ct, h0, *keep_operand(kt))
        return (y, h_last), (x, dt, At, Bt, Ct, starts, kt)

    def scan_bwd(residuals, cotangents):
        x, dt, At, Bt, Ct, starts, kt = residuals
        dy, dh_last = cotangents
        dx, ddt, dAt, dBt, dCt, dh0 = backward(x, dt, At, Bt, Ct, starts, dy.astype(f32),
                                               dh_last.astype(f32), *keep_operand(kt))
        dkt = None if kt is None else jnp.zeros_like(kt)  # a constant: ids have no gradient
        return (dx.astype(x.dtype), ddt, dAt.sum(axis=0),
                _sum_channel_blocks(dBt, cfg).astype(Bt.dtype),
                _sum_channel_blocks(dCt, cfg).astype(Ct.dtype), dh0, dkt)

    _scan.defvjp(scan_fwd, scan_bwd)

    def scan(x, dt, At, Bt, Ct, h0, kt):
        keep_operand(kt)  # kt given iff the scan was built for it
        check_operands(x, dt, At, Bt, Ct, h0, kt, cfg)
        return _scan(x, dt, At, Bt, Ct, h0, kt)

    return scan


def scan_config(*, backend: str, interpret: bool, groups: int, per_group: int, block_t: int,
                block_d: int, num_warps: int = 1) -> KernelConfig:
    """``groups`` of ``per_group`` channels; ``block_t`` steps and ``block_d`` channels per
    block: ``block_d`` a power of two on GPU, and on TPU hardware ``block_t`` and ``block_d``
    multiples of 128 (interpret mode takes any)."""
    where = f"scan_config(backend={backend!r})"
    _checks.backend(where, backend)
    for name, value in (("groups", groups), ("per_group", per_group), ("block_t", block_t),
                        ("block_d", block_d), ("num_warps", num_warps)):
        _checks.positive_int(where, name, value)
    _checks.scan_tiles(where, backend, interpret, block_t, block_d, tpu_block_t=128)
    return KernelConfig(backend=backend, interpret=bool(interpret), groups=int(groups),
                        per_group=int(per_group), block_t=int(block_t), block_d=int(block_d),
                        num_warps=int(num_warps))
