"""Flax NNX modules: parameters plus a call into :mod:`jaxsparse.ops`."""

from jaxsparse.nn.attention import Attention
from jaxsparse.nn.diagonal_ssm import DiagonalSSM
from jaxsparse.nn.embedding import Embed
from jaxsparse.nn.linear import Linear
from jaxsparse.nn.mamba import Mamba, Mamba2
from jaxsparse.nn.mlp import SwiGLU
from jaxsparse.nn.memory import ProductKeyMemory
from jaxsparse.nn.moe import MoE
from jaxsparse.nn.monarch import MonarchLinear, MonarchSwiGLU
from jaxsparse.nn.norm import RMSNorm
from jaxsparse.nn.routing import RoutingAttention
from jaxsparse.nn.sga import SparseGlobalAttention
from jaxsparse.nn.workspace import WorkspaceMemory

__all__ = ["Attention", "DiagonalSSM", "Embed", "Linear", "Mamba", "Mamba2", "MoE", "MonarchLinear", "MonarchSwiGLU", "ProductKeyMemory", "RMSNorm", "RoutingAttention", "SparseGlobalAttention", "SwiGLU", "WorkspaceMemory"]
