"""Whole models assembled from :mod:`jaxsparse.nn`, built by name from a config."""

from jaxsparse.models.registry import build, names, register
from jaxsparse.models.transformer import Transformer, count_params

__all__ = ["Transformer", "build", "count_params", "names", "register"]
