"""Selective state-space scans: Mamba-1 (``selective_scan``), Mamba-2 SSD (``ssd``) and the
one-token decoding step (``selective_state_update``).

Mamba-1 (Gu & Dao 2023, Algorithm 2), per channel c and state index n:
    h_t = exp(dt_t A_cn) h_{t-1} + dt_t B_tn x_tc,     y_tc = sum_n C_tn h_t + D_c x_tc,
optionally gated ``y *= silu(z)``. Mamba-2 (Dao & Gu 2024) restricts A to a scalar per head
and computes the same recurrence blockwise as matrix products (state space duality).
State is accumulated in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.ops.checks import check_integer
from jaxsparse.ops.concrete import concrete_values
from jaxsparse.ops.segments import (check_segment_ids, document_starts, keep_factor,
                                     shard_documents, shard_keeps_state, with_document_starts)
from jaxsparse.ops.sizes import ceil_div, round_up

SCAN_IMPLEMENTATIONS = (None, "sequential", "associative", "chunked", "native", "pallas",
                        "pallas_interpret")


# --- argument checks ------------------------------------------------------------------------


def _check_negative(name, A):
    values = concrete_values(A)
    if values is not None and not np.all(values < 0):
        raise ValueError(f"{name} must be strictly negative (A = -exp(A_log)); got max "
                         f"{float(values.max()):.3g}")


def _check_dt_bias_and_dtypes(dt_bias, size: int, size_name: str, **arrays) -> None:
    if dt_bias is not None and jnp.shape(dt_bias) != (size,):  # (a float has no .shape)
        raise ValueError(f"dt_bias must be [{size_name}={size}], got {jnp.shape(dt_bias)}")
    for name, arr in arrays.items():
        if not jnp.issubdtype(arr.dtype, jnp.floating):  # y would come back truncated
            raise ValueError(f"{name} has dtype {arr.dtype}; the scan needs floating-point inputs")


def _check_chunk(chunk_size):
    if chunk_size is not None:  # (is_integer: True is a flag passed by mistake, not 1)
        check_integer("chunk_size", chunk_size)


def _check_scan_shapes(x, dt, A, B, C, D, z, dt_bias):
    if x.ndim != 3:
        raise ValueError(f"x must be [batch, length, d_inner], got shape {x.shape}")
    batch, length, d_inner = x.shape
    if dt.shape != x.shape:
        raise ValueError(f"dt must have x's shape {x.shape}, got {dt.shape}")
    if A.ndim != 2 or A.shape[0] != d_inner:
        raise ValueError(f"A must be [d_inner={d_inner}, d_state], got {A.shape}")
    d_state = A.shape[1]
    for name, arr in (("B", B), ("C", C)):
        if arr.ndim != 4 or arr.shape[:2] != (batch, length) or arr.shape[3] != d_state:
            raise ValueError(f"{name} must be [batch={batch}, length={length}, groups, "
                             f"d_state={d_state}], got {arr.shape}")
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape, got {B.shape} and {C.shape}")
    if B.shape[2] < 1:
        raise ValueError(f"B, C {B.shape}: groups={B.shape[2]}, must be >= 1")
    if d_inner % B.shape[2]:
        raise ValueError(f"d_inner={d_inner} must be a multiple of the groups={B.shape[2]}")
    if D is not None and jnp.shape(D) != (d_inner,):
        raise ValueError(f"D must be [d_inner={d_inner}], got {jnp.shape(D)}")
    if z is not None and jnp.shape(z) != x.shape:
        raise ValueError(f"z must have x's shape {x.shape}, got {jnp.shape(z)}")
    _check_dt_bias_and_dtypes(dt_bias, d_inner, "d_inner", x=x, dt=dt, A=A, B=B, C=C)
    _check_negative("A", A)


# --- Mamba-1 --------------------------------------------------------------------------------


def _discretise(x, dt, A, B, dt_bias, dt_softplus, keep):
    """float32 (decay [b,l,d,n], input [b,l,d,n]) of the recurrence h = decay*h + input;
    ``keep [b, l]`` zeroes the decay where a document starts."""
    dt = _final_dt(dt, dt_bias, dt_softplus)
    groups = B.shape[2]
    per_group = x.shape[2] // groups
    B_full = jnp.repeat(B.astype(jnp.float32), per_group, axis=2)  # [b, l, d, n]
    decay = jnp.exp(dt[..., None] * A.astype(jnp.float32)[None, None]) * keep[..., None, None]
    inputs = (dt * x.astype(jnp.float32))[..., None] * B_full
    return decay, inputs


def _readout(h_BLDN, C, x, D, z, out_dtype):
    per_group = x.shape[2] // C.shape[2]
    C_full = jnp.repeat(C.astype(jnp.float32), per_group, axis=2)
    y = jnp.einsum("bldn,bldn->bld", h_BLDN, C_full)
    return _skip_and_gate(y, x, D, z).astype(out_dtype)


def _scan_sequential(decay, inputs, h0):
    def step(h, xs):
        a, b = xs
        h = a * h + b
        return h, h

    final, hs = jax.lax.scan(step, h0, (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(inputs, 1, 0)))
    return jnp.moveaxis(hs, 0, 1), final


def _combine(left, right):
    """(a_l, b_l) then (a_r, b_r): h -> a_r (a_l h + b_l) + b_r."""
    a_l, b_l = left
    a_r, b_r = right
    return a_r * a_l, a_r * b_l + b_r


def _scan_associative(decay, inputs, h0):
    inputs = inputs.at[:, 0].add(decay[:, 0] * h0)  # fold the initial state into step 0
    _, hs = jax.lax.associative_scan(_combine, (decay, inputs), axis=1)
    return hs, hs[:, -1]


def _chunked_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, h0, chunk, out_dtype=None,
                  keep=None):
    """Discretise, scan and read out one time step at a time inside each chunk, carrying the
    state across chunks. Nothing of size length x d_inner x d_state is ever materialised,
    and each chunk is rematerialised in the backward pass, so memory is O(chunk) rather
    than O(length) and the scan stays memory-bandwidth-light. ``keep [b, l]`` (None: all
    ones) zeroes the decay where a document starts."""
    batch, length, d_inner = x.shape
    padded = round_up(length, chunk)

    def split(t):
        if t is None:
            return None
        t = jnp.pad(t, [(0, 0), (0, padded - length)] + [(0, 0)] * (t.ndim - 2))
        return jnp.moveaxis(t.reshape((batch, padded // chunk, chunk) + t.shape[2:]), 1, 0)

    # padding steps get dt = 0 (after any bias and softplus): decay 1, input 0
    valid = split(jnp.ones((batch, length, 1), jnp.float32))
    starts = split(None if keep is None else 1.0 - keep)  # padding: 0, no reset
    xs = (split(x), split(dt), split(B), split(C), split(z), valid, starts)

    per_group = d_inner // B.shape[2]

    @jax.checkpoint
    def step(h, chunk_xs):
        x_c, dt_c, B_c, C_c, z_c, valid_c, starts_c = chunk_xs
        dt_c = _final_dt(dt_c, dt_bias, dt_softplus) * valid_c  # padding: dt 0, decay 1
        keep_c = jnp.ones(dt_c.shape[:2], jnp.float32) if starts_c is None else 1.0 - starts_c

        def tick(h, xs):
            # one time step, fused: nothing of size chunk x d_inner x d_state is kept
            x_t, dt_t, B_t, C_t, keep_t = xs  # [b, d], [b, d], [b, g, n], [b, g, n], [b]
            B_t = jnp.repeat(B_t.astype(jnp.float32), per_group, axis=1)
            C_t = jnp.repeat(C_t.astype(jnp.float32), per_group, axis=1)
            decay = jnp.exp(dt_t[:, :, None] * A.astype(jnp.float32)[None]) * keep_t[:, None, None]
            h = decay * h + (dt_t * x_t.astype(jnp.float32))[:, :, None] * B_t
            return h, jnp.einsum("bdn,bdn->bd", h, C_t)

        ticks = tuple(jnp.moveaxis(t, 1, 0) for t in (x_c, dt_c, B_c, C_c, keep_c))
        last, y = jax.lax.scan(tick, h, ticks)
        return last, _skip_and_gate(jnp.moveaxis(y, 0, 1), x_c, D, z_c)

    final, ys = jax.lax.scan(step, h0, xs)
    y = jnp.moveaxis(ys, 0, 1).reshape(batch, padded, d_inner)[:, :length]
    return y.astype(out_dtype or x.dtype), final


def _final_dt(dt, dt_bias, dt_softplus):
    dt = dt.astype(jnp.float32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(jnp.float32)[None, None, :]
    return jax.nn.softplus(dt) if dt_softplus else dt


def _skip_and_gate(y, x, D, z):
    if D is not None:
        y = y + D.astype(jnp.float32)[None, None, :] * x.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y


def _pallas_scan(x, dt, A, B, C, dt_bias, dt_softplus, h0, chunk_size, keep, *, interpret):
    """The recurrence through the Pallas kernels; float32 y without the skip and the gate.
    ``keep``: None, or the reset factor of packed documents."""
    from jaxsparse.ops.ssm_pallas import pallas_selective_scan

    dt = _final_dt(dt, dt_bias, dt_softplus)
    fallback = lambda: _chunked_scan(x, dt, A, B, C, None, None, None, False, h0,  # noqa: E731
                                     chunk_size or 64, out_dtype=jnp.float32, keep=keep)
    return pallas_selective_scan(x, dt, A, B, C, h0, keep, interpret=interpret,
                                 fallback=fallback)


def _native_scan_or_none(x, dt, A, B, C, D, z, dt_bias, dt_softplus, h0, chunk_size, keep, *,
                         required: bool):
    """``(y, final)`` through the C++ kernel when lowering for CPU (the chunked form on other
    platforms), or None when the default should not use it (an accelerator host, a
    ``shard_map`` over some mesh axes only, or the kernel failed to build; an explicit
    ``"native"`` raises instead). On a mesh the kernel runs on each device's batch rows
    (``native.partitioning``)."""
    from jaxsparse.ops.native import selective_scan as native
    from jaxsparse.ops.native.partitioning import in_partly_manual_context

    if not required and (jax.default_backend() != "cpu" or in_partly_manual_context()):
        return None
    if not native.available():
        if required:
            raise RuntimeError("selective_scan(implementation='native'): the C++ kernel could "
                               "not be built (see the warning above); use 'chunked'")
        return None

    def on_cpu(x, dt, A, B, C, h0, keep):
        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
        y, final = native.native_scan(f32(x), _final_dt(dt, dt_bias, dt_softplus), f32(A),
                                      f32(B), f32(C), h0, keep)
        return _skip_and_gate(y, x, D, z).astype(x.dtype), final

    def elsewhere(x, dt, A, B, C, h0, keep):
        return _chunked_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, h0, chunk_size or 64,
                             keep=keep)

    return jax.lax.platform_dependent(x, dt, A, B, C, h0, keep, cpu=on_cpu, default=elsewhere)


def selective_scan(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=True,
                   initial_state=None, return_final_state=False, chunk_size=None,
                   implementation=None, segment_ids=None):
    """Mamba-1 selective scan.

    Args:
      x, dt: ``[batch, length, d_inner]``. A: ``[d_inner, d_state]``, negative.
      B, C: ``[batch, length, groups, d_state]``; channel c uses group ``c // (d_inner/groups)``.
      D: ``[d_inner]`` skip; z: ``[batch, length, d_inner]`` gate (``y *= silu(z)``).
      dt_bias: ``[d_inner]`` added to dt before the softplus (when ``dt_softplus``).
      initial_state: ``[batch, d_inner, d_state]``.
      chunk_size: chunk of the ``"chunked"`` implementation (default 64).
      implementation: ``None`` (``"native"`` on a CPU-only host when its kernel builds, the
        chunked form otherwise), ``"sequential"`` (``lax.scan``, the reference),
        ``"associative"`` (``lax.associative_scan``; memory O(L·d·N)), ``"chunked"`` (a
        fused scan inside rematerialised chunks, a scan across them; memory O(chunk)),
        ``"native"`` (the C++ CPU kernel of :mod:`jaxsparse.ops.native.selective_scan`:
        16 channels stepped together with their state in registers, a reverse-time backward
        over checkpointed chunks; memory O(L·d) plus checkpoints; the chunked form when
        lowering for an accelerator), ``"pallas"`` (the TPU or GPU kernel, chosen by the
        platform being lowered for; the chunked form elsewhere) or ``"pallas_interpret"``
        (the GPU kernel in interpret mode, for tests).
      segment_ids: integer ``[batch, length]`` for packed documents: the state is reset where
        the id changes, so no document sees another (``initial_state`` belongs to the first).
        Every implementation takes them (the Pallas kernels as a per-step reset factor).

    Returns:
      y ``[batch, length, d_inner]`` in x's dtype, and the final state if requested.

    Differentiation: every implementation has reverse mode (``jax.grad``, ``jax.vjp``). The
    kernels (``"native"`` — so the CPU default — ``"pallas"``, ``"pallas_interpret"``) define
    their backward with ``jax.custom_vjp``, which JAX cannot differentiate forward: for
    ``jax.jvp``, ``jax.jacfwd`` or forward-over-reverse Hessian products use ``"chunked"``,
    ``"associative"`` or ``"sequential"``.
    """
    if implementation not in SCAN_IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: allowed {SCAN_IMPLEMENTATIONS}")
    _check_chunk(chunk_size)
    _check_scan_shapes(x, dt, A, B, C, D, z, dt_bias)
    batch, _, d_inner = x.shape
    d_state = A.shape[1]
    if initial_state is None:
        h0 = jnp.zeros((batch, d_inner, d_state), jnp.float32)
    else:
        if initial_state.shape != (batch, d_inner, d_state):
            raise ValueError(f"initial_state must be {(batch, d_inner, d_state)}, got "
                             f"{initial_state.shape}")
        h0 = initial_state.astype(jnp.float32)
    keep = keep_factor(segment_ids, batch, x.shape[1])
    if x.shape[1] == 0:  # nothing to scan (every implementation): the initial state
        return (x, h0) if return_final_state else x
    if batch == 0 or d_inner == 0:
        # an empty batch or no channels: nothing to scan, the final state is the initial one
        # (the kernels' blocks would be larger than the operands)
        y = jnp.zeros(x.shape, x.dtype)
        return (y, h0) if return_final_state else y
    if implementation in (None, "native"):
        # Default on CPU: the native kernel (experiments/results/ssm.md times it beside the
        # lax.scan recurrence and the chunked form); the chunked form on accelerators and
        # wherever the kernel cannot be built.
        native = _native_scan_or_none(x, dt, A, B, C, D, z, dt_bias, dt_softplus, h0,
                                      chunk_size, keep, required=implementation == "native")
        if native is not None:
            return native if return_final_state else native[0]
        implementation = "chunked"
    resets = None if segment_ids is None else keep  # None: the scans skip the factor
    if implementation == "chunked":
        y, final = _chunked_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, h0, chunk_size or 64,
                                 keep=resets)
        return (y, final) if return_final_state else y
    if implementation.startswith("pallas"):
        y, final = _pallas_scan(x, dt, A, B, C, dt_bias, dt_softplus, h0, chunk_size, resets,
                                interpret=implementation == "pallas_interpret")
        y = _skip_and_gate(y, x, D, z).astype(x.dtype)
        return (y, final) if return_final_state else y
    decay, inputs = _discretise(x, dt, A, B, dt_bias, dt_softplus, keep)
    scan = _scan_sequential if implementation == "sequential" else _scan_associative
    hs, final = scan(decay, inputs, h0)
    y = _readout(hs, C, x, D, z, x.dtype)
    return (y, final) if return_final_state else y


def selective_scan_sequence_parallel(x, dt, A, B, C, *, mesh, axis="sequence", D=None, z=None,
                                     dt_bias=None, dt_softplus=True, initial_state=None,
                                     chunk_size=None, implementation=None, segment_ids=None):
    """:func:`selective_scan` (returning ``(y, final_state)``) with ``length`` split over mesh
    axis ``axis``; chunk states pass between shards (:mod:`jaxsparse.ops.sequence_scan`).
    ``segment_ids``: packed documents, as in :func:`selective_scan`."""
    from jaxsparse.ops.sequence_scan import scan_across_shards

    seq = {"x": x, "dt": dt, "B": B, "C": C} | ({} if z is None else {"z": z})
    seq = with_document_starts(seq, segment_ids, *x.shape[:2])
    shared = {"A": A} | ({} if D is None else {"D": D}) | ({} if dt_bias is None else {"dt_bias": dt_bias})

    def run(seq, shared, initial):
        ids, initial = shard_documents(seq, initial)
        return selective_scan(seq["x"], seq["dt"], shared["A"], seq["B"], seq["C"],
                              D=shared.get("D"), z=seq.get("z"), dt_bias=shared.get("dt_bias"),
                              dt_softplus=dt_softplus, initial_state=initial,
                              return_final_state=True, chunk_size=chunk_size,
                              implementation=implementation, segment_ids=ids)

    def total_decay(seq, shared):
        steps = jnp.sum(_final_dt(seq["dt"], shared.get("dt_bias"), dt_softplus), axis=1)  # [b, d]
        decay = jnp.exp(steps[..., None] * shared["A"].astype(jnp.float32)[None])  # ∏_t exp(dt_t A)
        keeps = shard_keeps_state(seq)
        return decay if keeps is None else decay * keeps[:, None, None]

    return scan_across_shards(run, total_decay, seq, shared, initial_state, mesh=mesh, axis=axis)


def selective_state_update(state, x_t, dt_t, A, B_t, C_t, *, D=None, z_t=None, dt_bias=None,
                           dt_softplus=True):
    """One decoding step of :func:`selective_scan`.

    ``state [batch, d_inner, d_state]``, ``x_t, dt_t [batch, d_inner]``, ``B_t, C_t
    [batch, groups, d_state]``. Returns ``(y_t [batch, d_inner], new_state)``.
    """
    if state.ndim != 3 or x_t.shape != state.shape[:2] or dt_t.shape != x_t.shape:
        raise ValueError(f"state must be [batch, d_inner, d_state] and x_t, dt_t [batch, d_inner];"
                         f" got {state.shape}, {x_t.shape}, {dt_t.shape}")
    # named here, in the step's own terms: through selective_scan a 2-D B_t was reported as
    # "B must be [batch, length=1, ...], got (2, 1, 5)", a shape the caller never passed
    batch, d_inner, d_state = state.shape
    if jnp.shape(A) != (d_inner, d_state):
        raise ValueError(f"A of shape {jnp.shape(A)}: must be [d_inner, d_state]="
                         f"{(d_inner, d_state)}, the state's")
    for name, arr in (("B_t", B_t), ("C_t", C_t)):
        if jnp.ndim(arr) != 3 or jnp.shape(arr)[0] != batch or jnp.shape(arr)[2] != d_state:
            raise ValueError(f"{name} of shape {jnp.shape(arr)}: must be [batch={batch}, groups, "
                             f"d_state={d_state}]")
    if z_t is not None and jnp.shape(z_t) != x_t.shape:
        raise ValueError(f"z_t of shape {jnp.shape(z_t)}: must be x_t's {x_t.shape}")
    y, new_state = selective_scan(
        x_t[:, None], dt_t[:, None], A, B_t[:, None], C_t[:, None], D=D,
        z=None if z_t is None else z_t[:, None], dt_bias=dt_bias, dt_softplus=dt_softplus,
        initial_state=state, return_final_state=True, implementation="sequential")
    return y[:, 0], new_state


# --- Mamba-2 (SSD) --------------------------------------------------------------------------


def segsum(x):
    """``out[..., i, j] = x[..., j+1] + ... + x[..., i]`` for ``i >= j``, ``-inf`` above the
    diagonal. A masked cumulative sum, not a difference of cumsums, so long segments of
    large negative values lose no precision (the Mamba-2 paper's stable segsum)."""
    T = x.shape[-1]
    rows = jnp.broadcast_to(x[..., :, None], x.shape + (T,))  # [..., k, j] = x[k]
    below = np.tril(np.ones((T, T), bool), -1)  # [k, j]: k > j
    summed = jnp.cumsum(jnp.where(below, rows, 0.0), axis=-2)  # [..., i, j] = sum_{j<k<=i} x[k]
    return jnp.where(np.tril(np.ones((T, T), bool)), summed, -jnp.inf)


def _check_ssd_shapes(x, dt, A, B, C, D, dt_bias, initial_state):
    """The argument checks of :func:`ssd`, :func:`ssd_reference` and :func:`ssd_native`."""
    if x.ndim != 4:
        raise ValueError(f"x must be [batch, length, heads, head_dim], got {x.shape}")
    batch, length, heads, _ = x.shape
    if dt.shape != (batch, length, heads):
        raise ValueError(f"dt must be [batch, length, heads]={(batch, length, heads)}, got {dt.shape}")
    if A.shape != (heads,):
        raise ValueError(f"A must be [heads={heads}] (a scalar per head), got {A.shape}")
    for name, arr in (("B", B), ("C", C)):
        if arr.ndim != 4 or arr.shape[:2] != (batch, length):
            raise ValueError(f"{name} must be [batch={batch}, length={length}, groups, d_state], "
                             f"got {arr.shape}")
    if B.shape != C.shape or B.shape[2] < 1 or heads % B.shape[2]:
        raise ValueError(f"B, C must agree and their groups (>= 1) divide heads={heads}; got "
                         f"{B.shape}, {C.shape}")
    if D is not None and jnp.shape(D) != (heads,):
        raise ValueError(f"D must be [heads={heads}], got {jnp.shape(D)}")
    state_shape = (batch, heads, x.shape[3], B.shape[3])
    if initial_state is not None and initial_state.shape != state_shape:
        raise ValueError(f"initial_state must be [batch, heads, head_dim, d_state]={state_shape}, "
                         f"got {initial_state.shape}")
    _check_dt_bias_and_dtypes(dt_bias, heads, "heads", x=x, dt=dt, A=A, B=B, C=C)
    _check_negative("A", A)


def _ssd_inputs(x, dt, A, B, C, dt_bias, dt_softplus):
    """The recurrence's float32 (dt, log decay dt·A, B and C repeated to every head)."""
    dt = _final_dt(dt, dt_bias, dt_softplus)
    per_group = x.shape[2] // B.shape[2]
    B = jnp.repeat(B.astype(jnp.float32), per_group, axis=2)  # [b, l, h, n]
    C = jnp.repeat(C.astype(jnp.float32), per_group, axis=2)
    return dt, dt * A.astype(jnp.float32)[None, None, :], B, C


def ssd(x, dt, A, B, C, *, chunk_size: int, D=None, dt_bias=None, dt_softplus=False,
        initial_state=None, return_final_state=False, segment_ids=None):
    """Mamba-2 state space duality, chunked (Dao & Gu 2024, section 6).

    Work and memory are linear in the length: quadratic only inside a chunk. The states
    entering the chunks follow from a scan over chunks (the paper's "state passing"), not
    from a ``[chunks, chunks]`` decay matrix (the minimal listing's shortcut, quadratic in
    the number of chunks: at 64k tokens in chunks of 64 it was 2.5x the FLOPs of everything
    else, and it grows with the square of the length). ``C·Bᵀ`` is formed once per group,
    not once per head.

    Args:
      x: ``[batch, length, heads, head_dim]``; dt: ``[batch, length, heads]``; A: ``[heads]``
        negative; B, C: ``[batch, length, groups, d_state]`` (groups divide heads);
        D: ``[heads]``; initial_state: ``[batch, heads, head_dim, d_state]``.
      chunk_size: block length; any length works (padding steps have dt = 0).
      segment_ids: integer ``[batch, length]`` for packed documents: the state is reset where
        the id changes (its log decay there is -inf: every segment sum across it is -inf, and
        no sum is ever differenced, so nothing becomes NaN).

    Returns:
      y ``[batch, length, heads, head_dim]`` (and the final state if requested).
    """
    _check_chunk(chunk_size)
    if chunk_size is None:
        raise ValueError("chunk_size is required for ssd")
    _check_ssd_shapes(x, dt, A, B, C, D, dt_bias, initial_state)
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[2:]
    per_group = heads // groups
    state_shape = (batch, heads, head_dim, d_state)
    dt = _final_dt(dt, dt_bias, dt_softplus)  # [b, l, h]
    a = dt * A.astype(jnp.float32)[None, None, :]  # log decay per step
    if segment_ids is not None:
        starts = document_starts(check_segment_ids(segment_ids, batch, length))
        a = jnp.where(starts[..., None], -jnp.inf, a)
    chunks = ceil_div(length, chunk_size)
    padded = chunks * chunk_size

    def split(t):  # [b, l, ...] -> [b, c, L, ...]; padding steps have dt = 0: no decay, no input
        t = jnp.pad(t, [(0, 0), (0, padded - length)] + [(0, 0)] * (t.ndim - 2))
        return t.reshape((batch, chunks, chunk_size) + t.shape[2:])

    # heads h = (group g, head in group r), so B and C stay per group
    X = split(x.astype(jnp.float32) * dt[..., None])
    X = X.reshape(batch, chunks, chunk_size, groups, per_group, head_dim)  # [b, c, L, g, r, p]
    B, C = split(B.astype(jnp.float32)), split(C.astype(jnp.float32))  # [b, c, L, g, n]
    a = jnp.moveaxis(split(a), 2, -1).reshape(batch, chunks, groups, per_group, chunk_size)
    a_cum = jnp.cumsum(a, axis=-1)  # [b, c, g, r, L]: log decay from the chunk start
    time_last = lambda t: jnp.moveaxis(t, -1, 2)[..., None]  # [b,c,g,r,L] -> [b,c,L,g,r,1]  # noqa: E731

    # 1. outputs from inputs of the same chunk (the quadratic, attention-like form)
    scores = jnp.einsum("bclgn,bcsgn->bcgls", C, B)[:, :, :, None]  # [b, c, g, 1, L, L]
    y = jnp.einsum("bcgrls,bcsgrp->bclgrp", jnp.exp(segsum(a)) * scores, X)
    # 2. what each chunk adds to the state, from its own inputs
    # log decay to the chunk end, sum over k > l: a reversed cumsum, not a_cum[-1] - a_cum
    # (that is -inf - -inf after a document start)
    after = jnp.flip(jnp.cumsum(jnp.flip(a, -1), axis=-1), -1)  # sum over k >= l
    decay_to_end = jnp.exp(jnp.concatenate([after[..., 1:], jnp.zeros_like(after[..., :1])], -1))
    added = jnp.einsum("bcsgn,bcsgrp->bcgrpn", B, X * time_last(decay_to_end))
    # 3. the states entering each chunk: h_(c+1) = decay_c · h_c + added_c, an associative
    # scan over chunks (log depth for accelerators; linear work)
    h0 = (jnp.zeros(state_shape, jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    h0 = h0.reshape(batch, 1, groups, per_group, head_dim, d_state)
    chunk_decay = jnp.concatenate(
        [jnp.ones((batch, 1, groups, per_group), jnp.float32), jnp.exp(a_cum[..., -1])], axis=1)

    def compose(earlier, later):  # two affine steps h -> d·h + s, earlier first
        return earlier[0] * later[0], later[0][..., None, None] * earlier[1] + later[1]

    _, states = jax.lax.associative_scan(
        compose, (chunk_decay, jnp.concatenate([h0, added], axis=1)), axis=1)
    entering, final = states[:, :-1], states[:, -1]
    # 4. outputs from the states entering each chunk
    y = y + jnp.einsum("bclgn,bcgrpn->bclgrp", C, entering) * time_last(jnp.exp(a_cum))
    y = y.reshape(batch, padded, heads, head_dim)[:, :length]
    if D is not None:
        y = y + D.astype(jnp.float32)[None, None, :, None] * x.astype(jnp.float32)
    y = y.astype(x.dtype)
    return (y, final.reshape(state_shape)) if return_final_state else y


def ssd_sequence_parallel(x, dt, A, B, C, *, mesh, axis="sequence", chunk_size=None, D=None,
                          dt_bias=None, dt_softplus=False, initial_state=None, segment_ids=None):
    """Mamba-2's scan (``(y, final_state)``) with ``length`` split over mesh axis ``axis``:
    :func:`ssd` with ``chunk_size`` inside each shard (the recurrence when it is None), chunk
    states passed between shards (:mod:`jaxsparse.ops.sequence_scan`). ``segment_ids``: packed
    documents, as in :func:`ssd`."""
    from jaxsparse.ops.sequence_scan import scan_across_shards

    shared = {"A": A} | ({} if D is None else {"D": D}) | ({} if dt_bias is None else {"dt_bias": dt_bias})

    def run(seq, shared, initial):
        ids, initial = shard_documents(seq, initial)
        kwargs = dict(D=shared.get("D"), dt_bias=shared.get("dt_bias"), dt_softplus=dt_softplus,
                      initial_state=initial, return_final_state=True, segment_ids=ids)
        args = (seq["x"], seq["dt"], shared["A"], seq["B"], seq["C"])
        if chunk_size is None:
            return ssd_reference(*args, **kwargs)
        return ssd(*args, chunk_size=chunk_size, **kwargs)

    def total_decay(seq, shared):
        steps = _final_dt(seq["dt"], shared.get("dt_bias"), dt_softplus)  # [b, l, h]
        decay = jnp.exp(jnp.sum(steps, axis=1) * shared["A"].astype(jnp.float32)[None])
        keeps = shard_keeps_state(seq)
        decay = decay if keeps is None else decay * keeps[:, None]
        return decay[..., None, None]  # [b, h] -> broadcast over the [b, h, p, n] state

    seq = with_document_starts({"x": x, "dt": dt, "B": B, "C": C}, segment_ids, *x.shape[:2])
    return scan_across_shards(run, total_decay, seq, shared, initial_state, mesh=mesh, axis=axis)


def ssd_reference(x, dt, A, B, C, *, D=None, dt_bias=None, dt_softplus=False,
                  initial_state=None, return_final_state=False, segment_ids=None):
    """The Mamba-2 recurrence one step at a time (``lax.scan``): the reference for :func:`ssd`
    (``segment_ids`` as there)."""
    _check_ssd_shapes(x, dt, A, B, C, D, dt_bias, initial_state)
    batch, length, heads, head_dim = x.shape
    d_state = B.shape[3]
    dt, a, B, C = _ssd_inputs(x, dt, A, B, C, dt_bias, dt_softplus)
    X = x.astype(jnp.float32) * dt[..., None]
    h0 = (jnp.zeros((batch, heads, head_dim, d_state), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))

    keep = keep_factor(segment_ids, batch, length)

    def step(h, xs):
        a_t, x_t, b_t, c_t, keep_t = xs  # [b,h], [b,h,p], [b,h,n], [b,h,n], [b]
        decay = jnp.exp(a_t) * keep_t[:, None]
        h = decay[..., None, None] * h + x_t[..., None] * b_t[:, :, None, :]
        return h, jnp.einsum("bhpn,bhn->bhp", h, c_t)

    final, ys = jax.lax.scan(step, h0, tuple(jnp.moveaxis(t, 1, 0) for t in (a, X, B, C, keep)))
    y = jnp.moveaxis(ys, 0, 1)
    if D is not None:
        y = y + D.astype(jnp.float32)[None, None, :, None] * x.astype(jnp.float32)
    y = y.astype(x.dtype)
    return (y, final) if return_final_state else y


def ssd_native(x, dt, A, B, C, *, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
               return_final_state=False, segment_ids=None):
    """The Mamba-2 recurrence of :func:`ssd_reference` through the native CPU selective-scan
    kernel (:mod:`jaxsparse.ops.native.selective_scan`), forward and backward.

    Mamba-2 is Mamba-1 with a scalar decay per head: each (head, p) pair is a channel whose dt
    and A are its head's, and a head's channels share its group's B and C — the Mamba-1
    kernel's layout exactly (channels of a group contiguous). ``A`` goes in as ``[channels, 1]``,
    so the kernel takes one exp per step for all N state entries rather than N of them
    (forward 4x faster than with ``A`` broadcast to ``[channels, N]``; bench numbers in
    ``experiments/results/ssm.md``). When lowering for an accelerator it is
    :func:`ssd_reference`. Raises if the kernel cannot be built. Reverse-mode only (a
    ``custom_vjp``); for ``jax.jvp`` use :func:`ssd` or :func:`ssd_reference`.
    """
    from jaxsparse.ops.native import selective_scan as native

    _check_ssd_shapes(x, dt, A, B, C, D, dt_bias, initial_state)
    if not native.available():
        raise RuntimeError("ssd_native: the C++ selective-scan kernel could not be built "
                           "(see the warning above); use ssd_reference")
    batch, length, heads, head_dim = x.shape
    d_state = B.shape[3]
    h0 = (jnp.zeros((batch, heads, head_dim, d_state), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    kw = dict(D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, segment_ids=segment_ids)
    keep = keep_factor(segment_ids, batch, length)

    def on_cpu(x, dt, A, B, C, h0, keep):
        dt_h = _final_dt(dt, dt_bias, dt_softplus)  # [batch, length, heads]
        channels = heads * head_dim
        y, final = native.native_scan(
            x.astype(jnp.float32).reshape(batch, length, channels),
            jnp.repeat(dt_h, head_dim, axis=2),
            jnp.repeat(A.astype(jnp.float32), head_dim)[:, None],  # [channels, 1]: scalar decay
            B.astype(jnp.float32), C.astype(jnp.float32), h0.reshape(batch, channels, d_state),
            keep)
        y = y.reshape(batch, length, heads, head_dim)
        if D is not None:
            y = y + D.astype(jnp.float32)[None, None, :, None] * x.astype(jnp.float32)
        return y.astype(x.dtype), final.reshape(batch, heads, head_dim, d_state)

    def elsewhere(x, dt, A, B, C, h0, keep):
        return ssd_reference(x, dt, A, B, C, initial_state=h0, return_final_state=True, **kw)

    y, final = jax.lax.platform_dependent(x, dt, A, B, C, h0, keep, cpu=on_cpu,
                                          default=elsewhere)
    return (y, final) if return_final_state else y

