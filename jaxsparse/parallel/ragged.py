"""Ragged all-to-all: every device sends a different number of rows to each peer.

:func:`ragged_all_to_all` has exactly the signature and semantics of
``jax.lax.ragged_all_to_all`` (see its docstring: ``output_offsets`` say where each *sent*
slice lands on its receiver) and picks how to run it by the platform the program is lowered
for (``jax.lax.platform_dependent``):

* on TPU and GPU, the collective itself, which moves only the rows that are sent;
* on CPU (XLA:CPU has no ``ragged-all-to-all``: "not supported by XLA:CPU ThunkEmitter"), an
  emulation with the same results: the slices for each peer are copied one after another
  into a chunk of ``max_send`` rows, the chunks go through a plain ``all_to_all``, and each
  receiver writes every row it was sent at the offset its sender named. It moves ``max_send``
  rows per peer whatever the sizes.

So a layer written against this function is tested on CPU with the same offsets and layouts
it uses on an accelerator; only the transport differs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = (None, "collective", "padded")


def exclusive_cumsum(sizes, axis: int = 0):
    """``[0, s0, s0 + s1, ...]`` along ``axis`` (same shape as ``sizes``): where consecutive
    slices start."""
    return jnp.cumsum(sizes, axis=axis) - sizes


def _varying_axes(x) -> set:
    """The ``shard_map`` axes ``x`` varies over (``.vma`` on newer JAX, ``.mat.varying`` on
    0.10)."""
    aval = jax.typeof(x)
    axes = getattr(aval, "vma", None)
    if axes is None:
        axes = getattr(getattr(aval, "mat", None), "varying", ())
    return set(axes)


def _slice_of_rows(sizes, rows: int):
    """For chunks that concatenate consecutive slices (``sizes [chunks, slices]``): each of
    ``rows`` chunk rows' slice (``slices`` past the last) and its row within that slice."""
    ends = jnp.cumsum(sizes, axis=1)
    position = jnp.arange(rows)
    which = jax.vmap(lambda e: jnp.searchsorted(e, position, side="right"))(ends)
    last = sizes.shape[1] - 1
    start = jnp.take_along_axis(ends - sizes, jnp.minimum(which, last), axis=1)
    return which, position[None, :] - start


def _padded(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
            axis_name, max_send):
    peers = jax.lax.axis_size(axis_name)
    per_peer = input_offsets.shape[0] // peers
    if per_peer * peers != input_offsets.shape[0]:
        raise ValueError(f"{input_offsets.shape[0]} slices do not divide over the {peers} "
                         f"devices of axis {axis_name!r}")
    by_peer = lambda v: v.reshape(peers, per_peer)  # noqa: E731
    # one chunk of max_send rows per peer: the slices for it, one after another, then zeros
    which, row = _slice_of_rows(by_peer(send_sizes), max_send)
    sent = which < per_peer
    starts = jnp.take_along_axis(by_peer(input_offsets), jnp.minimum(which, per_peer - 1), axis=1)
    chunks = jnp.take(operand, jnp.where(sent, starts + row, operand.shape[0]), axis=0,
                      mode="fill", fill_value=0)
    received = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)
    # each received row goes where its sender asked (rows past the slices: dropped)
    offsets = by_peer(jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True))
    which, row = _slice_of_rows(by_peer(recv_sizes), max_send)
    at = jnp.take_along_axis(offsets, jnp.minimum(which, per_peer - 1), axis=1) + row
    dest = jnp.where(which < per_peer, at, output.shape[0]).reshape(-1)
    return output.at[dest].set(received.reshape((-1,) + received.shape[2:]), mode="drop")


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                      axis_name, *, max_send: int, implementation: str | None = None):
    """``jax.lax.ragged_all_to_all`` inside ``shard_map`` over ``axis_name`` (one name), run as
    the collective on TPU/GPU and emulated on CPU (module doc). ``max_send`` bounds the rows
    any device sends any one peer, all its slices for that peer together (the emulation's
    chunk size; more would be cut short, so callers pass a true upper bound).
    ``implementation``: ``"collective"`` or ``"padded"`` to force one, ``None`` to choose by
    platform."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: allowed {IMPLEMENTATIONS}")
    if not isinstance(max_send, int) or max_send < 1:
        raise ValueError(f"max_send={max_send!r}: must be a positive int (rows to one peer)")
    if operand.shape[1:] != output.shape[1:] or operand.dtype != output.dtype:
        raise ValueError(f"operand {operand.dtype}{list(operand.shape)} and output "
                         f"{output.dtype}{list(output.shape)} must agree past the first axis "
                         "and in dtype")
    meta = (input_offsets, send_sizes, output_offsets, recv_sizes)
    if len({m.shape for m in meta}) != 1 or meta[0].ndim != 1:
        raise ValueError("input_offsets, send_sizes, output_offsets and recv_sizes must be 1-D "
                         f"of one length; got shapes {[m.shape for m in meta]}")
    meta = tuple(m.astype(jnp.int32) for m in meta)
    # The result differs between devices: mark the output buffer (often a fresh jnp.zeros)
    # as varying like the operand, so both branches below have one type under shard_map.
    varying = (_varying_axes(operand) | {axis_name}) - _varying_axes(output)
    if varying:
        output = jax.lax.pcast(output, tuple(sorted(varying)), to="varying")

    def collective(operand, output, *meta):
        return jax.lax.ragged_all_to_all(operand, output, *meta, axis_name=axis_name)

    def padded(operand, output, *meta):
        return _padded(operand, output, *meta, axis_name, max_send)

    if implementation == "collective":
        return collective(operand, output, *meta)
    if implementation == "padded":
        return padded(operand, output, *meta)
    return jax.lax.platform_dependent(operand, output, *meta, cpu=padded, default=collective)
