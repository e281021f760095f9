"""The environment of a fresh JAX process on emulated CPU devices (dry runs, mesh benchmarks,
tests): the device count is fixed when JAX starts, so it takes a new interpreter."""

from __future__ import annotations

import os
import re

_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")


def emulated_devices_env(devices: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) with ``JAX_PLATFORMS=cpu`` and ``devices`` host
    devices: the count replaces any earlier one in ``XLA_FLAGS``, whose other flags (a dump
    directory, an optimisation level) are kept."""
    env = dict(os.environ if env is None else env)
    flags = _DEVICE_COUNT.sub("", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env
