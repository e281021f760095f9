"""Decoder-only Transformer LM: pre-RMSNorm blocks, rotary GQA attention, SwiGLU MLP."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.config import ConfigError, ModelConfig
from jaxsparse.nn import Attention, Embed, Linear, RMSNorm, SwiGLU
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


class Transformer(nnx.Module):
    """``logits = model(tokens)``: int ``[B, L]`` -> float32 ``[B, L, vocab]``.

    Decoding: ``cache = model.init_cache(batch, max_len)`` then
    ``logits, cache = model.decode(tokens, cache)`` any number of tokens at a time.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=dtype,
                           param_dtype=param_dtype)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
        if not cfg.tie_embeddings:
            # Small initial logits: the first prediction is near uniform (loss ~ ln vocab).
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size, logical_axes=("embed", "vocab"),
                                  rngs=rngs, init_scale=0.1, dtype=dtype, param_dtype=param_dtype)

    def _logits(self, x_BLD):
        x_BLD = self.final_norm(x_BLD)
        logits = self.embed.attend(x_BLD) if self.cfg.tie_embeddings else self.lm_head(x_BLD)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def __call__(self, tokens_BL: jax.Array, *, segment_ids=None, positions=None) -> jax.Array:
        _check_tokens(tokens_BL)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
        x = constrain(self.embed(tokens_BL), ("batch", "length", "embed"))
        for block in self.blocks:
            x, _ = block(x, positions, segment_ids=segment_ids)
        return self._logits(x)

    def init_cache(self, batch: int, max_len: int | None = None, dtype=None):
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        dtype = jnp.dtype(self.cfg.dtype) if dtype is None else dtype
        return {
            "index": jnp.zeros((), jnp.int32),
            "layers": [block.init_cache(batch, max_len, dtype) for block in self.blocks],
        }

    def decode(self, tokens_BL: jax.Array, cache):
        """Run ``tokens`` after the ``cache["index"]`` positions already cached."""
        _check_tokens(tokens_BL)
        index = cache["index"]
        positions = index + jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
        x = self.embed(tokens_BL)
        new_layers = []
        for block, layer_cache in zip(self.blocks, cache["layers"]):
            x, layer_cache = block(x, positions, cache=layer_cache, cache_index=index)
            new_layers.append(layer_cache)
        return self._logits(x), {"index": index + tokens_BL.shape[1], "layers": new_layers}


def _check_tokens(tokens):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer [batch, length] array, got {tokens.dtype}"
                         f"{list(tokens.shape)}")


def count_params(cfg: ModelConfig) -> int:
    """Parameter count without allocating (``jax.eval_shape``)."""
    from jaxsparse.models.registry import build

    abstract = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
