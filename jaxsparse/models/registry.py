"""Model registry: ``ModelConfig.name`` -> builder."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flax import nnx

from jaxsparse.config import ModelConfig, validate_model

_BUILDERS: dict[str, Callable[[ModelConfig, nnx.Rngs], nnx.Module]] = {}


def register(name: str):
    def decorator(builder):
        _BUILDERS[name] = builder
        return builder

    return decorator


def names() -> list[str]:
    return sorted(_BUILDERS)


def build(model_cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """Build the NNX model that ``model_cfg.name`` names. The config is checked first
    (:func:`jaxsparse.config.validate_model`, by the :class:`LanguageModel` constructor): an
    impossible one raises the :class:`~jaxsparse.config.ConfigError` that
    :func:`jaxsparse.config.validate` gives, naming the key, its value and what is allowed."""
    if model_cfg.name not in _BUILDERS:  # (validate_model's error names the allowed ones)
        validate_model(ModelConfig(**dataclasses.asdict(model_cfg)))
    return _BUILDERS[model_cfg.name](model_cfg, rngs)


@register("transformer")
def _transformer(cfg, rngs):
    from jaxsparse.models.transformer import Transformer

    return Transformer(cfg, rngs=rngs)


@register("routing_transformer")
def _routing_transformer(cfg, rngs):
    from jaxsparse.models.transformer import RoutingTransformer

    return RoutingTransformer(cfg, rngs=rngs)


@register("mamba")
def _mamba(cfg, rngs):
    from jaxsparse.models.mamba import MambaLM

    return MambaLM(cfg, rngs=rngs)


@register("mamba2")
def _mamba2(cfg, rngs):
    from jaxsparse.models.mamba import Mamba2LM

    return Mamba2LM(cfg, rngs=rngs)


@register("hydra")
def _hydra(cfg, rngs):
    from jaxsparse.models.hydra import HydraLM

    return HydraLM(cfg, rngs=rngs)
