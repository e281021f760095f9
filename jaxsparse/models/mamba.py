"""Selective state-space language models: Mamba-1 and Mamba-2 stacks (no attention, no MLP;
each residual block is RMSNorm then the mixer, as in state-spaces/mamba)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxsparse.config import ConfigError, ModelConfig
from jaxsparse.models.lm import LanguageModel
from jaxsparse.nn import RMSNorm
from jaxsparse.nn.mamba import Mamba, Mamba2
from jaxsparse.ops.ssm import SCAN_IMPLEMENTATIONS
from jaxsparse.parallel import constrain


class _MixerBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, mixer: nnx.Module):
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))
        self.mixer = mixer

    def init_cache(self, batch, max_len, dtype):
        return self.mixer.init_cache(batch, max_len, dtype)

    def __call__(self, x_BLD, positions_BL, *, segment_ids=None, cache=None, cache_index=None):
        y, cache = self.mixer(self.norm(x_BLD), positions_BL, segment_ids=segment_ids,
                              cache=cache, cache_index=cache_index)
        # the residual stream stays in float32 (Mamba's residual_in_fp32)
        x_BLD = x_BLD.astype(jnp.float32) + y.astype(jnp.float32)
        return constrain(x_BLD, ("batch", "length", "embed")), cache


def _out_scale(cfg):
    return 1.0 / cfg.n_layers  # out_proj rescaled by 1/sqrt(n_layers) (GPT-2 / Mamba)


def _precision(cfg):
    """The mixer's compute and parameter dtypes (``model.dtype``, ``model.param_dtype``)."""
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


class Mamba1Block(_MixerBlock):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, layer: int = 0):
        if cfg.ssm_impl not in SCAN_IMPLEMENTATIONS:
            raise ConfigError(f"model.ssm_impl={cfg.ssm_impl!r}: allowed {SCAN_IMPLEMENTATIONS}")
        super().__init__(cfg, Mamba(cfg.d_model, d_state=cfg.d_state, expand=cfg.expand,
                                    d_conv=cfg.d_conv, dt_rank=cfg.dt_rank, rngs=rngs,
                                    out_init_scale=_out_scale(cfg), implementation=cfg.ssm_impl,
                                    chunk_size=cfg.ssm_chunk, **_precision(cfg)))


class Mamba2Block(_MixerBlock):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, layer: int = 0):
        try:
            mixer = Mamba2(cfg.d_model, d_state=cfg.d_state, expand=cfg.expand, d_conv=cfg.d_conv,
                           head_dim=cfg.ssm_head_dim, groups=cfg.ssm_groups,
                           chunk_size=cfg.ssm_chunk, rngs=rngs, out_init_scale=_out_scale(cfg),
                           **_precision(cfg))
        except ValueError as err:
            raise ConfigError(f"model (mamba2): {err}") from None
        super().__init__(cfg, mixer)


class MambaLM(LanguageModel):
    block_class = Mamba1Block


class Mamba2LM(LanguageModel):
    block_class = Mamba2Block
