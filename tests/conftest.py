"""Strict JAX for every test, a private token cache so tests never touch ~/.cache, one XLA
compilation cache shared by the whole run, and XLA:CPU code generated for compile speed."""

import gc
import os
import shutil
import tempfile

os.environ.setdefault("JAXSPARSE_CACHE", os.path.join(tempfile.gettempdir(), "jaxsparse-test-cache"))

# Many tests compile the same programs (the tiny configs' train steps, the CLI's subprocesses,
# the 8-device checks): JAX's persistent compilation cache lets every later compile of an
# identical program load the first one's executable — test_train.py takes 111 s instead of
# 177 s. The directory is made here, before jax is imported (JAX reads these variables at
# import), in the process that pytest starts first: xdist workers and the tests' subprocesses
# inherit it, so they share it; it is removed when the run ends (_OWN_COMPILATION_CACHE), so
# every run starts cold, as CI does, and the suite's timings stay honest. (Without a size limit
# JAX writes entries unlocked; one read while another process is still writing it fails to
# decompress, and JAX warns and compiles afresh: never a wrong executable.)
_OWN_COMPILATION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_COMPILATION_CACHE = tempfile.mkdtemp(prefix="jaxsparse-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_COMPILATION_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# The suite compiles far more than it runs (small shapes, a few steps each): LLVM's -O0 code
# generation for XLA:CPU cuts compile time by about a quarter (test_train.py + test_ssm.py
# 198 -> 168 s, two Hydra checks 36 -> 26 s). Results agree within float32 rounding (reductions
# vectorise differently: hydra_tiny's gradients at most 3.5e-9 of the largest apart), and every
# comparison in the suite is made within one run; benchmarks outside the tests keep the
# default. Set here, before jax is
# imported, so workers, subprocesses (their device counts are added to these flags,
# jaxsparse.parallel.emulated) and notebook kernels inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        [*os.environ.get("XLA_FLAGS", "").split(), "--xla_backend_optimization_level=0"])

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "standard")


import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# the property tests draw the same examples on every run: a failure seen once comes back
# (in CI too), instead of a new random draw each time (print_blob: how to replay one)
settings.register_profile("derandomized", derandomize=True, print_blob=True)
settings.load_profile("derandomized")


@pytest.fixture
def tpu_lowering_target(monkeypatch):
    """Mosaic asks the local device for TPU facts (lanes, VMEM); answer as a v5p would, so the
    TPU lowering can run on this CPU host. Only the lowering runs, nothing executes (Mosaic's
    layout passes run at TPU compile time, so they are not exercised here)."""
    from jax._src.pallas.mosaic import tpu_info

    monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5P, 1))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without it (`-p no:xdist`), unused
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's default): one worker per core, at most 4 — each worker is a JAX
    process (~1-2 GB with its compiled functions) and some tests start 8-device subprocesses."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, cores or 1))


def pytest_sessionfinish(session):
    """In an xdist worker: collect garbage once, then freeze what survives. After the last test
    a worker holds ~2.5 M objects (4.4 s per full collection here), and pytest's cleanup
    collects five more times to report unraisable exceptions. execnet interrupts a worker
    still busy 5 s after the run ends (SIGINT), which landed inside one of those collections
    and printed an ignored KeyboardInterrupt from hypothesis's gc callback. Runs before xdist
    reports the worker finished; frozen objects are skipped by later collections, and garbage
    made after this is still collected (so unraisable exceptions are still reported)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        gc.collect()
        gc.freeze()


def pytest_unconfigure(config):
    if _OWN_COMPILATION_CACHE is not None:
        shutil.rmtree(_OWN_COMPILATION_CACHE, ignore_errors=True)
