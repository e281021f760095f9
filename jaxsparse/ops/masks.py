"""Lazy attention masks and their block tables.

A mask is a small hashable object saying which (query, key) pairs may interact. It renders
itself densely only on request (:meth:`Mask.to_dense`, for tests and plots); kernels instead
consume a :class:`BlockTable` that classifies every (q-block, kv-block) tile as empty,
partial or full and lists, per q-block, the non-empty kv-blocks (and, per kv-block, the
q-blocks, for the dK/dV pass). Tables are built with vectorised numpy from closed-form tile
rules, so a causal table for a million tokens takes well under a second; combinations
(``&``, ``|``) whose tiles the rules cannot decide exactly are settled by evaluating just those
tiles element by element.

Positions are absolute indices into the query and key sequences. Every mask also evaluates
elementwise on traced index arrays (``allowed(q_idx, kv_idx)``), which is how block-sparse
implementations mask the inside of partial tiles.

Patterns: Child et al. 2019 (Sparse Transformer: strided, fixed), Beltagy et al. 2020
(Longformer: sliding window + global tokens), Zaheer et al. 2020 (BigBird: window, global and
random blocks); the lazy-object design follows JAX's splash-attention masks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from jaxsparse.ops.checks import is_integer

EMPTY, PARTIAL, FULL = 0, 1, 2


def _xp(*arrays):
    """numpy when every input is numpy (or a Python scalar), else jax.numpy (traced inputs)."""
    if all(isinstance(x, np.ndarray | np.integer | int) for x in arrays):
        return np
    import jax.numpy as jnp

    return jnp


# --- block tables ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class BlockTable:
    """Tile metadata for ``[heads, num_q_blocks, num_kv_blocks]`` (heads = 1 unless per-head).

    Attributes:
      kind: int8 ``[H, nq, nk]``: 0 empty, 1 partial (evaluate the mask inside), 2 full.
      kv_indices: int32 ``[H, nq, max_kv]``: per q-block, its non-empty kv-blocks in
        increasing order; slots past ``kv_counts`` repeat the last valid index (a kernel that
        visits them re-uses the block it already has and must skip the work).
      kv_counts: int32 ``[H, nq]``.
      q_indices, q_counts: the transpose (per kv-block, its non-empty q-blocks), for dK/dV.
    """

    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    kind: np.ndarray
    kv_indices: np.ndarray
    kv_counts: np.ndarray
    q_indices: np.ndarray
    q_counts: np.ndarray

    @property
    def num_q_blocks(self) -> int:
        return self.kind.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return self.kind.shape[2]

    @property
    def density(self) -> float:
        """Fraction of tiles that are not empty (the work a block-sparse kernel does)."""
        return float(np.mean(self.kind != EMPTY))


def _runs_to_lists(first: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Lists that are contiguous runs: ``first + slot``, clipped at each run's last element."""
    width = max(int(counts.max(initial=0)), 1)
    out = np.empty(counts.shape + (width,), np.int32)
    np.add(first[..., None], np.arange(width, dtype=np.int32), out=out)
    np.minimum(out, (first + np.maximum(counts - 1, 0))[..., None], out=out)
    return out


def _lists_from_entries(h, r, c, counts: np.ndarray) -> np.ndarray:
    """Per (head, row), the columns of the entries ``(h, r, c)``, given sorted by head, row
    and column; padded with each row's last column. O(entries + output)."""
    heads, rows = counts.shape
    width = max(int(counts.max(initial=0)), 1)
    starts = np.concatenate([[0], np.cumsum(counts.ravel(), dtype=np.int64)[:-1]])
    slot = np.arange(h.size, dtype=np.int64) - starts[h * rows + r]
    out = np.zeros((heads, rows, width), np.int32)
    out[h, r, slot] = c
    last = np.take_along_axis(out, np.maximum(counts - 1, 0)[..., None], axis=-1)
    np.copyto(out, last, where=np.arange(width, dtype=np.int32) >= counts[..., None])
    return out


