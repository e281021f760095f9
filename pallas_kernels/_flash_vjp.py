"""What the GPU and TPU block-sparse kernels share: static parameters and the custom VJP."""

from __future__ import annotations

import functools

import jax


class KernelConfig:
    """Static kernel parameters; hashable, so custom_vjp can hold them as non-differentiable."""

    def __init__(self, **params):
        self.__dict__.update(params)
        self._key = tuple(sorted(params.items(), key=lambda kv: kv[0]))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, KernelConfig) and self._key == other._key

    def pick(self, *names: str) -> dict:
        return {n: getattr(self, n) for n in names}


def flash_vjp(forward, backward):
    """``attention(q, k, v, q_seg, kv_seg, tables, cfg) -> (out, lse)`` with a FlashAttention
    backward.

    ``forward(...) -> (out, lse)``; ``backward(q, k, v, q_seg, kv_seg, tables, out, lse, do,
    dlse, cfg) -> (dq, dk, dv)``. Segment ids and block tables get no cotangent. ``dlse`` is the
    log-sum-exp's cotangent (zeros when the caller uses only ``out``): since
    d lse_i / d s_ij = p_ij, it enters the backward as ``delta_i - dlse_i`` in
    ``dS = P ⊙ (dP - delta)``.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
    def attention(q, k, v, q_seg, kv_seg, tables, cfg):
        return forward(q, k, v, q_seg, kv_seg, tables, cfg)

    def attention_fwd(q, k, v, q_seg, kv_seg, tables, cfg):
        out, lse = forward(q, k, v, q_seg, kv_seg, tables, cfg)
        return (out, lse), (q, k, v, q_seg, kv_seg, tables, out, lse)

    def attention_bwd(cfg, residuals, cotangents):
        q, k, v, q_seg, kv_seg, tables, out, lse = residuals
        do, dlse = cotangents
        dq, dk, dv = backward(q, k, v, q_seg, kv_seg, tables, out, lse, do, dlse, cfg)
        return (dq, dk, dv, *jax.tree.map(lambda x: None, (q_seg, kv_seg, tables)))

    attention.defvjp(attention_fwd, attention_bwd)
    return attention
