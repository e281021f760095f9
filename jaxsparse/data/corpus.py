"""Text corpora: the running interpreter's standard library (default) or a user's glob.

Files are listed in sorted order and split into train/validation *by file* with a stable
hash of the path relative to the corpus root (the standard library's directory, or the
directory a glob names before its first wildcard), so the split does not move when files are
added elsewhere.
"""

from __future__ import annotations

import glob
import os
import sysconfig
import warnings
import zlib
from pathlib import Path

from jaxsparse.config import ConfigError
from jaxsparse.errors import CorpusWarning

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_files() -> list[Path]:
    """Every ``.py`` file of the standard library, third-party packages excluded."""
    root = stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        found += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(found)


def glob_files(pattern: str, exclude: Path | None = None) -> list[Path]:
    """The files ``pattern`` matches, sorted, less those under the directory ``exclude`` (the
    token cache: a cache inside a ``**/*`` glob would otherwise feed its own chunk files back
    into the corpus it caches, and change the corpus, so the cache key, on every run)."""
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if Path(p).is_file())
    skipped = ""
    if exclude is not None:
        excluded = Path(exclude).expanduser().resolve()
        inside = {d: _within(d, excluded) for d in {f.parent for f in files}}
        kept = [f for f in files if not inside[f.parent]]
        if len(kept) < len(files):
            skipped = f" besides the token cache's own files under {str(excluded)!r}"
        files = kept
    if not files:
        raise ConfigError(f"data.path={pattern!r} matched no files{skipped}")
    return files


def _within(directory: Path, excluded: Path) -> bool:
    """Whether ``directory`` lies in the directory ``excluded`` (resolved). Only a directory that
    could be a token cache's (a path through one named like ``excluded``, or through a zarr
    array: the cache's files lie in ``*.zarr``) is resolved: resolving costs ~100 us a directory."""
    if excluded.name not in directory.parts and not any(
            part.endswith(".zarr") for part in directory.parts):
        return False
    return directory.resolve().is_relative_to(excluded)


def literal_prefix(pattern: str) -> Path:
    """The directory ``pattern`` names before its first wildcard component (``/data/a`` of
    ``/data/a/**/*.txt``; ``.`` of ``*.txt``), or a literal path's own directory.

    Split hashes are taken relative to it rather than to the common parent of the files
    matched today: that parent moves when a file is added outside it (``/data/a`` becomes
    ``/data`` once ``/data/b/new.txt`` exists), and every file's hash, so the split, with it."""
    pattern = os.path.expanduser(pattern)
    parts = Path(pattern).parts
    for i, part in enumerate(parts):
        if glob.has_magic(part):
            return Path(*parts[:i]) if i else Path(".")
    return Path(pattern).parent


def corpus_files(path: str | None, exclude: Path | None = None) -> tuple[Path, list[Path]]:
    """``(root, files)``: root is what split hashes are taken relative to (it depends on the
    pattern alone, never on which files it matches). A glob's files under the directory
    ``exclude`` (the token cache) are left out (:func:`glob_files`)."""
    if path is None:
        return stdlib_root(), stdlib_files()
    return literal_prefix(path).resolve(), glob_files(path, exclude)


def split_files(root: Path, files: list[Path], valid_every: int) -> dict[str, list[Path]]:
    """Every file whose path hash is 0 mod ``valid_every`` is validation; the rest train.

    When the hashes leave one split empty (a corpus of a few files: with ``valid_every=20``,
    three files hold none out 86% of the time), the file of the smallest hash is validation
    and the rest train, so validation never reads training text unnoticed. A corpus of a
    single file cannot be split by file: it serves both splits, with a warning that the
    validation metrics are then measured on the training text."""
    hashes = [zlib.crc32(os.path.relpath(f.resolve(), root).encode()) for f in files]
    train = [f for f, h in zip(files, hashes) if h % valid_every]
    valid = [f for f, h in zip(files, hashes) if h % valid_every == 0]
    if len(files) == 1:
        warnings.warn(f"the corpus is a single file ({files[0]}): it cannot be split by file, "
                      "so the validation metrics are measured on the training text; give "
                      "data.path a glob of several files to hold some out", CorpusWarning,
                      stacklevel=2)
        return {"train": files, "valid": files}
    if not train or not valid:
        held_out = files[hashes.index(min(hashes))]
        return {"train": [f for f in files if f != held_out], "valid": [held_out]}
    return {"train": train, "valid": valid}