def _general_lists(nonempty: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per row of ``[H, R, C]`` booleans, the True columns: np.nonzero yields them row-major,
    so each entry's slot is its rank within its row."""
    return _lists_from_entries(*np.nonzero(nonempty), counts)


SPARSE_ENTRIES = 16  # a tile map with fewer than 1/16 non-empty tiles counts as sparse


def _column_lists(nonempty: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per column of ``[H, R, C]`` booleans, the True rows. A sparse map (BigBird, global
    tokens) sorts its few entries by column; a dense one is transposed and read row-major."""
    if np.count_nonzero(nonempty) * SPARSE_ENTRIES < nonempty.size:
        h, r, c = np.nonzero(nonempty)
        order = np.lexsort((r, c, h))
        return _lists_from_entries(h[order], c[order], r[order], counts)
    return _general_lists(np.ascontiguousarray(np.swapaxes(nonempty, 1, 2)), counts)


def _monotone_column_runs(first, counts, num_cols):
    """When every row's run [first, last] moves monotonically down the rows (causal, windows,
    chunks), each column's rows are also one run, found by binary search: no transpose."""
    filled = counts > 0
    last = first + counts - 1
    col_first = np.empty((first.shape[0], num_cols), np.int32)
    col_counts = np.empty_like(col_first)
    cols = np.arange(num_cols)
    for h in range(first.shape[0]):
        nz = np.flatnonzero(filled[h])
        if nz.size and (nz[-1] - nz[0] + 1 != nz.size):
            return None  # an empty row between non-empty ones
        lo_empty = np.arange(first.shape[1]) < (nz[0] if nz.size else first.shape[1])
        # empty rows before the first run sort first (-1), those after it sort last
        f = np.where(filled[h], first[h], np.where(lo_empty, -1, num_cols))
        l_ = np.where(filled[h], last[h], np.where(lo_empty, -1, num_cols))
        if np.any(np.diff(f) < 0) or np.any(np.diff(l_) < 0):
            return None
        a = np.searchsorted(l_, cols, side="left")  # first row whose run ends at or after j
        b = np.searchsorted(f, cols, side="right") - 1  # last row whose run starts at or before j
        col_counts[h] = np.maximum(b - a + 1, 0)
        col_first[h] = np.where(col_counts[h] > 0, a, 0)
    return col_first, col_counts


def _index_lists(nonempty: np.ndarray):
    """``(kv_indices, kv_counts, q_indices, q_counts)`` of a ``[H, nq, nk]`` tile map."""
    kv_counts = nonempty.sum(axis=2, dtype=np.int32)
    runs = (np.count_nonzero(nonempty[:, :, 1:] & ~nonempty[:, :, :-1], axis=2)
            + nonempty[:, :, 0])
    if np.all(runs <= 1):
        first = np.argmax(nonempty, axis=2).astype(np.int32)
        kv_indices = _runs_to_lists(first, kv_counts)
        columns = _monotone_column_runs(first, kv_counts, nonempty.shape[2])
        if columns is not None:
            return kv_indices, kv_counts, _runs_to_lists(*columns), columns[1]
    else:
        kv_indices = _general_lists(nonempty, kv_counts)
    q_counts = nonempty.sum(axis=1, dtype=np.int32)
    return kv_indices, kv_counts, _column_lists(nonempty, q_counts), q_counts


_RULE_TILES = 1 << 21  # tiles per slice of rows that Mask._classify runs the tile rules on


def _tile_bounds(length: int, block: int):
    starts = np.arange(0, length, block, dtype=np.int64)
    return starts, np.minimum(starts + block, length)  # [n], half-open, truncated at length


# --- the base class -------------------------------------------------------------------------


class Mask:
    """Base class. Subclasses implement ``allowed`` and, where they can, ``_tile_any_all``."""

    num_heads: int | None = None  # None: the same mask for every head

    def allowed(self, q_idx, kv_idx):
        """Elementwise: may query position ``q_idx`` attend to key position ``kv_idx``?

        Works on broadcastable numpy or JAX integer arrays; returns booleans.
        """
        raise NotImplementedError

    def allowed_fn(self, q_len: int, kv_len: int):
        """``allowed`` specialised to these lengths (length-dependent masks override this)."""
        return self.allowed

    def _tile_any_all(self, qs, qe, ks, ke, q_len, kv_len):
        """Exact (any, all) per tile for ``[nq, 1]`` x ``[1, nk]`` half-open bounds, or None
        when there is no closed form (tiles are then evaluated element by element)."""
        return None

    def is_causal(self) -> bool:
        """Whether no query can read a later key, at any length — known from the parameters
        (False where unknown: a decoder layer then adds ``CausalMask()``, which costs nothing
        when the mask is causal anyway)."""
        return False

    def lookback(self) -> int | None:
        """The most recent positions, its own included, that a query may read at most — a
        bound ``i - j < lookback`` holding at every sequence length, so that a decoder's
        key/value cache need keep only that many (a sliding-window ring buffer). None when
        reads reach back without bound, or when the pattern depends on the sequence length
        (BigBird, explicit block layouts: evaluated for a cache's length, not the text's)."""
        return None

    @property
    def length_free(self) -> bool:
        """Whether ``allowed`` is the same function of the positions at every length."""
        return type(self).allowed_fn is Mask.allowed_fn

    def check_size(self, q_len: int, kv_len: int) -> None:
        """Raise ValueError if this mask cannot serve a ``(q_len, kv_len)`` problem."""
        if not (is_integer(q_len) and is_integer(kv_len)) or q_len < 1 or kv_len < 1:
            raise ValueError(f"mask sizes must be integers >= 1, got q_len={q_len!r}, "
                             f"kv_len={kv_len!r}")

    def to_dense(self, q_len: int, kv_len: int) -> np.ndarray:
        """Boolean ``[q_len, kv_len]`` array: True where query i may attend to key j."""
        self.check_size(q_len, kv_len)
        q_idx = np.arange(q_len, dtype=np.int64)[:, None]
        kv_idx = np.arange(kv_len, dtype=np.int64)[None, :]
        return np.broadcast_to(self.allowed_fn(q_len, kv_len)(q_idx, kv_idx), (q_len, kv_len)).copy()

    def _classify(self, q_len, kv_len, block_q, block_kv) -> np.ndarray:
        """int8 ``[nq, nk]`` tile kinds, exact. The tile rules run on a slice of tile rows at
        a time (``_RULE_TILES`` tiles): their integer temporaries over the whole table took
        several times the table's memory (ChunkedCausalMask: 640 MiB against causal's 160 at
        512k tokens, 2.8 GB at a million)."""
        qs, qe = _tile_bounds(q_len, block_q)
        ks, ke = _tile_bounds(kv_len, block_kv)
        kind = np.empty((qs.size, ks.size), np.int8)
        step = max(1, _RULE_TILES // max(ks.size, 1))
        for start in range(0, qs.size, step):
            part = slice(start, start + step)
            kind[part] = self._classify_rows(qs[part], qe[part], ks, ke, start, q_len, kv_len,
                                             block_q, block_kv)
        return kind

    def _classify_rows(self, qs, qe, ks, ke, first_row, q_len, kv_len, block_q, block_kv):
        """:meth:`_classify` of the tile rows ``first_row ..`` whose bounds are ``qs, qe``."""
        rule = self._tile_any_all(qs[:, None], qe[:, None], ks[None, :], ke[None, :], q_len, kv_len)
        shape = (qs.size, ks.size)
        any_, all_, undecided = (True, False, True) if rule is None else rule
        any_, all_ = np.broadcast_to(any_, shape), np.broadcast_to(all_, shape)
        kind = any_.view(np.int8) + all_.view(np.int8)  # EMPTY 0, PARTIAL 1, FULL 2
        if np.ndim(undecided) == 0:  # one answer for every tile (closed-form rules: False)
            candidates = (any_ & ~all_) if undecided else None
        else:
            candidates = undecided & any_ & ~all_
        if candidates is not None:
            rows, cols = np.nonzero(candidates)
            if rows.size:
                kind[rows, cols] = _evaluate_tiles(self.allowed_fn(q_len, kv_len),
                                                   rows + first_row, cols, q_len, kv_len,
                                                   block_q, block_kv)
        return kind

    def block_table(self, q_len: int, kv_len: int, block_q: int, block_kv: int) -> BlockTable:
        """Tile classification and compact index lists (see :class:`BlockTable`)."""
        self.check_size(q_len, kv_len)
        _check_block_sizes(block_q, block_kv)
        kind = self._classify(q_len, kv_len, block_q, block_kv)[None]
        return _table_from_kinds(kind, q_len, kv_len, block_q, block_kv)

    def __and__(self, other: Mask) -> Mask:
        if isinstance(other, MultiHeadMask):
            return other.__rand__(self)
        return AndMask(self, other)

    def __or__(self, other: Mask) -> Mask:
        if isinstance(other, MultiHeadMask):
            return other.__ror__(self)
        return OrMask(self, other)


def _evaluate_tiles(allowed, rows, cols, q_len, kv_len, block_q, block_kv) -> np.ndarray:
    """Exact kinds of the listed tiles by evaluating every element (chunked)."""
    out = np.empty(rows.size, np.int8)
    per_chunk = max(1, (1 << 24) // (block_q * block_kv))
    oq = np.arange(block_q, dtype=np.int64)
    ok = np.arange(block_kv, dtype=np.int64)
    for start in range(0, rows.size, per_chunk):
        r, c = rows[start:start + per_chunk], cols[start:start + per_chunk]
        q = r[:, None, None] * block_q + oq[None, :, None]
        k = c[:, None, None] * block_kv + ok[None, None, :]
        inside = (q < q_len) & (k < kv_len)
        hit = np.broadcast_to(allowed(q, k), inside.shape) & inside
        n_hit = hit.sum(axis=(1, 2))
        n_inside = inside.sum(axis=(1, 2))
        out[start:start + per_chunk] = np.where(
            n_hit == 0, EMPTY, np.where(n_hit == n_inside, FULL, PARTIAL))
    return out


def _table_from_kinds(kind, q_len, kv_len, block_q, block_kv) -> BlockTable:
    nonempty = kind != EMPTY
    kv_indices, kv_counts, q_indices, q_counts = _index_lists(nonempty)
    return BlockTable(q_len, kv_len, block_q, block_kv, kind, kv_indices, kv_counts,
                      q_indices, q_counts)


@functools.lru_cache(maxsize=64)
def cached_block_table(mask: Mask, q_len: int, kv_len: int, block_q: int, block_kv: int):
    """Block tables are pure functions of hashable arguments: build each once per process."""
    return mask.block_table(q_len, kv_len, block_q, block_kv)


# --- elementwise masks with closed-form tile rules --------------------------------------------


@dataclasses.dataclass(frozen=True)
class FullMask(Mask):
    """Every query attends to every key."""

    def allowed(self, q_idx, kv_idx):
        xp = _xp(q_idx, kv_idx)
        return xp.ones(np.broadcast_shapes(np.shape(q_idx), np.shape(kv_idx)), dtype=bool)

    def _tile_any_all(self, qs, qe, ks, ke, q_len, kv_len):
        return True, True, False


@dataclasses.dataclass(frozen=True)
class CausalMask(Mask):
    """Query i attends to keys j <= i + offset (offset > 0 when queries continue a prefix)."""

    offset: int = 0

    def __post_init__(self):
        _check_int_fields(self, ("offset", None))

    def allowed(self, q_idx, kv_idx):
        return kv_idx <= q_idx + self.offset

    def is_causal(self) -> bool:
        return self.offset <= 0

    def _tile_any_all(self, qs, qe, ks, ke, q_len, kv_len):
        return ks <= qe - 1 + self.offset, ke - 1 <= qs + self.offset, False


@dataclasses.dataclass(frozen=True)
class LocalMask(Mask):
    """Sliding window: query i attends to keys j with ``i - left <= j <= i + right``.

    ``left``/``right`` may be None (unbounded); ``LocalMask(w - 1, 0)`` is a causal window of
    w keys.
    """

    left: int | None
    right: int | None = 0

    def __post_init__(self):
        for name in ("left", "right"):
            value = getattr(self, name)
            if value is not None and (not is_integer(value) or value < 0):
                raise ValueError(f"LocalMask {name}={value!r}: must be an integer >= 0 or None")

    def allowed(self, q_idx, kv_idx):
        ok = True
        if self.left is not None:
            ok = kv_idx >= q_idx - self.left
        if self.right is not None:
            ok = ok & (kv_idx <= q_idx + self.right)
        return ok if not isinstance(ok, bool) else FullMask().allowed(q_idx, kv_idx)

    def lookback(self) -> int | None:
        return None if self.left is None else self.left + 1

    def is_causal(self) -> bool:
        return self.right == 0

    def _tile_any_all(self, qs, qe, ks, ke, q_len, kv_len):
        left = np.inf if self.left is None else self.left
        right = np.inf if self.right is None else self.right
        any_ = (ks <= qe - 1 + right) & (ke - 1 >= qs - left)
        all_ = (ke - 1 <= qs + right) & (ks >= qe - 1 - left)
        return any_, all_, False


@dataclasses.dataclass(frozen=True)
class ChunkedCausalMask(Mask):
    """Causal attention within consecutive chunks of ``chunk`` positions (Llama-4 style)."""

    chunk: int

    def __post_init__(self):
        _check_int_fields(self, ("chunk", 1))

    def allowed(self, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx // self.chunk == q_idx // self.chunk)

    def lookback(self) -> int:
        return self.chunk

    def is_causal(self) -> bool:
        return True

    def _tile_any_all(self, qs, qe, ks, ke, q_len, kv_len):
        c = self.chunk
        lo = np.maximum(qs // c, ks // c)
        hi = np.minimum((qe - 1) // c, (ke - 1) // c)
        # With several shared chunks, the lowest one holds a causal pair (see module tests);
        # with one shared chunk, compare its largest query with its smallest key.
        single = np.minimum(qe - 1, hi * c + c - 1) >= np.maximum(ks, hi * c)
        any_ = (lo <= hi) & ((hi > lo) | single)
        one_chunk = (qs // c == (qe - 1) // c) & (ks // c == (ke - 1) // c) & (qs // c == ks // c)
        all_ = one_chunk & (ke - 1 <= qs)
        return any_, all_, False


@dataclasses.dataclass(frozen=True)
class StridedMask(Mask):
    """Sparse Transformer "strided" pattern: ``(i - j) mod stride == 0`` (combine with causal)."""

    stride: int

    def __post_init__(self):
        _check_int_fields(self, ("stride", 1))

    def allowed(self, q_idx, kv_idx):
        return (q_idx - kv_idx) % self.stride == 0

    def _tile_any_all(self, qs, qe, ks, ke, q_len, kv_len):
        s = self.stride
        d_min, d_max = qs - (ke - 1), (qe - 1) - ks
        any_ = (d_max // s) * s >= d_min
        all_ = (s == 1) | ((d_min == d_max) & (d_min % s == 0))
        return any_, np.broadcast_to(all_, np.broadcast_shapes(qs.shape, ks.shape)), False


@dataclasses.dataclass(frozen=True)
class FixedMask(Mask):
    """Sparse Transformer "fixed" pattern: attend within your own block of ``block`` positions
    and to the last ``c`` positions ("summaries") of every block (combine with causal)."""

    block: int
    c: int

    def __post_init__(self):
        _check_int_fields(self, ("block", 1), ("c", 1))
        if not self.c <= self.block:
            raise ValueError(f"FixedMask(block={self.block}, c={self.c}): need block >= 1 and "
                             "1 <= c <= block")

    def allowed(self, q_idx, kv_idx):
        return (kv_idx // self.block == q_idx // self.block) | (kv_idx % self.block >= self.block - self.c)

    def _tile_any_all(self, qs, qe, ks, ke, q_len, kv_len):
        b, c = self.block, self.c
        same_block_possible = (qs // b <= (ke - 1) // b) & (ks // b <= (qe - 1) // b)
        first_summary = np.where(ks % b >= b - c, ks, (ks // b) * b + b - c)
        has_summary = first_summary <= ke - 1
        any_ = same_block_possible | has_summary
        # every key a summary: the tile lies inside the summary run of one block
        all_summary = (c == b) | ((ks // b == (ke - 1) // b) & (ks % b >= b - c))
        q_block = qs // b
        one_q_block = q_block == (qe - 1) // b
        # keys outside q's block are summaries iff they lie in [q_block*b - c, (q_block+1)*b)
        keys_ok = (ks >= q_block * b - c) & (ke - 1 <= (q_block + 1) * b - 1)
        all_ = all_summary | (one_q_block & keys_ok)
        return any_, all_, False


@dataclasses.dataclass(frozen=True)
class GlobalTokensMask(Mask):
    """Longformer global attention: the listed positions attend everywhere and are attended
    by everyone. ``num_or_indices``: an int n (the first n positions) or a tuple of positions.
    Positions are the row's: with ``segment_ids`` (packed documents) they belong to the
    documents holding them, so a later document has no global token of its own."""

    num_or_indices: int | tuple[int, ...]

    def __post_init__(self):
        value = self.num_or_indices
        if isinstance(value, np.integer):  # a count read from a numpy array
            object.__setattr__(self, "num_or_indices", int(value))
        elif isinstance(value, list | range | np.ndarray):
            object.__setattr__(self, "num_or_indices", tuple(int(v) for v in value))
        elif not isinstance(value, int | tuple) or isinstance(value, bool):
            raise ValueError(f"GlobalTokensMask num_or_indices={value!r}: expected a count "
                             "(int) or a sequence of positions")
        elif isinstance(value, tuple) and all(is_integer(v) for v in value):
            object.__setattr__(self, "num_or_indices", tuple(int(v) for v in value))  # numpy ints
        value = self.num_or_indices
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"GlobalTokensMask num_or_indices={value}: must be >= 0")
        elif not all(isinstance(v, int) and v >= 0 for v in value):
            raise ValueError(f"GlobalTokensMask indices {value}: must be non-negative ints")

    @property
    def indices(self) -> np.ndarray:
        value = self.num_or_indices
        return np.arange(value) if isinstance(value, int) else np.unique(np.asarray(value, np.int64))

    def _is_global(self, idx):
        xp = _xp(idx)
        value = self.num_or_indices
        if isinstance(value, int):
            return idx < value
        flags = np.zeros(int(max(value, default=-1)) + 2, bool)
        flags[list(value)] = True
        flags = xp.asarray(flags)
        return xp.take(flags, xp.clip(idx, 0, flags.shape[0] - 1)) & (idx < flags.shape[0] - 1)

    def allowed(self, q_idx, kv_idx):
        return self._is_global(q_idx) | self._is_global(kv_idx)

    def _tile_any_all(self, qs, qe, ks, ke, q_len, kv_len):
        g = self.indices

        def count(lo, hi):
            return np.searchsorted(g, hi) - np.searchsorted(g, lo)

        q_hits, k_hits = count(qs, qe), count(ks, ke)
        return (q_hits > 0) | (k_hits > 0), (q_hits == qe - qs) | (k_hits == ke - ks), False


# --- block-level masks (a layout over fixed blocks) -----------------------------------------


def _layout_tiles(layout: np.ndarray, lb_q: int, lb_kv: int, qs, qe, ks, ke):
    """Exact (any, all) of tiles over a block layout: a lookup when every tile lies inside one
    layout block (tiles the size of the blocks, the common case), else a summed-area table."""
    r0, r1 = qs // lb_q, (qe - 1) // lb_q + 1
    c0, c1 = ks // lb_kv, (ke - 1) // lb_kv + 1
    if (r1 - r0 == 1).all() and (c1 - c0 == 1).all():
        inside = layout[r0, c0]
        return inside, inside, False
    count = np.int32 if layout.size < 2**31 else np.int64
    sat = np.zeros((layout.shape[0] + 1, layout.shape[1] + 1), count)
    sat[1:, 1:] = layout.astype(count).cumsum(0).cumsum(1)
    total = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    return total > 0, total == (r1 - r0) * (c1 - c0), False


def _layout_lookup(layout: np.ndarray, lb_q: int, lb_kv: int, q_idx, kv_idx):
    xp = _xp(q_idx, kv_idx)
    table = xp.asarray(layout)
    r = xp.clip(q_idx // lb_q, 0, layout.shape[0] - 1)
    c = xp.clip(kv_idx // lb_kv, 0, layout.shape[1] - 1)
    return table[r, c]


@dataclasses.dataclass(frozen=True, eq=False)
class BlockMask(Mask):
    """An explicit boolean layout over blocks of ``block_size = (rows, cols)`` positions."""

    layout: np.ndarray
    block_size: tuple[int, int] = (128, 128)

    def __post_init__(self):
        layout = np.asarray(self.layout)
        if layout.ndim != 2 or layout.dtype != bool:
            raise ValueError(f"BlockMask layout must be a 2-D boolean array, got "
                             f"{layout.dtype}{list(layout.shape)}")
        block = self.block_size
        block = (block, block) if is_integer(block) else tuple(block)
        if len(block) != 2 or not all(is_integer(b) and b >= 1 for b in block):
            raise ValueError(f"BlockMask block_size={self.block_size!r}: need one integer >= 1 "
                             "or two (query, key)")
        layout = layout.copy()
        layout.flags.writeable = False
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "block_size", tuple(int(b) for b in block))

    def __hash__(self):
        return hash((self.layout.shape, self.layout.tobytes(), self.block_size))

    def __eq__(self, other):
        return (isinstance(other, BlockMask) and self.block_size == other.block_size
                and np.array_equal(self.layout, other.layout))

    def check_size(self, q_len, kv_len):
        super().check_size(q_len, kv_len)
        rows, cols = self.layout.shape
        bq, bk = self.block_size
        if q_len > rows * bq or kv_len > cols * bk:
            raise ValueError(
                f"BlockMask layout {rows}x{cols} of {bq}x{bk} blocks covers at most "
                f"({rows * bq}, {cols * bk}); cannot serve (q_len, kv_len)=({q_len}, {kv_len})")

    def allowed(self, q_idx, kv_idx):
        return _layout_lookup(self.layout, *self.block_size, q_idx, kv_idx)

    def _tile_any_all(self, qs, qe, ks, ke, q_len, kv_len):
        return _layout_tiles(self.layout, *self.block_size, qs, qe, ks, ke)


def _hash_uniform(seed: int, rows: np.ndarray, draw: int) -> np.ndarray:
    """Uniforms in [0, 1), one per row, a pure function of ``(seed, row, draw)``: the
    splitmix64 finaliser (Steele, Lea & Flood 2014) of the three mixed into one 64-bit word."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed & (2**64 - 1)) * np.uint64(0x9E3779B97F4A7C15)
             + rows.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
             + np.uint64(draw) * np.uint64(0x94D049BB133111EB) + np.uint64(0x2545F4914F6CDD1D))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclasses.dataclass(frozen=True)
class BigBirdMask(Mask):
    """BigBird ITC pattern over blocks of ``block`` positions (Zaheer et al. 2020).

    Each block row sees a window of ``window_blocks`` blocks (odd, or 0) centred on itself,
    the first ``global_blocks`` blocks (which also see everything), and ``random_blocks``
    further blocks drawn without replacement outside window and globals, fixed by ``seed``
    and the row. Blocks are the row's: with ``segment_ids`` (packed documents) the global
    blocks belong to the first document.
    With ``causal=True`` the random blocks come from earlier blocks only, so a row's pattern
    does not depend on the sequence length (a decoder's cache then sees what training saw).
    """

    block: int
    window_blocks: int = 3
    global_blocks: int = 2
    random_blocks: int = 3
    seed: int = 0
    causal: bool = False  # draw random blocks from earlier blocks only

    def __post_init__(self):
        _check_int_fields(self, ("block", 1), ("window_blocks", 0), ("global_blocks", 0),
                          ("random_blocks", 0), ("seed", None))
        if self.window_blocks % 2 == 0 and self.window_blocks > 0:
            # centred on the row's own block: an even count has no centre (2 was read as 3)
            raise ValueError(f"BigBirdMask window_blocks={self.window_blocks}: must be odd (a "
                             "window centred on the row's block: the block and (W-1)/2 on each "
                             "side) or 0")
        if not isinstance(self.causal, bool | np.bool_):
            raise ValueError(f"BigBirdMask causal={self.causal!r}: must be True or False")

    @functools.lru_cache(maxsize=16)  # noqa: B019 — frozen, hashable instances; bounded cache
    def layout(self, q_len: int, kv_len: int) -> np.ndarray:
        nq, nk = -(-q_len // self.block), -(-kv_len // self.block)
        layout = np.zeros((nq, nk), bool)
        layout[:self.global_blocks] = True
        layout[:, :self.global_blocks] = True
        if self.window_blocks > 0:  # one diagonal per offset: no [nq, nk] index temporaries
            half = self.window_blocks // 2
            for offset in range(-half, half + 1):
                row = np.arange(max(0, -offset), min(nq, nk - offset))
                layout[row, row + offset] = True
        random_rows, random_cols = self._random_blocks(nq, nk)
        layout[random_rows, random_cols] = True
        layout.flags.writeable = False
        return layout

    def _random_blocks(self, nq: int, nk: int) -> tuple[np.ndarray, np.ndarray]:
        """(row, column) of every random block, drawn for all rows at once.

        A non-global row ``r`` draws ``min(random_blocks, m)`` distinct columns uniformly from
        its ``m`` candidates: the columns ``g <= c < limit`` outside its window ``[lo, hi)``
        (``limit = min(r, nk)`` when causal, else ``nk``). Robert Floyd's algorithm picks
        distinct ranks in ``random_blocks`` vectorised steps (a loop over the draws, not over
        blocks); a rank below ``lo - g`` is column ``g + rank``, the others skip the window.
        The uniforms hash ``(seed, r, draw)``, so a causal row's draw depends on nothing else —
        not on the sequence length a decoder has reached.
        """
        g, k = self.global_blocks, self.random_blocks
        rows = np.arange(g, nq)
        if k == 0 or rows.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        limit = np.minimum(rows, nk) if self.causal else np.full_like(rows, nk)
        limit = np.maximum(limit, g)
        if self.window_blocks > 0:
            half = self.window_blocks // 2
            lo = np.clip(rows - half, g, limit)
            hi = np.clip(rows + half + 1, lo, limit)
        else:
            lo = hi = np.full_like(rows, g)
        width = hi - lo
        candidates = limit - g - width
        take = np.minimum(k, candidates)
        ranks = np.full((rows.size, k), -1, np.int64)
        for draw in range(k):  # Floyd: draw ``draw`` picks from [0, j], j = m - take + draw
            j = candidates - take + draw
            pick = np.floor(_hash_uniform(self.seed, rows, draw) * (j + 1)).astype(np.int64)
            taken = (ranks[:, :draw] == pick[:, None]).any(axis=1)
            ranks[:, draw] = np.where(draw < take, np.where(taken, j, pick), -1)
        row_idx, draw_idx = np.nonzero(ranks >= 0)
        cols = g + ranks[row_idx, draw_idx]
        cols += np.where(cols >= lo[row_idx], width[row_idx], 0)
        return rows[row_idx], cols

    def allowed(self, q_idx, kv_idx):
        raise TypeError("BigBirdMask's random blocks depend on the sequence lengths: use "
                        "allowed_fn(q_len, kv_len), to_dense or block_table")

    def allowed_fn(self, q_len, kv_len):
        layout = self.layout(q_len, kv_len)
        return lambda q_idx, kv_idx: _layout_lookup(layout, self.block, self.block, q_idx, kv_idx)

    def _tile_any_all(self, qs, qe, ks, ke, q_len, kv_len):
        return _layout_tiles(self.layout(q_len, kv_len), self.block, self.block, qs, qe, ks, ke)


# --- combinations ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Combined(Mask):
    left: Mask
    right: Mask

    def __post_init__(self):
        for side in (self.left, self.right):
            if not isinstance(side, Mask):
                raise TypeError(f"masks combine only with masks, got {type(side).__name__}")

    def check_size(self, q_len, kv_len):
        self.left.check_size(q_len, kv_len)
        self.right.check_size(q_len, kv_len)

    @property
    def length_free(self) -> bool:
        return self.left.length_free and self.right.length_free

    def allowed(self, q_idx, kv_idx):
        return self._op(self.left.allowed(q_idx, kv_idx), self.right.allowed(q_idx, kv_idx))

    def allowed_fn(self, q_len, kv_len):
        left = self.left.allowed_fn(q_len, kv_len)
        right = self.right.allowed_fn(q_len, kv_len)
        return lambda q, k: self._op(left(q, k), right(q, k))

    def _sides(self, qs, qe, ks, ke, q_len, kv_len):
        """Each side's (any, all, undecided), an unknown side counting as undecided. Kept at
        their own shapes (often scalars): the caller's operators broadcast, so a constant
        side costs nothing per tile."""
        out = []
        for side in (self.left, self.right):
            rule = side._tile_any_all(qs, qe, ks, ke, q_len, kv_len)
            if rule is None:
                rule = (True, False, True)
            out.append(tuple(np.asarray(x, bool) for x in rule))
        return out


@dataclasses.dataclass(frozen=True)
class AndMask(_Combined):
    @staticmethod
    def _op(a, b):
        return a & b

    def lookback(self) -> int | None:
        bounds = [m.lookback() for m in (self.left, self.right) if m.lookback() is not None]
        return min(bounds) if bounds and self.length_free else None

    def is_causal(self) -> bool:
        return self.left.is_causal() or self.right.is_causal()

    def _tile_any_all(self, qs, qe, ks, ke, q_len, kv_len):
        (a_any, a_all, a_und), (b_any, b_all, b_und) = self._sides(qs, qe, ks, ke, q_len, kv_len)
        any_, all_ = a_any & b_any, a_all & b_all
        # Decided when a side is certainly empty, or certainly full while the other is exact;
        # partial & partial may be anything and is evaluated.
        decided = (~a_any & ~a_und) | (~b_any & ~b_und) | (a_all & ~b_und) | (b_all & ~a_und)
        return any_, all_, ~decided


@dataclasses.dataclass(frozen=True)
class OrMask(_Combined):
    @staticmethod
    def _op(a, b):
        return a | b

    def lookback(self) -> int | None:
        bounds = [self.left.lookback(), self.right.lookback()]
        return None if None in bounds or not self.length_free else max(bounds)

    def is_causal(self) -> bool:
        return self.left.is_causal() and self.right.is_causal()

    def _tile_any_all(self, qs, qe, ks, ke, q_len, kv_len):
        (a_any, a_all, a_und), (b_any, b_all, b_und) = self._sides(qs, qe, ks, ke, q_len, kv_len)
        any_, all_ = a_any | b_any, a_all | b_all
        decided = (a_all & ~a_und) | (b_all & ~b_und) | (~a_any & ~b_und) | (~b_any & ~a_und)
        return any_, all_, ~decided


@dataclasses.dataclass(frozen=True)
class MultiHeadMask(Mask):
    """A different mask per head (e.g. MoA-style windows of several widths)."""

    masks: tuple[Mask, ...]

    def __post_init__(self):
        masks = tuple(self.masks)
        if not masks or not all(isinstance(m, Mask) and not isinstance(m, MultiHeadMask) for m in masks):
            raise ValueError("MultiHeadMask needs a non-empty sequence of single-head masks")
        object.__setattr__(self, "masks", masks)

    @property
    def num_heads(self) -> int:  # type: ignore[override]
        return len(self.masks)

    def check_size(self, q_len, kv_len):
        for m in self.masks:
            m.check_size(q_len, kv_len)

    @property
    def length_free(self) -> bool:  # (its own allowed_fn only refuses: ask the heads)
        return all(m.length_free for m in self.masks)

    def allowed(self, q_idx, kv_idx):
        raise TypeError("MultiHeadMask differs per head: use head_mask(h) or to_dense")

    def allowed_fn(self, q_len, kv_len):
        raise TypeError("MultiHeadMask differs per head: use head_mask(h).allowed_fn")

    def head_mask(self, head: int) -> Mask:
        return self.masks[head]

    def lookback(self) -> int | None:
        bounds = [m.lookback() for m in self.masks]
        return None if None in bounds else max(bounds)

    def is_causal(self) -> bool:
        return all(m.is_causal() for m in self.masks)

    def to_dense(self, q_len, kv_len) -> np.ndarray:
        """Boolean ``[heads, q_len, kv_len]``."""
        return np.stack([m.to_dense(q_len, kv_len) for m in self.masks])

    def block_table(self, q_len, kv_len, block_q, block_kv) -> BlockTable:
        self.check_size(q_len, kv_len)
        _check_block_sizes(block_q, block_kv)
        kinds = np.stack([m._classify(q_len, kv_len, block_q, block_kv) for m in self.masks])
        return _table_from_kinds(kinds, q_len, kv_len, block_q, block_kv)

    def __and__(self, other):
        others = other.masks if isinstance(other, MultiHeadMask) else (other,) * self.num_heads
        _same_heads(self, others)
        return MultiHeadMask(tuple(a & b for a, b in zip(self.masks, others)))

    def __or__(self, other):
        others = other.masks if isinstance(other, MultiHeadMask) else (other,) * self.num_heads
        _same_heads(self, others)
        return MultiHeadMask(tuple(a | b for a, b in zip(self.masks, others)))

    def __rand__(self, other):
        return MultiHeadMask(tuple(other & m for m in self.masks))

    def __ror__(self, other):
        return MultiHeadMask(tuple(other | m for m in self.masks))


def _check_int_fields(mask: Mask, *fields: tuple[str, int | None]) -> None:
    """Each named field an integer (at least the given minimum): a fraction gave patterns of
    no meaning (``StridedMask(2.5)``) or everything (``FixedMask(4.5, 2)``), a string failed
    inside numpy."""
    for name, low in fields:
        value = getattr(mask, name)
        if not is_integer(value) or (low is not None and value < low):
            allowed = "an integer" + ("" if low is None else f" >= {low}")
            raise ValueError(f"{type(mask).__name__} {name}={value!r}: must be {allowed}")


def _check_block_sizes(block_q, block_kv) -> None:
    if not (is_integer(block_q) and is_integer(block_kv)) or block_q < 1 or block_kv < 1:
        raise ValueError(f"block sizes must be integers >= 1, got block_q={block_q!r}, "
                         f"block_kv={block_kv!r}")


def _same_heads(mask: MultiHeadMask, others: Sequence[Mask]):
    if len(others) != mask.num_heads:
        raise ValueError(f"cannot combine MultiHeadMasks of {mask.num_heads} and {len(others)} heads")


def made_causal(mask: Mask | None) -> Mask:
    """``mask`` (a lazy Mask, or None for plain causal attention) as a causal decoder layer
    (``nn.Attention``) applies it: on top of causality, as decoding does. A mask that lets a
    query read a later key (a window reaching right, global tokens, a random block) is
    combined with ``CausalMask()``; one causal by construction (:meth:`Mask.is_causal`) is kept
    as it is, so the ops still see e.g. a plain ``CausalMask``."""
    if mask is None:
        return CausalMask()
    if not isinstance(mask, Mask):
        raise TypeError(f"mask={mask!r:.80}: expected a Mask, a mask spec string (e.g. "
                        "'local:256') or None")
    # decided from the parameters, not from a rendering: a probe of 256 positions missed
    # masks that read ahead only further (a stride of 256, global tokens past 256), and a
    # decoder layer then read the future
    return mask if mask.is_causal() else mask & CausalMask()
