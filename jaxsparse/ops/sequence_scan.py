"""Linear recurrences with the sequence split over a mesh axis (context parallelism for SSMs).

A first-order linear recurrence ``h_t = a_t ⊙ h_{t-1} + b_t`` over one shard of the sequence
is an affine map of the state that enters it: ``h_out = (∏ a_t) ⊙ h_in + h_out⁰``, where
``h_out⁰`` is the shard's final state from a zero start. So each shard

1. scans its chunk from zero and keeps ``(∏ a_t, h_out⁰)`` — one state-sized pair,
2. all-gathers the ``n`` pairs (``n`` states, not the sequence) and composes the maps of the
   shards before it to get its incoming state (the same chunk-state passing Mamba-2's SSD does
   between chunks, Dao & Gu 2024 §6, here between devices),
3. scans its chunk again from that state.

Step 3 repeats step 1's work (2× the scan, no extra memory); a scan is a small part of a
block's cost next to its projections, and the repeat keeps every scan implementation
(sequential, chunked, Pallas) usable unchanged through its ``initial_state`` argument.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxsparse.ops.checks import sequence_axis_of


def _compose(final_local, decay_local, initial, axis):
    """(state entering this shard, state leaving the last shard), inside ``shard_map``."""
    finals = jax.lax.all_gather(final_local, axis)  # [n, ...state]
    decays = jax.lax.all_gather(decay_local, axis)
    state = initial
    entering = []
    for j in range(finals.shape[0]):  # n is the (small, static) number of shards
        entering.append(state)
        state = decays[j] * state + finals[j]
    return jnp.stack(entering)[jax.lax.axis_index(axis)], state


def scan_across_shards(run: Callable, total_decay: Callable, sequence_args: dict,
                       shared_args: dict, initial_state, *, mesh: Mesh, axis: str = "sequence"):
    """Run a scan whose inputs are split along the sequence (dim 1) over mesh axis ``axis``.

    Args:
      run: ``run(sequence_args, shared_args, initial_state_or_None) -> (y, final_state)``, the
        single-device scan of one chunk; ``y`` is ``[batch, chunk, ...]``.
      total_decay: ``total_decay(sequence_args, shared_args) -> ∏ a_t`` over the chunk,
        broadcastable to the state.
      sequence_args: dict of arrays ``[batch, length, ...]``, split along ``length``.
      shared_args: dict of arrays every shard sees whole (parameters).
      initial_state: the state before the first position, or None (zeros).

    Returns ``(y [batch, length, ...], final_state)``, equal to the single-device scan.
    """
    n = sequence_axis_of(mesh, axis, "a sequence-parallel scan")
    # checked on the whole arrays: inside the shards a mismatch was reported in the shards'
    # lengths, and a bad initial state failed in the composition's broadcasting
    leading = {name: tuple(jnp.shape(arg)[:2]) for name, arg in sequence_args.items()}
    if len(set(leading.values())) > 1:
        raise ValueError("sequence-parallel scan: every sequence input must be [batch, length, "
                         f"...] with the same batch and length; got {leading}")
    (batch, length), = set(leading.values())
    if length % n:
        raise ValueError(f"sequence-parallel scan: length {length} must be divisible by "
                         f"mesh axis {axis!r} of size {n}")
    if initial_state is not None:
        shard = {name: jax.ShapeDtypeStruct((batch, length // n) + jnp.shape(arg)[2:], arg.dtype)
                 for name, arg in sequence_args.items()}
        state = jax.eval_shape(lambda seq, shared: run(seq, shared, None)[1], shard, shared_args)
        if jnp.shape(initial_state) != state.shape:
            raise ValueError(f"initial_state of shape {jnp.shape(initial_state)}: must be the "
                             f"scan's state, {state.shape}")

    def local(sequence_args, shared_args, initial_state):
        _, final_from_zero = run(sequence_args, shared_args, None)
        initial = jnp.zeros_like(final_from_zero) if initial_state is None else initial_state
        entering, final = _compose(final_from_zero, total_decay(sequence_args, shared_args),
                                   initial.astype(final_from_zero.dtype), axis)
        y, _ = run(sequence_args, shared_args, entering)
        return y, final

    seq = P(None, axis)  # a spec for a whole dict: every leaf split along dim 1
    # check_vma=False: the scans inside start from constants (zeros) that are the same on
    # every shard while their carries differ per shard, which the manual-axis type check would
    # reject for every scan implementation; the final state is the same on all shards by
    # construction (computed from all-gathered values), so out_specs P() holds.
    # under jit: differentiated op by op, a shard_map manual over `axis` only (check_vma=False)
    # failed in JAX 0.10 on a mesh with other axes ("out_specs ... refers to 'data'")
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(seq, P(), P()),
                                    out_specs=(seq, P()), axis_names={axis}, check_vma=False))
    with jax.named_scope("scan_across_shards"):  # findable in profiles and HLO metadata
        return sharded(sequence_args, shared_args, initial_state)


__all__ = ["scan_across_shards"]
