"""Flax NNX modules: parameters plus a call into :mod:`jaxsparse.ops`."""

from jaxsparse.nn.attention import Attention
from jaxsparse.nn.embedding import Embed
from jaxsparse.nn.linear import Linear
from jaxsparse.nn.mamba import Mamba, Mamba2
from jaxsparse.nn.mlp import SwiGLU
from jaxsparse.nn.memory import ProductKeyMemory
from jaxsparse.nn.moe import MoE
from jaxsparse.nn.monarch import MonarchLinear, MonarchSwiGLU
from jaxsparse.nn.norm import RMSNorm
from jaxsparse.nn.routing import RoutingAttention

__all__ = ["Attention", "Embed", "Linear", "Mamba", "Mamba2", "MoE", "MonarchLinear", "MonarchSwiGLU", "ProductKeyMemory", "RMSNorm", "RoutingAttention", "SwiGLU"]
