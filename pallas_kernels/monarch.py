"""Fused Monarch product ``y = x @ Mᵀ``, ``M = P L Pᵀ R`` (Dao et al. 2022), as Pallas kernels:
GPU (Triton) here, TPU (Mosaic) in :mod:`pallas_kernels.monarch_tpu`, one ``custom_vjp``.

Factors ``w1 [b, q, p]`` (block-diagonal ``R``) and ``w2 [b, s, q]`` (block-diagonal ``L``),
``q`` a multiple of ``b``; see :mod:`jaxsparse.ops.monarch` for the layout. One program owns a
tile of ``bt`` tokens and does the whole product for it:

  1. for each input block ``k``: ``h[:, k·q:(k+1)·q] = x[:, k·p:(k+1)·p] @ w1[k]ᵀ``;
  2. for each output block ``l``: ``y[:, l::b] = h[:, l::b] @ w2[l]ᵀ``.

The permutations between and after the factors are strided loads and stores (stride ``b``),
so no transposed copy of the activations is ever made. The intermediate ``h`` of a tile is
written to a buffer that the same program reads back after a barrier (it stays in L2); the
buffer is also the residual the backward pass needs, as in the reference CUDA path, which
saves the first factor's output. Backward: a token-tile kernel for ``dx`` (and ``dh``), and a
block kernel that sums the weight gradients over all token tiles.
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
_NT = (((1,), (1,)), ((), ()))  # a @ bᵀ
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # aᵀ @ b


def _dot(a, b, dims):
    return jax.lax.dot_general(a, b, dims, preferred_element_type=f32)


def monarch_config(*, backend: str, interpret: bool, nblocks: int, block_tokens: int
                   ) -> KernelConfig:
    """``block_tokens`` per program: a power of two >= 16 on GPU (a ``tl.dot`` operand), a
    multiple of 128 on TPU (tokens lie on lanes)."""
    where = f"monarch_config(backend={backend!r})"
    _checks.backend(where, backend)
    _checks.positive_int(where, "nblocks", nblocks)
    _checks.positive_int(where, "block_tokens", block_tokens)
    if backend == "gpu":
        _checks.power_of_two(where, "block_tokens", block_tokens, 16)
    elif block_tokens % 128:
        raise ValueError(f"{where}: block_tokens={block_tokens} must be a multiple of 128 "
                         "(TPU lanes)")
    return KernelConfig(backend=backend, interpret=bool(interpret), nblocks=int(nblocks),
                        block_tokens=int(block_tokens))


# --- GPU (Triton) -----------------------------------------------------------------------------


def _barrier(interpret: bool):
    """CTA barrier between writing a tile's buffer and reading it back strided (interpret mode
    runs sequentially and has no barrier primitive)."""
    if not interpret:
        plgpu.debug_barrier()


def _gpu_forward_kernel(x_ref, w1_ref, w2_ref, y_ref, h_ref, *, b, p, q, s, interpret):
    def first_factor(k, carry):
        x_k = x_ref[:, pl.ds(pl.multiple_of(k * p, p), p)]
        h_ref[:, pl.ds(pl.multiple_of(k * q, q), q)] = _dot(x_k, w1_ref[k], _NT)
        return carry

    jax.lax.fori_loop(0, b, first_factor, 0)
    _barrier(interpret)  # every thread's h stores are visible before any strided read

    def second_factor(l, carry):
        g = h_ref[:, pl.ds(l, q, stride=b)].astype(w2_ref.dtype)
        y_ref[:, pl.ds(l, s, stride=b)] = _dot(g, w2_ref[l], _NT).astype(y_ref.dtype)
        return carry

    jax.lax.fori_loop(0, b, second_factor, 0)


def _gpu_dx_kernel(dy_ref, w1_ref, w2_ref, dx_ref, dh_ref, *, b, p, q, s, interpret):
    def second_factor(l, carry):
        dy_l = dy_ref[:, pl.ds(l, s, stride=b)]
        dh_ref[:, pl.ds(l, q, stride=b)] = _dot(dy_l, w2_ref[l], _NN)
        return carry

    jax.lax.fori_loop(0, b, second_factor, 0)
    _barrier(interpret)

    def first_factor(k, carry):
        dh_k = dh_ref[:, pl.ds(pl.multiple_of(k * q, q), q)].astype(w1_ref.dtype)
        dx_ref[:, pl.ds(pl.multiple_of(k * p, p), p)] = _dot(dh_k, w1_ref[k], _NN).astype(
            dx_ref.dtype)
        return carry

    jax.lax.fori_loop(0, b, first_factor, 0)


def _gpu_dw_kernel(x_ref, h_ref, dy_ref, dh_ref, dw1_ref, dw2_ref, *, b, p, q, s, bt, tiles):
    """Program ``i`` sums block ``i``'s weight gradients over every token tile."""
    i = pl.program_id(0)

    def tile(t, acc):
        dw1, dw2 = acc
        rows = pl.ds(pl.multiple_of(t * bt, bt), bt)
        x_k = x_ref[rows, pl.ds(pl.multiple_of(i * p, p), p)]
        dh_k = dh_ref[rows, pl.ds(pl.multiple_of(i * q, q), q)].astype(x_k.dtype)
        g_l = h_ref[rows, pl.ds(i, q, stride=b)].astype(x_k.dtype)
        dy_l = dy_ref[rows, pl.ds(i, s, stride=b)]
        return dw1 + _dot(dh_k, x_k, _TN), dw2 + _dot(dy_l, g_l, _TN)

    dw1, dw2 = jax.lax.fori_loop(0, tiles, tile, (jnp.zeros((q, p), f32), jnp.zeros((s, q), f32)))
    dw1_ref[...] = dw1
    dw2_ref[...] = dw2


