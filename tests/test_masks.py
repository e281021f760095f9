"""Masks: definitions on hand-checked cases, algebra, and block tables against to_dense."""

import re
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxsparse.ops.masks import (EMPTY, FULL, PARTIAL, BigBirdMask, BlockMask, CausalMask,
                                 ChunkedCausalMask, FixedMask, FullMask, GlobalTokensMask,
                                 LocalMask, MultiHeadMask, StridedMask)
from jaxsparse.ops.mask_specs import parse_mask_spec


def grid(rows):
    return np.array([[c == "x" for c in r] for r in rows.split()])


def test_hand_checked_patterns():
    assert (CausalMask().to_dense(3, 3) == grid("x.. xx. xxx")).all()
    assert (CausalMask(offset=1).to_dense(2, 3) == grid("xx. xxx")).all()
    assert (LocalMask(1, 0).to_dense(4, 4) == grid("x... xx.. .xx. ..xx")).all()
    assert (LocalMask(0, 1).to_dense(3, 3) == grid("xx. .xx ..x")).all()
    assert (ChunkedCausalMask(2).to_dense(4, 4) == grid("x... xx.. ..x. ..xx")).all()
    assert (StridedMask(2).to_dense(4, 4) == grid("x.x. .x.x x.x. .x.x")).all()
    # fixed: own block of 3 plus the last position of every block
    assert (FixedMask(3, 1).to_dense(4, 6) == grid("xxx..x xxx..x xxx..x ..xxxx")).all()
    assert (GlobalTokensMask(1).to_dense(3, 3) == grid("xxx x.. x..")).all()
    assert (GlobalTokensMask((2,)).to_dense(3, 3) == grid("..x ..x xxx")).all()
    layout = np.array([[True, False], [False, True]])
    assert (BlockMask(layout, (2, 1)).to_dense(4, 2) == grid("x. x. .x .x")).all()
    assert FullMask().to_dense(2, 5).all()


def test_bigbird_layout_has_window_globals_and_random_blocks():
    mask = BigBirdMask(block=4, window_blocks=3, global_blocks=1, random_blocks=2, seed=3)
    layout = mask.layout(64, 64)
    n = layout.shape[0]
    assert layout[0].all() and layout[:, 0].all()  # global block row and column
    for r in range(1, n):
        window = {c for c in (r - 1, r, r + 1) if 0 <= c < n}
        assert all(layout[r, c] for c in window)
        extra = set(np.flatnonzero(layout[r])) - window - {0}
        assert len(extra) == 2  # exactly the random blocks, outside window and globals
    dense = mask.to_dense(64, 64)
    assert (dense == np.kron(layout, np.ones((4, 4), bool))).all()
    assert (BigBirdMask(4, 3, 1, 2, seed=3).layout(64, 64) == layout).all()  # fixed by seed
    assert not (BigBirdMask(4, 3, 1, 2, seed=4).layout(64, 64) == layout).all()



def bigbird_structure(mask: BigBirdMask, nq: int, nk: int) -> np.ndarray:
    """Window and global blocks only, written cell by cell from the definition."""
    half = mask.window_blocks // 2
    return np.array([[(mask.window_blocks > 0 and abs(r - c) <= half)
                      or r < mask.global_blocks or c < mask.global_blocks
                      for c in range(nk)] for r in range(nq)], bool).reshape(nq, nk)


