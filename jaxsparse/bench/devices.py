"""Benchmarks that need a mesh: re-run the script on emulated CPU devices when the host has
too few (the device count is fixed when JAX starts, so it takes a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

from jaxsparse.parallel.emulated import emulated_devices_env


def rerun_on_emulated_devices(script: str, argv: list[str] | None, devices: int) -> bool:
    """If JAX sees fewer than ``devices`` devices, run ``script`` with ``argv`` (None: this
    process's arguments) in a fresh interpreter on that many emulated CPU devices and return
    True (its failure exits with its status); return False when there are enough devices."""
    import jax

    if len(jax.devices()) >= devices:
        return False
    env = emulated_devices_env(devices)
    argv = sys.argv[1:] if argv is None else argv
    proc = subprocess.run([sys.executable, script, *argv], env=env)
    if proc.returncode:
        raise SystemExit(proc.returncode)
    return True
