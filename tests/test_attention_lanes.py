"""The balanced lane schedule of the block-sparse path: every tile exactly once, even lanes,
and results equal to the dense reference whichever packing is used."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import forward_and_vjp
from jaxsparse.ops.attention import dot_product_attention
from jaxsparse.ops.attention.blocksparse import blocksparse_attention
from jaxsparse.ops.attention.lanes import cached_lane_schedule, lane_schedule
from jaxsparse.ops.masks import (BigBirdMask, CausalMask, FullMask, GlobalTokensMask, LocalMask,
                                 MultiHeadMask, cached_block_table)

TABLE_CASES = [
    (CausalMask(), 1000, 1000),
    (CausalMask(offset=300), 700, 1000),
    (BigBirdMask(16, 3, 2, 2, seed=3), 1000, 1000),
    (GlobalTokensMask(5) | LocalMask(40, 0), 999, 999),
    (LocalMask(64, 0) & CausalMask(), 1000, 1000),
    (FullMask(), 300, 500),
    (MultiHeadMask((CausalMask(), LocalMask(8, 0), FullMask(), CausalMask(offset=-2000))),
     600, 600),
]


def tiles_of_table(table, head):
    counts = table.kv_counts[min(head, table.kv_counts.shape[0] - 1)]
    rows = table.kv_indices[min(head, table.kv_indices.shape[0] - 1)]
    return sorted((i, int(rows[i, j])) for i in range(len(counts)) for j in range(counts[i]))


@pytest.mark.parametrize("mask, S, T", TABLE_CASES, ids=lambda x: type(x).__name__)
@pytest.mark.parametrize("blocks_per_lane", [None, 1, 2, 3, 8])
def test_schedule_visits_every_tile_once(mask, S, T, blocks_per_lane):
    table = cached_block_table(mask, S, T, 32, 32)
    heads = table.kv_counts.shape[0]
    sched = lane_schedule(table.kv_indices, table.kv_counts, blocks_per_lane)
    for h in range(heads):
        ok = sched.valid[:, h]
        got = sorted(zip(sched.q_block[:, h][ok].tolist(), sched.kv_block[:, h][ok].tolist()))
        assert got == tiles_of_table(table, h)
        # each step's q-block is the one its slot holds, and every q-block has one home
        lanes = np.broadcast_to(np.arange(sched.lanes), ok.shape)
        held = sched.lane_q_blocks[h][lanes, sched.slot[:, h]]
        np.testing.assert_array_equal(held[ok], sched.q_block[:, h][ok])
        home = sched.lane_q_blocks[h, sched.q_block_lane[h], sched.q_block_slot[h]]
        np.testing.assert_array_equal(home, np.arange(table.num_q_blocks))
        # a lane finishes one q-block before it starts the next (the online softmax needs it)
        for lane in range(sched.lanes):
            assert np.all(np.diff(sched.slot[:, h, lane][ok[:, lane]]) >= 0)


def test_causal_tables_fold_into_even_lanes():
    table = cached_block_table(CausalMask(), 4096, 4096, 128, 128)
    sched = lane_schedule(table.kv_indices, table.kv_counts)
    nq = table.num_q_blocks
    assert sched.blocks_per_lane == 2
    assert sched.padded_tiles == int(table.kv_counts.sum()) == nq * (nq + 1) // 2
    assert sched.valid.all()  # no padding step at all: block i shares a lane with nq-1-i


def test_blocks_per_lane_must_be_positive():
    table = cached_block_table(CausalMask(), 256, 256, 32, 32)
    with pytest.raises(ValueError, match="blocks_per_lane=0"):
        lane_schedule(table.kv_indices, table.kv_counts, 0)


def test_uniform_tables_keep_one_block_per_lane():
    table = cached_block_table(LocalMask(255, 0) & CausalMask(), 4096, 4096, 128, 128)
    assert lane_schedule(table.kv_indices, table.kv_counts).blocks_per_lane == 1


ATTENTION_CASES = [
    (CausalMask(), 200, 200, 4, 2, False),
    (BigBirdMask(16, 3, 1, 2, seed=1), 200, 200, 4, 1, True),
    (GlobalTokensMask(3) | LocalMask(20, 0), 170, 170, 2, 2, True),
    (MultiHeadMask((CausalMask(), LocalMask(12, 0), GlobalTokensMask(2) | LocalMask(10, 0),
                    CausalMask(offset=-400))), 150, 150, 4, 2, True),  # last head: rows empty
    (CausalMask(offset=-40), 200, 120, 4, 4, False),  # S != T; the first rows empty
]


def case_id(x):
    return type(x).__name__ if not isinstance(x, (int, bool)) else str(x)


@pytest.mark.parametrize("blocks_per_lane", [None, 3])
@pytest.mark.parametrize("mask, S, T, Hq, Hkv, segments", ATTENTION_CASES, ids=case_id)
def test_packed_lanes_equal_the_reference_forward_and_gradients(mask, S, T, Hq, Hkv, segments,
                                                                blocks_per_lane):
    """16-token blocks: 10-13 q-blocks, so the packing has several lanes of several blocks."""
    keys = jax.random.split(jax.random.key(S + Hq), 4)
    q = jax.random.normal(keys[0], (2, S, Hq, 24))
    k, v = (jax.random.normal(key, (2, T, Hkv, 24)) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape)
    seg = None
    if segments:
        seg = jnp.concatenate([jnp.zeros((2, S // 3), jnp.int32),
                               jnp.ones((2, S - S // 3), jnp.int32)], 1)
    if blocks_per_lane is None:  # the chosen packing puts several blocks in a lane here too
        assert cached_lane_schedule(mask, S, T, 16, 16, Hq).blocks_per_lane > 1

    def run(f):
        return forward_and_vjp(f, (q, k, v), cotangent)  # compiled: op by op up to 5 s

    ref, ref_grads = run(lambda q, k, v: dot_product_attention(
        q, k, v, mask=mask, segment_ids=seg, implementation="xla"))
    q_seg = kv_seg = seg
    out, grads = run(lambda q, k, v: blocksparse_attention(
        q, k, v, mask=mask, q_segment_ids=q_seg, kv_segment_ids=kv_seg, scale=24**-0.5,
        block_q=16, block_kv=16, blocks_per_lane=blocks_per_lane))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    for g, g_ref in zip(grads, ref_grads):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-4)
