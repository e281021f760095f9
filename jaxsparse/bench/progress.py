"""A progress bar over a benchmark's cases (compiling and timing one can take minutes)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def cases(items: Iterable[T], desc: str) -> Iterator[T]:
    """``items`` one by one behind a tqdm bar on stderr: stdout keeps only the tables."""
    return iter(tqdm(list(items), desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True,
                     leave=False))
