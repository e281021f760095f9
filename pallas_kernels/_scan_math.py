"""One time step of the Mamba-1 selective scan and of its backward pass, as the GPU and TPU
kernels both run them.

Layout inside a kernel: the state ``h`` is ``[N, BD]`` (state index on sublanes, channels on
lanes, so a step is elementwise over full vector registers); per-step rows ``x_t, dt_t,
dy_t`` are ``[1, BD]`` and per-step columns ``B_t, C_t`` are ``[N, 1]``. All float32.

Recurrence (Gu & Dao 2023, Algorithm 2), with ``dt`` already biased and softplus-ed:
    a_t = k_t exp(dt_t A),   h_t = a_t h_{t-1} + B_t (dt_t x_t),   y_t = sum_n C_t h_t,
where ``k_t`` (``keep``, a ``[1, 1]`` per step, 1 when absent) is 0 at the first token of a
packed document (:mod:`jaxsparse.ops.segments`) and 1 elsewhere. It is a constant factor on
the decay, so the backward below holds with ``a_t`` as written (dL/d(dt_t A) = G_t h_{t-1} a_t
is 0 at a reset) and k gets no gradient.
Backward, with G_t = dL/dh_t (everything flowing into h_t from y_t and from h_{t+1}):
    G_t = C_t dy_t + a_{t+1} G_{t+1}
    dx_t = dt_t sum_n G_t B_t            dB_t = sum_c G_t dt_t x_t      dC_t = sum_c h_t dy_t
    d(dt_t A) = G_t h_{t-1} a_t  ->  ddt_t = sum_n d(dt_t A) A + x_t sum_n G_t B_t,
                                     dA += d(dt_t A) dt_t
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def forward_out_shapes(batch, length, d, n, num_blocks):
    """y, final state, state at the start of every time block."""
    return [jax.ShapeDtypeStruct((batch, length, d), f32), jax.ShapeDtypeStruct((batch, n, d), f32),
            jax.ShapeDtypeStruct((batch, num_blocks, n, d), f32)]


def backward_out_shapes(batch, length, d, n, blocks_d):
    """dx, ddt, dA^T (per batch row), dB^T and dC^T (per channel block), dh0."""
    seq, state = (batch, length, d), (batch, n, d)
    cols = (batch, blocks_d, n, length)
    return [jax.ShapeDtypeStruct(s, f32) for s in (seq, seq, state, cols, cols, state)]


def split_keep(refs, has_keep):
    """``(keep ref or None, the other refs)`` of a kernel whose optional reset input is the
    last of its inputs (so the first of ``refs``, the refs after the fixed inputs)."""
    return (refs[0], refs[1:]) if has_keep else (None, refs)


def decay(dt_t, At, keep_t=None):
    """``a_t``: ``[N, BD]``."""
    a = jnp.exp(dt_t * At)
    return a if keep_t is None else a * keep_t


def forward_step(h, x_t, dt_t, At, B_t, C_t, keep_t=None):
    """``(h_t, a_t, y_t)`` from ``h_{t-1}``."""
    a = decay(dt_t, At, keep_t)
    h = a * h + B_t * (dt_t * x_t)
    return h, a, jnp.sum(h * C_t, axis=0, keepdims=True)


def backward_step(g, h_prev, h, a, dy_t, x_t, dt_t, At, B_t, C_t):
    """From ``g = a_{t+1} G_{t+1}``: ``(a_t G_t, dx_t, ddt_t, dA_t, dB_t, dC_t)``."""
    G = g + C_t * dy_t
    g_B = jnp.sum(G * B_t, axis=0, keepdims=True)  # [1, BD]
    d_dtA = G * h_prev * a  # [N, BD]
    ddt = jnp.sum(d_dtA * At, axis=0, keepdims=True) + g_B * x_t
    dB = jnp.sum(G * (dt_t * x_t), axis=1, keepdims=True)  # [N, 1], this channel block's part
    dC = jnp.sum(h * dy_t, axis=1, keepdims=True)
    return G * a, dt_t * g_B, ddt, d_dtA * dt_t, dB, dC
