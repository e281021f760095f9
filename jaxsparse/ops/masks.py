"""Lazy attention masks.

A mask is a small hashable object describing which (query, key) pairs may interact; it is
rendered to a dense boolean array only when asked (``to_dense``), so that kernels can later
derive block tables from it without ever materialising ``S x T`` booleans. Masks combine
with ``&`` and ``|``. Positions are absolute indices into the query and key sequences; a
mask may be evaluated for any ``(q_len, kv_len)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np


class Mask:
    """Base class: subclasses implement ``_allowed(q_idx, kv_idx)`` on broadcast index grids."""

    def _allowed(self, q_idx: np.ndarray, kv_idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def to_dense(self, q_len: int, kv_len: int) -> np.ndarray:
        """Boolean ``[q_len, kv_len]`` array: True where query i may attend to key j."""
        if q_len < 1 or kv_len < 1:
            raise ValueError(f"to_dense needs q_len >= 1 and kv_len >= 1, got ({q_len}, {kv_len})")
        q_idx = np.arange(q_len, dtype=np.int64)[:, None]
        kv_idx = np.arange(kv_len, dtype=np.int64)[None, :]
        return np.broadcast_to(self._allowed(q_idx, kv_idx), (q_len, kv_len)).copy()

    def __and__(self, other: Mask) -> Mask:
        return AndMask(self, other)

    def __or__(self, other: Mask) -> Mask:
        return OrMask(self, other)


@dataclasses.dataclass(frozen=True)
class FullMask(Mask):
    """Every query attends to every key."""

    def _allowed(self, q_idx, kv_idx):
        return np.ones(np.broadcast_shapes(q_idx.shape, kv_idx.shape), dtype=bool)


@dataclasses.dataclass(frozen=True)
class CausalMask(Mask):
    """Query i attends to keys j <= i + offset (offset > 0 when queries continue a prefix)."""

    offset: int = 0

    def _allowed(self, q_idx, kv_idx):
        return kv_idx <= q_idx + self.offset


@dataclasses.dataclass(frozen=True)
class AndMask(Mask):
    left: Mask
    right: Mask

    def _allowed(self, q_idx, kv_idx):
        return self.left._allowed(q_idx, kv_idx) & self.right._allowed(q_idx, kv_idx)


@dataclasses.dataclass(frozen=True)
class OrMask(Mask):
    left: Mask
    right: Mask

    def _allowed(self, q_idx, kv_idx):
        return self.left._allowed(q_idx, kv_idx) | self.right._allowed(q_idx, kv_idx)
