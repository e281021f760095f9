"""A balanced order of work for the block-sparse scan: q-blocks packed into lanes.

The block-sparse path advances all of its lanes together, one tile per lane per scan step, so
a step costs as much as its widest lane. With one q-block per lane that is the widest kv-list:
a causal table makes every q-block pay for the last one (half the work is padding), a BigBird
table makes every q-block pay for a global row. Packing ``G`` q-blocks into each lane, the
long lists beside the short ones, evens the lanes out: for causal, q-block ``i`` shares a lane
with ``nq - 1 - i`` and every lane does exactly ``nq + 1`` tiles (the "folded" or zig-zag
order that Striped/Ring attention use to balance causal work across devices).

Everything here is numpy on the static block table; nothing depends on the data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from jaxsparse.ops.masks import Mask, cached_block_table

# A scan step costs its tiles plus a fixed overhead worth about this many lanes of tiles
# (measured on CPU: a window-512 table at 1k tokens runs slower as 2 lanes x 15 steps than as
# 8 lanes x 5 steps, although it computes fewer tiles).
STEP_OVERHEAD_LANES = 2
# A packing must save at least this fraction of the one-block-per-lane cost to be used.
MIN_SAVING = 0.15
MAX_BLOCKS_PER_LANE = 8


@dataclass(frozen=True)
class LaneSchedule:
    """Which tile every lane computes at every scan step, per head.

    Attributes:
      blocks_per_lane: ``G``; lanes ``P = ceil(nq / G)``.
      lane_q_blocks: int32 ``[H, P, G]``: the q-block in each slot of each lane (unused slots
        of a short last row repeat a real block and are never scheduled).
      q_block_lane, q_block_slot: int32 ``[H, nq]``: where each q-block's result lives.
      slot, q_block, kv_block: int32 ``[steps, H, P]``: the tile of each lane at each step.
      valid: bool ``[steps, H, P]``: False for padding steps (no work; the state is kept).
    """

    blocks_per_lane: int
    lane_q_blocks: np.ndarray
    q_block_lane: np.ndarray
    q_block_slot: np.ndarray
    slot: np.ndarray
    q_block: np.ndarray
    kv_block: np.ndarray
    valid: np.ndarray

    @property
    def steps(self) -> int:
        return self.slot.shape[0]

    @property
    def lanes(self) -> int:
        return self.lane_q_blocks.shape[1]

    @property
    def padded_tiles(self) -> int:
        """Tiles computed per head, padding included: what the scan costs."""
        return self.steps * self.lanes


def _snake(counts: np.ndarray, lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """Lane and slot of every q-block: blocks sorted by list length, dealt to the lanes
    back and forth (longest to lane 0 .. P-1, the next P from lane P-1 back to 0, ...)."""
    heads, nq = counts.shape
    order = np.argsort(-counts, axis=1, kind="stable")  # [H, nq] ranks -> q-block
    rank = np.arange(nq)
    slot_of_rank, pos = rank // lanes, rank % lanes
    lane_of_rank = np.where(slot_of_rank % 2 == 0, pos, lanes - 1 - pos)
    lane, slot = np.empty((heads, nq), np.int32), np.empty((heads, nq), np.int32)
    rows = np.arange(heads)[:, None]
    lane[rows, order] = lane_of_rank
    slot[rows, order] = slot_of_rank
    return lane, slot


def _steps_for(counts: np.ndarray, lane: np.ndarray, lanes: int) -> int:
    heads = counts.shape[0]
    load = np.zeros((heads, lanes), np.int64)
    np.add.at(load, (np.arange(heads)[:, None], lane), counts)
    return max(int(load.max(initial=0)), 1)


def choose_blocks_per_lane(counts: np.ndarray) -> int:
    """The packing of least estimated cost (steps x (lanes + overhead)), if it saves at least
    ``MIN_SAVING`` over one q-block per lane."""
    nq = counts.shape[1]
    base = max(int(counts.max(initial=0)), 1) * (nq + STEP_OVERHEAD_LANES)
    best, best_cost = 1, base
    for g in (2, 4, 8):
        if g > min(nq, MAX_BLOCKS_PER_LANE):
            break
        lanes = -(-nq // g)
        lane, _ = _snake(counts, lanes)
        cost = _steps_for(counts, lane, lanes) * (lanes + STEP_OVERHEAD_LANES)
        if cost < best_cost and cost <= (1 - MIN_SAVING) * base:
            best, best_cost = g, cost
    return best


def lane_schedule(kv_indices: np.ndarray, kv_counts: np.ndarray,
                  blocks_per_lane: int | None = None) -> LaneSchedule:
    """The schedule for a block table's ``kv_indices [H, nq, W]`` and ``kv_counts [H, nq]``."""
    counts = kv_counts.astype(np.int64)
    heads, nq = counts.shape
    if blocks_per_lane is not None and blocks_per_lane < 1:
        raise ValueError(f"blocks_per_lane={blocks_per_lane}: must be >= 1 (or None to choose)")
    g = choose_blocks_per_lane(counts) if blocks_per_lane is None else blocks_per_lane
    lanes = -(-nq // g)
    if g == 1:
        lane = np.broadcast_to(np.arange(nq, dtype=np.int32), (heads, nq)).copy()
        slot = np.zeros((heads, nq), np.int32)
    else:
        lane, slot = _snake(counts, lanes)
    rows = np.arange(heads)[:, None]
    # Unused slots (a short last row) point at a real block; no step ever names them.
    lane_q = np.zeros((heads, lanes, g), np.int32)
    lane_q[rows, lane, slot] = np.arange(nq, dtype=np.int32)[None, :]
    slot_counts = np.zeros((heads, lanes, g), np.int64)
    slot_counts[rows, lane, slot] = counts
    ends = np.cumsum(slot_counts, axis=-1)  # [H, P, G] inclusive
    steps = max(int(ends[..., -1].max(initial=0)), 1)

    s = np.arange(steps)[:, None, None, None]  # [steps, 1, 1, 1]
    step_slot = (s >= ends[None]).sum(-1)  # [steps, H, P]: first slot whose end is past s
    valid = step_slot < g
    step_slot = np.minimum(step_slot, g - 1)
    starts = ends - slot_counts
    h_idx, p_idx = np.arange(heads)[None, :, None], np.arange(lanes)[None, None, :]
    offset = s[..., 0] - starts[h_idx, p_idx, step_slot]  # position in the q-block's list
    q_block = lane_q[h_idx, p_idx, step_slot]
    width = kv_indices.shape[-1]
    kv_block = kv_indices[h_idx, q_block, np.clip(offset, 0, width - 1)]
    return LaneSchedule(
        blocks_per_lane=g, lane_q_blocks=lane_q, q_block_lane=lane, q_block_slot=slot,
        slot=step_slot.astype(np.int32), q_block=q_block.astype(np.int32),
        kv_block=kv_block.astype(np.int32), valid=valid)


@functools.lru_cache(maxsize=256)
def cached_lane_schedule(mask: Mask, q_len: int, kv_len: int, block_q: int, block_kv: int,
                         q_heads: int, blocks_per_lane: int | None = None) -> LaneSchedule:
    """The schedule of ``mask``'s block table, every head spelled out (masks are hashable)."""
    table = cached_block_table(mask, q_len, kv_len, block_q, block_kv)
    nq, width = table.num_q_blocks, table.kv_indices.shape[-1]
    return lane_schedule(np.broadcast_to(table.kv_indices, (q_heads, nq, width)),
                         np.broadcast_to(table.kv_counts, (q_heads, nq)), blocks_per_lane)
