"""Multi-host start-up: ``jax.distributed.initialize`` from flags, environment or cluster.

Explicit values win; otherwise ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` are read; if none is set, JAX's own cluster detection (TPU pods, SLURM,
Open MPI, ...) decides. On CPU the collectives go through gloo.
"""

from __future__ import annotations

import os

import jax

from jaxsparse.config import ConfigError

_initialized = False
ENVIRONMENT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def requested_by_environment() -> bool:
    """Does the environment ask for a multi-process run (any of :data:`ENVIRONMENT` set)?"""
    return any(os.environ.get(name) for name in ENVIRONMENT)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    global _initialized
    if _initialized:
        return
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = _environment_int("JAX_NUM_PROCESSES", 1)
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = _environment_int("JAX_PROCESS_ID", 0, below=num_processes)
    _check_flags(coordinator_address, num_processes, process_id)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    except ValueError as err:  # e.g. no coordinator and no cluster that names one
        raise ConfigError(f"multi-process start-up (coordinator {coordinator_address!r}, "
                          f"{num_processes} processes, process id {process_id}): "
                          f"{str(err).rstrip('.')}; pass "
                          "--coordinator HOST:PORT --num-processes N --process-id I (or "
                          f"{', '.join(ENVIRONMENT)})") from None
    _initialized = True


def _environment_int(name: str, minimum: int, below: int | None = None) -> int:
    """The integer in environment variable ``name``, or a ConfigError naming the variable
    (int() alone would end the command in a traceback)."""
    text = os.environ[name]
    allowed = f"an integer >= {minimum}" + (
        "" if below is None else f" and < the number of processes ({below})")
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum or (below is not None and value >= below):
        raise ConfigError(f"{name}={text!r}: must be {allowed}")
    return value


def _check_flags(coordinator_address, num_processes, process_id) -> None:
    """What JAX would otherwise refuse with an IndexError or a bare assertion."""
    if coordinator_address is not None:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"coordinator address {coordinator_address!r}: must be HOST:PORT, "
                              "e.g. 10.0.0.1:1234")
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"number of processes {num_processes}: must be >= 1")
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        raise ConfigError(f"process id {process_id}: must be in [0, number of processes"
                          + (f" = {num_processes})" if num_processes else ")"))