@pytest.mark.parametrize("mask, q_len, kv_len", [
    (BigBirdMask(4, 3, 1, 2, seed=0), 64, 64),
    (BigBirdMask(4, 5, 2, 3, seed=1), 60, 100),           # wide window, S != T
    (BigBirdMask(4, 3, 1, 3, seed=2), 100, 40),           # more rows than columns
    (BigBirdMask(4, 0, 0, 5, seed=3), 48, 48),            # no window, no globals
    (BigBirdMask(4, 3, 2, 9, seed=4), 40, 40),            # more random blocks than candidates
    (BigBirdMask(4, 3, 1, 2, seed=5, causal=True), 90, 90),
    (BigBirdMask(4, 1, 0, 3, seed=6, causal=True), 64, 32),
    (BigBirdMask(4, 5, 3, 0, seed=7), 64, 64),            # no random blocks
])
def test_bigbird_random_blocks_are_distinct_candidates_and_as_many_as_asked(mask, q_len, kv_len):
    """Every non-global row gets min(random_blocks, candidates) extra blocks, each outside
    its window and the globals (and before the row when causal)."""
    layout = mask.layout(q_len, kv_len)
    nq, nk = layout.shape
    structure = bigbird_structure(mask, nq, nk)
    assert (layout >= structure).all()
    extra = layout & ~structure
    assert not extra[:mask.global_blocks].any()
    for r in range(mask.global_blocks, nq):
        limit = min(r, nk) if mask.causal else nk
        candidates = np.flatnonzero(~structure[r, :limit])
        assert set(np.flatnonzero(extra[r])) <= set(candidates)
        assert extra[r].sum() == min(mask.random_blocks, candidates.size)


def test_bigbird_random_blocks_are_uniform_over_the_candidates():
    """Row 20 of a 40-block layout (1 global, window 3, 2 random blocks) has 36 candidates;
    over 3000 seeds each is chosen ~2/36 of the time (binomial sd ~0.4%)."""
    picks = np.zeros(40)
    seeds = 3000
    for seed in range(seeds):
        layout = BigBirdMask(1, 3, 1, 2, seed=seed).layout(40, 40)
        picks += layout[20] & ~bigbird_structure(BigBirdMask(1, 3, 1, 2), 40, 40)[20]
    freq = picks / seeds
    candidates = [c for c in range(1, 40) if abs(c - 20) > 1]
    expected = 2 / len(candidates)
    sd = np.sqrt(expected * (1 - expected) / seeds)
    assert np.abs(freq[candidates] - expected).max() < 5 * sd
    assert freq.sum() == pytest.approx(2)


def test_causal_bigbird_rows_do_not_depend_on_the_sequence_length():
    mask = BigBirdMask(8, 3, 1, 3, seed=11, causal=True)
    short, long = mask.layout(200, 200), mask.layout(1000, 1000)
    assert (long[:short.shape[0], :short.shape[1]] == short).all()


def test_bigbird_layout_for_a_million_tokens_builds_in_well_under_a_second():
    start = time.perf_counter()
    layout = BigBirdMask(128, 3, 2, 3, seed=9).layout(1 << 20, 1 << 20)
    assert time.perf_counter() - start < 1.0  # ~0.04 s on 2 cores; the per-row loop took ~4 s
    # 8192 blocks: global rows + columns 2·2·8192 - 4, the 3-wide band 8192 + 2·8191 less its
    # 6 cells among the globals, 3 random blocks in each of the 8190 other rows.
    assert layout.sum() == (4 * 8192 - 4) + (3 * 8192 - 2 - 6) + 3 * 8190


def test_algebra():
    a, b, c = CausalMask(), LocalMask(2, 2), StridedMask(3)
    for S, T in [(9, 9), (5, 12)]:
        da, db, dc = a.to_dense(S, T), b.to_dense(S, T), c.to_dense(S, T)
        assert ((a & b).to_dense(S, T) == (da & db)).all()
        assert ((a | b).to_dense(S, T) == (da | db)).all()
        assert (((a & b) | c).to_dense(S, T) == ((da & db) | dc)).all()
        assert ((a & (b | c)).to_dense(S, T) == ((a & b) | (a & c)).to_dense(S, T)).all()
        assert ((a & FullMask()).to_dense(S, T) == da).all()
    assert (a & b) == (CausalMask() & LocalMask(2, 2)) and hash(a & b) == hash(CausalMask() & LocalMask(2, 2))
    per_head = MultiHeadMask((CausalMask(), LocalMask(1, 1)))
    combined = per_head & CausalMask()
    assert combined.num_heads == 2
    assert (combined.to_dense(4, 4)[1] == (LocalMask(1, 1) & CausalMask()).to_dense(4, 4)).all()


