"""Decoder-only Transformer LM: pre-RMSNorm blocks, rotary GQA attention, SwiGLU MLP."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.config import ConfigError, ModelConfig
from jaxsparse.models.lm import LanguageModel
from jaxsparse.nn import Attention, RMSNorm, SwiGLU
from jaxsparse.ops.attention import IMPLEMENTATIONS
from jaxsparse.ops.mask_specs import parse_mask_spec
from jaxsparse.parallel import constrain


def attention_mask(cfg: ModelConfig):
    """The layer mask from ``cfg.attention_mask``; config errors name the key."""
    if cfg.attention_impl not in IMPLEMENTATIONS:
        raise ConfigError(f"model.attention_impl={cfg.attention_impl!r}: allowed {IMPLEMENTATIONS}")
    try:
        return parse_mask_spec(cfg.attention_mask, cfg.n_heads)
    except ValueError as err:
        raise ConfigError(f"model.attention_mask={cfg.attention_mask!r}: {err}") from None


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        # GPT-2 style: scale residual-branch outputs by 1/(2 n_layers) in variance so that the
        # residual stream does not grow with depth.
        out_scale = 1.0 / (2 * cfg.n_layers)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim,
                              rngs=rngs, rope_theta=cfg.rope_theta, out_init_scale=out_scale,
                              mask=attention_mask(cfg), implementation=cfg.attention_impl, dtype=dtype,
                              param_dtype=param_dtype)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, rngs=rngs, out_init_scale=out_scale,
                          dtype=dtype, param_dtype=param_dtype)

    def init_cache(self, batch, max_len, dtype):
        return self.attn.init_cache(batch, max_len, dtype)

    def __call__(self, x_BLD, positions_BL, *, segment_ids=None, cache=None, cache_index=None):
        mixed, cache = self.attn(self.attn_norm(x_BLD), positions_BL, segment_ids=segment_ids,
                                 cache=cache, cache_index=cache_index)
        x_BLD = x_BLD + mixed.astype(x_BLD.dtype)
        x_BLD = x_BLD + self.mlp(self.mlp_norm(x_BLD)).astype(x_BLD.dtype)
        return constrain(x_BLD, ("batch", "length", "embed")), cache


class Transformer(LanguageModel):
    """Decoder-only Transformer: ``logits = model(tokens)``, int ``[B, L]`` -> ``[B, L, vocab]``."""

    block_class = Block


def count_params(cfg: ModelConfig) -> int:
    """Parameter count without allocating (``jax.eval_shape``)."""
    from jaxsparse.models.registry import build

    abstract = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
