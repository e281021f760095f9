"""The language-model shell shared by every architecture: embedding, a stack of residual
blocks, final norm, output head, and cached decoding.

A subclass names its ``block_class``: a module built as ``block_class(cfg, rngs=rngs, layer=i)`` and
called as ``block(x, positions, segment_ids=..., cache=..., cache_index=...) -> (x, cache)``,
with ``init_cache(batch, max_len, dtype)``; attention blocks cache keys and values,
recurrent blocks their state, and generation works the same for both.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.config import ModelConfig, validate_model
from jaxsparse.nn import Embed, Linear, RMSNorm
from jaxsparse.ops.checks import check_cache_request
from jaxsparse.parallel import constrain


class LanguageModel(nnx.Module):
    """``logits = model(tokens)``: int ``[B, L]`` -> float32 ``[B, L, vocab]``.

    Decoding: ``cache = model.init_cache(batch, max_len)`` then
    ``logits, cache = model.decode(tokens, cache)`` any number of tokens at a time.
    """

    block_class = None  # subclasses name their residual block

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        # checked here, not only in models.build: a model class built directly (a notebook's
        # HydraLM(cfg)) rounded pkm_slots=60 down to 49 slots, or divided by moe_every=0.
        # On a plain copy: dataclasses.asdict reads the fields from outside this package, and
        # tests/test_config_usage.py records the keys the builders themselves read.
        validate_model(ModelConfig(**dataclasses.asdict(cfg)))
        self.cfg = cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        # Tied tables start small (GPT-2's 0.02): a unit-variance table reused as the output
        # projection would give each token a large logit for itself at initialisation.
        self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs,
                           init_std=0.02 if cfg.tie_embeddings else 1.0, dtype=dtype,
                           param_dtype=param_dtype)
        self.blocks = nnx.List([self.block_class(cfg, rngs=rngs, layer=i) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
        if not cfg.tie_embeddings:
            # Small initial logits: the first prediction is near uniform (loss ~ ln vocab).
            # float32 logits from the compute-dtype matmul (see Embed.attend)
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size, logical_axes=("embed", "vocab"),
                                  rngs=rngs, init_scale=0.1, dtype=dtype, param_dtype=param_dtype,
                                  out_dtype=jnp.float32)

    def logits(self, x_BLD):
        """Final norm and output head: ``[B, L, D]`` features -> float32 ``[B, L, vocab]``."""
        return self._logits(x_BLD)

    def _logits(self, x_BLD):
        x_BLD = self.final_norm(x_BLD)
        logits = self.embed.attend(x_BLD) if self.cfg.tie_embeddings else self.lm_head(x_BLD)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def __call__(self, tokens_BL: jax.Array, *, segment_ids=None, positions=None) -> jax.Array:
        return self._logits(self.features(tokens_BL, segment_ids=segment_ids, positions=positions))

    def features(self, tokens_BL: jax.Array, *, segment_ids=None, positions=None) -> jax.Array:
        """The residual stream after the last block, ``[B, L, d_model]``; ``logits`` of it is
        the forward pass (the training step splits that into chunks, ``train.loss_chunk``)."""
        _check_tokens(tokens_BL)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
        x = constrain(self.embed(tokens_BL), ("batch", "length", "embed"))
        context = self._block_context(training_call=True)
        for block in self.blocks:
            if self.cfg.remat:
                x = _remat_block(block, x, positions, segment_ids, context)
            else:
                x, _ = block(x, positions, segment_ids=segment_ids, **context)
        return x

    def _block_context(self, training_call: bool) -> dict:
        """Extra keyword arguments every block call gets (e.g. Hydra's shared workspace and
        curriculum switches); ``training_call`` is True for the full forward pass."""
        return {}

    def init_cache(self, batch: int, max_len: int | None = None, dtype=None):
        max_len, dtype = self._cache_arguments(batch, max_len, dtype)
        return {
            "index": jnp.zeros((), jnp.int32),
            "layers": [block.init_cache(batch, max_len, dtype) for block in self.blocks],
        }

    def _cache_arguments(self, batch, max_len, dtype):
        """``(max_len, dtype)`` of ``init_cache`` with the defaults filled in, checked here once
        for every architecture (``ops.checks.check_cache_request``)."""
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        dtype = jnp.dtype(self.cfg.dtype) if dtype is None else dtype
        check_cache_request(batch, max_len, dtype)
        return max_len, dtype

    def decode(self, tokens_BL: jax.Array, cache):
        """Run ``tokens`` after the ``cache["index"]`` positions already cached."""
        _check_tokens(tokens_BL)
        index = cache["index"]
        positions = index + jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
        x = self.embed(tokens_BL)
        context = self._block_context(training_call=False)
        new_layers = []
        for block, layer_cache in zip(self.blocks, cache["layers"]):
            x, layer_cache = block(x, positions, cache=layer_cache, cache_index=index, **context)
            new_layers.append(layer_cache)
        return self._logits(x), {"index": index + tokens_BL.shape[1], "layers": new_layers}


def _check_tokens(tokens):
    if not hasattr(tokens, "ndim"):  # a list failed with AttributeError further in
        raise ValueError(f"tokens must be an integer [batch, length] array, got "
                         f"{type(tokens).__name__} (jnp.asarray it first)")
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer [batch, length] array, got {tokens.dtype}"
                         f"{list(tokens.shape)}")
    if 0 in tokens.shape:  # the layers named their own internal tensors (attention's q, k_new)
        raise ValueError(f"tokens of shape {list(tokens.shape)}: the batch and the length must "
                         "each be >= 1")


def _remat_block(block, x_BLD, positions, segment_ids, context):
    """``block(x)`` whose inner activations are recomputed in the backward pass instead of
    stored (``nnx.remat``: module state such as sown losses still flows out)."""
    modules = {k: v for k, v in context.items() if isinstance(v, nnx.Module)}
    static = {k: v for k, v in context.items() if k not in modules}

    def run(block, modules, x_BLD, positions, segment_ids):
        return block(x_BLD, positions, segment_ids=segment_ids, **modules, **static)[0]

    return nnx.remat(run)(block, modules, x_BLD, positions, segment_ids)
