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
    return _absolute(os.environ.get("JAXSPARSE_CACHE", Path.home() / ".cache" / "jaxsparse"))


def _absolute(path: str | Path) -> Path:
    """``path`` with ``~`` expanded, made absolute (against the working directory of the
    call) and its ``..`` resolved: tensorstore's file driver refuses a path with a ``..``
    segment, and its "Invalid file path" read as an unwritable directory."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _spec(path: Path) -> dict:
    # a missing chunk is an error, not zeros (tensorstore's default fills it with the fill value)
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)},
            "fill_missing_data_reads": False}


def tokenize_files(files: list[Path]) -> np.ndarray:
    """Concatenate the files' bytes, each followed by a NUL separator (a document boundary):
    the contents of the token cache, which :func:`open_tokens` writes file by file instead of
    holding them in memory."""
    parts = []
    for f in files:
        parts.append(np.frombuffer(f.read_bytes(), dtype=np.uint8))
        parts.append(np.zeros(1, np.uint8))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def cache_dir_of(cache_dir: str | Path | None) -> Path:
    """The directory the token cache of ``data.cache_dir`` lives in (None: the default)."""
    return default_cache_dir() if cache_dir is None else _absolute(cache_dir)


def _cache_setting(cache_dir: Path | None) -> str:
    """The setting that chose the cache directory, with its value, for error messages."""
    if cache_dir is not None:
        return f"data.cache_dir={str(cache_dir)!r}"
    return (f"the default cache directory {str(default_cache_dir())!r} ($JAXSPARSE_CACHE or "
            "~/.cache/jaxsparse; data.cache_dir chooses another)")


def open_tokens(files: list[Path], cache_dir: Path | None = None) -> ts.TensorStore:
    """Open (building if needed) the cached token array of ``files``.

    A cache directory that cannot be created or written to is a ConfigError naming
    ``data.cache_dir`` (or the default it fell back to) and its value; so is a cache that
    cannot be read back whole (a deleted chunk reads as an error, never as zeros), naming the
    cache to delete."""
    setting = _cache_setting(cache_dir)
    cache_dir = cache_dir_of(cache_dir)
    if "\\" in str(cache_dir):  # tensorstore's file driver would read it as a separator
        raise ConfigError(f"{setting} contains a backslash, which the token cache (tensorstore's "
                          "file driver) cannot use in a path; choose a directory without one")
    if cache_dir.exists() and not cache_dir.is_dir():  # mkdir would say only "File exists"
        raise ConfigError(f"{setting} is a file, not a directory; give data.cache_dir a "
                          "directory (it is created if missing)")
    target = cache_dir / f"bytes-{_fingerprint(files)}.zarr"
    if not target.exists():
        _build(files, cache_dir, target, setting)
    try:
        store = ts.open(_spec(target), open=True, read=True).result()
    except ValueError as err:  # tensorstore's errors: missing or unreadable metadata
        raise _damaged(target, err) from None
    _check_chunks(store, target)
    return store


def _damaged(target: Path, err: Exception | str) -> ConfigError:
    reason = str(err).split(" [tensorstore_spec=")[0]  # not the whole JSON spec
    return ConfigError(f"the token cache {str(target)!r} is damaged ({reason}); delete that "
                       "directory and run again: it is rebuilt from the corpus")


def _check_chunks(store: ts.TensorStore, target: Path) -> None:
    """Every chunk file of ``store`` is there (its chunks are named 0, 1, ...), so a deleted one
    is found when the cache is opened, not at the first window that reads it."""
    expected = -(-store.shape[0] // _CHUNK)
    present = set(os.listdir(target))
    missing = [str(i) for i in range(expected) if str(i) not in present]
    if missing:
        raise _damaged(target, f"{len(missing)} of its {expected} chunk files are missing, "
                               f"the first {missing[0]!r}")


_BUFFER = 16 * _CHUNK  # bytes gathered before each write: whole chunks (one at the array's end)


def _build(files: list[Path], cache_dir: Path, target: Path, setting: str) -> None:
    """The token array of ``files`` (:func:`tokenize_files`'s bytes) as the zarr array
    ``target``: sized from the files' sizes, then written as they are read, through a buffer
    of at most ``_BUFFER`` bytes, so the corpus is never held in memory. Built beside
    ``target`` and renamed into place.

    A cache directory that cannot be written is a ConfigError naming ``setting``; a corpus
    file's own error (unreadable, vanished) is raised as it is."""
    sizes = [f.stat().st_size for f in files]

    def unwritable(err):
        return ConfigError(f"{setting}: cannot write the token cache there: {err}")

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
    except OSError as err:  # a parent that is a file, no permission
        raise unwritable(err) from err
    try:
        try:
            store = ts.open(_spec(tmp / "a.zarr"), create=True, dtype=ts.uint8,
                            shape=[sum(sizes) + len(files)],
                            chunk_layout=ts.ChunkLayout(chunk_shape=[_CHUNK])).result()
        except ValueError as err:  # tensorstore's errors
            raise unwritable(err) from err
        buffer = np.empty(max(1, min(_BUFFER, store.shape[0])), np.uint8)
        view = memoryview(buffer)
        filled = offset = 0

        def flush():  # buffer[:filled] at offset: whole chunks, but at the array's end
            nonlocal filled, offset
            try:
                store[offset:offset + filled].write(buffer[:filled]).result()
            except ValueError as err:  # a full disk
                raise unwritable(err) from err
            offset, filled = offset + filled, 0

        for f, size in zip(files, sizes):
            read = 0
            with open(f, "rb") as handle:
                # asks for one byte more than the file should still hold: catches one that grew
                while n := handle.readinto(view[filled:filled + min(len(buffer) - filled,
                                                                    size - read + 1)]):
                    filled, read = filled + n, read + n
                    if read > size:
                        break
                    if filled == len(buffer):
                        flush()
            if read != size:
                raise ConfigError(f"the corpus file {str(f)!r} changed while its token cache "
                                  f"was built (it had {size} bytes, then "
                                  f"{'more' if read > size else read}); run again")
            buffer[filled] = 0  # the NUL after every file, which ends its document
            filled += 1
            if filled == len(buffer):
                flush()
        if filled:
            flush()
        try:
            os.rename(tmp / "a.zarr", target)
        except OSError as err:
            if not target.exists():  # lost a race only if someone else succeeded
                raise unwritable(err) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_windows(store: ts.TensorStore, offsets: np.ndarray, length: int) -> np.ndarray:
    """``[len(offsets), length]`` uint8 windows, read concurrently. A window reaching outside
    the array is an IndexError naming it (tensorstore's own out-of-range error is a ValueError,
    which would read as a damaged cache below)."""
    size = store.shape[0]
    for o in offsets:
        if not 0 <= int(o) <= size - length:
            raise IndexError(f"read_windows: the window [{int(o)}, {int(o) + length}) is outside "
                             f"the {size} tokens (a start must be in [0, {size - length}])")
    futures = [store[int(o):int(o) + length].read() for o in offsets]
    if not futures:
        return np.zeros((0, length), np.uint8)
    try:
        return np.stack([f.result() for f in futures])
    except ValueError as err:  # a chunk file deleted or damaged since the cache was opened
        raise _damaged(Path(store.kvstore.path), err) from None