def _gpu_call(kernel, cfg, ins, out_shape, name, grid=None, in_specs=None, out_specs=None):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=cfg.interpret, name=name)(*ins)


def tile_constraints(backend: str, b: int, p: int, q: int, s: int) -> str | None:
    """Why the ``backend`` kernel cannot tile factors of ``b`` blocks ``p -> q -> s``, or None
    if it can: Triton blocks are powers of two and ``tl.dot`` needs every dim >= 16; Mosaic
    needs multiples of 8, with ``n = b·p`` and ``m = b·s`` multiples of 128 (the in-VMEM
    transposes)."""
    dims = dict(p=p, q=q, s=s)
    if backend == "gpu":
        bad = {k: v for k, v in dims.items() if v < 16 or v & (v - 1)}
        return f"the GPU kernel needs p, q, s powers of two >= 16, got {bad}" if bad else None
    bad = {k: v for k, v in dims.items() if v % 8}
    if bad:
        return f"the TPU kernel needs p, q, s multiples of 8, got {bad}"
    if (b * p) % 128 or (b * s) % 128:
        return f"the TPU kernel needs n={b * p} and m={b * s} multiples of 128"
    return None


def check_operands(x, w1, w2, cfg, where: str = "monarch", tokens_multiple: bool = False
                   ) -> None:
    """``x [T, n]``, ``w1 [b, q, p]``, ``w2 [b, s, q]`` with ``b = cfg.nblocks``, ``n = b·p``,
    ``q`` a multiple of ``b``, one dtype; on GPU ``p, q, s`` powers of two >= 16 (``tl.dot``),
    on TPU multiples of 8 with ``n``, ``m`` multiples of 128 (the in-VMEM transposes).
    ``tokens_multiple``: ``T`` must be whole tiles of ``block_tokens`` (the raw kernels)."""
    _checks.ndim(where, "x", x, 2, "[tokens, n]")
    _checks.ndim(where, "w1", w1, 3, "[b, q, p]")
    _checks.ndim(where, "w2", w2, 3, "[b, s, q]")
    b, q, p = w1.shape
    s = w2.shape[1]
    if b != cfg.nblocks:
        raise ValueError(f"{where}: w1.shape={tuple(w1.shape)} has b={b} blocks, the config "
                         f"nblocks={cfg.nblocks}")
    _checks.shape(where, "w2", w2, (b, s, q))
    _checks.shape(where, "x", x, (x.shape[0], b * p))
    _checks.multiple(where, "q (w1.shape[1])", q, "b", b)
    if not x.dtype == w1.dtype == w2.dtype:
        raise ValueError(f"{where}: x, w1 and w2 must share one dtype; got {x.dtype}, "
                         f"{w1.dtype}, {w2.dtype}")
    if tokens_multiple:
        _checks.multiple(where, "x.shape[0] (tokens)", x.shape[0], "block_tokens",
                         cfg.block_tokens)
    why = tile_constraints(cfg.backend, b, p, q, s)
    if why:
        raise ValueError(f"{where}: {why}")


def _sizes(x, w1, w2):
    b, q, p = w1.shape
    return dict(b=b, p=p, q=q, s=w2.shape[1])


