"""Hydra's SSM path: a diagonal, content-gated linear recurrence (Chaudhary & Browning 2025).

Per channel ``i`` (no state expansion: the state has the width of the input),

    α_t = exp(−softplus(Δ_t) ⊙ λ)          λ > 0 learned per channel
    s_t = α_t ⊙ s_{t−1} + B_t ⊙ U_t
    y_t = C_t ⊙ s_t + D ⊙ U_t

with ``Δ, B, C, U`` all functions of token ``t`` (one projection). The paper writes
``s_{t+1} = α_t s_t + B_t U_t, y_t = C_t s_t``; we use the inclusive form (token ``t``'s input
is in the state it reads, as in Mamba) and keep the ``D`` skip. The recurrence is the
first-order linear scan ``h_t = a_t h_{t−1} + b_t`` over ``[B, L, D]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.segments import (keep_factor, shard_documents, shard_keeps_state,
                                     with_document_starts)

DIAGONAL_SCAN_IMPLEMENTATIONS = (None, "native", "associative", "sequential", "pallas",
                                 "pallas_interpret")


def _combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_r * a_l, a_r * b_l + b_r


def linear_scan(decay_BLD, inputs_BLD, initial_BD=None, *, implementation=None):
    """``h_t = decay_t ⊙ h_{t−1} + inputs_t`` over axis 1; returns ``(h [B, L, D], h_L [B, D])``.

    ``"native"`` is the C++ kernel of :mod:`jaxsparse.ops.native.linear_scan` (CPU, float32;
    its backward one reverse pass of a second kernel); ``"associative"`` is
    ``lax.associative_scan`` (log-depth, parallel: the default on accelerators);
    ``"sequential"`` is ``lax.scan`` (one small dispatch per step); ``"pallas"`` is the kernel of
    :mod:`pallas_kernels.linear_scan` (Triton on CUDA, Mosaic on TPU, chosen by the platform
    being lowered for; the associative scan elsewhere), ``"pallas_interpret"`` its GPU kernel in
    interpret mode (tests). ``None`` takes the native
    kernel on a CPU host for float32 when it builds (fwd+bwd on two cores, min of 25: [32, 128,
    128] 0.8 ms vs 1.3 ms for ``lax.scan``; [4, 2048, 512] 10 vs 33 ms; [1, 8192, 1024] 75 vs
    75 ms — there both are bound by this machine's ~3-8 GB/s memory bandwidth — forward alone
    23 vs 50 ms),
    else ``"sequential"`` on CPU and ``"associative"`` elsewhere.

    Dtypes, the same for every implementation: ``decay``, ``inputs`` and ``initial`` may be
    any floating-point dtypes (mixed too); the scan computes and carries its state in float32
    and returns ``h`` and ``h_L`` in ``inputs``' dtype (``"native"`` itself takes float32
    ``decay`` and ``inputs`` only)."""
    if implementation not in DIAGONAL_SCAN_IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: allowed "
                         f"{DIAGONAL_SCAN_IMPLEMENTATIONS}")
    if decay_BLD.shape != inputs_BLD.shape or decay_BLD.ndim != 3:
        raise ValueError(f"decay {decay_BLD.shape} and inputs {inputs_BLD.shape} must share one "
                         "shape [batch, length, width]")
    if initial_BD is None:
        initial_BD = jnp.zeros((inputs_BLD.shape[0], inputs_BLD.shape[2]), jnp.float32)
    elif initial_BD.shape != (inputs_BLD.shape[0], inputs_BLD.shape[2]):
        raise ValueError(f"initial state {initial_BD.shape}: must be [batch, width] = "
                         f"{(inputs_BLD.shape[0], inputs_BLD.shape[2])}")
    for name, arr in (("decay", decay_BLD), ("inputs", inputs_BLD), ("initial", initial_BD)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):  # h would come back truncated
            raise ValueError(f"{name} has dtype {arr.dtype}; the scan needs floating-point inputs")
    dtype, f32 = inputs_BLD.dtype, lambda t: t.astype(jnp.float32)  # noqa: E731
    initial_BD = f32(initial_BD)  # the carried state (lax.scan needs one dtype in and out)
    if inputs_BLD.shape[1] == 0:  # nothing to scan (every implementation): the initial state
        return inputs_BLD, initial_BD.astype(dtype)
    if implementation in (None, "native"):
        native = _native_or_none(decay_BLD, inputs_BLD, initial_BD,
                                 required=implementation == "native")
        if native is not None:
            return native
        implementation = "sequential" if jax.default_backend() == "cpu" else "associative"
    if implementation.startswith("pallas"):
        from jaxsparse.ops.linear_scan_pallas import pallas_linear_scan

        return pallas_linear_scan(
            decay_BLD, inputs_BLD, initial_BD, interpret=implementation == "pallas_interpret",
            fallback=lambda: linear_scan(decay_BLD, inputs_BLD, initial_BD,
                                         implementation="associative"))
    if implementation == "sequential":
        def step(h, ab):
            h = ab[0] * h + ab[1]
            return h, h

        final, hs = jax.lax.scan(step, initial_BD, (f32(decay_BLD).swapaxes(0, 1),
                                                    f32(inputs_BLD).swapaxes(0, 1)))
        return hs.swapaxes(0, 1).astype(dtype), final.astype(dtype)
    decay_BLD, inputs_BLD = f32(decay_BLD), f32(inputs_BLD)
    inputs_BLD = inputs_BLD.at[:, 0].add(decay_BLD[:, 0] * initial_BD)  # fold h_0 into step 0
    _, hs = jax.lax.associative_scan(_combine, (decay_BLD, inputs_BLD), axis=1)
    return hs.astype(dtype), hs[:, -1].astype(dtype)


def _native_or_none(decay_BLD, inputs_BLD, initial_BD, *, required: bool):
    """The C++ kernel when lowering for CPU (the associative scan on other platforms), or None
    where the default should not use it (an accelerator host, a dtype other than float32, a
    ``shard_map`` over some mesh axes only, or a kernel that did not build; an explicit
    ``"native"`` raises instead). On a mesh the kernel runs on each device's rows and
    channels (``native.partitioning``)."""
    from jaxsparse.ops.native import linear_scan as native
    from jaxsparse.ops.native.partitioning import in_partly_manual_context

    dtypes = {jnp.dtype(t.dtype) for t in (decay_BLD, inputs_BLD)}  # (initial: float32)
    if dtypes != {jnp.dtype(jnp.float32)}:
        if required:
            raise ValueError(f"linear_scan(implementation='native') computes in float32; got "
                             f"{sorted(str(d) for d in dtypes)} (use 'sequential')")
        return None
    if not required and (jax.default_backend() != "cpu" or in_partly_manual_context()):
        return None
    if not native.available():
        if required:
            raise RuntimeError("linear_scan(implementation='native'): the C++ kernel could not "
                               "be built (see the warning above); use 'sequential'")
        return None

    def elsewhere(decay, inputs, initial):
        return linear_scan(decay, inputs, initial, implementation="associative")

    return jax.lax.platform_dependent(decay_BLD, inputs_BLD, initial_BD,
                                      cpu=native.native_linear_scan, default=elsewhere)


def decay_from(delta, log_lambda):
    """``α = exp(−softplus(Δ) ⊙ λ)`` with ``λ = exp(log_lambda)`` (so λ stays positive)."""
    return jnp.exp(-jax.nn.softplus(delta) * jnp.exp(log_lambda))


def _check_diagonal_ssm_shapes(delta, B, C, U, log_lambda, D):
    """Refuse what would broadcast silently (a size-1 axis) or fail deep inside the scan."""
    if U.ndim != 3:
        raise ValueError(f"U must be [batch, length, width]; got {U.shape}")
    for name, arr in (("delta", delta), ("B", B), ("C", C)):
        if arr.shape != U.shape:
            raise ValueError(f"{name} must have U's shape [batch, length, width]={U.shape}; "
                             f"got {arr.shape}")
    for name, arr in (("log_lambda", log_lambda), ("D", D)):
        if arr.shape != (U.shape[2],):
            raise ValueError(f"{name} must be [width={U.shape[2]}]; got {arr.shape}")


def diagonal_ssm(delta, B, C, U, log_lambda, D, *, initial_state=None, implementation=None,
                 segment_ids=None):
    """The recurrence above for ``Δ, B, C, U [batch, length, width]`` and per-channel
    ``log_lambda, D [width]``, in float32 whatever the dtypes of the operands and of
    ``initial_state [B, W]``, for every implementation: ``(y [B, L, W], final state [B, W])``,
    both float32.
    ``segment_ids [batch, length]`` (packed documents): the state restarts from zero where a
    document starts (:mod:`jaxsparse.ops.segments`)."""
    _check_diagonal_ssm_shapes(delta, B, C, U, log_lambda, D)
    f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
    decay = decay_from(f32(delta), f32(log_lambda)[None, None, :])
    if segment_ids is not None:
        decay = decay * keep_factor(segment_ids, *U.shape[:2])[..., None]
    if initial_state is not None:
        initial_state = f32(initial_state)
    states, final = linear_scan(decay, f32(B) * f32(U), initial_state,
                                implementation=implementation)
    y = f32(C) * states + f32(D)[None, None, :] * f32(U)
    return y, final


def diagonal_ssm_reference(delta, B, C, U, log_lambda, D):
    """One token at a time in plain Python over time (tests only)."""
    s = jnp.zeros((U.shape[0], U.shape[2]), jnp.float32)
    out = []
    lam = jnp.exp(log_lambda.astype(jnp.float32))
    for t in range(U.shape[1]):
        alpha = jnp.exp(-jax.nn.softplus(delta[:, t].astype(jnp.float32)) * lam[None])
        s = alpha * s + B[:, t] * U[:, t]
        out.append(C[:, t] * s + D[None] * U[:, t])
    return jnp.stack(out, axis=1)


def diagonal_ssm_sequence_parallel(delta, B, C, U, log_lambda, D, *, mesh, axis="sequence",
                                   initial_state=None, implementation=None, segment_ids=None):
    """:func:`diagonal_ssm` with ``length`` split over mesh axis ``axis``: every shard scans
    its chunk, and chunk states pass between shards (:mod:`jaxsparse.ops.sequence_scan`).
    ``segment_ids``: packed documents, as in :func:`diagonal_ssm`."""
    from jaxsparse.ops.sequence_scan import scan_across_shards

    _check_diagonal_ssm_shapes(delta, B, C, U, log_lambda, D)

    def run(seq, shared, initial):
        ids, initial = shard_documents(seq, initial)
        return diagonal_ssm(seq["delta"], seq["B"], seq["C"], seq["U"], shared["log_lambda"],
                            shared["D"], initial_state=initial, implementation=implementation,
                            segment_ids=ids)

    def total_decay(seq, shared):
        # ∏_t exp(−softplus(Δ_t) λ) = exp(−λ Σ_t softplus(Δ_t)), per batch row and channel
        lam = jnp.exp(shared["log_lambda"].astype(jnp.float32))
        steps = jnp.sum(jax.nn.softplus(seq["delta"].astype(jnp.float32)), axis=1)
        decay = jnp.exp(-steps * lam[None, :])
        keeps = shard_keeps_state(seq)  # a document starting in the shard drops what entered
        return decay if keeps is None else decay * keeps[:, None]

    seq = with_document_starts({"delta": delta, "B": B, "C": C, "U": U}, segment_ids,
                               *U.shape[:2])
    return scan_across_shards(run, total_decay, seq, {"log_lambda": log_lambda, "D": D},
                              initial_state, mesh=mesh, axis=axis)
