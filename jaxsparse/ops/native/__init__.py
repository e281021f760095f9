"""CPU kernels in C++, compiled on first use and called from XLA through the FFI.

XLA:CPU has no Pallas backend, so where a fused kernel matters on CPU it is written in C++
against the FFI headers that ship with jaxlib (``jax.ffi.include_dir()``):
``monarch_cpu.cc`` (XLA's einsum form of the Monarch product makes five passes over the
activation), ``selective_scan_cpu.cc`` (XLA runs the Mamba scan as one small dispatch per
step, or as chunked programs that materialise [chunk, d, N] tensors),
``linear_scan_cpu.cc`` (the first-order recurrence of Hydra's diagonal SSM, the same dispatch per
step otherwise),
``grouped_matmul_cpu.cc`` (the dropless MoE's grouped matmul: XLA computes every group densely
or scans padded tiles), ``topk_cpu.cc`` (XLA:CPU sorts every row for ``lax.top_k``) and
``embedding_bag_cpu.cc`` (the product-key memory read, whose XLA backward scatters into the
whole table once per pick); ``common.h`` (vectors, work sharing) and ``gemm.h`` (the GEMM
micro-kernel) hold what they share. A source is compiled the first time it is needed — like
``torch.utils.cpp_extension.load`` — with the host's C++ compiler (``$CXX``, else
``g++``/``c++``) for the host CPU (``-march=native``), and cached under
``$JAXSPARSE_CACHE/native`` (default ``~/.cache/jaxsparse``), keyed by the source and the
headers beside it, the flags, the jaxlib version and the CPU. Without a compiler, or with
``JAXSPARSE_NATIVE=0``, the callers fall back to their XLA paths after one warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jaxlib

SOURCE_DIR = Path(__file__).resolve().parent
CXX_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


class NativeBuildError(RuntimeError):
    """The C++ source could not be compiled (the message carries the compiler's output)."""


def cache_dir() -> Path:
    return Path(os.environ.get("JAXSPARSE_CACHE", Path.home() / ".cache" / "jaxsparse"))


def native_enabled() -> bool:
    return os.environ.get("JAXSPARSE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_fingerprint() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() or platform.machine()


def build(source: str) -> Path:
    """Compile ``SOURCE_DIR/source`` into a cached shared library; returns its path.

    The library is written under a temporary name and renamed into place, so processes that
    build at the same time never load a half-written file.
    """
    compiler = _compiler()
    if compiler is None:
        raise NativeBuildError("no C++ compiler found (set $CXX, or install g++)")
    src = SOURCE_DIR / source
    flags = (*CXX_FLAGS, f"-I{jax.ffi.include_dir()}")
    headers = [h.read_text() for h in sorted(src.parent.glob("*.h"))]  # what it may include
    key = hashlib.sha256("\0".join([src.read_text(), *headers, compiler, *flags,
                                    jaxlib.__version__, _cpu_fingerprint()]).encode()
                         ).hexdigest()[:16]
    target = cache_dir() / "native" / f"{src.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        proc = subprocess.run([compiler, *flags, str(src), "-o", str(partial)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise NativeBuildError(f"{compiler} failed on {src.name}:\n{proc.stderr[-4000:]}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def register(source: str, symbols: tuple[tuple[str, str], ...]) -> bool:
    """Build ``source`` and register each ``(ffi_target, c_symbol)`` for the CPU platform.

    Returns False (after one warning naming the reason) when native kernels are disabled or
    the build fails; callers then use their XLA path. ``JAXSPARSE_NATIVE`` is read at every
    call, outside the cache of the build: cached with it, the first answer held for the
    process (set to 0 after a kernel had run, the defaults kept using the kernels).
    """
    return native_enabled() and _build_and_register(source, symbols)


@functools.cache
def _build_and_register(source: str, symbols: tuple[tuple[str, str], ...]) -> bool:
    try:
        library = ctypes.CDLL(str(build(source)))
    except (NativeBuildError, OSError) as err:
        warnings.warn(f"jaxsparse: the native CPU kernel {source} is unavailable, using the XLA "
                      f"path instead ({err})", RuntimeWarning, stacklevel=3)
        return False
    for target, symbol in symbols:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    return True
