"""Monarch matrices (Dao et al., ICML 2022): ``M = P L Pᵀ R`` with block-diagonal ``L``, ``R``.

Layout (the convention of the paper's reference code, HazyResearch/fly, fixed here and tested
against :func:`monarch_to_dense`). With ``b`` blocks in both factors:

  ``w1 [b, q, p]``   the right factor ``R``: block ``k`` maps input features ``k·p .. k·p+p-1``
                     to ``q`` intermediate features (``n = b·p`` inputs);
  ``w2 [b, s, q]``   the left factor ``L``: block ``l`` maps ``q`` permuted intermediate features
                     to ``s`` outputs (``m = b·s`` outputs);

and between them the permutation ``Pᵀ`` that reads the ``b·q`` intermediate features, laid out
``(k, j)``, as ``(r, l)``: intermediate ``i = k·q + j = r·b + l`` feeds block ``l`` at position
``r``. The outputs ``(l, s)`` are written in ``(s, l)`` order (the left ``P``). ``q`` is a
multiple of ``b``: ``ρ = q / b`` is the rank of each of the ``b × b`` blocks of ``M`` (of size
``s × p``) — 1 in the paper's square case ``b = √n``, where ``q = p = s = b``. Written out,

  ``M[s'·b + l, k·p + p'] = Σ_{ρ'<ρ} w2[l, s', k·ρ + ρ'] · w1[k, ρ'·b + l, p']``.

So ``M`` restricted to the block (row set ``l``, column set ``k``) is a sum of ``ρ`` outer
products, the blocks are independent, and the Frobenius-optimal projection of a dense matrix is
a truncated SVD of rank ``ρ`` per block (Eckart–Young; the paper's Theorem 1 for ``ρ = 1``).

Matrices act on column vectors here (``M [m, n]``, the paper's and PyTorch's convention):
``monarch_matmul(x, w1, w2) == x @ monarch_to_dense(w1, w2).T``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxsparse.ops.checks import is_integer

MONARCH_IMPLEMENTATIONS = (None, "xla", "native", "pallas", "pallas_interpret")


# --- shapes ---------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_nblocks(n_in: int, n_out: int) -> list[int]:
    """Block counts ``b`` that split ``n_in`` and ``n_out`` into ``b`` blocks each, with an
    intermediate width ``q = min(n_in, n_out) / b`` that is a multiple of ``b``."""
    return [b for b in _divisors(math.gcd(n_in, n_out)) if (min(n_in, n_out) // b) % b == 0]


def default_nblocks(n_in: int, n_out: int) -> int:
    """The paper's choice, ``b = √n`` (rank-1 blocks), or the valid count nearest below it."""
    return max(valid_nblocks(n_in, n_out))


class DenseMonarchWarning(UserWarning):
    """The default block count of a Monarch map is 1: no ``b >= 2`` splits its sizes, and one
    block is a dense factorisation with more parameters than the dense matrix."""


def warn_if_one_block(n_in: int, n_out: int, nblocks: int | None) -> None:
    """Say so when the default block count (``nblocks=None``) of ``n_in -> n_out`` is 1 for
    sizes above 1: a layer asked to be Monarch would silently be denser than dense."""
    if nblocks is None and min(n_in, n_out) > 1 and default_nblocks(n_in, n_out) == 1:
        import warnings

        warnings.warn(f"no Monarch block count >= 2 splits n_in={n_in} -> n_out={n_out} (it must "
                      "divide both, with min(n_in, n_out)/b a multiple of b): the default is "
                      f"b=1, a dense factorisation with {monarch_params(n_in, n_out, 1):,} "
                      f"parameters against the dense matrix's {n_in * n_out:,}",
                      DenseMonarchWarning, stacklevel=3)