MASKS = [
    FullMask(), CausalMask(), CausalMask(offset=5), CausalMask(offset=-3), LocalMask(5, 0),
    LocalMask(3, 7), LocalMask(None, 2), ChunkedCausalMask(7), StridedMask(4), FixedMask(8, 2),
    FixedMask(5, 5), GlobalTokensMask(3), GlobalTokensMask((0, 9, 30)),
    BigBirdMask(4, 3, 1, 2, seed=0), BlockMask(np.random.default_rng(0).random((14, 12)) < 0.4, (5, 6)),
    CausalMask() & LocalMask(6, 0), LocalMask(4, 4) | GlobalTokensMask(2),
    CausalMask() & StridedMask(3), CausalMask() & FixedMask(8, 2),
    CausalMask() & BigBirdMask(4, 3, 1, 1, seed=3), (CausalMask() & LocalMask(3, 0)) | StridedMask(5),
    MultiHeadMask((CausalMask(), LocalMask(3, 0), GlobalTokensMask(2) & CausalMask())),
]


def test_tiles_are_classified_a_few_rows_at_a_time(monkeypatch):
    """The tile rules' integer temporaries over the whole table took several times its memory
    (ChunkedCausalMask: 640 MiB against causal's 160 at 512k tokens, 2.8 GB at a million):
    they run on a slice of rows at a time. Every mask's table is exact with slices of one
    row (evaluated tiles included), and chunked needs no more memory than causal."""
    import tracemalloc

    from jaxsparse.ops import masks

    def peak(mask, length):
        tracemalloc.start()
        mask.block_table(length, length, 128, 128)
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return used

    assert peak(ChunkedCausalMask(1000), 1 << 19) < 1.2 * peak(CausalMask(), 1 << 19)
    monkeypatch.setattr(masks, "_RULE_TILES", 1)
    for mask in MASKS:
        dense = mask.to_dense(37, 41)
        np.testing.assert_array_equal(mask.block_table(37, 41, 4, 3).kind,
                                      tile_kinds_from_dense(dense, 4, 3), err_msg=repr(mask))


def tile_kinds_from_dense(dense, bq, bk):
    if dense.ndim == 2:
        dense = dense[None]
    h, S, T = dense.shape
    nq, nk = -(-S // bq), -(-T // bk)
    hits = np.zeros((h, nq * bq, nk * bk), int)
    inside = np.zeros_like(hits)
    hits[:, :S, :T], inside[:, :S, :T] = dense, 1
    hits = hits.reshape(h, nq, bq, nk, bk).sum((2, 4))
    inside = inside.reshape(h, nq, bq, nk, bk).sum((2, 4))
    return np.where(hits == 0, EMPTY, np.where(hits == inside, FULL, PARTIAL))


def check_table(mask, S, T, bq, bk):
    table = mask.block_table(S, T, bq, bk)
    expected = tile_kinds_from_dense(mask.to_dense(S, T), bq, bk)
    np.testing.assert_array_equal(table.kind, expected, err_msg=f"{mask} {S}x{T} / {bq}x{bk}")
    nonempty = expected != EMPTY
    for h in range(nonempty.shape[0]):
        for i in range(nonempty.shape[1]):
            cols = np.flatnonzero(nonempty[h, i])
            n = table.kv_counts[h, i]
            assert n == cols.size
            np.testing.assert_array_equal(table.kv_indices[h, i, :n], cols)
            if n:  # padding repeats the last valid block
                assert (table.kv_indices[h, i, n:] == cols[-1]).all()
        for j in range(nonempty.shape[2]):
            rows = np.flatnonzero(nonempty[h, :, j])
            np.testing.assert_array_equal(table.q_indices[h, j, :table.q_counts[h, j]], rows)


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: type(m).__name__)
def test_block_table_matches_dense_on_fixed_sizes(mask):
    for S, T in [(1, 1), (7, 7), (33, 33), (40, 29), (64, 64)]:
        for bq, bk in [(1, 1), (4, 4), (8, 3), (16, 16)]:
            check_table(mask, S, T, bq, bk)