def _gpu_forward(x, w1, w2, cfg):
    sz = _sizes(x, w1, w2)
    tokens, bt = x.shape[0], cfg.block_tokens
    n, mid, m = x.shape[1], sz["b"] * sz["q"], sz["b"] * sz["s"]
    whole = lambda arr: pl.BlockSpec(arr.shape, lambda i: (0,) * arr.ndim)  # noqa: E731
    return _gpu_call(
        functools.partial(_gpu_forward_kernel, **sz, interpret=cfg.interpret), cfg, (x, w1, w2),
        (jax.ShapeDtypeStruct((tokens, m), x.dtype), jax.ShapeDtypeStruct((tokens, mid), f32)),
        "monarch_forward", grid=(tokens // bt,),
        in_specs=[pl.BlockSpec((bt, n), lambda i: (i, 0)), whole(w1), whole(w2)],
        out_specs=[pl.BlockSpec((bt, m), lambda i: (i, 0)), pl.BlockSpec((bt, mid), lambda i: (i, 0))])


def _gpu_backward(x, w1, w2, h, dy, cfg):
    sz = _sizes(x, w1, w2)
    tokens, bt = x.shape[0], cfg.block_tokens
    n, mid, m = x.shape[1], sz["b"] * sz["q"], sz["b"] * sz["s"]
    whole = lambda arr: pl.BlockSpec(arr.shape, lambda i: (0,) * arr.ndim)  # noqa: E731
    dx, dh = _gpu_call(
        functools.partial(_gpu_dx_kernel, **sz, interpret=cfg.interpret), cfg, (dy, w1, w2),
        (jax.ShapeDtypeStruct((tokens, n), x.dtype), jax.ShapeDtypeStruct((tokens, mid), f32)),
        "monarch_backward_dx", grid=(tokens // bt,),
        in_specs=[pl.BlockSpec((bt, m), lambda i: (i, 0)), whole(w1), whole(w2)],
        out_specs=[pl.BlockSpec((bt, n), lambda i: (i, 0)), pl.BlockSpec((bt, mid), lambda i: (i, 0))])
    b, p, q, s = sz["b"], sz["p"], sz["q"], sz["s"]
    dw1, dw2 = _gpu_call(
        functools.partial(_gpu_dw_kernel, **sz, bt=bt, tiles=tokens // bt), cfg, (x, h, dy, dh),
        (jax.ShapeDtypeStruct((b, q, p), f32), jax.ShapeDtypeStruct((b, s, q), f32)),
        "monarch_backward_dw", grid=(b,),
        in_specs=[whole(x), whole(h), whole(dy), whole(dh)],
        out_specs=[pl.BlockSpec((None, q, p), lambda i: (i, 0, 0)),
                   pl.BlockSpec((None, s, q), lambda i: (i, 0, 0))])
    return dx, dw1, dw2


# --- custom VJP over both backends ------------------------------------------------------------


def _backend(cfg):
    if cfg.backend == "tpu":
        from pallas_kernels import monarch_tpu

        return monarch_tpu.forward, monarch_tpu.backward
    return _gpu_forward, _gpu_backward


def _pad_tokens(t, tokens: int, axis: int = 0):
    pad = [(0, 0)] * t.ndim
    pad[axis] = (0, tokens - t.shape[axis])
    return jnp.pad(t, pad)


@functools.cache
def differentiable_monarch(cfg: KernelConfig, split_rows=None):
    """``monarch(x [T, n], w1, w2) -> [T, m]`` in ``x.dtype`` for any ``T`` (tokens padded to
    whole tiles inside each call: zero rows add nothing to the weight gradients), with the
    kernels' backward as its VJP.

    ``split_rows(kernel, operand_kinds, result_kinds)``, if given, wraps the forward and the
    backward call, each ``kernel(*operands) -> tuple``: kinds are ``"rows"`` (token rows),
    ``"rows_last"`` (tokens on the last axis: the TPU kernel's transposed intermediate),
    ``"whole"`` (the weights) and ``"row_sum"`` (the weight gradients, sums over the rows), so
    a caller can hand the calls a sharding rule that keeps each device on its own tokens
    (padding then happens per device; this package depends on JAX alone).

    Factors the kernel cannot tile, or ``x``, ``w1``, ``w2`` of different dtypes, raise
    ``ValueError`` (:func:`check_operands`)."""
    forward_kernel, backward_kernel = _backend(cfg)
    bt = cfg.block_tokens
    h_axis = 1 if cfg.backend == "tpu" else 0  # the saved intermediate's token axis

    def padded(tokens):
        return max(bt, -(-tokens // bt) * bt)

    def forward(x, w1, w2):
        tokens = x.shape[0]
        y, h = forward_kernel(_pad_tokens(x, padded(tokens)), w1, w2, cfg)
        return y[:tokens], jax.lax.slice_in_dim(h, 0, tokens, axis=h_axis)

    def backward(x, w1, w2, h, dy):
        tokens = x.shape[0]
        full = padded(tokens)
        dx, dw1, dw2 = backward_kernel(_pad_tokens(x, full), w1, w2,
                                       _pad_tokens(h, full, h_axis), _pad_tokens(dy, full), cfg)
        return dx[:tokens], dw1, dw2

    if split_rows is not None:
        h_kind = "rows_last" if h_axis else "rows"
        forward = split_rows(forward, ("rows", "whole", "whole"), ("rows", h_kind))
        backward = split_rows(backward, ("rows", "whole", "whole", h_kind, "rows"),
                              ("rows", "row_sum", "row_sum"))

    @jax.custom_vjp
    def _monarch(x, w1, w2):
        return forward(x, w1, w2)[0]

    def monarch_fwd(x, w1, w2):
        y, h = forward(x, w1, w2)
        return y, (x, w1, w2, h)

    def monarch_bwd(residuals, dy):
        x, w1, w2, h = residuals
        dx, dw1, dw2 = backward(x, w1, w2, h, dy.astype(x.dtype))
        return dx.astype(x.dtype), dw1.astype(w1.dtype), dw2.astype(w2.dtype)

    _monarch.defvjp(monarch_fwd, monarch_bwd)

    def monarch(x, w1, w2):
        check_operands(x, w1, w2, cfg)
        return _monarch(x, w1, w2)

    return monarch
