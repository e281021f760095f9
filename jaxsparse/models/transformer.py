"""Decoder-only Transformer LM: pre-RMSNorm blocks, rotary GQA attention, SwiGLU MLP."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.config import ConfigError, ModelConfig, monarch_targets
from jaxsparse.models.lm import LanguageModel
from jaxsparse.nn import (Attention, Linear, MoE, MonarchLinear, RMSNorm, RoutingAttention,
                          SwiGLU)
from jaxsparse.ops.attention import IMPLEMENTATIONS
from jaxsparse.ops.mask_specs import parse_mask_spec
from jaxsparse.ops.masks import LocalMask
from jaxsparse.parallel import constrain


def attention_mask(cfg: ModelConfig):
    """The layer mask from ``cfg.attention_mask``; config errors name the key."""
    if cfg.attention_impl not in IMPLEMENTATIONS:
        raise ConfigError(f"model.attention_impl={cfg.attention_impl!r}: allowed {IMPLEMENTATIONS}")
    try:
        return parse_mask_spec(cfg.attention_mask, cfg.n_heads)
    except ValueError as err:
        raise ConfigError(f"model.attention_mask={cfg.attention_mask!r}: {err}") from None


def uses_moe(cfg: ModelConfig, layer: int) -> bool:
    """MoE feed-forward in every ``moe_every``-th layer, counting from the second (layers
    1, 3, ... for 2), as Switch/GShard alternate dense and sparse layers."""
    return cfg.moe_experts > 0 and layer % cfg.moe_every == cfg.moe_every - 1


def projection(cfg: ModelConfig, kind: str):
    """The linear-layer class for ``kind`` ("mlp" or "attention"): Monarch where
    ``model.monarch`` names it, dense otherwise."""
    if kind not in monarch_targets(cfg):
        return Linear
    return functools.partial(MonarchLinear, nblocks=cfg.monarch_blocks,
                             implementation=cfg.monarch_impl)


def feed_forward(cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs, out_scale: float):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if not uses_moe(cfg, layer):  # MoE experts stay dense: they are already sparse
        return SwiGLU(cfg.d_model, cfg.d_ff, rngs=rngs, out_init_scale=out_scale, dtype=dtype,
                      param_dtype=param_dtype, linear=projection(cfg, "mlp"))
    try:
        return MoE(cfg.d_model, cfg.moe_d_ff or cfg.d_ff, cfg.moe_experts, cfg.moe_k, rngs=rngs,
                   router=cfg.moe_router, capacity_factor=cfg.moe_capacity_factor,
                   renormalize=cfg.moe_renormalize, jitter=cfg.moe_jitter, chunk=cfg.moe_chunk,
                   causal=True, shared_experts=cfg.moe_shared_experts,
                   aux_weight=cfg.moe_aux_weight, z_weight=cfg.moe_z_weight,
                   k_end=cfg.moe_k_end, k_schedule_steps=cfg.moe_k_schedule_steps,
                   eval_k=cfg.moe_eval_k,
                   grouped_impl=cfg.moe_grouped_impl, out_init_scale=out_scale, dtype=dtype,
                   param_dtype=param_dtype)
    except ValueError as err:
        raise ConfigError(f"model.moe_*: {err}") from None


def apply_feed_forward(ffn, x_BLD, segment_ids=None, active=None):
    """``ffn(x)``; a MoE layer also gets the ``segment_ids`` of packed documents (its
    chunk-level routing pools within documents) and the curriculum's ``active`` flag (its
    losses count only while on), a dense MLP is per token."""
    if isinstance(ffn, MoE):
        return ffn(x_BLD, segment_ids=segment_ids, active=active)
    return ffn(x_BLD)


def decode_feed_forward(ffn, x_BLD, cache, cache_index):
    """``(y, cache)`` of the feed-forward while decoding: a MoE through its ``decode`` (chunk
    routing carries the current chunk's running sum and the last chunk's mean between calls;
    called plainly, each call's tokens were routed from their own pooled inputs), a dense MLP
    per token with nothing cached. Hydra's and the Transformer's blocks both use it."""
    if isinstance(ffn, MoE):
        return ffn.decode(x_BLD, cache, cache_index)
    return ffn(x_BLD), cache


def attention_layer(cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs, out_scale: float):
    """The sequence mixer of ``layer``: GQA attention with the configured mask, or in a routing
    transformer mixed local/routing heads above ``routing_skip_first`` and a causal local
    window below it (Roy et al. 2021)."""
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(rngs=rngs, rope_theta=cfg.rope_theta, out_init_scale=out_scale, dtype=dtype,
              param_dtype=param_dtype)
    if cfg.name != "routing_transformer":
        return Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim,
                         mask=attention_mask(cfg), implementation=cfg.attention_impl,
                         linear=projection(cfg, "attention"), **kw)
    if layer < cfg.routing_skip_first:
        return Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim,
                         mask=LocalMask(cfg.routing_local_window - 1, 0),
                         implementation=cfg.attention_impl, **kw)
    return RoutingAttention(cfg.d_model, cfg.n_heads, cfg.resolved_head_dim,
                            routing_heads=cfg.routing_heads, num_clusters=cfg.routing_clusters,
                            window=cfg.routing_window, local_window=cfg.routing_local_window,
                            shared_qk=cfg.routing_shared_qk, decay=cfg.routing_decay,
                            dense_steps=cfg.routing_dense_steps,
                            center=cfg.routing_center,
                            key_centroids=cfg.routing_key_centroids,
                            probes=cfg.routing_probes,
                            reseed=cfg.routing_reseed,
                            commitment=cfg.routing_commitment, **kw)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, layer: int = 0):
        param_dtype = jnp.dtype(cfg.param_dtype)
        # GPT-2 style: scale residual-branch outputs by 1/(2 n_layers) in variance so that the
        # residual stream does not grow with depth.
        out_scale = 1.0 / (2 * cfg.n_layers)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.attn = attention_layer(cfg, layer, rngs=rngs, out_scale=out_scale)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.mlp = feed_forward(cfg, layer, rngs=rngs, out_scale=out_scale)

    def init_cache(self, batch, max_len, dtype):
        return {"attn": self.attn.init_cache(batch, max_len, dtype),
                "ffn": self.mlp.init_cache(batch) if isinstance(self.mlp, MoE) else {}}

    def __call__(self, x_BLD, positions_BL, *, segment_ids=None, cache=None, cache_index=None):
        mixed, attn_cache = self.attn(self.attn_norm(x_BLD), positions_BL,
                                      segment_ids=segment_ids,
                                      cache=None if cache is None else cache["attn"],
                                      cache_index=cache_index)
        # the residual stream is float32 whatever the compute dtype (as Mamba's
        # residual_in_fp32): rounded to bfloat16 after every block, the small updates lost
        # their low bits and the error grew with depth (logits 0.54% off float32 at 2
        # layers, 1.29% at 24; in float32 0.45% and 0.46%)
        x_BLD = x_BLD.astype(jnp.float32) + mixed.astype(jnp.float32)
        h = self.mlp_norm(x_BLD)
        if cache is None:
            y, new_cache = apply_feed_forward(self.mlp, h, segment_ids), None
        else:
            y, ffn_cache = decode_feed_forward(self.mlp, h, cache["ffn"], cache_index)
            new_cache = {"attn": attn_cache, "ffn": ffn_cache}
        x_BLD = x_BLD + y.astype(jnp.float32)
        return constrain(x_BLD, ("batch", "length", "embed")), new_cache


class Transformer(LanguageModel):
    """Decoder-only Transformer: ``logits = model(tokens)``, int ``[B, L]`` -> ``[B, L, vocab]``."""

    block_class = Block


class RoutingTransformer(Transformer):
    """The Transformer with routing attention in its upper layers (``model.routing_*``)."""


def projection_flops_per_token(cfg: ModelConfig) -> int:
    """FLOPs per token of the blocks' projections (attention q/k/v/o, no k in a routing layer
    with ``routing_shared_qk``, and feed-forward; for MoE layers the ``k`` routed experts plus
    shared ones), Monarch where the builder makes them Monarch (``model.monarch``).
    Attention scores and the output head are left out: they do not change with Monarch."""
    from jaxsparse.ops.monarch import dense_flops, monarch_flops

    targets = monarch_targets(cfg)

    def proj(kind, n_in, n_out):
        if kind in targets:
            return monarch_flops(1, n_in, n_out, cfg.monarch_blocks)
        return dense_flops(1, n_in, n_out)

    d, hd = cfg.d_model, cfg.resolved_head_dim
    # the builder's attention_layer: Monarch q/k/v/o in the Transformer only; a routing
    # transformer's local layers are dense Attention and its routing layers (from
    # routing_skip_first up) dense RoutingAttention, without a key projection when shared_qk
    kind = "attention" if cfg.name == "transformer" else None
    q_or_o, k_or_v = proj(kind, d, cfg.n_heads * hd), proj(kind, d, cfg.n_kv_heads * hd)
    total = 0
    for layer in range(cfg.n_layers):
        if cfg.name == "routing_transformer" and layer >= cfg.routing_skip_first:
            total += (3 if cfg.routing_shared_qk else 4) * q_or_o  # n_heads keys and values
        else:
            total += 2 * q_or_o + 2 * k_or_v
        if uses_moe(cfg, layer):
            experts = cfg.moe_k + cfg.moe_shared_experts
            total += experts * 3 * dense_flops(1, d, cfg.moe_d_ff or cfg.d_ff)
        else:
            total += 2 * proj("mlp", d, cfg.d_ff) + proj("mlp", cfg.d_ff, d)
    return total


def count_params(cfg: ModelConfig) -> int:
    """Parameter count without allocating (``jax.eval_shape``)."""
    from jaxsparse.models.registry import build

    abstract = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
