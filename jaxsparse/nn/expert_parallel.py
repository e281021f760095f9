"""Expert parallelism for :class:`jaxsparse.nn.MoE`: experts split over the mesh axis
``expert``, tokens exchanged with two all-to-alls inside ``jax.shard_map`` (GShard, Lepikhin
et al. 2020).

Tokens are sharded over the batch axes (``data``, ``fsdp``, ``expert``; and spread over
``tensor`` and ``sequence`` too, see :func:`~jaxsparse.nn.batch_local.row_split`); each
device routes its own tokens, packs them into per-expert buffers ``[E, C, D]``, and an
all-to-all over ``expert`` sends every expert's slice to the device that holds that expert. Each device runs
its ``E / n`` experts on the ``n * C`` rows it received; a second all-to-all returns the
results, which are combined locally. Parameters sharded over other axes (FSDP) are gathered
by ``shard_map`` on entry. With ``capacity_factor=None`` the buffers hold every token a
device could send an expert (its local token count), so the layer stays exactly dropless.
Router statistics are averaged over devices, so the auxiliary losses are the global ones.

Without an expert axis, :func:`token_parallel_moe` does the same minus the exchange: every
device routes and runs all experts on its own rows of the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxsparse.ops.moe import expert_capacity, expert_fractions, pack, swiglu_experts, unpack
from jaxsparse.nn.batch_local import row_split

AXIS = "expert"


def _row_split(mesh, x_BLD):
    split = row_split(mesh, x_BLD.shape)
    if AXIS not in split.batch:
        raise ValueError(f"expert parallelism splits the batch over mesh axis '{AXIS}' "
                         f"(size {mesh.shape[AXIS]}); batch {x_BLD.shape[0]} does not divide "
                         f"over the batch axes {dict(mesh.shape)}")
    return split


def expert_parallel_moe(moe, x_BLD, mesh):
    """``(y [B, L, D], aux_loss, load [E], dropped)`` with the experts split over ``expert``."""
    n = mesh.shape[AXIS]
    num_experts = moe.num_experts
    if num_experts % n:
        raise ValueError(f"num_experts={num_experts} must be divisible by mesh axis "
                         f"'{AXIS}' of size {n}")
    split = _row_split(mesh, x_BLD)
    gate, up, down = moe._weights()
    router_kernel = moe.router.kernel[...]

    def mean(v):
        return jax.lax.pmean(v, split.axes)

    def local(x_BLD, router_kernel, gate, up, down):
        x_BLD = split.scatter(x_BLD)
        batch, length, d = x_BLD.shape
        tokens = batch * length
        choice, routed = moe.route(x_BLD, router_kernel)
        if moe.capacity_factor is None:
            capacity = tokens  # an expert can receive at most every local token once
        else:
            capacity = expert_capacity(tokens, num_experts, moe.k_max, moe.capacity_factor)
        buffers, slot, kept = pack(x_BLD.reshape(tokens, d).astype(moe.dtype), choice, capacity)
        # [n destinations, E/n, C, D] -> [n sources, E/n local experts, C, D]
        received = jax.lax.all_to_all(buffers.reshape(n, num_experts // n, capacity, d), AXIS,
                                      split_axis=0, concat_axis=0)
        rows = jnp.swapaxes(received, 0, 1).reshape(num_experts // n, n * capacity, d)
        out = swiglu_experts(rows, gate, up, down)  # this device's experts
        out = jnp.swapaxes(out.reshape(num_experts // n, n, capacity, d), 0, 1)
        returned = jax.lax.all_to_all(out, AXIS, split_axis=0, concat_axis=0)
        returned = returned.reshape(num_experts, capacity, d)
        y, dropped = unpack(returned, choice, slot, kept)
        aux = moe.router_losses(routed, mean)
        load = mean(expert_fractions(choice.expert_index, num_experts, choice.weights))
        return split.gather(y.reshape(batch, length, d)), aux, load, mean(dropped)

    x_spec = split.spec
    expert_spec = P(AXIS, None, None)
    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(x_spec, P(), expert_spec, expert_spec, expert_spec),
        out_specs=(x_spec, P(), P(), P()),
    )(x_BLD, router_kernel, gate, up, down)


def token_parallel_moe(moe, x_BLD, router_inputs, mesh):
    """``(y [B, L, D], aux_loss, load [E], dropped)`` with every device routing and running all
    experts on its own rows of the batch (data and FSDP parallelism without an expert axis).

    The layer's own dispatch runs inside ``jax.shard_map`` with the batch split over its mesh
    axes and everything else whole, so sorting tokens by expert and gathering their rows stay
    local instead of being replicated over the global batch; under tensor and sequence
    parallelism the rows are spread over those axes too
    (:func:`~jaxsparse.nn.batch_local.row_split`).
    (Manual over every axis: leaving
    the tensor axis to the compiler crashed XLA:CPU on bfloat16 dispatch, "Invalid binary
    instruction opcode copy".) Router statistics are averaged over those axes, so the losses are the global
    ones; the dropless dispatch gives exactly the single-device result (a capacity limit applies
    per device, as under expert parallelism)."""
    split = row_split(mesh, x_BLD.shape)
    rows = split.spec

    def mean(v):
        return jax.lax.pmean(v, split.axes)

    def local(x_BLD, router_inputs, router_kernel, weights):
        x_BLD = split.scatter(x_BLD)
        router_inputs = None if router_inputs is None else split.scatter(router_inputs)
        y_TD, aux, load, dropped = moe._token_choice(x_BLD, router_inputs, mean, weights,
                                                     router_kernel)
        return split.gather(y_TD.reshape(x_BLD.shape[:2] + y_TD.shape[-1:])), aux, load, dropped

    # parameters enter whole over the batch axes (FSDP gathers them, as for any layer)
    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, P(), P()),
                         out_specs=(rows, P(), P(), P()), check_vma=False)(
        x_BLD, router_inputs, moe.router.kernel[...], moe._weights())