@settings(max_examples=40, deadline=None)
@given(index=st.integers(0, len(MASKS) - 1), S=st.integers(1, 70), T=st.integers(1, 70),
       bq=st.integers(1, 20), bk=st.integers(1, 20))
def test_block_table_matches_dense_on_random_sizes(index, S, T, bq, bk):
    check_table(MASKS[index], S, T, bq, bk)



@pytest.mark.parametrize("mask", MASKS, ids=lambda m: type(m).__name__)
def test_column_lists_by_sorting_entries_equal_those_by_transposing(mask, monkeypatch):
    """The dK/dV lists of a sparse tile map come from sorting its entries by column, of a dense
    one from the transposed map: both ways give the same table."""
    from jaxsparse.ops import masks

    tables = []
    for threshold in (0, 10**9):  # 0: every map counts as sparse (sorting); 10**9: none does
        monkeypatch.setattr(masks, "SPARSE_ENTRIES", threshold)
        tables.append(mask.block_table(40, 29, 4, 3))
    for name in ("q_indices", "q_counts", "kv_indices", "kv_counts", "kind"):
        np.testing.assert_array_equal(getattr(tables[0], name), getattr(tables[1], name))


def test_sparse_bigbird_table_matches_dense():
    mask = CausalMask() & BigBirdMask(8, 3, 1, 2, seed=5, causal=True)
    assert (mask.block_table(1024, 1024, 8, 8).kind != EMPTY).mean() < 1 / 16  # sorted path
    check_table(mask, 1024, 1024, 8, 8)
    check_table(BigBirdMask(8, 3, 2, 3, seed=6), 1000, 1024, 8, 8)

def test_bad_mask_arguments_are_named():
    with pytest.raises(ValueError, match="left=-1"):
        LocalMask(-1, 0)
    with pytest.raises(ValueError, match="left='3': must be an integer >= 0 or None"):
        LocalMask("3", 0)
    with pytest.raises(ValueError, match="num_or_indices=2.5: expected a count"):
        GlobalTokensMask(2.5)
    # a count or positions read from numpy arrays are the same mask as Python ints
    assert GlobalTokensMask(np.int64(2)) == GlobalTokensMask(2)
    assert GlobalTokensMask(np.array([0, 3])) == GlobalTokensMask((0, 3))
    with pytest.raises(TypeError, match="mask spec 5: expected a string"):
        parse_mask_spec(5)
    with pytest.raises(ValueError, match="chunk=0"):
        ChunkedCausalMask(0)
    with pytest.raises(ValueError, match=r"FixedMask\(block=4, c=5\)"):
        FixedMask(4, 5)
    with pytest.raises(ValueError, match="covers at most"):
        BlockMask(np.ones((2, 2), bool), (4, 4)).to_dense(9, 8)
    with pytest.raises(ValueError, match="2-D boolean"):
        BlockMask(np.ones((2, 2), int))
    with pytest.raises(ValueError, match="block sizes must be integers >= 1"):
        CausalMask().block_table(8, 8, 0, 4)
    # fractions gave patterns of no meaning (StridedMask(2.5)) or everything (FixedMask(4.5, 2))
    for build, message in ((lambda: FixedMask(4.5, 2), "FixedMask block=4.5: must be an integer >= 1"),
                           (lambda: StridedMask(2.5), "StridedMask stride=2.5: must be an integer"),
                           (lambda: ChunkedCausalMask(2.5), "ChunkedCausalMask chunk=2.5"),
                           (lambda: CausalMask(offset=1.5), "CausalMask offset=1.5: must be an integer"),
                           (lambda: CausalMask(offset="1"), "CausalMask offset='1'"),
                           (lambda: BigBirdMask(4.0), "BigBirdMask block=4.0: must be an integer"),
                           (lambda: BigBirdMask(4, seed=0.5), "BigBirdMask seed=0.5"),
                           (lambda: CausalMask().block_table(8, 8, 2.5, 4),
                            "block sizes must be integers >= 1, got block_q=2.5"),
                           (lambda: CausalMask().to_dense(8.0, 8), "mask sizes must be integers"),
                           # a fraction or a flag as a block size failed inside numpy indexing
                           (lambda: BlockMask(np.ones((2, 2), bool), (2.5, 4)),
                            "BlockMask block_size=(2.5, 4): need one integer >= 1 or two"),
                           (lambda: BlockMask(np.ones((2, 2), bool), (True, 4)),
                            "BlockMask block_size=(True, 4)"),
                           # centred on the row's block, an even window has no centre: W=2
                           # gave the 3 blocks of W=3
                           (lambda: BigBirdMask(1, window_blocks=2),
                            "BigBirdMask window_blocks=2: must be odd")):
        with pytest.raises(ValueError, match=re.escape(message)):
            build()
    assert GlobalTokensMask((np.int64(2), 5)) == GlobalTokensMask((2, 5))
    assert CausalMask(offset=np.int64(-2)).to_dense(3, 3).sum() == 1
    with pytest.raises(ValueError, match="heads"):
        MultiHeadMask((CausalMask(),)) & MultiHeadMask((CausalMask(), CausalMask()))