def monarch_shapes(n_in: int, n_out: int, nblocks: int | None = None):
    """``(w1_shape, w2_shape)`` for a Monarch map from ``n_in`` to ``n_out`` features.

    The intermediate width is ``min(n_in, n_out)``, so the smaller side's blocks are square (as
    in the reference MonarchLinear). Raises ``ValueError`` listing the block counts that work.
    """
    for name, value in (("n_in", n_in), ("n_out", n_out)):
        if not is_integer(value) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive int")
    if nblocks is not None and not is_integer(nblocks):
        raise ValueError(f"nblocks={nblocks!r}: must be an integer (or None for the default)")
    b = default_nblocks(n_in, n_out) if nblocks is None else nblocks
    allowed = valid_nblocks(n_in, n_out)
    if b not in allowed:
        raise ValueError(
            f"nblocks={b} cannot split n_in={n_in} -> n_out={n_out}: b must divide both sizes "
            f"and min(n_in, n_out)/b must be a multiple of b; valid nblocks: {allowed}")
    q = min(n_in, n_out) // b
    return (b, q, n_in // b), (b, n_out // b, q)


def check_factors(w1, w2) -> tuple[int, int, int, int]:
    """Validate ``w1 [b, q, p]``, ``w2 [b, s, q]``; returns ``(b, p, q, s)``."""
    if w1.ndim != 3 or w2.ndim != 3:
        raise ValueError(f"w1 must be [b, q, p] and w2 [b, s, q]; got w1 {w1.shape}, w2 {w2.shape}")
    if 0 in w1.shape or 0 in w2.shape:
        raise ValueError(f"w1 {w1.shape} and w2 {w2.shape}: every dimension must be >= 1")
    b, q, p = w1.shape
    b2, s, q2 = w2.shape
    if b2 != b or q2 != q:
        raise ValueError(f"w1 {w1.shape} = [b, q, p] and w2 {w2.shape} = [b, s, q] disagree: "
                         f"w2 must be [{b}, s, {q}]")
    if q % b:
        raise ValueError(f"w1 {w1.shape}: the intermediate block width q={q} must be a multiple "
                         f"of the block count b={b} (q = ρ·b, ρ the rank of each block of M)")
    return b, p, q, s


def monarch_params(n_in: int, n_out: int, nblocks: int | None = None) -> int:
    """Parameters of the two factors: ``b·q·(p + s)``; ``2 n^1.5`` when square with ``b = √n``."""
    s1, s2 = monarch_shapes(n_in, n_out, nblocks)
    return math.prod(s1) + math.prod(s2)


def monarch_flops(tokens: int, n_in: int, n_out: int, nblocks: int | None = None) -> int:
    """Multiply-add FLOPs (2 per MAC) of ``monarch_matmul`` on ``tokens`` rows."""
    return 2 * tokens * monarch_params(n_in, n_out, nblocks)


def dense_flops(tokens: int, n_in: int, n_out: int) -> int:
    return 2 * tokens * n_in * n_out


def monarch_bytes(tokens: int, n_in: int, n_out: int, nblocks: int | None = None,
                  itemsize: int = 4, fused: bool = True) -> int:
    """HBM/DRAM bytes a Monarch product must move: read x, write y, read the weights; unfused
    paths also write and re-read the intermediate (and a copy per layout change)."""
    s1, _ = monarch_shapes(n_in, n_out, nblocks)
    mid = s1[0] * s1[1]
    moved = tokens * (n_in + n_out) + monarch_params(n_in, n_out, nblocks)
    if not fused:
        moved += 2 * tokens * mid
    return moved * itemsize


# --- dense view and projection ---------------------------------------------------------------


def monarch_to_dense(w1, w2) -> jax.Array:
    """The dense ``[m, n]`` matrix of the factors (the formula in the module docstring)."""
    b, p, q, s = check_factors(w1, w2)
    rho = q // b
    w1_KRLP = w1.reshape(b, rho, b, p)  # row j = ρ'·b + l of block k
    w2_LSKR = w2.reshape(b, s, b, rho)  # column r = k·ρ + ρ' of block l
    blocks_SLKP = jnp.einsum("lskr,krlp->slkp", w2_LSKR, w1_KRLP,
                             precision=jax.lax.Precision.HIGHEST)
    return blocks_SLKP.reshape(b * s, b * p)


def project_to_monarch(matrix, nblocks: int | None = None):
    """Closed-form Frobenius-optimal Monarch approximation of ``matrix [m, n]``.

    Each of the ``b × b`` blocks (rows ``{s'·b + l}``, columns ``k·p ..``) is replaced by its
    best rank-``ρ`` approximation (truncated SVD); the singular values are split evenly between
    the factors. Real or complex input; integer, boolean and half-precision matrices are
    projected in float32 (the SVD takes nothing narrower, and in an integer dtype the
    singular values' roots were truncated: a silently worse projection). Returns
    ``(w1 [b, q, p], w2 [b, s, q])`` in that dtype.
    """
    matrix = jnp.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be 2-D [m, n], got shape {matrix.shape}")
    matrix = matrix.astype(jnp.promote_types(matrix.dtype, jnp.float32))
    m, n = matrix.shape
    (b, q, p), (_, s, _) = monarch_shapes(n, m, nblocks)
    warn_if_one_block(n, m, nblocks)
    rho = q // b
    blocks_LKSP = matrix.reshape(s, b, b, p).transpose(1, 2, 0, 3)
    u, sv, vh = jnp.linalg.svd(blocks_LKSP, full_matrices=False)  # [l, k, s, r], [l, k, r], ...
    root = jnp.sqrt(sv[..., :rho]).astype(matrix.dtype)
    left_LKSR = u[..., :rho] * root[..., None, :]
    right_LKRP = vh[..., :rho, :] * root[..., :, None]
    w2 = left_LKSR.transpose(0, 2, 1, 3).reshape(b, s, q)  # column k·ρ + ρ'
    w1 = right_LKRP.transpose(1, 2, 0, 3).reshape(b, q, p)  # row ρ'·b + l
    return w1, w2


# --- the product ------------------------------------------------------------------------------


def _check_input(x, w1, w2):
    for name, arr in (("x", x), ("w1", w1), ("w2", w2)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):  # the kernels would truncate
            raise ValueError(f"{name} has dtype {arr.dtype}; monarch_matmul needs floating-point "
                             "x, w1 and w2")
    b, p, q, s = check_factors(w1, w2)
    if x.ndim < 1 or x.shape[-1] != b * p:
        raise ValueError(f"x {x.shape}: last dim must be n = b·p = {b}·{p} = {b * p} "
                         f"(the inputs of w1 {w1.shape})")
    return b, p, q, s


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def compute_dtype(x, w1, w2):
    """The dtype every implementation computes in and returns: ``result_type(x, w1, w2)``."""
    return jnp.result_type(x.dtype, w1.dtype, w2.dtype)


def _common_dtype(x, w1, w2):
    dtype = compute_dtype(x, w1, w2)
    return x.astype(dtype), w1.astype(dtype), w2.astype(dtype)


def monarch_reference(x, w1, w2):
    """The XLA reference, written step by step: ``y = x @ Mᵀ`` for ``x [..., n]``, in
    ``result_type(x, w1, w2)``."""
    b, p, q, s = _check_input(x, w1, w2)
    lead = x.shape[:-1]
    x, w1, w2 = _common_dtype(x, w1, w2)
    precision = _precision(x.dtype)
    x_KP = x.reshape(*lead, b, p)
    hidden_KQ = jnp.einsum("...kp,kqp->...kq", x_KP, w1, precision=precision)
    hidden_RL = hidden_KQ.reshape(*lead, q, b)  # i = k·q + j read as (r, l): i = r·b + l
    out_LS = jnp.einsum("...rl,lsr->...ls", hidden_RL, w2, precision=precision)
    return jnp.swapaxes(out_LS, -1, -2).reshape(*lead, b * s)  # outputs in (s, l) order


def kernel_constraints(backend: str, w1, w2) -> str | None:
    """Why the ``backend`` kernel cannot take these factors, or None if it can (the kernel
    package's own tile rules)."""
    from pallas_kernels.monarch import tile_constraints

    return tile_constraints(backend, *check_factors(w1, w2))


def kernel_monarch(x, w1, w2, *, backend: str, interpret: bool, block_tokens: int | None = None):
    """The Pallas kernel on ``x [..., n]``: tokens padded to whole tiles (on each device of a
    mesh, behind the native kernel's row rule: every token is its own row, the weights are
    whole and their gradients summed over the devices' rows), ``x`` and both weights cast to
    the compute dtype ``result_type(x, w1, w2)``, the result's dtype too."""
    from jaxsparse.ops.native.partitioning import split_over_rows
    from pallas_kernels.monarch import differentiable_monarch, monarch_config

    b, p, q, s = _check_input(x, w1, w2)
    why = kernel_constraints(backend, w1, w2)
    if why:
        requested = "pallas_interpret" if interpret and backend == "gpu" else "pallas"
        raise ValueError(f"monarch_matmul(implementation={requested!r}): {why} (w1 {w1.shape}, "
                         f"w2 {w2.shape}); use implementation='xla'")
    lead, n = x.shape[:-1], x.shape[-1]
    bt = (128 if backend == "tpu" else 32) if block_tokens is None else block_tokens
    cfg = monarch_config(backend=backend, interpret=interpret, nblocks=b, block_tokens=bt)
    monarch = differentiable_monarch(cfg, split_rows=split_over_rows)
    x, w1, w2 = _common_dtype(x, w1, w2)
    out = monarch(x.reshape(-1, n), w1, w2)
    return out.reshape(*lead, b * s)


def monarch_matmul(x, w1, w2, *, implementation: str | None = None):
    """``y [..., m] = x [..., n] @ Mᵀ`` for the Monarch matrix of ``w1 [b, q, p]``,
    ``w2 [b, s, q]`` (layout in the module docstring).

    Implementations: ``"xla"`` (the two einsums with the permutation between them, as in the
    paper), ``"native"`` (the fused C++ CPU kernel of :mod:`jaxsparse.ops.native.monarch`:
    each tile of tokens goes through both factors and the permutation in cache, float32;
    XLA when lowering for an accelerator), ``"pallas"`` (the fused kernel of
    :mod:`pallas_kernels.monarch`, Triton or Mosaic by the lowering platform; XLA elsewhere,
    or on a platform whose kernel cannot take the block sizes; a ``ValueError`` naming both
    kernels' rules when neither can, on any platform), ``"pallas_interpret"`` (the GPU
    kernel in interpret mode, for tests; a ``ValueError`` when it cannot take the sizes). ``None`` picks ``"native"`` on a CPU-only host when
    lowering for CPU with a float32 compute dtype (if the kernel builds: it needs a C++ compiler on
    first use) and XLA otherwise. Every implementation takes reverse mode (``jax.grad``; the
    native kernels have their own backward: dx, dw1 and dw2 in one pass over token tiles).
    The kernels (``"native"`` — so the CPU default —, ``"pallas"``, ``"pallas_interpret"``)
    define that backward with ``jax.custom_vjp``, which JAX cannot differentiate forward or
    twice: for ``jax.jvp``, ``jax.jacfwd``, Hessian products or gradient penalties use
    ``"xla"``.

    Dtypes: ``x``, ``w1`` and ``w2`` must be floating point (else ``ValueError``); every
    implementation computes in and returns ``jnp.result_type(x, w1, w2)`` (bfloat16 ``x``
    with float32 weights gives float32). ``"native"`` serves float32 results only.

    Why a C++ kernel on CPU: XLA runs the einsum form as five passes over the activation (a
    transpose, a batched GEMM with a contraction of only ``p`` terms, the permutation, the
    second GEMM, the output transpose), so it is memory-bound at about a third of the FLOP
    ratio; see ``jaxsparse bench monarch`` for both, timed beside a dense layer.
    """
    if implementation not in MONARCH_IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: allowed {MONARCH_IMPLEMENTATIONS}")
    _check_input(x, w1, w2)
    if implementation == "xla":
        return monarch_reference(x, w1, w2)
    if implementation in (None, "native"):
        return _native_or_xla(x, w1, w2, required=implementation == "native")
    suits = {be: kernel_constraints(be, w1, w2) is None for be in ("gpu", "tpu")}
    if implementation == "pallas":
        if not any(suits.values()):
            raise ValueError(f"monarch_matmul(implementation='pallas'): "
                             f"{kernel_constraints('gpu', w1, w2)}; "
                             f"{kernel_constraints('tpu', w1, w2)} (w1 {w1.shape}, "
                             f"w2 {w2.shape}); use implementation='xla'")
        return _platform_kernel(x, w1, w2, suits)
    return kernel_monarch(x, w1, w2, backend="gpu", interpret=True)  # "pallas_interpret"


def _native_or_xla(x, w1, w2, *, required: bool):
    """The fused CPU kernel when lowering for CPU, XLA on other platforms.

    ``required`` (an explicit ``implementation="native"``) turns an unsupported dtype or a
    failed build into an error instead of the XLA fallback.
    """
    from jaxsparse.ops.native import monarch as native

    # The kernel serves a float32 result: bfloat16 x with float32 weights is cast up first,
    # as every implementation computes in result_type(x, w1, w2).
    cast = _common_dtype(x, w1, w2)
    if not native.supports(*cast):
        if required:
            raise ValueError(f"monarch_matmul(implementation='native') computes in float32; got "
                             f"x {x.dtype}, w1 {w1.dtype}, w2 {w2.dtype} (use 'xla')")
        return monarch_reference(x, w1, w2)
    x, w1, w2 = cast
    if not required and jax.default_backend() != "cpu":
        # An accelerator host: don't build a CPU kernel for the odd program jitted for its CPU.
        return monarch_reference(x, w1, w2)
    if not native.available():
        if required:
            raise RuntimeError("monarch_matmul(implementation='native'): the C++ kernel could "
                               "not be built (see the warning above); use 'xla'")
        return monarch_reference(x, w1, w2)
    return jax.lax.platform_dependent(
        x, w1, w2, cpu=native.native_monarch, default=monarch_reference)


def _platform_kernel(x, w1, w2, suits):
    """The lowering platform's kernel, or the XLA path where that kernel cannot take the sizes."""
    fallback = lambda: monarch_reference(x, w1, w2)  # noqa: E731
    return jax.lax.platform_dependent(
        cuda=(lambda: kernel_monarch(x, w1, w2, backend="gpu", interpret=False))
        if suits["gpu"] else fallback,
        tpu=(lambda: kernel_monarch(x, w1, w2, backend="tpu", interpret=False))
        if suits["tpu"] else fallback,
        default=fallback)
