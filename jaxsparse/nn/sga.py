"""Sparse global attention layer (:mod:`jaxsparse.ops.sga`) with rotary positions, a linear
controller scoring each token as a global candidate, and a decode cache: ring buffers of the
window and of the global candidates (``window + max_global + 1`` slots) when that is smaller than
a cache of every position."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.nn.batch_local import heads_local, rows_local
from jaxsparse.nn.cache_layout import stored, viewed
from jaxsparse.nn.linear import Linear
from jaxsparse.ops.attention.decode import check_new_positions_fit
from jaxsparse.ops.checks import check_cache_request, checked_decode_cache
from jaxsparse.ops.rotary import apply_rotary, check_rope_theta, check_rotary_head_dim
from jaxsparse.ops.segments import refuse_while_decoding
from jaxsparse.ops.sga import (SGA_IMPLEMENTATIONS, check_sga_options, sga_decode,
                               sparse_global_attention)
from jaxsparse.ops.sga_rings import init_sga_rings, sga_ring_decode
from jaxsparse.parallel import sequence_axis_size


class SparseGlobalAttention(nnx.Module):
    """Each query reads its ``window`` most recent tokens and the ``max_global`` most recent
    controller-picked tokens before them; ``n_heads % n_kv_heads == 0`` (GQA)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
                 window: int, max_global: int, rngs: nnx.Rngs, rope_theta: float = 10_000.0,
                 out_init_scale: float = 1.0, implementation: str | None = None,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        if min(d_model, n_heads, n_kv_heads, head_dim) < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads}, n_kv_heads={n_kv_heads}, head_dim={head_dim}, "
                             f"d_model={d_model}: each must be >= 1, and n_heads a multiple of "
                             "n_kv_heads")
        check_sga_options(window, max_global)
        check_rope_theta(rope_theta, "rope_theta")
        check_rotary_head_dim(head_dim)
        if implementation not in SGA_IMPLEMENTATIONS:
            raise ValueError(f"implementation={implementation!r}: allowed {SGA_IMPLEMENTATIONS}")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Linear(d_model, (n_heads, head_dim), logical_axes=("embed", "heads", "kv"), **kw)
        self.k_proj = Linear(d_model, (n_kv_heads, head_dim),
                             logical_axes=("embed", "kv_heads", "kv"), **kw)
        self.v_proj = Linear(d_model, (n_kv_heads, head_dim),
                             logical_axes=("embed", "kv_heads", "kv"), **kw)
        self.o_proj = Linear((n_heads, head_dim), d_model, logical_axes=("heads", "kv", "embed"),
                             init_scale=out_init_scale, **kw)
        # the controller: one score per token, a candidate when > 0 (about half at init)
        self.controller = Linear(d_model, 1, logical_axes=("embed", None), rngs=rngs,
                                 dtype=jnp.float32, param_dtype=param_dtype)
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.window, self.max_global, self.rope_theta = window, max_global, rope_theta
        self.implementation = implementation  # of the full pass (ops.sga.SGA_IMPLEMENTATIONS)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        check_cache_request(batch, max_len, dtype)  # an integer ring would truncate keys
        if self.window + self.max_global + 1 < max_len:
            # a state of window + max_global + 1 slots, whatever the length (ops.sga_rings)
            rings = init_sga_rings(batch, self.window, self.max_global, self.n_kv_heads,
                                   self.head_dim, dtype)
            # heads-first keys and values kept without size-1 axes (nn.cache_layout)
            return {name: stored(x) if x.ndim == 4 else x for name, x in rings.items()}
        # (sequence first: squeezed, this cache decoded slower at batch 1 — 18 vs 8 ms a
        # token in hydra_29m after 4k tokens — so it keeps its 4-d shape)
        shape = (batch, max_len, self.n_kv_heads, self.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                "score": jnp.zeros((batch, max_len), jnp.float32)}

    def scores(self, x_BLD):
        return self.controller(x_BLD)[..., 0]

    def __call__(self, x_BLD, positions_BL, *, segment_ids=None, cache=None, cache_index=None):
        """``segment_ids [B, L]`` (packed documents, no ``cache``): each query reads keys of
        its own document only."""
        refuse_while_decoding(segment_ids, cache)
        q = apply_rotary(self.q_proj(x_BLD), positions_BL, self.rope_theta)
        k = apply_rotary(self.k_proj(x_BLD), positions_BL, self.rope_theta)
        v = self.v_proj(x_BLD)
        score = self.scores(x_BLD)
        if cache is None:
            def attend(q, k, v, score, segment_ids=None):
                return sparse_global_attention(q, k, v, score, window=self.window,
                                               max_global=self.max_global,
                                               implementation=self.implementation,
                                               segment_ids=segment_ids)

            qkv = (q, k, v)  # GQA: k, v keep their n_kv_heads (never repeated)
            rows = (score,) if segment_ids is None else (score, segment_ids)
            if self.implementation == "core":
                # a kernel the compiler cannot partition: run it on each device's rows and
                # heads, as the attention layer does (nn.batch_local.heads_local)
                out = heads_local(attend, qkv, rows)
            elif sequence_axis_size() > 1:
                # the length is split: whole rows per device (one all-to-all each way), not
                # an all-gather of the keys for every query block (nn.batch_local.rows_local)
                out = rows_local(attend, *qkv, *rows)
            else:
                out = attend(*qkv, *rows)
            return self.o_proj(out), None
        batch, heads, dim = x_BLD.shape[0], self.n_kv_heads, self.head_dim
        ring_cache = isinstance(cache, Mapping) and "global_count" in cache
        # a bad index or batch would fail inside dynamic_update_slice (the rings' keys and
        # values may have lost a size-1 batch axis: their unsqueezed arrays are checked)
        cache_index = checked_decode_cache(cache, cache_index, batch,
                                           ("score", "global_count") if ring_cache else
                                           ("k", "v", "score"))
        if ring_cache:
            rings = dict(cache)
            for name in ("k", "v", "global_k", "global_v"):
                rings[name] = viewed(cache[name], batch, heads, None, dim)
            out, rings = sga_ring_decode(q, k, v, score, rings, cache_index, window=self.window,
                                         max_global=self.max_global)
            return self.o_proj(out), {name: stored(x) if x.ndim == 4 else x
                                      for name, x in rings.items()}
        check_new_positions_fit(cache_index, x_BLD.shape[1], cache["k"].shape[1])
        start = (0, cache_index, 0, 0)
        new = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start),
               "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start),
               "score": jax.lax.dynamic_update_slice(cache["score"], score, (0, cache_index))}
        lengths = jnp.full((batch,), cache_index + x_BLD.shape[1], jnp.int32)
        out = sga_decode(q, new["k"], new["v"], new["score"], lengths,
                         window=self.window, max_global=self.max_global)
        return self.o_proj(out), new