def test_causal_table_for_a_million_tokens_is_built_from_tile_rules():
    """Regression guard: closed-form tile rules, never an element-level pass over S*T (which
    would take minutes). The timing itself is reported by `jaxsparse bench attention`."""
    mask = CausalMask()
    mask.block_table(1 << 16, 1 << 16, 128, 128)  # warm numpy
    start = time.perf_counter()
    table = mask.block_table(1 << 20, 1 << 20, 128, 128)
    elapsed = time.perf_counter() - start
    assert table.kv_indices.shape == (1, 8192, 8192)
    assert table.kv_counts[0, 100] == 101 and table.kind[0, 100, 100] == PARTIAL
    assert elapsed < 15.0, f"1M-token causal block table took {elapsed:.2f}s"


def test_lookback_bounds_how_far_back_a_query_reads():
    """``lookback`` is the exact reach of every mask that has one (checked densely: no query
    reads further back, and some query reads that far), min under ``&``, max under ``|`` and
    across heads, None where reads are unbounded or the pattern depends on the length."""
    bounded = {LocalMask(7, 0): 8, LocalMask(3, 2) & CausalMask(): 4, ChunkedCausalMask(5): 5,
               LocalMask(3, 0) | LocalMask(9, 2): 10, GlobalTokensMask(2) & LocalMask(3, 0): 4,
               MultiHeadMask((LocalMask(3, 0), ChunkedCausalMask(6))): 6}
    for mask, reach in bounded.items():
        assert mask.lookback() == reach, mask
        dense = (mask & CausalMask()).to_dense(40, 40)
        dense = dense if dense.ndim == 3 else dense[None]
        distance = np.arange(40)[:, None] - np.arange(40)[None, :]
        assert distance[np.any(dense, axis=0)].max() == reach - 1, mask
    for mask in (CausalMask(), FullMask(), LocalMask(None, 0), GlobalTokensMask(2) | LocalMask(3, 0),
                 BigBirdMask(4, 1, 1, 1) & LocalMask(3, 0), StridedMask(4),
                 MultiHeadMask((LocalMask(3, 0), CausalMask()))):
        assert mask.lookback() is None, mask
