"""Workspace memory module (:mod:`jaxsparse.ops.workspace`): learnable initial slots and the
gated chunk-update weights; a decode path that buffers the current chunk."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.ops.checks import check_cache_request, checked_decode_cache, is_integer
from jaxsparse.ops.workspace import read_slots, workspace_memory, workspace_update
from jaxsparse.parallel import constrain


class WorkspaceMemory(nnx.Module):
    """``reads = ws(x)``: token ``t`` of chunk ``c`` reads the slots written by chunks ``< c``.

    In Hydra one instance is shared by the blocks in ``model.workspace_layers`` (every block by
    default; the same slots and update weights); each reading block runs it on its own input,
    so each depth keeps its own slot trajectory.

    Under a mesh, run it on each device's rows (:func:`~jaxsparse.nn.batch_local.batch_local`,
    as Hydra does): called bare on a batch split over devices, the compiler reduces the
    gradients of the recurrence's weights (``wq``, ``wg``, ``bg``) across devices in every
    chunk of the scan instead of once (FSDP over 8 devices, 512 tokens in chunks of 64: 5x
    the bytes of one reduction).
    """

    def __init__(self, d_model: int, slots: int, chunk: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        for name, value in (("d_model", d_model), ("slots", slots), ("chunk", chunk)):
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        d = d_model

        def matrix(shape, fan_in):
            return nnx.Param(jax.random.normal(rngs.params(), shape, param_dtype)
                             / math.sqrt(fan_in), logical_axes=(None, "embed"))

        self.init_slots = matrix((slots, d), d)
        self.wq, self.wk, self.wv = matrix((d, d), d), matrix((d, d), d), matrix((d, d), d)
        self.wg = matrix((2 * d, d), 2 * d)
        # gate bias +1: a fresh workspace mostly keeps its slots (σ(1) ≈ 0.73)
        self.bg = nnx.Param(jnp.ones((d,), param_dtype), logical_axes=("embed",))
        self.slots, self.chunk, self.d_model = slots, chunk, d
        self.dtype = dtype  # of the per-token work: key/value projections and reads

    def weights(self):
        # Whole matrices (FSDP gathers them, as for any layer). Left split over fsdp, the
        # projection of the whole sequence's keys and values (x [B, L, D] @ wk, with the batch
        # split over fsdp too) was compiled as an exchange of activations: on a 3-block
        # hydra_1p6b, fsdp=8, 58 GiB of collectives per device and step instead of 9.
        # Wk, Wv project every token: the compute dtype. Wq and the gate act on the slot state,
        # the float32 recurrence (ops.workspace, "Precision").
        return {name: constrain(variable[...], (None,) * variable.ndim).astype(
                    self.dtype if name in ("wk", "wv") else jnp.float32)
                for name in ("wq", "wk", "wv", "wg", "bg")
                for variable in (getattr(self, name),)}

    def _check_input(self, x_BLD):
        if x_BLD.ndim != 3 or x_BLD.shape[2] != self.d_model:
            raise ValueError(f"x must be [batch, length, d_model={self.d_model}]; got "
                             f"{x_BLD.shape}")
        if not jnp.issubdtype(x_BLD.dtype, jnp.floating):  # the reads, cast back, would be cut
            raise ValueError(f"x has dtype {x_BLD.dtype}; the workspace reads floating-point "
                             "inputs (cast integer features with x.astype(jnp.float32))")

    def __call__(self, x_BLD, segment_ids=None):
        """``segment_ids [B, L]``: packed documents; the slots restart at every document start
        (:func:`~jaxsparse.ops.workspace.workspace_memory`)."""
        self._check_input(x_BLD)
        # the chunk recurrence runs over the whole length: under sequence parallelism gather
        # x once here, not the keys and the values that are projected from it
        x = constrain(x_BLD.astype(self.dtype), ("batch", None, "embed"))
        reads, _ = workspace_memory(x, x, self.init_slots[...].astype(jnp.float32),
                                    self.weights(), chunk=self.chunk, segment_ids=segment_ids)
        return reads.astype(x_BLD.dtype)

    def init_cache(self, batch: int):
        check_cache_request(batch)
        state = jnp.broadcast_to(self.init_slots[...].astype(jnp.float32)[None],
                                 (batch, self.slots, self.d_model))
        return {"state": state, "buffer": jnp.zeros((batch, self.chunk, self.d_model), self.dtype)}

    def decode(self, x_BLD, cache, cache_index):
        """Tokens at positions ``cache_index ..``, one at a time: read, buffer, and rewrite the
        slots whenever a chunk completes."""
        self._check_input(x_BLD)
        # the index places the chunk boundaries: a negative one would shift them silently
        cache_index = checked_decode_cache(cache, cache_index, x_BLD.shape[0],
                                           ("state", "buffer"))
        batch = x_BLD.shape[0]
        for name, expected in (("state", (batch, self.slots, self.d_model)),
                               ("buffer", (batch, self.chunk, self.d_model))):
            # a buffer of another chunk size had its writes clamped (reads off by 0.24)
            if tuple(cache[name].shape) != expected:
                raise ValueError(f"cache[{name!r}] of shape {tuple(cache[name].shape)}: expected "
                                 f"{expected} (batch, slots={self.slots} / chunk={self.chunk}, "
                                 f"d_model; init_cache)")
        weights = self.weights()

        def step(carry, inputs):
            state, buffer = carry
            x_B1D, pos = inputs
            read = read_slots(x_B1D, state)
            buffer = jax.lax.dynamic_update_slice(buffer, x_B1D, (0, pos % self.chunk, 0))
            done = pos % self.chunk == self.chunk - 1
            # rewrite only when a chunk completes (one token in `chunk`), not on every token
            state = jax.lax.cond(done, lambda s: workspace_update(s, buffer, weights),
                                 lambda s: s, state)
            return (state, buffer), read[:, 0]

        positions = cache_index + jnp.arange(x_BLD.shape[1])
        xs = x_BLD.astype(self.dtype).swapaxes(0, 1)[:, :, None, :]
        (state, buffer), reads = jax.lax.scan(step, (cache["state"], cache["buffer"]),
                                              (xs, positions))
        return reads.swapaxes(0, 1).astype(x_BLD.dtype), {"state": state, "buffer": buffer}
