"""Mixture-of-experts ops: routers, auxiliary losses, dispatch and grouped matmuls."""

from jaxsparse.ops.moe.dispatch import (capacity_dispatch, dropless_dispatch,
                                        expert_capacity, expert_choice_capacity,
                                        expert_choice_dispatch, pack, slot_positions,
                                        swiglu_experts, unpack)
from jaxsparse.ops.moe.grouped import GMM_IMPLEMENTATIONS, grouped_matmul
from jaxsparse.ops.moe.losses import (balance_from_statistics, counted_mean, expert_fractions,
                                      load_balancing_loss, router_z_loss)
from jaxsparse.ops.moe.routing import (ExpertChoice, TokenChoice, chunk_pool,
                                       chunk_pool_within_documents, counted_weights,
                                       expert_choice_routing, linear_k_schedule, top_k_routing,
                                       unchunk)

__all__ = [
    "ExpertChoice", "GMM_IMPLEMENTATIONS", "TokenChoice", "balance_from_statistics",
    "capacity_dispatch", "chunk_pool", "chunk_pool_within_documents", "counted_mean",
    "counted_weights",
    "dropless_dispatch", "expert_capacity", "expert_choice_capacity", "expert_choice_dispatch",
    "expert_choice_routing", "expert_fractions", "grouped_matmul", "linear_k_schedule",
    "load_balancing_loss", "pack", "router_z_loss", "slot_positions", "swiglu_experts",
    "top_k_routing", "unchunk", "unpack",
]
