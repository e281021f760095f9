"""Byte-tokenised corpora cached on disk as 1-D uint8 zarr arrays (tensorstore).

The cache key hashes the file list with sizes and modification times, so editing a file
re-tokenises; building goes to a temporary directory that is renamed into place, so a
crash or a concurrent builder (another process) never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tensorstore as ts

from jaxsparse.config import ConfigError

_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    return Path(os.environ.get("JAXSPARSE_CACHE", Path.home() / ".cache" / "jaxsparse"))


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _spec(path: Path) -> dict:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}


def tokenize_files(files: list[Path]) -> np.ndarray:
    """Concatenate the files' bytes, each followed by a NUL separator (a document boundary)."""
    parts = []
    for f in files:
        parts.append(np.frombuffer(f.read_bytes(), dtype=np.uint8))
        parts.append(np.zeros(1, np.uint8))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def _cache_setting(cache_dir: Path | None) -> str:
    """The setting that chose the cache directory, with its value, for error messages."""
    if cache_dir is not None:
        return f"data.cache_dir={str(cache_dir)!r}"
    return (f"the default cache directory {str(default_cache_dir())!r} ($JAXSPARSE_CACHE or "
            "~/.cache/jaxsparse; data.cache_dir chooses another)")


def open_tokens(files: list[Path], cache_dir: Path | None = None) -> ts.TensorStore:
    """Open (building if needed) the cached token array of ``files``.

    A cache directory that cannot be created or written to is a ConfigError naming
    ``data.cache_dir`` (or the default it fell back to) and its value."""
    setting = _cache_setting(cache_dir)
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():  # mkdir would say only "File exists"
        raise ConfigError(f"{setting} is a file, not a directory; give data.cache_dir a "
                          "directory (it is created if missing)")
    target = cache_dir / f"bytes-{_fingerprint(files)}.zarr"
    if not target.exists():
        tokens = tokenize_files(files)  # outside the try: a corpus file's error is not the cache's
        try:
            _write(tokens, cache_dir, target)
        except OSError as err:  # a parent that is a file, no permission, a full disk
            raise ConfigError(f"{setting}: cannot write the token cache there: {err}") from err
    return ts.open(_spec(target), open=True, read=True).result()


def _write(tokens: np.ndarray, cache_dir: Path, target: Path) -> None:
    """``tokens`` as the zarr array ``target``, built beside it and renamed into place."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
    try:
        store = ts.open(_spec(tmp / "a.zarr"), create=True, dtype=ts.uint8,
                        shape=[tokens.size], chunk_layout=ts.ChunkLayout(chunk_shape=[_CHUNK])
                        ).result()
        store.write(tokens).result()
        try:
            os.rename(tmp / "a.zarr", target)
        except OSError:
            if not target.exists():  # lost a race only if someone else succeeded
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_windows(store: ts.TensorStore, offsets: np.ndarray, length: int) -> np.ndarray:
    """``[len(offsets), length]`` uint8 windows, read concurrently."""
    futures = [store[int(o):int(o) + length].read() for o in offsets]
    if not futures:
        return np.zeros((0, length), np.uint8)
    return np.stack([f.result() for f in futures])
